#!/usr/bin/env bash
# e2e: ALPN per listener and DHE key exchange when the priority allows it.
# One daemon, PROXY v2 to the backend (which echoes the PROXY TLVs as
# X-Proxy-* lines, PP2_TYPE_ALPN as X-Proxy-ALPN):
#   alpn   alpn = h2, http/1.1 (p256)
#   plain  no alpn (p256)
#   dhe    priority with +DHE-RSA only for TLS 1.2 key exchange (rsa2048)
# Checks: openssl s_client -alpn h2 / http/1.1 / both in the client's order
# get the server's preference, the backend sees it in PP2_TYPE_ALPN and the
# log line says alpn=; a client offering only unknown protocols gets
# no_application_protocol (120) and nothing reaches the backend; a client
# without ALPN and a listener without alpn go on without (no TLV); curl
# --http1.1 and --http2 negotiate http/1.1 and h2; a DHE-only client
# (openssl -cipher DHE-RSA-AES128-GCM-SHA256 -tls1_2, and gnutls-cli with a
# DHE-only priority) is served with a DHE suite and a 2048-bit group or more.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=lib-mtls.sh
. "$(dirname "$0")/lib-mtls.sh"

need_tools openssl gnutls-cli curl
e2e_init
provision_token
start_backend

conf=$E2E_DIR/alpn-dhe.conf
printf '[global]\nlog_level = info\ndrain_timeout = 5s\n\n' >"$conf"
write_token_section "$conf"
listener() { # NAME CERT KEY EXTRA
	printf '[listener %s]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\nproxy_protocol = v2\n%s\n\n' \
		"$1" "$BACKEND_PORT" "$2" "$3" "${4:-}" >>"$conf"
}
listener alpn "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256" "alpn = h2, http/1.1"
listener plain "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
listener dhe "$HSMTLS_CERT_RSA2048" "$HSMTLS_KEY_RSA2048" \
	"priority = NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2:-KX-ALL:+DHE-RSA:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:-MAC-ALL:+AEAD"
start_daemon "$conf" || bail "daemon did not start"
declare -A P=()
for n in alpn plain dhe; do
	P[$n]=$(listener_port "$n")
	[ -n "${P[$n]}" ] || bail "no port for listener $n"
done

ossl() { # LISTENER PATH [s_client args]: sets OUT, RC
	local port=${P[$1]} path=$2
	shift 2
	RC=0
	OUT=$(openssl_get "$port" www.hsmtls.test "$path" "$@") || RC=$?
}
answered() { grep -q "^hello from backend: GET /$1 HTTP/1.1" <<<"$OUT"; }
show_out() { tr -d '\r' <<<"$OUT" | grep -vE '^ *[0-9a-f]{4} - |^[A-Za-z0-9+/=]{64}$' | tail -n 12 | sed 's/^/#   /'; }

# alpn_case DESC LISTENER OFFER WANT: openssl -alpn OFFER gets WANT (the
# client, the PROXY header, the log line).
alpn_case() {
	local desc=$1 l=$2 offer=$3 want=$4 path bad=""
	path="alpn-$l-${offer//[^a-z0-9]/_}"
	ossl "$l" "$path" -alpn "$offer"
	answered "$path" || bad+=" no answer (exit $RC);"
	grep -q "^ALPN protocol: $want\$" <<<"$OUT" || bad+=" client: '$(grep -m1 ALPN <<<"$OUT")';"
	[ "$(pp_field "$OUT" ALPN)" = "$want" ] || bad+=" backend X-Proxy-ALPN '$(pp_field "$OUT" ALPN)';"
	[[ "$(pp_field "$OUT" TLVs)" == "01 02 20"* ]] || bad+=" TLVs '$(pp_field "$OUT" TLVs)';"
	if [ -z "$bad" ]; then
		ok "$desc: $want negotiated, seen by the backend (PP2_TYPE_ALPN)"
	else
		fail "$desc:$bad"
		show_out
	fi
}
for v in 1.3 1.2; do
	alpn_case "TLS $v: -alpn h2" alpn h2 h2 -tls${v/./_}
done
alpn_case "-alpn http/1.1" alpn http/1.1 http/1.1
alpn_case "-alpn http/1.1,h2 (the server's preference wins)" alpn http/1.1,h2 h2
check_grep "daemon log: the negotiated protocol in the handshake line" "$DAEMON_LOG" \
	'listener alpn: 127\.0\.0\.1:[0-9]+: .* sni=www\.hsmtls\.test alpn=h2 key=p256 '

ossl alpn alpn-foo -alpn foo,spdy/3
a=$(alert_of "$OUT")
if ! answered alpn-foo && { [ "$a" = 120 ] || grep -q 'no application protocol' <<<"$OUT"; }; then
	ok "-alpn foo,spdy/3 (none of ours): no_application_protocol (120), nothing reached the backend"
else
	fail "-alpn foo,spdy/3: answered=$(answered alpn-foo && echo yes || echo no), alert ${a:-none}"
	show_out
fi
ossl alpn alpn-none
if answered alpn-none && grep -q '^No ALPN negotiated' <<<"$OUT" && ! pp_has "$OUT" ALPN; then
	ok "a client without ALPN on the alpn listener: served, no PP2_TYPE_ALPN"
else
	fail "a client without ALPN: answered=$(answered alpn-none && echo yes || echo no), ALPN TLV '$(pp_field "$OUT" ALPN)'"
	show_out
fi
ossl plain plain-h2 -alpn h2
if answered plain-h2 && grep -q '^No ALPN negotiated' <<<"$OUT" && ! pp_has "$OUT" ALPN; then
	ok "-alpn h2 on a listener without alpn: served without ALPN"
else
	fail "-alpn h2 on plain: answered=$(answered plain-h2 && echo yes || echo no), ALPN TLV '$(pp_field "$OUT" ALPN)'"
	show_out
fi

# curl: --http1.1 offers http/1.1 only; --http2 offers h2 first and then
# speaks HTTP/2, which the HTTP/1 test backend does not: only the
# negotiation is checked there.
out=$(curl_get "${P[alpn]}" www.hsmtls.test --http1.1 -v "https://www.hsmtls.test:${P[alpn]}/curl-11" 2>&1)
if grep -q '^hello from backend: GET /curl-11 HTTP/1.1' <<<"$out" && grep -q '^X-Proxy-ALPN: http/1.1' <<<"$out"; then
	ok "curl --http1.1: http/1.1 negotiated, seen by the backend"
else
	fail "curl --http1.1: $(grep -iE 'ALPN|hello|curl:' <<<"$out" | head -n 4 | tr '\n' ' ')"
fi
n=$(grep -c 'listener alpn: .* alpn=h2 ' "$DAEMON_LOG")
out=$(curl_get "${P[alpn]}" www.hsmtls.test --http2 -v -m 5 "https://www.hsmtls.test:${P[alpn]}/curl-2" 2>&1)
if grep -qiE 'ALPN.*accepted.*h2' <<<"$out" && wait_until 5 test "$(grep -c 'listener alpn: .* alpn=h2 ' "$DAEMON_LOG")" -gt "$n"; then
	ok "curl --http2: h2 negotiated (curl and the daemon's log line agree)"
else
	fail "curl --http2: $(grep -iE 'ALPN' <<<"$out" | head -n 3 | tr '\n' ' ')"
fi

# ----------------------------------------------------------------- DHE
ossl dhe dhe-ossl -tls1_2 -cipher DHE-RSA-AES128-GCM-SHA256
if answered dhe-ossl && grep -qE 'Cipher is DHE-RSA-AES128-GCM-SHA256|Cipher *: DHE-RSA-AES128-GCM-SHA256' <<<"$OUT"; then
	ok "openssl -tls1_2 -cipher DHE-RSA-AES128-GCM-SHA256: served with that suite ($(grep -m1 'Server Temp Key' <<<"$OUT" | tr -d '\r'))"
else
	fail "openssl DHE-only client: answered=$(answered dhe-ossl && echo yes || echo no), alert $(alert_of "$OUT"), exit $RC"
	show_out
fi
bits=$(sed -n 's/^Server Temp Key: DH, \([0-9]*\) bits.*/\1/p' <<<"$OUT" | head -n 1)
check "the DH group has at least 2048 bits (${bits:-none})" test "${bits:-0}" -ge 2048
out=$(gnutls_get "${P[dhe]}" www.hsmtls.test "NORMAL:-VERS-ALL:+VERS-TLS1.2:-KX-ALL:+DHE-RSA:-GROUP-ALL:+GROUP-SECP256R1" dhe-gnutls 2>&1)
if grep -q '^hello from backend: GET /dhe-gnutls HTTP/1.1' <<<"$out" && grep -qE '\(DHE-[A-Z0-9]+\)' <<<"$out"; then
	ok "gnutls-cli with a DHE-only priority (no FFDHE group offered): served with DHE"
else
	fail "gnutls-cli DHE-only: $(grep -E '\*\*\*|Error|Description' <<<"$out" | head -n 3 | tr '\n' ' ')"
fi
check_grep "daemon log: a DHE handshake on dhe" "$DAEMON_LOG" 'listener dhe: 127\.0\.0\.1:[0-9]+: \(TLS1\.2\)-\(DHE-'

stop_daemon 10
check_eq "hsmtlsd exits 0 on SIGTERM" 0 "$DAEMON_RC"
e2e_finish
