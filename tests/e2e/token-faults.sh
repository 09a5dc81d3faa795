#!/usr/bin/env bash
# e2e: the daemon against a token that misbehaves, through the fault-injecting
# forwarding module tests/slowtoken (SoftHSM cannot produce these faults):
#  - steady state: one login, sessions opened once, the key looked up once;
#    one C_Sign per handshake (no per-operation open, login or lookup);
#  - every 5th signature the token closes all sessions (which logs out and,
#    on SoftHSM, renumbers the key): the daemon reopens, logs in again, finds
#    the key again, and every handshake still succeeds;
#  - every 4th signature fails with CKR_DEVICE_ERROR: that handshake fails,
#    the process does not, and the failure is counted as result=error.
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

FAULT_VARS=(HSMTLS_SLOWTOKEN_CLOSE_SESSIONS_EVERY HSMTLS_SLOWTOKEN_FAIL_EVERY)

# run_case NAME N [VAR=VALUE...]: the daemon through the module with the
# fault settings, N requests with curl (one handshake each), then SIGTERM.
run_case() {
	local name=$1 n=$2 kv
	shift 2
	local conf=$E2E_DIR/$name.conf
	COUNT_FILE=$E2E_DIR/$name.counts
	{
		printf '[global]\nlog_level = info\ndrain_timeout = 2s\n\n'
		printf '[token demo]\nuri = %s\nmodule = %s\npin_file = %s\nmax_sessions = 4\n\n' \
			"$HSMTLS_TOKEN_URI" "$SLOWTOKEN" "$HSMTLS_PIN_FILE"
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
	for i in $(seq "$n"); do
		if curl_get "$port" www.hsmtls.test "https://www.hsmtls.test:$port/$name-$i" 2>/dev/null | grep -q 'hello from backend'; then
			OKS=$((OKS + 1))
		else
			FAILS=$((FAILS + 1))
		fi
	done
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

e2e_finish
