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
# control). Any other end of a connection whose client did not end resets
# the backend too: a backend that half-closes after its reply (its end goes
# on as close_notify) while the client stays silent past idle_timeout; a
# plain idle timeout (the client gets no close_notify either); a drain
# timeout at SIGTERM. After a backend's half-close the client may still
# send for idle_timeout (no shorter hidden delay): data after a 6 s pause
# reaches the backend, with its end. tests/e2e/truncation.py is the backend
# and the client.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

: "${TLS_INJECT:=$SRCDIR/build/tests/e2e/tls-inject}"
[ -x "$TLS_INJECT" ] || bail "TLS_INJECT=$TLS_INJECT is not an executable"
e2e_init
provision_token
start_backend

conf=$E2E_DIR/alerts.conf
printf '[global]\nlog_level = info\ndrain_timeout = 1s\n\n' >"$conf"
write_token_section "$conf"
write_listener "$conf" aead
write_listener "$conf" cbc "priority = NORMAL:-VERS-ALL:+VERS-TLS1.2:-CIPHER-ALL:+AES-128-CBC:-MAC-ALL:+SHA256:+SHA1"
CUT_OUT=$E2E_DIR/cut-backend.out
python3 "$E2E_HERE/truncation.py" backend "$E2E_DIR/cut-backend.port" >"$CUT_OUT" 2>"$CUT_OUT.err" &
E2E_PIDS+=("$!")
wait_until 10 test -s "$E2E_DIR/cut-backend.port" || bail "truncation.py backend did not start: $(cat "$CUT_OUT.err")"
# cut_listener NAME [SETTING]: a listener in front of truncation.py's backend
cut_listener() {
	printf '\n[listener %s]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\n%s\n' \
		"$1" "$(cat "$E2E_DIR/cut-backend.port")" "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256" "${2:-}" >>"$conf"
}
cut_listener cut
cut_listener idle "idle_timeout = 1s"
cp "$conf" "$conf.without-gone"
cut_listener gone
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
IDLE=$(listener_port idle)
GONE=$(listener_port gone)
[ -n "$CUT" ] && [ -n "$IDLE" ] && [ -n "$GONE" ] || bail "no ports in the log"
# cut_client PORT MODE
cut_client() { timeout 30 python3 "$E2E_HERE/truncation.py" client "$1" "$HSMTLS_CA" www.hsmtls.test "$2" "$CUT_OUT" 2>&1; }
# cut_backend_saw TAG: the backend's verdict on the connection TAG
cut_backend_saw() { wait_until 20 grep -q "^$1 " "$CUT_OUT"; grep "^$1 " "$CUT_OUT"; }
# the 6 s pause runs beside the checks below
cut_client "$CUT" halflong >"$E2E_DIR/halflong.out" &
HALFLONG_PID=$!
E2E_PIDS+=("$HALFLONG_PID")
cut_client "$CUT" clean >/dev/null
check_eq "close_notify then TCP's end: the backend gets its data and an end (control)" "clean END 6" "$(cut_backend_saw clean)"
cut_client "$CUT" cut >/dev/null
check_eq "TCP's end without close_notify: the backend gets the data, then a reset, not an end" "cut RESET 4" "$(cut_backend_saw cut)"
check_grep "the daemon logs the cut" "$DAEMON_LOG" 'listener cut: .*closed \(the client closed without close_notify: the backend is reset\)'
check_eq "the backend half-closes: the client reads its reply and close_notify" "CLOSE_NOTIFY reply" "$(cut_client "$IDLE" halfclose)"
check_eq "the backend half-closes, the client is silent past idle_timeout: the backend is reset, not ended" \
	"halfclose RESET 10" "$(cut_backend_saw halfclose)"
check_grep "the daemon logs why" "$DAEMON_LOG" \
	'listener idle: .*closed \(idle timeout after the backend ended and close_notify was sent: the backend is reset\)'
check_eq "idle timeout: the client gets no close_notify" "CUT" "$(cut_client "$IDLE" idle)"
check_eq "idle timeout: the backend is reset, not ended" "idle RESET 5" "$(cut_backend_saw idle)"
check_grep "the daemon logs the idle timeout" "$DAEMON_LOG" 'listener idle: .*closed \(idle timeout: the backend is reset\)'
check_eq "a backend that resets: the client gets the data and no close_notify" "CUT partial" "$(cut_client "$CUT" read)"
check_grep "the daemon logs the backend's failure" "$DAEMON_LOG" \
	"listener cut: .*closed \\(the backend's read failed \\(Connection reset by peer\\): closed without close_notify\\)"

wait "$HALFLONG_PID"
check_eq "the backend half-closes, the client sends after a 6 s pause: the backend gets it, then an end" \
	"halflong END 30" "$(cut_backend_saw halflong)"

# a reload removes a listener: its connection still open at drain_timeout (1 s)
cut_client "$GONE" holdgone >"$E2E_DIR/holdgone.out" &
HOLDGONE_PID=$!
E2E_PIDS+=("$HOLDGONE_PID")
wait_until 20 grep -q "^open holdgone$" "$CUT_OUT" || bail "the holdgone connection did not reach the backend"
cp "$conf.without-gone" "$conf"
hup "SIGHUP without listener gone"
verdict "the reload removes listener gone" "removed: gone"
check_eq "a reload's drain timeout: the backend of a connection still open is reset, not ended" "holdgone RESET 9" "$(cut_backend_saw holdgone)"
wait "$HOLDGONE_PID"
check_eq "a reload's drain timeout: the client gets no close_notify" "CUT" "$(cat "$E2E_DIR/holdgone.out")"
check_grep "the daemon logs it" "$DAEMON_LOG" 'listener gone: .*closed \(listener removed by a reload: drain timeout: the backend is reset\)'

# shutdown: a connection still open at drain_timeout (1 s)
cut_client "$CUT" hold >"$E2E_DIR/hold.out" &
HOLD_PID=$!
E2E_PIDS+=("$HOLD_PID")
wait_until 20 grep -q "^open hold$" "$CUT_OUT" || bail "the hold connection did not reach the backend"
stop_daemon 10
check_eq "hsmtlsd exits 0" 0 "$DAEMON_RC"
check_eq "SIGTERM, drain timeout: the backend of a connection still open is reset, not ended" "hold RESET 5" "$(cut_backend_saw hold)"
wait "$HOLD_PID"
check_eq "SIGTERM, drain timeout: the client gets no close_notify" "CUT" "$(cat "$E2E_DIR/hold.out")"
check_grep "the daemon logs it" "$DAEMON_LOG" 'listener cut: .*closed \(shutting down: the backend is reset\)'
e2e_finish
