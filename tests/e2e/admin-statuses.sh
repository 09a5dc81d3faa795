#!/usr/bin/env bash
# e2e: the admin API's documented statuses that admin.sh, admin-bind.sh and
# usage.sh do not reach, each made to happen for real against the daemon
# (its token behind tests/slowtoken), its status, error code and field
# checked and its body validated against api/openapi.yaml (check_contract),
# and after every refusal the state unchanged: the keys, the certificates,
# the listeners JSON and the leaves that handshakes get.
# - 404 for ?token= of no token (GET /v1/keys, GET /v1/usage), for a key or
#   a certificate that is not there (DELETE), 400 for a key id or a
#   fingerprint that is none;
# - 422 for a key type the token cannot generate (its mechanism hidden);
# - 413 and 415 for the CSR and the certificate upload (a body past
#   max_body, a Content-Type that is not application/json);
# - on any route: 431 (libmicrohttpd's HTML) for headers past its memory,
#   on a GET and a POST (no key made); 413 on GETs with a body past
#   max_body, sent or only declared; 405 (an Error, after the identity:
#   401 without one) for a method a path does not have;
# - 502 for GET /v1/keys/{token}/{id} while the token is removed;
# - 502 for a CSR the token fails to sign (every C_Sign a device error),
#   and for a key generation, an upload with store=token, a key deletion
#   and a certificate deletion while the token makes and destroys no
#   object (the upload's state.db row undone);
# - 422 for an unbind whose remaining chain fails its test signature;
#   400 and 409 for a replace;
# - 503 audit_unavailable for every change route while another process
#   holds state.db's write lock: nothing changes (a key named for deletion
#   stays on the token);
# - store=token: the leaf on the token as a certificate object with the
#   key's CKA_ID (read back with pkcs11-tool), no file in the state
#   directory, and stored ["token"];
# - [admin] max_connections: with that many connections open a further one
#   is not served, a handshake on a listener still is, and once they close
#   the admin API answers again;
# - over HTTPS, a client certificate issued by the admin CA whose subject
#   is no configured identity: 403 on every route (not 401: the
#   certificate verified, the daemon knows who it is), audited, nothing
#   changed.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=lib-admin.sh
. "$(dirname "$0")/lib-admin.sh"

need_tools curl gnutls-cli openssl certtool sqlite3 python3 pkcs11-tool
python3 -c 'import jsonschema, yaml' 2>/dev/null || skip "python3-jsonschema and python3-yaml are needed (hsm-config/install-deps)"
e2e_init
TOKEN_DIR=$E2E_DIR/token
out=$("$SRCDIR/hsm-config/provision" "$TOKEN_DIR" --quiet --file-keys --client-keys 2>&1) || {
	printf '%s\n' "$out" | sed 's/^/#   /'
	bail "hsm-config/provision $TOKEN_DIR failed"
}
# shellcheck disable=SC1091
. "$TOKEN_DIR/uris.env"
start_backend
admin_init
slowtoken_control
# The token says it cannot generate Ed25519 keys (CKM_EC_EDWARDS_KEY_PAIR_GEN
# left out of its mechanism list): POST /v1/keys gets 422 for them.
export HSMTLS_SLOWTOKEN_HIDE_MECHS=0x1055

conf=$E2E_DIR/statuses.conf
printf '[global]\nlog_level = info\ndrain_timeout = 2s\nstate_dir = %s\n\n' "$STATE" >"$conf"
write_token_section "$conf" demo "$SLOWTOKEN"
cat >>"$conf" <<CONF
[listener www]
listen = 127.0.0.1:0
backend = 127.0.0.1:$BACKEND_PORT
cert = $HSMTLS_CERT_P256
key = $HSMTLS_KEY_P256
cert = $HSMTLS_CERT_RSA2048
key = $HSMTLS_KEY_RSA2048

CONF
write_admin_section "$conf" "max_body = 4096" "max_connections = 3" "audit_refusals_burst_per_address = 500" \
	"audit_refusals_burst = 1000"
start_admin
PORT=$(listener_port www)

fp_of() { openssl x509 -in "$1" -outform DER | sha256sum | cut -d' ' -f1; }
served() { # SNI [PRIORITY]: the SHA-256 of the leaf a fresh handshake gets
	timeout 20 gnutls-cli --no-ca-verification --sni-hostname="$1" --print-cert -p "$PORT" \
		--priority "${2:-NORMAL}" 127.0.0.1 </dev/null 2>/dev/null |
		sed '/-END CERTIFICATE-/q' | certtool --fingerprint --hash sha256 2>/dev/null | tr -d ' \n'
}
RSA_ONLY='NORMAL:-SIGN-ALL:+SIGN-RSA-SHA256:+SIGN-RSA-PSS-RSAE-SHA256'
keys_state() { api "$READ_TOKEN" GET /v1/keys >/dev/null && jq_ 'sorted(k["token"] + "/" + k["id"] + "/" + k["label"] for k in d["keys"])'; }
# api_state: the keys, the certificates and the listeners (one line)
api_state() {
	local f
	for f in keys certificates listeners; do
		api "$READ_TOKEN" GET "/v1/$f" >/dev/null && cp "$BODY" "$E2E_DIR/state-$f.json"
	done
	python3 - "$E2E_DIR" <<'PY'
import json, sys
d = {f: json.load(open(f"{sys.argv[1]}/state-{f}.json")) for f in ("keys", "certificates", "listeners")}
print(sorted(k["token"] + "/" + k["id"] + "/" + k["label"] + ":" + ",".join(k["certificates"]) + ":" + ",".join(k["listeners"])
             for k in d["keys"]["keys"]),
      sorted(c["fingerprint"] + ":" + ",".join(c["stored"]) + ":" + str(c["listeners"]) for c in d["certificates"]["certificates"]),
      json.dumps(d["listeners"]["listeners"], sort_keys=True))
PY
}
# flushed: the writer thread has put every usage and handshake count that
# /v1/usage reports in state.db (nothing left for it to write: while
# another process holds state.db's lock it would wait on it, and every
# admin request with it)
flushed() {
	api "$READ_TOKEN" GET /v1/usage >/dev/null || return 1
	[ "$(jq_ 'str(sum(c["lifetime"] for k in d["keys"] for c in k["counters"])) + " " + str(sum(h["lifetime"] for l in d["listeners"] for h in l["handshakes"])) + " " + str(sum(k["lifetime"] for l in d["listeners"] for k in l["keys"]))')" = \
		"$(sqlite3 "$STATE/state.db" "SELECT (SELECT coalesce(sum(count), 0) FROM usage) || ' ' || (SELECT coalesce(sum(count), 0) FROM handshakes) || ' ' || (SELECT coalesce(sum(handshakes), 0) FROM listener_keys)")" ]
}
tokobjs() { # the token's objects (pkcs11-tool, straight to SoftHSM)
	pkcs11-tool --module "$HSMTLS_MODULE" --token-label "$HSMTLS_TOKEN_LABEL" --login --pin "$PIN" --list-objects 2>/dev/null |
		grep -E '^(Private Key|Public Key|Certificate) Object|label:|ID:' | paste -sd' ' | tr -s ' '
}
# world: what a refused request must leave as it was
world() {
	printf '%s|%s|%s|%s\n' "$(api_state)" "$(served www.hsmtls.test)" "$(served www.hsmtls.test "$RSA_ONLY")" "$(tokobjs)"
}
# world_nohs: the same without handshakes (while state.db is locked)
world_nohs() { printf '%s|%s\n' "$(api_state)" "$(tokobjs)"; }
WREF=
refused() { # expect_error's arguments: and the world is as WREF
	expect_error "$@"
	check_eq "... $1: keys, certificates, listeners, handshakes and token objects unchanged" "$WREF" "$(world)"
}
refused_locked() { # the same while state.db is locked, against WREF_NOHS
	expect_error "$@"
	check_eq "... $1: keys, certificates, listeners and token objects unchanged" "$WREF_NOHS" "$(world_nohs)"
}
has() { # DESC ERE TEXT: TEXT has a line matching ERE
	if grep -Eq -- "$2" <<<"$3"; then ok "$1"; else fail "$1: no line matching /$2/ in: $(head -c 400 <<<"$3")"; fi
}
PIN=$(head -n 1 "$HSMTLS_PIN_FILE")
P256_FP=$(fp_of "$HSMTLS_CERT_P256")
RSA_FP=$(fp_of "$HSMTLS_CERT_RSA2048")
big=$(head -c 6000 /dev/zero | tr '\0' 'a')
FPA=$(printf 'a%.0s' $(seq 64))

# ------------------------------------------------------------ a key with a certificate, for what follows
expect "POST /v1/keys st-p256" 201 /v1/keys "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"st-p256","id":"c1","type":"ecdsa","curve":"P-256"}' || bail "no key"
expect "POST /v1/keys st-del (to be deleted)" 201 /v1/keys "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"st-del","id":"c2","type":"ecdsa","curve":"P-256"}' || bail "no key"
DEL_SPKI=$(jq_ 'd["spki_sha256"]')
api "$ADMIN_TOKEN" POST /v1/keys/demo/c1/csr "${JSON[@]}" -d '{"subject":"CN=st.hsmtls.test","dns":["st.hsmtls.test"]}' \
	>/dev/null
jq_ 'd["csr"]' >"$E2E_DIR/st.csr"
printf 'tls_www_server\nsigning_key\nexpiration_days = 30\nhonor_crq_extensions\n' >"$E2E_DIR/leaf.tmpl"
certtool --generate-certificate --load-request "$E2E_DIR/st.csr" --load-ca-privkey "$TOKEN_DIR/ca.key" \
	--load-ca-certificate "$HSMTLS_CA" --template "$E2E_DIR/leaf.tmpl" --outfile "$E2E_DIR/st.leaf" >/dev/null 2>&1 ||
	bail "certtool could not sign the CSR"
cat "$E2E_DIR/st.leaf" "$HSMTLS_CA" >"$E2E_DIR/st.pem"
ST_FP=$(fp_of "$E2E_DIR/st.leaf")
pemjson() { python3 -c 'import json,sys; print(json.dumps({"pem": open(sys.argv[1]).read(), **({"store": sys.argv[2]} if len(sys.argv) > 2 else {})}))' "$@"; }
W0=$(world)
WREF=$W0
note "world at start: $W0"

# ------------------------------------------------------------ 404 and 400 on names that are none
# (a read changes nothing: the state is compared after the refused changes)
expect_error "GET /v1/keys?token=nope" 404 not_found token /v1/keys "$READ_TOKEN" GET '/v1/keys?token=nope'
expect_error "GET /v1/usage?token=nope" 404 not_found token /v1/usage "$READ_TOKEN" GET '/v1/usage?token=nope'
refused "DELETE a key that is not there (demo/ffff)" 404 not_found id /v1/keys/{token}/{id} "$ADMIN_TOKEN" DELETE \
	"/v1/keys/demo/ffff?spki_sha256=$DEL_SPKI"
refused "DELETE a key on a token that is not there" 404 not_found token /v1/keys/{token}/{id} "$ADMIN_TOKEN" DELETE \
	"/v1/keys/nope/c2?spki_sha256=$DEL_SPKI"
refused "DELETE a key whose id is no hex" 400 invalid_field id /v1/keys/{token}/{id} "$ADMIN_TOKEN" DELETE \
	"/v1/keys/demo/xyz?spki_sha256=$DEL_SPKI"
expect_error "GET a key whose id is no hex" 400 invalid_field id /v1/keys/{token}/{id} "$READ_TOKEN" GET /v1/keys/demo/xyz
refused "DELETE a certificate that is not there" 404 not_found fingerprint /v1/certificates/{fingerprint} "$ADMIN_TOKEN" \
	DELETE "/v1/certificates/$FPA"
refused "DELETE a certificate by a fingerprint that is none" 400 invalid_field fingerprint /v1/certificates/{fingerprint} \
	"$ADMIN_TOKEN" DELETE /v1/certificates/ABC
expect_error "GET a certificate by a fingerprint that is none" 400 invalid_field fingerprint /v1/certificates/{fingerprint} \
	"$READ_TOKEN" GET /v1/certificates/ABC

# ------------------------------------------------------------ 431, 413 on a GET, 405: on any route
# Headers past libmicrohttpd's memory: its own 431 (HTML, as the contract
# says), before the identity; a POST that would make a key makes none.
hbig="X-Big: $(head -c 40000 /dev/zero | tr '\0' 'b')"
expect "GET /v1/health with a 40 KB header" 431 /v1/health "$READ_TOKEN" GET /v1/health -H "$hbig"
expect "POST /v1/keys with a 40 KB header" 431 /v1/keys "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" -H "$hbig" \
	-d '{"token":"demo","label":"st-431","type":"ecdsa"}'
check_eq "... keys, certificates, listeners, handshakes and token objects unchanged" "$WREF" "$(world)"
expect_error "GET /v1/keys with a body past max_body (sent)" 413 payload_too_large None /v1/keys "$READ_TOKEN" GET \
	/v1/keys "${JSON[@]}" --data-binary "$big"
expect_error "GET /v1/live declaring a body past max_body (Content-Length: 99999, none sent)" 413 payload_too_large None \
	/v1/live "" GET /v1/live -H 'Content-Length: 99999'
expect_error "PATCH /v1/keys (a method the path does not have)" 405 method_not_allowed None /v1/keys "$ADMIN_TOKEN" PATCH \
	/v1/keys "${JSON[@]}" -d '{}'
expect_error "DELETE /v1/listeners/www (a method the path does not have)" 405 method_not_allowed None \
	/v1/listeners/{listener} "$ADMIN_TOKEN" DELETE /v1/listeners/www
expect_error "PUT /v1/audit/verify by a read identity: 405 (no such route to forbid)" 405 method_not_allowed None \
	/v1/audit/verify "$READ_TOKEN" PUT /v1/audit/verify
expect_error "PATCH /v1/keys without a credential: 401 first" 401 unauthorized Authorization - "" PATCH /v1/keys

# ------------------------------------------------------------ 422: a key type the token cannot generate
refused "POST /v1/keys ed25519 on a token without CKM_EC_EDWARDS_KEY_PAIR_GEN" 422 unprocessable /type /v1/keys \
	"$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" -d '{"token":"demo","label":"st-ed","type":"ed25519"}'

# ------------------------------------------------------------ 413, 415: odd bodies
C=/v1/keys/{token}/{id}/csr
CE=/v1/certificates
refused "CSR with a body past max_body (4096)" 413 payload_too_large None $C "$ADMIN_TOKEN" POST /v1/keys/demo/c1/csr \
	"${JSON[@]}" -d "{\"subject\":\"CN=$big\"}"
refused "CSR as text/plain" 415 unsupported_media_type Content-Type $C "$ADMIN_TOKEN" POST /v1/keys/demo/c1/csr \
	-H 'Content-Type: text/plain' -d '{"subject":"CN=x"}'
refused "CSR without a Content-Type" 415 unsupported_media_type Content-Type $C "$ADMIN_TOKEN" POST /v1/keys/demo/c1/csr \
	-H 'Content-Type:' -d '{"subject":"CN=x"}'
refused "upload with a body past max_body (4096)" 413 payload_too_large None $CE "$ADMIN_TOKEN" POST /v1/certificates \
	"${JSON[@]}" -d "{\"pem\":\"$big\"}"
refused "upload as application/json-patch+json" 415 unsupported_media_type Content-Type $CE "$ADMIN_TOKEN" POST \
	/v1/certificates -H 'Content-Type: application/json-patch+json' -d "$(pemjson "$E2E_DIR/st.pem" token)"

# ------------------------------------------------------------ 502: the token fails the CSR's signature
control device-error
expect_error "CSR while every C_Sign of the token fails (CKR_DEVICE_ERROR)" 502 token_failed None $C "$ADMIN_TOKEN" POST \
	/v1/keys/demo/c1/csr "${JSON[@]}" -d '{"subject":"CN=st.hsmtls.test"}'
control present
check_eq "... and with the token working again, the state is as before" "$WREF" "$(world)"
check_eq "... the same CSR is made" 200 \
	"$(api "$ADMIN_TOKEN" POST /v1/keys/demo/c1/csr "${JSON[@]}" -d '{"subject":"CN=st.hsmtls.test"}')"

# ------------------------------------------------------------ store=token: on the token only
expect "upload the st chain with store token" 201 $CE "$ADMIN_TOKEN" POST /v1/certificates "${JSON[@]}" \
	-d "$(pemjson "$E2E_DIR/st.pem" token)"
check_eq "uploaded: stored ['token'] only, key demo/c1" "['token'] demo/c1" \
	"$(jq_ 'str(d["stored"]) + " " + d["key"]["token"] + "/" + d["key"]["id"]')"
rm -f "$E2E_DIR/st-token.der"
pkcs11-tool --module "$HSMTLS_MODULE" --token-label "$HSMTLS_TOKEN_LABEL" --login --pin "$PIN" --read-object --type cert \
	--id c1 -o "$E2E_DIR/st-token.der" >/dev/null 2>&1
check_eq "pkcs11-tool: the token's certificate object with CKA_ID c1 is the uploaded leaf" "$ST_FP" \
	"$( [ -s "$E2E_DIR/st-token.der" ] && sha256sum <"$E2E_DIR/st-token.der" | cut -d' ' -f1)"
has "... labelled as its key (st-p256)" 'Certificate Object.* label: st-p256 ID: c1' "$(tokobjs)"
check_eq "the state directory holds no file of it (only state.db, its WAL and the socket)" "" \
	"$(find "$STATE" -mindepth 1 ! -name 'state.db' ! -name 'state.db-wal' ! -name 'state.db-shm' ! -name 'admin.sock')"
check_eq "state.db's row says token (the index keeps the chain, README)" token \
	"$(sqlite3 "$STATE/state.db" "SELECT stored FROM certificates WHERE fingerprint = '$ST_FP'")"
expect "GET /v1/certificates/{st}" 200 /v1/certificates/{fingerprint} "$READ_TOKEN" GET "/v1/certificates/$ST_FP"
check_eq "GET: stored ['token']" "['token']" "$(jq_ 'str(d["stored"])')"
W1=$(world)
WREF=$W1

# ------------------------------------------------------------ 502: the token makes and destroys no object
certtool --generate-certificate --load-request "$E2E_DIR/st.csr" --load-ca-privkey "$TOKEN_DIR/ca.key" \
	--load-ca-certificate "$HSMTLS_CA" --template "$E2E_DIR/leaf.tmpl" --outfile "$E2E_DIR/st2.leaf" >/dev/null 2>&1 ||
	bail "certtool could not sign the CSR"
cat "$E2E_DIR/st2.leaf" "$HSMTLS_CA" >"$E2E_DIR/st2.pem"
control objects-rv=0x6
refused "POST /v1/keys while the token fails C_GenerateKeyPair (CKR_FUNCTION_FAILED)" 502 token_failed None /v1/keys \
	"$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" -d '{"token":"demo","label":"st-fail","type":"ecdsa"}'
refused "upload with store token while the token fails C_CreateObject (the state.db row is undone)" 502 token_failed None \
	$CE "$ADMIN_TOKEN" POST /v1/certificates "${JSON[@]}" -d "$(pemjson "$E2E_DIR/st2.pem" token)"
refused "DELETE key st-del while the token fails C_DestroyObject" 502 token_failed None /v1/keys/{token}/{id} \
	"$ADMIN_TOKEN" DELETE "/v1/keys/demo/c2?spki_sha256=$DEL_SPKI"
refused "DELETE the st certificate (on the token) while the token fails C_DestroyObject" 502 token_failed None \
	/v1/certificates/{fingerprint} "$ADMIN_TOKEN" DELETE "/v1/certificates/$ST_FP"
control present

# ------------------------------------------------------------ 502: GET a key while the token is pulled
# The token's recovery runs on use: a handshake (its signature) brings it back.
ready() { served www.hsmtls.test >/dev/null; [ "$(api "$READ_TOKEN" GET /v1/health)" = 200 ]; }
control removed
expect_error "GET /v1/keys/demo/c1 while the token is removed (its keys cannot be listed)" 502 token_failed None \
	/v1/keys/{token}/{id} "$READ_TOKEN" GET /v1/keys/demo/c1
control present
check "... the token back, the daemon is ready again" wait_until 30 ready
expect "... and the same GET answers 200" 200 /v1/keys/{token}/{id} "$READ_TOKEN" GET /v1/keys/demo/c1
check_eq "... keys, certificates, listeners, handshakes and token objects as before" "$WREF" "$(world)"

# ------------------------------------------------------------ bindings: 400, 409 on replace, 422 on unbind
B=/v1/listeners/{listener}/bindings
BF=/v1/listeners/{listener}/bindings/{fingerprint}
etag_of() { api "$READ_TOKEN" GET "/v1/listeners/$1" >/dev/null && jq_ 'd["etag"]'; }
E0=$(etag_of www)
refused "replace without certificate" 400 missing_field /certificate $BF "$ADMIN_TOKEN" PUT \
	"/v1/listeners/www/bindings/$P256_FP" "${JSON[@]}" -H "If-Match: $E0" -d '{"names":["st.hsmtls.test"]}'
refused "replace with an unknown field" 400 unknown_field /colour $BF "$ADMIN_TOKEN" PUT \
	"/v1/listeners/www/bindings/$P256_FP" "${JSON[@]}" -H "If-Match: $E0" -d "{\"certificate\":\"$ST_FP\",\"colour\":1}"
refused "replace with malformed JSON" 400 invalid_json None $BF "$ADMIN_TOKEN" PUT "/v1/listeners/www/bindings/$P256_FP" \
	"${JSON[@]}" -H "If-Match: $E0" -d '{"certificate":'
refused "replace p256 by the RSA chain the listener serves already" 409 conflict /certificate $BF "$ADMIN_TOKEN" PUT \
	"/v1/listeners/www/bindings/$P256_FP" "${JSON[@]}" -H "If-Match: $E0" -d "{\"certificate\":\"$RSA_FP\"}"
control device-error
expect_error "unbind the RSA chain while the token fails every signature (the P-256 chain left fails its test signature)" \
	422 unprocessable None $BF "$ADMIN_TOKEN" DELETE "/v1/listeners/www/bindings/$RSA_FP" -H "If-Match: $E0"
control present
check_eq "... and with the token working again, the state is as before" "$WREF" "$(world)"

# ------------------------------------------------------------ 503: state.db locked, every change refused
E0=$(etag_of www)
WREF_NOHS=$(world_nohs)
wait_until 15 flushed || note "the usage counts in state.db did not catch up with /v1/usage within 15 s"
db_lock
audit_before=$(audit_n)
refused_locked "DELETE key st-del, state.db locked" 503 audit_unavailable None /v1/keys/{token}/{id} "$ADMIN_TOKEN" DELETE \
	"/v1/keys/demo/c2?spki_sha256=$DEL_SPKI"
refused_locked "CSR, state.db locked" 503 audit_unavailable None $C "$ADMIN_TOKEN" POST /v1/keys/demo/c1/csr "${JSON[@]}" \
	-d '{"subject":"CN=st.hsmtls.test"}'
refused_locked "upload, state.db locked" 503 audit_unavailable None $CE "$ADMIN_TOKEN" POST /v1/certificates "${JSON[@]}" \
	-d "$(pemjson "$E2E_DIR/st.pem" both)"
refused_locked "DELETE the st certificate, state.db locked" 503 audit_unavailable None /v1/certificates/{fingerprint} \
	"$ADMIN_TOKEN" DELETE "/v1/certificates/$ST_FP"
refused_locked "bind st, state.db locked" 503 audit_unavailable None $B "$ADMIN_TOKEN" POST /v1/listeners/www/bindings \
	"${JSON[@]}" -H "If-Match: $E0" -d "{\"certificate\":\"$ST_FP\"}"
refused_locked "replace p256 by st, state.db locked" 503 audit_unavailable None $BF "$ADMIN_TOKEN" PUT \
	"/v1/listeners/www/bindings/$P256_FP" "${JSON[@]}" -H "If-Match: $E0" -d "{\"certificate\":\"$ST_FP\"}"
refused_locked "unbind the RSA chain, state.db locked" 503 audit_unavailable None $BF "$ADMIN_TOKEN" DELETE \
	"/v1/listeners/www/bindings/$RSA_FP" -H "If-Match: $E0"
has "... the key st-del is still on the token" 'label: st-del ID: c2' "$(tokobjs)"
db_unlock
check_eq "the lock gone: keys, certificates, listeners, handshakes and token objects as before" "$WREF" "$(world)"
check_eq "the lock held: the audit table did not change" "$audit_before" "$(audit_n)"
# The lock gone, the same changes are made (the refusals were the lock's).
expect "DELETE key st-del, the lock gone" 204 /v1/keys/{token}/{id} "$ADMIN_TOKEN" DELETE \
	"/v1/keys/demo/c2?spki_sha256=$DEL_SPKI"
check_not "... st-del is gone from the token" grep -q 'label: st-del ' <<<"$(tokobjs)"
expect "bind st, the lock gone" 201 $B "$ADMIN_TOKEN" POST /v1/listeners/www/bindings "${JSON[@]}" -H "If-Match: $E0" \
	-d "{\"certificate\":\"$ST_FP\"}"
check_eq "... a handshake for st.hsmtls.test gets the st chain (from the token-stored upload)" "$ST_FP" \
	"$(served st.hsmtls.test)"
# State.db locked while usage counts wait to be written: the writer gives up
# its flush after 100 ms and leaves them in memory, so a change is refused at
# its audit record's own 2 s deadline (it once waited behind the writer,
# which held the store's lock through two 5 s waits of sqlite3: about 12 s).
E0=$(etag_of www)
WREF_NOHS=$(world_nohs)
db_lock
served st.hsmtls.test >/dev/null # a handshake and a signature: counts not written yet
wait_until 10 grep -q 'another process holds its write lock' "$DAEMON_LOG" ||
	fail "the writer did not log that state.db is locked by another process"
t0=$(date +%s%N)
refused_locked "unbind the RSA chain, state.db locked, counts waiting" 503 audit_unavailable None $BF "$ADMIN_TOKEN" DELETE \
	"/v1/listeners/www/bindings/$RSA_FP" -H "If-Match: $E0"
ms=$((($(date +%s%N) - t0) / 1000000))
note "refused after $ms ms"
if [ "$ms" -lt 7000 ]; then ok "... refused within 7 s (the writer does not hold the store behind the lock)"; else
	fail "... refused only after $ms ms: the change waited behind the writer's flush"; fi
db_unlock
wait_until 10 grep -q 'its write lock is free again' "$DAEMON_LOG" || fail "the writer did not log that state.db is free again"
wait_until 15 flushed || fail "the counts kept in memory while state.db was locked were not written once it was free"

# ------------------------------------------------------------ [admin] max_connections = 3
# hold N CMD...: N admin connections, each served one request and kept
# open (keep-alive), while CMD runs; prints CMD's exit status.
hold() {
	python3 - "$SOCK" "$@" <<'PY'
import socket, subprocess, sys
path, n = sys.argv[1], int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(path)
    s.sendall(b"GET /v1/live HTTP/1.1\r\nHost: hsmtlsd\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"}"):
        c = s.recv(4096)
        if not c:
            break
        got += c
    if not got.startswith(b"HTTP/1.1 200"):
        print("held connection not served: %r" % got[:60])
        sys.exit(0)
    socks.append(s)
r = subprocess.run(sys.argv[3:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(r.returncode)
PY
}
live=(curl -sS --max-time 3 --unix-socket "$SOCK" -o /dev/null -f http://hsmtlsd/v1/live)
check_eq "max_connections = 3: with 2 connections open a 3rd is served" 0 "$(hold 2 "${live[@]}")"
res=$(hold 3 "${live[@]}")
case $res in 0 | held*) fail "max_connections = 3: with 3 connections open a 4th was served ($res)" ;;
*) ok "max_connections = 3: with 3 connections open a 4th is not served (curl $res)" ;; esac
check_eq "... while a TLS handshake on listener www still works" 0 \
	"$(hold 3 timeout 20 gnutls-cli --no-ca-verification -p "$PORT" 127.0.0.1 </dev/null)"
check "once they are closed the admin API answers again" wait_until 10 "${live[@]}"
stop_daemon 10
check_contract

# ------------------------------------------------------------ HTTPS: a certificate of the admin CA, no identity
printf 'cn = stranger\ntls_www_client\nsigning_key\nexpiration_days = 30\n' >"$E2E_DIR/stranger.tmpl"
certtool --generate-privkey --key-type ecdsa --outfile "$E2E_DIR/stranger.key" >/dev/null 2>&1 &&
	certtool --generate-certificate --load-privkey "$E2E_DIR/stranger.key" --load-ca-privkey "$TOKEN_DIR/ca.key" \
		--load-ca-certificate "$HSMTLS_CA" --template "$E2E_DIR/stranger.tmpl" --outfile "$E2E_DIR/stranger.pem" \
		>/dev/null 2>&1 || bail "certtool: the stranger's certificate"
SUBJ=$(certtool -i --infile "$TOKEN_DIR/file-client.pem" | sed -n 's/^[[:space:]]*Subject: //p' | head -1)
conf=$E2E_DIR/statuses-tls.conf
printf '[global]\nlog_level = info\ndrain_timeout = 2s\nstate_dir = %s\n\n' "$E2E_DIR/state2" >"$conf"
write_token_section "$conf"
cat >>"$conf" <<CONF
[listener www]
listen = 127.0.0.1:0
backend = 127.0.0.1:$BACKEND_PORT
cert = $HSMTLS_CERT_P256
key = $HSMTLS_KEY_P256

[admin]
listen = 127.0.0.1:0
tls_cert = $HSMTLS_FILECERT_P256
tls_key = $HSMTLS_FILEKEY_P256
client_ca = $HSMTLS_CA
identity = admin:$SUBJ
token = read:viewer:$(sha "$READ_TOKEN")
audit_refusals_burst_per_address = 500
audit_refusals_burst = 1000
CONF
STATE=$E2E_DIR/state2
start_admin
PORT=$(listener_port www)
APORT=$(sed -n 's/.*admin: listening on 127.0.0.1:\([0-9]*\) (HTTPS).*/\1/p' "$DAEMON_LOG" | tail -1)
[ -n "$APORT" ] || bail "no HTTPS admin port in the log"
CERT=()
api() { # as lib-admin.sh's, over HTTPS, with the client certificate in CERT
	local tok=$1 method=$2 path=$3
	shift 3
	local auth=()
	[ -n "$tok" ] && auth=(-H "Authorization: Bearer $tok")
	curl -sS --max-time 30 --cacert "$HSMTLS_CA" "${CERT[@]}" -D "$HDRS" -o "$BODY" -w '%{http_code}' -X "$method" \
		"${auth[@]}" "$@" "https://127.0.0.1:$APORT$path"
}
CERT=(--cert "$HSMTLS_FILE_CLIENT_CERT" --key "$HSMTLS_FILE_CLIENT_KEY")
expect "HTTPS: whoami with the configured identity's certificate" 200 /v1/whoami "" GET /v1/whoami
check_eq "... cert:$SUBJ, role admin" "cert:$SUBJ admin" "$(jq_ 'd["identity"] + " " + d["role"]')"
CERT=()
WREF=$(keys_state)
CERT=(--cert "$E2E_DIR/stranger.pem" --key "$E2E_DIR/stranger.key")
FP0=0000000000000000000000000000000000000000000000000000000000000000
for route in "GET /v1/whoami" "GET /v1/health" "GET /v1/tokens" "GET /v1/tokens/{token} demo" "GET /v1/keys" \
	"POST /v1/keys" "GET /v1/keys/{token}/{id} demo/01" "DELETE /v1/keys/{token}/{id} demo/01?spki_sha256=$FP0" \
	"POST /v1/keys/{token}/{id}/csr demo/01/csr" "GET /v1/certificates" "POST /v1/certificates" \
	"GET /v1/certificates/{fingerprint} $FP0" "DELETE /v1/certificates/{fingerprint} $FP0" "GET /v1/listeners" \
	"GET /v1/listeners/{listener} www" "POST /v1/listeners/{listener}/bindings www/bindings" \
	"PUT /v1/listeners/{listener}/bindings/{fingerprint} www/bindings/$FP0" \
	"DELETE /v1/listeners/{listener}/bindings/{fingerprint} www/bindings/$FP0" "GET /v1/usage" "GET /v1/audit" \
	"GET /v1/audit/verify" "GET /metrics"; do
	read -r m tmpl rest <<<"$route"
	path=$tmpl
	[ -n "$rest" ] && path="${tmpl%%\{*}$rest"
	body=()
	[ "$m" = POST ] || [ "$m" = PUT ] && body=(-H 'Content-Type: application/json' -d '{}')
	expect_error "HTTPS: $m $tmpl with a certificate of the admin CA that is no identity" 403 forbidden None "$tmpl" "" \
		"$m" "$path" "${body[@]}"
done
expect_error "HTTPS: POST /v1/keys with that certificate and a body that would make a key" 403 forbidden None /v1/keys "" \
	POST /v1/keys "${JSON[@]}" -d '{"token":"demo","label":"by-stranger","type":"ecdsa"}'
has "... the reason names the subject" 'CN=stranger' "$(jq_ 'd["error"]["reason"]')"
expect_error "HTTPS: with that certificate, the read bearer token is not used instead (the certificate is the identity)" \
	403 forbidden None /v1/whoami "$READ_TOKEN" GET /v1/whoami
CERT=()
check_eq "... no key was made" "$WREF" "$(keys_state)"
check_eq "HTTPS: the 403 is audited as auth.refused by cert:CN=stranger" True \
	"$(api "$READ_TOKEN" GET '/v1/audit?limit=1000' >/dev/null &&
		jq_ 'any(r["action"] == "auth.refused" and r["status"] == 403 and r["who"] == "cert:CN=stranger" for r in d["records"])')"
CERT=(--cert "$TOKEN_DIR/other-client.pem" --key "$TOKEN_DIR/other-client.key")
expect_error "HTTPS: a certificate of another CA is still 401" 401 unauthorized None /v1/whoami "" GET /v1/whoami
CERT=()
stop_daemon 10
check_contract

e2e_finish
