#!/usr/bin/env bash
# e2e: TLS 1.2 static RSA key exchange. A listener without
# rsa_key_exchange refuses clients that offer only RSA key transport; with
# rsa_key_exchange = yes they work, the premaster is decrypted on the token
# (usage op=decrypt mech=CKM_RSA_X_509, raw RSA since SoftHSM offers it,
# one per such handshake) and no
# signature is made for them.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools gnutls-cli openssl curl
e2e_init
provision_token
start_backend

conf=$E2E_DIR/rsa-kx.conf
printf '[global]\nlog_level = info\ndrain_timeout = 5s\n\n' >"$conf"
write_token_section "$conf"
for l in nokx kx; do
	write_listener "$conf" "$l" "cert = $HSMTLS_CERT_RSA2048" "key = $HSMTLS_KEY_RSA2048"
	if [ "$l" = nokx ]; then
		printf 'rsa_key_exchange = no\n\n' >>"$conf"
	else
		printf 'rsa_key_exchange = yes\n\n' >>"$conf"
	fi
done

start_daemon "$conf" || bail "daemon did not start"
NOKX=$(listener_port nokx)
KX=$(listener_port kx)
[ -n "$NOKX" ] && [ -n "$KX" ] || bail "no ports in the log"
check_grep "listener kx reports RSA key exchange enabled" "$DAEMON_LOG" 'listener kx: listening on .*RSA key exchange enabled'
check_not "listener nokx does not report RSA key exchange" grep -q 'listener nokx: listening on .*RSA key exchange' "$DAEMON_LOG"
usage_snapshot "$E2E_DIR/usage-before" || bail "cannot read the usage counters with SIGUSR1"

RSA_PRIO='NORMAL:-VERS-ALL:+VERS-TLS1.2:-KX-ALL:+RSA'
RSA_CIPHER=AES256-GCM-SHA384
n_kx=0    # static RSA handshakes that completed
declare -A sig=([rsa2048]=0 [p256]=0)

# ---- without rsa_key_exchange: refused, nothing reaches the backend
out=$(gnutls_get "$NOKX" www.hsmtls.test "$RSA_PRIO" nokx-gnutls)
rc=$?
if [ "$rc" -ne 0 ] && ! grep -q 'hello from backend' <<<"$out"; then
	ok "nokx: gnutls-cli with only RSA key exchange is refused (exit $rc: $(grep -m1 -o '\*\*\* .*' <<<"$out"))"
else
	fail "nokx: gnutls-cli with only RSA key exchange: exit $rc"
	tail -n 8 <<<"$out" | sed 's/^/#   /'
fi
out=$(openssl_get "$NOKX" www.hsmtls.test nokx-openssl -tls1_2 -cipher "$RSA_CIPHER")
rc=$?
if [ "$rc" -ne 0 ] && ! grep -q 'hello from backend' <<<"$out"; then
	ok "nokx: openssl s_client -tls1_2 -cipher $RSA_CIPHER is refused (exit $rc)"
	# The refusal should be a TLS alert (handshake_failure, 40), not a bare
	# TCP close.
	if grep -q 'alert handshake failure\|SSL alert number 40' <<<"$out"; then
		ok "nokx: the client gets a handshake_failure alert"
	else
		fail "nokx: the client gets a handshake_failure alert, not: $(grep -m1 -o "error:[^:]*:[^:]*:[^:]*:[^:]*" <<<"$out")"
	fi
else
	fail "nokx: openssl s_client -tls1_2 -cipher $RSA_CIPHER: exit $rc"
	grep -E 'Cipher|alert|error' <<<"$out" | head -n 5 | sed 's/^/#   /'
fi
out=$(curl_get "$NOKX" www.hsmtls.test --tlsv1.2 --tls-max 1.2 --ciphers "$RSA_CIPHER" "https://www.hsmtls.test:$NOKX/nokx-curl" 2>&1)
rc=$?
if [ "$rc" -ne 0 ] && ! grep -q 'hello from backend' <<<"$out"; then
	ok "nokx: curl --ciphers $RSA_CIPHER is refused (exit $rc)"
else
	fail "nokx: curl --ciphers $RSA_CIPHER: exit $rc: $out"
fi
# The same listener still serves ECDHE.
out=$(gnutls_get "$NOKX" www.hsmtls.test 'NORMAL:-VERS-ALL:+VERS-TLS1.2:-KX-ALL:+ECDHE-RSA' nokx-ecdhe)
if grep -q '^hello from backend: GET /nokx-ecdhe ' <<<"$out" && grep -q '(TLS1.2-X.509)-(ECDHE-[^)]*)-(RSA' <<<"$out"; then
	ok "nokx: ECDHE-RSA in TLS 1.2 still works"
	sig[rsa2048]=$((sig[rsa2048] + 1))
else
	fail "nokx: ECDHE-RSA in TLS 1.2"
	tail -n 8 <<<"$out" | sed 's/^/#   /'
fi

# ---- with rsa_key_exchange = yes
for i in 1 2 3; do
	out=$(gnutls_get "$KX" www.hsmtls.test "$RSA_PRIO" "kx-gnutls-$i")
	if grep -q "^hello from backend: GET /kx-gnutls-$i " <<<"$out" && grep -q '^- Description: (TLS1.2-X.509)-(RSA)-' <<<"$out" &&
		grep -q 'Certificate\[0\] info' -A1 <<<"$out" && grep -A1 'Certificate\[0\] info' <<<"$out" | grep -q 'RSA key 2048'; then
		ok "kx: gnutls-cli RSA key exchange #$i: $(sed -n 's/^- Description: //p' <<<"$out")"
		n_kx=$((n_kx + 1))
	else
		fail "kx: gnutls-cli RSA key exchange #$i"
		tail -n 8 <<<"$out" | sed 's/^/#   /'
	fi
done
for i in 1 2; do
	out=$(openssl_get "$KX" www.hsmtls.test "kx-openssl-$i" -tls1_2 -cipher "$RSA_CIPHER")
	if grep -q "^hello from backend: GET /kx-openssl-$i " <<<"$out" && grep -q "Cipher is $RSA_CIPHER" <<<"$out" &&
		grep -q '^Verification: OK' <<<"$out"; then
		ok "kx: openssl s_client -tls1_2 -cipher $RSA_CIPHER #$i"
		n_kx=$((n_kx + 1))
	else
		fail "kx: openssl s_client -tls1_2 -cipher $RSA_CIPHER #$i"
		grep -E 'Cipher|alert|error|hello' <<<"$out" | head -n 5 | sed 's/^/#   /'
	fi
done
out=$(curl_get "$KX" www.hsmtls.test -v --tlsv1.2 --tls-max 1.2 --ciphers "$RSA_CIPHER" "https://www.hsmtls.test:$KX/kx-curl" 2>&1)
if grep -q '^hello from backend: GET /kx-curl ' <<<"$out" && grep -q "SSL connection using TLSv1.2 / $RSA_CIPHER" <<<"$out"; then
	ok "kx: curl --tlsv1.2 --ciphers $RSA_CIPHER"
	n_kx=$((n_kx + 1))
else
	fail "kx: curl --tlsv1.2 --ciphers $RSA_CIPHER"
	tail -n 8 <<<"$out" | sed 's/^/#   /'
fi
# ECDHE (TLS 1.3 and 1.2) still preferred by ordinary clients on that listener.
out=$(gnutls_get "$KX" www.hsmtls.test 'NORMAL:-VERS-ALL:+VERS-TLS1.3:-SIGN-ALL:+SIGN-ECDSA-SECP256R1-SHA256' kx-tls13)
if grep -q '^hello from backend: GET /kx-tls13 ' <<<"$out" && grep -q '(TLS1.3-X.509)-(ECDHE-[^)]*)-(ECDSA' <<<"$out"; then
	ok "kx: TLS 1.3 ECDSA client works"
	sig[p256]=$((sig[p256] + 1))
else
	fail "kx: TLS 1.3 ECDSA client"
	tail -n 8 <<<"$out" | sed 's/^/#   /'
fi
out=$(openssl_get "$KX" www.hsmtls.test kx-openssl-default -tls1_2 -sigalgs RSA+SHA256)
if grep -q '^hello from backend: GET /kx-openssl-default ' <<<"$out" && grep -q 'Cipher is ECDHE-RSA' <<<"$out"; then
	ok "kx: an ordinary TLS 1.2 client still gets ECDHE ($(sed -n 's/.*Cipher is //p' <<<"$out" | head -n1))"
	sig[rsa2048]=$((sig[rsa2048] + 1))
else
	fail "kx: an ordinary TLS 1.2 client should get ECDHE: $(grep 'Cipher is' <<<"$out")"
fi

usage_snapshot "$E2E_DIR/usage-after" || fail "cannot read the usage counters with SIGUSR1 (after)"
stop_daemon 10
check_eq "hsmtlsd exits 0 on SIGTERM" 0 "$DAEMON_RC"
awk '/ stopped: /{f=1} f && / usage: /' "$DAEMON_LOG" >"$E2E_DIR/usage-exit"

d=$(usage_delta "$E2E_DIR/usage-before" "$E2E_DIR/usage-exit" rsa2048 decrypt CKM_RSA_X_509)
check_eq "rsa2048: op=decrypt mech=CKM_RSA_X_509 count = static RSA handshakes" "$n_kx" "$d"
check_eq "rsa2048: all decryptions are CKM_RSA_X_509" "$d" \
	"$(usage_delta "$E2E_DIR/usage-before" "$E2E_DIR/usage-exit" rsa2048 decrypt)"
check_eq "rsa2048: sign count = ECDHE-RSA handshakes (none for RSA key exchange)" "${sig[rsa2048]}" \
	"$(usage_delta "$E2E_DIR/usage-before" "$E2E_DIR/usage-exit" rsa2048 sign)"
check_eq "p256: sign count = ECDSA handshakes" "${sig[p256]}" \
	"$(usage_delta "$E2E_DIR/usage-before" "$E2E_DIR/usage-exit" p256 sign)"
check_eq "SIGUSR1 counters = exit counters (decrypt)" "$d" \
	"$(usage_delta "$E2E_DIR/usage-before" "$E2E_DIR/usage-after" rsa2048 decrypt CKM_RSA_X_509)"
check_eq "no failed token operation in the usage lines" 0 \
	"$(grep ' usage: ' "$DAEMON_LOG" | grep -v 'count=0$' | grep -vc ' result=ok ')"
check_eq "handshakes completed (static RSA + ECDHE)" $((n_kx + sig[rsa2048] + sig[p256])) \
	"$(sed -n 's/.*stopped: \([0-9]*\) handshakes completed.*/\1/p' "$DAEMON_LOG")"

e2e_finish
