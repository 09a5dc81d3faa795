#!/usr/bin/env bash
# e2e: the daemon against a token that misbehaves, through the fault-injecting
# forwarding module tests/slowtoken (SoftHSM cannot produce these faults):
#  - steady state: one login, sessions opened once, the key looked up once;
#    one C_Sign per handshake (no per-operation open, login or lookup);
#  - every 5th signature the token closes all sessions (which logs out and,
#    on SoftHSM, renumbers the key): the daemon reopens, logs in again, finds
#    the key again, and every handshake still succeeds;
#  - every 4th signature fails with CKR_DEVICE_ERROR: that handshake fails,
#    the process does not, and the failure is counted as result=error; the
#    session and the login are kept (one C_Login, no new lookup);
#  - concurrent requests on a slow token with max_sessions = 2: never more
#    than 2 signatures on the token at once, and never more than 2 sessions.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools curl
[ -n "${SLOWTOKEN:-}" ] && [ -f "$SLOWTOKEN" ] || skip "the slowtoken module was not built (SLOWTOKEN unset)"
e2e_init
provision_token
start_backend

counts() { # counts FILE FIELD
	tr ' ' '\n' <"$1" | awk -F= -v f="$2" '$1 == f { print $2 }'
}

FAULT_VARS=(HSMTLS_SLOWTOKEN_CLOSE_SESSIONS_EVERY HSMTLS_SLOWTOKEN_FAIL_EVERY HSMTLS_SLOWTOKEN_DELAY_MS)

# one_request PORT NAME I: one curl request; 0 if the backend answered.
one_request() {
	curl_get "$1" www.hsmtls.test "https://www.hsmtls.test:$1/$2-$3" 2>/dev/null | grep -q 'hello from backend'
}

# run_case NAME N [VAR=VALUE...]: the daemon through the module with the
# fault settings, N requests with curl (one handshake each; all at once
# when PARALLEL=1), then SIGTERM. MAX_SESSIONS (default 4) and
# HANDSHAKE_THREADS (default: the daemon's) go into the configuration.
run_case() {
	local name=$1 n=$2 kv
	shift 2
	local conf=$E2E_DIR/$name.conf
	COUNT_FILE=$E2E_DIR/$name.counts
	{
		printf '[global]\nlog_level = info\ndrain_timeout = 2s\n'
		[ -n "${HANDSHAKE_THREADS:-}" ] && printf 'handshake_threads = %s\n' "$HANDSHAKE_THREADS"
		printf '\n[token demo]\nuri = %s\nmodule = %s\npin_file = %s\nmax_sessions = %s\n\n' \
			"$HSMTLS_TOKEN_URI" "$SLOWTOKEN" "$HSMTLS_PIN_FILE" "${MAX_SESSIONS:-4}"
		printf '[listener www]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\n' \
			"$BACKEND_PORT" "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
	} >"$conf"
	export HSMTLS_SLOWTOKEN_MODULE="$HSMTLS_MODULE" HSMTLS_SLOWTOKEN_COUNT_FILE="$COUNT_FILE"
	unset "${FAULT_VARS[@]}"
	for kv in "$@"; do export "${kv?}"; done
	start_daemon "$conf" "$E2E_DIR/$name.log" || bail "$name: daemon did not start"
	unset "${FAULT_VARS[@]}"
	local port
	port=$(listener_port www)
	OKS=0
	FAILS=0
	if [ "${PARALLEL:-0}" = 1 ]; then
		local pids=() p
		for i in $(seq "$n"); do
			one_request "$port" "$name" "$i" &
			pids+=("$!")
		done
		for p in "${pids[@]}"; do
			if wait "$p"; then OKS=$((OKS + 1)); else FAILS=$((FAILS + 1)); fi
		done
	else
		for i in $(seq "$n"); do
			if one_request "$port" "$name" "$i"; then
				OKS=$((OKS + 1))
			else
				FAILS=$((FAILS + 1))
			fi
		done
	fi
	check "$name: the daemon is still running after $n handshakes" kill -0 "$DAEMON_PID"
	stop_daemon
	wait_until 5 test -s "$COUNT_FILE" || fail "$name: the module wrote no counts"
	note "$name: $(cat "$COUNT_FILE")"
}

# 1. Steady state: no per-operation session, login or lookup.
run_case steady 12
check_eq "steady: 12 requests succeed" "$OKS" 12
check_eq "steady: one C_Sign per handshake" "$(counts "$COUNT_FILE" C_Sign)" 12
check_eq "steady: one login in all" "$(counts "$COUNT_FILE" C_Login)" 1
opened=$(counts "$COUNT_FILE" C_OpenSession)
check "steady: sessions opened once each, at most the pool of 4 ($opened)" test "$opened" -le 4
finds=$(counts "$COUNT_FILE" C_FindObjectsInit)
check "steady: objects looked up at start only ($finds lookups for 12 handshakes)" test "$finds" -le 3
check_eq "steady: usage counters" "$(usage_count "$DAEMON_LOG" p256 sign CKM_ECDSA)" 12

# 2. Sessions closed under the daemon every 5th signature.
run_case closes 15 HSMTLS_SLOWTOKEN_CLOSE_SESSIONS_EVERY=5
injected=$(counts "$COUNT_FILE" injected_close)
check "closes: the module closed all sessions $injected times" test "${injected:-0}" -ge 2
check_eq "closes: every request still succeeds" "$OKS" 15
check_eq "closes: one login at start plus one per loss" "$(counts "$COUNT_FILE" C_Login)" $((1 + ${injected:-0}))
check_grep "closes: the recovery is logged" "$DAEMON_LOG" 'session lost .*reopening'
check_eq "closes: 15 signatures counted ok" "$(usage_count "$DAEMON_LOG" p256 sign CKM_ECDSA)" 15

# 3. Device errors: that handshake fails, not the process.
run_case errors 12 HSMTLS_SLOWTOKEN_FAIL_EVERY=4
check_eq "errors: every 4th handshake fails (3 of 12)" "$FAILS" 3
check_eq "errors: the others succeed" "$OKS" 9
check_grep "errors: the failed handshakes are logged" "$DAEMON_LOG" 'handshake with .* failed'
errs=$(awk '/ usage: / && /result=error/ { for (i = 1; i <= NF; i++) if ($i ~ /^count=/) { split($i, kv, "="); s += kv[2] } } END { print s + 0 }' "$DAEMON_LOG")
check_eq "errors: 3 signatures counted as result=error" "$errs" 3
check_eq "errors: a device error keeps the session and the login: one login in all" 1 "$(counts "$COUNT_FILE" C_Login)"
finds=$(counts "$COUNT_FILE" C_FindObjectsInit)
check "errors: objects looked up at start only ($finds lookups for 12 handshakes)" test "$finds" -le 3
check_eq "errors: sessions opened once" 1 "$(counts "$COUNT_FILE" C_OpenSession)"

# 4. Concurrent handshakes on a slow token (300 ms per signature) with a
# pool of 2 and 8 handshake threads: the pool alone bounds what runs on
# the token.
MAX_SESSIONS=2 HANDSHAKE_THREADS=8 PARALLEL=1 run_case pool 8 HSMTLS_SLOWTOKEN_DELAY_MS=300
check_eq "pool: 8 concurrent requests succeed" 8 "$OKS"
check_eq "pool: one C_Sign per handshake" 8 "$(counts "$COUNT_FILE" C_Sign)"
inflight=$(counts "$COUNT_FILE" max_in_flight)
check "pool: at most 2 signatures on the token at once (max_sessions = 2; max_in_flight=$inflight)" test "${inflight:-99}" -le 2
check "pool: and the requests did run concurrently (max_in_flight=$inflight >= 2)" test "${inflight:-0}" -ge 2
opened=$(counts "$COUNT_FILE" C_OpenSession)
check "pool: at most 2 sessions opened ($opened)" test "${opened:-99}" -le 2
check_eq "pool: one login" 1 "$(counts "$COUNT_FILE" C_Login)"

e2e_finish
