#!/usr/bin/env bash
# e2e: OCSP stapling from a file per certificate chain (ocsp_response).
# Responses are made with tests/e2e/mk_ocsp.py (python3-cryptography),
# signed by the test CA. One listener with two chains: p256 with an
# ocsp_response, rsa2048 without. Checks with openssl s_client -status:
# the p256 chain staples the file's response (good); the rsa2048 chain
# staples nothing; the file replaced by a revoked response is stapled
# within a few seconds (re-read when it changes); replaced by a response
# that is out of date, or one about another certificate, nothing is stapled
# and the log says why. At start: a file about another certificate, or a
# missing file, stops the start with the reason; an out-of-date one is
# loaded with a warning and not stapled. The file is read on hsmtlsd's
# OCSP file thread, never on a handshake: a FIFO renamed over it, or a file
# over 64 KiB, is not read (logged once, with the reason), the last good
# response stays stapled, and 4 -status clients and a plain one at once
# are all served within handshake_timeout; a regular file again is stapled.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools openssl python3
python3 -c 'import cryptography.x509.ocsp' 2>/dev/null || skip "python3-cryptography is missing"
e2e_init
provision_token
start_backend
MK=$SRCDIR/tests/e2e/mk_ocsp.py
# certtool may write an EC private key a byte short (a leading zero), which
# python3-cryptography refuses; openssl writes it at full length.
openssl pkey -in "$TOKEN_DIR/ca.key" -out "$E2E_DIR/ca.key" 2>/dev/null || bail "openssl pkey: the CA key"
mk() { # CHAIN STATUS THIS NEXT OUT
	python3 "$MK" "$1" "$HSMTLS_CA" "$E2E_DIR/ca.key" "$2" "$3" "$4" "$5" || bail "mk_ocsp.py $*"
}
RESP=$E2E_DIR/web.der
mk "$HSMTLS_CERT_P256" good -60 3600 "$RESP"

HS_TIMEOUT=8
mkconf() { # FILE OCSP-FILE
	printf '[global]\nlog_level = info\ndrain_timeout = 5s\n\n' >"$1"
	write_token_section "$1"
	write_listener "$1" web "ocsp_response = $2" "cert = $HSMTLS_CERT_RSA2048" "key = $HSMTLS_KEY_RSA2048" \
		"handshake_timeout = ${HS_TIMEOUT}s"
}
mkconf "$E2E_DIR/ocsp.conf" "$RESP"
start_daemon "$E2E_DIR/ocsp.conf" || bail "daemon did not start"
PORT=$(listener_port web)
[ -n "$PORT" ] || bail "no port for listener web"
check_grep "daemon log: the response is loaded" "$DAEMON_LOG" "listener web: OCSP response .*web\\.der loaded \\([0-9]+ bytes, next update "

# stapled [s_client args]: the client's view of the staple in STAPLE
# (good, revoked, none) and OUT.
stapled() {
	OUT=$(openssl_get "$PORT" www.hsmtls.test ocsp -status "$@" 2>&1)
	if grep -q 'OCSP response: no response sent' <<<"$OUT"; then
		STAPLE=none
	else
		STAPLE=$(sed -n 's/^ *Cert Status: //p' <<<"$OUT" | head -n 1)
		STAPLE=${STAPLE:-?}
	fi
	grep -q '^hello from backend: GET /ocsp HTTP/1.1' <<<"$OUT" || STAPLE="no answer ($STAPLE)"
}
staple_is() { stapled "${@:2}"; [ "$STAPLE" = "$1" ]; }

for v in 1.3 1.2; do
	stapled "-tls${v/./_}" -sigalgs ecdsa_secp256r1_sha256
	check_eq "TLS $v, the p256 chain: the file's response is stapled" good "$STAPLE"
	grep -q 'OCSP Response Status: successful' <<<"$OUT" || fail "TLS $v: no 'OCSP Response Status: successful' in the client's output"
	stapled "-tls${v/./_}" -sigalgs rsa_pss_rsae_sha256:rsa_pkcs1_sha256
	check_eq "TLS $v, the rsa2048 chain (no ocsp_response): nothing stapled" none "$STAPLE"
done

mk "$HSMTLS_CERT_P256" revoked -60 3600 "$RESP"
if wait_until 10 staple_is revoked -sigalgs ecdsa_secp256r1_sha256; then
	ok "the file replaced by a revoked response: the new one is stapled (re-read)"
else
	fail "after replacing the file: the staple is '$STAPLE', want revoked"
fi

mk "$HSMTLS_CERT_P256" good -7200 -3600 "$RESP"
if wait_until 10 staple_is none -sigalgs ecdsa_secp256r1_sha256; then
	ok "the file replaced by an out-of-date response: nothing stapled"
else
	fail "out-of-date response: the staple is '$STAPLE', want none"
fi
check_grep "daemon log: why it is not stapled" "$DAEMON_LOG" "listener web: OCSP response .*web\\.der not stapled: it is out of date"

mk "$HSMTLS_CERT_P256" good -60 3600 "$RESP"
wait_until 10 staple_is good -sigalgs ecdsa_secp256r1_sha256 || fail "a good response again: the staple is '$STAPLE'"
mk "$HSMTLS_CERT_RSA2048" good -60 3600 "$RESP"
if wait_until 10 staple_is none -sigalgs ecdsa_secp256r1_sha256; then
	ok "the file replaced by a response about another certificate: nothing stapled"
else
	fail "a response about another certificate: the staple is '$STAPLE', want none"
fi
check_grep "daemon log: another certificate" "$DAEMON_LOG" "OCSP response .*web\\.der not stapled: it is about another certificate"

# ------------------------------------------------------------ a file that would block
# A FIFO renamed over the file (a read of it would wait for a writer
# forever), then a file over 64 KiB: neither is read; every handshake is
# served within handshake_timeout, those that ask get the last good
# response, and the log names the file and the reason once.
mk "$HSMTLS_CERT_P256" good -60 3600 "$RESP"
wait_until 10 staple_is good -sigalgs ecdsa_secp256r1_sha256 || fail "a good response before the FIFO: the staple is '$STAPLE'"
mkfifo "$E2E_DIR/fifo" || bail "mkfifo"
mv -f "$E2E_DIR/fifo" "$RESP" || bail "mv fifo"
# clients CLIENT-ARGS...: 4 clients with -status and a plain one at once,
# each given the listener's handshake_timeout; sets SERVED (of 5) and
# STAPLES (how many of the 4 saw a good staple).
clients() {
	local i pids=()
	for i in 1 2 3 4 5; do
		if [ "$i" = 5 ]; then set -- -sigalgs ecdsa_secp256r1_sha256; else set -- -status -sigalgs ecdsa_secp256r1_sha256; fi
		printf 'GET /ocsp HTTP/1.1\r\nHost: www.hsmtls.test\r\nConnection: close\r\n\r\n' |
			timeout "$HS_TIMEOUT" openssl s_client -connect "127.0.0.1:$PORT" -servername www.hsmtls.test \
				-CAfile "$HSMTLS_CA" -verify_return_error -ign_eof "$@" >"$E2E_DIR/client-$i.out" 2>&1 &
		pids+=("$!")
	done
	wait "${pids[@]}"
	SERVED=$(grep -l '^hello from backend: GET /ocsp HTTP/1.1' "$E2E_DIR"/client-[1-5].out | wc -l)
	STAPLES=$(grep -l '^ *Cert Status: good' "$E2E_DIR"/client-[1-4].out | wc -l)
}
# the clients come after hsmtlsd has looked at the file (the log line; the
# code before this fix read it in the first handshake of the next second)
wait_until 10 grep -q "listener web: OCSP response .*web\\.der not read: it is a FIFO, not a regular file; still stapling the response valid until " \
	"$DAEMON_LOG" || fail "daemon log: no line naming the file and why it is not read (a FIFO)"
clients
check_eq "the file is a FIFO: 4 clients with -status and a plain one, all served within handshake_timeout (${HS_TIMEOUT}s)" 5 "$SERVED"
check_eq "the file is a FIFO: the clients that ask get the last good response" 4 "$STAPLES"
check_eq "daemon log: the FIFO is reported once" 1 "$(grep -c 'web\.der not read: it is a FIFO' "$DAEMON_LOG")"
head -c 70000 /dev/urandom >"$E2E_DIR/big.der"
mv -f "$E2E_DIR/big.der" "$RESP"
wait_until 10 grep -q "listener web: OCSP response .*web\\.der not read: it is larger than 65536 bytes (70000); still stapling" \
	"$DAEMON_LOG" || fail "daemon log: no line saying the file over 64 KiB is not read"
clients
check_eq "a file over 64 KiB: all 5 clients served" 5 "$SERVED"
check_eq "a file over 64 KiB: the last good response still stapled" 4 "$STAPLES"
mk "$HSMTLS_CERT_P256" revoked -60 3600 "$RESP"
if wait_until 10 staple_is revoked -sigalgs ecdsa_secp256r1_sha256; then
	ok "a regular file again after the FIFO: its response is stapled"
else
	fail "a regular file after the FIFO: the staple is '$STAPLE', want revoked"
fi
stop_daemon 10
check_eq "hsmtlsd exits 0 on SIGTERM" 0 "$DAEMON_RC"

# ------------------------------------------------------------ at start
refused() { # DESC OCSP-FILE REGEX
	local conf=$E2E_DIR/bad.conf log=$E2E_DIR/bad.log rc=0
	mkconf "$conf" "$2"
	timeout 20 "$HSMTLSD" -c "$conf" >/dev/null 2>"$log" </dev/null || rc=$?
	if [ "$rc" != 0 ] && [ "$rc" != 124 ] && grep -qE "$3" "$log"; then
		ok "$1: the start is refused: $(grep -E "$3" "$log" | head -n 1 | sed 's/.*error: //' | cut -c1-150)"
	else
		fail "$1: status $rc: $(tail -n 2 "$log" | tr '\n' ' ')"
	fi
}
mk "$HSMTLS_CERT_RSA2048" good -60 3600 "$E2E_DIR/other.der"
refused "a response about another certificate" "$E2E_DIR/other.der" 'bad\.conf:[0-9]+: OCSP response .*other\.der: it is about another certificate'
refused "a missing file" "$E2E_DIR/missing.der" 'bad\.conf:[0-9]+: OCSP response .*missing\.der: No such file'
mkfifo "$E2E_DIR/start.fifo" || bail "mkfifo"
refused "a FIFO (not read: it would block)" "$E2E_DIR/start.fifo" 'bad\.conf:[0-9]+: OCSP response .*start\.fifo: it is a FIFO, not a regular file'
mk "$HSMTLS_CERT_P256" good -7200 -3600 "$E2E_DIR/old.der"
mkconf "$E2E_DIR/old.conf" "$E2E_DIR/old.der"
start_daemon "$E2E_DIR/old.conf" "$E2E_DIR/old.log" || bail "the daemon with an out-of-date response did not start"
PORT=$(listener_port web)
stapled -sigalgs ecdsa_secp256r1_sha256
check_eq "an out-of-date response at start: the daemon starts and staples nothing" none "$STAPLE"
check_grep "daemon log: the warning at start" "$DAEMON_LOG" "OCSP response .*old\\.der not stapled: it is out of date"
stop_daemon 10
e2e_finish
