#!/usr/bin/env bash
# load-smoke.sh - smoke test of hsmtls-load against gnutls-serv.
#
# Usage: load-smoke.sh PATH-TO-hsmtls-load PATH-TO-bench-free-port
#
# Makes a test CA and a P-256 server certificate with certtool in a
# temporary folder, starts gnutls-serv on a free loopback port, and checks:
#   1. hsmtls-load --duration 2 --threads 4: handshakes > 0, no error;
#   2. hsmtls-load --tls 1.2 --requests 1 --count 20: 20 handshakes and
#      20 requests, no error.
# Exits 77 when gnutls-serv or certtool is missing (Debian: gnutls-bin).
# Leaves no process and no file behind.

set -euo pipefail

load=${1:?usage: load-smoke.sh HSMTLS-LOAD BENCH-FREE-PORT}
free_port=${2:?usage: load-smoke.sh HSMTLS-LOAD BENCH-FREE-PORT}

for tool in gnutls-serv certtool; do
	if ! command -v "$tool" >/dev/null 2>&1; then
		echo "SKIP: $tool is missing (Debian package gnutls-bin)"
		exit 77
	fi
done

dir=$(mktemp -d "${TMPDIR:-/tmp}/hsmtls-load-smoke.XXXXXX")
server_pid=""
cleanup() {
	if [ -n "$server_pid" ]; then
		kill "$server_pid" 2>/dev/null || true
		wait "$server_pid" 2>/dev/null || true
	fi
	rm -rf -- "$dir"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

fail() {
	echo "FAIL: $*"
	if [ -f "$dir/serv.log" ]; then
		echo "--- gnutls-serv output:"
		tail -n 20 "$dir/serv.log"
	fi
	exit 1
}

# ------------------------------------------------------------ certificates
cat >"$dir/ca.tmpl" <<'EOF'
cn = "hsmtls-load smoke CA"
ca
cert_signing_key
expiration_days = 2
EOF
cat >"$dir/leaf.tmpl" <<'EOF'
cn = "localhost"
dns_name = "localhost"
ip_address = "127.0.0.1"
tls_www_server
signing_key
expiration_days = 2
EOF
certtool --generate-privkey --key-type=ecdsa --curve=secp256r1 --no-text \
	--outfile "$dir/ca.key" 2>/dev/null
certtool --generate-self-signed --load-privkey "$dir/ca.key" --template "$dir/ca.tmpl" \
	--no-text --outfile "$dir/ca.pem" 2>/dev/null
certtool --generate-privkey --key-type=ecdsa --curve=secp256r1 --no-text \
	--outfile "$dir/server.key" 2>/dev/null
certtool --generate-certificate --load-privkey "$dir/server.key" --load-ca-privkey "$dir/ca.key" \
	--load-ca-certificate "$dir/ca.pem" --template "$dir/leaf.tmpl" --no-text \
	--outfile "$dir/server.pem" 2>/dev/null
cat "$dir/server.pem" "$dir/ca.pem" >"$dir/chain.pem"
printf 'hsmtls-load smoke\n' >"$dir/body.txt"

# ----------------------------------------------------------------- server
# gnutls-serv needs a fixed port: take one the kernel just gave out. Another
# process may win it first; gnutls-serv then says "bind() failed" and keeps
# running without listening, so look for its "...done" and retry otherwise.
start_server() {
	local i
	port=$("$free_port")
	: >"$dir/serv.log"
	gnutls-serv --http --httpdata "$dir/body.txt" --quiet --port "$port" \
		--x509certfile "$dir/chain.pem" --x509keyfile "$dir/server.key" \
		>"$dir/serv.log" 2>&1 &
	server_pid=$!
	for ((i = 0; i < 200; i++)); do # up to 10 s
		if grep -q "IPv4 .* port $port\.\.\.done" "$dir/serv.log"; then
			return 0
		fi
		if grep -q "failed" "$dir/serv.log" || ! kill -0 "$server_pid" 2>/dev/null; then
			break
		fi
		sleep 0.05
	done
	kill "$server_pid" 2>/dev/null || true
	wait "$server_pid" 2>/dev/null || true
	server_pid=""
	return 1
}

started=0
for attempt in 1 2 3 4 5; do
	if start_server; then
		started=1
		break
	fi
	echo "# gnutls-serv did not start on port $port (attempt $attempt):"
	sed 's/^/#   /' "$dir/serv.log"
done
[ "$started" -eq 1 ] || fail "gnutls-serv did not start"
echo "# gnutls-serv (pid $server_pid) on 127.0.0.1:$port"

# json_field NAME FILE: the number after "NAME": in a one-line JSON object.
json_field() {
	grep -o "\"$1\":[0-9.]*" "$2" | head -n 1 | cut -d: -f2
}

# -------------------------------------------------------------- 1. duration
rc=0
"$load" --connect "127.0.0.1:$port" --sni localhost --cafile "$dir/ca.pem" \
	--duration 2 --threads 4 --json >"$dir/run1.json" 2>"$dir/run1.err" || rc=$?
cat "$dir/run1.json" "$dir/run1.err"
hs=$(json_field handshakes "$dir/run1.json")
errors=$(json_field errors "$dir/run1.json")
[ "$rc" -eq 0 ] || fail "hsmtls-load --duration 2 exited with $rc"
[ -n "$hs" ] && [ "$hs" -gt 0 ] || fail "no handshakes reported"
[ "$errors" = 0 ] || fail "$errors errors reported"
echo "# run 1: $hs handshakes in 2 s, 0 errors"

# ----------------------------------------------- 2. TLS 1.2 with a request
rc=0
"$load" --connect "127.0.0.1:$port" --sni localhost --cafile "$dir/ca.pem" \
	--tls 1.2 --requests 1 --count 20 --threads 2 --json >"$dir/run2.json" 2>"$dir/run2.err" || rc=$?
cat "$dir/run2.json" "$dir/run2.err"
[ "$rc" -eq 0 ] || fail "hsmtls-load --tls 1.2 --requests 1 exited with $rc"
grep -q '"negotiated":"(TLS1.2)' "$dir/run2.json" || fail "TLS 1.2 was not negotiated"
[ "$(json_field handshakes "$dir/run2.json")" = 20 ] || fail "expected 20 handshakes"
[ "$(json_field requests "$dir/run2.json")" = 20 ] || fail "expected 20 requests"
[ "$(json_field errors "$dir/run2.json")" = 0 ] || fail "errors reported"
echo "# run 2: 20 TLS 1.2 handshakes with one request each, 0 errors"

kill -0 "$server_pid" 2>/dev/null || fail "gnutls-serv died during the test"
echo "ok: hsmtls-load smoke test passed"
