#!/usr/bin/env bash
# e2e: keys on a remote token through p11-kit's own remoting. `p11-kit
# server` exposes SoftHSM's module on a unix socket; hsmtlsd loads
# p11-kit-client.so (P11_KIT_SERVER_ADDRESS) and never SoftHSM itself:
#  - handshakes complete through the remoting and the usage counters count
#    each signature;
#  - the p11-kit server and its p11-kit-remote child are killed (SIGKILL):
#    handshakes fail at once with an alert (p11-kit-client.so answers
#    CKR_DEVICE_ERROR to every call, C_GetTokenInfo too: state failed), the
#    daemon keeps running; while the server is away its recovery
#    initialises the client module again (which then lists no slot);
#  - a new p11-kit server on the same socket: served again by the same
#    process, with no restart (recovery time printed);
#  - only the p11-kit-remote child killed (the server stays): served again.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools p11-kit curl ps
CLIENT_MOD=$(pkg-config --variable=p11_module_path p11-kit-1 2>/dev/null)/p11-kit-client.so
[ -f "$CLIENT_MOD" ] || CLIENT_MOD=$(dpkg -L p11-kit-modules 2>/dev/null | grep '/p11-kit-client\.so$' | head -n 1)
[ -n "$CLIENT_MOD" ] && [ -f "$CLIENT_MOD" ] || skip "p11-kit-client.so not found (Debian: p11-kit-modules)"
e2e_init
provision_token
start_backend
SOCK=$E2E_DIR/p11-kit.sock
export P11_KIT_SERVER_ADDRESS=unix:path=$SOCK

# start_p11_server: p11-kit server in the foreground, exposing the token;
# waits until a client can list it. Sets SERVER_PID.
start_p11_server() {
	rm -f -- "$SOCK"
	p11-kit server -f -n "$SOCK" --provider "$HSMTLS_MODULE" "$HSMTLS_TOKEN_URI" \
		>>"$E2E_DIR/p11-kit-server.log" 2>&1 </dev/null &
	SERVER_PID=$!
	E2E_PIDS+=("$SERVER_PID")
	wait_until 10 test -S "$SOCK" || bail "p11-kit server made no socket"
}
# server_children: the p11-kit-remote processes serving connections.
server_children() { ps -o pid= --ppid "$SERVER_PID" | tr -d ' '; }
kill_p11_server() {
	local kids
	kids=$(server_children)
	# shellcheck disable=SC2086 # one PID per word
	kill -KILL "$SERVER_PID" $kids 2>/dev/null
	wait "$SERVER_PID" 2>/dev/null
	forget_pid "$SERVER_PID"
}
start_p11_server

conf=$E2E_DIR/remote.conf
cat >"$conf" <<EOF
[global]
log_level = debug

[token remote]
uri = $HSMTLS_TOKEN_URI
module = $CLIENT_MOD
pin_file = $HSMTLS_PIN_FILE
max_sessions = 4

EOF
write_listener "$conf" www
start_daemon "$conf" || bail "the daemon did not start through the remoting"
PID0=$DAEMON_PID
port=$(listener_port www)
get() { curl_get "$port" www.hsmtls.test "https://www.hsmtls.test:$port/$1" 2>&1; }
get_ok() { get "$1" | grep -q 'hello from backend'; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

check_grep "the daemon loaded p11-kit-client.so" "/proc/$DAEMON_PID/maps" 'p11-kit-client\.so'
check_not "and not SoftHSM (the token is behind the socket)" grep -q 'libsofthsm2' "/proc/$DAEMON_PID/maps"
[ -n "$(server_children)" ] && ok "p11-kit server serves the daemon's connection (p11-kit-remote $(server_children | tr '\n' ' '))" ||
	fail "p11-kit server has no p11-kit-remote child"

usage_snapshot "$E2E_DIR/u0" || bail "no usage snapshot"
oks=0
for i in 1 2 3 4 5 6; do get_ok "r$i" && oks=$((oks + 1)); done
check_eq "six handshakes through the remoting" 6 "$oks"
usage_snapshot "$E2E_DIR/u1" || bail "no usage snapshot"
check_eq "six signatures counted" 6 "$(usage_delta "$E2E_DIR/u0" "$E2E_DIR/u1" p256 sign)"

# ---- the p11-kit server dies
kill_p11_server
t0=$(now_ms)
out=$(get dead)
t1=$(now_ms)
if printf '%s\n' "$out" | grep -qiE 'alert|internal error'; then ok "with the server gone a handshake fails with an alert ($((t1 - t0)) ms)"; else
	fail "with the server gone: no alert"
	printf '%s\n' "$out" | sed 's/^/#   /' | tail -n 5
fi
check "the state is failed (the module answered CKR_DEVICE_ERROR, confirmed)" \
	wait_until 10 grep -q 'token remote: ready -> failed: the module answered CKR_DEVICE_ERROR, and CKR_DEVICE_ERROR to C_GetTokenInfo' "$DAEMON_LOG"
# The server stays away long enough for recovery attempts to meet it gone.
check "recovery attempts while the server is away" wait_until 10 grep -q 'token remote: still failed' "$DAEMON_LOG"
get_ok down && fail "a handshake succeeded with no server" || ok "still failing while the server is away"
daemon_running && ok "the daemon keeps running" || fail "the daemon exited"

start_p11_server
t0=$(now_ms)
if wait_until 20 get_ok back; then
	note "served again $(($(now_ms) - t0)) ms after p11-kit server was started again"
	ok "served again through the new p11-kit server"
else
	fail "not served again within 20 s of the new p11-kit server"
	grep -E 'warning|notice|still' "$DAEMON_LOG" | tail -n 8 | sed 's/^/#   /'
fi
check_grep "the log says so" "$DAEMON_LOG" 'token remote: failed -> ready: found again'
check_eq "the same process (no restart)" "$PID0" "$DAEMON_PID"
oks=0
for i in 1 2 3 4; do get_ok "again$i" && oks=$((oks + 1)); done
check_eq "four more handshakes" 4 "$oks"

# ---- only the connection's p11-kit-remote dies
kids=$(server_children)
[ -n "$kids" ] || bail "no p11-kit-remote child after the recovery"
# shellcheck disable=SC2086
kill -KILL $kids
get_ok child-gone || true # the first one meets the dead connection
t0=$(now_ms)
if wait_until 20 get_ok child-back; then
	ok "served again after its p11-kit-remote died ($(($(now_ms) - t0)) ms)"
else
	fail "not served again within 20 s after p11-kit-remote died"
fi
usage_snapshot "$E2E_DIR/u2" || bail "no usage snapshot"
n=$(usage_delta "$E2E_DIR/u1" "$E2E_DIR/u2" p256 sign)
[ "$n" -ge 5 ] && ok "signatures after the recoveries counted ($n)" || fail "signatures after the recoveries: $n counted"
stop_daemon
check_eq "it exits cleanly" 0 "$DAEMON_RC"
kill_p11_server
e2e_finish
