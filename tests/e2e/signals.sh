#!/usr/bin/env bash
# e2e: signals. SIGHUP reloads (the unchanged file: committed; reload.sh
# tests reloads in depth): the daemon stays up and keeps serving. A second SIGTERM during the drain exits at once, with an
# established client still open and drain_timeout far away, and the usage
# lines are still logged.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools openssl curl mkfifo
e2e_init
provision_token
start_backend

now_ms() { echo $(($(date +%s%N) / 1000000)); }

conf=$E2E_DIR/signals.conf
printf '[global]\nlog_level = info\ndrain_timeout = 60s\n\n' >"$conf"
write_token_section "$conf"
write_listener "$conf" www
start_daemon "$conf" || bail "daemon did not start"
PORT=$(listener_port www)

# ----------------------------------------------------------------- SIGHUP
kill -HUP "$DAEMON_PID"
check_grep_wait() { wait_until 5 grep -Eq -- "$2" "$DAEMON_LOG" && ok "$1" || fail "$1: no line matching /$2/"; }
check_grep_wait "SIGHUP reloads the unchanged file" 'reload of .*signals.conf committed: kept with new credentials: www'
check "SIGHUP: the daemon is still running" daemon_running
out=$(curl_get "$PORT" www.hsmtls.test "https://www.hsmtls.test:$PORT/after-hup" 2>&1)
check_eq "SIGHUP: still serving" "hello from backend: GET /after-hup HTTP/1.1" "$out"

# ------------------------------ a second SIGTERM with a client held open
hold_client "$PORT"
kill -TERM "$DAEMON_PID"
check_grep_wait "first SIGTERM: draining with the held client open" 'draining: no new connections, 1 open'
check "first SIGTERM: still running (drain_timeout 60 s)" daemon_running
t0=$(now_ms)
kill -TERM "$DAEMON_PID"
if wait_until 10 daemon_exited; then
	t=$(($(now_ms) - t0))
	if [ "$t" -lt 3000 ]; then
		ok "second SIGTERM: exit at once with the client still open ($t ms)"
	else
		fail "second SIGTERM: exit after $t ms"
	fi
	check_eq "second SIGTERM: exit status 0" 0 "$(cat "$DAEMON_RC_FILE")"
else
	fail "second SIGTERM: still running 10 s later"
	kill -KILL "$DAEMON_PID" 2>/dev/null
fi
forget_pid "$DAEMON_PID"
check_grep "second SIGTERM: logged" "$DAEMON_LOG" 'second signal: stopping now'
check_grep "second SIGTERM: the usage lines are logged" "$DAEMON_LOG" 'usage: token=demo key=p256 op=sign mech=CKM_ECDSA result=ok count=[1-9]'
exec 7>&-
wait_until 5 sh -c "! kill -0 $cpid 2>/dev/null" || kill "$cpid" 2>/dev/null
wait "$cpid" 2>/dev/null
forget_pid "$cpid"

e2e_finish
