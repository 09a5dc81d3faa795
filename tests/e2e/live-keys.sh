#!/usr/bin/env bash
# e2e: a key first used while the daemon serves is counted like one of the
# start (issue 8): the P-384 key, which no listener uses at start, bound to
# listener a through the admin API, and the Ed25519 key of a listener that
# a SIGHUP reload adds. N handshakes with each move GET /v1/usage, /metrics
# and SIGUSR1's usage lines by N signatures for that key (each credential
# build adds its one test signature, counted too), state.db holds the
# totals, and after SIGTERM and a start GET /v1/usage's lifetime count
# goes on from them.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools curl gnutls-cli openssl sqlite3 python3
e2e_init
provision_token
start_backend

STATE=$E2E_DIR/state
admin_setup
N=3
M=2

conf=$E2E_DIR/live.conf
# write_conf [EXTRA]: token demo, listener a (P-256), the admin API, EXTRA.
write_conf() {
	{
		printf '[global]\nlog_level = info\ndrain_timeout = 2s\nstate_dir = %s\n\n' "$STATE"
		printf '[token demo]\nuri = %s\nmodule = %s\npin_file = %s\n\n' "$HSMTLS_TOKEN_URI" "$HSMTLS_MODULE" "$HSMTLS_PIN_FILE"
		printf '[listener a]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\n\n' \
			"$BACKEND_PORT" "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
		printf '%s\n\n' "$ADMIN_SECTION"
		printf '%s' "${1:-}"
	} >"$conf.new"
	mv "$conf.new" "$conf"
}
api() { admin_api "$SOCK" "$ADMIN_TOKEN" "$@"; }
# handshakes COUNT PORT SNI: COUNT full TLS 1.3 handshakes, each with one request.
handshakes() {
	local i
	for i in $(seq "$1"); do
		gnutls_get "$2" "$3" 'NORMAL:-VERS-ALL:+VERS-TLS1.3' "live-$i" | grep -q 'hello from backend' ||
			fail "handshake $i on port $2 for $3"
	done
}
start() {
	start_daemon "$conf" "$E2E_DIR/hsmtlsd-$1.log" || bail "daemon did not start"
	wait_until 10 grep -q 'admin: listening on' "$DAEMON_LOG" || bail "the admin API did not start"
}

write_conf
start 1
PA=$(listener_port a)
api GET /v1/usage >/dev/null
check_eq "at start: no key P-384 in the usage report" 0 "$(api_json "len([k for k in d['keys'] if k['label'] == 'p384'])")"

# ------------------------------------------------ a key first used through the admin API
pem=$(python3 -c 'import json,sys; print(json.dumps({"pem": open(sys.argv[1]).read()}))' "$HSMTLS_CERT_P384")
st=$(api POST /v1/certificates -H 'Content-Type: application/json' --data-binary "$pem")
check_eq "the P-384 chain is stored" 201 "$st" || note "$(head -c 300 "$E2E_DIR/api.body")"
fp=$(api_json 'd["fingerprint"]')
api GET /v1/listeners/a >/dev/null
etag=$(api_json 'd["etag"]')
st=$(api POST /v1/listeners/a/bindings -H 'Content-Type: application/json' -H "If-Match: $etag" \
	--data-binary "{\"certificate\": \"$fp\", \"names\": [\"api.hsmtls.test\"]}")
check_eq "P-384 bound to listener a for api.hsmtls.test" 201 "$st" || note "$(head -c 400 "$E2E_DIR/api.body")"
api GET /v1/usage >/dev/null
c0=$(api_sign_count demo p384 since_start)
check_eq "GET /v1/usage: listed once, with the bind's test signature" "1 1" \
	"$(api_json "len([k for k in d['keys'] if k['label'] == 'p384'])") $c0"
handshakes "$N" "$PA" api.hsmtls.test
api GET /v1/usage >/dev/null
check_eq "GET /v1/usage: the key bound through the API made $N more signatures" "$((c0 + N))" \
	"$(api_sign_count demo p384 since_start)"
api GET /metrics >/dev/null
metric() { awk -v k="$1" '$1 ~ "^hsmtls_key_operations_total\\{token=\"demo\",key=\"" k "\",op=\"sign\",.*result=\"ok\"\\}$" {s += $2} END {print s + 0}' "$E2E_DIR/api.body"; }
check_eq "/metrics: hsmtls_key_operations_total of P-384" "$((c0 + N))" "$(metric p384)"
if usage_snapshot "$E2E_DIR/u1"; then
	check_eq "SIGUSR1: the usage lines count P-384's signatures" "$((c0 + N))" "$(usage_count "$E2E_DIR/u1" p384 sign)"
else
	fail "no usage snapshot"
fi

# ------------------------------------------------ a key first used by a listener a reload adds
write_conf "$(printf '[listener b]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\n' \
	"$BACKEND_PORT" "$HSMTLS_CERT_ED25519" "$HSMTLS_KEY_ED25519")"
sighup "listener b (Ed25519) added"
verdict_has "listener b added: committed" 'committed: .*added: b'
PB=$(listener_port b)
api GET /v1/usage >/dev/null
e0=$(api_sign_count demo ed25519 since_start)
check_eq "GET /v1/usage: the key of the added listener is listed, with the reload's test signature" 1 "$e0"
handshakes "$M" "$PB" ed.hsmtls.test
api GET /v1/usage >/dev/null
check_eq "GET /v1/usage: it made $M more signatures" "$((e0 + M))" "$(api_sign_count demo ed25519 since_start)"
api GET /metrics >/dev/null
check_eq "/metrics: hsmtls_key_operations_total of Ed25519" "$((e0 + M))" "$(metric ed25519)"

# ------------------------------------------------ kept across a restart
# (what the key of the start counted, for comparison: P-256 on listener a)
uri_of() { api_json "([k['uri'] for k in d['keys'] if k['label'] == '$1'] + [''])[0]"; }
api GET /v1/usage >/dev/null
U384=$(uri_of p384)
UED=$(uri_of ed25519)
L384=$(api_sign_count demo p384 lifetime)
LED=$(api_sign_count demo ed25519 lifetime)
check "the lifetime counts include this run's ($L384, $LED)" test "$L384" -ge $((c0 + N)) -a "$LED" -ge $((e0 + M))
stop_daemon 20
check_eq "hsmtlsd exits 0" 0 "$DAEMON_RC"
db() { sqlite3 "$STATE/state.db" "SELECT coalesce(sum(count), 0) FROM usage WHERE token = 'demo' AND key = '$1' AND op = 'sign' AND result = 'ok'"; }
check_eq "state.db: P-384's signatures" "$L384" "$(db "$U384")"
check_eq "state.db: Ed25519's signatures" "$LED" "$(db "$UED")"
start 2
earlier() { # LABEL: lifetime - since_start, what earlier runs counted
	echo $(($(api_sign_count demo "$1" lifetime) - $(api_sign_count demo "$1" since_start)))
}
api GET /v1/usage >/dev/null
check_eq "after a restart: P-384's lifetime goes on from the last run" "$L384" "$(earlier p384)"
check_eq "after a restart: Ed25519's lifetime goes on from the last run" "$LED" "$(earlier ed25519)"
life=$(api_sign_count demo p384 lifetime)
handshakes 1 "$(listener_port a)" api.hsmtls.test
api GET /v1/usage >/dev/null
check_eq "after a restart: one more signature with P-384 adds to its lifetime" "$((life + 1))" "$(api_sign_count demo p384 lifetime)"
stop_daemon 20
check_eq "hsmtlsd exits 0 again" 0 "$DAEMON_RC"
e2e_finish
