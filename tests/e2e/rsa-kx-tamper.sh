#!/usr/bin/env bash
# e2e: a tampered TLS 1.2 RSA ClientKeyExchange against the real daemon ends
# exactly like a tampered Finished: the same alert (bad_record_mac), the same
# close (EOF right after the alert), the same log lines at log_level = debug
# (apart from the peer's port), the same usage counters (one decryption,
# result=ok). The client is tests/e2e/rsakx_client.py (python3 with
# python3-cryptography), which makes its own ClientKeyExchange: a good
# premaster, bad paddings of several kinds, premasters of the wrong length,
# an all-zero and a random ciphertext.
#
# Twice: on SoftHSM (which offers CKM_RSA_X_509: raw decryption, padding
# checked by libhsmtls in constant time), and through the fault module with
# CKM_RSA_X_509 hidden (CKM_RSA_PKCS: the token checks the padding) and a bad
# padding reported as CKR_SESSION_HANDLE_INVALID: no session is reopened, no
# login redone, no C_Decrypt retried.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools python3
python3 -c 'import cryptography.hazmat.primitives.ciphers.aead' 2>/dev/null ||
	skip "python3-cryptography is missing (hsm-config/install-deps installs it)"
[ -n "${SLOWTOKEN:-}" ] && [ -f "$SLOWTOKEN" ] || skip "the slowtoken module was not built (SLOWTOKEN unset)"
CLIENT=$E2E_HERE/rsakx_client.py
e2e_init
provision_token
start_backend

BAD_CKE=(bad-type bad-first no-separator short-ps pm47 pm49 zero-ct random-ct)

counts() { # counts FILE FIELD
	tr ' ' '\n' <"$1" | awk -F= -v f="$2" '$1 == f { print $2 }'
}

# one_conn CASE: one connection; sets R (the client's JSON line) and SEG (the
# daemon's log lines for that connection, time stamps and port taken out).
one_conn() {
	local off lport
	off=$(stat -c %s "$DAEMON_LOG")
	R=$(python3 "$CLIENT" --port "$PORT" --sni www.hsmtls.test "$1" 2>&1)
	lport=$(sed -n 's/.*"local_port": \([0-9]*\).*/\1/p' <<<"$R")
	if [ -z "$lport" ] || ! wait_until 10 grep -q "127.0.0.1:$lport: closed" "$DAEMON_LOG"; then
		fail "$1: the daemon did not log the end of the connection ($R)"
		SEG=""
		return 1
	fi
	SEG=$(tail -c +$((off + 1)) "$DAEMON_LOG" | sed -E "s/^[^ ]+ [^ ]+\[[0-9]+\]: //; s/127\.0\.0\.1:$lport/PEER/g")
}

json() { # json FIELD: a field of $R (numbers, strings, lists as printed)
	python3 -c 'import json,sys; v=json.loads(sys.argv[1]).get(sys.argv[2]); print(json.dumps(v))' "$R" "$1" 2>/dev/null
}

# run_pass NAME MECH: the daemon (already started) on port $PORT.
run_pass() {
	local name=$1 mech=$2 n=0 c
	one_conn good
	if [ "$(json answer)" = '"ccs"' ] && [ "$(json server_finished_ok)" = true ]; then
		ok "$name: good premaster and Finished: the server answers with its CCS and a Finished that verifies"
	else
		fail "$name: good premaster: $R"
	fi
	n=$((n + 1))
	one_conn bad-finished
	n=$((n + 1))
	local want_alert want_close want_seg
	want_alert=$(json alert)
	want_close=$(json close)
	want_seg=$SEG
	check_eq "$name: a tampered Finished gets a fatal bad_record_mac alert" "[2, 20]" "$want_alert"
	check_eq "$name: and then EOF" '"eof"' "$want_close"
	if grep -q 'handshake with PEER failed' <<<"$want_seg"; then
		ok "$name: the failure is logged: $(grep -m1 'handshake with PEER failed' <<<"$want_seg")"
	else
		fail "$name: no 'handshake with PEER failed' line: $want_seg"
	fi
	for c in "${BAD_CKE[@]}"; do
		one_conn "$c" || continue
		n=$((n + 1))
		if [ "$(json alert)" = "$want_alert" ] && [ "$(json close)" = "$want_close" ]; then
			ok "$name: $c: the same alert and close as a tampered Finished ($(json alert), $(json close))"
		else
			fail "$name: $c: alert $(json alert) close $(json close), a tampered Finished got $want_alert $want_close"
		fi
		if [ "$SEG" = "$want_seg" ]; then
			ok "$name: $c: the same log lines as a tampered Finished ($(wc -l <<<"$SEG") lines)"
		else
			fail "$name: $c: other log lines than a tampered Finished"
			diff <(printf '%s\n' "$want_seg") <(printf '%s\n' "$SEG") | sed 's/^/#   /'
		fi
	done
	# The version bytes are GnuTLS's to overwrite: a wrong version is no
	# failure (Klima-Pokorny-Rosa), the handshake completes.
	one_conn bad-version
	n=$((n + 1))
	check_eq "$name: premaster version 02 00: the handshake still completes (GnuTLS overwrites the version)" '"ccs"' "$(json answer)"
	NCONN=$n
	stop_daemon 10
	check_eq "$name: hsmtlsd exits 0" 0 "$DAEMON_RC"
	check_eq "$name: every ClientKeyExchange counted as one $mech decryption, result=ok" "$n" \
		"$(usage_count "$DAEMON_LOG" rsa2048 decrypt "$mech")"
	check_eq "$name: no decryption counted as an error" 0 \
		"$(grep ' usage: ' "$DAEMON_LOG" | grep ' op=decrypt ' | grep -v 'count=0' | grep -vc ' result=ok ')"
	check_not "$name: no PKCS#11 C_Decrypt line in the log" grep -q 'C_Decrypt' "$DAEMON_LOG"
}

write_conf() { # write_conf FILE MODULE
	{
		printf '[global]\nlog_level = debug\ndrain_timeout = 2s\n\n'
		printf '[token demo]\nuri = %s\nmodule = %s\npin_file = %s\nmax_sessions = 4\n\n' \
			"$HSMTLS_TOKEN_URI" "$2" "$HSMTLS_PIN_FILE"
		printf '[listener kx]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\nrsa_key_exchange = yes\n' \
			"$BACKEND_PORT" "$HSMTLS_CERT_RSA2048" "$HSMTLS_KEY_RSA2048"
	} >"$1"
}

# 1. SoftHSM itself: raw CKM_RSA_X_509.
write_conf "$E2E_DIR/raw.conf" "$HSMTLS_MODULE"
start_daemon "$E2E_DIR/raw.conf" "$E2E_DIR/raw.log" || bail "raw: daemon did not start"
PORT=$(listener_port kx)
run_pass raw CKM_RSA_X_509

# 2. CKM_RSA_PKCS only, a bad padding answered CKR_SESSION_HANDLE_INVALID.
write_conf "$E2E_DIR/pkcs.conf" "$SLOWTOKEN"
COUNT_FILE=$E2E_DIR/pkcs.counts
export HSMTLS_SLOWTOKEN_MODULE="$HSMTLS_MODULE" HSMTLS_SLOWTOKEN_COUNT_FILE="$COUNT_FILE" \
	HSMTLS_SLOWTOKEN_HIDE_MECHS=0x3 HSMTLS_SLOWTOKEN_DECRYPT_FAIL_RV=0xb3
start_daemon "$E2E_DIR/pkcs.conf" "$E2E_DIR/pkcs.log" || bail "pkcs: daemon did not start"
unset HSMTLS_SLOWTOKEN_HIDE_MECHS HSMTLS_SLOWTOKEN_DECRYPT_FAIL_RV
PORT=$(listener_port kx)
run_pass pkcs CKM_RSA_PKCS
wait_until 5 test -s "$COUNT_FILE" || fail "pkcs: the module wrote no counts"
note "pkcs: $(cat "$COUNT_FILE")"
check_eq "pkcs: one C_Decrypt per ClientKeyExchange, none retried" "$NCONN" "$(counts "$COUNT_FILE" C_Decrypt)"
check_eq "pkcs: one login in all" 1 "$(counts "$COUNT_FILE" C_Login)"
check_not "pkcs: no session reopened, no login redone" grep -Eq 'session lost|logging in again' "$DAEMON_LOG"

e2e_finish
