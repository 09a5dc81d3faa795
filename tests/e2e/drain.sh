#!/usr/bin/env bash
# e2e: SIGTERM catches connections at every point of their life, and drain
# keeps every promise: a connection already accepted is served to its end,
# a new one is refused, the daemon exits 0 once the last one is done and
# before drain_timeout.
#  - in the handshake: the token (tests/slowtoken) answers after 2 s, so
#    the handshake is inside C_Sign when SIGTERM comes;
#  - anywhere: 24 clients start a few milliseconds apart and SIGTERM comes
#    in the middle of them, so some are in the TCP backlog, some in the
#    ClientHello, the handshake or the hand-over to an I/O loop, some
#    established. Each client either never gets a handshake (refused) or is
#    served whole (its echo comes back): no connection is dropped once the
#    daemon has taken it, and none of those is left open at exit;
#  - established: covered by proxy.sh (drain with an open connection).
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools openssl mkfifo
[ -n "${SLOWTOKEN:-}" ] && [ -f "$SLOWTOKEN" ] || skip "the slowtoken module was not built (SLOWTOKEN unset)"
e2e_init
provision_token
start_backend

now_ms() { echo $(($(date +%s%N) / 1000000)); }

write_conf() { # FILE MODULE
	{
		printf '[global]\nlog_level = info\ndrain_timeout = 8s\n\n'
		printf '[token demo]\nuri = %s\nmodule = %s\npin_file = %s\n\n' "$HSMTLS_TOKEN_URI" "$2" "$HSMTLS_PIN_FILE"
		printf '[listener www]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\n' \
			"$BACKEND_PORT" "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
	} >"$1"
}

S_CLIENT=(openssl s_client -servername www.hsmtls.test -verify_hostname www.hsmtls.test
	-CAfile "$HSMTLS_CA" -verify_return_error -quiet -no_ign_eof)

# ------------------------------------------------ SIGTERM inside the handshake
conf=$E2E_DIR/slow.conf
write_conf "$conf" "$SLOWTOKEN"
export HSMTLS_SLOWTOKEN_MODULE="$HSMTLS_MODULE" HSMTLS_SLOWTOKEN_DELAY_MS=2000
start_daemon "$conf" "$E2E_DIR/slow.log" || bail "daemon did not start"
unset HSMTLS_SLOWTOKEN_DELAY_MS
PORT=$(listener_port www)
out=$E2E_DIR/in-handshake.out
# The echo backend answers "ping" (not HTTP) with "ping".
(printf 'ping-in-handshake\n'; sleep 6) | timeout 20 "${S_CLIENT[@]}" -connect "127.0.0.1:$PORT" >"$out" 2>"$out.err" &
cpid=$!
E2E_PIDS+=("$cpid")
# The ClientHello is in and the token is signing: the daemon holds the
# connection (it counts it from accept on) for about 2 s.
in_sign() { ss -Htn state established "( sport = :$PORT )" 2>/dev/null | grep -q .; }
wait_until 5 in_sign || fail "in the handshake: the client did not connect"
sleep 0.5
t_term=$(now_ms)
kill -TERM "$DAEMON_PID"
wait_until 5 grep -q 'draining: no new connections, 1 open' "$DAEMON_LOG" &&
	ok "in the handshake: SIGTERM counts the connection being handshaken (1 open)" ||
	fail "in the handshake: no 'draining: ... 1 open' line ($(grep -o 'draining.*' "$DAEMON_LOG"))"
if wait_until 10 grep -q '^ping-in-handshake$' "$out"; then
	ok "in the handshake: the handshake finished after SIGTERM and the connection was served"
else
	fail "in the handshake: no echo after SIGTERM ($(tail -n 2 "$out.err" | tr '\n' ' '))"
fi
if wait_until 15 daemon_exited; then
	check_eq "in the handshake: hsmtlsd exits 0 once the connection ended" 0 "$(cat "$DAEMON_RC_FILE")"
	check_not "in the handshake: not ended by the drain timeout" grep -q 'drain timeout: closing' "$DAEMON_LOG"
else
	fail "in the handshake: hsmtlsd still runs 15 s after SIGTERM"
	stop_daemon 5
fi
forget_pid "$DAEMON_PID"
wait "$cpid" 2>/dev/null
forget_pid "$cpid"

# --------------------------------------------- SIGTERM among many connections
conf=$E2E_DIR/many.conf
write_conf "$conf" "$HSMTLS_MODULE"
start_daemon "$conf" "$E2E_DIR/many.log" || bail "daemon did not start"
PORT=$(listener_port www)
N=24
pids=()
for i in $(seq 1 "$N"); do
	o=$E2E_DIR/many-$i.out
	# Each client sends one line and keeps its stdin open for 1.5 s, so that
	# established ones are still open when SIGTERM comes.
	(printf 'ping-%s\n' "$i"; sleep 1.5) | timeout 20 "${S_CLIENT[@]}" -connect "127.0.0.1:$PORT" >"$o" 2>"$o.err" &
	pids+=("$!")
	[ "$i" -eq $((N / 2)) ] && kill -TERM "$DAEMON_PID"
	sleep 0.01
done
E2E_PIDS+=("${pids[@]}")
for p in "${pids[@]}"; do wait "$p" 2>/dev/null; forget_pid "$p"; done
served=0 refused=0 dropped=()
for i in $(seq 1 "$N"); do
	o=$E2E_DIR/many-$i.out
	if grep -q "^ping-$i\$" "$o"; then
		served=$((served + 1))
	elif grep -q '^depth=0 .*' "$o.err" && grep -q 'verify return:1' "$o.err"; then
		# The server's certificate came and verified: the daemon had
		# taken the connection into a handshake, yet no echo came.
		dropped+=("$i")
	else
		refused=$((refused + 1))
	fi
done
note "many: $served served, $refused refused, ${#dropped[@]} dropped after a handshake"
if [ "${#dropped[@]}" -eq 0 ] && [ "$served" -ge 1 ]; then
	ok "anywhere: every connection was either refused or served whole ($served served, $refused refused)"
else
	fail "anywhere: connections with a completed handshake got no echo: ${dropped[*]:-none} (served $served)"
fi
if wait_until 15 daemon_exited; then
	check_eq "anywhere: hsmtlsd exits 0" 0 "$(cat "$DAEMON_RC_FILE")"
	check_not "anywhere: not ended by the drain timeout (every taken connection ended)" grep -q 'drain timeout: closing' "$DAEMON_LOG"
else
	fail "anywhere: hsmtlsd still runs 15 s after SIGTERM"
	stop_daemon 5
fi
forget_pid "$DAEMON_PID"

e2e_finish
