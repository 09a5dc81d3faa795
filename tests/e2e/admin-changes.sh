#!/usr/bin/env bash
# e2e: POST /v1/changes, one transaction of several bind / replace / unbind
# operations on several listeners, against the real daemon (its token behind
# the slowtoken module) with real clients:
# - malformed bodies: 400 naming the field (/operations/INDEX/MEMBER); a
#   read identity: 403; more than 16 operations: 400;
# - a transaction whose later operation fails (a missing or stale if_match
#   on the second listener, an unknown listener, a name clash that only the
#   combination makes, the last chain of a listener unbound, a token that
#   fails the test signature of the last operation's key) changes nothing
#   on any listener: the listeners JSON and ETags, the certificates
#   handshakes get, and state.db's bindings after a restart;
# - a certificate rotated on three listeners in one transaction while
#   hsmtls-load makes handshakes against each: no handshake fails, each got
#   the old or the new chain, and after the commit every listener serves
#   the new one; one audit record names every operation; state.db holds the
#   rows of all three;
# - several operations on one listener in one transaction; hsmtlsctl
#   change and rotate;
# - a committed transaction survives SIGTERM and a start.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=lib-admin.sh
. "$(dirname "$0")/lib-admin.sh"

need_tools curl gnutls-cli openssl certtool python3 sqlite3
python3 -c 'import jsonschema, yaml' 2>/dev/null || skip "python3-jsonschema and python3-yaml are needed (hsm-config/install-deps)"
[ -n "${SLOWTOKEN:-}" ] && [ -f "$SLOWTOKEN" ] || skip "the slowtoken module was not built (SLOWTOKEN unset)"
: "${HSMTLS_LOAD:=$SRCDIR/build/src/bench/hsmtls-load}"
[ -x "$HSMTLS_LOAD" ] || skip "hsmtls-load is not built ($HSMTLS_LOAD)"
[ -x "${HSMTLSCTL:-}" ] || skip "hsmtlsctl is not built (HSMTLSCTL unset)"
e2e_init
TOKEN_DIR=$E2E_DIR/token
out=$("$SRCDIR/hsm-config/provision" "$TOKEN_DIR" --quiet --file-keys 2>&1) || {
	printf '%s\n' "$out" | sed 's/^/#   /'
	bail "hsm-config/provision $TOKEN_DIR failed"
}
# shellcheck disable=SC1091
. "$TOKEN_DIR/uris.env"
start_backend
admin_init
slowtoken_control

# a, b, c serve the token's P-256 chain (www.hsmtls.test); f a file-key
# P-384 chain (api.hsmtls.test) and the token's RSA chain.
conf=$E2E_DIR/changes.conf
printf '[global]\nlog_level = info\ndrain_timeout = 3s\nstate_dir = %s\n\n' "$STATE" >"$conf"
printf '[token demo]\nuri = %s\nmodule = %s\npin_file = %s\n\n' "$HSMTLS_TOKEN_URI" "$SLOWTOKEN" "$HSMTLS_PIN_FILE" >>"$conf"
for l in a b c; do
	printf '[listener %s]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\n\n' "$l" "$BACKEND_PORT" \
		"$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256" >>"$conf"
done
printf '[listener f]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\ncert = %s\nkey = %s\n\n' \
	"$BACKEND_PORT" "$HSMTLS_FILECERT_P384" "$HSMTLS_FILEKEY_P384" "$HSMTLS_CERT_RSA2048" "$HSMTLS_KEY_RSA2048" >>"$conf"
write_admin_section "$conf"

start_changes() {
	start_admin
	for l in a b c f; do
		printf -v "PORT_$l" %s "$(listener_port "$l")"
	done
}
port() { local v="PORT_$1"; printf %s "${!v}"; }
start_changes
printf '%s\n' "$ADMIN_TOKEN" >"$E2E_DIR/admin.token"
chmod 600 "$E2E_DIR/admin.token"

section() { note "$* (at $((($(date +%s%N) - E2E_T0) / 1000000)) ms)"; }
# served LISTENER [SNI] [PRIORITY]: the SHA-256 of the leaf a fresh handshake gets
served() {
	timeout 20 gnutls-cli --no-ca-verification --sni-hostname="${2:-www.hsmtls.test}" --print-cert -p "$(port "$1")" \
		--priority "${3:-NORMAL}" 127.0.0.1 </dev/null 2>/dev/null |
		sed '/-END CERTIFICATE-/q' | certtool --fingerprint --hash sha256 2>/dev/null | tr -d ' \n'
}
RSA_ONLY='NORMAL:-SIGN-ALL:+SIGN-RSA-SHA256:+SIGN-RSA-PSS-RSAE-SHA256'
fp_of() { openssl x509 -in "$1" -outform DER | sha256sum | cut -d' ' -f1; }
listeners_state() {
	api "$READ_TOKEN" GET /v1/listeners >/dev/null &&
		python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); [l.pop("address") for l in d["listeners"]]; print(json.dumps(d, sort_keys=True))' "$BODY"
}
etag_of() { api "$READ_TOKEN" GET "/v1/listeners/$1" >/dev/null && jq_ 'd["etag"]'; }
# world: every listener's JSON (bindings, ETags) and what handshakes get
world() {
	printf '%s|a=%s b=%s c=%s f=%s f-rsa=%s\n' "$(listeners_state)" "$(served a)" "$(served b)" "$(served c)" \
		"$(served f api.hsmtls.test)" "$(served f www.hsmtls.test "$RSA_ONLY")"
}
rows() { sqlite3 "$STATE/state.db" "SELECT listener || ':' || certificate || ':' || kind FROM bindings ORDER BY listener, pos" | tr '\n' ' '; }
# ops JSON...: the body {"operations": [...]}
ops() { local IFS=,; printf '{"operations":[%s]}' "$*"; }
op_replace() { printf '{"op":"replace","listener":"%s","fingerprint":"%s","certificate":"%s","if_match":%s}' "$1" "$2" "$3" "$(json_str "$4")"; }
op_bind() { printf '{"op":"bind","listener":"%s","certificate":"%s","names":["%s"],"if_match":%s}' "$1" "$2" "$3" "$(json_str "$4")"; }
op_unbind() { printf '{"op":"unbind","listener":"%s","fingerprint":"%s","if_match":%s}' "$1" "$2" "$(json_str "$3")"; }
json_str() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }
C=/v1/changes

P256_FP=$(fp_of "$HSMTLS_CERT_P256")
RSA_FP=$(fp_of "$HSMTLS_CERT_RSA2048")
P384F_FP=$(fp_of "$HSMTLS_FILECERT_P384")

# ------------------------------------------------------------ certificates
section "certificates"
expect "POST /v1/keys rot" 201 /v1/keys "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"rot","id":"c1","type":"ecdsa","curve":"P-256"}' || bail "no key"
ROT1=$(admin_chain demo c1 rot1 www.hsmtls.test localhost)
ROT2=$(admin_chain demo c1 rot2 www.hsmtls.test localhost)
ROT3=$(admin_chain demo c1 rot3 www.hsmtls.test localhost)
N1=$(admin_chain demo c1 n1 n.hsmtls.test)
N2=$(admin_chain demo c1 n2 n.hsmtls.test)
note "rot1=$ROT1 rot2=$ROT2 n1=$N1 n2=$N2 (file chains: p256=$P256_FP rsa=$RSA_FP p384-file=$P384F_FP)"

# ------------------------------------------------------------ at start
section "at start"
W0=$(world)
check_eq "a, b, c serve the P-256 file chain; f its file-key P-384 chain and the RSA chain" \
	"a=$P256_FP b=$P256_FP c=$P256_FP f=$P384F_FP f-rsa=$RSA_FP" "${W0##*|}"
EA=$(etag_of a) EB=$(etag_of b) EC=$(etag_of c) EF=$(etag_of f)
check_eq "state.db holds no bindings yet" "" "$(rows)"

# ------------------------------------------------------------ malformed
section "malformed bodies"
bad() { # DESC CODE FIELD BODY
	expect_error "$1" 400 "$2" "$3" $C "$ADMIN_TOKEN" POST $C "${JSON[@]}" -d "$4"
}
GOOD_A=$(op_replace a "$P256_FP" "$ROT1" "$EA")
bad "no operations" missing_field /operations '{}'
bad "operations not a list" invalid_field /operations '{"operations":{"op":"bind"}}'
bad "an empty list" invalid_field /operations '{"operations":[]}'
many=()
for i in $(seq 17); do many+=("$GOOD_A"); done
bad "17 operations (the limit is 16)" invalid_field /operations "$(ops "${many[@]}")"
bad "an unknown member of the body" unknown_field /colour "{\"operations\":[$GOOD_A],\"colour\":1}"
bad "an unknown member of the second operation" unknown_field /operations/1/colour \
	"$(ops "$GOOD_A" '{"op":"unbind","listener":"b","colour":"red"}')"
bad "an operation that is no object" invalid_field /operations/1 "$(ops "$GOOD_A" '"bind"')"
bad "an operation without op" missing_field /operations/0/op '{"operations":[{"listener":"a"}]}'
bad "op frobnicate" invalid_field /operations/1/op "$(ops "$GOOD_A" '{"op":"frobnicate","listener":"b"}')"
bad "the second operation without listener" missing_field /operations/1/listener \
	"$(ops "$GOOD_A" "{\"op\":\"bind\",\"certificate\":\"$ROT1\",\"if_match\":\"x\"}")"
bad "a listener that is no string" invalid_field /operations/0/listener '{"operations":[{"op":"bind","listener":7}]}'
bad "a replace without fingerprint" missing_field /operations/0/fingerprint \
	"{\"operations\":[{\"op\":\"replace\",\"listener\":\"a\",\"certificate\":\"$ROT1\",\"if_match\":\"x\"}]}"
bad "a bind with a fingerprint" invalid_field /operations/0/fingerprint \
	"{\"operations\":[{\"op\":\"bind\",\"listener\":\"a\",\"fingerprint\":\"$P256_FP\",\"certificate\":\"$ROT1\"}]}"
bad "a certificate that is no fingerprint" invalid_field /operations/1/certificate \
	"$(ops "$GOOD_A" '{"op":"bind","listener":"b","certificate":"ABC","if_match":"x"}')"
bad "a bind without certificate" missing_field /operations/0/certificate '{"operations":[{"op":"bind","listener":"a"}]}'
bad "names not a list" invalid_field /operations/0/names \
	"{\"operations\":[{\"op\":\"bind\",\"listener\":\"a\",\"certificate\":\"$ROT1\",\"names\":\"x\"}]}"
bad "an unbind with a certificate" invalid_field /operations/0/certificate \
	"{\"operations\":[{\"op\":\"unbind\",\"listener\":\"f\",\"fingerprint\":\"$RSA_FP\",\"certificate\":\"$ROT1\"}]}"
bad "if_match that is no string" invalid_field /operations/0/if_match \
	"{\"operations\":[{\"op\":\"unbind\",\"listener\":\"f\",\"fingerprint\":\"$RSA_FP\",\"if_match\":1}]}"
expect_error "malformed JSON" 400 invalid_json None $C "$ADMIN_TOKEN" POST $C "${JSON[@]}" -d '{"operations":['
expect_error "not application/json" 415 unsupported_media_type Content-Type $C "$ADMIN_TOKEN" POST $C \
	-H 'Content-Type: text/plain' -d "$(ops "$GOOD_A")"
expect_error "a read identity" 403 forbidden None $C "$READ_TOKEN" POST $C "${JSON[@]}" -d "$(ops "$GOOD_A")"
expect_error "GET /v1/changes" 405 method_not_allowed None - "$READ_TOKEN" GET $C
check_eq "after the malformed requests nothing changed" "$W0" "$(world)"

# ------------------------------------------------------------ refused as a whole
section "a later operation fails: nothing changes"
refused() { # DESC STATUS CODE FIELD BODY
	expect_error "$1" "$2" "$3" "$4" $C "$ADMIN_TOKEN" POST $C "${JSON[@]}" -d "$5"
	check_eq "... $1: every listener (JSON, ETags) and every handshake as before" "$W0" "$(world)"
}
refused "the second listener's if_match missing" 428 precondition_required /operations/1/if_match \
	"$(ops "$GOOD_A" "{\"op\":\"replace\",\"listener\":\"b\",\"fingerprint\":\"$P256_FP\",\"certificate\":\"$ROT1\"}")"
refused "the second listener's if_match stale" 412 precondition_failed /operations/1/if_match \
	"$(ops "$GOOD_A" "$(op_replace b "$P256_FP" "$ROT1" '"00000000000000000000000000000000"')")"
refused "the third operation's if_match is another listener's ETag" 412 precondition_failed /operations/2/if_match \
	"$(ops "$GOOD_A" "$(op_replace b "$P256_FP" "$ROT1" "$EB")" "$(op_unbind f "$RSA_FP" "$EA")")"
refused "two operations on listener a, the second with a stale if_match" 412 precondition_failed /operations/1/if_match \
	"$(ops "$(op_bind a "$N1" n.hsmtls.test "$EA")" "$(op_replace a "$P256_FP" "$ROT1" '"1"')")"
refused "the last operation names an unknown listener" 404 not_found /operations/2/listener \
	"$(ops "$GOOD_A" "$(op_replace b "$P256_FP" "$ROT1" "$EB")" "$(op_unbind nope "$RSA_FP" '"1"')")"
refused "the last operation binds a certificate that is not stored" 404 not_found /operations/1/certificate \
	"$(ops "$GOOD_A" "$(op_replace b "$P256_FP" "$(printf 'a%.0s' $(seq 64))" "$EB")")"
refused "the last operation replaces a chain its listener does not serve" 404 not_found /operations/1/fingerprint \
	"$(ops "$GOOD_A" "$(op_replace b "$ROT2" "$ROT1" "$EB")")"
refused "the last operation unbinds the only chain of listener c" 409 conflict /operations/1/fingerprint \
	"$(ops "$GOOD_A" "$(op_unbind c "$P256_FP" "$EC")")"
refused "a name clash only the combination makes (n1 and n2 for n.hsmtls.test on a, after b's rotation)" 409 conflict \
	/operations/2/names "$(ops "$(op_replace b "$P256_FP" "$ROT1" "$EB")" "$(op_bind a "$N1" n.hsmtls.test "$EA")" \
	"$(op_bind a "$N2" n.hsmtls.test "$EA")")"
refused "the same certificate bound twice on one listener" 409 conflict /operations/1/certificate \
	"$(ops "$(op_bind a "$N1" n.hsmtls.test "$EA")" "$(op_bind a "$N1" n.hsmtls.test "$EA")")"
refused "a name the certificate is not valid for, in the last operation" 422 unprocessable /operations/1/names \
	"$(ops "$(op_unbind f "$RSA_FP" "$EF")" "$(op_bind a "$N1" www.hsmtls.test "$EA")")"
# f first (its new set: the file-key chain only, whose test signature is
# made without the token), then a: the test signature of rot1's key on the
# token fails.
control device-error
expect_error "the token fails the last operation's test signature" 422 unprocessable /operations/1/certificate $C \
	"$ADMIN_TOKEN" POST $C "${JSON[@]}" -d "$(ops "$(op_unbind f "$RSA_FP" "$EF")" "$GOOD_A")"
control present
check_eq "... and with the token working again every listener and handshake is as before" "$W0" "$(world)"
# state.db cannot be written inside the transaction: its change.begin is
# written (audit_begin waits 2 s for the lock), then, while the test
# signature is slowed, another process takes state.db's lock; the bindings'
# write waits its 5 s and fails: 500, nothing changed (persisted before the
# swap). The lock is let go once the daemon said so: the outcome is audited.
control delay-ms=3000
last=$(sqlite3 "$STATE/state.db" 'SELECT max(seq) FROM audit')
begun() { [ "$(audit_n "seq > $last AND action = 'change.begin' AND path = '$C'")" -ge 1 ]; }
off=$(stat -c %s "$DAEMON_LOG")
BODY=$E2E_DIR/dbfail.json HDRS=$E2E_DIR/dbfail.hdrs api "$ADMIN_TOKEN" POST $C "${JSON[@]}" -d "$(ops "$GOOD_A")" \
	>"$E2E_DIR/dbfail.code" &
DBFAIL=$!
E2E_PIDS+=("$DBFAIL")
wait_until 30 begun || fail "the transaction's change.begin record was not written"
db_lock
wait_until 30 _log_after_has "$off" 'state database: database is locked (in: BEGIN IMMEDIATE)' ||
	fail "the daemon did not fail to write the bindings while state.db was locked"
db_unlock
wait "$DBFAIL"
forget_pid "$DBFAIL"
control present
check_eq "state.db locked by another process during the transaction: 500 internal" "500 internal" \
	"$(cat "$E2E_DIR/dbfail.code") $(jq_ 'd["error"]["code"]' "$E2E_DIR/dbfail.json")"
keep_response "$E2E_DIR/dbfail.json" post $C 500 "the transaction whose bindings state.db could not store"
check "... the reason says nothing changed" grep -q 'nothing changed' "$E2E_DIR/dbfail.json"
check_eq "... every listener (JSON, ETags) and every handshake as before: the old chain is still served" "$W0" "$(world)"
check_eq "... its outcome is audited (500, naming its change.begin)" 1 \
	"$(audit_n "seq > $last AND status = 500 AND path = '$C' AND detail LIKE '%begun at seq%'")"
check_eq "state.db holds no bindings after the refused transactions" "" "$(rows)"
stop_daemon 10
check_eq "SIGTERM: exit 0" 0 "$DAEMON_RC"
start_changes
check_eq "after a restart every listener and handshake is as at the first start" "$W0" "$(world)"

# ------------------------------------------------------------ rotation under load
section "a rotation over three listeners under load"
EA=$(etag_of a) EB=$(etag_of b) EC=$(etag_of c)
declare -A LOADPID
for l in a b c; do
	: >"$E2E_DIR/leaves-$l"
	"$HSMTLS_LOAD" --connect "127.0.0.1:$(port $l)" --sni www.hsmtls.test --cafile "$HSMTLS_CA" --threads 2 --duration 600 \
		--no-confirm --leaf-log "$E2E_DIR/leaves-$l" --json >"$E2E_DIR/load-$l.json" 2>"$E2E_DIR/load-$l.err" &
	LOADPID[$l]=$!
	E2E_PIDS+=("$!")
done
some_leaves() { [ "$(wc -l <"$E2E_DIR/leaves-$1")" -ge "$2" ]; }
for l in a b c; do wait_until 60 some_leaves $l 5 || fail "hsmtls-load on $l made no handshakes"; done
expect "POST /v1/changes: replace the P-256 chain by rot1 on a, b and c" 200 $C "$ADMIN_TOKEN" POST $C "${JSON[@]}" \
	-d "$(ops "$(op_replace a "$P256_FP" "$ROT1" "$EA")" "$(op_replace b "$P256_FP" "$ROT1" "$EB")" \
		"$(op_replace c "$P256_FP" "$ROT1" "$EC")")"
cp "$BODY" "$E2E_DIR/commit.json"
check_eq "the answer: the three listeners, each serving rot1 only" "a:$ROT1 b:$ROT1 c:$ROT1" \
	"$(jq_ '" ".join(l["name"] + ":" + ",".join(b["certificate"] for b in l["bindings"]) for l in d["listeners"])')"
for l in a b c; do
	check_eq "the answer's ETag of $l is the one GET /v1/listeners/$l shows" "$(jq_ "[x['etag'] for x in d['listeners'] if x['name'] == '$l'][0]" "$E2E_DIR/commit.json")" "$(etag_of $l)"
done
check_not "the ETag of a changed" test "$(etag_of a)" = "$EA"
for l in a b c; do
	n=$(wc -l <"$E2E_DIR/leaves-$l")
	wait_until 60 some_leaves $l $((n + 5)) || fail "no handshakes on $l after the commit"
done
for l in a b c; do
	kill -INT "${LOADPID[$l]}" 2>/dev/null
	rc=0
	wait "${LOADPID[$l]}" || rc=$?
	forget_pid "${LOADPID[$l]}"
	check_eq "hsmtls-load on $l: exit 0, zero failed handshakes and connections" "0 0 0" \
		"$rc $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["errors_handshake"], d["errors"])' "$E2E_DIR/load-$l.json")"
	check_eq "each handshake on $l got the old or the new chain" 0 \
		"$(grep -cvxF -e "$P256_FP" -e "$ROT1" "$E2E_DIR/leaves-$l")"
	check_eq "the last handshakes on $l got rot1" "$ROT1" "$(tail -n 1 "$E2E_DIR/leaves-$l")"
	note "$l: $(wc -l <"$E2E_DIR/leaves-$l") handshakes, $(grep -cxF "$P256_FP" "$E2E_DIR/leaves-$l") with the old chain"
done
check_eq "after the commit a, b and c serve rot1; f as before" "a=$ROT1 b=$ROT1 c=$ROT1 f=$P384F_FP f-rsa=$RSA_FP" \
	"$(world | sed 's/.*|//')"
check_eq "state.db: the rows of a, b and c (rot1, the file chain a tombstone)" \
	"a:$ROT1:api a:$P256_FP:tombstone b:$ROT1:api b:$P256_FP:tombstone c:$ROT1:api c:$P256_FP:tombstone " "$(rows)"
expect "GET /v1/audit" 200 /v1/audit "$READ_TOKEN" GET '/v1/audit?limit=1000'
check_eq "one audit record for the transaction, naming each operation and each new ETag" 1 \
	"$(jq_ "sum(1 for r in d['records'] if r['action'] == 'bindings.change' and r['status'] == 200 and all(s in r['detail'] for s in ('[0] replace listener=a', '[1] replace listener=b', '[2] replace listener=c', 'certificate=$ROT1', 'etags: a=')))")"
check_eq "the refused transactions are audited with their status" "True True True True" \
	"$(jq_ '" ".join(str(any(r["action"] == "bindings.change" and r["status"] == s for r in d["records"])) for s in (400, 409, 412, 422))')"
note "load average $(cut -d' ' -f1-3 /proc/loadavg)"

# ------------------------------------------------------------ several operations on one listener
section "several operations on one listener"
EA=$(etag_of a) EF=$(etag_of f)
expect "bind n1 and replace rot1 by rot2 on a, unbind the RSA chain of f" 200 $C "$ADMIN_TOKEN" POST $C "${JSON[@]}" \
	-d "$(ops "$(op_bind a "$N1" n.hsmtls.test "$EA")" "$(op_replace a "$ROT1" "$ROT2" "$EA")" "$(op_unbind f "$RSA_FP" "$EF")")"
check_eq "the answer: a then f" "a:$ROT2,$N1 f:$P384F_FP" \
	"$(jq_ '" ".join(l["name"] + ":" + ",".join(b["certificate"] for b in l["bindings"]) for l in d["listeners"])')"
check_eq "a serves rot2 for www.hsmtls.test" "$ROT2" "$(served a)"
check_eq "a serves n1 for n.hsmtls.test" "$N1" "$(served a n.hsmtls.test)"
check_not "f serves no RSA chain any more" test -n "$(served f www.hsmtls.test "$RSA_ONLY")"

# ------------------------------------------------------------ hsmtlsctl
section "hsmtlsctl"
ctl() { RC=0; "$HSMTLSCTL" --socket "$SOCK" --token-file "$E2E_DIR/admin.token" "$@" >"$E2E_DIR/ctl.out" 2>"$E2E_DIR/ctl.err" || RC=$?; }
ops "$(op_replace c "$ROT1" "$ROT2" '"stale"')" >"$E2E_DIR/stale.json"
ctl change "$E2E_DIR/stale.json"
check_eq "hsmtlsctl change with a stale if_match: exit 1" 1 "$RC"
check_grep "... the reason names the operation's field" "$E2E_DIR/ctl.err" '412 precondition_failed: operation 0 \(replace on c\).*\(field /operations/0/if_match\)'
ops "$(op_replace c "$ROT1" "$ROT2" "$(etag_of c)")" | (RC=0; "$HSMTLSCTL" --socket "$SOCK" --token-file "$E2E_DIR/admin.token" change - >"$E2E_DIR/ctl.out" 2>"$E2E_DIR/ctl.err" || RC=$?; exit $RC)
check_eq "hsmtlsctl change - (the body on stdin): exit 0" 0 "$?"
check_eq "... c serves rot2" "$ROT2" "$(served c)"
ctl rotate "$ROT2" "$ROT3"
check_eq "hsmtlsctl rotate rot2 rot3 (every listener serving rot2): exit 0" 0 "$RC"
check_eq "... it replaced rot2 on a and c (b serves rot1)" "a c" "$(python3 -c 'import json,sys; print(" ".join(l["name"] for l in json.load(open(sys.argv[1]))["listeners"]))' "$E2E_DIR/ctl.out")"
check_eq "... a and c serve rot3, b still rot1" "$ROT3 $ROT1 $ROT3" "$(served a) $(served b) $(served c)"
ctl rotate "$ROT2" "$ROT3"
check_eq "hsmtlsctl rotate of a certificate no listener serves: exit 1" 1 "$RC"

# ------------------------------------------------------------ restart
section "restart"
BEFORE=$(world)
ROWS=$(rows)
stop_daemon 10
check_eq "SIGTERM: exit 0" 0 "$DAEMON_RC"
start_changes
check_eq "after SIGTERM and a start: the same listeners (bindings, ETags) and handshakes" "$BEFORE" "$(world)"
check_eq "... and the same rows in state.db" "$ROWS" "$(rows)"

stop_daemon 10
check_eq "SIGTERM at the end: exit 0" 0 "$DAEMON_RC"
check_not "no sanitizer report in the daemon logs" grep -q 'ERROR: AddressSanitizer\|runtime error:' "$E2E_DIR"/hsmtlsd-*.log
check_contract
e2e_finish
