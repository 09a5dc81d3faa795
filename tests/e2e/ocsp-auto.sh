#!/usr/bin/env bash
# e2e: OCSP stapling in automatic mode (ocsp_response = auto): hsmtlsd asks
# the responder named in the leaf's Authority Information Access, on its
# own thread. One daemon, four listeners, each with its own leaf (re-issued
# from the token's p256 certificate by mk_aia_cert.py, with the same key on
# the token) whose AIA names a loopback responder:
#   live   `openssl ocsp -nmin 1` (a real responder, 60 s responses): the
#          staple is seen by openssl s_client -status and gnutls-cli
#          --ocsp; the log shows the fetch and a refresh in 30 s (half);
#          the staple carries our request's nonce (openssl ocsp echoes it);
#   late   `openssl ocsp` started only after two failed attempts: the log
#          shows the backoff (1 s, then 2 s), then the staple comes;
#   stale  ocsp_responder.py answering with responses already past their
#          nextUpdate: refused when fetched, nothing stapled;
#   short  ocsp_responder.py with 6 s responses, two of them, then HTTP 503:
#          refreshed at half the validity (a second fetch), then after the
#          last response's nextUpdate nothing is stapled any more; the two
#          requests carry two different nonces, the responses none (accepted);
#   replay ocsp_responder.py answering with a nonce that is not the
#          request's (an answer to another request): refused, not stapled.
#   rollback ocsp_responder.py answering REVOKED, then good with an older
#          thisUpdate (a replayed answer): refused, the REVOKED stays.
#   twin   the live leaf on a fifth listener: it shares live's state (one
#          state per leaf certificate), one request for both.
# At start: a leaf without an OCSP responder, or a chain without its
# issuer, stops the start with the reason. At the end, a second daemon
# whose responder takes the request and never answers: SIGTERM during that
# fetch gives it up and the fetch thread is joined before the teardown.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools openssl python3 gnutls-cli
python3 -c 'import cryptography.x509.ocsp' 2>/dev/null || skip "python3-cryptography is missing"
e2e_init
provision_token
start_backend
unset http_proxy HTTP_PROXY https_proxy HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY
# certtool may write an EC private key a byte short (a leading zero), which
# python3-cryptography refuses; openssl writes it at full length.
openssl pkey -in "$TOKEN_DIR/ca.key" -out "$E2E_DIR/ca.key" 2>/dev/null || bail "openssl pkey: the CA key"
CAKEY=$E2E_DIR/ca.key
INDEX=$E2E_DIR/index.txt
: >"$INDEX"
# the leaves share their subject: openssl's index must allow that
echo 'unique_subject = no' >"$INDEX.attr"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mkcert() { # NAME PORT: $E2E_DIR/NAME-chain.pem, its line in the index
	python3 "$SRCDIR/tests/e2e/mk_aia_cert.py" "$HSMTLS_CERT_P256" "$HSMTLS_CA" "$CAKEY" "http://127.0.0.1:$2/" \
		"$E2E_DIR/$1-chain.pem" >>"$INDEX" || bail "mk_aia_cert.py $1"
}
# start_openssl_ocsp PORT LOG: `openssl ocsp` serving the index on PORT (-text, line-buffered: each request and answer as it comes).
start_openssl_ocsp() {
	stdbuf -oL openssl ocsp -index "$INDEX" -port "$1" -rsigner "$HSMTLS_CA" -rkey "$CAKEY" -CA "$HSMTLS_CA" -nmin 1 -ignore_err -text \
		>"$2" 2>&1 &
	E2E_PIDS+=("$!")
	wait_until 10 grep -q "waiting for OCSP client connections" "$2" || bail "openssl ocsp did not listen on port $1: $(head -c 300 "$2")"
	grep -q "^ACCEPT .*:$1 " "$2" || bail "openssl ocsp did not listen on port $1: $(head -c 300 "$2")"
}
# start_py_ocsp NAME VALIDITY GOOD [NONCE [STATUSES]]: sets PY_PORT; requests logged in NAME-responder.out.
start_py_ocsp() {
	local out=$E2E_DIR/$1-responder.out
	python3 "$SRCDIR/tests/e2e/ocsp_responder.py" "$E2E_DIR/$1-chain.pem" "$HSMTLS_CA" "$CAKEY" "$2" "$3" "${4:-none}" "${5:-good}" \
		>"$out" 2>&1 &
	E2E_PIDS+=("$!")
	wait_until 10 grep -q '^PORT [0-9]' "$out" || bail "ocsp_responder.py did not report its port"
	PY_PORT=$(awk '/^PORT /{print $2; exit}' "$out")
}

LIVE_PORT=$(free_port)
LATE_PORT=$(free_port)
mkcert live "$LIVE_PORT"
mkcert late "$LATE_PORT"
# the python responders read their leaf at each request: start them, then
# make the leaf that names their port
start_py_ocsp stale -10 1000
STALE_PORT=$PY_PORT
mkcert stale "$STALE_PORT"
start_py_ocsp short 6 2
SHORT_PORT=$PY_PORT
mkcert short "$SHORT_PORT"
start_py_ocsp replay 60 1000 wrong
REPLAY_PORT=$PY_PORT
mkcert replay "$REPLAY_PORT"
start_py_ocsp rollback 20 1000 none revoked,old-good
ROLLBACK_PORT=$PY_PORT
mkcert rollback "$ROLLBACK_PORT"
start_openssl_ocsp "$LIVE_PORT" "$E2E_DIR/live-responder.out"

conf=$E2E_DIR/auto.conf
printf '[global]\nlog_level = info\ndrain_timeout = 5s\n\n' >"$conf"
write_token_section "$conf"
for l in live late stale short replay rollback twin; do
	printf '[listener %s]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\nocsp_response = auto\n\n' \
		"$l" "$BACKEND_PORT" "$E2E_DIR/${l/twin/live}-chain.pem" "$HSMTLS_KEY_P256" >>"$conf"
done
start_daemon "$conf" || bail "daemon did not start"
LIVE=$(listener_port live)
LATE=$(listener_port late)
STALE=$(listener_port stale)
SHORT=$(listener_port short)
TWIN=$(listener_port twin)
REPLAY=$(listener_port replay)
ROLLBACK=$(listener_port rollback)

# stapled PORT [s_client args]: the client's view of the staple in STAPLE
# (good, revoked, none) and OUT.
stapled() {
	local port=$1
	shift
	OUT=$(openssl_get "$port" www.hsmtls.test ocsp -status "$@" 2>&1)
	if grep -q 'OCSP response: no response sent' <<<"$OUT"; then
		STAPLE=none
	else
		STAPLE=$(sed -n 's/^ *Cert Status: //p' <<<"$OUT" | head -n 1)
		STAPLE=${STAPLE:-?}
	fi
	grep -q '^hello from backend: GET /ocsp HTTP/1.1' <<<"$OUT" || STAPLE="no answer ($STAPLE)"
}
staple_is() { stapled "$2" "${@:3}"; [ "$STAPLE" = "$1" ]; }
fetched() { grep -c "listener $1: OCSP response from http://127.0.0.1:$2/: good" "$DAEMON_LOG"; }
fetched_at_least() { [ "$(fetched "$1" "$2")" -ge "$3" ]; }

# Each listener's fetches run on their own clock from the start: the
# checks come in the order things happen.
# ------------------------------------------------------------ late: backoff
wait_until 20 grep -q "listener late: OCSP request to http://127.0.0.1:$LATE_PORT/ failed (attempt 2): .*; nothing to staple; retrying in 2s" \
	"$DAEMON_LOG" || fail "no second failed attempt with a 2 s backoff for the responder that is down"
check_grep "daemon log: the first failure, retried after 1 s" "$DAEMON_LOG" \
	"listener late: OCSP request to http://127\\.0\\.0\\.1:$LATE_PORT/ failed \\(attempt 1\\): .*; nothing to staple; retrying in 1s"
stapled "$LATE"
check_eq "the responder down: nothing stapled (and the handshake is served)" none "$STAPLE"
start_openssl_ocsp "$LATE_PORT" "$E2E_DIR/late-responder.out"
# ------------------------------------------------------------ short: refresh, then expiry
if wait_until 20 fetched_at_least short "$SHORT_PORT" 2; then
	ok "6 s responses: refreshed at half their validity (a second fetch)"
else
	fail "6 s responses: $(fetched short "$SHORT_PORT") fetch(es) within 20 s, want 2 (refresh)"
fi
check_grep "daemon log: the refresh is scheduled at half the validity, the response had no nonce (accepted)" "$DAEMON_LOG" \
	"listener short: OCSP response from http://127\\.0\\.0\\.1:$SHORT_PORT/: good, [0-9]+ bytes, no nonce, .*; next refresh in [1-4]s"
nonces=$(sed -n 's/^REQUEST [12] 200 nonce=\([^ ]*\).*/\1/p' "$E2E_DIR/short-responder.out")
if [ "$(wc -l <<<"$nonces")" = 2 ] && ! grep -q -- '^-$' <<<"$nonces" && [ "$(sort -u <<<"$nonces" | wc -l)" = 2 ]; then
	ok "each request carries a nonce of its own ($(tr '\n' ' ' <<<"$nonces" | cut -c1-60))"
else
	fail "the two requests' nonces: $(tr '\n' ' ' <<<"$nonces"), want two different ones"
fi
stapled "$SHORT"
check_eq "the refreshed response is stapled" good "$STAPLE"
wait_until 20 grep -q "listener short: OCSP request to http://127.0.0.1:$SHORT_PORT/ failed (attempt 1): HTTP status 503; still stapling the response valid until " \
	"$DAEMON_LOG" || fail "the failing responder: no 'still stapling' line"
if wait_until 20 staple_is none "$SHORT"; then
	ok "the responder failing: after the last response's nextUpdate nothing is stapled"
else
	fail "after the response's nextUpdate: the staple is '$STAPLE', want none"
fi
check_grep "daemon log: the response went out of date" "$DAEMON_LOG" \
	"listener short: OCSP response from http://127\\.0\\.0\\.1:$SHORT_PORT/ went out of date and no fresh one came; not stapling it"

# ------------------------------------------------------------ stale
wait_until 20 grep -q "listener stale: OCSP request to http://127.0.0.1:$STALE_PORT/ failed (attempt 1): it is out of date" \
	"$DAEMON_LOG" || fail "the out-of-date response was not refused (log)"
stapled "$STALE"
check_eq "a fetched response past its nextUpdate: nothing stapled" none "$STAPLE"

# ------------------------------------------------------------ replay: a nonce not ours
wait_until 20 grep -q "listener replay: OCSP request to http://127.0.0.1:$REPLAY_PORT/ failed (attempt 1): its nonce is not the one of our request" \
	"$DAEMON_LOG" || fail "a response with another request's nonce was not refused (log)"
stapled "$REPLAY"
check_eq "a response with another request's nonce: nothing stapled" none "$STAPLE"

# ------------------------------------------------------------ rollback: an older good after a revoked
# 20 s responses, the first REVOKED, then good ones made an hour earlier
# (replayed from before the revocation, without a nonce): refused at the
# refresh (10 s in), the REVOKED stays stapled.
wait_until 30 grep -q "listener rollback: OCSP request to http://127.0.0.1:$ROLLBACK_PORT/ failed (attempt 1): it (good, thisUpdate [0-9T:Z-]*) is not newer than the REVOKED response taken last (thisUpdate [0-9T:Z-]*); still stapling the response valid until " \
	"$DAEMON_LOG" || fail "an answer older than the REVOKED one taken last was not refused (log)"
check_grep "the responder served REVOKED, then the older good" "$E2E_DIR/rollback-responder.out" '^REQUEST 2 200 nonce=[0-9a-f]+ old-good$'
stapled "$ROLLBACK"
check_eq "an older good after a REVOKED: the REVOKED stays stapled" revoked "$STAPLE"

# ------------------------------------------------------------ live
check_grep "daemon log: automatic mode names the responder" "$DAEMON_LOG" \
	"listener live: OCSP responses for .*live-chain\\.pem fetched from http://127\\.0\\.0\\.1:$LIVE_PORT/ \\(ocsp_response = auto\\)"
wait_until 20 fetched_at_least live "$LIVE_PORT" 1 || fail "no OCSP response fetched from openssl ocsp within 20 s"
check_grep "daemon log: the fetch, its next update and the refresh at half the validity (60 s)" "$DAEMON_LOG" \
	"listener live: OCSP response from http://127\\.0\\.0\\.1:$LIVE_PORT/: good, [0-9]+ bytes, our nonce, next update [0-9T:Z-]+; next refresh in (29|30)s"
for v in 1.3 1.2; do
	stapled "$LIVE" "-tls${v/./_}"
	check_eq "TLS $v: openssl s_client -status sees the responder's answer stapled" good "$STAPLE"
	grep -q 'OCSP Response Status: successful' <<<"$OUT" || fail "TLS $v: no 'OCSP Response Status: successful' in the client's output"
done
# the staple's nonce (as s_client prints it) is the one of a request the
# responder received (openssl ocsp -text prints each request, then its answer)
nonce=$(grep -A1 'OCSP Nonce:' <<<"$OUT" | sed -n '2s/^ *//p')
asked=$(awk '/Request Extensions:/ { r = 1 } /Response Extensions:/ { r = 0 } r && n { print; n = 0 } r && /OCSP Nonce:/ { n = 1 }' \
	"$E2E_DIR/live-responder.out")
if [ -n "$nonce" ] && grep -qF -- "$nonce" <<<"$asked"; then
	ok "the staple carries the nonce of hsmtlsd's request ($nonce)"
else
	fail "the staple's nonce '${nonce:-none}' is not in a request the responder received"
fi
# gnutls-cli --ocsp checks the staple against the CA; --save-ocsp keeps
# what the server stapled.
GOUT=$(gnutls_get "$LIVE" www.hsmtls.test NORMAL ocsp --ocsp --save-ocsp="$E2E_DIR/gnutls-cli.ocsp" 2>&1)
grep -i ocsp <<<"$GOUT" | sed 's/^/#   gnutls-cli: /' | head -n 5
check "gnutls-cli --ocsp: the server stapled a response (--save-ocsp)" test -s "$E2E_DIR/gnutls-cli.ocsp"
check "gnutls-cli --ocsp: the saved staple says good" grep -q 'Cert Status: good' \
	<(openssl ocsp -respin "$E2E_DIR/gnutls-cli.ocsp" -resp_text -noverify 2>&1)
check "gnutls-cli --ocsp: the certificate verifies with its stapled status" grep -qE 'Status: The certificate is trusted' <<<"$GOUT"
check "gnutls-cli --ocsp: served" grep -q '^hello from backend: GET /ocsp' <<<"$GOUT"

# twin: the live leaf again; the state is kept per leaf, so twin shares it
stapled "$TWIN"
check_eq "twin (the live leaf on another listener): the shared response is stapled" good "$STAPLE"
check_eq "one state per leaf: the live responder is named once for live and twin" 1 \
	"$(grep -c "OCSP responses for .*live-chain\.pem fetched from" "$DAEMON_LOG")"
check_eq "one state per leaf: one request to the live responder so far" 1 "$(grep -c 'Received request' "$E2E_DIR/live-responder.out")"

# ------------------------------------------------------------ late: the staple after the backoff
if wait_until 30 staple_is good "$LATE"; then
	ok "the responder up again: its answer is stapled after the next retry"
else
	fail "after the responder came up: the staple is '$STAPLE'"
fi

stop_daemon 15
check_eq "hsmtlsd exits 0 on SIGTERM (with the OCSP thread busy retrying)" 0 "$DAEMON_RC"

# ------------------------------------------------------------ a fetch in progress at shutdown
# A stand-in for a responder that hangs: it takes every connection and
# never answers (hsmtlsd's fetch would wait for its 10 s timeout).
python3 -c '
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(8)
print("PORT %d" % s.getsockname()[1], flush=True)
held = []
while True:
    held.append(s.accept()[0])
    print("OPEN %d" % len(held), flush=True)
' >"$E2E_DIR/hang-responder.out" 2>&1 &
E2E_PIDS+=("$!")
wait_until 10 grep -q '^PORT [0-9]' "$E2E_DIR/hang-responder.out" || bail "the hanging responder did not report its port"
HANG_PORT=$(awk '/^PORT /{print $2; exit}' "$E2E_DIR/hang-responder.out")
mkcert hang "$HANG_PORT"
conf=$E2E_DIR/hang.conf
printf '[global]\nlog_level = info\n\n' >"$conf"
write_token_section "$conf"
printf '[listener hang]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\nocsp_response = auto\n' \
	"$BACKEND_PORT" "$E2E_DIR/hang-chain.pem" "$HSMTLS_KEY_P256" >>"$conf"
start_daemon "$conf" "$E2E_DIR/hang.log" || bail "the second daemon did not start"
wait_until 20 grep -q '^OPEN 1$' "$E2E_DIR/hang-responder.out" || fail "hsmtlsd did not connect to the hanging responder"
stop_daemon 30
check_eq "SIGTERM during a fetch that hangs: hsmtlsd exits 0" 0 "$DAEMON_RC"
check_grep "the fetch in progress is given up at shutdown (the fetch thread is stopped and joined)" "$DAEMON_LOG" \
	"listener hang: OCSP request to http://127\\.0\\.0\\.1:$HANG_PORT/ given up: hsmtlsd is stopping"

# ------------------------------------------------------------ at start
refused() { # DESC CERT REGEX
	local c=$E2E_DIR/bad.conf log=$E2E_DIR/bad.log rc=0
	printf '[global]\nlog_level = info\n\n' >"$c"
	write_token_section "$c"
	printf '[listener web]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\nocsp_response = auto\n' \
		"$BACKEND_PORT" "$2" "$HSMTLS_KEY_P256" >>"$c"
	timeout 20 "$HSMTLSD" -c "$c" >/dev/null 2>"$log" </dev/null || rc=$?
	if [ "$rc" != 0 ] && [ "$rc" != 124 ] && grep -qE "$3" "$log"; then
		ok "$1: the start is refused: $(grep -E "$3" "$log" | head -n 1 | sed 's/.*error: //' | cut -c1-150)"
	else
		fail "$1: status $rc: $(tail -n 2 "$log" | tr '\n' ' ')"
	fi
}
refused "a leaf without an OCSP responder in its AIA" "$HSMTLS_CERT_P256" 'bad\.conf:[0-9]+: ocsp_response = auto: the certificate names no OCSP responder'
head -n "$(grep -n 'END CERTIFICATE' "$E2E_DIR/live-chain.pem" | head -n 1 | cut -d: -f1)" "$E2E_DIR/live-chain.pem" >"$E2E_DIR/leaf-only.pem"
refused "a chain without the issuer" "$E2E_DIR/leaf-only.pem" "bad\\.conf:[0-9]+: ocsp_response = auto: automatic mode needs the issuer's certificate"
e2e_finish
