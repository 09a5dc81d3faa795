#!/usr/bin/env bash
# e2e: a reload against a token that does not answer (tests/slowtoken:
# its control file says "hang", and no signature returns until it stops). The test signature
# of each key has the listener's handshake_timeout as its deadline (README,
# Reload):
#  - the reload is refused at the deadline, naming the key, while the token
#    still holds the call; a reload while that call has not returned is
#    refused at once; once it returned, a reload commits again;
#  - a SIGTERM sent while a reload waits on the hung token ends the daemon
#    within handshake_timeout + drain_timeout and a margin, exit 0, without
#    waiting for the token call.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools openssl
need_slowtoken
e2e_init
provision_token
start_backend

now_ms() { echo $(($(date +%s%N) / 1000000)); }
CTL=$E2E_DIR/token.ctl
ctl() { # WORDS: the slow token's condition (written whole, then renamed)
	printf '%s\n' "$1" >"$CTL.new"
	mv "$CTL.new" "$CTL"
}
ctl present

conf=$E2E_DIR/hsmtlsd.conf
{
	printf '[global]\nlog_level = info\ndrain_timeout = 3s\n\n'
	printf '[token demo]\nuri = %s\nmodule = %s\npin_file = %s\n\n' "$HSMTLS_TOKEN_URI" "$SLOWTOKEN" "$HSMTLS_PIN_FILE"
	printf '[listener www]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\nhandshake_timeout = 2s\n' \
		"$BACKEND_PORT" "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
} >"$conf"
HSMTLS_SLOWTOKEN_MODULE="$HSMTLS_MODULE" HSMTLS_SLOWTOKEN_CONTROL_FILE="$CTL" start_daemon "$conf" ||
	bail "daemon did not start"
PORT=$(listener_port www)
serves() { openssl_get "$PORT" www.hsmtls.test "$1" </dev/null 2>/dev/null | grep -q 'hello from backend'; }
serves start && ok "start: www serves" || fail "start: www does not serve"

HUP_WAIT=30

# ------------------------------------------------ the token hangs
ctl hang
hup "a reload while the token hangs"
verdict "refused at the deadline, naming the key" \
	"refused, nothing changed.*listener www: .*the test signature with key p256 did not return within 2.0 s"
hup "a reload while that test signature has not returned"
verdict "refused at once: the earlier test signature with that key has not returned" \
	"refused, nothing changed.*the test signature of an earlier change with key p256 has not returned yet"
ctl present
wait_until 30 grep -q 'key p256: the test signature that overran its deadline returned after' "$DAEMON_LOG" &&
	ok "once the token answers, the test signature's return is logged" ||
	fail "no line says the overrunning test signature returned"
hup "a reload once the token answers again"
verdict "committed once the token answers" "committed"
serves again && ok "www serves" || fail "www does not serve after the token answers again"

# ------------------------------------------------ SIGTERM while a reload waits on the token
ctl hang
off=$(stat -c %s "$DAEMON_LOG")
kill -HUP "$DAEMON_PID"
wait_until 10 _log_after_has "$off" 'SIGHUP: reloading' || fail "the reload did not start"
t0=$(now_ms)
kill -TERM "$DAEMON_PID"
# handshake_timeout 2 s + drain_timeout 3 s (and a margin); the token never answers.
if wait_until 20 daemon_exited; then
	ok "SIGTERM during a reload on a hung token: exited after $(($(now_ms) - t0)) ms"
	check_eq "it exits 0" 0 "$(cat "$DAEMON_RC_FILE")"
	forget_pid "$DAEMON_PID"
else
	fail "SIGTERM during a reload on a hung token: still running 20 s later"
	kill -KILL "$DAEMON_PID" 2>/dev/null
fi
check_grep "that reload was refused at its deadline" "$DAEMON_LOG" \
	"refused, nothing changed.*the test signature with key p256 did not return within 2.0 s"
check_grep "the exit did not wait for the token call" "$DAEMON_LOG" \
	'1 test signature of a reload or an admin API change is still inside a token call: exiting without waiting'
e2e_finish
