#!/usr/bin/env bash
# e2e: hsmtlsctl against the real daemon. The key and certificate life
# cycle with the client alone (generate a key on the token, a CSR signed on
# it, the test CA signs it, upload, list, show, delete), every read
# subcommand (live, whoami, health, tokens, keys, certificates, listeners,
# usage, metrics through promtool, audit, audit verify), the exit codes (1
# with the reason from the JSON error body, 2 for a bad command line, 3 for
# no answer, 4 for a broken audit chain), the token from a file and from
# the environment, HTTPS with a client certificate; bind, replace (seen by
# a gnutls-cli handshake) and unbind against the daemon.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=lib-admin.sh
. "$(dirname "$0")/lib-admin.sh"

need_tools curl certtool openssl sqlite3 promtool python3 gnutls-cli
python3 -c 'import jsonschema, yaml' 2>/dev/null || skip "python3-jsonschema and python3-yaml are needed (hsm-config/install-deps)"
[ -x "${HSMTLSCTL:-}" ] || bail "HSMTLSCTL=${HSMTLSCTL:-} is not an executable (build first)"
e2e_init
TOKEN_DIR=$E2E_DIR/token
out=$("$SRCDIR/hsm-config/provision" "$TOKEN_DIR" --quiet --file-keys --client-keys 2>&1) || {
	printf '%s\n' "$out" | sed 's/^/#   /'
	bail "hsm-config/provision $TOKEN_DIR failed"
}
# shellcheck disable=SC1091
. "$TOKEN_DIR/uris.env"
start_backend
slowtoken_control # the token can be pulled (health: not ready)

admin_init
printf '%s\n' "$ADMIN_TOKEN" >"$E2E_DIR/admin.token"
chmod 600 "$E2E_DIR/admin.token"

conf=$E2E_DIR/ctl.conf
printf '[global]\nlog_level = info\ndrain_timeout = 2s\nstate_dir = %s\n\n' "$STATE" >"$conf"
write_token_section "$conf" demo "$SLOWTOKEN"
write_listener "$conf" www
write_admin_section "$conf"
start_daemon "$conf" "$E2E_DIR/hsmtlsd-1.log" || bail "daemon did not start"
wait_until 10 grep -q 'admin: listening on' "$DAEMON_LOG" || bail "the admin API did not start"

OUT=$E2E_DIR/ctl.out
ERR=$E2E_DIR/ctl.err
# ctl [hsmtlsctl args]: runs it (admin token from its file); sets RC, output in $OUT, errors in $ERR
ctl() {
	RC=0
	"$HSMTLSCTL" --socket "$SOCK" --token-file "$E2E_DIR/admin.token" "$@" >"$OUT" 2>"$ERR" || RC=$?
}
jo() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {"d": d}))' "$OUT" "$1"; }
done_ok() { # DESC: exit 0
	if [ "$RC" = 0 ]; then ok "$1"; else fail "$1: exit $RC: $(head -c 300 "$ERR")"; fi
}

# ------------------------------------------------------------ reads
ctl live
done_ok "hsmtlsctl live"
check_eq "live: ok" True "$(jo 'd["status"] == "ok" or bool(d)')"
RC=0
HSMTLSCTL_TOKEN=$READ_TOKEN "$HSMTLSCTL" --socket "$SOCK" whoami >"$OUT" 2>"$ERR" || RC=$?
done_ok "hsmtlsctl whoami with the token in \$HSMTLSCTL_TOKEN"
check_eq "whoami: token:viewer, role read" "token:viewer read" "$(jo 'd["identity"] + " " + d["role"]')"
ctl whoami
check_eq "whoami with --token-file: token:ops, role admin" "token:ops admin" "$(jo 'd["identity"] + " " + d["role"]')"
ctl health
done_ok "hsmtlsctl health"
check_eq "health: ready" True "$(jo 'd["ready"]')"
ctl tokens
done_ok "hsmtlsctl tokens"
check_eq "tokens: demo is listed" True "$(jo 'any(t["name"] == "demo" for t in d["tokens"])')"
ctl tokens demo
check_eq "tokens demo: its label" "$HSMTLS_TOKEN_LABEL" "$(jo 'd["label"]')"
ctl keys list
done_ok "hsmtlsctl keys list"
check_eq "keys list: p256 is on the token" True "$(jo 'any(k["label"] == "p256" for k in d["keys"])')"
ctl listeners
check_eq "listeners: www" True "$(jo 'any(l["name"] == "www" for l in d["listeners"])')"
ctl listeners www
check_eq "listeners www: its ETag on stderr" 1 "$(grep -c '^ETag: "' "$ERR")"
ETAG=$(sed -n 's/^ETag: //p' "$ERR")
ctl usage
done_ok "hsmtlsctl usage"
check_eq "usage: the www listener is listed" True "$(jo 'any(l["name"] == "www" for l in d["listeners"])')"
ctl metrics
done_ok "hsmtlsctl metrics"
check "metrics: promtool check metrics accepts them" sh -c "promtool check metrics <'$OUT'"

# ------------------------------------------------------------ the life cycle
ctl keys generate --token demo --label ctl-p256 --type ecdsa --curve P-256 --id c7c7
done_ok "hsmtlsctl keys generate (ecdsa P-256 on the token)"
check_eq "keys generate: label, id, sensitive, not extractable" "ctl-p256 c7c7 True False" \
	"$(jo 'd["label"] + " " + d["id"] + " " + str(d["sensitive"]) + " " + str(d["extractable"])')"
SPKI=$(jo 'd["spki_sha256"]')
check "check-token: ctl-p256 is on the token" grep -q '^ctl-p256 ' <<<"$("$SRCDIR/hsm-config/check-token" "$TOKEN_DIR" 2>&1)"
ctl keys generate --token demo --label ctl-p256 --type ecdsa
check_eq "keys generate with a label already there: exit 1" 1 "$RC"
check "... the reason from the JSON error body on stderr" grep -q 'POST /v1/keys: 409 conflict: .*(field /label)' "$ERR"
ctl keys show demo c7c7
check_eq "keys show demo c7c7" "0 ctl-p256" "$RC $(jo 'd["label"]')"
ctl keys csr demo c7c7 --subject CN=ctl.hsmtls.test --dns ctl.hsmtls.test --dns www.ctl.hsmtls.test --ip 192.0.2.7
done_ok "hsmtlsctl keys csr"
cp "$OUT" "$E2E_DIR/ctl.csr"
check "keys csr: a PEM request that verifies (openssl req -verify)" openssl req -in "$E2E_DIR/ctl.csr" -noout -verify
check "keys csr: with its DNS names" sh -c "openssl req -in '$E2E_DIR/ctl.csr' -noout -text | grep -q 'DNS:www.ctl.hsmtls.test'"
printf 'tls_www_server\nsigning_key\nexpiration_days = 30\nhonor_crq_extensions\n' >"$E2E_DIR/leaf.tmpl"
certtool --generate-certificate --load-request "$E2E_DIR/ctl.csr" --load-ca-privkey "$TOKEN_DIR/ca.key" \
	--load-ca-certificate "$HSMTLS_CA" --template "$E2E_DIR/leaf.tmpl" --outfile "$E2E_DIR/ctl.pem" >/dev/null 2>&1 ||
	bail "certtool could not sign the CSR"
cat "$E2E_DIR/ctl.pem" "$HSMTLS_CA" >"$E2E_DIR/ctl-chain.pem"
FP=$(openssl x509 -in "$E2E_DIR/ctl.pem" -outform DER | sha256sum | cut -d' ' -f1)
ctl certificates upload "$E2E_DIR/ctl-chain.pem" --store both
done_ok "hsmtlsctl certificates upload --store both"
check_eq "upload: its fingerprint, stored on the token and in the state database" "$FP True" \
	"$(jo 'd["fingerprint"] + " " + str(sorted(d["stored"]) == ["state", "token"])')"
ctl certificates list
check_eq "certificates list: the uploaded chain" True "$(jo "any(c['fingerprint'] == '$FP' for c in d['certificates'])")"
ctl certificates show "$FP"
check_eq "certificates show: its subject" True "$(jo '"ctl.hsmtls.test" in d["subject"]')"
# ------------------------------------------------------------ bind, replace, unbind
# Against the daemon: the uploaded chain bound to www, replaced by a second
# certificate for the same key, unbound; each with the listener's ETag.
etag() { ctl listeners www; sed -n 's/^ETag: //p' "$ERR"; }
fps() { ctl listeners www; jo '" ".join(b["certificate"] for b in d["bindings"])'; }
ctl bind www "$FP" --name ctl.hsmtls.test --if-match '"stale"'
check_eq "bind with a stale If-Match: exit 1" 1 "$RC"
check "... the daemon's 412 on stderr" grep -Eq 'POST /v1/listeners/www/bindings: 412 [a-z_]+: ' "$ERR"
ctl bind www "$FP"
check_eq "bind without --if-match: the daemon's 428 is exit 1" 1 "$RC"
check "... with its reason" grep -q '428 precondition_required: .*(field If-Match)' "$ERR"
ctl bind www "$FP" --name ctl.hsmtls.test --if-match "$(etag)"
done_ok "hsmtlsctl bind"
check "bind: www serves the uploaded chain" grep -qw "$FP" <<<"$(fps)"
certtool --generate-certificate --load-request "$E2E_DIR/ctl.csr" --load-ca-privkey "$TOKEN_DIR/ca.key" \
	--load-ca-certificate "$HSMTLS_CA" --template "$E2E_DIR/leaf.tmpl" --outfile "$E2E_DIR/ctl2.pem" >/dev/null 2>&1 ||
	bail "certtool could not sign the CSR again"
cat "$E2E_DIR/ctl2.pem" "$HSMTLS_CA" >"$E2E_DIR/ctl2-chain.pem"
FP2=$(openssl x509 -in "$E2E_DIR/ctl2.pem" -outform DER | sha256sum | cut -d' ' -f1)
ctl certificates upload "$E2E_DIR/ctl2-chain.pem"
done_ok "hsmtlsctl certificates upload (a second certificate for the key)"
ctl replace www "$FP" "$FP2" --if-match "$(etag)"
done_ok "hsmtlsctl replace"
check_eq "replace: www serves the second, not the first" "1 0" "$(F=$(fps); echo "$(grep -cw "$FP2" <<<"$F") $(grep -cw "$FP" <<<"$F")")"
SERVED=$(gnutls-cli --x509cafile "$HSMTLS_CA" --sni-hostname ctl.hsmtls.test --verify-hostname ctl.hsmtls.test --print-cert \
	-p "$(listener_port www)" 127.0.0.1 </dev/null 2>/dev/null | sed -n '/-BEGIN CERTIFICATE-/,/-END CERTIFICATE-/p' | sed '/-END CERTIFICATE-/q' |
	openssl x509 -outform DER 2>/dev/null | sha256sum | cut -d' ' -f1)
check_eq "replace: a gnutls-cli handshake for ctl.hsmtls.test gets the second certificate" "$FP2" "$SERVED"
ctl unbind www "$FP2" --if-match "$(etag)"
done_ok "hsmtlsctl unbind"
check_eq "unbind: www no longer serves it" 0 "$(grep -cw "$FP2" <<<"$(fps)")"
ctl certificates delete "$FP2"
done_ok "hsmtlsctl certificates delete (the second, unbound)"

ctl keys delete demo c7c7 --spki-sha256 "$SPKI"
check_eq "keys delete while a certificate is stored for it: exit 1 (409)" 1 "$RC"
check "... 409 on stderr" grep -q '409 conflict' "$ERR"
ctl certificates delete "$FP"
done_ok "hsmtlsctl certificates delete"
ctl keys delete demo c7c7 --spki-sha256 "$(printf '0%.0s' $(seq 64))"
check_eq "keys delete with another SPKI hash: exit 1 (412)" 1 "$RC"
check "... 412 on stderr" grep -q '412 precondition_failed' "$ERR"
ctl keys delete demo c7c7 --spki-sha256 "$SPKI"
done_ok "hsmtlsctl keys delete with its SPKI hash"
check_not "check-token: ctl-p256 is gone" grep -q '^ctl-p256 ' <<<"$("$SRCDIR/hsm-config/check-token" "$TOKEN_DIR" 2>&1)"

# ------------------------------------------------------------ exit codes, errors
RC=0
"$HSMTLSCTL" --socket "$SOCK" keys list >"$OUT" 2>"$ERR" || RC=$?
check_eq "no token: exit 1" 1 "$RC"
check "... 401 unauthorized with the daemon's reason" grep -q 'GET /v1/keys: 401 unauthorized: .*(field Authorization)' "$ERR"
RC=0
HSMTLSCTL_TOKEN=$READ_TOKEN "$HSMTLSCTL" --socket "$SOCK" keys generate --token demo --label x --type ed25519 >"$OUT" 2>"$ERR" || RC=$?
check_eq "a read token asking for a change: exit 1 (403)" "1 1" "$RC $(grep -c '403 forbidden' "$ERR")"
ctl keys frobnicate
check_eq "an unknown subcommand: exit 2" 2 "$RC"
ctl keys generate --token demo
check_eq "keys generate without --label: exit 2" 2 "$RC"
RC=0
"$HSMTLSCTL" --socket "$E2E_DIR/nothing.sock" live >"$OUT" 2>"$ERR" || RC=$?
check_eq "no daemon on the socket: exit 3" 3 "$RC"
check "... saying so" grep -q 'nothing.sock' "$ERR"
check_not "the token is never taken from the command line (no --token option)" "$HSMTLSCTL" --token "$ADMIN_TOKEN" live

# ------------------------------------------------------------ health: not ready
control removed
not_ready() { ctl health; [ "$RC" = 4 ]; }
check "the token pulled (slowtoken: removed): hsmtlsctl health exits 4 (not ready)" wait_until 30 not_ready
check_eq "... printing the answer: not ready, token demo not present, with a reason" "False False True" \
	"$(jo 'str(d["ready"]) + " " + str(d["tokens"][0]["present"]) + " " + str(bool(d["tokens"][0]["reason"]))')"
check "... the 503 answer matches api/openapi.yaml" "$SRCDIR/tests/e2e/oas-check.py" "$SRCDIR/api/openapi.yaml" "$OUT" get \
	/v1/health 503
control present
# The token's recovery runs on use: a handshake (its signature) brings the
# login back.
ready_again() {
	timeout 10 gnutls-cli --no-ca-verification -p "$(listener_port www)" 127.0.0.1 </dev/null >/dev/null 2>&1
	ctl health
	cp "$OUT" "$E2E_DIR/health.last"
	[ "$RC" = 0 ]
}
if wait_until 60 ready_again; then
	ok "the token back and used: hsmtlsctl health exits 0 again (ready)"
else
	fail "the token back and used: hsmtlsctl health exits $RC: $(tr -d '\n' <"$E2E_DIR/health.last" | head -c 400)"
fi

# ------------------------------------------------------------ audit
ctl audit --limit 1000
done_ok "hsmtlsctl audit"
check_eq "audit: the key generation by token:ops" True "$(jo 'any(r["action"] == "key.generate" and r["who"] == "token:ops" and r["status"] == 201 for r in d["records"])')"
ctl audit --after 1 --limit 1
check_eq "audit --after 1 --limit 1: record 2" 2 "$(jo 'd["records"][0]["seq"]')"
ctl audit verify
check_eq "audit verify: exit 0, ok" "0 True" "$RC $(jo 'd["ok"]')"
stop_daemon 10
sqlite3 "$STATE/state.db" "UPDATE audit SET status = 200 WHERE seq = 2" || bail "sqlite3 update failed"
start_daemon "$conf" "$E2E_DIR/hsmtlsd-2.log" || bail "daemon did not start again"
wait_until 10 grep -q 'admin: listening on' "$DAEMON_LOG" || bail "the admin API did not start again"
ctl audit verify
check_eq "audit verify after record 2 was altered: exit 4" 4 "$RC"
check "... naming record 2" grep -q 'broken at record 2' "$ERR"
stop_daemon 10

# ------------------------------------------------------------ HTTPS with a client certificate
SUBJ=$(certtool -i --infile "$TOKEN_DIR/file-client.pem" | sed -n 's/^[[:space:]]*Subject: //p' | head -1)
conf=$E2E_DIR/ctl-tls.conf
printf '[global]\nlog_level = info\ndrain_timeout = 2s\nstate_dir = %s\n\n' "$E2E_DIR/state2" >"$conf"
write_token_section "$conf"
write_listener "$conf" www
cat >>"$conf" <<CONF
[admin]
listen = 127.0.0.1:0
tls_cert = $HSMTLS_FILECERT_P256
tls_key = $HSMTLS_FILEKEY_P256
client_ca = $HSMTLS_CA
identity = admin:$SUBJ
CONF
start_daemon "$conf" "$E2E_DIR/hsmtlsd-3.log" || bail "daemon did not start with HTTPS"
wait_until 10 grep -q 'admin: listening on' "$DAEMON_LOG" || bail "the HTTPS admin API did not start"
APORT=$(sed -n 's/.*admin: listening on 127.0.0.1:\([0-9]*\) (HTTPS).*/\1/p' "$DAEMON_LOG" | tail -1)
tctl() {
	RC=0
	"$HSMTLSCTL" --url "https://127.0.0.1:$APORT" --cacert "$HSMTLS_CA" "$@" >"$OUT" 2>"$ERR" || RC=$?
}
tctl --cert "$HSMTLS_FILE_CLIENT_CERT" --key "$HSMTLS_FILE_CLIENT_KEY" whoami
check_eq "HTTPS with the admin CA's client certificate: identity $SUBJ, role admin" "0 cert:$SUBJ admin" \
	"$RC $(jo 'd["identity"] + " " + d["role"]')"
tctl --cert "$HSMTLS_FILE_CLIENT_CERT" --key "$HSMTLS_FILE_CLIENT_KEY" keys list
check_eq "HTTPS: keys list" "0 True" "$RC $(jo 'any(k["label"] == "p256" for k in d["keys"])')"
tctl whoami
check_eq "HTTPS without a client certificate or token: exit 1 (401)" "1 1" "$RC $(grep -c '401 unauthorized' "$ERR")"
RC=0
"$HSMTLSCTL" --url "https://127.0.0.1:$APORT" --cacert "$HSMTLS_OTHER_CA" live >"$OUT" 2>"$ERR" || RC=$?
check_eq "HTTPS, a server certificate from another CA: exit 3" 3 "$RC"
stop_daemon 10

e2e_finish
