#!/usr/bin/env bash
# e2e: the admin API against what the daemon serves now, not what its
# configuration file says, on the real daemon (its token behind slowtoken)
# with curl; every response kept is validated against api/openapi.yaml.
# - GET /v1/keys "listeners" and GET /v1/certificates "listeners" come from
#   the live bindings: a key bound only through the API shows its listener,
#   a file chain unbound through the API shows none, a key that only a
#   reload brought in shows its listener; DELETE of a key that is served
#   (even one the file did not name at start) or that the file names is
#   refused with 409 and the key stays;
# - a binding change that waited on the change lock while a SIGHUP reload
#   held it uses the configuration the reload committed (the unbind of a
#   file chain new in the reloaded file stays a tombstone at the next
#   reload);
# - no change without its record: the change.begin record is in the chain
#   before the change runs, also when another process takes state.db's lock
#   while the change is inside its token call (then the outcome cannot be
#   written and the daemon says so); twelve changes in parallel leave a
#   chain that hsmtlsd --check-audit accepts, with two records each;
# - hsmtlsd --check applies state.db's bindings as a start does: OK while
#   they build, exit 1 naming the listener, the fingerprint and the reason
#   once the key of an API binding was deleted behind the daemon's back.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=lib-admin.sh
. "$(dirname "$0")/lib-admin.sh"

need_tools curl gnutls-cli openssl certtool sqlite3 python3 pkcs11-tool
python3 -c 'import jsonschema, yaml' 2>/dev/null || skip "python3-jsonschema and python3-yaml are needed (hsm-config/install-deps)"
e2e_init
provision_token
start_backend
admin_init
slowtoken_control

# write_conf FILE [CHAIN...]: www serves p256 and the CHAINs named (keys of
# the provisioned token), two serves rsa2048 and p384.
write_conf() {
	local f=$1 c cv kv
	shift
	printf '[global]\nlog_level = info\ndrain_timeout = 2s\nstate_dir = %s\n\n' "$STATE" >"$f"
	write_token_section "$f" demo "$SLOWTOKEN"
	printf '[listener www]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\nhandshake_timeout = 30s\n' "$BACKEND_PORT" >>"$f"
	for c in p256 "$@"; do
		cv=HSMTLS_CERT_${c^^} kv=HSMTLS_KEY_${c^^}
		printf 'cert = %s\nkey = %s\n' "${!cv}" "${!kv}" >>"$f"
	done
	printf '\n[listener two]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\n' "$BACKEND_PORT" >>"$f"
	printf 'cert = %s\nkey = %s\ncert = %s\nkey = %s\n\n' "$HSMTLS_CERT_RSA2048" "$HSMTLS_KEY_RSA2048" "$HSMTLS_CERT_P384" \
		"$HSMTLS_KEY_P384" >>"$f"
	write_admin_section "$f"
}
conf=$E2E_DIR/live.conf
write_conf "$conf"
write_conf "$E2E_DIR/with-ed.conf" ed25519
write_conf "$E2E_DIR/with-ed-p384.conf" ed25519 p384
cp "$conf" "$E2E_DIR/start.conf"
start_admin

fp_of() { openssl x509 -in "$1" -outform DER | sha256sum | cut -d' ' -f1; }
etag_of() { api "$READ_TOKEN" GET "/v1/listeners/$1" >/dev/null && jq_ 'd["etag"]'; }
bindings_of() { api "$READ_TOKEN" GET "/v1/listeners/$1" >/dev/null && jq_ '" ".join(b["certificate"] for b in d["bindings"])'; }
# key_listeners LABEL: the listeners GET /v1/keys says serve key LABEL
key_listeners() {
	api "$READ_TOKEN" GET /v1/keys >/dev/null && jq_ '" ".join([k for k in d["keys"] if k["label"] == "'"$1"'"][0]["listeners"])'
}
key_spki() { api "$READ_TOKEN" GET /v1/keys >/dev/null && jq_ '[k for k in d["keys"] if k["label"] == "'"$1"'"][0]["spki_sha256"]'; }
key_id() { api "$READ_TOKEN" GET /v1/keys >/dev/null && jq_ '[k for k in d["keys"] if k["label"] == "'"$1"'"][0]["id"]'; }
cert_listeners() { # FP: "listener:name,name ..." of GET /v1/certificates/FP
	api "$READ_TOKEN" GET "/v1/certificates/$1" >/dev/null &&
		jq_ '" ".join(l["listener"] + ":" + ",".join(l["names"]) for l in d["listeners"])'
}
on_token() { "$SRCDIR/hsm-config/check-token" "$TOKEN_DIR" 2>&1 | grep -q "^$1 "; }
# hup CONF: SIGHUP with CONF as the configuration file; waits for the verdict
hup() {
	local off
	off=$(stat -c %s "$DAEMON_LOG")
	cp "$1" "$conf"
	kill -HUP "$DAEMON_PID"
	wait_until 60 _log_after_has "$off" "reload of $conf (committed|refused)" || return 1
	_log_after_has "$off" "reload of $conf committed"
}
_log_after_has() { tail -c +$(($1 + 1)) "$DAEMON_LOG" | grep -Eq -- "$2"; }
in_token() { api "$READ_TOKEN" GET /v1/health >/dev/null && [ "$(jq_ 'd["tokens"][0]["sessions_in_use"]')" -ge 1 ]; }
P256_FP=$(fp_of "$HSMTLS_CERT_P256")
RSA_FP=$(fp_of "$HSMTLS_CERT_RSA2048")
P384_FP=$(fp_of "$HSMTLS_CERT_P384")
ED_FP=$(fp_of "$HSMTLS_CERT_ED25519")
B=/v1/listeners/{listener}/bindings
BF=/v1/listeners/{listener}/bindings/{fingerprint}

# ------------------------------------------------------------ keys: the live bindings
note "keys and certificates: who serves them now"
expect "GET /v1/keys at start" 200 /v1/keys "$READ_TOKEN" GET /v1/keys
check_eq "at start: p256 www, rsa2048 two, p384 two, ed25519 none" "www|two|two|" \
	"$(key_listeners p256)|$(key_listeners rsa2048)|$(key_listeners p384)|$(key_listeners ed25519)"

# A key generated through the API, its chain uploaded and bound to www.
expect "POST /v1/keys live-p256" 201 /v1/keys "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"live-p256","id":"a1","type":"ecdsa","curve":"P-256"}' || bail "no key"
printf 'tls_www_server\nsigning_key\nexpiration_days = 30\nhonor_crq_extensions\n' >"$E2E_DIR/leaf.tmpl"
chain_for() { # NAME DNS: a chain for key a1 in E2E_DIR/NAME.pem, uploaded; its fingerprint on stdout
	api "$ADMIN_TOKEN" POST /v1/keys/demo/a1/csr "${JSON[@]}" -d "{\"subject\":\"CN=$2\",\"dns\":[\"$2\"]}" >/dev/null
	jq_ 'd["csr"]' >"$E2E_DIR/$1.csr"
	certtool --generate-certificate --load-request "$E2E_DIR/$1.csr" --load-ca-privkey "$TOKEN_DIR/ca.key" \
		--load-ca-certificate "$HSMTLS_CA" --template "$E2E_DIR/leaf.tmpl" --outfile "$E2E_DIR/$1.leaf" >/dev/null 2>&1 ||
		bail "certtool could not sign $1"
	cat "$E2E_DIR/$1.leaf" "$HSMTLS_CA" >"$E2E_DIR/$1.pem"
	local code
	code=$(api "$ADMIN_TOKEN" POST /v1/certificates "${JSON[@]}" \
		-d "$(python3 -c 'import json,sys; print(json.dumps({"pem": open(sys.argv[1]).read()}))' "$E2E_DIR/$1.pem")")
	[ "$code" = 201 ] || bail "upload of $1: $code $(head -c 300 "$BODY")"
	fp_of "$E2E_DIR/$1.leaf"
}
NEW=$(chain_for new new.hsmtls.test)
OTHER=$(chain_for other other.hsmtls.test)
check_eq "an uploaded chain not bound yet: key live-p256 is served by no listener" "" "$(key_listeners live-p256)"
expect "bind the new chain to www" 201 $B "$ADMIN_TOKEN" POST /v1/listeners/www/bindings "${JSON[@]}" \
	-H "If-Match: $(etag_of www)" -d "{\"certificate\":\"$NEW\"}"
expect "GET /v1/keys after the bind" 200 /v1/keys "$READ_TOKEN" GET /v1/keys
check_eq "a key bound only through the API: GET /v1/keys names its listener" www "$(key_listeners live-p256)"
expect "GET /v1/certificates/{new}" 200 /v1/certificates/{fingerprint} "$READ_TOKEN" GET "/v1/certificates/$NEW"
check_eq "... and GET /v1/certificates/{fp} the listener and names serving it" "www:new.hsmtls.test" "$(cert_listeners "$NEW")"

expect "unbind the file chain rsa2048 from two" 200 $BF "$ADMIN_TOKEN" DELETE "/v1/listeners/two/bindings/$RSA_FP" \
	-H "If-Match: $(etag_of two)"
check_eq "a file chain unbound through the API: key rsa2048 is served by no listener" "" "$(key_listeners rsa2048)"
expect "GET /v1/certificates/{rsa2048} after the unbind" 200 /v1/certificates/{fingerprint} "$READ_TOKEN" GET "/v1/certificates/$RSA_FP"
check_eq "... and its certificate by no listener" "" "$(cert_listeners "$RSA_FP")"
check_eq "... while p384 still is (two)" two "$(key_listeners p384)"
RSA_SPKI=$(key_spki rsa2048)
RSA_ID=$(key_id rsa2048)
expect_error "DELETE the key rsa2048, which the configuration file names (unbound, not served)" 409 conflict None \
	/v1/keys/{token}/{id} "$ADMIN_TOKEN" DELETE "/v1/keys/demo/$RSA_ID?spki_sha256=$RSA_SPKI"
check "... the refusal says the file names it" grep -q 'configuration file names the key for listener two' "$BODY"
check "... and the key is still on the token" on_token rsa2048

# A reload brings a chain in whose key no listener used at start.
check "SIGHUP with ed25519 added to www: committed" hup "$E2E_DIR/with-ed.conf"
expect "GET /v1/keys after the reload" 200 /v1/keys "$READ_TOKEN" GET /v1/keys
check_eq "a key only the reload brought in: GET /v1/keys names its listener" www "$(key_listeners ed25519)"
check_eq "... and GET /v1/certificates/{fp} too" "www:ed.hsmtls.test" "$(cert_listeners "$ED_FP")"
ED_SPKI=$(key_spki ed25519)
ED_ID=$(key_id ed25519)
expect_error "DELETE the key ed25519 while www serves it" 409 conflict None /v1/keys/{token}/{id} "$ADMIN_TOKEN" DELETE \
	"/v1/keys/demo/$ED_ID?spki_sha256=$ED_SPKI"
check "... the refusal names the listener" grep -q 'in use by 1 listener(s), e.g. www' "$BODY"
check "... and the key is still on the token" on_token ed25519
check_eq "... and still served" "$ED_FP" "$(timeout 20 gnutls-cli --no-ca-verification --sni-hostname=ed.hsmtls.test \
	--print-cert -p "$(listener_port www)" 127.0.0.1 </dev/null 2>/dev/null | sed '/-END CERTIFICATE-/q' |
	certtool --fingerprint --hash sha256 2>/dev/null | tr -d ' \n')"

# ------------------------------------------------------------ a change waiting on a reload
note "a change waiting on the change lock while a reload holds it"
# The ETag www will have with p384 added (the file chain new in the file comes last).
check "SIGHUP with p384 added to www: committed" hup "$E2E_DIR/with-ed-p384.conf"
WANT=$(bindings_of www)
check_eq "www with p384: the file's chains, the API's, the new file chain last" "$P256_FP $NEW $ED_FP $P384_FP" "$WANT"
E_P384=$(etag_of www)
check "SIGHUP back without p384: committed" hup "$E2E_DIR/with-ed.conf"
control delay-ms=1500 # the reload's test signatures hold the change lock
off=$(stat -c %s "$DAEMON_LOG")
cp "$E2E_DIR/with-ed-p384.conf" "$conf"
kill -HUP "$DAEMON_PID"
check "the reload is inside its (slowed) test signatures" wait_until 30 in_token
code=$(api "$ADMIN_TOKEN" DELETE "/v1/listeners/www/bindings/$P384_FP" -H "If-Match: $E_P384")
check "... and committed" _log_after_has "$off" "reload of $conf committed"
check_eq "an unbind of p384 sent meanwhile (with the ETag of the reloaded bindings) waits for the reload, then is made" \
	200 "$code"
keep_response "$BODY" delete $BF 200 "the unbind made after the reload"
control present
check_eq "state.db: p384, a chain of the reloaded file, is a tombstone of www" tombstone \
	"$(sqlite3 "$STATE/state.db" "SELECT kind FROM bindings WHERE listener = 'www' AND certificate = '$P384_FP'")"
check "SIGHUP again (the same file): committed" hup "$E2E_DIR/with-ed-p384.conf"
check_eq "... and p384 stays unbound" "$P256_FP $NEW $ED_FP" "$(bindings_of www)"

# ------------------------------------------------------------ audit before the change
note "no change without its record"
control keygen-delay-ms=5000 # a key generation that takes its time
last=$(sqlite3 "$STATE/state.db" "SELECT max(seq) FROM audit")
begun() { [ "$(audit_n "seq > $last AND action = 'change.begin' AND method = 'POST' AND path = '/v1/keys'")" -ge 1 ]; }
BODY=$E2E_DIR/locked.json HDRS=$E2E_DIR/locked.hdrs api "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"locked-in","type":"ecdsa","curve":"P-256"}' >"$E2E_DIR/locked.code" &
LOCKED=$!
E2E_PIDS+=("$LOCKED")
check "while a key generation runs (slowed on the token), its change.begin record is in the chain already" wait_until 30 begun
db_lock # another process takes state.db's lock while the change runs
wait "$LOCKED"
forget_pid "$LOCKED"
db_unlock
control present
check_eq "the key was made" "201 True" "$(cat "$E2E_DIR/locked.code") $(on_token locked-in && echo True)"
keep_response "$E2E_DIR/locked.json" post /v1/keys 201 "the key generation made while state.db was locked"
check_eq "... and its change.begin record was written before it" 1 \
	"$(audit_n "seq > $last AND action = 'change.begin' AND method = 'POST' AND path = '/v1/keys' AND status = 0 AND who = 'token:ops'")"
check "... the outcome could not be written (the lock was taken in between): the daemon says so" \
	grep -q "POST /v1/keys by token:ops was made (status 201) but its outcome record could not be written" "$DAEMON_LOG"
check "hsmtlsd --check-audit: intact" "$HSMTLSD" --check-audit "$STATE"

N=12
before=$(audit_n)
pids=()
for i in $(seq "$N"); do
	curl -sS --max-time 60 --unix-socket "$SOCK" -H "Authorization: Bearer $ADMIN_TOKEN" "${JSON[@]}" \
		-d "{\"token\":\"demo\",\"label\":\"par-$i\",\"type\":\"ecdsa\",\"curve\":\"P-256\"}" \
		-o "$E2E_DIR/par-$i.json" -w '%{http_code}\n' http://hsmtlsd/v1/keys >"$E2E_DIR/par-$i.code" &
	pids+=("$!")
	E2E_PIDS+=("$!")
done
for p in "${pids[@]}"; do
	wait "$p"
	forget_pid "$p"
done
codes=$(cat "$E2E_DIR"/par-*.code | sort | uniq -c | tr -s ' ' | sed 's/^ //')
check_eq "$N key generations in parallel (curl): each 201" "$N 201" "$codes"
for i in $(seq "$N"); do keep_response "$E2E_DIR/par-$i.json" post /v1/keys 201 "parallel POST /v1/keys $i"; done
out=$("$HSMTLSD" --check-audit "$STATE" 2>&1)
check_eq "hsmtlsd --check-audit after them: intact, each change two records" \
	"audit log $STATE/state.db: intact, $((before + 2 * N)) records" "$out"
check_eq "... $N change.begin records and $N outcomes, each naming its own change.begin" "$N $N $N" \
	"$(audit_n "seq > $before AND action = 'change.begin' AND path = '/v1/keys'") \
$(audit_n "seq > $before AND action = 'key.generate' AND status = 201") \
$(sqlite3 "$STATE/state.db" "SELECT count(DISTINCT b.seq) FROM audit o JOIN audit b ON o.detail LIKE '%begun at seq ' || b.seq AND b.action = 'change.begin' AND b.seq < o.seq WHERE o.seq > $before AND o.action = 'key.generate'")"
expect "GET /v1/audit/verify" 200 /v1/audit/verify "$READ_TOKEN" GET /v1/audit/verify
check_eq "audit verify: ok" True "$(jq_ 'd["ok"]')"
expect "GET /v1/audit (the change.begin records)" 200 /v1/audit "$READ_TOKEN" GET "/v1/audit?after=$before&limit=1000"

# ------------------------------------------------------------ --check and state.db's bindings
note "hsmtlsd --check applies state.db's bindings"
rc=0
out=$("$HSMTLSD" --check -c "$conf" 2>&1) || rc=$?
check_eq "--check with the API's bindings in state.db: exit 0" 0 "$rc"
check "... it checked them" grep -q "listener www: the bindings in $STATE/state.db apply over the configuration file" <<<"$out"
pkcs11-tool --module "$HSMTLS_MODULE" --token-label "$HSMTLS_TOKEN_LABEL" --login --pin "$(cat "$HSMTLS_PIN_FILE")" --delete-object --type privkey --id a1 \
	>/dev/null 2>&1 || bail "pkcs11-tool could not delete key a1"
check_not "the key of the API bindings is gone from the token (deleted behind the daemon's back)" on_token live-p256
rc=0
out=$("$HSMTLSD" --check -c "$conf" 2>&1) || rc=$?
check_eq "--check once an API binding cannot be built: exit 1" 1 "$rc"
check "... naming the listener, the fingerprint and the reason" \
	grep -Eq "listener www: the bindings in $STATE/state.db cannot be applied: .*($NEW|$OTHER).*: the leaf's public key is the key of no configured token" \
	<<<"$out"
[ "$rc" = 1 ] || printf '%s\n' "$out" | tail -n 5 | sed 's/^/#   /'

stop_daemon 10
check_eq "SIGTERM: exit 0" 0 "$DAEMON_RC"
check_not "no sanitizer report in the daemon logs" grep -q 'ERROR: AddressSanitizer\|runtime error:' "$E2E_DIR"/hsmtlsd-*.log
check_contract
e2e_finish
