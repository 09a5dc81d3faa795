#!/usr/bin/env bash
# e2e: after the handshake, a record error gets the fatal alert GnuTLS
# names for it (RFC 8446 6.2, RFC 5246 7.2.2) before the connection ends,
# as gnutls-serv sends them: a corrupted record (one bit of its tag / MAC
# flipped) gets bad_record_mac in TLS 1.3, TLS 1.2 with AES-GCM and TLS 1.2
# with AES-CBC (a listener whose priority allows it); a ChangeCipherSpec
# after the TLS 1.3 handshake gets unexpected_message; a TLS 1.2
# renegotiation request gets no_renegotiation, and the connection ends
# (instead of no answer at all). The client is
# tests/e2e/tls-inject.c, built with GnuTLS.
# A stream cut short is never passed on as a proper end (truncation): a
# client that closes TCP without close_notify gets its backend connection
# reset, not ended with a FIN (with close_notify: a FIN, the control); a
# backend whose connection fails (a reset) gets the client's connection
# closed without close_notify (a backend that ends: close_notify, the
# control). tests/e2e/truncation.py is the backend and the client.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

: "${TLS_INJECT:=$SRCDIR/build/tests/e2e/tls-inject}"
[ -x "$TLS_INJECT" ] || bail "TLS_INJECT=$TLS_INJECT is not an executable"
e2e_init
provision_token
start_backend

conf=$E2E_DIR/alerts.conf
printf '[global]\nlog_level = info\n\n' >"$conf"
write_token_section "$conf"
write_listener "$conf" aead
write_listener "$conf" cbc "priority = NORMAL:-VERS-ALL:+VERS-TLS1.2:-CIPHER-ALL:+AES-128-CBC:-MAC-ALL:+SHA256:+SHA1"
CUT_OUT=$E2E_DIR/cut-backend.out
python3 "$E2E_HERE/truncation.py" backend "$E2E_DIR/cut-backend.port" >"$CUT_OUT" 2>"$CUT_OUT.err" &
E2E_PIDS+=("$!")
wait_until 10 test -s "$E2E_DIR/cut-backend.port" || bail "truncation.py backend did not start: $(cat "$CUT_OUT.err")"
cat >>"$conf" <<EOF2

[listener cut]
listen = 127.0.0.1:0
backend = 127.0.0.1:$(cat "$E2E_DIR/cut-backend.port")
cert = $HSMTLS_CERT_P256
key = $HSMTLS_KEY_P256
EOF2
start_daemon "$conf" || bail "daemon did not start"
AEAD=$(listener_port aead)
CBC=$(listener_port cbc)
[ -n "$AEAD" ] && [ -n "$CBC" ] || bail "no ports in the log"

TLS13="NORMAL:-VERS-ALL:+VERS-TLS1.3"
GCM12="NORMAL:-VERS-ALL:+VERS-TLS1.2:-CIPHER-ALL:+AES-128-GCM"
CBC12="NORMAL:-VERS-ALL:+VERS-TLS1.2:-CIPHER-ALL:+AES-128-CBC:-MAC-ALL:+SHA256:+SHA1"

inject() { # PORT PRIORITY MODE
	timeout 20 "$TLS_INJECT" "$1" "$HSMTLS_CA" www.hsmtls.test "$2" "$3" 2>&1
}

expect() { # DESC PORT PRIORITY MODE EXPECTED
	local got
	got=$(inject "$2" "$3" "$4")
	check_eq "$1" "$5" "$got"
}

expect "TLS 1.3, a good second record: echoed (control)" "$AEAD" "$TLS13" none "data 5"
expect "TLS 1.3, a corrupted record: bad_record_mac" "$AEAD" "$TLS13" flip "alert GNUTLS_A_BAD_RECORD_MAC"
expect "TLS 1.2 AES-GCM, a corrupted record: bad_record_mac" "$AEAD" "$GCM12" flip "alert GNUTLS_A_BAD_RECORD_MAC"
expect "TLS 1.2 AES-CBC, a good second record: echoed (control)" "$CBC" "$CBC12" none "data 5"
expect "TLS 1.2 AES-CBC, a corrupted record: bad_record_mac" "$CBC" "$CBC12" flip "alert GNUTLS_A_BAD_RECORD_MAC"
expect "TLS 1.3, ChangeCipherSpec after the handshake: unexpected_message" "$AEAD" "$TLS13" ccs "alert GNUTLS_A_UNEXPECTED_MESSAGE"
expect "TLS 1.2, a client asks for renegotiation: refused with no_renegotiation" "$AEAD" "$GCM12" reneg "alert GNUTLS_A_NO_RENEGOTIATION"
check_grep "the daemon logs the error and the alert it sent" "$DAEMON_LOG" \
	'listener aead: 127\.0\.0\.1:[0-9]+: closed \(.*; sent alert Bad record MAC\)'
check "the daemon still serves after the record errors" sh -c \
	"[ \"\$(timeout 20 '$TLS_INJECT' '$AEAD' '$HSMTLS_CA' www.hsmtls.test '$TLS13' none 2>&1)\" = 'data 5' ]"

# ------------------------------------------------------------- truncation
CUT=$(listener_port cut)
cut_client() { timeout 30 python3 "$E2E_HERE/truncation.py" client "$CUT" "$HSMTLS_CA" www.hsmtls.test "$1" 2>&1; }
# cut_backend_saw N: the backend's Nth verdict line
cut_backend_saw() { wait_until 15 sh -c "[ \$(wc -l <'$CUT_OUT') -ge $1 ]"; sed -n "${1}p" "$CUT_OUT"; }
check_eq "close_notify then TCP's end: the client sent" SENT "$(cut_client clean)"
check_eq "close_notify then TCP's end: the backend gets its data and an end (control)" "END 10" "$(cut_backend_saw 1)"
check_eq "TCP's end without close_notify: the client sent" SENT "$(cut_client cut)"
check_eq "TCP's end without close_notify: the backend gets the data, then a reset, not an end" "RESET 10" "$(cut_backend_saw 2)"
check_grep "the daemon logs the cut" "$DAEMON_LOG" 'listener cut: .*closed \(the client closed without close_notify: the backend is reset\)'
check_eq "a backend that resets: the client gets the data and no close_notify" "CUT partial" "$(cut_client read)"
check_grep "the daemon logs the backend's failure" "$DAEMON_LOG" \
	"listener cut: .*closed \\(the backend's read failed \\(Connection reset by peer\\): closed without close_notify\\)"

stop_daemon 10
check_eq "hsmtlsd exits 0" 0 "$DAEMON_RC"
e2e_finish
