#!/usr/bin/env bash
# e2e: connection limits. A listener with max_connections = 2 holding two
# established connections refuses a third and a burst of 20 more (closed
# at once, logged at most once a second), the two held connections still
# carry requests, and it serves again as soon as one of the two has gone.
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
write_listener "$conf" www "max_connections = 2"
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

t_first=$(date +%s%N)
out=$(curl_get "$PORT" www.hsmtls.test "https://www.hsmtls.test:$PORT/third" 2>&1)
rc=$?
if [ "$rc" -ne 0 ] && ! grep -q 'hello from backend' <<<"$out"; then
	ok "a third connection is refused while two are open (curl exit $rc)"
else
	fail "a third connection got through the limit of 2: $out"
fi
check_grep "the refusal is logged" "$DAEMON_LOG" 'listener www: connection limit reached'

# A burst of 20 more (a byte each, so that TCP_DEFER_ACCEPT hands them
# over): all closed without an answer, and the warning is logged at most
# once a second, not once per connection.
refused=0
for i in $(seq 20); do
	got=$(timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf x >&3 && cat <&3' _ "$PORT" 2>/dev/null)
	rc=$?
	[ "$rc" -ne 124 ] && [ -z "$got" ] && refused=$((refused + 1))
done
elapsed_ms=$((($(date +%s%N) - t_first) / 1000000))
check_eq "a burst of 20 connections over the limit: all closed at once without data" 20 "$refused"
warned=$(grep -c 'listener www: connection limit reached' "$DAEMON_LOG")
if [ "$warned" -ge 1 ] && [ "$warned" -le $((1 + elapsed_ms / 1000)) ]; then
	ok "21 refusals in $elapsed_ms ms logged $warned time(s): at most once a second"
else
	fail "21 refusals in $elapsed_ms ms logged $warned times (at most $((1 + elapsed_ms / 1000)) allowed)"
fi

# The two held connections still carry requests.
for n in 1 2; do
	fd_var=HOLD_FD_$n
	# (a subshell: a client that is gone is a failed check, not SIGPIPE)
	if (printf 'GET /held-%s-again HTTP/1.1\r\nHost: www.hsmtls.test\r\n\r\n' "$n" >&"${!fd_var}") 2>/dev/null &&
		wait_until 10 grep -q "hello from backend: GET /held-$n-again" "$E2E_DIR/out-$n"; then
		ok "held connection $n still works: a second request on it is answered"
	else
		fail "held connection $n: no answer to a second request"
		tail -n 5 "$E2E_DIR/out-$n" | sed 's/^/#   /'
	fi
done

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
