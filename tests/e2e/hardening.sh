#!/usr/bin/env bash
# e2e: a hardened process. The daemon runs as an unprivileged user (nobody
# when the test runs as root, else the test's own user) with its PIN in an
# environment variable and log_level = debug:
#  - it is not dumpable: its /proc/PID files are owned by root although it
#    runs as another user, and a process of its own user cannot read its
#    /proc/PID/environ (root still can: CAP_SYS_PTRACE);
#  - no core files: /proc/PID/limits says "Max core file size 0 0";
#  - the PIN is nowhere to be read: not in /proc/PID/environ (read as root
#    where the test is root), not in the debug log after handshakes and a
#    re-login. (hsmtlsd takes no PIN on its command line, so /proc/PID/cmdline
#    is not looked at: a check there could not fail.)
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools curl stat
[ -n "${SLOWTOKEN:-}" ] && [ -f "$SLOWTOKEN" ] || skip "the slowtoken module was not built (SLOWTOKEN unset)"
e2e_init
provision_token
start_backend
PIN=$(head -n 1 "$HSMTLS_PIN_FILE")
[ "${#PIN}" -ge 4 ] || bail "the PIN is too short to look for"

# as_user CMD...: run as the daemon's user.
if [ "$(id -u)" = 0 ]; then
	need_tools setpriv
	RUN_UID=65534
	RUN_GID=65534
	as_user() { setpriv --reuid="$RUN_UID" --regid="$RUN_GID" --clear-groups -- "$@"; }
	# The daemon's files must be readable (and the token writable) by it.
	chown -R "$RUN_UID:$RUN_GID" "$E2E_DIR"
	wrapper=$E2E_DIR/hsmtlsd-as-nobody
	printf '#!/bin/sh\nexec setpriv --reuid=%s --regid=%s --clear-groups -- %s "$@"\n' "$RUN_UID" "$RUN_GID" "$HSMTLSD" >"$wrapper"
	chmod 755 "$wrapper"
	HSMTLSD=$wrapper
else
	RUN_UID=$(id -u)
	as_user() { "$@"; }
fi

conf=$E2E_DIR/hardening.conf
cat >"$conf" <<EOF
[global]
log_level = debug

[token demo]
uri = $HSMTLS_TOKEN_URI
module = $SLOWTOKEN
pin_env = HSMTLS_E2E_PIN
max_sessions = 2

EOF
write_listener "$conf" www
chmod 644 "$conf"

# Every 3rd signature the token closes all sessions: the daemon logs in
# again with the PIN it keeps.
HSMTLS_E2E_PIN=$PIN HSMTLS_SLOWTOKEN_MODULE=$HSMTLS_MODULE HSMTLS_SLOWTOKEN_CLOSE_SESSIONS_EVERY=3 \
	start_daemon "$conf" || bail "the daemon did not start"
port=$(listener_port www)
oks=0
for i in 1 2 3 4 5 6; do
	curl_get "$port" www.hsmtls.test "https://www.hsmtls.test:$port/h$i" 2>/dev/null | grep -q 'hello from backend' &&
		oks=$((oks + 1))
done
check_eq "six handshakes succeed (with re-logins)" "$oks" 6
check_grep "the daemon logged in again meanwhile" "$DAEMON_LOG" 'session lost .*reopening'

check_eq "the daemon runs as uid $RUN_UID" "$(awk '/^Uid:/ { print $2 }' "/proc/$DAEMON_PID/status")" "$RUN_UID"
if [ "$RUN_UID" != 0 ]; then
	check_eq "not dumpable: its /proc/PID files are owned by root, not by uid $RUN_UID" \
		"$(stat -c %u "/proc/$DAEMON_PID/environ")" 0
	check_not "not dumpable: a process of its own user cannot read /proc/PID/environ" \
		as_user sh -c "cat /proc/$DAEMON_PID/environ >/dev/null 2>&1"
	check_not "not dumpable: nor /proc/PID/mem" \
		as_user sh -c "head -c 1 /proc/$DAEMON_PID/mem >/dev/null 2>&1"
fi
check_grep "no core files: RLIMIT_CORE is 0" "/proc/$DAEMON_PID/limits" '^Max core file size +0 +0 '
if [ -r "/proc/$DAEMON_PID/environ" ] && cat "/proc/$DAEMON_PID/environ" >/dev/null 2>&1; then
	note "/proc/PID/environ is readable to root (CAP_SYS_PTRACE), so look there"
	check_not "the PIN is not in /proc/PID/environ" grep -qaF -- "$PIN" "/proc/$DAEMON_PID/environ"
	check_not "nor its value (wiped in place)" sh -c "tr '\\0' '\\n' <'/proc/$DAEMON_PID/environ' | grep -q '^HSMTLS_E2E_PIN=.'"
fi
stop_daemon
check_eq "it exits cleanly" "$DAEMON_RC" 0
check_grep "the log is at debug level (PKCS#11 failures traced)" "$DAEMON_LOG" 'debug: PKCS#11 C_Sign: CKR_SESSION_HANDLE_INVALID'
check_not "the PIN is not in the debug log" grep -qaF -- "$PIN" "$DAEMON_LOG"
e2e_finish
