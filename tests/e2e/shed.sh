#!/usr/bin/env bash
# e2e: overload is shed, not stalled (tests/slowtoken, 1.5 s per signature).
# The token's admission: a concurrency limit fixed at 1 (concurrency_max),
# one operation waiting at most (queue_limit = 1):
#  - with one handshake in the token and one waiting, the next handshakes
#    fail at once with a fatal internal_error alert that real clients
#    (openssl s_client, gnutls-cli) read, logged "(shed)" and counted
#    (SIGUSR1: "handshakes: shed=" and the token's shed_queue_full=);
#  - a handshake whose deadline the queue cannot meet (1 s timeout, 1.5 s
#    per operation ahead of it) fails at once too (shed_deadline=);
#  - the two admitted handshakes complete;
#  - with one CPU slot for handshakes (handshake_cpus = 1) all of this
#    works because a thread waiting on the (slow) token lends its slot.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools openssl gnutls-cli
[ -n "${SLOWTOKEN:-}" ] && [ -f "$SLOWTOKEN" ] || skip "the slowtoken module was not built (SLOWTOKEN unset)"
e2e_init
provision_token
start_backend

now_ms() { echo $(($(date +%s%N) / 1000000)); }
DELAY=1500
conf=$E2E_DIR/shed.conf
{
	printf '[global]\nlog_level = info\nhandshake_threads = 8\nhandshake_cpus = 1\n\n'
	printf '[token demo]\nuri = %s\nmodule = %s\npin_file = %s\nmax_sessions = 4\nconcurrency_max = 1\nqueue_limit = 1\n\n' \
		"$HSMTLS_TOKEN_URI" "$SLOWTOKEN" "$HSMTLS_PIN_FILE"
	printf '[listener www]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\nhandshake_timeout = 20s\n\n' \
		"$BACKEND_PORT" "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
	printf '[listener short]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\nhandshake_timeout = 1s\n' \
		"$BACKEND_PORT" "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
} >"$conf"
HSMTLS_SLOWTOKEN_MODULE="$HSMTLS_MODULE" HSMTLS_SLOWTOKEN_DELAY_MS=$DELAY start_daemon "$conf" "$E2E_DIR/shed.log" ||
	bail "daemon did not start"
PORT=$(listener_port www)
SHORT_PORT=$(listener_port short)
check_grep "handshake_cpus = 1 is reported" "$DAEMON_LOG" 'ready: 8 handshake threads, [0-9]+ I/O threads, 1 handshake steps on the CPU at once'

# admission FIELD: FIELD= of a fresh "token demo: concurrency" line (SIGUSR1).
admission() {
	local off
	off=$(stat -c %s "$DAEMON_LOG")
	kill -USR1 "$DAEMON_PID" || return 1
	wait_until 10 sh -c "tail -c +$((off + 1)) '$DAEMON_LOG' | grep -q 'handshakes: shed='" || return 1
	tail -c +$((off + 1)) "$DAEMON_LOG" | grep -E "token demo: concurrency |handshakes: shed=" |
		tr ' ' '\n' | awk -F= -v f="$1" '$1 == f { print $2 }' | tail -n 1
}
admission_is() { [ "$(admission "$1")" = "$2" ]; }

# client NAME PORT: openssl s_client in the background; NAME.end gets its end time.
client() {
	local name=$1 port=$2 out=$E2E_DIR/$1.out
	(
		printf 'GET /%s HTTP/1.1\r\nHost: www.hsmtls.test\r\nConnection: close\r\n\r\n' "$name" |
			timeout 30 openssl s_client -connect "127.0.0.1:$port" -servername www.hsmtls.test \
				-CAfile "$HSMTLS_CA" -ign_eof -tls1_3 >"$out" 2>&1
		now_ms >"$out.end"
	) &
	E2E_PIDS+=("$!")
}
ended() { test -s "$E2E_DIR/$1.out.end"; }

# A first handshake: the token's latency is known from then on.
if openssl_get "$PORT" www.hsmtls.test warm -tls1_3 | grep -q 'hello from backend'; then
	ok "a handshake on the idle token is served"
else
	fail "a handshake on the idle token failed"
fi

# One in the token, one waiting.
client a "$PORT"
wait_until 15 admission_is in_flight 1 || fail "the first handshake did not reach the token"
client b "$PORT"
wait_until 15 admission_is queued 1 || fail "the second handshake is not waiting for its turn"

# The queue is full: shed at once, with an alert, for both clients.
t0=$(now_ms)
out_o=$(openssl_get "$PORT" www.hsmtls.test shed-openssl -tls1_3)
t_o=$(($(now_ms) - t0))
t0=$(now_ms)
out_g=$(gnutls_get "$PORT" www.hsmtls.test NORMAL shed-gnutls)
t_g=$(($(now_ms) - t0))
if grep -qi 'alert internal error' <<<"$out_o" && ! grep -q 'hello from backend' <<<"$out_o" && [ "$t_o" -lt "$DELAY" ]; then
	ok "openssl s_client: shed at once with a fatal internal_error alert ($t_o ms; the token takes $DELAY ms per signature)"
else
	fail "openssl s_client: not shed at once with an alert ($t_o ms)"
	grep -i 'alert\|error' <<<"$out_o" | head -n 5 | sed 's/^/#   /'
fi
if grep -qiE 'Received alert \[80\]|Internal error' <<<"$out_g" && ! grep -q 'hello from backend' <<<"$out_g" && [ "$t_g" -lt "$DELAY" ]; then
	ok "gnutls-cli: shed at once with a fatal internal_error alert ($t_g ms)"
else
	fail "gnutls-cli: not shed at once with an alert ($t_g ms)"
	grep -i 'alert\|error' <<<"$out_g" | head -n 5 | sed 's/^/#   /'
fi
check_grep "the shed handshake is logged" "$DAEMON_LOG" \
	'listener www: handshake with 127\.0\.0\.1:[0-9]+ failed: the token is overloaded: its queue is full, or the key is over its rate \(shed\)'
check_eq "the token counts both as shed_queue_full" 2 "$(admission shed_queue_full)"

# A deadline the queue cannot meet (1 s; the one in the token and the one
# waiting take 1.5 s each): shed at once, not at the deadline.
t0=$(now_ms)
out_s=$(openssl_get "$SHORT_PORT" www.hsmtls.test shed-deadline -tls1_3)
t_s=$(($(now_ms) - t0))
if grep -qi 'alert internal error' <<<"$out_s" && [ "$t_s" -lt 900 ]; then
	ok "a handshake that cannot have the token before its 1 s deadline is shed at once ($t_s ms)"
else
	fail "the short-deadline handshake: not shed at once ($t_s ms)"
	grep -i 'alert\|error' <<<"$out_s" | head -n 5 | sed 's/^/#   /'
fi
check_eq "the token counts it as shed_deadline" 1 "$(admission shed_deadline)"
check_eq "three handshakes shed in all" 3 "$(admission shed)"

# The admitted ones are served.
wait_until 20 ended a
wait_until 20 ended b
check_grep "the handshake in the token completes" "$E2E_DIR/a.out" 'hello from backend'
check_grep "the handshake that waited its turn completes" "$E2E_DIR/b.out" 'hello from backend'
check_eq "the limit stayed at concurrency_max" 1 "$(admission limit)"
stop_daemon 15
check_eq "exit status 0" 0 "$DAEMON_RC"
e2e_finish
