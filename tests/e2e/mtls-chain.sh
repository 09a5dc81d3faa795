#!/usr/bin/env bash
# e2e: hsmtlsd in client mode talking to hsmtlsd in server mode, mutual TLS
# with token keys on both ends:
#   local app (bash /dev/tcp) -> daemon C [connector: client key on the
#   token, verifies the server by CA and name] -> daemon S [listener:
#   client_auth = require, server keys on the token, proxy_protocol = v2]
#   -> the PROXY-aware backend (HTTP).
# The answer must come from the backend and report the connector's client
# certificate (CN, subject, SHA-256), verify 0, the forced TLS version and
# the SNI; keep-alive works through both daemons; each daemon's usage
# counters move by exactly one signature per connection (S: server key, C:
# client key, with the mechanism of the protocol version).
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=lib-mtls.sh
. "$(dirname "$0")/lib-mtls.sh"

need_tools openssl
e2e_init
provision_token_with --client-keys
start_backend

# ------------------------------------------------ daemon S (server side)
confS=$E2E_DIR/server.conf
printf '[global]\nlog_level = info\ndrain_timeout = 5s\n\n' >"$confS"
write_token_section "$confS"
write_listener "$confS" in "cert = $HSMTLS_CERT_RSA2048" "key = $HSMTLS_KEY_RSA2048" "client_auth = require" "client_ca = $HSMTLS_CA" "proxy_protocol = v2"
start_daemon "$confS" "$E2E_DIR/server.log" || bail "daemon S did not start"
SPORT=$(listener_port in)
[ -n "$SPORT" ] || bail "no port for listener in"
save_daemon S

# ------------------------------------------------ daemon C (client side)
confC=$E2E_DIR/client.conf
printf '[global]\nlog_level = info\ndrain_timeout = 5s\n\n' >"$confC"
write_token_section "$confC"
write_marker_listener "$confC"
declare -A CKEY=([p256-13]=P256 [p256-12]=P256 [rsa-13]=RSA2048 [rsa-12]=RSA2048)
declare -A CVER=([p256-13]=1.3 [p256-12]=1.2 [rsa-13]=1.3 [rsa-12]=1.2)
CONNECTORS="p256-13 p256-12 rsa-13 rsa-12"
for c in $CONNECTORS; do
	kv=HSMTLS_CLIENTKEY_${CKEY[$c]} cv=HSMTLS_CLIENTCERT_${CKEY[$c]}
	cat >>"$confC" <<EOF
[connector $c]
listen = 127.0.0.1:0
connect = 127.0.0.1:$SPORT
server_name = www.hsmtls.test
ca_file = $HSMTLS_CA
cert = ${!cv}
key = ${!kv}
priority = NORMAL:-VERS-ALL:+VERS-TLS${CVER[$c]}

EOF
done
start_daemon "$confC" "$E2E_DIR/client.log" || bail "daemon C did not start"
wait_ready || bail "daemon C did not log 'ready:'"
save_daemon C
declare -A CPORT=()
for c in $CONNECTORS; do
	CPORT[$c]=$(connector_port "$c")
	[ -n "${CPORT[$c]}" ] || bail "no port for connector $c"
done
note "backend $BACKEND_PORT <- S:$SPORT <- C: ${CPORT[*]}"

use_daemon S
usage_snapshot "$E2E_DIR/S-before" || bail "cannot read daemon S's usage counters"
use_daemon C
usage_snapshot "$E2E_DIR/C-before" || bail "cannot read daemon C's usage counters"

# ------------------------------------------------------------- requests
N_EACH=3
declare -A N_OK=()
for c in $CONNECTORS; do
	cf_var=HSMTLS_CLIENTCERT_${CKEY[$c]}
	cf=${!cf_var}
	want_cn=$(cert_cn "$cf") want_subj=$(cert_subject "$cf") want_fp=$(cert_sha256 "$cf")
	N_OK[$c]=0
	for ((i = 1; i <= N_EACH; i++)); do
		path="chain-$c-$i"
		out=$(tcp_send_read "${CPORT[$c]}" "GET /$path HTTP/1.1\\r\\nHost: www.hsmtls.test\\r\\nConnection: close\\r\\n\\r\\n" 0 10)
		bad=""
		grep -q "^hello from backend: GET /$path HTTP/1.1" <<<"$out" || bad+=" no answer from the backend;"
		v=$(pp_field "$out" Client-Cert) && [ "$v" = 1 ] || bad+=" Client-Cert=$v;"
		v=$(pp_field "$out" Verify) && [ "$v" = 0 ] || bad+=" Verify=$v;"
		v=$(pp_field "$out" Client-CN) && [ "$v" = "$want_cn" ] || bad+=" CN=$v;"
		v=$(pp_field "$out" Client-Subject) && [ "$v" = "$want_subj" ] || bad+=" Subject=$v;"
		v=$(pp_field "$out" Client-SHA256) && [ "$v" = "$want_fp" ] || bad+=" SHA256=$v;"
		v=$(pp_field "$out" TLS-Version) && [ "$v" = "TLSv${CVER[$c]}" ] || bad+=" TLS-Version=$v;"
		v=$(pp_field "$out" Authority) && [ "$v" = www.hsmtls.test ] || bad+=" Authority=$v;"
		v=$(pp_field "$out" Dst) && [ "$v" = "127.0.0.1:$SPORT" ] || bad+=" Dst=$v;"
		src=$(pp_field "$out" Src)
		# the source is daemon C's outgoing socket, which S logged with
		# the client certificate's fingerprint
		grep -qE "listener in: ${src//./\\.}: \\(TLS1\\.${CVER[$c]#1.}\\).* client=\"$want_subj\" sha256=$want_fp" "$S_LOG" ||
			bad+=" Src=$src not in S's handshake lines;"
		if [ -z "$bad" ]; then
			N_OK[$c]=$((N_OK[$c] + 1))
		else
			fail "connector $c request $i:$bad"
			tr -d '\r' <<<"$out" | tail -n 20 | sed 's/^/#   /'
		fi
	done
	[ "${N_OK[$c]}" -eq "$N_EACH" ] &&
		ok "connector $c ($want_cn, TLS ${CVER[$c]}): $N_EACH requests answered by the backend; PROXY: CN $want_cn, verify 0, SHA-256 and subject match, TLSv${CVER[$c]}, src = C's socket"
done

# Keep-alive through both daemons: two requests on one local connection.
out=$(tcp_send_read "${CPORT[p256-13]}" "GET /ka-1 HTTP/1.1\\r\\nHost: www.hsmtls.test\\r\\n\\r\\nGET /ka-2 HTTP/1.1\\r\\nHost: www.hsmtls.test\\r\\nConnection: close\\r\\n\\r\\n" 0 10)
if grep -q '^hello from backend: GET /ka-1 ' <<<"$out" && grep -q '^hello from backend: GET /ka-2 ' <<<"$out"; then
	ok "keep-alive: two requests on one connection through C and S"
	N_OK[p256-13]=$((N_OK[p256-13] + 1))
else
	fail "keep-alive through C and S"
	tr -d '\r' <<<"$out" | tail -n 10 | sed 's/^/#   /'
fi

# A client that skips the connector and has no certificate is refused by S.
out=$(printf 'GET /direct HTTP/1.1\r\nHost: www.hsmtls.test\r\nConnection: close\r\n\r\n' |
	timeout 10 openssl s_client -connect "127.0.0.1:$SPORT" -servername www.hsmtls.test -CAfile "$HSMTLS_CA" -tls1_2 2>&1)
if ! grep -q 'hello from backend' <<<"$out"; then
	ok "S refuses a direct client without a certificate ($(alert_name "$(alert_of "$out")"))"
else
	fail "S let a client without a certificate through"
fi
N_DIRECT=1

# ------------------------------------------------------------- counters
use_daemon S
stop_daemon 10
check_eq "daemon S exits 0 on SIGTERM" 0 "$DAEMON_RC"
use_daemon C
stop_daemon 10
check_eq "daemon C exits 0 on SIGTERM" 0 "$DAEMON_RC"
exit_usage "$S_LOG" "$E2E_DIR/S-exit"
exit_usage "$C_LOG" "$E2E_DIR/C-exit"

n_all=0 n_p256=0 n_rsa13=0 n_rsa12=0
for c in $CONNECTORS; do n_all=$((n_all + N_OK[$c])); done
n_p256=$((N_OK[p256-13] + N_OK[p256-12]))
n_rsa13=${N_OK[rsa-13]} n_rsa12=${N_OK[rsa-12]}
s_sign=$(($(usage_delta "$E2E_DIR/S-before" "$E2E_DIR/S-exit" p256 sign) + $(usage_delta "$E2E_DIR/S-before" "$E2E_DIR/S-exit" rsa2048 sign)))
check_eq "S: one server-key signature per connection (p256 + rsa2048; $n_all through C, $N_DIRECT direct)" \
	$((n_all + N_DIRECT)) "$s_sign"
check_eq "C: client-p256 CKM_ECDSA = its connections" "$n_p256" "$(usage_delta "$E2E_DIR/C-before" "$E2E_DIR/C-exit" client-p256 sign CKM_ECDSA)"
check_eq "C: client-rsa2048 CKM_RSA_PKCS_PSS = its TLS 1.3 connections" "$n_rsa13" \
	"$(usage_delta "$E2E_DIR/C-before" "$E2E_DIR/C-exit" client-rsa2048 sign CKM_RSA_PKCS_PSS)"
# TLS 1.2 with GnuTLS on both ends (the listener's default priority): the
# client CertificateVerify is PKCS#1 v1.5.
check_eq "C: client-rsa2048 CKM_RSA_PKCS = its TLS 1.2 connections" "$n_rsa12" \
	"$(usage_delta "$E2E_DIR/C-before" "$E2E_DIR/C-exit" client-rsa2048 sign CKM_RSA_PKCS)"
check_eq "C: client-rsa2048 signatures = its connections" $((n_rsa13 + n_rsa12)) \
	"$(usage_delta "$E2E_DIR/C-before" "$E2E_DIR/C-exit" client-rsa2048 sign)"
check_eq "C: no server-key signature (its marker listener made no handshake)" 0 \
	"$(usage_delta "$E2E_DIR/C-before" "$E2E_DIR/C-exit" p256 sign)"
for d in S C; do
	v=${d}_LOG
	check_eq "daemon $d: no failed token operation" 0 "$(grep ' usage: ' "${!v}" | grep -v 'count=0$' | grep -vc ' result=ok ')"
done
check_eq "S: handshakes completed / failed" "$n_all $N_DIRECT" \
	"$(sed -n 's/.* stopped: \([0-9]*\) handshakes completed, \([0-9]*\) failed.*/\1 \2/p' "$S_LOG")"
check_eq "C: handshakes completed / failed" "$n_all 0" \
	"$(sed -n 's/.* stopped: \([0-9]*\) handshakes completed, \([0-9]*\) failed.*/\1 \2/p' "$C_LOG")"
# C logged the server it verified (one of S's two chains, by SHA-256).
fps="$(cert_sha256 "$HSMTLS_CERT_P256")|$(cert_sha256 "$HSMTLS_CERT_RSA2048")"
check_eq "C: one line per connection naming the verified server certificate" "$n_all" \
	"$(grep -cE "connector [a-z0-9-]+: .* server_name=www\\.hsmtls\\.test client_key=client-(p256|rsa2048) server=\"CN=www\\.hsmtls\\.test\" sha256=($fps) " "$C_LOG")"

e2e_finish
