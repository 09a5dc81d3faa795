#!/usr/bin/env bash
# e2e: an SSLv2-format ClientHello (RFC 5246 E.2, sent by some old clients)
# is handed to GnuTLS, which answers or alerts, instead of being dropped by
# the ClientHello peek (tests/e2e/sslv2_hello.py sends one and reports the
# server's first record). One daemon:
#   rsa    the rsa2048 chain (default priority): a TLS 1.2 ServerHello
#   ec     the p256 chain: GnuTLS alerts (handshake_failure: such a hello
#          has no signature_algorithms, so only SHA-1 would do, which
#          GnuTLS refuses)
#   tls13  priority TLS 1.3 only: an alert (GnuTLS 3.7: handshake_failure)
# A real SSL 2.0 client (version 0.2) gets a protocol_version alert; the
# log names each SSLv2-format hello; normal clients are served after all.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools python3 gnutls-cli
e2e_init
provision_token
start_backend

conf=$E2E_DIR/sslv2.conf
printf '[global]\nlog_level = debug\ndrain_timeout = 5s\n\n' >"$conf"
write_token_section "$conf"
listener() { # NAME CERT KEY [EXTRA LINE]
	printf '[listener %s]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\n%s\n\n' \
		"$1" "$BACKEND_PORT" "$2" "$3" "${4:-}" >>"$conf"
}
listener rsa "$HSMTLS_CERT_RSA2048" "$HSMTLS_KEY_RSA2048"
listener ec "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
listener tls13 "$HSMTLS_CERT_RSA2048" "$HSMTLS_KEY_RSA2048" "priority = NORMAL:-VERS-ALL:+VERS-TLS1.3"
start_daemon "$conf" || bail "daemon did not start"
RSA=$(listener_port rsa)
EC=$(listener_port ec)
TLS13=$(listener_port tls13)
hello() { timeout 15 python3 "$SRCDIR/tests/e2e/sslv2_hello.py" "$@" 2>&1; }

out=$(hello "$RSA")
check "rsa2048: a TLS 1.2 ServerHello answers the SSLv2-format hello ($out)" grep -q '^SERVERHELLO 0303 ' <<<"$out"
check_grep "daemon log: the SSLv2-format hello is named" "$DAEMON_LOG" \
	'listener rsa: 127\.0\.0\.1:[0-9]+: an SSLv2-format ClientHello \(TLS 1\.2, 8 cipher specs\), handed to GnuTLS'
out=$(hello "$EC")
check_eq "p256: GnuTLS alerts handshake_failure (no SHA-1 signatures)" "ALERT 2 40" "$out"
out=$(hello "$TLS13")
check "a TLS 1.3-only listener: a fatal alert ($out)" grep -qE '^ALERT 2 (40|70)$' <<<"$out"
out=$(hello "$RSA" 0002)
check_eq "a real SSL 2.0 client (version 0.2): protocol_version alert" "ALERT 2 70" "$out"
check_grep "daemon log (debug): why the SSL 2.0 hello is malformed" "$DAEMON_LOG" \
	'a malformed ClientHello \(an SSL 2\.0 client \(version 2\): SSL 2\.0 itself is not spoken\)'
out=$(gnutls_get "$RSA" www.hsmtls.test NORMAL after)
check "a TLS client is served after the SSLv2-format hellos" grep -q '^hello from backend: GET /after' <<<"$out"
check "the daemon is still running" daemon_running
stop_daemon 10
check_eq "hsmtlsd exits 0 on SIGTERM" 0 "$DAEMON_RC"
e2e_finish
