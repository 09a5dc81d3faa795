#!/usr/bin/env bash
# e2e: SIGHUP reloads the configuration file, all of it or nothing
# (README, Reload), while one connection stays open across every reload and
# keeps passing data through the proxy:
#  - a changed certificate: the next handshake shows the new fingerprint;
#  - an added listener serves; a removed one stops accepting while its open
#    connection keeps working until it is closed (and is closed at the
#    drain_timeout of a later reload); a listener whose settings changed
#    keeps its socket; a connector added, then removed;
#  - refused, with a log line naming the reason, and the old configuration
#    still served whole (the changed certificate that came with them is not
#    applied): a syntax error (file and line), a key that does not exist,
#    a port already in use, a setting that needs a restart;
#  - a binding made through the admin API stays applied over the reloaded file.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools openssl gnutls-cli curl mkfifo python3
trap '' PIPE # a client that died makes its check fail, not this script
e2e_init
provision_token
start_backend

STATE=$E2E_DIR/state
SOCK=$E2E_DIR/admin.sock
ADMIN_TOKEN=admin-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
sha() { printf %s "$1" | sha256sum | cut -d' ' -f1; }
fp_of() { openssl x509 -in "$1" -noout -fingerprint -sha256 | sed 's/.*=//; s/://g' | tr 'A-F' 'a-f'; }
FP_P256=$(fp_of "$HSMTLS_CERT_P256")
FP_P384=$(fp_of "$HSMTLS_CERT_P384")
FP_RSA=$(fp_of "$HSMTLS_CERT_RSA2048")

conf=$E2E_DIR/hsmtlsd.conf
# write_conf WWW_CERT WWW_KEY [EXTRA]: [listener www] (and [listener old]
# while OLD=1, [listener api] while API=1), then EXTRA as written.
write_conf() {
	{
		printf '[global]\nlog_level = info\ndrain_timeout = %s\nstate_dir = %s\n%s\n' "${DRAIN:-30s}" "$STATE" "${GLOBAL_EXTRA:-}"
		printf '[token demo]\nuri = %s\nmodule = %s\npin_file = %s\n\n' "$HSMTLS_TOKEN_URI" "$HSMTLS_MODULE" "$HSMTLS_PIN_FILE"
		printf '[listener www]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\n%s\n' \
			"$BACKEND_PORT" "$1" "$2" "${WWW_EXTRA:-}"
		[ "${SHORT:-0}" = 1 ] && printf '[listener short]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\n\n' \
			"$BACKEND_PORT" "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
		[ "${OLD:-0}" = 1 ] && printf '[listener old]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\n\n' \
			"$BACKEND_PORT" "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
		[ "${API:-0}" = 1 ] && printf '[listener api]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\n\n' \
			"$BACKEND_PORT" "$HSMTLS_CERT_RSA2048" "$HSMTLS_KEY_RSA2048"
		# (www serves the P-384 chain, api.hsmtls.test, whenever the connector is in the file)
		[ "${CONN:-0}" = 1 ] && printf '[connector out]\nlisten = 127.0.0.1:0\nconnect = 127.0.0.1:%s\nserver_name = api.hsmtls.test\nca_file = %s\ncert = %s\nkey = %s\n\n' \
			"$WWW" "$HSMTLS_CA" "$HSMTLS_CERT_RSA2048" "$HSMTLS_KEY_RSA2048"
		printf '[admin]\nlisten = unix:%s\ntoken = admin:ops:%s\n\n' "$SOCK" "$(sha "$ADMIN_TOKEN")"
		printf '%s' "${3:-}"
	} >"$conf.new"
	mv "$conf.new" "$conf"
}

# served_fp PORT [SNI]: SHA-256 of the leaf a fresh handshake presents.
served_fp() {
	openssl s_client -connect "127.0.0.1:$1" -servername "${2:-www.hsmtls.test}" -CAfile "$HSMTLS_CA" -verify_return_error \
		</dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256 2>/dev/null | sed 's/.*=//; s/://g' | tr 'A-F' 'a-f'
}
# serves PORT: a whole request through the proxy (the echo backend answers).
# (s_client -quiet ignores EOF on its input: the input ends once the echo is in.)
serves() {
	local out=$E2E_DIR/serves.out
	: >"$out"
	{
		printf 'ping-%s\n' "$1"
		wait_until 10 grep -q "^ping-$1$" "$out"
	} | timeout 15 openssl s_client -connect "127.0.0.1:$1" -servername www.hsmtls.test \
		-CAfile "$HSMTLS_CA" -verify_return_error -quiet >"$out" 2>/dev/null
	grep -q "^ping-$1$" "$out"
}
connector_port() { sed -n 's/.*connector out: listening on 127\.0\.0\.1:\([0-9][0-9]*\), TLS to.*/\1/p' "$DAEMON_LOG" | tail -n 1; }
# through_connector PORT: plaintext in, through TLS to www, echoed back.
through_connector() {
	local got
	got=$(timeout 10 bash -c 'exec 3<>/dev/tcp/127.0.0.1/$1; printf "conn-ping\n" >&3; read -r line <&3; echo "$line"' _ "$1" 2>/dev/null)
	[ "$got" = conn-ping ]
}
refused_conn() { ! timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/$1' _ "$1" 2>/dev/null; }

committed() { case $VERDICT in *committed*) ok "$1: committed" ;; *) fail "$1: not committed: $VERDICT" ;; esac; }
refused() { # DESC PATTERN: refused, and the line says why
	case $VERDICT in
	*refused*) ok "$1: refused" ;;
	*) fail "$1: not refused: $VERDICT"; return ;;
	esac
	printf '%s' "$VERDICT" | grep -q -- "$2" && ok "$1: the log line names the reason ($2)" ||
		fail "$1: the log line does not say '$2': $VERDICT"
}

# The connection open across every reload (long_open, long_ping: lib.sh).
LONG_IN=$E2E_DIR/long.in
LONG_OUT=$E2E_DIR/long.out

# ------------------------------------------------ start
OLD=1 write_conf "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
start_daemon "$conf" || bail "daemon did not start"
wait_until 10 grep -q 'admin: listening on' "$DAEMON_LOG" || bail "the admin API did not start"
WWW=$(listener_port www)
OLDP=$(listener_port old)
check_eq "start: www serves the P-256 chain" "$FP_P256" "$(served_fp "$WWW")"
long_open "$WWW" "$LONG_IN" "$LONG_OUT"
exec 7>"$LONG_IN"
long_ping "start" 7 "$LONG_OUT"
# A connection on the listener that the next reload removes.
long_open "$OLDP" "$E2E_DIR/old.in" "$E2E_DIR/old.out"
OLD_CLIENT=$LONG_PID
exec 8>"$E2E_DIR/old.in"
long_ping "start (listener old)" 8 "$E2E_DIR/old.out"

# ------------------------------------------------ changed certificate, added and removed listener
API=1 CONN=1 write_conf "$HSMTLS_CERT_P384" "$HSMTLS_KEY_P384"
hup "new certificate, api added, old removed"
committed "new certificate, api added, old removed"
check_eq "reload: the next handshake on www shows the new certificate" "$FP_P384" "$(served_fp "$WWW")"
check_eq "reload: www kept its port" "$WWW" "$(listener_port www)"
API_PORT=$(listener_port api)
if [ -n "$API_PORT" ] && serves "$API_PORT"; then
	ok "reload: the added listener api serves (port $API_PORT)"
else
	fail "reload: the added listener api does not serve (port '${API_PORT}')"
fi
check_eq "reload: api serves its RSA chain" "$FP_RSA" "$(served_fp "$API_PORT")"
CONNP=$(connector_port)
if [ -n "$CONNP" ] && through_connector "$CONNP"; then
	ok "reload: the added connector out serves (port $CONNP, TLS to www)"
else
	fail "reload: the added connector out does not serve (port '$CONNP')"
fi
long_ping "reload" 7 "$LONG_OUT"
long_ping "reload: the removed listener old" 8 "$E2E_DIR/old.out"
wait_until 10 refused_conn "$OLDP" && ok "reload: the removed listener old no longer accepts" ||
	fail "reload: port $OLDP of the removed listener old still accepts"
long_ping "reload, once old stopped accepting: its connection" 8 "$E2E_DIR/old.out"
exec 8>&-
kill "$OLD_CLIENT" 2>/dev/null # s_client -quiet ignores EOF on its input
wait_until 10 grep -q 'listener old: removed by the reload: drained, closed' "$DAEMON_LOG" &&
	ok "reload: old is freed once its last connection closed" ||
	fail "reload: no 'listener old: removed by the reload: drained' line"
check_not "reload: old's connection was not closed by the daemon" grep -q 'listener old: .*closed (listener removed' "$DAEMON_LOG"

# ------------------------------------------------ refused: nothing of them applied
# Each broken file also changes www's certificate back to P-256: a reload
# that applied part of it would serve that.
API=1 CONN=1 write_conf "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256" $'[listener broken]\nlisten 127.0.0.1:0\n'
hup "syntax error"
refused "syntax error" "hsmtlsd.conf:[0-9]*:"
API=1 CONN=1 write_conf "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256" "$(printf '[listener nokey]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\n' \
	"$BACKEND_PORT" "$HSMTLS_CERT_P256" "$HSMTLS_TOKEN_URI;object=no-such-key;type=private")"
hup "a key that does not exist"
refused "a key that does not exist" "listener nokey: .*no-such-key"
API=1 CONN=1 write_conf "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256" "$(printf '[listener busy]\nlisten = 127.0.0.1:%s\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\n' \
	"$BACKEND_PORT" "$BACKEND_PORT" "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256")"
hup "a port already in use"
refused "a port already in use" "listener busy: cannot listen on 127.0.0.1:$BACKEND_PORT: Address already in use"
GLOBAL_EXTRA='handshake_threads = 3' API=1 CONN=1 write_conf "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
hup "a setting that needs a restart"
refused "a setting that needs a restart" "handshake_threads changed: that needs a restart"
GLOBAL_EXTRA='handshake_cpus = 1' API=1 CONN=1 write_conf "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
hup "handshake_cpus changed (set up at start)"
refused "handshake_cpus changed (set up at start)" "handshake_cpus changed: that needs a restart"
GLOBAL_EXTRA='user = nobody' API=1 CONN=1 write_conf "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
hup "user changed (applied at start only)"
refused "user changed (applied at start only)" "user changed: that needs a restart"
check_eq "refused: www still serves the certificate of the last good configuration" "$FP_P384" "$(served_fp "$WWW")"
serves "$API_PORT" && ok "refused: api still serves" || fail "refused: api stopped serving"
through_connector "$CONNP" && ok "refused: the connector still serves" || fail "refused: the connector stopped serving"
check_not "refused: no listener 'busy' or 'nokey' was started" grep -qE 'listener (busy|nokey|broken): listening' "$DAEMON_LOG"
long_ping "refused" 7 "$LONG_OUT"
daemon_running && ok "refused: the daemon still runs" || fail "refused: the daemon exited"

# ------------------------------------------------ an admin API binding survives a reload
api() { # METHOD PATH [curl args]: the status; the body in $BODY
	local method=$1 path=$2
	shift 2
	curl -sS --max-time 30 --unix-socket "$SOCK" -o "$BODY" -w '%{http_code}' -X "$method" \
		-H "Authorization: Bearer $ADMIN_TOKEN" "$@" "http://hsmtlsd$path"
}
BODY=$E2E_DIR/body
API=1 write_conf "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
hup "back to P-256"
committed "back to P-256"
check_eq "back to P-256: www serves it" "$FP_P256" "$(served_fp "$WWW")"
wait_until 10 refused_conn "$CONNP" && ok "back to P-256: the removed connector no longer accepts" ||
	fail "back to P-256: port $CONNP of the removed connector still accepts"
check_eq "back to P-256: and for api.hsmtls.test (no binding yet)" "$FP_P256" "$(served_fp "$WWW" api.hsmtls.test)"
pem=$(python3 -c 'import json,sys; print(json.dumps({"pem": open(sys.argv[1]).read()}))' "$HSMTLS_CERT_P384")
st=$(api POST /v1/certificates -H 'Content-Type: application/json' --data-binary "$pem")
case $st in 201 | 409) ok "admin: the P-384 chain is stored ($st)" ;; *) fail "admin: upload: $st $(head -c 300 "$BODY")" ;; esac
etag=$(curl -sS --unix-socket "$SOCK" -H "Authorization: Bearer $ADMIN_TOKEN" -D - -o /dev/null http://hsmtlsd/v1/listeners/www |
	tr -d '\r' | sed -n 's/^[Ee][Tt][Aa][Gg]: //p')
st=$(api POST /v1/listeners/www/bindings -H 'Content-Type: application/json' -H "If-Match: $etag" \
	--data-binary "{\"certificate\": \"$FP_P384\", \"names\": [\"api.hsmtls.test\"]}")
check_eq "admin: P-384 bound to www for api.hsmtls.test" 201 "$st" || note "$(head -c 400 "$BODY")"
check_eq "admin: www serves the bound chain for api.hsmtls.test" "$FP_P384" "$(served_fp "$WWW" api.hsmtls.test)"
API=1 write_conf "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
hup "reload with an admin binding"
committed "reload with an admin binding"
check_eq "reload: the admin API's binding stays applied over the file" "$FP_P384" "$(served_fp "$WWW" api.hsmtls.test)"
check_eq "reload: and the file's chain serves the other names" "$FP_P256" "$(served_fp "$WWW")"

# ------------------------------------------------ changed settings: the same socket, new settings
WWW_EXTRA='idle_timeout = 90s' API=1 SHORT=1 write_conf "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
hup "www with a new idle_timeout, short added"
committed "www with a new idle_timeout, short added"
case $VERDICT in
*"settings changed: www (idle_timeout; same socket)"*) ok "www: replaced on its socket (idle_timeout changed)" ;;
*) fail "www: not replaced on its socket: $VERDICT" ;;
esac
check_eq "www: the same port" "$WWW" "$(listener_port www)"
serves "$WWW" && ok "www: serves with its new settings" || fail "www: does not serve after its settings changed"
check_eq "www: the admin API's binding applies to the replaced listener" "$FP_P384" "$(served_fp "$WWW" api.hsmtls.test)"
long_ping "www replaced" 7 "$LONG_OUT"

# ------------------------------------------------ a removed listener's drain_timeout
SHORTP=$(listener_port short)
long_open "$SHORTP" "$E2E_DIR/short.in" "$E2E_DIR/short.out"
SHORT_CLIENT=$LONG_PID
exec 9>"$E2E_DIR/short.in"
long_ping "short" 9 "$E2E_DIR/short.out"
DRAIN=2s WWW_EXTRA='idle_timeout = 90s' API=1 write_conf "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
hup "short removed, drain_timeout 2 s"
committed "short removed, drain_timeout 2 s"
gone() { ! kill -0 "$SHORT_CLIENT" 2>/dev/null; }
if wait_until 20 gone; then
	ok "short: its connection is closed by the daemon after drain_timeout"
else
	fail "short: its connection is still open 20 s after a 2 s drain_timeout"
fi
check_grep "short: the drain timeout is logged" "$DAEMON_LOG" \
	'listener short: removed by the reload: drain timeout: closing the 1 connection'
exec 9>&-
long_ping "the end (on www as it was before its settings changed, no drain timeout for it)" 7 "$LONG_OUT"
exec 7>&-

stop_daemon 40
check_eq "hsmtlsd exits 0" 0 "$DAEMON_RC"
e2e_finish
