#!/usr/bin/env bash
# e2e: the reasons of failed key operations that usage.sh does not cause,
# each made to happen for real on the daemon, its token behind
# tests/slowtoken (control file):
#   session    every C_Sign answers CKR_SESSION_HANDLE_INVALID: the session
#              is reopened once, then the operation fails;
#   key        CKR_KEY_HANDLE_INVALID: the key is looked up again once;
#   mechanism  CKR_MECHANISM_INVALID: no recovery;
#   login      CKR_USER_NOT_LOGGED_IN: the login is redone once (the session
#              is still logged in: no C_Login), then the operation fails;
#   absent     the token removed (C_SignInit answers CKR_DEVICE_REMOVED, then
#              the absent token fails each operation at once);
#   failed     a module failure answering CKR_CRYPTOKI_NOT_INITIALIZED;
#   rate       key_ops_per_second = 1, handshakes at once (a restart).
# Each reason's count of the p256 key's signatures in GET /v1/usage
# (since_start) and /metrics equals the handshakes that failed on the client
# side, no other reason counts, and the reasons add up to the error counter.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=lib-admin.sh
. "$(dirname "$0")/lib-admin.sh"

need_tools curl gnutls-cli promtool python3
e2e_init
provision_token
start_backend
admin_init
slowtoken_control
COUNTS=$E2E_DIR/counts
export HSMTLS_SLOWTOKEN_COUNT_FILE=$COUNTS HSMTLS_SLOWTOKEN_COUNT_EVERY=1
counts() { tr ' ' '\n' <"$COUNTS" | awk -F= -v f="$1" '$1 == f { print $2 }'; }

conf=$E2E_DIR/reasons.conf
write_conf() { # [TOKEN SETTING LINE]
	printf '[global]\nlog_level = info\ndrain_timeout = 2s\nstate_dir = %s\n\n' "$STATE" >"$conf"
	write_token_section "$conf" demo "$SLOWTOKEN"
	[ $# -eq 0 ] || printf '%s\n\n' "$1" >>"$conf"
	write_listener "$conf" a
	write_admin_section "$conf"
}
write_conf
start_admin
P=$(listener_port a)

REASONS="rate queue deadline absent failed login session key mechanism token_error late"
handshake() { # a full TLS 1.3 handshake (one ECDSA signature by p256): its exit status
	timeout 30 gnutls-cli --no-ca-verification --priority 'NORMAL:-VERS-ALL:+VERS-TLS1.3' -p "$P" 127.0.0.1 \
		</dev/null >/dev/null 2>&1
}
usage() { api "$ADMIN_TOKEN" GET /v1/usage >/dev/null; }
errors() { # [FIELD]: the error counter of p256's signatures
	usage
	jq_ "sum(c['${1:-since_start}'] for k in d['keys'] if k['label'] == 'p256' for c in k['counters'] if c['op'] == 'sign' and c['result'] == 'error')"
}
all_fails() { # [FIELD]: "reason=count ..." of every reason of p256's signatures (one GET)
	usage
	jq_ "' '.join(r + '=' + str(sum(f['${1:-since_start}'] for k in d['keys'] if k['label'] == 'p256' for f in k['failures'] if f['op'] == 'sign' and f['mechanism'] == 'CKM_ECDSA' and f['reason'] == r)) for r in '$REASONS'.split())"
}
metrics_fails() { # "reason=count ..." from /metrics
	local r out='' v
	api "$ADMIN_TOKEN" GET /metrics >/dev/null
	cp "$BODY" "$E2E_DIR/metrics.txt"
	for r in $REASONS; do
		v=$(sed -n "s/^hsmtls_key_operation_failures_total{token=\"demo\",key=\"p256\",op=\"sign\",mechanism=\"CKM_ECDSA\",reason=\"$r\"} \([0-9]*\)\$/\1/p" "$E2E_DIR/metrics.txt")
		out="$out $r=${v:-none}"
	done
	printf '%s' "${out# }"
}
expected() { # REASON=N...: "reason=count ..." with those counts, 0 for the others
	local r out='' kv n
	for r in $REASONS; do
		n=0
		for kv in "$@"; do [ "${kv%%=*}" = "$r" ] && n=${kv#*=}; done
		out="$out $r=$n"
	done
	printf '%s' "${out# }"
}
log_count() { # OFFSET STRING: lines of the daemon's log after OFFSET with that string
	tail -c +$(($1 + 1)) "$DAEMON_LOG" | grep -cF -- "$2"
}
ready() { [ "$(api "$ADMIN_TOKEN" GET /v1/health)" = 200 ]; }
# attempt N: N handshakes one after the other; FAILED gets how many failed
attempt() {
	local i
	FAILED=0
	for i in $(seq "$1"); do handshake || FAILED=$((FAILED + 1)); done
}

check "a first handshake is served" handshake
check_eq "at start: no failure counted" "0 $(expected)" "$(errors) $(all_fails)"
CAUSED=() # REASON=N of the failures caused so far

# sign_fault REASON RV TRIES: every C_Sign answers RV; 3 handshakes fail,
# the token saw TRIES C_Sign per handshake (the recovery's retry).
sign_fault() {
	local reason=$1 rv=$2 tries=$3 inj0
	inj0=$(counts injected_sign_rv)
	OFF=$(stat -c %s "$DAEMON_LOG")
	control "sign-rv=$rv"
	attempt 3
	control present
	check_eq "$reason: the 3 handshakes failed while C_Sign answered $rv" 3 "$FAILED"
	check_eq "$reason: the token answered $rv to $tries C_Sign per handshake" $((3 * tries)) \
		$(($(counts injected_sign_rv) - inj0))
	CAUSED+=("$reason=$FAILED")
	check_eq "$reason: counted $FAILED in /v1/usage, the other reasons unchanged" "$(expected "${CAUSED[@]}")" "$(all_fails)"
	check "$reason: served again once C_Sign works" handshake
}
# CKR_SESSION_HANDLE_INVALID: the pool dropped, a session opened, then the second answer fails it
sign_fault session 0xb3 2
check_eq "session: the session was reopened once per handshake" 3 "$(log_count "$OFF" 'session lost (CKR_SESSION_HANDLE_INVALID), reopening')"
# CKR_KEY_HANDLE_INVALID: looked up again, then the second answer fails it
sign_fault key 0x60 2
check_eq "key: the key was looked up again once per handshake" 3 "$(log_count "$OFF" "handle of key 'p256' went stale, looking it up again")"
# CKR_MECHANISM_INVALID: no recovery
sign_fault mechanism 0x70 1
# CKR_USER_NOT_LOGGED_IN: the login redone (nothing to do: the session is
# logged in, no C_Login reaches the token), then the second answer fails it
logins0=$(counts user_logins)
sign_fault login 0x101 2
check_eq "login: the login was redone once per handshake" 3 "$(log_count "$OFF" 'login lost, logging in again')"
check_eq "login: no C_Login was needed (the session was still logged in)" "$logins0" "$(counts user_logins)"

# absent: the token pulled. The first operation meets CKR_DEVICE_REMOVED,
# the next ones fail at once (the token's state); back once it is present.
control removed
attempt 3
check_eq "absent: the 3 handshakes with the removed token failed" 3 "$FAILED"
CAUSED+=("absent=$FAILED")
check_eq "absent: counted $FAILED in /v1/usage" "$(expected "${CAUSED[@]}")" "$(all_fails)"
control present
check "absent: the token is back (GET /v1/health 200)" wait_until 30 ready
check "absent: served again" handshake

# failed: every call answers CKR_CRYPTOKI_NOT_INITIALIZED until the module
# is initialized again (the recovery does it, maybe between the handshakes:
# those then succeed; each one that fails counts as failed).
control "fail=1 fail-rv=0x190"
attempt 3
control present
check "failed: the first handshake after the module failure failed" test "$FAILED" -ge 1
CAUSED+=("failed=$FAILED")
check_eq "failed: counted $FAILED in /v1/usage" "$(expected "${CAUSED[@]}")" "$(all_fails)"
check "failed: the module initialized again (GET /v1/health 200)" wait_until 30 ready
check "failed: served again" handshake
check_grep "failed: the module was initialized again" "$DAEMON_LOG" 'token demo: failed -> ready'

SUM=0
for kv in "${CAUSED[@]}"; do SUM=$((SUM + ${kv#*=})); done
check_eq "the reasons add up to the error counter ($SUM failed handshakes)" "$SUM" "$(errors)"
check_eq "metrics: the same counts by reason" "$(expected "${CAUSED[@]}")" "$(metrics_fails)"
check "promtool check metrics accepts /metrics" sh -c "promtool check metrics <'$E2E_DIR/metrics.txt'"
usage
check_eq "GET /v1/usage: the failures of p256's signatures, since start" "$(expected "${CAUSED[@]}")" "$(all_fails)"
BEFORE=("${CAUSED[@]}")

# rate: one operation a second per key; 6 handshakes at once, after a
# restart (the other reasons' counts since start are 0 again).
stop_daemon 10
write_conf 'key_ops_per_second = 1'
start_admin
P=$(listener_port a)
pids=()
for i in 1 2 3 4 5 6; do
	(handshake; echo $? >"$E2E_DIR/rate-$i.rc") &
	pids+=("$!")
	E2E_PIDS+=("$!")
done
for p in "${pids[@]}"; do wait "$p"; forget_pid "$p"; done
FAILED=0
for i in 1 2 3 4 5 6; do [ "$(cat "$E2E_DIR/rate-$i.rc")" = 0 ] || FAILED=$((FAILED + 1)); done
check "rate: some of the 6 handshakes at once failed ($FAILED, at one operation a second)" test "$FAILED" -ge 1
check "rate: not every one ($FAILED of 6: the first has its operation)" test "$FAILED" -le 5
check_eq "rate: counted $FAILED in /v1/usage since start, no other reason" "$(expected "rate=$FAILED")" "$(all_fails)"
check_eq "rate: the error counter since start" "$FAILED" "$(errors)"
check_eq "rate: the same in /metrics" "$(expected "rate=$FAILED")" "$(metrics_fails)"
check "promtool check metrics accepts /metrics (rate)" sh -c "promtool check metrics <'$E2E_DIR/metrics.txt'"
check_eq "lifetime: every reason caused, across the restart" "$(expected "${BEFORE[@]}" "rate=$FAILED")" "$(all_fails lifetime)"
check_eq "lifetime: the error counter" $((SUM + FAILED)) "$(errors lifetime)"

stop_daemon 10
e2e_finish
