#!/usr/bin/env bash
# e2e: session resumption stays on the listener that made the session and
# under its client-auth policy; a resumed session keeps (and re-checks) its
# client identity; certificate purposes are checked both ways. openssl
# s_client -sess_out / -sess_in (which offers a saved session to any port),
# TLS 1.3 and 1.2, against one daemon with four listeners (p256 on the
# token, PROXY v2 to the backend):
#   open   client_auth = none
#   req    client_auth = require, client_ca = the test CA
#   req2   client_auth = require, client_ca = the other CA
#   opt    client_auth = optional, client_ca = the test CA
# and two unix-socket listeners serving a connector each (srv-co with a
# server certificate that has only the clientAuth purpose, srv-good with
# the normal one).
# Checks: a session resumes on its own listener with no token operation at
# all (usage counters), and a resumed client-auth session reports the same
# client identity (PP2_CLIENT_CERT_SESS, verify 0, CN, subject, SHA-256);
# a session offered to another listener gets a full handshake (the token
# signs once) that demands a certificate (116 / 40); a session whose client
# certificate has expired since is not resumed; a client certificate with
# only serverAuth is refused, and so is a server certificate with only
# clientAuth (connector); the connector never resumes.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=lib-mtls.sh
. "$(dirname "$0")/lib-mtls.sh"

need_tools openssl certtool
e2e_init
provision_token_with --client-keys
start_backend

# ------------------------------------------------------- certificates
# mk_cert NAME TEMPLATE-LINES: a P-256 file key CERTS/NAME.key and its
# certificate CERTS/NAME-chain.pem (leaf, then the CA) from the test CA.
CERTS=$E2E_DIR/certs
mkdir -p "$CERTS"
mk_cert() {
	local name=$1
	certtool --generate-privkey --key-type=ecdsa --curve=secp256r1 --pkcs8 --password '' --no-text \
		--outfile "$CERTS/$name.key" >/dev/null 2>&1 || bail "certtool: key for $name"
	printf '%s\n' "$2" >"$CERTS/$name.tmpl"
	certtool --generate-certificate --load-privkey "$CERTS/$name.key" --load-ca-privkey "$TOKEN_DIR/ca.key" \
		--load-ca-certificate "$HSMTLS_CA" --template "$CERTS/$name.tmpl" --no-text \
		--outfile "$CERTS/$name.pem" >/dev/null 2>&1 || bail "certtool: certificate for $name"
	cat "$CERTS/$name.pem" "$HSMTLS_CA" >"$CERTS/$name-chain.pem"
}
mk_cert serveronly-client 'organization = "hsmtls test"
cn = "serveronly-client"
email = "serveronly@hsmtls.test"
tls_www_server
signing_key
expiration_days = 30'
mk_cert clientonly-server 'cn = "www.hsmtls.test"
dns_name = "www.hsmtls.test"
tls_www_client
signing_key
expiration_days = 30'
certtool -i --infile "$CERTS/serveronly-client.pem" | grep -A1 'Key Purpose' | grep -q 'TLS WWW Server' ||
	bail "serveronly-client.pem lacks the serverAuth purpose"
certtool -i --infile "$CERTS/clientonly-server.pem" | grep -A1 'Key Purpose' | grep -q 'TLS WWW Client' ||
	bail "clientonly-server.pem lacks the clientAuth purpose"

# ------------------------------------------------------------- the daemon
conf=$E2E_DIR/resumption.conf
printf '[global]\nlog_level = info\ndrain_timeout = 5s\n\n' >"$conf"
write_token_section "$conf"
for l in open:none: req:require:$HSMTLS_CA req2:require:$HSMTLS_OTHER_CA opt:optional:$HSMTLS_CA; do
	IFS=: read -r name mode ca <<<"$l"
	write_listener "$conf" "$name" "client_auth = $mode" "${ca:+client_ca = $ca}" "proxy_protocol = v2"
done
for l in co:"$CERTS/clientonly-server-chain.pem":"$CERTS/clientonly-server.key" good:"$HSMTLS_CERT_P256":"$HSMTLS_KEY_P256"; do
	IFS=: read -r name cert key <<<"$l"
	cat >>"$conf" <<EOF
[listener srv-$name]
listen = unix:$E2E_DIR/srv-$name.sock
backend = 127.0.0.1:$BACKEND_PORT
cert = $cert
key = $key

[connector to-$name]
listen = 127.0.0.1:0
connect = unix:$E2E_DIR/srv-$name.sock
server_name = www.hsmtls.test
ca_file = $HSMTLS_CA

EOF
done
start_daemon "$conf" || bail "daemon did not start"
wait_ready || bail "daemon did not log 'ready:'"
declare -A P=()
for n in open req req2 opt; do
	P[$n]=$(listener_port "$n")
	[ -n "${P[$n]}" ] || bail "no port for listener $n"
done
for n in co good; do
	P[to-$n]=$(connector_port "to-$n")
	[ -n "${P[to-$n]}" ] || bail "no port for connector to-$n"
done
note "listeners: open ${P[open]}, req ${P[req]}, req2 ${P[req2]}, opt ${P[opt]}; connectors ${P[to-co]} ${P[to-good]}"

# ---------------------------------------------------------------- helpers
# (ossl, reused, answered, show_out, ops: lib-mtls.sh)
FILE_CERT=$HSMTLS_FILE_CLIENT_CERT
BAD=""
FILE_KEY=$HSMTLS_FILE_CLIENT_KEY

SNAP=0
SNAP_FILE=""
# snap: a usage snapshot in the file SNAP_FILE.
snap() {
	SNAP=$((SNAP + 1))
	usage_snapshot "$E2E_DIR/usage.$SNAP" || bail "cannot read the usage counters with SIGUSR1"
	SNAP_FILE=$E2E_DIR/usage.$SNAP
}

# identity_ok CERTFILE BYTE: the PROXY header reports CERTFILE's identity,
# verify 0 and the client byte BYTE; sets BAD.
identity_ok() {
	local v cf=$1
	BAD=""
	v=$(pp_field "$OUT" Client-Byte) && [ "$v" = "$2" ] || BAD+=" Client-Byte=$v (want $2);"
	v=$(pp_field "$OUT" Verify) && [ "$v" = 0 ] || BAD+=" Verify=$v;"
	v=$(pp_field "$OUT" Client-CN) && [ "$v" = "$(cert_cn "$cf")" ] || BAD+=" CN=$v;"
	v=$(pp_field "$OUT" Client-Subject) && [ "$v" = "$(cert_subject "$cf")" ] || BAD+=" Subject=$v;"
	v=$(pp_field "$OUT" Client-SHA256) && [ "$v" = "$(cert_sha256 "$cf")" ] || BAD+=" SHA256=$v;"
	v=$(pp_field "$OUT" TLVs) && [ "$v" = "02 20 e0 e1" ] || BAD+=" TLVs=$v;"
	[ -z "$BAD" ]
}

# refused_full DESC VER LISTENER BEFORE-SNAPSHOT: the connection just made
# was not resumed: the token signed once (a full handshake), the client was
# refused for want of a certificate (116 in TLS 1.3, 40 in TLS 1.2) and
# nothing reached the backend.
refused_full() {
	local desc=$1 ver=$2 after a want=40 bad=""
	[ "$ver" = 1.3 ] && want=116
	snap; after=$SNAP_FILE
	a=$(alert_of "$OUT")
	! reused || bad+=" the client reports 'Reused';"
	! grep -q 'hello from backend' <<<"$OUT" || bad+=" the backend answered;"
	[ "$a" = "$want" ] || bad+=" alert ${a:-none} ($(alert_name "$a")), want $want ($(alert_name "$want"));"
	[ "$(usage_delta "$4" "$after" p256 sign)" = 1 ] ||
		bad+=" $(usage_delta "$4" "$after" p256 sign) server signatures (want 1: a full handshake);"
	if [ -z "$bad" ]; then
		ok "$desc: full handshake (one signature), refused with $a ($(alert_name "$a")), nothing reached the backend"
	else
		fail "$desc:$bad"
		show_out
	fi
}

# --------------------------------- a client certificate that will expire
# Made now with a short life: its sessions are saved at once, resumed while
# it is valid (which works) and again at the end of the test, after it has
# expired (which must not).
EXP_AT=$(($(date +%s) + 25))
mk_cert expiring-client "organization = \"hsmtls test\"
cn = \"expiring-client\"
email = \"expiring@hsmtls.test\"
tls_www_client
signing_key
activation_date = \"$(date -u -d "@$((EXP_AT - 600))" '+%Y-%m-%d %H:%M:%S UTC')\"
expiration_date = \"$(date -u -d "@$EXP_AT" '+%Y-%m-%d %H:%M:%S UTC')\""
EXP_CERT=$CERTS/expiring-client-chain.pem
for v in 1.3 1.2; do
	ossl req "exp-full-$v" "$v" -cert "$EXP_CERT" -key "$CERTS/expiring-client.key" -sess_out "$E2E_DIR/s-exp-$v"
	{ answered "exp-full-$v" && [ -s "$E2E_DIR/s-exp-$v" ]; } ||
		bail "TLS $v full handshake with the short-lived client certificate failed (exit $RC)"
	ossl req "exp-resume-$v" "$v" -sess_in "$E2E_DIR/s-exp-$v"
	if reused && answered "exp-resume-$v" && identity_ok "$EXP_CERT" 0x05; then
		ok "TLS $v: a session of the short-lived certificate resumes while the certificate is valid"
	else
		fail "TLS $v: resuming while the certificate is valid: reused=$(reused && echo yes || echo no), exit $RC;$BAD"
		show_out
	fi
done
[ "$(date +%s)" -lt $((EXP_AT - 1)) ] || bail "the machine is too slow: the short-lived certificate expired during setup"

# ------------------------------------ resumption on the same listener
for v in 1.3 1.2; do
	note "same listener, TLS $v"
	ossl open "open-full-$v" "$v" -sess_out "$E2E_DIR/s-open-$v"
	{ answered "open-full-$v" && [ -s "$E2E_DIR/s-open-$v" ]; } ||
		bail "TLS $v full handshake on open failed (exit $RC)"
	ossl req "req-full-$v" "$v" -cert "$FILE_CERT" -key "$FILE_KEY" -sess_out "$E2E_DIR/s-req-$v"
	{ answered "req-full-$v" && [ -s "$E2E_DIR/s-req-$v" ]; } ||
		bail "TLS $v full handshake on req failed (exit $RC)"
	if identity_ok "$FILE_CERT" 0x07; then
		ok "TLS $v full handshake on req: PROXY client byte SSL|CERT_CONN|CERT_SESS, verify 0, the client's CN, subject, SHA-256"
	else
		fail "TLS $v full handshake on req:$BAD"
	fi
	ossl opt "opt-full-$v" "$v" -sess_out "$E2E_DIR/s-opt-$v"
	{ answered "opt-full-$v" && [ -s "$E2E_DIR/s-opt-$v" ]; } ||
		bail "TLS $v full handshake on opt failed (exit $RC)"

	snap; before=$SNAP_FILE
	ossl open "open-resume-$v" "$v" -sess_in "$E2E_DIR/s-open-$v"
	if reused && answered "open-resume-$v" && [ "$(pp_field "$OUT" Client-Byte)" = 0x01 ]; then
		ok "TLS $v: open resumes its own session; no client certificate reported"
	else
		fail "TLS $v: open resuming its own session: reused=$(reused && echo yes || echo no), exit $RC, client byte $(pp_field "$OUT" Client-Byte)"
		show_out
	fi
	ossl req "req-resume-$v" "$v" -sess_in "$E2E_DIR/s-req-$v"
	if reused && answered "req-resume-$v" && identity_ok "$FILE_CERT" 0x05; then
		ok "TLS $v: req resumes its own session (no certificate sent); PROXY: SSL|CERT_SESS, verify 0, the same CN, subject, SHA-256"
	else
		fail "TLS $v: req resuming its own session: reused=$(reused && echo yes || echo no), exit $RC;$BAD"
		show_out
	fi
	ossl opt "opt-resume-$v" "$v" -sess_in "$E2E_DIR/s-opt-$v"
	if reused && answered "opt-resume-$v" && [ "$(pp_field "$OUT" Client-Byte)" = 0x01 ]; then
		ok "TLS $v: opt resumes its own session without a certificate"
	else
		fail "TLS $v: opt resuming its own session: reused=$(reused && echo yes || echo no), exit $RC"
		show_out
	fi
	snap; after=$SNAP_FILE
	check_eq "TLS $v: three resumed handshakes, token operations" 0 $(($(ops "$after") - $(ops "$before")))
done
check_grep "daemon log: a resumed session names its client certificate" "$DAEMON_LOG" \
	"listener req: 127\\.0\\.0\\.1:[0-9]+: .* key=none\\(resumed\\) client=\"$(cert_subject "$FILE_CERT")\" sha256=$(cert_sha256 "$FILE_CERT")"

# --------------------------------------------- across listeners: refused
for v in 1.3 1.2; do
	note "another listener, TLS $v"
	snap; b=$SNAP_FILE
	ossl req "x-open-req-$v" "$v" -sess_in "$E2E_DIR/s-open-$v"
	refused_full "TLS $v: open's session (no client auth) offered to req (require), no certificate" "$v" req "$b"
	snap; b=$SNAP_FILE
	ossl req2 "x-req-req2-$v" "$v" -sess_in "$E2E_DIR/s-req-$v"
	refused_full "TLS $v: req's session (verified by the test CA) offered to req2 (the other CA), no certificate" "$v" req2 "$b"
	snap; b=$SNAP_FILE
	ossl req "x-opt-req-$v" "$v" -sess_in "$E2E_DIR/s-opt-$v"
	refused_full "TLS $v: opt's session (no certificate) offered to req, no certificate" "$v" req "$b"
	snap; b=$SNAP_FILE
	ossl open "x-req-open-$v" "$v" -sess_in "$E2E_DIR/s-req-$v"
	snap; a=$SNAP_FILE
	if ! reused && answered "x-req-open-$v" && [ "$(pp_field "$OUT" Client-Byte)" = 0x01 ] && ! pp_has "$OUT" Client-CN &&
		[ "$(usage_delta "$b" "$a" p256 sign)" = 1 ]; then
		ok "TLS $v: req's session offered to open: full handshake, and open reports no client identity"
	else
		fail "TLS $v: req's session offered to open: reused=$(reused && echo yes || echo no), client byte $(pp_field "$OUT" Client-Byte), CN '$(pp_field "$OUT" Client-CN)', $(usage_delta "$b" "$a" p256 sign) signatures"
		show_out
	fi
done

# ------------------------------------------------ certificate purposes
for v in 1.3 1.2; do
	ossl req "eku-$v" "$v" -cert "$CERTS/serveronly-client-chain.pem" -key "$CERTS/serveronly-client.key"
	a=$(alert_of "$OUT")
	if ! answered "eku-$v" && [ "$a" = 42 ]; then
		ok "TLS $v: a client certificate of client_ca with only the serverAuth purpose is refused (42 bad_certificate)"
	else
		fail "TLS $v: serverAuth-only client certificate: answered=$(answered "eku-$v" && echo yes || echo no), alert ${a:-none}"
		show_out
	fi
done
check_grep "daemon log: the purpose is the reason" "$DAEMON_LOG" \
	'listener req: handshake with 127\.0\.0\.1:[0-9]+ failed: .*\(.*purpose.*\)'

conn_get() { tcp_send_read "${P[$1]}" "GET /$2 HTTP/1.1\\r\\nHost: www.hsmtls.test\\r\\nConnection: close\\r\\n\\r\\n" 0 10; }
out=$(conn_get to-good c-good-1)
check "connector: a server certificate with serverAuth is accepted" grep -q '^hello from backend: GET /c-good-1 ' <<<"$out"
out=$(conn_get to-co c-co)
if ! grep -q 'hello from backend' <<<"$out"; then
	ok "connector: a server certificate with only the clientAuth purpose is refused, nothing reached the backend"
else
	fail "connector: a clientAuth-only server certificate was accepted"
fi
wait_until 10 grep -q 'connector to-co: TLS to .* failed for ' "$DAEMON_LOG"
check_grep "daemon log: the connector names the purpose as the reason" "$DAEMON_LOG" \
	'connector to-co: TLS to unix:.* failed for .*\(.*purpose.*\); closing the local connection'
out=$(conn_get to-good c-good-2)
check "connector: a second connection works" grep -q '^hello from backend: GET /c-good-2 ' <<<"$out"
check_eq "connector: never offers a saved session (srv-good saw two full handshakes, none resumed)" "2 0" \
	"$(grep -c 'listener srv-good: .* key=p256 ' "$DAEMON_LOG") $(grep -c 'listener srv-good: .*none(resumed)' "$DAEMON_LOG")"

# -------------------------- the short-lived certificate, after its expiry
# shellcheck disable=SC2317 # called through wait_until
past() { [ "$(date +%s)" -gt "$1" ]; }
note "waiting for the short-lived client certificate to expire ($(date -u -d "@$EXP_AT" +%T))"
wait_until 60 past $((EXP_AT + 1)) || bail "the clock did not pass $EXP_AT"
for v in 1.3 1.2; do
	n=$(grep -c 'listener req: handshake with .* failed: ' "$DAEMON_LOG")
	snap; b=$SNAP_FILE
	ossl req "exp-late-$v" "$v" -sess_in "$E2E_DIR/s-exp-$v"
	a=$(alert_of "$OUT")
	snap
	if ! answered "exp-late-$v" && [ "$a" = 42 ] && [ "$(usage_delta "$b" "$SNAP_FILE" p256 sign)" = 0 ] &&
		wait_until 5 test "$(grep -c 'listener req: handshake with .* failed: ' "$DAEMON_LOG")" -gt "$n"; then
		ok "TLS $v: a session whose client certificate has expired since is refused at resumption (42 bad_certificate), nothing reached the backend"
	else
		fail "TLS $v: a session whose client certificate has expired: answered=$(answered "exp-late-$v" && echo yes || echo no), reused=$(reused && echo yes || echo no), alert ${a:-none}, $(usage_delta "$b" "$SNAP_FILE" p256 sign) signatures"
		show_out
	fi
done
check_grep "daemon log: the expiry of the resumed session's certificate is the reason" "$DAEMON_LOG" \
	'listener req: handshake with 127\.0\.0\.1:[0-9]+ failed: .*\(resumed session, checked again: .*expired.*\)'

stop_daemon 10
check_eq "hsmtlsd exits 0 on SIGTERM" 0 "$DAEMON_RC"
e2e_finish
