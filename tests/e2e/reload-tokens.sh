#!/usr/bin/env bash
# e2e: [token] sections changed by a SIGHUP reload (README, Reload; issue
# 12), with a second SoftHSM token beside the first and one connection open
# across every reload, passing data:
#  - a new [token] with a wrong PIN: refused, naming file, line and reason,
#    nothing changed;
#  - a new [token] and a listener using a key on it: the handshakes are
#    signed by that token's key (its usage counter moves);
#  - a token opened for a reload whose listener then fails: closed again;
#  - concurrency_max changed: applied live, the token is not opened again;
#  - pin_source changed to a file with a wrong PIN while the process is
#    logged in to the token (C_Login cannot check it then): refused, naming
#    file, line and reason;
#  - pin_source and max_sessions changed: the token is opened again beside
#    the old one, handshakes go on, the old one is closed once the
#    connection that used its key ends;
#  - a [token] removed while a listener still needs a key on it: refused;
#    removed with its listener: retired, closed, gone from GET /v1/tokens.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools openssl gnutls-cli curl mkfifo python3
trap '' PIPE
e2e_init
provision_token
# The second token: provisioned on its own, then moved beside the first
# (one SoftHSM configuration serves both).
T2=$E2E_DIR/token2
out=$("$SRCDIR/hsm-config/provision" "$T2" --label second --quiet 2>&1) || {
	printf '%s\n' "$out" | sed 's/^/#   /'
	bail "hsm-config/provision $T2 failed"
}
cp -a "$T2"/tokens/. "$TOKEN_DIR/tokens/" || bail "cannot move the second token beside the first"
# shellcheck disable=SC1091
T2_URI=$(. "$T2/uris.env" && printf %s "$HSMTLS_TOKEN_URI")
# shellcheck disable=SC1091
T2_KEY=$(. "$T2/uris.env" && printf %s "$HSMTLS_KEY_P256")
T2_CERT=$T2/p256-chain.pem
printf 'not-the-pin\n' >"$E2E_DIR/wrong-pin"
cp "$HSMTLS_PIN_FILE" "$E2E_DIR/demo-pin" # the same PIN from another file: a new pin_source
chmod 0600 "$E2E_DIR/wrong-pin" "$E2E_DIR/demo-pin"
start_backend

admin_setup
api() { admin_api "$SOCK" "$ADMIN_TOKEN" "$@"; }

conf=$E2E_DIR/hsmtlsd.conf
# write_conf: [token demo] with DEMO_PIN (a pin setting line, default the
# PIN file) and DEMO_EXTRA; [token second] while SECOND is set (its pin
# file, SECOND_EXTRA); [listener www] on demo's P-256; [listener two] on
# second's P-256 while TWO=1; then EXTRA.
write_conf() {
	{
		printf '[global]\nlog_level = info\ndrain_timeout = 2s\nstate_dir = %s\n\n' "$E2E_DIR/state"
		printf '[token demo]\nuri = %s\nmodule = %s\n%s\n%s\n\n' "$HSMTLS_TOKEN_URI" "$HSMTLS_MODULE" \
			"${DEMO_PIN:-pin_file = $HSMTLS_PIN_FILE}" "${DEMO_EXTRA:-}"
		[ -n "${SECOND:-}" ] && printf '[token second]\nuri = %s\nmodule = %s\npin_file = %s\n%s\n\n' "$T2_URI" \
			"$HSMTLS_MODULE" "$SECOND" "${SECOND_EXTRA:-}"
		printf '[listener www]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\n\n' \
			"$BACKEND_PORT" "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
		[ "${TWO:-0}" = 1 ] && printf '[listener two]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\n\n' \
			"$BACKEND_PORT" "$T2_CERT" "$T2_KEY"
		printf '%s\n\n' "$ADMIN_SECTION"
		printf '%s' "${EXTRA:-}"
	} >"$conf.new"
	mv "$conf.new" "$conf"
}
# handshake PORT CA: one full handshake and a request through the proxy.
handshake() {
	printf 'GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' |
		timeout 10 openssl s_client -connect "127.0.0.1:$1" -servername www.hsmtls.test -CAfile "$2" \
			-verify_return_error -ign_eof 2>/dev/null | grep -q 'hello from backend'
}
signs() { # TOKEN LABEL: signatures of that key since start (GET /v1/usage)
	api GET /v1/usage >/dev/null
	api_sign_count "$1" "$2" since_start
}
tokens() { # GET /v1/tokens: the names
	api GET /v1/tokens >/dev/null
	api_json '" ".join(t["name"] for t in d["tokens"])'
}
committed() { verdict_has "$1: committed" 'committed'; }
refused() { verdict_has "$1: refused" 'refused, nothing changed'; }

# The connection open across the reloads.
mkfifo "$E2E_DIR/long.in"
long_ping() {
	local line="long-$RANDOM$RANDOM"
	printf '%s\n' "$line" >&7
	if wait_until 10 grep -q "^$line$" "$E2E_DIR/long.out"; then
		ok "$1: the connection opened before keeps passing data"
	else
		fail "$1: no echo through the connection opened before"
	fi
}

# ------------------------------------------------ start: token demo only
write_conf
start_daemon "$conf" || bail "daemon did not start"
wait_until 10 grep -q 'admin: listening on' "$DAEMON_LOG" || bail "the admin API did not start"
WWW=$(listener_port www)
: >"$E2E_DIR/long.out"
timeout 300 openssl s_client -connect "127.0.0.1:$WWW" -servername www.hsmtls.test -CAfile "$HSMTLS_CA" \
	-verify_return_error -quiet <"$E2E_DIR/long.in" >"$E2E_DIR/long.out" 2>/dev/null &
LONG_PID=$!
E2E_PIDS+=("$LONG_PID")
exec 7>"$E2E_DIR/long.in"
long_ping "start"
check_eq "start: GET /v1/tokens" demo "$(tokens)"

# ------------------------------------------------ a new token with a wrong PIN
SECOND=$E2E_DIR/wrong-pin TWO=1 write_conf
sighup "second token, wrong PIN"
refused "second token, wrong PIN"
line=$(grep -n '^\[token second\]' "$conf" | cut -d: -f1)
verdict_has "wrong PIN: the line names file, line and reason" "hsmtlsd.conf:$line: \[token second\]: .*PIN_INCORRECT"
check "wrong PIN: www still serves" handshake "$WWW" "$HSMTLS_CA"
check_not "wrong PIN: listener two was not started" grep -q 'listener two: listening' "$DAEMON_LOG"
long_ping "wrong PIN"

# ------------------------------------------------ a new token and a listener on it
SECOND=$T2/pin TWO=1 write_conf
sighup "second token added"
committed "second token added"
verdict_has "second token added: the line says so" 'tokens added: second'
check_eq "second token added: GET /v1/tokens" "demo second" "$(tokens)"
TWOP=$(listener_port two)
before=$(signs second p256)
check "listener two: a handshake" handshake "$TWOP" "$T2/ca.pem"
check "listener two: another handshake" handshake "$TWOP" "$T2/ca.pem"
check_eq "listener two: both signed by the second token's key" "$((before + 2))" "$(signs second p256)"
long_ping "second token added"

# ------------------------------------------------ opened for a reload that is refused: closed again
SECOND=$T2/pin SECOND_EXTRA='max_sessions = 3' TWO=1 \
	EXTRA="$(printf '[listener nokey]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\n' \
		"$BACKEND_PORT" "$T2_CERT" "$T2_URI;object=no-such-key;type=private")" write_conf
sighup "second token changed, a listener without its key"
refused "second token changed, a listener without its key"
check_grep "the token opened for it is closed again" "$DAEMON_LOG" 'token second: closed again \(the reload that opened it was refused\)'
check "refused: listener two still serves with the second token" handshake "$TWOP" "$T2/ca.pem"

# ------------------------------------------------ concurrency limits: applied live
SECOND=$T2/pin SECOND_EXTRA='concurrency_max = 2' TWO=1 write_conf
sighup "second token's concurrency_max"
committed "second token's concurrency_max"
verdict_has "concurrency_max: applied, no token opened again" 'tokens opened again: none; tokens removed: none; token limits changed: second'
check_grep "concurrency_max: the new bounds are logged" "$DAEMON_LOG" 'token second: concurrency [0-9]+ to 2 operations at once'
check "concurrency_max: listener two serves" handshake "$TWOP" "$T2/ca.pem"

# ------------------------------------------------ pin_source changed to a wrong PIN on the logged-in token
# The process is logged in to demo's slot: C_Login would answer
# CKR_USER_ALREADY_LOGGED_IN to any PIN; the new PIN is compared with the
# one of that login.
DEMO_PIN="pin_source = file:$E2E_DIR/wrong-pin" SECOND=$T2/pin SECOND_EXTRA='concurrency_max = 2' TWO=1 write_conf
sighup "demo's pin_source changed to a wrong PIN"
refused "demo's pin_source changed to a wrong PIN"
line=$(grep -n '^\[token demo\]' "$conf" | cut -d: -f1)
verdict_has "wrong new PIN of a logged-in token: the line names file, line and reason" \
	"hsmtlsd.conf:$line: \[token demo\]: the PIN from .*wrong-pin is not the PIN this process is logged in to token demo with"
check "wrong new PIN: www still serves" handshake "$WWW" "$HSMTLS_CA"
long_ping "wrong new PIN of demo"

# ------------------------------------------------ pin_source and max_sessions changed: opened again
DEMO_PIN="pin_source = file:$E2E_DIR/demo-pin" DEMO_EXTRA='max_sessions = 4' SECOND=$T2/pin SECOND_EXTRA='concurrency_max = 2' TWO=1 \
	write_conf
sighup "demo's pin_source and max_sessions changed"
committed "demo's pin_source and max_sessions changed"
verdict_has "demo opened again: the line says so" 'tokens opened again: demo \(pin_source\)'
before=$(signs demo p256)
check "demo opened again: www serves" handshake "$WWW" "$HSMTLS_CA"
check "demo opened again: www serves again" handshake "$WWW" "$HSMTLS_CA"
check_eq "demo opened again: the key on the new token signs (counted once, under demo)" "$((before + 2))" "$(signs demo p256)"
check_eq "demo opened again: GET /v1/tokens lists each token once" "demo second" "$(tokens)"
api GET /v1/tokens/demo >/dev/null
long_ping "demo opened again"
check_not "the old token demo is not closed while the connection uses its key" \
	grep -q 'token demo (replaced by a reload): .*closed' "$DAEMON_LOG"
exec 7>&-
kill "$LONG_PID" 2>/dev/null
if wait_until 15 grep -q 'token demo (replaced by a reload): no handshake or connection uses its keys any more: closed' \
	"$DAEMON_LOG"; then
	ok "the old token demo is closed once that connection ended"
else
	fail "no 'token demo (replaced by a reload): ... closed' line"
fi

# ------------------------------------------------ a token removed
DEMO_PIN="pin_source = file:$E2E_DIR/demo-pin" DEMO_EXTRA='max_sessions = 4' TWO=1 write_conf
sighup "second removed, listener two kept"
refused "second removed, listener two kept"
verdict_has "second removed: the line names the token still needed" 'listener two: .*is on token second, which the new configuration removes'
check "refused: listener two still serves" handshake "$TWOP" "$T2/ca.pem"
DEMO_PIN="pin_source = file:$E2E_DIR/demo-pin" DEMO_EXTRA='max_sessions = 4' write_conf
sighup "second removed with listener two"
committed "second removed with listener two"
verdict_has "second removed: the line says so" 'tokens removed: second'
check_eq "second removed: GET /v1/tokens" demo "$(tokens)"
if wait_until 15 grep -q 'token second (removed by a reload): no handshake or connection uses its keys any more: closed' \
	"$DAEMON_LOG"; then
	ok "second removed: closed"
else
	fail "no 'token second (removed by a reload): ... closed' line"
fi
check "second removed: www serves" handshake "$WWW" "$HSMTLS_CA"
api GET /v1/usage >/dev/null
check_eq "second removed: its key's usage stays in the report" 1 "$(api_json "len([k for k in d['keys'] if k['token'] == 'second'])")"

stop_daemon 20
check_eq "hsmtlsd exits 0" 0 "$DAEMON_RC"
e2e_finish
