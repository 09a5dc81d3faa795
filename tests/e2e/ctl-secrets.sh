#!/usr/bin/env bash
# e2e: hsmtlsctl never shows or leaks its bearer token. With a token, an
# http:// URL to a host that is not loopback is refused (exit 2) before any
# connection is made; --verbose traces the request with the Authorization
# header masked (against a plain HTTP server on loopback: python3's
# http.server, which answers 404); a proxy in the environment is never used.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools python3
[ -x "${HSMTLSCTL:-}" ] || bail "HSMTLSCTL=${HSMTLSCTL:-} is not an executable (build first)"
e2e_init
TOKEN=tok-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
(umask 077 && printf '%s\n' "$TOKEN" >"$E2E_DIR/token")

for url in http://192.0.2.1:9/ http://hsmtls.example:8443 'http://127.0.0.1@192.0.2.1/' http://[2001:db8::1]:9/; do
	out=$(timeout 20 "$HSMTLSCTL" -t "$E2E_DIR/token" -u "$url" health 2>&1)
	rc=$?
	check_eq "a token over $url: refused as a usage error" 2 "$rc"
	check_grep "a token over $url: the reason is given" <(printf '%s\n' "$out") 'only to a loopback address'
done
out=$(HSMTLSCTL_TOKEN=$TOKEN timeout 20 "$HSMTLSCTL" -u http://192.0.2.1:9/ health 2>&1)
check_eq "a token from the environment over http:// to another host: refused" 2 "$?"

# --verbose against loopback: the request is traced, the token is not.
python3 -u -m http.server --bind 127.0.0.1 0 >"$E2E_DIR/http.out" 2>&1 &
E2E_PIDS+=("$!")
wait_until 10 grep -q 'Serving HTTP on' "$E2E_DIR/http.out" || bail "python3 http.server did not start"
PORT=$(sed -n 's/.*port \([0-9]*\).*/\1/p' "$E2E_DIR/http.out" | head -n 1)
for url in "http://127.0.0.1:$PORT" "http://localhost:$PORT"; do
	out=$(timeout 20 "$HSMTLSCTL" -v -t "$E2E_DIR/token" -u "$url" health 2>&1)
	check_grep "--verbose over $url: the request is traced" <(printf '%s\n' "$out") '^> GET /v1/health'
	check_grep "--verbose over $url: the Authorization header is masked" <(printf '%s\n' "$out") '^> Authorization: \(hidden\)'
	if grep -qF -- "$TOKEN" <<<"$out"; then fail "--verbose over $url: the token appears in the output"; else ok "--verbose over $url: the token appears nowhere in the output"; fi
done
check_grep "the server got the token (so the trace hid a header that was sent)" "$E2E_DIR/http.out" 'GET /v1/health'
# A proxy in the environment is never used: the token would go to it.
n0=$(grep -c 'GET /v1/health' "$E2E_DIR/http.out")
out=$(http_proxy=http://192.0.2.1:9 HTTP_PROXY=http://192.0.2.1:9 ALL_PROXY=http://192.0.2.1:9 \
	timeout 20 "$HSMTLSCTL" -v -t "$E2E_DIR/token" -u "http://127.0.0.1:$PORT" health 2>&1)
check_grep "http_proxy and ALL_PROXY set: the request still goes straight to the daemon" <(printf '%s\n' "$out") \
	"^\* Connected to 127.0.0.1"
wait_until 5 sh -c "[ \$(grep -c 'GET /v1/health' '$E2E_DIR/http.out') -gt $n0 ]"
check "... and reaches it" test "$(grep -c 'GET /v1/health' "$E2E_DIR/http.out")" -gt "$n0"

e2e_finish
