#!/usr/bin/env bash
# e2e: real TLS clients (gnutls-cli, openssl s_client, curl) against one
# listener with four token keys: RSA-2048 + ECDSA P-256 for www.hsmtls.test
# (and localhost, 127.0.0.1), P-384 for api.hsmtls.test, Ed25519 for
# ed.hsmtls.test. Checks protocol versions, certificate selection by SNI and
# by the client's signature algorithms, that the answer comes from the
# backend, and that the token's usage counters moved by exactly the number
# of handshakes made with each key (counted here from what the clients saw).
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools gnutls-cli openssl curl
e2e_init
provision_token
start_backend

conf=$E2E_DIR/tls-clients.conf
printf '[global]\nlog_level = info\ndrain_timeout = 5s\n\n' >"$conf"
write_token_section "$conf"
cat >>"$conf" <<EOF
[listener www]
listen = 127.0.0.1:0
backend = 127.0.0.1:$BACKEND_PORT
cert = $HSMTLS_CERT_RSA2048
key = $HSMTLS_KEY_RSA2048
cert = $HSMTLS_CERT_P256
key = $HSMTLS_KEY_P256
cert = $HSMTLS_CERT_P384
key = $HSMTLS_KEY_P384
cert = $HSMTLS_CERT_ED25519
key = $HSMTLS_KEY_ED25519
EOF

start_daemon "$conf" || bail "daemon did not start"
PORT=$(listener_port www)
[ -n "$PORT" ] || bail "no port for listener www in the log"
note "hsmtlsd listening on 127.0.0.1:$PORT, backend on $BACKEND_PORT"

# Counters at the start: loading a chain may already have used a key (GnuTLS
# checks that key and certificate match with a test signature).
usage_snapshot "$E2E_DIR/usage-before" || bail "cannot read the usage counters with SIGUSR1"

KEYS="rsa2048 p256 p384 ed25519"
declare -A hs_key=()      # handshakes per key, as the clients saw them
declare -A hs_mech=()     # per key/mechanism, where the client shows the signature algorithm
declare -A hs_unknown=()  # per key: handshakes whose signature mechanism the client did not show
for k in $KEYS; do
	hs_key[$k]=0
	hs_unknown[$k]=0
done
n_hs=0 # handshakes that completed

# record KEY MECH [incomplete]: one more token signature with KEY (MECH ""
# if the client did not say which); a third argument means the client
# aborted the handshake after the server had signed.
record() {
	[ -n "$1" ] || return 0
	hs_key[$1]=$((${hs_key[$1]:-0} + 1))
	if [ -n "$2" ]; then
		hs_mech[$1/$2]=$((${hs_mech[$1/$2]:-0} + 1))
	else
		hs_unknown[$1]=$((${hs_unknown[$1]:-0} + 1))
	fi
	[ $# -ge 3 ] || n_hs=$((n_hs + 1))
}

# verdict DESC OUT EXP_KEY GOT_KEY EXP_VER GOT_VER PATH: the checks common
# to all clients.
verdict() {
	local desc=$1 out=$2 ek=$3 gk=$4 ev=$5 gv=$6 path=$7 bad=""
	[[ $gk =~ ^($ek)$ ]] || bad+=" key=${gk:-none} (expected $ek)"
	[ "$gv" = "$ev" ] || bad+=" version=${gv:-none} (expected $ev)"
	grep -q "^hello from backend: GET /$path HTTP/1.1" <<<"$out" || bad+=" no answer from the backend"
	if [ -z "$bad" ]; then
		ok "$desc: $gv, $gk key, answer from the backend"
	else
		fail "$desc:$bad"
		printf '%s\n' "$out" | grep -vE '^ *[0-9a-f]{4} - |^[A-Za-z0-9+/=]{64}$' | tail -n 25 | sed 's/^/#   /'
	fi
}

# ---- gnutls-cli: key from "Certificate[0] info", version and signature
# algorithm from "- Description: (TLS1.3-X.509)-(kx)-(sig)-(cipher)".
gnutls_key() {
	awk '/Certificate\[0\] info/ { getline
		if ($0 ~ /RSA key 2048/) print "rsa2048"
		else if ($0 ~ /EC\/ECDSA key 256/) print "p256"
		else if ($0 ~ /EC\/ECDSA key 384/) print "p384"
		else if ($0 ~ /Ed25519/) print "ed25519"
		else print "other"
		exit }'
}
gnutls_ver() { sed -n 's/^- Description: (\(TLS1\.[0-9]\)-.*/\1/p' | head -n 1; }
gnutls_mech() {
	local sig
	sig=$(sed -n 's/^- Description: ([^)]*)-([^)]*)-(\([^)]*\)).*/\1/p' | head -n 1)
	case $sig in
	RSA-PSS*) echo CKM_RSA_PKCS_PSS ;;
	RSA-*) echo CKM_RSA_PKCS ;;
	ECDSA*) echo CKM_ECDSA ;;
	EdDSA*) echo CKM_EDDSA ;;
	*) echo "" ;;
	esac
}

n=0
t_gnutls() { # DESC EXP_KEY EXP_VER SNI PRIORITY
	local out key ver mech path
	n=$((n + 1))
	path="gnutls-$n"
	out=$(gnutls_get "$PORT" "$4" "$5" "$path")
	key=$(gnutls_key <<<"$out")
	ver=$(gnutls_ver <<<"$out")
	mech=$(gnutls_mech <<<"$out")
	[ -n "$ver" ] && record "$key" "$mech"
	verdict "gnutls-cli $1" "$out" "$2" "$key" "$3" "$ver" "$path"
}

# ---- openssl s_client: key from the leaf's "a:PKEY:" line, version from
# "Protocol  :", signature from "Peer signature type:".
openssl_key() {
	awk '/^ *a:PKEY:/ {
		if ($0 ~ /rsaEncryption, 2048/) print "rsa2048"
		else if ($0 ~ /id-ecPublicKey, 256/) print "p256"
		else if ($0 ~ /id-ecPublicKey, 384/) print "p384"
		else if ($0 ~ /ED25519/) print "ed25519"
		else print "other"
		exit }'
}
openssl_ver() { sed -n 's/^ *Protocol *: TLSv\(1\.[0-9]\)$/TLS\1/p' | head -n 1; }
openssl_mech() {
	case $(sed -n 's/^Peer signature type: //p' | head -n 1) in
	RSA-PSS) echo CKM_RSA_PKCS_PSS ;;
	RSA) echo CKM_RSA_PKCS ;;
	ECDSA) echo CKM_ECDSA ;;
	[Ee]d25519) echo CKM_EDDSA ;;
	*) echo "" ;;
	esac
}

t_openssl() { # DESC EXP_KEY EXP_VER SNI S_CLIENT-ARGS...
	local desc=$1 ek=$2 ev=$3 sni=$4 out key ver mech path
	shift 4
	n=$((n + 1))
	path="openssl-$n"
	out=$(openssl_get "$PORT" "$sni" "$path" "$@")
	key=$(openssl_key <<<"$out")
	ver=$(openssl_ver <<<"$out")
	mech=$(openssl_mech <<<"$out")
	grep -q '^Verification: OK' <<<"$out" || ver="$ver(verification failed)"
	[ -n "$key" ] && record "$key" "$mech"
	verdict "openssl s_client $desc" "$out" "$ek" "$key" "$ev" "$ver" "$path"
}

# ---- curl: key from -w '%{certs}' (first "Public Key Algorithm:" and
# "Subject:"), version from -v ("SSL connection using TLSv1.3 / ...").
# curl does not show the signature algorithm: RSA in TLS 1.3 is always
# RSA-PSS, RSA in TLS 1.2 may be either.
curl_key() {
	awk -F: '
		/^Subject:/ && !subj { subj = $0 }
		/^Public Key Algorithm:/ && !alg { alg = $2 }
		END {
			if (alg ~ /rsaEncryption/) print "rsa2048"
			else if (alg ~ /id-ecPublicKey/ && subj ~ /api\.hsmtls\.test/) print "p384"
			else if (alg ~ /id-ecPublicKey/) print "p256"
			else if (alg ~ /ED25519/) print "ed25519"
			else if (alg != "") print "other"
		}'
}
curl_ver() { sed -n 's/^\* SSL connection using TLSv\(1\.[0-9]\) .*/TLS\1/p' | head -n 1; }

t_curl() { # DESC EXP_KEY EXP_VER HOST URL-HOST CURL-ARGS...
	local desc=$1 ek=$2 ev=$3 host=$4 urlhost=$5 out key ver mech path
	shift 5
	n=$((n + 1))
	path="curl-$n"
	out=$(curl_get "$PORT" "$host" -v -w '%{certs}' "$@" "https://$urlhost:$PORT/$path" 2>&1)
	key=$(curl_key <<<"$out")
	ver=$(curl_ver <<<"$out")
	mech=""
	[ "$key" != p256 ] && [ "$key" != p384 ] || mech=CKM_ECDSA
	[ "$key" != ed25519 ] || mech=CKM_EDDSA
	[ "$key/$ver" != rsa2048/TLS1.3 ] || mech=CKM_RSA_PKCS_PSS
	[ -n "$ver" ] && record "$key" "$mech"
	verdict "curl $desc" "$out" "$ek" "$key" "$ev" "$ver" "$path"
}

V13='NORMAL:-VERS-ALL:+VERS-TLS1.3'
V12='NORMAL:-VERS-ALL:+VERS-TLS1.2'

note "gnutls-cli"
t_gnutls "TLS 1.3, www, RSA-PSS only" rsa2048 TLS1.3 www.hsmtls.test \
	"$V13:-SIGN-ALL:+SIGN-RSA-PSS-RSAE-SHA256:+SIGN-RSA-PSS-RSAE-SHA384"
t_gnutls "TLS 1.3, www, ECDSA only" p256 TLS1.3 www.hsmtls.test \
	"$V13:-SIGN-ALL:+SIGN-ECDSA-SECP256R1-SHA256:+SIGN-ECDSA-SECP384R1-SHA384"
t_gnutls "TLS 1.2, www, RSA PKCS#1 v1.5 only" rsa2048 TLS1.2 www.hsmtls.test \
	"$V12:-SIGN-ALL:+SIGN-RSA-SHA256"
t_gnutls "TLS 1.2, www, ECDSA only" p256 TLS1.2 www.hsmtls.test \
	"$V12:-SIGN-ALL:+SIGN-ECDSA-SHA256"
t_gnutls "TLS 1.2, www, ECDHE-RSA only" rsa2048 TLS1.2 www.hsmtls.test \
	"$V12:-KX-ALL:+ECDHE-RSA"
t_gnutls "TLS 1.3, api (SNI)" p384 TLS1.3 api.hsmtls.test "$V13"
t_gnutls "TLS 1.2, api (SNI)" p384 TLS1.2 api.hsmtls.test "$V12"
t_gnutls "TLS 1.3, ed (SNI), Ed25519 only" ed25519 TLS1.3 ed.hsmtls.test \
	"$V13:-SIGN-ALL:+SIGN-EDDSA-ED25519"
t_gnutls "TLS 1.3, localhost (SNI), ECDSA only" p256 TLS1.3 localhost \
	"$V13:-SIGN-ALL:+SIGN-ECDSA-SECP256R1-SHA256"

note "openssl s_client"
t_openssl "-tls1_3, www, rsa_pss_rsae_sha256 only" rsa2048 TLS1.3 www.hsmtls.test \
	-tls1_3 -sigalgs rsa_pss_rsae_sha256
t_openssl "-tls1_3, www, ECDSA only" p256 TLS1.3 www.hsmtls.test \
	-tls1_3 -sigalgs ecdsa_secp256r1_sha256
t_openssl "-tls1_2, www, RSA+SHA256 only" rsa2048 TLS1.2 www.hsmtls.test \
	-tls1_2 -sigalgs RSA+SHA256
t_openssl "-tls1_2, www, rsa_pss_rsae_sha256 only" rsa2048 TLS1.2 www.hsmtls.test \
	-tls1_2 -sigalgs rsa_pss_rsae_sha256
t_openssl "-tls1_2, www, ECDSA+SHA256 only" p256 TLS1.2 www.hsmtls.test \
	-tls1_2 -sigalgs ECDSA+SHA256
t_openssl "-tls1_3, api (SNI)" p384 TLS1.3 api.hsmtls.test -tls1_3
t_openssl "-tls1_2, api (SNI)" p384 TLS1.2 api.hsmtls.test -tls1_2
t_openssl "-tls1_3, ed (SNI), ed25519 only" ed25519 TLS1.3 ed.hsmtls.test -tls1_3 -sigalgs ed25519
t_openssl "-tls1_2, ed (SNI), ed25519 only" ed25519 TLS1.2 ed.hsmtls.test -tls1_2 -sigalgs ed25519

note "curl"
t_curl "--tlsv1.3, www" "rsa2048|p256" TLS1.3 www.hsmtls.test www.hsmtls.test --tlsv1.3
t_curl "--tlsv1.2 --tls-max 1.2, www" "rsa2048|p256" TLS1.2 www.hsmtls.test www.hsmtls.test --tlsv1.2 --tls-max 1.2
t_curl "--tlsv1.2 --tls-max 1.2, www, RSA ciphers only" rsa2048 TLS1.2 www.hsmtls.test www.hsmtls.test \
	--tlsv1.2 --tls-max 1.2 --ciphers ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256
t_curl "--tlsv1.3, api (SNI)" p384 TLS1.3 api.hsmtls.test api.hsmtls.test --tlsv1.3
t_curl "--tlsv1.2 --tls-max 1.2, api (SNI)" p384 TLS1.2 api.hsmtls.test api.hsmtls.test --tlsv1.2 --tls-max 1.2
t_curl "--tlsv1.3, ed (SNI)" ed25519 TLS1.3 ed.hsmtls.test ed.hsmtls.test --tlsv1.3
t_curl "--tlsv1.3, https://127.0.0.1 (no SNI)" "rsa2048|p256" TLS1.3 127.0.0.1 127.0.0.1 --tlsv1.3

# A name the listener has no certificate for: the server still answers
# with one of its chains, and the client refuses it (name mismatch) after the
# server signed; nothing reaches the backend.
n=$((n + 1))
out=$(gnutls_get "$PORT" nothere.hsmtls.test "$V13" "gnutls-$n")
rc=$?
key=$(gnutls_key <<<"$out")
case $key in # TLS 1.3: RSA signs with PSS, whatever the client aborted on
rsa2048) mech=CKM_RSA_PKCS_PSS ;;
p256 | p384) mech=CKM_ECDSA ;;
*) mech="" ;;
esac
record "$key" "$mech" incomplete
if [ "$rc" -ne 0 ] && ! grep -q 'hello from backend' <<<"$out" && grep -q 'PKI verification\|NOT trusted' <<<"$out"; then
	ok "gnutls-cli to an unknown name (nothere.hsmtls.test) refuses the certificate (${key:-no} key)"
else
	fail "gnutls-cli to an unknown name: exit $rc"
	printf '%s\n' "$out" | tail -n 10 | sed 's/^/#   /'
fi

# Session resumption (gnutls-cli --resume: a full handshake, then a second
# connection that resumes it): the resumed handshake uses no token key.
n_resumed=0
for v in 1.3 1.2; do
	n=$((n + 1))
	out=$(gnutls_get "$PORT" www.hsmtls.test "NORMAL:-VERS-ALL:+VERS-TLS$v:-SIGN-ALL:+SIGN-ECDSA-SECP256R1-SHA256:+SIGN-ECDSA-SHA256" \
		"gnutls-$n" --resume)
	key=$(gnutls_key <<<"$out")
	if [ "$key" = p256 ] && grep -q '^\*\*\* This is a resumed session' <<<"$out" &&
		grep -q "^hello from backend: GET /gnutls-$n HTTP/1.1" <<<"$out"; then
		ok "gnutls-cli --resume, TLS $v: full handshake with p256, then a resumed session answered by the backend"
		record p256 CKM_ECDSA          # the full handshake
		n_hs=$((n_hs + 1))             # the resumed one: completed, no signature
		n_resumed=$((n_resumed + 1))
	else
		fail "gnutls-cli --resume, TLS $v: key=${key:-none}, resumed=$(grep -c 'This is a resumed session' <<<"$out")"
		tail -n 8 <<<"$out" | sed 's/^/#   /'
		[ -z "$key" ] || record "$key" "$(gnutls_mech <<<"$out")"
	fi
done

# Several handshakes in parallel (one curl process each).
pids=()
for i in 1 2 3 4 5 6; do
	curl_get "$PORT" www.hsmtls.test -v --tlsv1.3 -w '%{certs}' -o "$E2E_DIR/par-body.$i" \
		"https://www.hsmtls.test:$PORT/par-$i" >"$E2E_DIR/par-info.$i" 2>&1 &
	pids+=($!)
done
par_ok=0
for i in "${!pids[@]}"; do
	j=$((i + 1))
	wait "${pids[$i]}" || continue
	grep -q "^hello from backend: GET /par-$j " "$E2E_DIR/par-body.$j" || continue
	key=$(curl_key <"$E2E_DIR/par-info.$j")
	mech=CKM_RSA_PKCS_PSS
	[ "$key" = rsa2048 ] || mech=CKM_ECDSA
	record "$key" "$mech"
	par_ok=$((par_ok + 1))
done
check_eq "6 parallel curl clients answered by the backend" 6 "$par_ok"

# ------------------------------------------------------------- counters
usage_snapshot "$E2E_DIR/usage-after" || fail "cannot read the usage counters with SIGUSR1 (after)"
stop_daemon 10
check_eq "hsmtlsd exits 0 on SIGTERM" 0 "$DAEMON_RC"

check_eq "handshakes the daemon completed = handshakes made" "$n_hs" \
	"$(sed -n 's/.*stopped: \([0-9]*\) handshakes completed.*/\1/p' "$DAEMON_LOG")"

# Exactly one token signature per handshake, per key.
# Final counters: the usage lines logged at exit (after "stopped:").
awk '/ stopped: /{f=1} f && / usage: /' "$DAEMON_LOG" >"$E2E_DIR/usage-exit"
for k in $KEYS; do
	d=$(usage_delta "$E2E_DIR/usage-before" "$E2E_DIR/usage-exit" "$k" sign)
	check_eq "key $k: sign count moved by the $k handshakes" "${hs_key[$k]}" "$d"
	d2=$(usage_delta "$E2E_DIR/usage-before" "$E2E_DIR/usage-after" "$k" sign)
	check_eq "key $k: SIGUSR1 counters = exit counters" "$d" "$d2"
done
for km in rsa2048/CKM_RSA_PKCS rsa2048/CKM_RSA_PKCS_PSS; do
	k=${km%/*} m=${km#*/}
	d=$(usage_delta "$E2E_DIR/usage-before" "$E2E_DIR/usage-exit" "$k" sign "$m")
	lo=${hs_mech[$km]:-0}
	hi=$((lo + ${hs_unknown[$k]}))
	if [ "$d" -ge "$lo" ] && [ "$d" -le "$hi" ]; then
		ok "key $k: $m count moved by $d (clients saw $lo, $((hi - lo)) undetermined)"
	else
		fail "key $k: $m count moved by $d, expected $lo..$hi"
	fi
done
for km in p256/CKM_ECDSA p384/CKM_ECDSA ed25519/CKM_EDDSA; do
	k=${km%/*} m=${km#*/}
	d=$(usage_delta "$E2E_DIR/usage-before" "$E2E_DIR/usage-exit" "$k" sign "$m")
	check_eq "key $k: $m count moved by the $k handshakes" "${hs_key[$k]}" "$d"
done
check_eq "no failed token operation in the usage lines" 0 \
	"$(grep ' usage: ' "$DAEMON_LOG" | grep -v 'count=0$' | grep -vc ' result=ok ')"
check_eq "no decryption (RSA key exchange is off)" 0 "$(usage_count "$E2E_DIR/usage-exit" rsa2048 decrypt)"
note "signatures per key (clients' view): rsa2048=${hs_key[rsa2048]} p256=${hs_key[p256]} p384=${hs_key[p384]} ed25519=${hs_key[ed25519]}"

# ------------------------------------------------------------ the token
ct=$("$SRCDIR/hsm-config/check-token" "$TOKEN_DIR" 2>&1)
rc=$?
check_eq "hsm-config/check-token exit status" 0 "$rc"
for k in $KEYS; do
	if grep -qE "^$k .* sensitive=1 extractable=0 .*status=ok" <<<"$ct"; then
		ok "key $k on the token: sensitive=1 extractable=0"
	else
		fail "key $k on the token: $(grep "^$k " <<<"$ct")"
	fi
done

# The PIN never shows up in the log.
check_not "the PIN does not appear in the daemon log" grep -qF -- "$(head -n 1 "$HSMTLS_PIN_FILE")" "$DAEMON_LOG"

e2e_finish
