#!/usr/bin/env bash
# e2e: connection limits. A listener with max_connections = 2 holding two
# established connections refuses a third (closed at once, logged at most
# once a second), and serves again as soon as one of the two has gone.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools openssl curl mkfifo
e2e_init
provision_token
start_backend

conf=$E2E_DIR/limits.conf
printf '[global]\nlog_level = info\ndrain_timeout = 2s\n\n' >"$conf"
write_token_section "$conf"
cat >>"$conf" <<EOF
[listener www]
listen = 127.0.0.1:0
backend = 127.0.0.1:$BACKEND_PORT
cert = $HSMTLS_CERT_P256
key = $HSMTLS_KEY_P256
max_connections = 2
EOF
start_daemon "$conf" || bail "daemon did not start"
PORT=$(listener_port www)

# hold CLIENT-N: an openssl s_client whose input stays open (a fifo) until
# we close it; its output goes to a file.
hold() {
	local n=$1
	mkfifo "$E2E_DIR/in-$n"
	openssl s_client -connect "127.0.0.1:$PORT" -servername www.hsmtls.test -CAfile "$HSMTLS_CA" \
		-verify_return_error -quiet <"$E2E_DIR/in-$n" >"$E2E_DIR/out-$n" 2>&1 &
	eval "HOLD_PID_$n=$!"
	E2E_PIDS+=("$!")
	exec {fd}>"$E2E_DIR/in-$n"
	eval "HOLD_FD_$n=$fd"
	printf 'GET /held-%s HTTP/1.1\r\nHost: www.hsmtls.test\r\n\r\n' "$n" >&"$fd"
	wait_until 10 grep -q "hello from backend: GET /held-$n" "$E2E_DIR/out-$n"
}

# (not through check(): its command substitution would run hold in a subshell)
if hold 1; then ok "first connection established and served"; else fail "first connection not served"; fi
if hold 2; then ok "second connection established and served"; else fail "second connection not served"; fi

out=$(curl_get "$PORT" www.hsmtls.test "https://www.hsmtls.test:$PORT/third" 2>&1)
rc=$?
if [ "$rc" -ne 0 ] && ! grep -q 'hello from backend' <<<"$out"; then
	ok "a third connection is refused while two are open (curl exit $rc)"
else
	fail "a third connection got through the limit of 2: $out"
fi
check_grep "the refusal is logged" "$DAEMON_LOG" 'listener www: connection limit reached'
check "the held connections still work" kill -0 "$HOLD_PID_1"

# Let one of the two go: the next client gets in.
# (s_client -quiet does not end on end-of-input: end it)
kill "$HOLD_PID_1" 2>/dev/null
exec {HOLD_FD_1}>&-
served=0
for _ in $(seq 50); do
	if curl_get "$PORT" www.hsmtls.test "https://www.hsmtls.test:$PORT/after" 2>/dev/null | grep -q 'hello from backend'; then
		served=1
		break
	fi
	sleep 0.1
done
check_eq "a new client is served once a slot is free" "$served" 1

kill "$HOLD_PID_2" 2>/dev/null
exec {HOLD_FD_2}>&-
stop_daemon
check_eq "exit status" "$DAEMON_RC" 0
e2e_finish
