#!/usr/bin/env bash
# e2e: kill -9 loses at most about a second of usage counts.
#
# hsmtls-load keeps TLS 1.3 handshakes running (4 threads, p256 key); every
# handshake it completes is stamped with the time (its --leaf-log line, read
# as it is written). After at least 4 s of traffic the daemon is killed with
# SIGKILL mid-run; state.db (read with sqlite3, then by a restarted daemon)
# must hold:
#  - at least every signature of the handshakes the client had completed
#    2.5 s before the kill (the writer flushes every second: about one second
#    is lost, the rest is a margin for a loaded 2-core machine), and the same
#    for the listener's handshake count;
#  - never more than were made (the completed handshakes, plus the ones in
#    flight: one per client thread).
# The loss is printed in handshakes and in seconds of traffic (how long
# before the kill the last handshake that state.db counted completed).
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools python3 sqlite3
[ -n "${HSMTLS_LOAD:-}" ] && [ -x "$HSMTLS_LOAD" ] || skip "hsmtls-load was not built (HSMTLS_LOAD unset)"
e2e_init
provision_token
start_backend

STATE=$E2E_DIR/state
THREADS=4
MARGIN=2.5
conf=$E2E_DIR/kill.conf
printf '[global]\nlog_level = info\nstate_dir = %s\n\n' "$STATE" >"$conf"
write_token_section "$conf"
cat >>"$conf" <<CONF
[listener www]
listen = 127.0.0.1:0
backend = 127.0.0.1:$BACKEND_PORT
cert = $HSMTLS_CERT_P256
key = $HSMTLS_KEY_P256
CONF
start_daemon "$conf" "$E2E_DIR/hsmtlsd-1.log" || bail "daemon did not start"
PORT=$(listener_port www)

# The stamps: one line per completed handshake, the time it was read
# (seconds since the epoch, CLOCK_REALTIME like the kill's stamp).
mkfifo "$E2E_DIR/leaf.fifo"
python3 -u -c '
import sys, time
out = open(sys.argv[2], "w", buffering=1)
with open(sys.argv[1], "rb", buffering=0) as f:
    buf = b""
    while True:
        b = f.read(4096)
        if not b:
            break
        buf += b
        n = buf.count(b"\n")
        if n:
            t = "%.6f\n" % time.time()
            out.write(t * n)
            buf = buf[buf.rfind(b"\n") + 1:]
' "$E2E_DIR/leaf.fifo" "$E2E_DIR/stamps" &
READER_PID=$!
E2E_PIDS+=("$READER_PID")
"$HSMTLS_LOAD" --connect "127.0.0.1:$PORT" --insecure --tls 1.3 --threads "$THREADS" --duration 60 --timeout 5 \
	--leaf-log "$E2E_DIR/leaf.fifo" >"$E2E_DIR/load.out" 2>"$E2E_DIR/load.err" &
LOAD_PID=$!
E2E_PIDS+=("$LOAD_PID")

# traffic_for SECONDS: the first stamp is at least SECONDS old.
traffic_for() {
	[ -s "$E2E_DIR/stamps" ] &&
		python3 -c 'import sys, time; sys.exit(0 if time.time() - float(open(sys.argv[1]).readline()) >= float(sys.argv[2]) else 1)' \
			"$E2E_DIR/stamps" "$1"
}
wait_until 30 traffic_for 4 || bail "hsmtls-load made no handshakes for 4 s ($(tail -n 3 "$E2E_DIR/load.err" | tr '\n' ' '))"
T_KILL=$(python3 -c 'import time; print("%.6f" % time.time())')
kill -KILL "$DAEMON_PID"
wait_until 10 daemon_exited || bail "hsmtlsd survived kill -9"
forget_pid "$DAEMON_PID"
kill -TERM "$LOAD_PID" 2>/dev/null
wait "$LOAD_PID" 2>/dev/null
forget_pid "$LOAD_PID"
wait_until 10 sh -c "! kill -0 $READER_PID 2>/dev/null" || kill -KILL "$READER_PID" 2>/dev/null
forget_pid "$READER_PID"

# Completed handshakes: by the kill, by (kill - MARGIN), and all of them.
read -r DONE_KILL DONE_EARLY DONE_ALL RATE < <(python3 -c '
import sys
t = [float(l) for l in open(sys.argv[1]) if l.strip()]
k, m = float(sys.argv[2]), float(sys.argv[3])
last1 = sum(1 for x in t if k - 1 < x <= k)
print(sum(1 for x in t if x <= k), sum(1 for x in t if x <= k - m), len(t), last1)
' "$E2E_DIR/stamps" "$T_KILL" "$MARGIN")
SIGNS=$(sqlite3 "$STATE/state.db" "SELECT coalesce(sum(count), 0) FROM usage WHERE token = 'demo' AND op = 'sign' AND result = 'ok'")
HS=$(sqlite3 "$STATE/state.db" "SELECT coalesce(sum(count), 0) FROM handshakes WHERE listener = 'www' AND result = 'ok' AND resumed = 0")
# The seconds of traffic lost: the kill's time minus the time the last
# handshake state.db counts completed (the SIGNS-th stamp).
LOSS_S=$(python3 -c '
import sys
n, k = int(sys.argv[2]), float(sys.argv[3])
t = sorted(x for x in (float(l) for l in open(sys.argv[1]) if l.strip()) if x <= k)
print("%.2f" % (0 if n >= len(t) else k - t[n - 1] if n > 0 else k - t[0]))
' "$E2E_DIR/stamps" "$SIGNS" "$T_KILL")
note "kill -9 after $DONE_KILL handshakes ($RATE in its last second; $DONE_EARLY by $MARGIN s before it, $DONE_ALL completed in all):" \
	"state.db counts $SIGNS signatures and $HS handshakes: lost $((DONE_KILL - SIGNS)) handshakes, $LOSS_S s of traffic"
if [ "$SIGNS" -ge "$DONE_EARLY" ] && [ "$DONE_EARLY" -gt 0 ]; then
	ok "state.db keeps the signatures of every handshake completed $MARGIN s before the kill ($SIGNS >= $DONE_EARLY; lost $LOSS_S s)"
else
	fail "state.db lost more than $MARGIN s of signatures: $SIGNS counted, $DONE_EARLY completed by $MARGIN s before the kill (lost $LOSS_S s)"
fi
if [ "$HS" -ge "$DONE_EARLY" ]; then
	ok "... and of the listener's handshakes ($HS >= $DONE_EARLY)"
else
	fail "state.db lost more than $MARGIN s of handshakes: $HS counted, $DONE_EARLY completed by $MARGIN s before the kill"
fi
check_eq "never more signatures counted than made (at most $DONE_ALL completed + $THREADS in flight)" 1 \
	"$([ "$SIGNS" -le $((DONE_ALL + THREADS)) ] && echo 1)"
check_eq "never more handshakes counted than made" 1 "$([ "$HS" -le $((DONE_ALL + THREADS)) ] && echo 1)"

# The killed state.db opens again.
start_daemon "$conf" "$E2E_DIR/hsmtlsd-2.log" || fail "the daemon does not start again on the state.db of the killed one"
stop_daemon 10
check_eq "SIGTERM: exit 0" 0 "$DAEMON_RC"
check_eq "... and state.db still holds the $SIGNS signatures" "$SIGNS" \
	"$(sqlite3 "$STATE/state.db" "SELECT coalesce(sum(count), 0) FROM usage WHERE token = 'demo' AND op = 'sign' AND result = 'ok'")"
e2e_finish
