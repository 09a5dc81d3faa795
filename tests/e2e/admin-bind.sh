#!/usr/bin/env bash
# e2e: listener bindings through the admin API (POST, PUT, DELETE
# /v1/listeners/{listener}/bindings), the live credential swap behind them
# and their persistence, against the real daemon (its token behind the
# slowtoken module: delays and a failing C_Sign on demand) with real
# clients:
# - every bind / replace / unbind success and each documented error, each
#   response validated against api/openapi.yaml; after each refused change
#   GET /v1/listeners and the certificate a handshake gets are unchanged;
# - the listener keeps what its credentials carry after swaps: several
#   chains chosen by SNI, an optional client certificate checked against
#   client_ca, the OCSP response stapled for its file chain, ALPN;
# - a handshake in flight during a swap (its signature on the token held up
#   1.5 s) finishes with the old chain; a connection opened before a change
#   keeps passing data, and the old credentials are released only when it
#   closes (the daemon logs the release);
# - README's lifecycle block, extracted from README.md and run as written,
#   ends with a gnutls-cli handshake showing the new certificate's
#   fingerprint while a connection opened before it keeps passing data;
# - a certificate replaced twenty times while hsmtls-load makes handshakes:
#   no handshake fails, each one got one of the chains bound meanwhile;
# - bindings (API chains, a replaced and an unbound file chain) survive
#   SIGTERM and a start: the same listeners JSON, ETags and handshakes.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=lib-admin.sh
. "$(dirname "$0")/lib-admin.sh"

need_tools curl gnutls-cli openssl certtool python3 sqlite3
python3 -c 'import jsonschema, yaml' 2>/dev/null || skip "python3-jsonschema and python3-yaml are needed (hsm-config/install-deps)"
python3 -c 'import cryptography.x509.ocsp' 2>/dev/null || skip "python3-cryptography is missing"
[ -n "${SLOWTOKEN:-}" ] && [ -f "$SLOWTOKEN" ] || skip "the slowtoken module was not built (SLOWTOKEN unset)"
: "${HSMTLS_LOAD:=$SRCDIR/build/src/bench/hsmtls-load}"
[ -x "$HSMTLS_LOAD" ] || skip "hsmtls-load is not built ($HSMTLS_LOAD)"
e2e_init
TOKEN_DIR=$E2E_DIR/token
out=$("$SRCDIR/hsm-config/provision" "$TOKEN_DIR" --quiet --file-keys 2>&1) || {
	printf '%s\n' "$out" | sed 's/^/#   /'
	bail "hsm-config/provision $TOKEN_DIR failed"
}
# shellcheck disable=SC1091
. "$TOKEN_DIR/uris.env"
start_backend

HOLD=$SRCDIR/tests/e2e/tls-hold.py
admin_init
slowtoken_control

# The file chain p256 staples an OCSP response (tests/e2e/mk_ocsp.py).
openssl pkey -in "$TOKEN_DIR/ca.key" -out "$E2E_DIR/ca-full.key" 2>/dev/null || bail "openssl pkey: the CA key"
python3 "$SRCDIR/tests/e2e/mk_ocsp.py" "$HSMTLS_CERT_P256" "$HSMTLS_CA" "$E2E_DIR/ca-full.key" good -60 3600 \
	"$E2E_DIR/p256.ocsp" || bail "mk_ocsp.py"

conf=$E2E_DIR/bind.conf
printf '[global]\nlog_level = info\ndrain_timeout = 3s\nstate_dir = %s\n\n' "$STATE" >"$conf"
cat >>"$conf" <<CONF
[token demo]
uri = $HSMTLS_TOKEN_URI
module = $SLOWTOKEN
pin_file = $HSMTLS_PIN_FILE

[listener www]
listen = 127.0.0.1:0
backend = 127.0.0.1:$BACKEND_PORT
cert = $HSMTLS_CERT_P256
key = $HSMTLS_KEY_P256
ocsp_response = $E2E_DIR/p256.ocsp
cert = $HSMTLS_CERT_RSA2048
key = $HSMTLS_KEY_RSA2048
client_auth = optional
client_ca = $HSMTLS_CA
alpn = h2, http/1.1
handshake_timeout = 20s

[listener solo]
listen = 127.0.0.1:0
backend = 127.0.0.1:$BACKEND_PORT
cert = $HSMTLS_CERT_P384
key = $HSMTLS_KEY_P384

CONF
write_admin_section "$conf"

start_bind() {
	start_admin
	PORT=$(listener_port www)
	SOLO=$(listener_port solo)
}
start_bind

section() { note "$* (at $((($(date +%s%N) - E2E_T0) / 1000000)) ms)"; }

# served SNI [PORT]: the SHA-256 of the leaf a fresh handshake gets (ECDSA
# preferred: the client offers ECDSA and RSA signatures alike).
served() {
	timeout 20 gnutls-cli --no-ca-verification --sni-hostname="$1" --print-cert -p "${2:-$PORT}" 127.0.0.1 </dev/null 2>/dev/null |
		sed '/-END CERTIFICATE-/q' | certtool --fingerprint --hash sha256 2>/dev/null | tr -d ' \n'
}
served_rsa() { # SNI: with RSA signatures only
	timeout 20 gnutls-cli --no-ca-verification --sni-hostname="$1" --print-cert -p "$PORT" \
		--priority 'NORMAL:-SIGN-ALL:+SIGN-RSA-SHA256:+SIGN-RSA-PSS-RSAE-SHA256' 127.0.0.1 </dev/null 2>/dev/null |
		sed '/-END CERTIFICATE-/q' | certtool --fingerprint --hash sha256 2>/dev/null | tr -d ' \n'
}
fp_of() { openssl x509 -in "$1" -outform DER | sha256sum | cut -d' ' -f1; }
# the listeners JSON without their addresses (a restart binds new ports)
listeners_state() {
	api "$READ_TOKEN" GET /v1/listeners >/dev/null &&
		python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); [l.pop("address") for l in d["listeners"]]; print(json.dumps(d, sort_keys=True))' "$BODY"
}
etag_of() { api "$READ_TOKEN" GET "/v1/listeners/$1" >/dev/null && jq_ 'd["etag"]'; }
# world: the listeners JSON and the leaves served for two names (the
# state a refused change must leave as it was)
world() { printf '%s|%s|%s\n' "$(listeners_state)" "$(served www.hsmtls.test)" "$(served new.hsmtls.test)"; }

P256_FP=$(fp_of "$HSMTLS_CERT_P256")
RSA_FP=$(fp_of "$HSMTLS_CERT_RSA2048")
P384_FP=$(fp_of "$HSMTLS_CERT_P384")

# ------------------------------------------------------------ certificates to bind
section "certificates to bind"
# A key generated on the token through the API, CSRs signed by the test CA.
expect "POST /v1/keys bind-p256" 201 /v1/keys "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" \
	-d '{"token":"demo","label":"bind-p256","id":"b1","type":"ecdsa","curve":"P-256"}' || bail "no key"
printf 'tls_www_server\nsigning_key\nexpiration_days = 30\nhonor_crq_extensions\n' >"$E2E_DIR/leaf.tmpl"
csr() { # NAME DNS...: E2E_DIR/NAME.csr for key b1
	local name=$1 dns
	shift
	dns=$(printf '"%s",' "$@")
	api "$ADMIN_TOKEN" POST /v1/keys/demo/b1/csr "${JSON[@]}" -d "{\"subject\":\"CN=$1\",\"dns\":[${dns%,}]}" >/dev/null
	jq_ 'd["csr"]' >"$E2E_DIR/$name.csr"
}
sign() { # CSR-NAME OUT-NAME: E2E_DIR/OUT.pem (the chain) and its fingerprint on stdout
	certtool --generate-certificate --load-request "$E2E_DIR/$1.csr" --load-ca-privkey "$TOKEN_DIR/ca.key" \
		--load-ca-certificate "$HSMTLS_CA" --template "$E2E_DIR/leaf.tmpl" --outfile "$E2E_DIR/$2.leaf" >/dev/null 2>&1 ||
		bail "certtool could not sign $1"
	cat "$E2E_DIR/$2.leaf" "$HSMTLS_CA" >"$E2E_DIR/$2.pem"
	fp_of "$E2E_DIR/$2.leaf"
}
upload() { # NAME: uploads E2E_DIR/NAME.pem (state only)
	local code
	code=$(api "$ADMIN_TOKEN" POST /v1/certificates "${JSON[@]}" \
		-d "$(python3 -c 'import json,sys; print(json.dumps({"pem": open(sys.argv[1]).read()}))' "$E2E_DIR/$1.pem")")
	[ "$code" = 201 ] || bail "upload of $1: $code $(head -c 300 "$BODY")"
}
# A client certificate from the test CA, and one from another CA.
printf 'cn = bind-client\ntls_www_client\nsigning_key\nexpiration_days = 30\n' >"$E2E_DIR/client.tmpl"
printf 'cn = other CA\nca\ncert_signing_key\nexpiration_days = 30\n' >"$E2E_DIR/other-ca.tmpl"
for k in client other-ca other-client; do
	certtool --generate-privkey --key-type ecdsa --outfile "$E2E_DIR/$k.key" >/dev/null 2>&1 || bail "certtool: key $k"
done
certtool --generate-certificate --load-privkey "$E2E_DIR/client.key" --load-ca-privkey "$TOKEN_DIR/ca.key" \
	--load-ca-certificate "$HSMTLS_CA" --template "$E2E_DIR/client.tmpl" --outfile "$E2E_DIR/client.pem" >/dev/null 2>&1 &&
	certtool --generate-self-signed --load-privkey "$E2E_DIR/other-ca.key" --template "$E2E_DIR/other-ca.tmpl" \
		--outfile "$E2E_DIR/other-ca.pem" >/dev/null 2>&1 &&
	certtool --generate-certificate --load-privkey "$E2E_DIR/other-client.key" --load-ca-privkey "$E2E_DIR/other-ca.key" \
		--load-ca-certificate "$E2E_DIR/other-ca.pem" --template "$E2E_DIR/client.tmpl" --outfile "$E2E_DIR/other-client.pem" \
		>/dev/null 2>&1 || bail "certtool: client certificates"
csr new new.hsmtls.test
csr ab a.hsmtls.test b.hsmtls.test
csr www www.hsmtls.test localhost
NEW1=$(sign new new1)
NEW2=$(sign new new2)
CLASH=$(sign new clash)
AB=$(sign ab ab)
WWW=$(sign www www-api)
for c in new1 new2 clash ab www-api; do upload "$c"; done
note "new1=$NEW1 new2=$NEW2 ab=$AB www-api=$WWW (file chains: p256=$P256_FP rsa2048=$RSA_FP)"

# ------------------------------------------------------------ at start
section "at start"
expect "GET /v1/listeners/www" 200 /v1/listeners/{listener} "$READ_TOKEN" GET /v1/listeners/www
check_eq "www serves its two file chains, p256 first" "$P256_FP:config $RSA_FP:config" \
	"$(jq_ '" ".join(b["certificate"] + ":" + b["source"] for b in d["bindings"])')"
E0=$(jq_ 'd["etag"]')
check_eq "the ETag header is the body's etag" "$E0" "$(hdr_etag)"
check_eq "SNI www.hsmtls.test gets the file P-256 chain" "$P256_FP" "$(served www.hsmtls.test)"
check_eq "SNI new.hsmtls.test (no chain has it) gets the first chain" "$P256_FP" "$(served new.hsmtls.test)"

# ------------------------------------------------------------ refused changes
section "refused changes"
B=/v1/listeners/{listener}/bindings
BF=/v1/listeners/{listener}/bindings/{fingerprint}
W0=$(world)
WREF=$W0
refused() { # DESC STATUS CODE FIELD TEMPLATE TOKEN METHOD PATH [args]: and nothing changed
	expect_error "$@"
	check_eq "... $1: the listeners and the handshakes are as before" "$WREF" "$(world)"
}
refused "bind without If-Match" 428 precondition_required If-Match $B "$ADMIN_TOKEN" POST /v1/listeners/www/bindings \
	"${JSON[@]}" -d "{\"certificate\":\"$NEW1\"}"
refused "bind with a stale If-Match" 412 precondition_failed If-Match $B "$ADMIN_TOKEN" POST /v1/listeners/www/bindings \
	"${JSON[@]}" -H 'If-Match: "00000000000000000000000000000000"' -d "{\"certificate\":\"$NEW1\"}"
expect_error "bind with the read token" 403 forbidden None $B "$READ_TOKEN" POST /v1/listeners/www/bindings \
	"${JSON[@]}" -H "If-Match: $E0" -d "{\"certificate\":\"$NEW1\"}"
expect_error "bind on an unknown listener" 404 not_found listener $B "$ADMIN_TOKEN" POST /v1/listeners/nope/bindings \
	"${JSON[@]}" -H "If-Match: $E0" -d "{\"certificate\":\"$NEW1\"}"
expect_error "bind an unknown certificate" 404 not_found /certificate $B "$ADMIN_TOKEN" POST /v1/listeners/www/bindings \
	"${JSON[@]}" -H "If-Match: $E0" -d "{\"certificate\":\"$(printf 'a%.0s' $(seq 64))\"}"
expect_error "bind with an unknown field" 400 unknown_field /colour $B "$ADMIN_TOKEN" POST /v1/listeners/www/bindings \
	"${JSON[@]}" -H "If-Match: $E0" -d "{\"certificate\":\"$NEW1\",\"colour\":\"red\"}"
expect_error "bind without certificate" 400 missing_field /certificate $B "$ADMIN_TOKEN" POST /v1/listeners/www/bindings \
	"${JSON[@]}" -H "If-Match: $E0" -d '{"names":["x.hsmtls.test"]}'
expect_error "bind a certificate that is no fingerprint" 400 invalid_field /certificate $B "$ADMIN_TOKEN" POST \
	/v1/listeners/www/bindings "${JSON[@]}" -H "If-Match: $E0" -d '{"certificate":"ABC"}'
expect_error "bind with names not a list" 400 invalid_field /names $B "$ADMIN_TOKEN" POST /v1/listeners/www/bindings \
	"${JSON[@]}" -H "If-Match: $E0" -d "{\"certificate\":\"$NEW1\",\"names\":\"new.hsmtls.test\"}"
expect_error "bind with malformed JSON" 400 invalid_json None $B "$ADMIN_TOKEN" POST /v1/listeners/www/bindings \
	"${JSON[@]}" -H "If-Match: $E0" -d '{"certificate":'
refused "bind for a name the certificate is not valid for" 422 unprocessable /names $B "$ADMIN_TOKEN" POST \
	/v1/listeners/www/bindings "${JSON[@]}" -H "If-Match: $E0" -d "{\"certificate\":\"$NEW1\",\"names\":[\"www.hsmtls.test\"]}"
refused "bind a certificate the file already serves (p256) again" 409 conflict /certificate $B "$ADMIN_TOKEN" POST \
	/v1/listeners/www/bindings "${JSON[@]}" -H "If-Match: $E0" -d "{\"certificate\":\"$P256_FP\"}"
refused "bind a P-256 certificate for www.hsmtls.test, which the file's P-256 chain serves (name clash)" 409 conflict \
	/names $B "$ADMIN_TOKEN" POST /v1/listeners/www/bindings "${JSON[@]}" -H "If-Match: $E0" -d "{\"certificate\":\"$WWW\"}"
control device-error
expect_error "bind while the token fails every signature (the test signature of the first key fails)" 422 unprocessable None \
	$B "$ADMIN_TOKEN" POST /v1/listeners/www/bindings "${JSON[@]}" -H "If-Match: $E0" -d "{\"certificate\":\"$NEW1\"}"
control present
check_eq "... and with the token working again, the listeners and the handshakes are as before" "$W0" "$(world)"
refused "replace a certificate the listener does not serve" 404 not_found fingerprint $BF "$ADMIN_TOKEN" PUT \
	"/v1/listeners/www/bindings/$NEW2" "${JSON[@]}" -H "If-Match: $E0" -d "{\"certificate\":\"$NEW1\"}"
refused "replace without If-Match" 428 precondition_required If-Match $BF "$ADMIN_TOKEN" PUT \
	"/v1/listeners/www/bindings/$P256_FP" "${JSON[@]}" -d "{\"certificate\":\"$NEW1\"}"
refused "replace with a stale If-Match" 412 precondition_failed If-Match $BF "$ADMIN_TOKEN" PUT \
	"/v1/listeners/www/bindings/$P256_FP" "${JSON[@]}" -H 'If-Match: "0"' -d "{\"certificate\":\"$NEW1\"}"
refused "replace the P-256 file chain by a certificate for names it is not valid for" 422 unprocessable /names $BF \
	"$ADMIN_TOKEN" PUT "/v1/listeners/www/bindings/$P256_FP" "${JSON[@]}" -H "If-Match: $E0" \
	-d "{\"certificate\":\"$NEW1\",\"names\":[\"www.hsmtls.test\"]}"
expect_error "replace with the read token" 403 forbidden None $BF "$READ_TOKEN" PUT "/v1/listeners/www/bindings/$P256_FP" \
	"${JSON[@]}" -H "If-Match: $E0" -d "{\"certificate\":\"$NEW1\"}"
refused "unbind a certificate the listener does not serve" 404 not_found fingerprint $BF "$ADMIN_TOKEN" DELETE \
	"/v1/listeners/www/bindings/$NEW1" -H "If-Match: $E0"
refused "unbind without If-Match" 428 precondition_required If-Match $BF "$ADMIN_TOKEN" DELETE \
	"/v1/listeners/www/bindings/$RSA_FP"
refused "unbind with a stale If-Match" 412 precondition_failed If-Match $BF "$ADMIN_TOKEN" DELETE \
	"/v1/listeners/www/bindings/$RSA_FP" -H 'If-Match: "1", "2"'
expect_error "unbind with the read token" 403 forbidden None $BF "$READ_TOKEN" DELETE "/v1/listeners/www/bindings/$RSA_FP" \
	-H "If-Match: $E0"
ES=$(etag_of solo)
expect_error "unbind the only chain of listener solo" 409 conflict fingerprint $BF "$ADMIN_TOKEN" DELETE \
	"/v1/listeners/solo/bindings/$P384_FP" -H "If-Match: $ES"
check_eq "... solo still serves its chain" "$P384_FP" "$(served api.hsmtls.test "$SOLO")"
check_eq "after the refused changes the listeners and handshakes are as at the start" "$W0" "$(world)"

# ------------------------------------------------------------ bind, with a connection open
section "bind, with a connection open"
# A connection opened before the change, passing data through the proxy.
coproc OLD { python3 "$HOLD" "$PORT" www.hsmtls.test "$HSMTLS_CA"; }
E2E_PIDS+=("$OLD_PID")
read -r -t 20 line <&"${OLD[0]}" || line="nothing"
check_eq "a connection opened before the bind gets the file P-256 chain" "fp $P256_FP" "$line"
echo "ping before" >&"${OLD[1]}"
read -r -t 20 line <&"${OLD[0]}" || line="nothing"
check_eq "... and passes data" "pong before" "$line"
GEN_LOG_OFF=$(stat -c %s "$DAEMON_LOG")
expect "bind new1 (its own names)" 201 $B "$ADMIN_TOKEN" POST /v1/listeners/www/bindings "${JSON[@]}" -H "If-Match: $E0" \
	-d "{\"certificate\":\"$NEW1\"}"
E1=$(jq_ 'd["etag"]')
check_eq "the answer: the listener with its new bindings" "$P256_FP:config $RSA_FP:config $NEW1:api:['new.hsmtls.test']" \
	"$(jq_ '" ".join(b["certificate"] + ":" + b["source"] + (":" + str(b["names"]) if b["source"] == "api" else "") for b in d["bindings"])')"
check_eq "the answer's ETag header is its new etag" "$E1" "$(hdr_etag)"
check_not "the new ETag differs from the old one" test "$E1" = "$E0"
check_eq "GET /v1/listeners/www has the new ETag" "$E1" "$(etag_of www)"
check_eq "the next handshake for new.hsmtls.test gets new1" "$NEW1" "$(served new.hsmtls.test)"
check_eq "www.hsmtls.test still gets the file P-256 chain" "$P256_FP" "$(served www.hsmtls.test)"
check_eq "www.hsmtls.test with RSA signatures only still gets the file RSA chain" "$RSA_FP" "$(served_rsa www.hsmtls.test)"
echo "ping after" >&"${OLD[1]}"
read -r -t 20 line <&"${OLD[0]}" || line="nothing"
check_eq "the connection opened before the bind still passes data" "pong after" "$line"
released() { tail -c +$((GEN_LOG_OFF + 1)) "$DAEMON_LOG" | grep -q 'listener www: credentials generation 1 released'; }
check_not "the old credentials are not released while that connection uses them" released
echo quit >&"${OLD[1]}"
check "... and are released once it closed" wait_until 10 released
expect_error "bind with the ETag from before the bind (stale now)" 412 precondition_failed If-Match $B "$ADMIN_TOKEN" POST \
	/v1/listeners/www/bindings "${JSON[@]}" -H "If-Match: $E0" -d "{\"certificate\":\"$AB\"}"
W1=$(world)
WREF=$W1
refused "bind a second P-256 certificate for new.hsmtls.test (clash with new1)" 409 conflict /names $B "$ADMIN_TOKEN" POST \
	/v1/listeners/www/bindings "${JSON[@]}" -H "If-Match: $E1" -d "{\"certificate\":\"$CLASH\"}"
check_eq "... nothing changed" "$W1" "$(world)"
refused "bind new1 again" 409 conflict /certificate $B "$ADMIN_TOKEN" POST /v1/listeners/www/bindings "${JSON[@]}" \
	-H "If-Match: $E1" -d "{\"certificate\":\"$NEW1\"}"
expect_error "DELETE /v1/certificates/new1 while it is bound" 409 conflict fingerprint /v1/certificates/{fingerprint} \
	"$ADMIN_TOKEN" DELETE "/v1/certificates/$NEW1"
expect "GET /v1/certificates/new1" 200 /v1/certificates/{fingerprint} "$READ_TOKEN" GET "/v1/certificates/$NEW1"
check_eq "the certificate lists the listener that serves it" "www ['new.hsmtls.test']" \
	"$(jq_ '" ".join(l["listener"] + " " + str(l["names"]) for l in d["listeners"])')"

# Names given: only a.hsmtls.test of a certificate for a and b.
expect "bind ab for a.hsmtls.test only" 201 $B "$ADMIN_TOKEN" POST /v1/listeners/www/bindings "${JSON[@]}" \
	-H "If-Match: $E1" -d "{\"certificate\":\"$AB\",\"names\":[\"a.hsmtls.test\"]}"
E2=$(jq_ 'd["etag"]')
check_eq "a.hsmtls.test gets ab" "$AB" "$(served a.hsmtls.test)"
check_eq "b.hsmtls.test (not bound) gets the first chain" "$P256_FP" "$(served b.hsmtls.test)"

# ------------------------------------------------------------ the listener's other settings after swaps
section "the listener's other settings after swaps"
stapled=$(printf 'Q\n' | timeout 20 openssl s_client -connect "127.0.0.1:$PORT" -servername www.hsmtls.test -CAfile "$HSMTLS_CA" \
	-status 2>&1 | sed -n 's/^ *Cert Status: //p' | head -n 1)
check_eq "after the swaps the file P-256 chain still staples its OCSP response" good "$stapled"
alpn=$(printf 'Q\n' | timeout 20 openssl s_client -connect "127.0.0.1:$PORT" -servername new.hsmtls.test -CAfile "$HSMTLS_CA" \
	-alpn http/1.1,h2 2>&1 | sed -n 's/^ALPN protocol: //p' | head -n 1)
check_eq "... ALPN: the server's preference (h2)" h2 "$alpn"
off=$(stat -c %s "$DAEMON_LOG")
timeout 20 gnutls-cli --x509cafile="$HSMTLS_CA" --sni-hostname=new.hsmtls.test --verify-hostname=new.hsmtls.test -p "$PORT" \
	--x509certfile "$E2E_DIR/client.pem" --x509keyfile "$E2E_DIR/client.key" 127.0.0.1 </dev/null >/dev/null 2>&1
client_line() { tail -c +$((off + 1)) "$DAEMON_LOG" | grep -q 'listener www: .* key=bind-p256 client="CN=bind-client"'; }
check "... a client certificate from client_ca is verified on the new chain (key bind-p256)" wait_until 10 client_line
off=$(stat -c %s "$DAEMON_LOG")
check_not "... one from another CA is refused (client_ca kept)" \
	timeout 20 gnutls-cli --x509cafile="$HSMTLS_CA" --sni-hostname=new.hsmtls.test --verify-hostname=new.hsmtls.test -p "$PORT" \
	--x509certfile "$E2E_DIR/other-client.pem" --x509keyfile "$E2E_DIR/other-client.key" 127.0.0.1 </dev/null
other_line() { tail -c +$((off + 1)) "$DAEMON_LOG" | grep -Eq 'listener www: handshake with 127\.0\.0\.1:[0-9]+ failed: .*issuer is unknown'; }
check "... refused by the daemon for its issuer" wait_until 10 other_line

# ------------------------------------------------------------ a handshake in flight during a swap
section "a handshake in flight during a swap"
control delay-ms=1500
python3 "$HOLD" "$PORT" new.hsmtls.test "$HSMTLS_CA" --once >"$E2E_DIR/inflight.out" 2>&1 &
INFLIGHT=$!
E2E_PIDS+=("$INFLIGHT")
in_token() { api "$READ_TOKEN" GET /v1/health >/dev/null && [ "$(jq_ 'd["tokens"][0]["sessions_in_use"]')" -ge 1 ]; }
check "a handshake is inside its (slowed) signature on the token" wait_until 10 in_token
expect "replace new1 by new2 meanwhile" 200 $BF "$ADMIN_TOKEN" PUT "/v1/listeners/www/bindings/$NEW1" "${JSON[@]}" \
	-H "If-Match: $E2" -d "{\"certificate\":\"$NEW2\"}"
E3=$(jq_ 'd["etag"]')
check_eq "replaced: new2 serves new.hsmtls.test in new1's place" "$P256_FP $RSA_FP $NEW2:['new.hsmtls.test'] $AB:['a.hsmtls.test']" \
	"$(jq_ '" ".join(b["certificate"] + (":" + str(b["names"]) if b["source"] == "api" else "") for b in d["bindings"])')"
wait "$INFLIGHT"
forget_pid "$INFLIGHT"
check_eq "the handshake in flight finished with the chain it started with (new1) and passed data" "fp $NEW1 pong once" \
	"$(cat "$E2E_DIR/inflight.out")"
control present
check_eq "the next handshake gets new2" "$NEW2" "$(served new.hsmtls.test)"

# ------------------------------------------------------------ replace and unbind file chains
section "replace and unbind file chains"
expect "replace the file P-256 chain by www-api (tombstone)" 200 $BF "$ADMIN_TOKEN" PUT "/v1/listeners/www/bindings/$P256_FP" \
	"${JSON[@]}" -H "If-Match: $E3" -d "{\"certificate\":\"$WWW\"}"
E4=$(jq_ 'd["etag"]')
check_eq "www.hsmtls.test gets www-api" "$WWW" "$(served www.hsmtls.test)"
expect "unbind the file RSA chain" 200 $BF "$ADMIN_TOKEN" DELETE "/v1/listeners/www/bindings/$RSA_FP" -H "If-Match: $E4"
E5=$(jq_ 'd["etag"]')
check_eq "no RSA chain left: bindings www-api new2 ab" "$WWW $NEW2 $AB" "$(jq_ '" ".join(b["certificate"] for b in d["bindings"])')"
check_not "an RSA-only client finds no chain now" test -n "$(served_rsa www.hsmtls.test)"
expect "unbind ab" 200 $BF "$ADMIN_TOKEN" DELETE "/v1/listeners/www/bindings/$AB" -H "If-Match: $E5"
E6=$(jq_ 'd["etag"]')
check_eq "a.hsmtls.test gets the first chain again (www-api)" "$WWW" "$(served a.hsmtls.test)"
expect "bind the unbound file RSA chain again" 201 $B "$ADMIN_TOKEN" POST /v1/listeners/www/bindings "${JSON[@]}" \
	-H "If-Match: $E6" -d "{\"certificate\":\"$RSA_FP\"}"
E7=$(jq_ 'd["etag"]')
check_eq "it is the file's chain again (source config), last" "$WWW:api $NEW2:api $RSA_FP:config" \
	"$(jq_ '" ".join(b["certificate"] + ":" + b["source"] for b in d["bindings"])')"
check_eq "RSA-only clients get it" "$RSA_FP" "$(served_rsa www.hsmtls.test)"
expect "unbind it again" 200 $BF "$ADMIN_TOKEN" DELETE "/v1/listeners/www/bindings/$RSA_FP" -H "If-Match: $E7"
check_eq "state.db: rows for www in order, the replaced and unbound file chains as tombstones" \
	"$WWW|api $NEW2|api $P256_FP|tombstone $RSA_FP|tombstone" \
	"$(sqlite3 "$STATE/state.db" "SELECT certificate || '|' || kind FROM bindings WHERE listener = 'www' ORDER BY pos" | tr '\n' ' ' | sed 's/ $//')"

# ------------------------------------------------------------ audit
section "audit"
expect "GET /v1/audit" 200 /v1/audit "$READ_TOKEN" GET '/v1/audit?limit=1000'
check_eq "audit: the bind, replace and unbind are recorded with the new ETag" "True True True" \
	"$(jq_ '" ".join(str(any(r["action"] == a and r["status"] == s and "etag=" in r["detail"] for r in d["records"])) for a, s in (("binding.add", 201), ("binding.replace", 200), ("binding.delete", 200)))')"
check_eq "audit: the refused changes are recorded (428, 412, 409, 422, 403)" "True True True True True" \
	"$(jq_ '" ".join(str(any(r["action"].startswith("binding.") and r["status"] == s for r in d["records"])) for s in (428, 412, 409, 422))') $(jq_ 'str(any(r["status"] == 403 and r["who"] == "token:viewer" and "/bindings" in r["path"] for r in d["records"]))')"

# ------------------------------------------------------------ restart
section "restart"
BEFORE=$(world)
stop_daemon 10
check_eq "SIGTERM: exit 0" 0 "$DAEMON_RC"
start_bind
check_grep "at start the bindings of state.db are applied" "$DAEMON_LOG" 'listener www: bindings from state.db applied over the configuration file'
check_eq "after SIGTERM and a start: the same listeners (bindings, ETags) and handshakes" "$BEFORE" "$(world)"

# ------------------------------------------------------------ README's lifecycle, as written
section "README's lifecycle, as written"
LC=$E2E_DIR/lifecycle
mkdir -p "$LC"
cp "$HSMTLS_CA" "$LC/ca.pem"
cp "$TOKEN_DIR/ca.key" "$LC/ca.key"
sed -n '/^<!-- lifecycle:begin -->$/,/^<!-- lifecycle:end -->$/p' "$SRCDIR/README.md" | sed '1,2d;$d' | sed '$d' >"$LC/lifecycle.sh"
check_grep "README's lifecycle block was extracted (it ends with the gnutls-cli handshake)" "$LC/lifecycle.sh" '^gnutls-cli '
coproc OLD { python3 "$HOLD" "$PORT" www.hsmtls.test "$HSMTLS_CA"; }
E2E_PIDS+=("$OLD_PID")
read -r -t 20 line <&"${OLD[0]}" || line="nothing"
check_eq "a connection opened before the lifecycle run" "fp $WWW" "$line"
rc=0
(cd "$LC" && SOCK=$SOCK T=$ADMIN_TOKEN TOKEN=demo LISTENER=www PORT=$PORT bash -e lifecycle.sh) >"$LC/out" 2>"$LC/err" || rc=$?
check_eq "README's lifecycle block runs as written" 0 "$rc"
[ "$rc" = 0 ] || sed 's/^/#   /' "$LC/err" | tail -n 20
LFP=$(fp_of "$LC/www.pem" 2>/dev/null)
check_eq "its last line, the gnutls-cli handshake, shows the new certificate's fingerprint" "$LFP" "$(tail -n 1 "$LC/out" | tr -d ' ')"
check_grep "... the certificate the block uploaded and bound" "$LC/out" "\"certificate\":\"$LFP\",\"names\":\\[\"www.example.com\"\\],\"source\":\"api\""
echo "ping lifecycle" >&"${OLD[1]}"
read -r -t 20 line <&"${OLD[0]}" || line="nothing"
check_eq "the connection opened before it still passes data" "pong lifecycle" "$line"
echo quit >&"${OLD[1]}"

# ------------------------------------------------------------ twenty replacements under load
section "twenty replacements under load"
for i in $(seq 1 20); do
	sign new "r$i" >"$E2E_DIR/r$i.fp"
	upload "r$i"
done
LEAVES=$E2E_DIR/leaves.txt
: >"$LEAVES"
"$HSMTLS_LOAD" --connect "127.0.0.1:$PORT" --sni new.hsmtls.test --cafile "$HSMTLS_CA" --threads 4 --duration 600 \
	--no-confirm --leaf-log "$LEAVES" --json >"$E2E_DIR/load.json" 2>"$E2E_DIR/load.err" &
LOAD=$!
E2E_PIDS+=("$LOAD")
some_leaves() { [ "$(wc -l <"$LEAVES")" -ge "$1" ]; }
wait_until 30 some_leaves 5 || fail "hsmtls-load made no handshakes"
cur=$NEW2
etag=$(etag_of www)
fails=0
for i in $(seq 1 20); do
	next=$(cat "$E2E_DIR/r$i.fp")
	code=$(api "$ADMIN_TOKEN" PUT "/v1/listeners/www/bindings/$cur" "${JSON[@]}" -H "If-Match: $etag" -d "{\"certificate\":\"$next\"}")
	[ "$code" = 200 ] || { fails=$((fails + 1)); note "replacement $i: $code $(head -c 200 "$BODY")"; }
	etag=$(jq_ 'd["etag"]')
	cur=$next
	n=$(wc -l <"$LEAVES")
	wait_until 20 some_leaves $((n + 2)) || { fail "no handshakes after replacement $i"; break; } # a few on each chain
	daemon_running || { fail "the daemon exited during the replacements"; break; }
done
check_eq "twenty replacements under load: each 200" 0 "$fails"
kill -INT "$LOAD" 2>/dev/null
rc=0
wait "$LOAD" || rc=$?
forget_pid "$LOAD"
check_eq "hsmtls-load: exit 0 (no failed connection)" 0 "$rc"
check_eq "hsmtls-load: zero failed handshakes and connections" "0 0" \
	"$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["errors_handshake"], d["errors"])' "$E2E_DIR/load.json")"
note "hsmtls-load: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["handshakes"], "handshakes,", d["handshakes_per_s"], "per s, first error:", d["first_error"])' "$E2E_DIR/load.json")"
allowed=$(printf '%s\n' "$NEW2" $(cat "$E2E_DIR"/r*.fp))
bad=$(grep -cvxF -f <(printf '%s\n' "$allowed") "$LEAVES")
total=$(wc -l <"$LEAVES")
distinct=$(sort -u "$LEAVES" | wc -l)
check_eq "each of the $total handshakes got one of the chains bound during the run (none other)" 0 "$bad"
if [ "$distinct" -ge 10 ]; then ok "handshakes saw $distinct different chains (old and new as they were swapped)"
else fail "handshakes saw only $distinct different chains"; fi
check_eq "the last replacement serves now" "$cur" "$(served new.hsmtls.test)"
note "under load: $total handshakes, $distinct chains, load average $(cut -d' ' -f1-3 /proc/loadavg)"

stop_daemon 10
check_eq "SIGTERM at the end: exit 0" 0 "$DAEMON_RC"
check_not "no sanitizer report in the daemon logs" grep -q 'ERROR: AddressSanitizer\|runtime error:' "$E2E_DIR"/hsmtlsd-*.log
check_contract
e2e_finish
