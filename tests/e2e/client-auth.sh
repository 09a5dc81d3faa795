#!/usr/bin/env bash
# e2e: client certificates on a listener and the PROXY v2 header that hands
# the verified identity to the backend. Real clients (curl, openssl
# s_client, gnutls-cli, the last also with client keys on the token), TLS 1.3
# and 1.2, against three listeners (server chains p256 + rsa2048 on the token):
#   req    client_auth = require,  proxy_protocol = v2
#   opt    client_auth = optional, proxy_protocol = v2
#   plain  client_auth = require,  no proxy_protocol
# A valid client certificate gets through and the backend's PROXY parser
# reports cert 1, verify 0, the certificate's CN, subject and SHA-256, the
# client's real address and port, the TLS version; no certificate and a
# certificate from another CA are refused with an alert (which one is
# asserted per case); optional lets clients without a certificate through
# with cert 0 and verify != 0. The backend's own PROXY v2 parser is checked
# first (well-formed and malformed headers), since everything else relies on
# it: fixture self-checks, not counted (one that fails stops the test). Finally: one server-key signature per connection, refused ones too.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=lib-mtls.sh
. "$(dirname "$0")/lib-mtls.sh"

need_tools gnutls-cli openssl curl certtool
e2e_init
provision_token_with --client-keys --file-keys
start_backend

# --------------------------------------------- the backend's PROXY v2 parser
# Headers written byte for byte (\xHH strings); x_str TEXT: TEXT as \xHH.
x_str() {
	local s=$1 i
	for ((i = 0; i < ${#s}; i++)); do printf '\\x%02x' "'${s:i:1}"; done
}
x_len() { printf '\\x%02x\\x%02x' $((($1 >> 8) & 255)) $(($1 & 255)); } # 16-bit big endian
x_count() { echo $((${#1} / 4)); }                                     # bytes in a \xHH string
x_tlv() { printf '\\x%02x%s%s' "$1" "$(x_len "$(x_count "$2")")" "$2"; }  # TYPE VALUE
PP_SIG='\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a'
# x_header CMD FAMILY BODY: signature, version/command, family, length, BODY.
x_header() { printf '%s\\x%02x\\x%02x%s%s' "$PP_SIG" "$1" "$2" "$(x_len "$(x_count "$3")")" "$3"; }

ADDR4='\x7f\x00\x00\x01\x7f\x00\x00\x02\x30\x39\x01\xbb'                   # 127.0.0.1:12345 -> 127.0.0.2:443
ADDR6="$(printf '\\x00%.0s' {1..15})\\x01$(printf '\\x00%.0s' {1..15})\\x02\\x30\\x39\\x01\\xbb" # [::1]:12345 -> [::2]:443
FP32=$(for i in $(seq 0 31); do printf '\\x%02x' $((i * 7 + 1)); done)
FP32_HEX=$(for i in $(seq 0 31); do printf '%02x' $((i * 7 + 1)); done)
req() { printf 'GET /%s HTTP/1.1\\r\\nHost: b\\r\\nConnection: close\\r\\n\\r\\n' "$1"; }

# Self-checks of the fixture (tests/e2e/backend.c alone, not hsmtlsd): notes,
# not counted as checks; any that fails stops the test (bail) below.
FIXTURE_BAD=0
fixture_ok() { note "fixture self-check ok: $*"; }
fixture_fail() {
	note "fixture self-check FAILED: $*"
	FIXTURE_BAD=1
}
note "the backend's PROXY v2 parser (fixture self-check)"
out=$(tcp_send_read "$BACKEND_PORT" "$(x_header 0x21 0x11 "$ADDR4")$(req pp-min)" 0 5)
if grep -q '^hello from backend: GET /pp-min ' <<<"$out" && [ "$(pp_field "$out" Src)" = 127.0.0.1:12345 ] &&
	[ "$(pp_field "$out" Dst)" = 127.0.0.2:443 ] && [ "$(pp_field "$out" Family)" = TCP4 ] &&
	! pp_has "$out" SSL; then
	fixture_ok "backend: TCP4 header without TLVs parsed (127.0.0.1:12345 -> 127.0.0.2:443), then HTTP"
else
	fixture_fail "backend: TCP4 header without TLVs"
	printf '%s\n' "$out" | sed 's/^/#   /'
fi

ssl_sub="$(x_tlv 0x21 "$(x_str TLSv1.3)")$(x_tlv 0x22 "$(x_str client-x)")$(x_tlv 0x23 "$(x_str TLS_AES_128_GCM_SHA256)")$(x_tlv 0x24 "$(x_str ECDSA-SHA256)")$(x_tlv 0x25 "$(x_str EC/ECDSA256)")"
tlvs="$(x_tlv 0x02 "$(x_str b.test)")$(x_tlv 0x04 '\x00\x00')$(x_tlv 0x20 "\\x03\\x00\\x00\\x00\\x00$ssl_sub")$(x_tlv 0xe0 "$(x_str 'CN=client-x,O=t')")$(x_tlv 0xe1 "$FP32")"
out=$(tcp_send_read "$BACKEND_PORT" "$(x_header 0x21 0x21 "$ADDR6$tlvs")$(req pp-full)" 0 5)
want="Family=TCP6 Src=[::1]:12345 Dst=[::2]:443 TLVs=02 04 20 e0 e1 Authority=b.test SSL=1 Client-Cert=1 Verify=0 TLS-Version=TLSv1.3 Cipher=TLS_AES_128_GCM_SHA256 Client-CN=client-x Sig-Alg=ECDSA-SHA256 Key-Alg=EC/ECDSA256 Client-Subject=CN=client-x,O=t Client-SHA256=$FP32_HEX"
got=""
for f in Family Src Dst TLVs Authority SSL Client-Cert Verify TLS-Version Cipher Client-CN Sig-Alg Key-Alg Client-Subject Client-SHA256; do
	got+="${got:+ }$f=$(pp_field "$out" "$f")"
done
if [ "$got" = "$want" ] && grep -q '^hello from backend: GET /pp-full ' <<<"$out"; then
	fixture_ok "backend: TCP6 header with AUTHORITY, NOOP, SSL (5 sub-TLVs), 0xE0 and 0xE1 parsed"
else
	fixture_fail "backend: full TCP6 header: got '$got', expected '$want'"
fi
out=$(tcp_send_read "$BACKEND_PORT" "$(x_header 0x20 0x00 "")$(req pp-local)" 0 5)
if [ "$(pp_field "$out" Command)" = LOCAL ] && [ "$(pp_field "$out" Family)" = UNSPEC ] && ! pp_has "$out" Src &&
	grep -q '^hello from backend: GET /pp-local ' <<<"$out"; then
	fixture_ok "backend: LOCAL/UNSPEC header without addresses parsed"
else
	fixture_fail "backend: LOCAL/UNSPEC header"
fi
out=$(tcp_send_read "$BACKEND_PORT" "$(x_header 0x21 0x11 "$ADDR4")xyz\\n" 4 5)
if [ "$out" = xyz ]; then
	fixture_ok "backend: after a header, non-HTTP data is echoed"
else
	fixture_fail "backend: after a header, non-HTTP data: '$out'"
fi
out=$(tcp_send_read "$BACKEND_PORT" "$(req no-pp)" 0 5)
if grep -q '^hello from backend: GET /no-pp ' <<<"$out" && ! grep -q '^X-Proxy-' <<<"$out"; then
	fixture_ok "backend: without a header, HTTP as before (no X-Proxy lines)"
else
	fixture_fail "backend: HTTP without a PROXY header"
fi

# Malformed headers: closed without an answer, one log line with the reason.
bad_pp() { # DESC BYTES REASON
	local out before after
	before=$(grep -c 'bad PROXY v2 header' "$E2E_DIR/backend.err")
	out=$(tcp_send_read "$BACKEND_PORT" "$2$(req bad)" 0 5)
	after=$(grep -c 'bad PROXY v2 header' "$E2E_DIR/backend.err")
	if [ -z "$out" ] && [ "$after" -eq $((before + 1)) ] &&
		grep 'bad PROXY v2 header' "$E2E_DIR/backend.err" | tail -n 1 | grep -qF -- "$3"; then
		fixture_ok "backend refuses $1 (closed, logged '$3')"
	else
		fixture_fail "backend and $1: answer '${out:0:60}', log lines $before -> $after"
		tail -n 3 "$E2E_DIR/backend.err" | sed 's/^/#   /'
	fi
}
bad_pp "version 1 in the version/command byte" "$(x_header 0x11 0x11 "$ADDR4")" "version is not 2"
bad_pp "command 0x2 (neither LOCAL nor PROXY)" "$(x_header 0x22 0x11 "$ADDR4")" "command is neither"
bad_pp "family 0x31 (unix)" "$(x_header 0x21 0x31 "$ADDR4")" "unsupported address family"
bad_pp "a length shorter than the IPv4 addresses" "$(x_header 0x21 0x11 '\x7f\x00\x00\x01')" "length shorter than the addresses"
bad_pp "a TLV longer than the header" "$(x_header 0x21 0x11 "$ADDR4\\x02\\x00\\x09abc")" "TLV length beyond"
bad_pp "a truncated TLV header" "$(x_header 0x21 0x11 "$ADDR4\\x02\\x00")" "truncated TLV header"
bad_pp "an SSL TLV shorter than 5 bytes" "$(x_header 0x21 0x11 "$ADDR4$(x_tlv 0x20 '\x01\x00\x00\x00')")" "PP2_TYPE_SSL shorter"
bad_pp "an SSL sub-TLV beyond the SSL TLV" "$(x_header 0x21 0x11 "$ADDR4$(x_tlv 0x20 '\x01\x00\x00\x00\x00\x22\x00\x05ab')")" "sub-TLV length beyond"
bad_pp "a 31-byte 0xE1 fingerprint" "$(x_header 0x21 0x11 "$ADDR4$(x_tlv 0xe1 "${FP32:4}")")" "not 32 bytes"
bad_pp "two AUTHORITY TLVs" "$(x_header 0x21 0x11 "$ADDR4$(x_tlv 0x02 '\x61')$(x_tlv 0x02 '\x62')")" "duplicate PP2_TYPE_AUTHORITY"
bad_pp "a NUL byte in the subject" "$(x_header 0x21 0x11 "$ADDR4$(x_tlv 0xe0 '\x43\x00\x4e')")" "NUL byte in 0xE0"
BAD_PP_LINES=$(grep -c 'bad PROXY v2 header' "$E2E_DIR/backend.err")
[ "$FIXTURE_BAD" = 0 ] || bail "the test backend's PROXY v2 parser fails its self-checks (above): the checks of hsmtlsd's header rely on it"

# ------------------------------------------------------------- the daemon
conf=$E2E_DIR/client-auth.conf
printf '[global]\nlog_level = info\ndrain_timeout = 5s\n\n' >"$conf"
write_token_section "$conf"
for l in req:require:v2 opt:optional:v2 plain:require:no; do
	IFS=: read -r name mode pp <<<"$l"
	write_listener "$conf" "$name" "cert = $HSMTLS_CERT_RSA2048" "key = $HSMTLS_KEY_RSA2048" "client_auth = $mode" "client_ca = $HSMTLS_CA" "proxy_protocol = $pp"
done
start_daemon "$conf" || bail "daemon did not start"
REQ=$(listener_port req)
OPT=$(listener_port opt)
PLAIN=$(listener_port plain)
if [ -z "$REQ" ] || [ -z "$OPT" ] || [ -z "$PLAIN" ]; then bail "no listener ports in the log"; fi
note "listeners: req $REQ, opt $OPT, plain $PLAIN; backend $BACKEND_PORT"
usage_snapshot "$E2E_DIR/usage-before" || bail "cannot read the usage counters with SIGUSR1"

# Token client keys through gnutls-cli need p11-kit to find SoftHSM
# (SOFTHSM2_CONF from uris.env points it at our token).
TOKEN_CLIENTS=1
if ! p11tool --list-token-urls 2>/dev/null | grep -q "token=$HSMTLS_TOKEN_LABEL"; then
	TOKEN_CLIENTS=0
	note "p11-kit does not list the token: gnutls-cli with token client keys is skipped (counted)"
fi
PIN=$(head -n 1 "$HSMTLS_PIN_FILE")

# ------------------------------------------------------------ the clients
# Each run_* sets OUT (the client's transcript + answer), RC, SRC_PORT (the
# client's own port when known, else "") and CIPHER (OpenSSL's name of the
# negotiated suite when the client shows it, else ""), and counts the
# connection in N_CONN. CERT is file | other | none | token:NAME.
N_CONN=0
N_REFUSED=0
declare -A SEEN_ALERTS=()
cert_args_openssl() {
	case $1 in
	file) echo "$HSMTLS_FILE_CLIENT_CERT $HSMTLS_FILE_CLIENT_KEY" ;;
	other) echo "$HSMTLS_OTHER_CLIENT_CERT $HSMTLS_OTHER_CLIENT_KEY" ;;
	esac
}

run_curl() { # PORT PATH VER CERT
	local port=$1 path=$2 ver=$3 cert=$4 args=() c k info body
	[ "$ver" = 1.3 ] && args+=(--tlsv1.3) || args+=(--tlsv1.2 --tls-max 1.2)
	if [ "$cert" != none ]; then
		read -r c k <<<"$(cert_args_openssl "$cert")"
		args+=(--cert "$c" --key "$k")
	fi
	info=$E2E_DIR/curl.info body=$E2E_DIR/curl.body
	rm -f -- "$body"
	N_CONN=$((N_CONN + 1))
	RC=0
	timeout 20 curl -sS -v --cacert "$HSMTLS_CA" --resolve "www.hsmtls.test:$port:127.0.0.1" "${args[@]}" \
		-o "$body" -w 'local_port=%{local_port}\n' "https://www.hsmtls.test:$port/$path" >"$info" 2>&1 || RC=$?
	OUT=$(cat "$info" "$body" 2>/dev/null)
	SRC_PORT=$(sed -n 's/^local_port=\([1-9][0-9]*\)$/\1/p' "$info" | tail -n 1)
	CIPHER=$(sed -n 's/^\* SSL connection using TLSv1\.[23] \/ \([A-Z0-9_-]*\).*/\1/p' "$info" | head -n 1)
}

run_openssl() { # PORT PATH VER CERT: binds its own port (-bind) to know it
	local port=$1 path=$2 ver=$3 cert=$4 args=() c k
	[ "$ver" = 1.3 ] && args+=(-tls1_3) || args+=(-tls1_2)
	if [ "$cert" != none ]; then
		read -r c k <<<"$(cert_args_openssl "$cert")"
		args+=(-cert "$c" -key "$k")
	fi
	SRC_PORT=$(free_port)
	N_CONN=$((N_CONN + 1))
	RC=0
	OUT=$(openssl_get "$port" www.hsmtls.test "$path" -bind "127.0.0.1:$SRC_PORT" "${args[@]}") || RC=$?
	CIPHER=$(sed -n 's/^ *Cipher *: \([A-Z0-9_-]*\)$/\1/p' <<<"$OUT" | head -n 1)
}

run_gnutls() { # PORT PATH VER CERT
	local port=$1 path=$2 ver=$3 cert=$4 args=() t
	case $cert in
	file) args+=(--x509certfile="$HSMTLS_FILE_CLIENT_CERT" --x509keyfile="$HSMTLS_FILE_CLIENT_KEY") ;;
	other) args+=(--x509certfile="$HSMTLS_OTHER_CLIENT_CERT" --x509keyfile="$HSMTLS_OTHER_CLIENT_KEY") ;;
	token:*)
		t=${cert#token:}
		local kv=HSMTLS_CLIENTKEY_$t cv=HSMTLS_CLIENTCERT_$t
		args+=(--x509certfile="${!cv}" --x509keyfile="${!kv}")
		;;
	esac
	t=$E2E_DIR/gnutls.out
	: >"$t"
	N_CONN=$((N_CONN + 1))
	# stdin stays open until the server closed or an error showed: gnutls-cli
	# says goodbye on stdin EOF and would drop an answer still on its way.
	# shellcheck disable=SC2094 # reading the transcript while it is written is the point
	{
		printf 'GET /%s HTTP/1.1\r\nHost: www.hsmtls.test\r\nConnection: close\r\n\r\n' "$path"
		wait_until 10 grep -qE 'Peer has closed|\*\*\* |Error' "$t"
	} | GNUTLS_PIN=$PIN timeout 15 gnutls-cli --x509cafile="$HSMTLS_CA" --port="$port" \
		--sni-hostname=www.hsmtls.test --verify-hostname=www.hsmtls.test \
		--priority="NORMAL:-VERS-ALL:+VERS-TLS$ver" "${args[@]}" 127.0.0.1 >"$t" 2>&1
	RC=${PIPESTATUS[1]}
	OUT=$(cat "$t")
	SRC_PORT=""
	CIPHER=""
}

# OpenSSL and IANA/GnuTLS suite names compared: upper case, without TLS_,
# WITH_, '-' and '_' (ECDHE-ECDSA-AES256-GCM-SHA384 = TLS_ECDHE_ECDSA_AES_256_GCM_SHA384).
norm_suite() { tr '[:lower:]' '[:upper:]' <<<"$1" | sed 's/^TLS_//; s/_WITH_/_/' | tr -d '_-'; }

show_out() { tr -d '\r' <<<"$OUT" | grep -vE '^ *[0-9a-f]{4} - |^[A-Za-z0-9+/=]{64}$' | tail -n "${1:-25}" | sed 's/^/#   /'; }

# cert_key_alg FILE / cert_sig_alg FILE: what the PROXY v2 key and
# signature algorithm sub-TLVs must say for the first certificate in FILE
# (certtool's names: "EC/ECDSA256", "RSA2048", "EdDSA (Ed25519)256";
# "ECDSA-SHA256").
cert_key_alg() {
	certtool -i --infile "$1" | awk -F': ' '
		/Subject Public Key Algorithm:/ && !pk { pk = $2 }
		/Algorithm Security Level:/ && !bits { bits = $2; sub(/.*\(/, "", bits); sub(/ bits\).*/, "", bits) }
		END { print pk bits }'
}
cert_sig_alg() { certtool -i --infile "$1" | sed -n 's/^[[:space:]]*Signature Algorithm: //p' | head -n 1; }

# through DESC LISTENER_PORT PATH VER CERTFILE [KNOWN_BUG]: the request got
# through; the PROXY header (as the backend reports it) says what it must.
# CERTFILE: the client's chain (leaf first), or "" for none. KNOWN_BUG: a
# reported daemon bug that refuses this client; a refusal is then a TODO.
N_THROUGH=0
through() {
	local desc=$1 port=$2 path=$3 ver=$4 cf=$5 known=${6:-} bad="" v src
	if [ -n "$known" ] && [ "$RC" -ne 0 ] && ! grep -q 'hello from backend' <<<"$OUT"; then
		N_REFUSED=$((N_REFUSED + 1))
		v=$(alert_of "$OUT")
		SEEN_ALERTS["$desc"]=$v
		known_bug "$desc: through expected, refused (client exit $RC, $(alert_name "$v") ${v:+($v)})" "$known"
		return 0
	fi
	N_THROUGH=$((N_THROUGH + 1))
	[ "$RC" -eq 0 ] || bad+=" client exit $RC;"
	grep -q "^hello from backend: GET /$path HTTP/1.1" <<<"$OUT" || bad+=" no answer from the backend;"
	v=$(pp_field "$OUT" Command) && [ "$v" = PROXY ] || bad+=" Command=$v;"
	v=$(pp_field "$OUT" Family) && [ "$v" = TCP4 ] || bad+=" Family=$v;"
	src=$(pp_field "$OUT" Src)
	if [ -n "$SRC_PORT" ]; then
		[ "$src" = "127.0.0.1:$SRC_PORT" ] || bad+=" Src=$src (client port $SRC_PORT);"
	elif [[ $src =~ ^127\.0\.0\.1:([0-9]+)$ ]]; then
		# the client does not show its port: it must be the one the
		# daemon logged for this handshake
		grep -qE "listener [a-z]+: ${src//./\\.}: \(TLS1\.${ver#1.}\)" "$DAEMON_LOG" ||
			bad+=" Src=$src not in the daemon's handshake lines;"
	else
		bad+=" Src=$src;"
	fi
	v=$(pp_field "$OUT" Dst) && [ "$v" = "127.0.0.1:$port" ] || bad+=" Dst=$v;"
	v=$(pp_field "$OUT" Authority) && [ "$v" = www.hsmtls.test ] || bad+=" Authority=$v;"
	v=$(pp_field "$OUT" SSL) && [ "$v" = 1 ] || bad+=" SSL=$v;"
	v=$(pp_field "$OUT" TLS-Version) && [ "$v" = "TLSv$ver" ] || bad+=" TLS-Version=$v (forced $ver);"
	v=$(pp_field "$OUT" Cipher)
	if [ -z "$v" ]; then
		bad+=" no Cipher;"
	elif [ -n "$CIPHER" ] && [ "$(norm_suite "$v")" != "$(norm_suite "$CIPHER")" ]; then
		bad+=" Cipher=$v (client: $CIPHER);"
	fi
	if [ -n "$cf" ]; then
		v=$(pp_field "$OUT" Client-Cert) && [ "$v" = 1 ] || bad+=" Client-Cert=$v;"
		v=$(pp_field "$OUT" Verify) && [ "$v" = 0 ] || bad+=" Verify=$v;"
		v=$(pp_field "$OUT" Client-CN) && [ "$v" = "$(cert_cn "$cf")" ] || bad+=" CN=$v (want $(cert_cn "$cf"));"
		v=$(pp_field "$OUT" Client-Subject) && [ "$v" = "$(cert_subject "$cf")" ] || bad+=" Subject=$v (want $(cert_subject "$cf"));"
		v=$(pp_field "$OUT" Client-SHA256 | tr -d ':' | tr 'A-F' 'a-f')
		[ "$v" = "$(cert_sha256 "$cf")" ] || bad+=" SHA256=$v (want $(cert_sha256 "$cf"));"
		v=$(pp_field "$OUT" Key-Alg) && [ "$v" = "$(cert_key_alg "$cf")" ] || bad+=" Key-Alg=$v (want $(cert_key_alg "$cf"));"
		v=$(pp_field "$OUT" Sig-Alg) && [ "$v" = "$(cert_sig_alg "$cf")" ] || bad+=" Sig-Alg=$v (want $(cert_sig_alg "$cf"));"
		v=$(pp_field "$OUT" TLVs) && [ "$v" = "02 20 e0 e1" ] || bad+=" TLVs=$v;"
	else
		v=$(pp_field "$OUT" Client-Cert) && [ "$v" = 0 ] || bad+=" Client-Cert=$v;"
		v=$(pp_field "$OUT" Verify) && [[ $v =~ ^[1-9][0-9]*$ ]] || bad+=" Verify=$v (want non-zero);"
		! pp_has "$OUT" Client-CN || bad+=" a CN without a certificate;"
		! pp_has "$OUT" Client-Subject || bad+=" a subject without a certificate;"
		! pp_has "$OUT" Client-SHA256 || bad+=" a fingerprint without a certificate;"
		v=$(pp_field "$OUT" TLVs) && [ "$v" = "02 20" ] || bad+=" TLVs=$v;"
	fi
	if [ -z "$bad" ]; then
		ok "$desc: through; PROXY: TLSv$ver, cert $(pp_field "$OUT" Client-Cert), verify $(pp_field "$OUT" Verify)${cf:+, CN $(pp_field "$OUT" Client-CN), SHA-256 matches}, src $src${SRC_PORT:+ (= the client port)}"
	else
		fail "$desc:$bad"
		show_out
	fi
}

# refused DESC VER EXPECTED_ALERT: the client was refused (non-zero exit,
# no answer) with EXPECTED_ALERT. The daemon closes refused connections
# lingeringly, so the client reads the alert rather than a TCP reset.
reset_seen() { grep -qE 'Connection reset by peer|errno[= ]104|errno 107|Error in the (push|pull) function' <<<"$1"; }
refused() {
	local desc=$1 ver=$2 exp=$3 known=${4:-} why=${5:-} a
	N_REFUSED=$((N_REFUSED + 1))
	a=$(alert_of "$OUT")
	SEEN_ALERTS["$desc"]=$a
	if [ "$RC" -ne 0 ] && ! grep -q 'hello from backend' <<<"$OUT"; then
		ok "$desc: refused, nothing reached the backend"
	else
		fail "$desc: not refused (exit $RC)"
		show_out 10
	fi
	if [ "$a" = "$exp" ]; then
		ok "$desc: alert $a ($(alert_name "$a"))"
	elif [ -n "$known" ] && [ "$a" = "$known" ]; then
		known_bug "$desc: alert $exp ($(alert_name "$exp")) expected, got $a ($(alert_name "$a"))" "$why"
	elif [ -z "$a" ] && reset_seen "$OUT"; then
		SEEN_ALERTS["$desc"]=reset
		fail "$desc: alert $exp ($(alert_name "$exp")) expected, the client saw only a TCP reset"
	else
		fail "$desc: alert ${a:-none} ($(alert_name "$a")), expected $exp ($(alert_name "$exp"))"
		show_out 10
	fi
}

FILE_CERT=$HSMTLS_FILE_CLIENT_CERT
check_eq "openssl and certtool agree on the file client's SHA-256 fingerprint" "$(cert_sha256_certtool "$FILE_CERT")" \
	"$(cert_sha256 "$FILE_CERT")"

# ----------------------------------------------- client_auth = require
for v in 1.3 1.2; do
	note "client_auth = require, TLS $v"
	run_curl "$REQ" "req-curl-$v" "$v" file
	through "curl TLS $v, file client certificate" "$REQ" "req-curl-$v" "$v" "$FILE_CERT"
	run_openssl "$REQ" "req-openssl-$v" "$v" file
	through "openssl s_client TLS $v, file client certificate" "$REQ" "req-openssl-$v" "$v" "$FILE_CERT"
	run_gnutls "$REQ" "req-gnutls-$v" "$v" file
	through "gnutls-cli TLS $v, file client certificate" "$REQ" "req-gnutls-$v" "$v" "$FILE_CERT"
	keys="P256 RSA2048"
	[ "$v" = 1.3 ] && keys+=" ED25519 AUTH"
	for k in $keys; do
		cv=HSMTLS_CLIENTCERT_$k
		if [ "$TOKEN_CLIENTS" = 1 ]; then
			run_gnutls "$REQ" "req-token-$k-$v" "$v" "token:$k"
			through "gnutls-cli TLS $v, token client key $(cert_cn "${!cv}")" "$REQ" "req-token-$k-$v" "$v" "${!cv}"
		else
			skipped "gnutls-cli TLS $v, token client key $(cert_cn "${!cv}")" "p11-kit does not list the token"
		fi
	done

	if [ "$v" = 1.3 ]; then nocert=116 known="" why=""; else nocert=40 known="" why=""; fi
	run_curl "$REQ" "req-none-curl-$v" "$v" none
	refused "curl TLS $v, no client certificate" "$v" "$nocert" "$known" "$why"
	run_openssl "$REQ" "req-none-openssl-$v" "$v" none
	refused "openssl s_client TLS $v, no client certificate" "$v" "$nocert" "$known" "$why"
	run_gnutls "$REQ" "req-none-gnutls-$v" "$v" none
	refused "gnutls-cli TLS $v, no client certificate" "$v" "$nocert" "$known" "$why"

	run_curl "$REQ" "req-other-curl-$v" "$v" other
	refused "curl TLS $v, other CA's client certificate" "$v" 42
	run_openssl "$REQ" "req-other-openssl-$v" "$v" other
	refused "openssl s_client TLS $v, other CA's client certificate" "$v" 42
	run_gnutls "$REQ" "req-other-gnutls-$v" "$v" other
	refused "gnutls-cli TLS $v, other CA's client certificate" "$v" 42
done
check_grep "daemon log: TLS 1.3 without a certificate" "$DAEMON_LOG" 'listener req: handshake with 127\.0\.0\.1:[0-9]+ failed: Certificate is required'
check_grep "daemon log: the other CA's certificate, with the reason" "$DAEMON_LOG" 'listener req: handshake with 127\.0\.0\.1:[0-9]+ failed: .*issuer is unknown'
check_grep "daemon log: the established line names the client certificate" "$DAEMON_LOG" \
	"listener req: 127\\.0\\.0\\.1:[0-9]+: \\(TLS1\\.3\\).* client=\"$(cert_subject "$FILE_CERT")\" sha256=$(cert_sha256 "$FILE_CERT")"

# ---------------------------------------------- client_auth = optional
note "client_auth = optional"
run_curl "$OPT" opt-curl-none-1.3 1.3 none
through "optional: curl TLS 1.3 without a certificate" "$OPT" opt-curl-none-1.3 1.3 ""
run_openssl "$OPT" opt-openssl-none-1.2 1.2 none
through "optional: openssl s_client TLS 1.2 without a certificate" "$OPT" opt-openssl-none-1.2 1.2 ""
run_gnutls "$OPT" opt-gnutls-none-1.2 1.2 none
through "optional: gnutls-cli TLS 1.2 without a certificate" "$OPT" opt-gnutls-none-1.2 1.2 ""
run_openssl "$OPT" opt-openssl-file-1.3 1.3 file
through "optional: openssl s_client TLS 1.3, file client certificate" "$OPT" opt-openssl-file-1.3 1.3 "$FILE_CERT"
run_curl "$OPT" opt-curl-file-1.2 1.2 file
through "optional: curl TLS 1.2, file client certificate" "$OPT" opt-curl-file-1.2 1.2 "$FILE_CERT"
if [ "$TOKEN_CLIENTS" = 1 ]; then
	run_gnutls "$OPT" opt-gnutls-token-1.3 1.3 token:P256
	through "optional: gnutls-cli TLS 1.3, token client key" "$OPT" opt-gnutls-token-1.3 1.3 "$HSMTLS_CLIENTCERT_P256"
else
	skipped "optional: gnutls-cli TLS 1.3, token client key" "p11-kit does not list the token"
fi
for v in 1.3 1.2; do
	run_curl "$OPT" "opt-other-curl-$v" "$v" other
	refused "optional: curl TLS $v, other CA's client certificate" "$v" 42
done
run_gnutls "$OPT" opt-other-gnutls-1.3 1.3 other
refused "optional: gnutls-cli TLS 1.3, other CA's client certificate" 1.3 42

# ------------------------------------------------ proxy_protocol off
note "proxy_protocol off"
for v in 1.3 1.2; do
	run_curl "$PLAIN" "plain-$v" "$v" file
	body=$(cat "$E2E_DIR/curl.body" 2>/dev/null)
	if [ "$RC" -eq 0 ] && [ "$body" = "hello from backend: GET /plain-$v HTTP/1.1" ] && ! grep -q '^< X-Proxy' <<<"$OUT"; then
		ok "proxy_protocol off, curl TLS $v with a client certificate: plain HTTP, the backend saw no PROXY header"
		N_THROUGH=$((N_THROUGH + 1))
	else
		fail "proxy_protocol off, TLS $v: exit $RC, body '$body'"
		show_out 10
	fi
done
run_curl "$PLAIN" plain-none 1.3 none
refused "proxy_protocol off, curl TLS 1.3 without a certificate" 1.3 116
check_eq "the backend logged no malformed PROXY header from the daemon" "$BAD_PP_LINES" \
	"$(grep -c 'bad PROXY v2 header' "$E2E_DIR/backend.err")"

# ------------------------------------------------------------- counters
usage_snapshot "$E2E_DIR/usage-after" || fail "cannot read the usage counters with SIGUSR1 (after)"
stop_daemon 10
check_eq "hsmtlsd exits 0 on SIGTERM" 0 "$DAEMON_RC"
stopped=$(sed -n 's/.* stopped: \([0-9]*\) handshakes completed, \([0-9]*\) failed.*/\1 \2/p' "$DAEMON_LOG")
check_eq "handshakes completed / failed = clients through / refused" "$N_THROUGH $N_REFUSED" "$stopped"
exit_usage "$DAEMON_LOG" "$E2E_DIR/usage-exit"
d=$(($(usage_delta "$E2E_DIR/usage-before" "$E2E_DIR/usage-exit" p256 sign) +
	$(usage_delta "$E2E_DIR/usage-before" "$E2E_DIR/usage-exit" rsa2048 sign)))
check_eq "one server signature per connection (p256 + rsa2048; refused ones sign too)" "$N_CONN" "$d"
d2=$(($(usage_delta "$E2E_DIR/usage-before" "$E2E_DIR/usage-after" p256 sign) +
	$(usage_delta "$E2E_DIR/usage-before" "$E2E_DIR/usage-after" rsa2048 sign)))
check_eq "SIGUSR1 counters = exit counters" "$d" "$d2"
check_eq "no failed token operation" 0 "$(grep ' usage: ' "$DAEMON_LOG" | grep -v 'count=0$' | grep -vc ' result=ok ')"
note "connections: $N_CONN ($N_THROUGH through, $N_REFUSED refused)"
for k in "${!SEEN_ALERTS[@]}"; do note "alert seen: $k -> ${SEEN_ALERTS[$k]} ($(alert_name "${SEEN_ALERTS[$k]}"))"; done | sort
check_not "the PIN does not appear in the daemon log" grep -qF -- "$PIN" "$DAEMON_LOG"

e2e_finish
