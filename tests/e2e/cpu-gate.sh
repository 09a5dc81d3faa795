#!/usr/bin/env bash
# e2e: the CPU gate ([global] handshake_cpus) serves handshakes in the order
# they arrived. With one CPU slot and a token that is CPU (tests/slowtoken
# burning 3 ms per signature, so a thread keeps its slot inside a token
# call), the first handshake is held inside the token (slowtoken "hold")
# and so holds the slot; four more arrive one after the other, each sent
# once the earlier ones are seen waiting for the slot (SIGUSR1:
# cpu_waiting=) or at the token (the slowtoken sign log). The order in
# which they then reach the token (the sign log: which key, as each client
# asked for another) must be the order they arrived in. The watchdog takes
# the slot back from a thread 50 ms into a token call, so the held
# handshakes reach the token one after the other, in the gate's order.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools python3
[ -n "${SLOWTOKEN:-}" ] && [ -f "$SLOWTOKEN" ] || skip "the slowtoken module was not built (SLOWTOKEN unset)"
[ -n "${HSMTLS_LOAD:-}" ] && [ -x "$HSMTLS_LOAD" ] || skip "hsmtls-load was not built (HSMTLS_LOAD unset)"
e2e_init
provision_token
start_backend

conf=$E2E_DIR/gate.conf
ctl=$E2E_DIR/control
slog=$E2E_DIR/sign.log
: >"$ctl"
{
	printf '[global]\nlog_level = info\nhandshake_threads = 8\nhandshake_cpus = 1\nhandshake_nice = 0\n\n'
	printf '[token demo]\nuri = %s\nmodule = %s\npin_file = %s\nmax_sessions = 8\nconcurrency_min = 8\nconcurrency_max = 8\n\n' \
		"$HSMTLS_TOKEN_URI" "$SLOWTOKEN" "$HSMTLS_PIN_FILE"
	printf '[listener www]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\nhandshake_timeout = 60s\n' "$BACKEND_PORT"
	for k in RSA2048 P256 P384 ED25519; do
		printf 'cert = %s\nkey = %s\n' "$(eval echo "\$HSMTLS_CERT_$k")" "$(eval echo "\$HSMTLS_KEY_$k")"
	done
} >"$conf"
HSMTLS_SLOWTOKEN_MODULE="$HSMTLS_MODULE" HSMTLS_SLOWTOKEN_BURN_US=3000 HSMTLS_SLOWTOKEN_CONTROL_FILE="$ctl" \
	HSMTLS_SLOWTOKEN_SIGN_LOG="$slog" start_daemon "$conf" "$E2E_DIR/gate.log" || bail "daemon did not start"
PORT=$(listener_port www)
check_grep "handshake_cpus = 1 is reported" "$DAEMON_LOG" 'ready: 8 handshake threads, [0-9]+ I/O threads, 1 handshake steps on the CPU at once'

# Warm-up: the token layer measures its CPU per operation (3 ms burnt):
# from then on a thread keeps its CPU slot inside a signature.
"$HSMTLS_LOAD" --connect "127.0.0.1:$PORT" --sni www.hsmtls.test --cafile "$HSMTLS_CA" --threads 2 --count 24 \
	--priority 'NORMAL:-VERS-ALL:+VERS-TLS1.3:-SIGN-ALL:+SIGN-ECDSA-SECP256R1-SHA256' --json >"$E2E_DIR/warm.json" 2>&1
check "the warm-up handshakes succeed" grep -q '"handshakes":24,' "$E2E_DIR/warm.json"

printf 'hold\n' >"$ctl.tmp" && mv -f "$ctl.tmp" "$ctl"
order="p256 rsa2048 p384 ed25519 p256"
# shellcheck disable=SC2086 # the labels are words
timeout 120 python3 "$E2E_HERE/gate_order.py" "$PORT" "$DAEMON_PID" "$DAEMON_LOG" "$slog" "$ctl" $order \
	>"$E2E_DIR/order.out" 2>&1
sed 's/^/# /' "$E2E_DIR/order.out"
got=$(sed -n 's/^ORDER //p' "$E2E_DIR/order.out")
check_eq "the held CPU slot went to the waiting handshakes in the order they arrived" "$order" "$got"
check_eq "every one of them got its server flight once the token answered" "FLIGHTS 5" "$(grep '^FLIGHTS' "$E2E_DIR/order.out")"
# The slot was held inside the token (a CPU token), not lent: the test
# above saw the gate's queue, not threads passing a free gate.
taken=$(handshakes_field cpu_slots_taken_back)
check "the watchdog took the slot back from the held handshakes (cpu_slots_taken_back=$taken)" test "${taken:-0}" -ge 4

stop_daemon
check_eq "hsmtlsd exits 0 after SIGTERM" 0 "$DAEMON_RC"
e2e_finish
