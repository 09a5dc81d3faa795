#!/usr/bin/env bash
# e2e: a TLS 1.3 client's change_cipher_spec record (RFC 8446 D.4), sent in
# a segment of its own before its Finished (as GnuTLS clients do), is
# dropped on the main loop while the handshake waits there: the handshake
# waits once for the client's second flight (SIGUSR1: client_waits=), not
# once more after a handshake thread read the CCS alone. The client
# (split_ccs.py) sends the CCS, waits until the daemon has read it from the
# socket, then sends its Finished.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools python3
e2e_init
provision_token
start_backend

conf=$E2E_DIR/ccs.conf
printf '[global]\nlog_level = info\n\n' >"$conf"
write_token_section "$conf"
printf '[listener www]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\n' \
	"$BACKEND_PORT" "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256" >>"$conf"
start_daemon "$conf" || bail "daemon did not start"
PORT=$(listener_port www)

w0=$(handshakes_field client_waits)
timeout 60 python3 "$E2E_HERE/split_ccs.py" "$PORT" "$HSMTLS_CA" >"$E2E_DIR/ccs.out" 2>&1
sed 's/^/# /' "$E2E_DIR/ccs.out"
check "the client sent its CCS alone, the server read it, then the Finished" grep -q '^DONE' "$E2E_DIR/ccs.out"
check "the handshake completed on the server" wait_until 10 grep -q 'listener www: 127.0.0.1:[0-9]*: (TLS1.3)' "$DAEMON_LOG"
w1=$(handshakes_field client_waits)
check_eq "the handshake waited once for the client's second flight" 1 "$((${w1:-0} - ${w0:-0}))"

stop_daemon
check_eq "hsmtlsd exits 0 after SIGTERM" 0 "$DAEMON_RC"
e2e_finish
