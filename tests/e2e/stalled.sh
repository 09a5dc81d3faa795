#!/usr/bin/env bash
# e2e: clients that stall in the middle of their handshake never hold a
# handshake thread. With handshake_threads = 2, 4 x 2 stalled connections (a
# 1-byte handshake record, half a ClientHello, a whole TLS 1.3 or TLS 1.2
# ClientHello and then silence after the server's flight) wait on the event
# loop while normal clients keep completing handshakes long before
# handshake_timeout; they are counted (SIGUSR1 "handshakes:" line). On a
# listener with handshake_timeout = 1s each kind is closed after about 1 s
# and logged. Beyond max_waiting_handshakes the connection that has waited
# longest is closed (warning at most once a second), and a new client is
# still served.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools openssl curl gnutls-cli python3
e2e_init
provision_token
start_backend

STALL=$E2E_HERE/stall-client.py
now_ms() { echo $(($(date +%s%N) / 1000000)); }
count_lines() { grep -c -- "$2" "$1" 2>/dev/null || true; }
at_least() { [ "$(count_lines "$1" "$2")" -ge "$3" ]; }

# stats FIELD: FIELD= of a fresh "handshakes:" line (SIGUSR1).
stats() {
	local off
	off=$(stat -c %s "$DAEMON_LOG")
	kill -USR1 "$DAEMON_PID" || return 1
	wait_until 10 sh -c "tail -c +$((off + 1)) '$DAEMON_LOG' | grep -q ' handshakes: completed='" || return 1
	tail -c +$((off + 1)) "$DAEMON_LOG" | grep ' handshakes: completed=' | tail -n 1 |
		tr ' ' '\n' | awk -F= -v f="$1" '$1 == f { print $2 }'
}

# stall PORT HOLD OUT KIND...: the stalled clients in the background; waits
# for READY. Sets STALL_PID.
stall() {
	local port=$1 hold=$2 out=$3
	shift 3
	: >"$out"
	python3 "$STALL" "$port" "$hold" "$@" >"$out" 2>"$out.err" &
	STALL_PID=$!
	E2E_PIDS+=("$STALL_PID")
	wait_until 10 grep -q '^READY' "$out" || bail "stall-client did not connect: $(cat "$out.err")"
}

unstall() {
	kill "$STALL_PID" 2>/dev/null
	wait "$STALL_PID" 2>/dev/null
	forget_pid "$STALL_PID"
}

conf=$E2E_DIR/stalled.conf
printf '[global]\nlog_level = info\nhandshake_threads = 2\nio_threads = 1\ndrain_timeout = 2s\n\n' >"$conf"
write_token_section "$conf"
write_listener "$conf" www "handshake_timeout = 20s"
write_listener "$conf" quick "handshake_timeout = 1s"
start_daemon "$conf" || bail "daemon did not start"
PORT=$(listener_port www)
QUICK=$(listener_port quick)

# ------------------------------------ 8 stalled connections, 2 threads
KINDS=(one-byte half-hello hello13 hello12)
held=$E2E_DIR/held.out
stall "$PORT" 90 "$held" "${KINDS[@]}" "${KINDS[@]}"
if wait_until 10 at_least "$held" '^FLIGHT hello' 4; then
	ok "the server answered all 4 whole ClientHellos with its flight while 8 connections stall"
else
	fail "only $(count_lines "$held" '^FLIGHT hello') of 4 stalled whole ClientHellos got the server's flight within 10 s"
fi

# Normal clients, one after the other: each must complete long before the
# 20 s handshake_timeout (8 s: a liveness bound, not a speed bound).
served=0
slowest=0
for i in 1 2 3 4 5; do
	t0=$(now_ms)
	out=$(curl_get "$PORT" www.hsmtls.test --max-time 8 "https://www.hsmtls.test:$PORT/live-$i" 2>&1)
	t=$(($(now_ms) - t0))
	[ "$t" -gt "$slowest" ] && slowest=$t
	[ "$out" = "hello from backend: GET /live-$i HTTP/1.1" ] && served=$((served + 1))
done
t0=$(now_ms)
if gnutls_get "$PORT" www.hsmtls.test NORMAL live-gnutls | grep -q 'hello from backend'; then
	served=$((served + 1))
fi
t=$(($(now_ms) - t0))
[ "$t" -gt "$slowest" ] && slowest=$t
t0=$(now_ms)
if openssl_get "$PORT" www.hsmtls.test live-openssl -tls1_2 | grep -q 'hello from backend'; then
	served=$((served + 1))
fi
t=$(($(now_ms) - t0))
[ "$t" -gt "$slowest" ] && slowest=$t
if [ "$served" -eq 7 ] && [ "$slowest" -lt 8000 ]; then
	ok "7 normal clients (curl, gnutls-cli, openssl) served next to 8 stalled connections and 2 handshake threads (slowest $slowest ms)"
else
	fail "normal clients next to 8 stalled connections: $served of 7 served, slowest $slowest ms"
fi
check_eq "the 8 stalled handshakes are counted as waiting on their peers" 8 "$(stats waiting)"
check_eq "none of them is on a handshake thread" 0 "$(stats running)"

# --------------------------- handshake_timeout = 1s: each kind is closed
quick=$E2E_DIR/quick.out
stall "$QUICK" 8 "$quick" "${KINDS[@]}"
wait_until 8 at_least "$quick" '^CLOSED' 4
for k in "${KINDS[@]}"; do
	ms=$(awk -v k="$k" '$1 == "CLOSED" && $2 == k { print $4 }' "$quick")
	if [ -n "$ms" ] && [ "$ms" -ge 900 ] && [ "$ms" -lt 4000 ]; then
		ok "$k: closed after the 1 s handshake timeout ($ms ms)"
	else
		fail "$k: ${ms:-not} closed (expected after about 1000 ms)"
	fi
done
check_grep "a stalled whole ClientHello: the timeout is logged" "$DAEMON_LOG" \
	'listener quick: handshake with 127\.0\.0\.1:[0-9]+ failed: handshake timed out'
check_grep "half a ClientHello: the timeout is logged" "$DAEMON_LOG" \
	'listener quick: 127\.0\.0\.1:[0-9]+: no ClientHello within the handshake timeout'
unstall
t0=$(now_ms)
out=$(curl_get "$PORT" www.hsmtls.test --max-time 8 "https://www.hsmtls.test:$PORT/after" 2>&1)
check_eq "still serving after the stalled clients left" "hello from backend: GET /after HTTP/1.1" "$out"
stop_daemon 10
check_eq "exit status" 0 "$DAEMON_RC"
check_grep "the exit line counts the handshakes" "$DAEMON_LOG" 'handshakes: completed=[0-9]+ failed=[0-9]+'

# -------------------------------------------- max_waiting_handshakes = 3
conf2=$E2E_DIR/limit.conf
printf '[global]\nlog_level = info\nhandshake_threads = 2\nmax_waiting_handshakes = 3\ndrain_timeout = 2s\n\n' >"$conf2"
write_token_section "$conf2"
write_listener "$conf2" www "handshake_timeout = 20s"
start_daemon "$conf2" "$E2E_DIR/limit.log" || bail "second daemon did not start"
PORT=$(listener_port www)
lim=$E2E_DIR/limit.out
stall "$PORT" 90 "$lim" hello13 hello13 hello13 hello13 hello13 hello13
if wait_until 10 at_least "$lim" '^CLOSED' 3; then
	ok "6 stalled handshakes, limit 3: 3 closed at once"
else
	fail "6 stalled handshakes, limit 3: $(count_lines "$lim" '^CLOSED') closed within 10 s"
fi
check_grep "the limit is logged" "$DAEMON_LOG" 'handshakes waiting on their peers: limit of 3 reached'
check_eq "3 are waiting" 3 "$(stats waiting)"
out=$(curl_get "$PORT" www.hsmtls.test --max-time 8 "https://www.hsmtls.test:$PORT/at-limit" 2>&1)
check_eq "a normal client is served at the limit" "hello from backend: GET /at-limit HTTP/1.1" "$out"
closed_over=$(stats waiting_closed)
check "the closed ones are counted ($closed_over)" test "${closed_over:-0}" -ge 3
unstall
stop_daemon 10
check_eq "exit status" 0 "$DAEMON_RC"

e2e_finish
