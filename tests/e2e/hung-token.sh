#!/usr/bin/env bash
# e2e: a token that does not answer in time (tests/slowtoken delaying every
# signature). handshake_timeout bounds the whole handshake:
#  - a signature that outlasts the deadline: the client gets a fatal alert
#    at the deadline, not when the token answers; the failure and the token
#    overrun are counted (SIGUSR1 "handshakes:" line) and logged once;
#  - the wait for a free session of the pool ends at the deadline too;
#  - one SIGTERM does not wait for a token call whose handshake has failed;
#  - a second SIGTERM exits at once while a thread is inside the token, and
#    the usage lines are still logged.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools openssl
[ -n "${SLOWTOKEN:-}" ] && [ -f "$SLOWTOKEN" ] || skip "the slowtoken module was not built (SLOWTOKEN unset)"
e2e_init
provision_token
start_backend

now_ms() { echo $(($(date +%s%N) / 1000000)); }
DELAY=8000

# daemon NAME SESSIONS THREADS TIMEOUT: the daemon through the slow module.
daemon() {
	local conf=$E2E_DIR/$1.conf
	{
		printf '[global]\nlog_level = info\nhandshake_threads = %s\ndrain_timeout = 30s\n\n' "$3"
		# concurrency_min = 1: the limit starts at 1 whatever the cores
		printf '[token demo]\nuri = %s\nmodule = %s\npin_file = %s\nmax_sessions = %s\nconcurrency_min = 1\n\n' \
			"$HSMTLS_TOKEN_URI" "$SLOWTOKEN" "$HSMTLS_PIN_FILE" "$2"
		printf '[listener www]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\nhandshake_timeout = %s\n\n' \
			"$BACKEND_PORT" "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256" "$4"
		# TLS 1.2 RSA key exchange: the token call (the premaster's
		# decryption) comes in the handshake's second step.
		printf '[listener kx]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\nhandshake_timeout = %s\nrsa_key_exchange = yes\n' \
			"$BACKEND_PORT" "$HSMTLS_CERT_RSA2048" "$HSMTLS_KEY_RSA2048" "$4"
	} >"$conf"
	HSMTLS_SLOWTOKEN_MODULE="$HSMTLS_MODULE" HSMTLS_SLOWTOKEN_DELAY_MS=$DELAY start_daemon "$conf" "$E2E_DIR/$1.log" ||
		bail "$1: daemon did not start"
	PORT=$(listener_port www)
	KX_PORT=$(listener_port kx)
}

# stats FIELD: FIELD= of a fresh "handshakes:" line (SIGUSR1).
stats() {
	local off
	off=$(stat -c %s "$DAEMON_LOG")
	kill -USR1 "$DAEMON_PID" || return 1
	wait_until 10 sh -c "tail -c +$((off + 1)) '$DAEMON_LOG' | grep -q ' handshakes: completed='" || return 1
	tail -c +$((off + 1)) "$DAEMON_LOG" | grep ' handshakes: completed=' | tail -n 1 |
		tr ' ' '\n' | awk -F= -v f="$1" '$1 == f { print $2 }'
}
stat_is() { [ "$(stats "$1")" = "$2" ]; }

# client NAME [s_client args]: one TLS client in the background (to $PORT,
# or to $CPORT when set) whose end time (ms) goes to NAME.end; sets CLIENT_PID.
client() {
	local name=$1 port=${CPORT:-$PORT}
	shift
	local out=$E2E_DIR/$name.out
	(
		printf 'GET /%s HTTP/1.1\r\nHost: www.hsmtls.test\r\nConnection: close\r\n\r\n' "$name" |
			timeout 20 openssl s_client -connect "127.0.0.1:$port" -servername www.hsmtls.test \
				-CAfile "$HSMTLS_CA" -ign_eof "$@" >"$out" 2>&1
		now_ms >"$out.end"
	) &
	CLIENT_PID=$!
	E2E_PIDS+=("$CLIENT_PID")
}
ended() { test -s "$E2E_DIR/$1.out.end"; }
took() { echo $(($(cat "$E2E_DIR/$1.out.end") - $2)); }

# ------------------------------ 1. a signature outlasts handshake_timeout
daemon overrun 3 3 1s
for proto in tls1_3 tls1_2 rsa-kx; do
	t0=$(now_ms)
	if [ "$proto" = rsa-kx ]; then
		CPORT=$KX_PORT client "over-$proto" -tls1_2 -cipher AES256-GCM-SHA384
	else
		client "over-$proto" -"$proto"
	fi
	wait_until 15 ended "over-$proto"
	t=$(took "over-$proto" "$t0")
	out=$E2E_DIR/over-$proto.out
	if [ "$t" -lt 4000 ] && ! grep -q 'hello from backend' "$out"; then
		ok "$proto: the handshake fails at its 1 s deadline, not when the token answers after $DELAY ms ($t ms)"
	else
		fail "$proto: the client ended after $t ms (token delay $DELAY ms, handshake_timeout 1 s)"
		tail -n 5 "$out" | sed 's/^/#   /'
	fi
	if grep -qi 'alert internal error' "$out"; then
		ok "$proto: the client got a fatal internal_error alert"
	else
		fail "$proto: no internal_error alert in the client's output"
		grep -i 'alert\|error' "$out" | head -n 5 | sed 's/^/#   /'
	fi
done
check_grep "the failed handshake is logged" "$DAEMON_LOG" \
	'listener www: handshake with 127\.0\.0\.1:[0-9]+ failed: the token did not answer within the handshake timeout'
check_eq "the token overruns are logged once" 1 "$(grep -c 'token demo: a call has not returned by the handshake deadline' "$DAEMON_LOG")"
check_eq "the 3 handshakes are counted as failed" 3 "$(stats failed)"
# The token has not answered once: its concurrency limit stays at its
# start (1), so the first call is the only one inside the token; the two
# later handshakes wait for their turn and are shed at their deadline.
check_eq "the token overrun is counted" 1 "$(stats token_overruns)"
check_eq "nothing completed" 0 "$(stats completed)"
check_grep "the two later handshakes are shed at their deadline" "$DAEMON_LOG" \
	'handshake with 127\.0\.0\.1:[0-9]+ failed: timed out waiting for the token: no turn before the handshake deadline \(shed\)'
check_grep "the shed handshakes are counted" "$DAEMON_LOG" 'handshakes: shed=2 '
# The call is still inside the token: one SIGTERM does not wait for it.
check_eq "1 thread is still inside the token" 1 "$(stats in_token)"
t0=$(now_ms)
stop_daemon 15
t=$(($(now_ms) - t0))
check_eq "SIGTERM: exit status 0" 0 "$DAEMON_RC"
if [ "$t" -lt 3000 ]; then
	ok "SIGTERM: exit without waiting for the token calls of failed handshakes ($t ms)"
else
	fail "SIGTERM: exit after $t ms (the token answers after $DELAY ms)"
fi
check_grep "SIGTERM: the usage lines are logged" "$DAEMON_LOG" 'usage: token=demo key=p256'

# ----------------------- 2. the wait for a free session ends at the deadline
daemon pool 1 3 2s
client pool-a -tls1_3
wait_until 10 stat_is in_token 1 || fail "pool: the first handshake did not reach the token"
t0=$(now_ms)
client pool-b -tls1_3
wait_until 15 ended pool-b
t=$(took pool-b "$t0")
if [ "$t" -lt 4500 ] && ! grep -q 'hello from backend' "$E2E_DIR/pool-b.out"; then
	ok "a handshake waiting for the only session fails at its 2 s deadline ($t ms; the session is busy for $DELAY ms)"
else
	fail "a handshake waiting for the only session ended after $t ms (deadline 2 s, session busy for $DELAY ms)"
fi
check_grep "the pool timeout is logged" "$DAEMON_LOG" 'handshake with 127\.0\.0\.1:[0-9]+ failed: timed out waiting for the token'
stop_daemon 15
check_eq "pool: exit status 0" 0 "$DAEMON_RC"

# ------------------- 3. a second SIGTERM while a thread is inside the token
daemon second 2 2 10s
client second -tls1_3
wait_until 10 stat_is in_token 1 || fail "second signal: the handshake did not reach the token"
kill -TERM "$DAEMON_PID"
wait_until 5 grep -q 'draining' "$DAEMON_LOG" || fail "second signal: no drain after the first SIGTERM"
t0=$(now_ms)
kill -TERM "$DAEMON_PID"
if wait_until 10 daemon_exited; then
	t=$(($(now_ms) - t0))
	if [ "$t" -lt 2000 ]; then
		ok "a second SIGTERM exits at once while a thread is inside the token ($t ms)"
	else
		fail "a second SIGTERM: exit after $t ms (the token answers after $DELAY ms)"
	fi
	check_eq "second signal: exit status 0" 0 "$(cat "$DAEMON_RC_FILE")"
else
	fail "a second SIGTERM: still running after 10 s"
	kill -KILL "$DAEMON_PID" 2>/dev/null
fi
forget_pid "$DAEMON_PID"
check_grep "second signal: logged" "$DAEMON_LOG" 'second signal: stopping now'
check_grep "second signal: the usage lines are logged" "$DAEMON_LOG" 'usage: token=demo key=p256'
check_grep "second signal: the threads left in the token are named" "$DAEMON_LOG" '1 handshake thread.* inside a token call'

e2e_finish
