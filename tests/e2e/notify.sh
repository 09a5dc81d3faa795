#!/usr/bin/env bash
# e2e: sd_notify without systemd (a python3 listener on a unix datagram
# socket as $NOTIFY_SOCKET). READY=1 comes only after every listener is
# bound (the port accepts when the message arrives) and after the start-up
# test signatures, with STATUS=serving N listeners; STOPPING=1 with
# STATUS=draining N connections on SIGTERM, STATUS=stopped at the end, exit
# 0. A key whose token does not answer its test signature: no READY=1,
# exit 1 with the key named. Without $NOTIFY_SOCKET no test signature is made.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools python3 openssl mkfifo
e2e_init
provision_token
start_backend

# start_listener NAME: the notify socket $E2E_DIR/NAME.sock, messages in
# $E2E_DIR/NAME.msgs (for the daemon log $E2E_DIR/NAME.log).
start_listener() {
	: >"$E2E_DIR/$1.msgs"
	python3 "$SRCDIR/tests/e2e/notify_listener.py" "$E2E_DIR/$1.sock" "$E2E_DIR/$1.msgs" "$E2E_DIR/$1.log" \
		2>"$E2E_DIR/$1.listener.err" &
	E2E_PIDS+=("$!")
	wait_until 10 test -s "$E2E_DIR/$1.msgs.ready" || bail "the notify listener did not bind"
}

conf=$E2E_DIR/notify.conf
printf '[global]\nlog_level = info\ndrain_timeout = 60s\n\n' >"$conf"
write_token_section "$conf"
write_listener "$conf" www "cert = $HSMTLS_CERT_RSA2048" "key = $HSMTLS_KEY_RSA2048"
cat >>"$conf" <<EOF
[listener api]
listen = 127.0.0.1:0
backend = 127.0.0.1:$BACKEND_PORT
cert = $HSMTLS_CERT_ED25519
key = $HSMTLS_KEY_ED25519
EOF

# ------------------------------------------------------------- READY=1
start_listener ok
NOTIFY_SOCKET=$E2E_DIR/ok.sock start_daemon "$conf" "$E2E_DIR/ok.log" || bail "daemon did not start"
wait_until 10 grep -q '^READY=1' "$E2E_DIR/ok.msgs" || fail "no READY=1 within 10 s"
ready=$(grep '^READY=1' "$E2E_DIR/ok.msgs" | head -n 1)
note "READY message: $ready"
check_eq "READY=1 with the status line" "READY=1|STATUS=serving 2 listeners" "$(cut -f1 <<<"$ready")"
check_eq "READY=1 after both listeners were bound" "listening=2" "$(cut -f2 <<<"$ready")"
check_eq "READY=1 when the port already accepts" "port=ok" "$(cut -f3 <<<"$ready")"
check_eq "READY=1 after the start-up test signatures" "selftest=yes" "$(cut -f4 <<<"$ready")"
check_grep "every key answered its test signature" "$E2E_DIR/ok.log" 'start-up test signatures: 3 keys answered, 0 passed over'
check_eq "READY=1 is the first message" 1 "$(grep -n '' "$E2E_DIR/ok.msgs" | grep -m1 READY=1 | cut -d: -f1)"
if usage_snapshot "$E2E_DIR/u0"; then
	check_eq "the test signatures are not counted as usage" 0 "$(usage_count "$E2E_DIR/u0" p256 sign)"
else
	fail "no usage snapshot"
fi

# ------------------------------ SIGHUP: RELOADING=1 before, READY=1 after
two_ready() { [ "$(grep -c '^READY=1' "$E2E_DIR/ok.msgs")" -ge 2 ]; }
kill -HUP "$DAEMON_PID"
wait_until 20 two_ready || fail "no READY=1 within 20 s of SIGHUP"
order=$(cut -f1 "$E2E_DIR/ok.msgs" | sed -n '2,$p' | sed 's/|.*//' | tr '\n' ' ')
check_eq "SIGHUP: RELOADING=1, then READY=1" "RELOADING=1 READY=1 " "$order"
check_grep "RELOADING=1 carries MONOTONIC_USEC (systemd 253+)" "$E2E_DIR/ok.msgs" '^RELOADING=1\|MONOTONIC_USEC=[0-9]+\|'
check_eq "READY=1 after the reload says it committed" "READY=1|STATUS=serving 2 listeners (reload committed)" \
	"$(grep '^READY=1' "$E2E_DIR/ok.msgs" | sed -n 2p | cut -f1)"
check_grep "the reload committed" "$E2E_DIR/ok.log" 'reload of .* committed'

# --------------------------------------- STOPPING=1 with a client held open
PORT=$(listener_port www)
hold_client "$PORT"
kill -TERM "$DAEMON_PID"
wait_until 10 grep -q '^STOPPING=1' "$E2E_DIR/ok.msgs" || fail "no STOPPING=1 within 10 s of SIGTERM"
check_eq "STOPPING=1 with the connection still open" "STOPPING=1|STATUS=draining 1 connection" \
	"$(grep -m1 '^STOPPING=1' "$E2E_DIR/ok.msgs" | cut -f1)"
check "draining: still running with the client open" daemon_running
exec 7>&-
wait "$cpid" 2>/dev/null
forget_pid "$cpid"
if wait_until 20 daemon_exited; then
	check_eq "exit status after the drain" 0 "$(cat "$DAEMON_RC_FILE")"
else
	fail "the daemon did not exit within 20 s after the held client closed"
fi
forget_pid "$DAEMON_PID"
wait_until 5 grep -q 'STATUS=stopped' "$E2E_DIR/ok.msgs"
check_eq "the last message is STATUS=stopped" "STATUS=stopped" "$(tail -n 1 "$E2E_DIR/ok.msgs" | cut -f1)"

# ------------------------------------ a key that does not answer: no READY
if [ -n "${SLOWTOKEN:-}" ] && [ -f "$SLOWTOKEN" ]; then
	sconf=$E2E_DIR/slow.conf
	sed "s|^module = .*|module = $SLOWTOKEN|" "$conf" >"$sconf"
	ctl=$E2E_DIR/token.control
	echo device-error >"$ctl"
	start_listener bad
	: >"$E2E_DIR/bad.log"
	HSMTLS_SLOWTOKEN_MODULE=$HSMTLS_MODULE HSMTLS_SLOWTOKEN_CONTROL_FILE=$ctl NOTIFY_SOCKET=$E2E_DIR/bad.sock \
		timeout 30 "$HSMTLSD" -c "$sconf" 2>>"$E2E_DIR/bad.log" </dev/null >/dev/null
	rc=$?
	check_eq "a token that fails every signature: hsmtlsd exits 1 under a service manager" 1 "$rc"
	check_grep "the log names the key that did not answer" "$E2E_DIR/bad.log" \
		'key pkcs11:.* did not answer its start-up test signature'
	check_eq "no READY=1 was sent" 0 "$(grep -c '^READY=1' "$E2E_DIR/bad.msgs")"
	# Without a service manager nothing is signed at start: the daemon serves.
	export HSMTLS_SLOWTOKEN_MODULE=$HSMTLS_MODULE HSMTLS_SLOWTOKEN_CONTROL_FILE=$ctl
	if start_daemon "$sconf" "$E2E_DIR/plain.log"; then
		ok "without \$NOTIFY_SOCKET no start-up test signature (the failing token does not stop the start)"
		stop_daemon
	fi
	unset HSMTLS_SLOWTOKEN_MODULE HSMTLS_SLOWTOKEN_CONTROL_FILE
else
	skipped "a token that does not answer" "the slowtoken module was not built"
fi
e2e_finish
