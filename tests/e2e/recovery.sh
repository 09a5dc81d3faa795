#!/usr/bin/env bash
# e2e: the daemon never restarts for a token. Two tokens (two SoftHSM
# tokens in one token directory): "steady" through SoftHSM itself,
# "faulty" through tests/slowtoken (its own copy of the SoftHSM library),
# whose control file the test rewrites while the daemon runs:
#  1. removed: handshakes on its key fail at once with an alert, the state
#     is absent, the other listener serves; back in another slot with new
#     handles: served again, same process; the time to recover is measured;
#  2. module failure (CKR_GENERAL_ERROR on every call until C_Finalize and
#     C_Initialize): failing handshakes with an alert, the module initialized
#     again (never with a thread inside), served again;
#  3. back with a refused PIN (CKR_PIN_LOCKED): locked, one C_Login and never
#     another, handshakes on it fail with an alert, the other listener serves.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools gnutls-cli
[ -n "${SLOWTOKEN:-}" ] && [ -f "$SLOWTOKEN" ] || skip "the slowtoken module was not built (SLOWTOKEN unset)"
e2e_init
provision_token "$E2E_DIR/one"
CA1=$HSMTLS_CA
# A second token, moved into the first one's token directory.
out=$("$SRCDIR/hsm-config/provision" "$E2E_DIR/two" --label second --quiet 2>&1) || {
	printf '%s\n' "$out" | sed 's/^/#   /'
	bail "provision of the second token failed"
}
mv "$E2E_DIR"/two/tokens/* "$E2E_DIR/one/tokens/" || bail "cannot move the second token"
# shellcheck disable=SC1091
TWO_URI=$(. "$E2E_DIR/two/uris.env" && printf '%s' "$HSMTLS_TOKEN_URI")
# shellcheck disable=SC1091
TWO_KEY=$(. "$E2E_DIR/two/uris.env" && printf '%s' "$HSMTLS_KEY_P256")
# shellcheck disable=SC1091
TWO_CERT=$(. "$E2E_DIR/two/uris.env" && printf '%s' "$HSMTLS_CERT_P256")
CA2=$E2E_DIR/two/ca.pem
cp "$HSMTLS_MODULE" "$E2E_DIR/softhsm-copy.so" || bail "cannot copy $HSMTLS_MODULE"
start_backend

CONTROL=$E2E_DIR/control
COUNTS=$E2E_DIR/counts
control() { printf '%s\n' "$1" >"$CONTROL.tmp" && mv "$CONTROL.tmp" "$CONTROL"; }
counts() { tr ' ' '\n' <"$COUNTS" | awk -F= -v f="$1" '$1 == f { print $2 }'; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }
control present

conf=$E2E_DIR/recovery.conf
cat >"$conf" <<EOF
[global]
log_level = info
drain_timeout = 2s

[token steady]
uri = $HSMTLS_TOKEN_URI
module = $HSMTLS_MODULE
pin_file = $HSMTLS_PIN_FILE

[token faulty]
uri = $TWO_URI
module = $SLOWTOKEN
pin_file = $E2E_DIR/two/pin
max_sessions = 4

EOF
write_listener "$conf" steady
cat >>"$conf" <<EOF
[listener faulty]
listen = 127.0.0.1:0
backend = 127.0.0.1:$BACKEND_PORT
cert = $TWO_CERT
key = $TWO_KEY
EOF

export HSMTLS_SLOWTOKEN_MODULE=$E2E_DIR/softhsm-copy.so HSMTLS_SLOWTOKEN_CONTROL_FILE=$CONTROL \
	HSMTLS_SLOWTOKEN_COUNT_FILE=$COUNTS HSMTLS_SLOWTOKEN_RENUMBER=1
start_daemon "$conf" || bail "the daemon did not start"
PID0=$DAEMON_PID
P_STEADY=$(listener_port steady)
P_FAULTY=$(listener_port faulty)

# get PORT CA PATH: one handshake and request with gnutls-cli (TLS 1.3 and
# 1.2); prints its output; 0 if the backend answered.
get() {
	local out
	out=$(HSMTLS_CA=$2 gnutls_get "$1" www.hsmtls.test NORMAL "$3" 2>&1)
	printf '%s\n' "$out"
	printf '%s\n' "$out" | grep -q 'hello from backend'
}
steady_ok() { get "$P_STEADY" "$CA1" "steady-$1" >/dev/null; }
faulty_ok() { get "$P_FAULTY" "$CA2" "faulty-$1" >/dev/null; }

# refused NAME: a handshake on the faulty listener fails, with an alert,
# in well under the handshake timeout (the token is not waited for).
refused() {
	local t0 t1 out
	t0=$(now_ms)
	out=$(get "$P_FAULTY" "$CA2" "refused-$1")
	local rc=$?
	t1=$(now_ms)
	check_eq "$1: the handshake on the faulty token fails" "$rc" 1
	if printf '%s\n' "$out" | grep -q 'Received alert'; then
		ok "$1: with an alert ($(printf '%s\n' "$out" | grep -m1 -o 'Received alert.*'))"
	else
		fail "$1: no alert received: $(printf '%s\n' "$out" | tail -n 3 | tr '\n' ' ')"
	fi
	check "$1: and fast ($((t1 - t0)) ms, well under the 10 s handshake timeout)" test $((t1 - t0)) -lt 5000
}

# wait_served NAME LIMIT: polls the faulty listener until a request succeeds;
# sets RECOVERED_MS (from now) or fails.
wait_served() {
	local t0 i=0
	t0=$(now_ms)
	RECOVERED_MS=-1
	while [ $(($(now_ms) - t0)) -lt $(($2 * 1000)) ]; do
		i=$((i + 1))
		if faulty_ok "$1-$i"; then
			RECOVERED_MS=$(($(now_ms) - t0))
			break
		fi
		sleep 0.05
	done
	check "$1: the faulty listener serves again without a restart (after $RECOVERED_MS ms)" test "$RECOVERED_MS" -ge 0
}

check "both listeners serve at start (steady)" steady_ok start
check "both listeners serve at start (faulty)" faulty_ok start

# 1. Removed, then back in another slot with new handles.
control removed
refused removed
refused removed-again
check_grep "removed: the change is logged once, with its reason" "$DAEMON_LOG" 'token faulty: ready -> absent: .*CKR_'
check_eq "removed: one line for the change, not one per handshake" "$(grep -c 'token faulty: .* -> absent' "$DAEMON_LOG")" 1
check "removed: the other token's listener serves" steady_ok removed
probes=$(counts C_GetSlotList)
probed() { [ "$(counts C_GetSlotList)" -ge $((probes + 3)) ]; }
wait_until 10 probed
check "removed: the slot list is probed with backoff ($((probes + 3)) C_GetSlotList expected, $(counts C_GetSlotList) seen)" probed
control "slot-shift=5"
wait_served returned 20
REC_REMOVED=$RECOVERED_MS
check_grep "returned: logged: found again, logged in, keys looked up, test signature" "$DAEMON_LOG" \
	'token faulty: absent -> ready: found again .*logged in, 1 key looked up, test signature made'
check "returned: the steady listener still serves" steady_ok returned

# 2. Module failure.
inits=$(counts initializations)
control "slot-shift=5 fail=1"
refused failed
wait_served reinit 20
REC_MODULE=$RECOVERED_MS
check_grep "failed: logged" "$DAEMON_LOG" 'token faulty: ready -> failed: the module answered CKR_GENERAL_ERROR'
check_grep "failed: back to ready after C_Finalize and C_Initialize" "$DAEMON_LOG" 'token faulty: failed -> ready: found again'
check_eq "failed: the module was initialized once more" "$(counts initializations)" $((inits + 1))
check_eq "failed: C_Finalize never came with a thread inside the module" "$(counts finalize_busy)" 0
check "failed: the steady listener serves" steady_ok failed

# 3. Back with a PIN the token refuses.
control "removed slot-shift=5"
refused removed-3
control "slot-shift=9 login-rv=0xa4"
wait_until 20 grep -q 'token faulty: absent -> locked' "$DAEMON_LOG"
check_grep "locked: logged with the token's answer" "$DAEMON_LOG" 'token faulty: absent -> locked: C_Login answered CKR_PIN_LOCKED'
refused locked
check "locked: the steady listener serves" steady_ok locked
logins=$(counts injected_login)
check_eq "locked: one C_Login was tried" "$logins" 1
# Twice the recovery's longest backoff (2 s), with handshakes meanwhile.
end=$(($(now_ms) + 4500))
while [ "$(now_ms)" -lt "$end" ]; do get "$P_FAULTY" "$CA2" locked-wait >/dev/null; sleep 0.2; done
check_eq "locked: and never another (the PIN is not retried)" "$(counts injected_login)" 1

check "the daemon never restarted (pid $PID0 still runs)" kill -0 "$PID0"
check_eq "same process" "$DAEMON_PID" "$PID0"
stop_daemon
check_eq "it exits cleanly" "$DAEMON_RC" 0
note "recovery times: removed token back -> served in ${REC_REMOVED} ms; module failure -> served in ${REC_MODULE} ms (includes the first failing handshake's detection)"
e2e_finish
