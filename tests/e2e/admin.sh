#!/usr/bin/env bash
# e2e: the admin API (api/openapi.yaml) of the real daemon on a unix socket,
# driven by curl: every route built so far, its success and its errors
# (401/403/404/405/409/412/413/415 and 400 with a JSON error naming the
# field), the state unchanged after each refused change; keys generated on
# the token (checked with hsm-config/check-token), CSRs signed on the token
# (openssl req -verify, certtool --crq-info), usage totals surviving a
# SIGTERM restart, Prometheus metrics (promtool check metrics), the audit log
# and its hash chain (hsmtlsd --check-audit fails after sqlite3 alters a
# record). Every JSON response is validated against api/openapi.yaml.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=lib-admin.sh
. "$(dirname "$0")/lib-admin.sh"

need_tools curl gnutls-cli openssl certtool sqlite3 promtool python3
python3 -c 'import jsonschema, yaml' 2>/dev/null || skip "python3-jsonschema and python3-yaml are needed (hsm-config/install-deps)"
e2e_init
# provision_token, with a file key for the HTTPS admin server and client
# certificates (one from the token's CA, one from another CA)
TOKEN_DIR=$E2E_DIR/token
out=$("$SRCDIR/hsm-config/provision" "$TOKEN_DIR" --quiet --file-keys --client-keys 2>&1) || {
	printf '%s\n' "$out" | sed 's/^/#   /'
	bail "hsm-config/provision $TOKEN_DIR failed"
}
# shellcheck disable=SC1091
. "$TOKEN_DIR/uris.env"
start_backend

admin_init

conf=$E2E_DIR/admin.conf
printf '[global]\nlog_level = info\ndrain_timeout = 2s\nstate_dir = %s\n\n' "$STATE" >"$conf"
write_token_section "$conf"
cat >>"$conf" <<CONF
[listener www]
listen = 127.0.0.1:0
backend = 127.0.0.1:$BACKEND_PORT
cert = $HSMTLS_CERT_P256
key = $HSMTLS_KEY_P256

CONF
# Every refusal audited one by one (usage.sh tests the rate limit).
write_admin_section "$conf" "max_body = 4096" "timeout = 3s" "audit_refusals_burst_per_address = 500" \
	"audit_refusals_burst = 1000"
start_admin

# has DESC ERE TEXT: TEXT has a line matching ERE.
has() {
	if grep -Eq -- "$2" <<<"$3"; then
		ok "$1"
	else
		fail "$1: no line matching /$2/ in: $(head -c 400 <<<"$3")"
	fi
}

# ------------------------------------------------------------ where and who
check_eq "admin socket is mode 600" 600 "$(stat -c %a "$SOCK")"
check_eq "state directory is mode 700" 700 "$(stat -c %a "$STATE")"
check_eq "state database is mode 600" 600 "$(stat -c %a "$STATE/state.db")"

expect "GET /v1/live without credential" 200 /v1/live "" GET /v1/live
expect_error "GET /v1/health without credential" 401 unauthorized Authorization /v1/health "" GET /v1/health
expect_error "GET /v1/health with a wrong token" 401 unauthorized Authorization /v1/health "wrong-$READ_TOKEN" GET /v1/health
expect_error "GET /v1/health with the admin token missing its last byte" 401 unauthorized Authorization /v1/health \
	"${ADMIN_TOKEN%?}" GET /v1/health
expect_error "GET /metrics without credential" 401 unauthorized Authorization /metrics "" GET /metrics
# Every route but /v1/live needs an identity, whatever the method, path
# parameters or body: 401, and the answer is the contract's (check_contract).
FP0=0000000000000000000000000000000000000000000000000000000000000000
for route in "GET /v1/whoami" "GET /v1/tokens" "GET /v1/tokens/{token} demo" "GET /v1/keys" "POST /v1/keys" \
	"GET /v1/keys/{token}/{id} demo/01" "DELETE /v1/keys/{token}/{id} demo/01?spki_sha256=$FP0" \
	"POST /v1/keys/{token}/{id}/csr demo/01/csr" "GET /v1/certificates" "POST /v1/certificates" \
	"GET /v1/certificates/{fingerprint} $FP0" "DELETE /v1/certificates/{fingerprint} $FP0" "GET /v1/listeners" \
	"GET /v1/listeners/{listener} www" "POST /v1/listeners/{listener}/bindings www/bindings" \
	"PUT /v1/listeners/{listener}/bindings/{fingerprint} www/bindings/$FP0" \
	"DELETE /v1/listeners/{listener}/bindings/{fingerprint} www/bindings/$FP0" "GET /v1/usage" "GET /v1/audit" \
	"GET /v1/audit/verify"; do
	read -r m tmpl rest <<<"$route"
	path=$tmpl
	[ -n "$rest" ] && path="${tmpl%%\{*}$rest"
	body=()
	[ "$m" = POST ] || [ "$m" = PUT ] && body=(-H 'Content-Type: application/json' -d '{}')
	expect_error "$m $tmpl without credential" 401 unauthorized Authorization "$tmpl" "" "$m" "$path" "${body[@]}"
done
expect "GET /v1/whoami (read token)" 200 /v1/whoami "$READ_TOKEN" GET /v1/whoami
check_eq "whoami: the read token is token:viewer, role read" "token:viewer read" "$(jq_ 'd["identity"] + " " + d["role"]')"
expect "GET /v1/whoami (admin token)" 200 /v1/whoami "$ADMIN_TOKEN" GET /v1/whoami
check_eq "whoami: role admin" admin "$(jq_ 'd["role"]')"
expect_error "GET /v1/nothing" 404 not_found None - "$READ_TOKEN" GET /v1/nothing
code=$(api "" GET '/v1/x%0aforged%20line')
check_eq "a path with an encoded newline: 401" 401 "$code"
check_not "... and it forges no log line" grep -q '^forged line' "$DAEMON_LOG"
has "... the audit log line shows it with '?'" 'audit: .*GET /v1/x\?forged line action=auth.refused' "$(cat "$DAEMON_LOG")"
expect_error "PUT /v1/live" 405 method_not_allowed None - "$READ_TOKEN" PUT /v1/live
code=$(api "" GET '/v1/keys%ff%c3')
check_eq "a path with bytes that are no UTF-8: 401" 401 "$code"

# ------------------------------------------------------------ health, tokens
expect "GET /v1/health" 200 /v1/health "$READ_TOKEN" GET /v1/health
check_eq "health: ready, token demo logged in, listener www serving" "True True True" \
	"$(jq_ 'str(d["ready"]) + " " + str(d["tokens"][0]["logged_in"]) + " " + str(d["listeners"][0]["serving"])')"
expect "GET /v1/tokens" 200 /v1/tokens "$READ_TOKEN" GET /v1/tokens
check_eq "tokens: label of token demo" "$HSMTLS_TOKEN_LABEL" "$(jq_ 'd["tokens"][0]["label"]')"
check_eq "tokens: offers CKM_EC_KEY_PAIR_GEN with generate_key_pair" True \
	"$(jq_ 'any(m["name"] == "CKM_EC_KEY_PAIR_GEN" and "generate_key_pair" in m["flags"] for m in d["tokens"][0]["mechanisms"])')"
expect "GET /v1/tokens/demo" 200 /v1/tokens/{token} "$READ_TOKEN" GET /v1/tokens/demo
expect_error "GET /v1/tokens/nope" 404 not_found token /v1/tokens/{token} "$READ_TOKEN" GET /v1/tokens/nope

# ------------------------------------------------------------ keys: list
expect "GET /v1/keys" 200 /v1/keys "$READ_TOKEN" GET /v1/keys
check_eq "keys: p256 is sensitive, not extractable, used by listener www" "True False ['www']" \
	"$(jq_ '[" ".join([str(k["sensitive"]), str(k["extractable"]), str(k["listeners"])]) for k in d["keys"] if k["label"] == "p256"][0]')"
keys_state() { api "$READ_TOKEN" GET /v1/keys >/dev/null && jq_ 'sorted(k["token"] + "/" + k["id"] + "/" + k["label"] for k in d["keys"])'; }
P256_ID=$(jq_ '[k["id"] for k in d["keys"] if k["label"] == "p256"][0]')
P256_SPKI=$(jq_ '[k["spki_sha256"] for k in d["keys"] if k["label"] == "p256"][0]')
KEYS0=$(keys_state)
note "keys at start: $KEYS0"

# ------------------------------------------------------------ keys: refused generation changes nothing
G=/v1/keys
expect_error "POST /v1/keys with the read token" 403 forbidden None $G "$READ_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"ro","type":"ecdsa"}'
expect_error "POST /v1/keys without credential" 401 unauthorized Authorization $G "" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"ro","type":"ecdsa"}'
expect_error "POST /v1/keys, malformed JSON" 400 invalid_json None $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" -d '{"token":'
expect_error "POST /v1/keys, not an object" 400 invalid_json None $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" -d '[1]'
expect_error "POST /v1/keys, unknown field" 400 unknown_field /colour $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"x","type":"ecdsa","colour":"red"}'
expect_error "POST /v1/keys, bits of the wrong type" 400 invalid_field /bits $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"x","type":"rsa","bits":"2048"}'
expect_error "POST /v1/keys, RSA-1024" 400 invalid_field /bits $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"x","type":"rsa","bits":1024}'
expect_error "POST /v1/keys, unsupported type" 400 invalid_field /type $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"x","type":"dsa"}'
expect_error "POST /v1/keys, unsupported curve" 400 invalid_field /curve $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"x","type":"ecdsa","curve":"P-521"}'
expect_error "POST /v1/keys, label missing" 400 missing_field /label $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","type":"ecdsa"}'
expect_error "POST /v1/keys, label a number" 400 invalid_field /label $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":7,"type":"ecdsa"}'
expect_error "POST /v1/keys, bad id" 400 invalid_field /id $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"x","id":"xyz","type":"ecdsa"}'
expect_error "POST /v1/keys, unknown token" 404 not_found /token $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"nope","label":"x","type":"ecdsa"}'
expect_error "POST /v1/keys, not JSON (text/plain)" 415 unsupported_media_type Content-Type $G "$ADMIN_TOKEN" POST /v1/keys \
	-H 'Content-Type: text/plain' -d '{"token":"demo","label":"x","type":"ecdsa"}'
expect_error "POST /v1/keys, a label taken (p256)" 409 conflict /label $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"p256","type":"ecdsa"}'
expect_error "POST /v1/keys, an id taken (p256's)" 409 conflict /id $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d "{\"token\":\"demo\",\"label\":\"new\",\"id\":\"$P256_ID\",\"type\":\"ecdsa\"}"
big=$(head -c 6000 /dev/zero | tr '\0' 'a')
expect_error "POST /v1/keys, a body past max_body (4096)" 413 payload_too_large None $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d "{\"token\":\"demo\",\"label\":\"$big\",\"type\":\"ecdsa\"}"
expect_error "POST /v1/keys, a chunked body past max_body" 413 payload_too_large None $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-H 'Transfer-Encoding: chunked' -d "{\"token\":\"demo\",\"label\":\"$big\",\"type\":\"ecdsa\"}"
# A declared body past max_body is answered at once, before it is read: the
# client below sends only the headers (Content-Length 1 GB) and waits.
early=$(python3 - "$SOCK" "$ADMIN_TOKEN" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(20)
s.sendall(("POST /v1/keys HTTP/1.1\r\nHost: hsmtlsd\r\nAuthorization: Bearer %s\r\n"
           "Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n" % sys.argv[2]).encode())
try:
    print(s.recv(4096).split(b"\r\n")[0].decode())
except OSError as e:
    print("no answer: %s" % e)
PY
)
check_eq "a declared 1 GB body is refused before it is sent" "HTTP/1.1 413" "${early%% Content*}"
check_eq "after the refused requests the keys are the same" "$KEYS0" "$(keys_state)"

# ------------------------------------------------------------ keys: generation on the token
expect "POST /v1/keys ecdsa P-256 api-p256 id a1b2" 201 $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"api-p256","id":"a1b2","type":"ecdsa","curve":"P-256"}'
check_eq "new key: P-256, sensitive, not extractable, never extractable" "P-256 True False True" \
	"$(jq_ '" ".join([d["curve"], str(d["sensitive"]), str(d["extractable"]), str(d["never_extractable"])])')"
expect "POST /v1/keys rsa 2048 api-rsa" 201 $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"api-rsa","id":"a2","type":"rsa","bits":2048}'
check_eq "new key: RSA 2048" "rsa 2048" "$(jq_ 'd["type"] + " " + str(d["bits"])')"
expect "POST /v1/keys rsa without bits (3072)" 201 $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"api-rsa3072","id":"a4","type":"rsa"}'
check_eq "new key: RSA 3072 by default" "rsa 3072" "$(jq_ 'd["type"] + " " + str(d["bits"])')"
t0=$(date +%s%N)
expect "POST /v1/keys rsa 4096" 201 $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"api-rsa4096","id":"a5","type":"rsa","bits":4096}'
note "RSA-4096 generation on the token: $((($(date +%s%N) - t0) / 1000000)) ms"
check_eq "new key: RSA 4096" "rsa 4096" "$(jq_ 'd["type"] + " " + str(d["bits"])')"
expect "POST /v1/keys ecdsa P-384 api-p384" 201 $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"api-p384","id":"a3","type":"ecdsa","curve":"P-384"}'
expect "POST /v1/keys ed25519 api-ed (random id)" 201 $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"api-ed","type":"ed25519"}'
ED_ID=$(jq_ 'd["id"]')
ED_SPKI=$(jq_ 'd["spki_sha256"]')
expect "GET /v1/keys/demo/a1b2" 200 /v1/keys/{token}/{id} "$READ_TOKEN" GET /v1/keys/demo/a1b2
check_eq "GET the new key by id: its label" api-p256 "$(jq_ 'd["label"]')"
expect_error "GET /v1/keys/demo/ffff (no such key)" 404 not_found id /v1/keys/{token}/{id} "$READ_TOKEN" GET /v1/keys/demo/ffff
expect_error "POST /v1/keys, api-p256 again" 409 conflict /label $G "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"api-p256","type":"ecdsa"}'
ct=$("$SRCDIR/hsm-config/check-token" "$TOKEN_DIR" 2>&1)
for l in api-p256 api-rsa api-rsa3072 api-rsa4096 api-p384 api-ed; do
	has "check-token: $l on the token, sensitive, never extractable, generated there" \
		"^$l .*private=1 sensitive=1 extractable=0 always_sensitive=1 never_extractable=1 local=1 .*status=ok" "$ct"
done

# ------------------------------------------------------------ CSR signed on the token
C=/v1/keys/{token}/{id}/csr
csr_check() { # ID LABEL
	expect "POST CSR for $2" 200 $C "$ADMIN_TOKEN" POST "/v1/keys/demo/$1/csr" "${JSON[@]}" \
		-d '{"subject":"CN=api.hsmtls.test,O=hsmtls","dns":["api.hsmtls.test","www.hsmtls.test"],"ip":["192.0.2.7","2001:db8::7"],"email":["ops@hsmtls.test"],"uri":["https://api.hsmtls.test/"]}' || return
	jq_ 'd["csr"]' >"$E2E_DIR/$2.csr"
	local spki info
	spki=$(jq_ 'd["spki_sha256"]')
	check "$2 CSR: openssl req -verify (signed by the key on the token)" \
		sh -c "openssl req -in '$E2E_DIR/$2.csr' -noout -verify 2>&1 | grep -q 'verify OK'"
	info=$(certtool --crq-info --infile "$E2E_DIR/$2.csr" 2>&1)
	has "$2 CSR: subject" "Subject: .*CN=api.hsmtls.test" "$info"
	has "$2 CSR: DNS SAN" "DNSname: www.hsmtls.test" "$info"
	has "$2 CSR: IPv6 SAN" "IPAddress: 2001:db8::7" "$info"
	has "$2 CSR: email SAN" "RFC822Name: ops@hsmtls.test" "$info"
	has "$2 CSR: URI SAN" "URI: https://api.hsmtls.test/" "$info"
	check_eq "$2 CSR: its public key is the key's (SPKI SHA-256)" "$spki" \
		"$(openssl req -in "$E2E_DIR/$2.csr" -noout -pubkey | openssl pkey -pubin -outform DER | sha256sum | cut -d' ' -f1)"
}
csr_check a1b2 api-p256
csr_check a2 api-rsa
csr_check a3 api-p384
csr_check "$ED_ID" api-ed
expect_error "CSR with a subject that is no DN" 400 invalid_field /subject $C "$ADMIN_TOKEN" POST /v1/keys/demo/a1b2/csr \
	"${JSON[@]}" -d '{"subject":"just words"}'
expect_error "CSR with a bad IP" 400 invalid_field /ip $C "$ADMIN_TOKEN" POST /v1/keys/demo/a1b2/csr \
	"${JSON[@]}" -d '{"subject":"CN=x","ip":["999.1.1.1"]}'
expect_error "CSR with dns not a list" 400 invalid_field /dns $C "$ADMIN_TOKEN" POST /v1/keys/demo/a1b2/csr \
	"${JSON[@]}" -d '{"subject":"CN=x","dns":"x.test"}'
expect_error "CSR without subject" 400 missing_field /subject $C "$ADMIN_TOKEN" POST /v1/keys/demo/a1b2/csr \
	"${JSON[@]}" -d '{"dns":["x.test"]}'
expect_error "CSR with the read token" 403 forbidden None $C "$READ_TOKEN" POST /v1/keys/demo/a1b2/csr \
	"${JSON[@]}" -d '{"subject":"CN=x"}'
expect_error "CSR for no such key" 404 not_found id $C "$ADMIN_TOKEN" POST /v1/keys/demo/ffff/csr \
	"${JSON[@]}" -d '{"subject":"CN=x"}'

# ------------------------------------------------------------ certificates
# The CSR of api-p256 signed by the test CA, uploaded as a chain.
printf 'tls_www_server\nsigning_key\nexpiration_days = 30\nhonor_crq_extensions\n' >"$E2E_DIR/leaf.tmpl"
certtool --generate-certificate --load-request "$E2E_DIR/api-p256.csr" --load-ca-privkey "$TOKEN_DIR/ca.key" \
	--load-ca-certificate "$HSMTLS_CA" --template "$E2E_DIR/leaf.tmpl" --outfile "$E2E_DIR/api-p256.pem" >/dev/null 2>&1 ||
	bail "certtool could not sign the CSR"
cat "$E2E_DIR/api-p256.pem" "$HSMTLS_CA" >"$E2E_DIR/api-p256-chain.pem"
cat "$HSMTLS_CA" "$E2E_DIR/api-p256.pem" >"$E2E_DIR/reversed-chain.pem"
cat "$E2E_DIR/api-p256.pem" "$TOKEN_DIR/other-ca.pem" >"$E2E_DIR/wrong-issuer-chain.pem"
pemjson() { python3 -c 'import json,sys; print(json.dumps({"pem": open(sys.argv[1]).read(), **({"store": sys.argv[2]} if len(sys.argv) > 2 else {})}))' "$@"; }
FP=$(certtool -i --infile "$E2E_DIR/api-p256.pem" --hash sha256 2>/dev/null | sed -n 's/^[[:space:]]*sha256:\([0-9a-f]*\)$/\1/p' | head -1)
[ -n "$FP" ] || FP=$(openssl x509 -in "$E2E_DIR/api-p256.pem" -outform DER | sha256sum | cut -d' ' -f1)
CE=/v1/certificates
certs_state() { api "$READ_TOKEN" GET /v1/certificates >/dev/null && jq_ 'sorted(c["fingerprint"] + ":" + ",".join(c["stored"]) for c in d["certificates"])'; }
CERTS0=$(certs_state)
tokcerts() { p11tool --provider "$HSMTLS_MODULE" --list-all-certs "$HSMTLS_TOKEN_URI" 2>/dev/null; }
expect_error "upload with the read token" 403 forbidden None $CE "$READ_TOKEN" POST /v1/certificates "${JSON[@]}" \
	-d "$(pemjson "$E2E_DIR/api-p256-chain.pem")"
expect_error "upload a PEM that does not parse" 400 invalid_field /pem $CE "$ADMIN_TOKEN" POST /v1/certificates "${JSON[@]}" \
	-d '{"pem":"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"}'
expect_error "upload without pem" 400 missing_field /pem $CE "$ADMIN_TOKEN" POST /v1/certificates "${JSON[@]}" -d '{"store":"state"}'
expect_error "upload with a bad store" 400 invalid_field /store $CE "$ADMIN_TOKEN" POST /v1/certificates "${JSON[@]}" \
	-d "$(pemjson "$E2E_DIR/api-p256-chain.pem" disk)"
expect_error "upload a chain out of order (CA first)" 422 unprocessable /pem $CE "$ADMIN_TOKEN" POST /v1/certificates \
	"${JSON[@]}" -d "$(pemjson "$E2E_DIR/reversed-chain.pem")"
expect_error "upload a chain whose second certificate did not issue the first" 422 unprocessable /pem $CE "$ADMIN_TOKEN" \
	POST /v1/certificates "${JSON[@]}" -d "$(pemjson "$E2E_DIR/wrong-issuer-chain.pem")"
expect_error "upload a certificate whose key is on no token" 422 unprocessable /pem $CE "$ADMIN_TOKEN" POST /v1/certificates \
	"${JSON[@]}" -d "$(pemjson "$TOKEN_DIR/other-client.pem")"
check_eq "after the refused uploads the certificates are the same" "$CERTS0" "$(certs_state)"
check_not "after the refused uploads the token holds no certificate with id a1b2" grep -qi 'ID: a1:b2' <<<"$(tokcerts)"
expect "upload the api-p256 chain (store both)" 201 $CE "$ADMIN_TOKEN" POST /v1/certificates "${JSON[@]}" \
	-d "$(pemjson "$E2E_DIR/api-p256-chain.pem" both)"
check_eq "uploaded: fingerprint, key demo/a1b2, chain of 2, stored on token and in state, DNS SAN" \
	"$FP demo/a1b2 2 ['token', 'state'] True" \
	"$(jq_ '" ".join([d["fingerprint"], d["key"]["token"] + "/" + d["key"]["id"], str(d["chain_length"]), str(d["stored"]), str("DNS:api.hsmtls.test" in d["sans"])])')"
check_eq "uploaded: days_left 29 or 30" True "$(jq_ 'd["days_left"] in (29, 30)')"
has "the certificate is on the token next to its key (CKA_ID a1:b2)" 'ID: a1:b2' "$(tokcerts)"
expect_error "upload the same chain again" 409 conflict /pem $CE "$ADMIN_TOKEN" POST /v1/certificates "${JSON[@]}" \
	-d "$(pemjson "$E2E_DIR/api-p256-chain.pem")"
expect "GET /v1/certificates" 200 $CE "$READ_TOKEN" GET /v1/certificates
check_eq "list: the configured P-256 chain, served by listener www" True \
	"$(jq_ 'any(c["stored"] == ["config"] and c["key"]["label"] == "p256" and c["listeners"][0]["listener"] == "www" for c in d["certificates"])')"
expect "GET /v1/certificates/{fp}" 200 /v1/certificates/{fingerprint} "$READ_TOKEN" GET "/v1/certificates/$FP"
expect_error "GET an unknown fingerprint" 404 not_found fingerprint /v1/certificates/{fingerprint} "$READ_TOKEN" GET \
	"/v1/certificates/$(printf '0%.0s' $(seq 64))"
expect "GET /v1/keys/demo/a1b2 lists the certificate" 200 /v1/keys/{token}/{id} "$READ_TOKEN" GET /v1/keys/demo/a1b2
check_eq "the key names its stored certificate" "['$FP']" "$(jq_ 'str(d["certificates"])')"
A1_SPKI=$(jq_ 'd["spki_sha256"]')
expect_error "DELETE key a1b2 while its certificate is stored" 409 conflict None /v1/keys/{token}/{id} "$ADMIN_TOKEN" DELETE \
	"/v1/keys/demo/a1b2?spki_sha256=$A1_SPKI"
CFG_FP=$(openssl x509 -in "$HSMTLS_CERT_P256" -outform DER | sha256sum | cut -d' ' -f1)
expect_error "DELETE the configured chain" 409 conflict fingerprint /v1/certificates/{fingerprint} "$ADMIN_TOKEN" DELETE \
	"/v1/certificates/$CFG_FP"
expect_error "DELETE a certificate with the read token" 403 forbidden None /v1/certificates/{fingerprint} "$READ_TOKEN" \
	DELETE "/v1/certificates/$FP"
expect "DELETE the uploaded chain" 204 /v1/certificates/{fingerprint} "$ADMIN_TOKEN" DELETE "/v1/certificates/$FP"
check_eq "after the deletion the certificates are as at the start" "$CERTS0" "$(certs_state)"
check_not "the certificate is gone from the token" grep -qi 'ID: a1:b2' <<<"$(tokcerts)"
expect "upload it again, in the state directory only" 201 $CE "$ADMIN_TOKEN" POST /v1/certificates "${JSON[@]}" \
	-d "$(pemjson "$E2E_DIR/api-p256-chain.pem")"
check_eq "stored in state only" "['state']" "$(jq_ 'str(d["stored"])')"
check_not "not on the token" grep -qi 'ID: a1:b2' <<<"$(tokcerts)"

# ------------------------------------------------------------ listeners (read-only today)
expect "GET /v1/listeners" 200 /v1/listeners "$READ_TOKEN" GET /v1/listeners
check_eq "listeners: www binds the configured P-256 chain for its names" "www $CFG_FP config True" \
	"$(jq_ '" ".join([d["listeners"][0]["name"], d["listeners"][0]["bindings"][0]["certificate"], d["listeners"][0]["bindings"][0]["source"], str("www.hsmtls.test" in d["listeners"][0]["bindings"][0]["names"])])')"
LETAG=$(jq_ 'd["listeners"][0]["etag"]')
etag=$(curl -sS --unix-socket "$SOCK" -H "Authorization: Bearer $READ_TOKEN" -D - -o "$BODY" http://hsmtlsd/v1/listeners/www |
	tr -d '\r' | sed -n 's/^[Ee][Tt][Aa][Gg]: //p')
check_eq "GET /v1/listeners/www: the ETag header is the listener's etag" "$LETAG" "$etag"
expect "GET /v1/listeners/www" 200 /v1/listeners/{listener} "$READ_TOKEN" GET /v1/listeners/www
expect_error "GET /v1/listeners/nope" 404 not_found listener /v1/listeners/{listener} "$READ_TOKEN" GET /v1/listeners/nope

# ------------------------------------------------------------ mutated bodies
KEYS2=$(keys_state)
CERTS2=$(certs_state)
seed=$(date +%s)
note "mutated bodies: seed $seed (tests/e2e/admin-fuzz.py SOCKET TOKEN 400 $seed reproduces them)"
fz=$("$SRCDIR/tests/e2e/admin-fuzz.py" "$SOCK" "$ADMIN_TOKEN" 400 "$seed" 2>&1)
check_eq "400 mutated JSON bodies: each a documented status with a JSON (error) body" "ok 400" "$fz"
check "the daemon is still up" daemon_running
check_eq "after the mutated bodies the keys are the same" "$KEYS2" "$(keys_state)"
check_eq "after the mutated bodies the certificates are the same" "$CERTS2" "$(certs_state)"

# ------------------------------------------------------------ delete
D=/v1/keys/{token}/{id}
KEYS1=$(keys_state)
expect_error "DELETE without spki_sha256" 400 missing_field spki_sha256 $D "$ADMIN_TOKEN" DELETE "/v1/keys/demo/$ED_ID"
expect_error "DELETE with another key's spki_sha256" 412 precondition_failed spki_sha256 $D "$ADMIN_TOKEN" DELETE \
	"/v1/keys/demo/$ED_ID?spki_sha256=$P256_SPKI"
expect_error "DELETE the key listener www uses" 409 conflict None $D "$ADMIN_TOKEN" DELETE \
	"/v1/keys/demo/$P256_ID?spki_sha256=$P256_SPKI"
expect_error "DELETE with the read token" 403 forbidden None $D "$READ_TOKEN" DELETE "/v1/keys/demo/$ED_ID?spki_sha256=$ED_SPKI"
check_eq "after the refused deletions the keys are the same" "$KEYS1" "$(keys_state)"
# A second key pair provisioned outside the API with api-ed's CKA_ID: a
# deletion by that id is refused (which key pair would go?), and both stay.
PIN=$(head -n 1 "$HSMTLS_PIN_FILE")
if pkcs11-tool --module "$HSMTLS_MODULE" --token-label "$HSMTLS_TOKEN_LABEL" --login --pin "$PIN" --keypairgen \
	--key-type EC:prime256v1 --id "$ED_ID" --label same-id >/dev/null 2>&1; then
	code=$(api "$ADMIN_TOKEN" DELETE "/v1/keys/demo/$ED_ID?spki_sha256=$ED_SPKI")
	case $code in 404 | 409 | 412) ok "DELETE by an id two key pairs share: refused ($code)" ;; *) fail "DELETE by a shared id: $code" ;; esac
	both=$(p11tool --provider "$HSMTLS_MODULE" --list-privkeys --login --set-pin="$PIN" "$HSMTLS_TOKEN_URI" 2>/dev/null |
		grep -cE 'object=(api-ed|same-id);')
	check_eq "... and both private keys are still on the token" 2 "$both"
	pkcs11-tool --module "$HSMTLS_MODULE" --token-label "$HSMTLS_TOKEN_LABEL" --login --pin "$PIN" --delete-object \
		--type privkey --label same-id >/dev/null 2>&1
	pkcs11-tool --module "$HSMTLS_MODULE" --token-label "$HSMTLS_TOKEN_LABEL" --login --pin "$PIN" --delete-object \
		--type pubkey --label same-id >/dev/null 2>&1
else
	fail "pkcs11-tool could not make a second key pair with api-ed's id"
fi
expect "DELETE api-ed" 204 $D "$ADMIN_TOKEN" DELETE "/v1/keys/demo/$ED_ID?spki_sha256=$ED_SPKI"
expect_error "GET the deleted key" 404 not_found id /v1/keys/{token}/{id} "$READ_TOKEN" GET "/v1/keys/demo/$ED_ID"
check_not "check-token: api-ed is gone" grep -q '^api-ed ' <<<"$("$SRCDIR/hsm-config/check-token" "$TOKEN_DIR" 2>&1)"

# ------------------------------------------------------------ usage and metrics
PORT=$(listener_port www)
p256_usage() { # FIELD: since_start or lifetime of p256 sign CKM_ECDSA ok
	api "$READ_TOKEN" GET /v1/usage >/dev/null
	jq_ "sum(c['$1'] for k in d['keys'] if k['label'] == 'p256' for c in k['counters'] if c['op'] == 'sign' and c['mechanism'] == 'CKM_ECDSA' and c['result'] == 'ok')"
}
expect "GET /v1/usage" 200 /v1/usage "$READ_TOKEN" GET /v1/usage
u0=$(p256_usage since_start)
for i in 1 2 3; do
	gnutls-cli --no-ca-verification --priority 'NORMAL:-VERS-ALL:+VERS-TLS1.3' \
		-p "$PORT" 127.0.0.1 </dev/null >/dev/null 2>&1 || fail "TLS handshake $i with listener www"
done
u1=$(p256_usage since_start)
check_eq "usage: 3 handshakes, 3 more P-256 signatures since start" $((u0 + 3)) "$u1"
L1=$(p256_usage lifetime)
check_eq "usage: lifetime equals since start in the first run" "$u1" "$L1"
api "$READ_TOKEN" GET /metrics >/dev/null
cp "$BODY" "$E2E_DIR/metrics.txt"
check "promtool check metrics accepts /metrics" sh -c "promtool check metrics <'$E2E_DIR/metrics.txt'"
has "metrics: P-256 signatures counted" \
	"^hsmtls_key_operations_total{token=\"demo\",key=\"p256\",op=\"sign\",mechanism=\"CKM_ECDSA\",result=\"ok\"} $u1\$" "$(cat "$E2E_DIR/metrics.txt")"
has "metrics: the duration histogram counts the same P-256 signatures" \
	"^hsmtls_key_operation_duration_seconds_count\\{token=\"demo\",key=\"p256\",op=\"sign\",mechanism=\"CKM_ECDSA\",result=\"ok\"\\} $u1\$" \
	"$(cat "$E2E_DIR/metrics.txt")"
has "metrics: ... and its +Inf bucket" \
	"^hsmtls_key_operation_duration_seconds_bucket\\{token=\"demo\",key=\"p256\",op=\"sign\",mechanism=\"CKM_ECDSA\",result=\"ok\",le=\"\\+Inf\"\\} $u1\$" \
	"$(cat "$E2E_DIR/metrics.txt")"
api "$READ_TOKEN" GET /v1/usage >/dev/null
check_eq "usage: P-256 signature p50 <= p99 <= 5 s, both > 0" True \
	"$(jq_ 'all(0 < c["p50_seconds"] <= c["p99_seconds"] <= 5 for k in d["keys"] if k["label"] == "p256" for c in k["counters"] if c["result"] == "ok")')"
has "metrics: token up" '^hsmtls_token_up{token="demo"} 1$' "$(cat "$E2E_DIR/metrics.txt")"
has "metrics: the configured P-256 chain's expiry" \
	"^hsmtls_certificate_not_after_timestamp_seconds\\{fingerprint=\"$CFG_FP\",source=\"config\"\\} $(date -d "$(openssl x509 -in "$HSMTLS_CERT_P256" -noout -enddate | cut -d= -f2)" +%s)\$" \
	"$(cat "$E2E_DIR/metrics.txt")"
has "metrics: the uploaded chain's expiry" "^hsmtls_certificate_not_after_timestamp_seconds\\{fingerprint=\"$FP\",source=\"api\"\\} [0-9]+\$" \
	"$(cat "$E2E_DIR/metrics.txt")"
expect "GET /metrics with the read token" 200 /metrics "$READ_TOKEN" GET /metrics

# The totals survive a SIGTERM restart (written at shutdown).
stop_daemon 10
check_eq "SIGTERM: the daemon exits 0" 0 "$DAEMON_RC"
check_eq "the usage table kept the run's total" "$L1" \
	"$(sqlite3 "$STATE/state.db" "SELECT count FROM usage WHERE key = '$HSMTLS_KEY_P256' AND op = 'sign' AND mech = 'CKM_ECDSA' AND result = 'ok'")"
start_admin
s2=$(p256_usage since_start)
L2=$(p256_usage lifetime)
check_eq "after the restart: lifetime = the last run's lifetime + this run's ($L1 + $s2)" $((L1 + s2)) "$L2"

# The writer thread flushes without a shutdown: after kill -9 at most about
# a second of counts is lost (here none, once the table shows them).
for i in 1 2; do
	gnutls-cli --no-ca-verification --priority 'NORMAL:-VERS-ALL:+VERS-TLS1.3' \
		-p "$(listener_port www)" 127.0.0.1 </dev/null >/dev/null 2>&1 || fail "TLS handshake $i after the restart"
done
L3=$(p256_usage lifetime)
db_count() { sqlite3 "$STATE/state.db" "SELECT count FROM usage WHERE key = '$HSMTLS_KEY_P256' AND op = 'sign' AND mech = 'CKM_ECDSA' AND result = 'ok'"; }
db_has() { [ "$(db_count)" = "$1" ]; }
check "the writer thread puts the running total ($L3) in the table within 10 s, without a shutdown" \
	wait_until 10 db_has "$L3"
kill -KILL "$DAEMON_PID"
wait_until 10 daemon_exited || bail "hsmtlsd survived kill -9"
forget_pid "$DAEMON_PID"
start_admin
check_eq "after kill -9 and a start: the lifetime total is kept" "$L3" "$(($(p256_usage lifetime) - $(p256_usage since_start)))"

# Headers past libmicrohttpd's memory limit: refused (431), nothing done.
code=$(api "$ADMIN_TOKEN" GET /v1/health -H "X-Big: $(head -c 40000 /dev/zero | tr '\0' 'b')" 2>/dev/null)
check_eq "a 40 KB header is refused with 431" 431 "$code"

# ------------------------------------------------------------ audit
A=/v1/audit
expect "GET /v1/audit" 200 $A "$READ_TOKEN" GET '/v1/audit?limit=1000'
check_eq "audit: the generation of api-p256 is recorded (201, by token:ops)" "key.generate 201 token:ops" \
	"$(jq_ '[r["action"] + " " + str(r["status"]) + " " + r["who"] for r in d["records"] if "label=api-p256 id=a1b2" in r["detail"]][0]')"
check_eq "audit: a refused credential is recorded (401)" True \
	"$(jq_ 'any(r["action"] == "auth.refused" and r["status"] == 401 for r in d["records"])')"
check_eq "audit: the read token's refused change is recorded (403 by token:viewer)" True \
	"$(jq_ 'any(r["status"] == 403 and r["who"] == "token:viewer" and r["method"] == "POST" for r in d["records"])')"
check_eq "audit: the 413 is recorded" True "$(jq_ 'any(r["status"] == 413 for r in d["records"])')"
check_eq "audit: a refused request whose path is no UTF-8 is listed (bytes as \\xNN), not skipped" True \
	"$(jq_ 'any(r["status"] == 401 and r["path"] == "/v1/keys\\xff\\xc3" for r in d["records"])')"
check_eq "audit: the deletion is recorded" True "$(jq_ 'any(r["action"] == "key.delete" and r["status"] == 204 for r in d["records"])')"
check_eq "audit: each record carries the previous one's SHA-256" True \
	"$(jq_ 'all(d["records"][i]["prev_sha256"] == d["records"][i-1]["sha256"] for i in range(1, len(d["records"])))')"
expect "GET /v1/audit?after=2&limit=2" 200 $A "$READ_TOKEN" GET '/v1/audit?after=2&limit=2'
check_eq "audit paging: records 3 and 4, next_after 4" "[3, 4] 4" "$(jq_ 'str([r["seq"] for r in d["records"]]) + " " + str(d["next_after"])')"
expect_error "GET /v1/audit?limit=0" 400 invalid_field limit $A "$READ_TOKEN" GET '/v1/audit?limit=0'
expect "GET /v1/audit/verify" 200 /v1/audit/verify "$READ_TOKEN" GET /v1/audit/verify
check_eq "audit verify: ok" True "$(jq_ 'd["ok"]')"
stop_daemon 10
check "hsmtlsd --check-audit: intact" "$HSMTLSD" --check-audit "$STATE"
sqlite3 "$STATE/state.db" "UPDATE audit SET who = 'token:someone-else' WHERE seq = 3" || bail "sqlite3 update failed"
rc=0
out=$("$HSMTLSD" --check-audit "$STATE" 2>&1) || rc=$?
check_eq "hsmtlsd --check-audit fails after record 3 was altered" 1 "$rc"
has "--check-audit names record 3" "BROKEN at record 3" "$out"
start_admin
expect "GET /v1/audit/verify after the change" 200 /v1/audit/verify "$READ_TOKEN" GET /v1/audit/verify
check_eq "audit verify: not ok, first bad record 3" "False 3" "$(jq_ 'str(d["ok"]) + " " + str(d["first_bad_seq"])')"
stop_daemon 10
check_contract

# ------------------------------------------------------------ HTTPS, client certificates, limits
SUBJ=$(certtool -i --infile "$TOKEN_DIR/file-client.pem" | sed -n 's/^[[:space:]]*Subject: //p' | head -1)
conf=$E2E_DIR/admin-tls.conf
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
timeout = 5s
max_connections_per_ip = 3
CONF
rc=0
out=$("$HSMTLSD" --check -c "$conf" 2>&1) || rc=$?
check_eq "--check with an HTTPS [admin]: exit 0" 0 "$rc"
has "--check describes [admin]" '\[admin\]: HTTPS on 127.0.0.1:0, 1 bearer token\(s\), 1 certificate identity' "$out"
sed "s|^tls_key = .*|tls_key = $HSMTLS_FILEKEY_P384|" "$conf" >"$E2E_DIR/admin-tls-bad.conf"
rc=0
out=$("$HSMTLSD" --check -c "$E2E_DIR/admin-tls-bad.conf" 2>&1) || rc=$?
check_eq "--check with a tls_key that is not tls_cert's: exit 1" 1 "$rc"
has "--check names tls_cert and tls_key" "\[admin\] tls_cert .* with tls_key .*file-p384" "$out"
sed "s|^tls_key = .*|tls_key = $HSMTLS_KEY_P384|" "$conf" >"$E2E_DIR/admin-tls-bad2.conf"
rc=0
out=$("$HSMTLSD" --check -c "$E2E_DIR/admin-tls-bad2.conf" 2>&1) || rc=$?
check_eq "--check with a token tls_key that is not tls_cert's: exit 1" 1 "$rc"
has "--check says the chain does not match the token key" "tls_cert .* does not match key .*object=p384" "$out"
start_admin
APORT=$(sed -n 's/.*admin: listening on 127.0.0.1:\([0-9]*\) (HTTPS).*/\1/p' "$DAEMON_LOG" | tail -1)
[ -n "$APORT" ] || bail "no HTTPS admin port in the log"
URL=https://127.0.0.1:$APORT
tapi() { # TOKEN METHOD PATH [curl args]: over HTTPS
	local tok=$1 method=$2 path=$3
	shift 3
	local auth=()
	[ -n "$tok" ] && auth=(-H "Authorization: Bearer $tok")
	curl -sS --max-time 30 --cacert "$HSMTLS_CA" -o "$BODY" -w '%{http_code}' -X "$method" "${auth[@]}" "$@" "$URL$path"
}
CLIENT=(--cert "$HSMTLS_FILE_CLIENT_CERT" --key "$HSMTLS_FILE_CLIENT_KEY")
check_eq "HTTPS: the admin CA's client certificate is identity $SUBJ with role admin" \
	"200 cert:$SUBJ admin certificate" "$(tapi "" GET /v1/whoami "${CLIENT[@]}") $(jq_ 'd["identity"] + " " + d["role"] + " " + d["auth"]')"
check_eq "HTTPS: a CSR with the client certificate (role admin)" 200 \
	"$(tapi "" POST /v1/keys/demo/02/csr "${CLIENT[@]}" "${JSON[@]}" -d '{"subject":"CN=tls.hsmtls.test"}')"
check_eq "HTTPS: a certificate from another CA is refused (401)" "401 unauthorized" \
	"$(tapi "" GET /v1/whoami --cert "$TOKEN_DIR/other-client.pem" --key "$TOKEN_DIR/other-client.key") $(jq_ 'd["error"]["code"]')"
check_eq "HTTPS: no credential (401)" 401 "$(tapi "" GET /v1/health)"
check_eq "HTTPS: the read bearer token without a certificate (role read)" "200 read" \
	"$(tapi "$READ_TOKEN" GET /v1/whoami) $(jq_ 'd["role"]')"
check_eq "HTTPS: the read token may not generate a key (403)" 403 \
	"$(tapi "$READ_TOKEN" POST /v1/keys "${JSON[@]}" -d '{"token":"demo","label":"x","type":"ecdsa"}')"
tapi "$READ_TOKEN" GET '/v1/audit?limit=1000' >/dev/null
check_eq "HTTPS: the other CA's certificate is audited as refused" True \
	"$(jq_ 'any(r["who"] == "cert:(not verified)" and r["status"] == 401 for r in d["records"])')"

# hold N WAIT CMD...: holds N idle TCP connections to the admin port while
# CMD runs; prints "rc=CMD's status cmd_s=its time cut_s=when the server
# closed the first held connection (-1: not within 30 s, or WAIT is 0)".
hold() {
	python3 - "$APORT" "$@" <<'PY'
import socket, subprocess, sys, time
port, n, wait = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
t0 = time.time()
r = subprocess.run(sys.argv[4:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
t1 = time.time()
if not wait:
    print(f"rc={r.returncode} cmd_s={t1 - t0:.1f} cut_s=-1")
    sys.exit(0)
socks[0].settimeout(30)
cut = -1
try:
    while socks[0].recv(4096):  # a TLS alert may come first
        pass
    cut = time.time() - t0
except socket.timeout:
    pass
except OSError:
    cut = time.time() - t0
print(f"rc={r.returncode} cmd_s={t1 - t0:.1f} cut_s={cut:.1f}")
PY
}
live=(curl -sS --max-time 20 --cacert "$HSMTLS_CA" -o /dev/null -f "$URL/v1/live")
res=$(hold 2 0 "${live[@]}")
check_eq "max_connections_per_ip = 3: with 2 held, a 3rd connection is served ($res)" rc=0 "${res%% *}"
res=$(hold 3 0 "${live[@]}")
note "3 held connections, then a 4th: $res"
case $res in rc=0*) fail "max_connections_per_ip = 3: a 4th connection was served ($res)" ;;
*) ok "max_connections_per_ip = 3: a 4th connection from the address is refused ($res)" ;; esac
check "after the held connections closed, /v1/live is served again" wait_until 10 "${live[@]}"
WWW_PORT=$(listener_port www)
res=$(hold 3 0 gnutls-cli --no-ca-verification --priority 'NORMAL:-VERS-ALL:+VERS-TLS1.3' -p "$WWW_PORT" 127.0.0.1 </dev/null)
check_eq "with the admin server full for this address, a TLS handshake on listener www still works" rc=0 "${res%% *}"
res=$(hold 1 1 "${live[@]}")
note "a stalled connection (sends nothing), and another client: $res"
rc=${res#rc=}; rc=${rc%% *}
cmd=${res#*cmd_s=}; cmd=${cmd%% *}
cut=${res#*cut_s=}
check_eq "a stalled admin client does not keep another one waiting (served)" 0 "$rc"
if awk -v c="$cmd" -v t="$cut" 'BEGIN { exit !(c + 1 < t) }'; then
	ok "the other client was served (${cmd} s) before the stalled one was cut (${cut} s)"
else fail "the other client took ${cmd} s, the stalled one was cut at ${cut} s: it waited for it"; fi
if awk -v c="$cut" 'BEGIN { exit !(c >= 4 && c < 30) }'; then ok "the stalled client is cut after the 5 s timeout (${cut} s)"
else fail "the stalled client was not cut at the 5 s timeout (${cut} s)"; fi
stop_daemon 10

# HTTPS with the admin server's key on the token (tls_key = pkcs11: URI).
sed -i "s|^tls_cert = .*|tls_cert = $HSMTLS_CERT_P256|; s|^tls_key = .*|tls_key = $HSMTLS_KEY_P256|" "$conf"
start_admin
APORT=$(sed -n 's/.*admin: listening on 127.0.0.1:\([0-9]*\) (HTTPS, key on the token).*/\1/p' "$DAEMON_LOG" | tail -1)
[ -n "$APORT" ] || bail "no HTTPS admin port (key on the token) in the log"
URL=https://127.0.0.1:$APORT
check_eq "HTTPS, key on the token: the client certificate's identity is served" "200 admin" \
	"$(tapi "" GET /v1/whoami "${CLIENT[@]}") $(jq_ 'd["role"]')"
check_eq "HTTPS, key on the token: the server presents the token key's chain" "$CFG_FP" \
	"$(openssl s_client -connect "127.0.0.1:$APORT" -CAfile "$HSMTLS_CA" </dev/null 2>/dev/null | openssl x509 -outform DER | sha256sum | cut -d' ' -f1)"
stop_daemon 10

e2e_finish
