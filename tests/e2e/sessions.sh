#!/usr/bin/env bash
# e2e: resumption settings per listener (session_tickets, session_cache,
# session_lifetime) and the TLS 1.2 session-ID cache. openssl s_client
# -no_ticket -sess_out / -sess_in on TLS 1.2 (a client without tickets:
# only the session ID can resume), one daemon, p256 on the token, PROXY v2:
#   open    client_auth = none (defaults: tickets and a cache)
#   req     client_auth = require, client_ca = the test CA
#   nocache session_cache = 0
#   notix   session_tickets = no
#   tiny    session_cache = 1
#   short   session_lifetime = 3s
# Checks: a session ID resumes on its listener with no token operation
# (usage counters) and keeps its client identity on req (resumed_check);
# a session ID of one listener offered to another gets a full handshake
# (each listener its own cache); session_cache = 0 turns the cache off;
# session_tickets = no sends no ticket (TLS 1.2: the cache still resumes;
# TLS 1.3: no resumption); the cache holds at most session_cache sessions;
# an entry older than session_lifetime does not resume. gnutls-cli --resume
# (TLS 1.2 ticket on nocache, TLS 1.2 session ID on notix, TLS 1.3 on
# open): resumed, and the resumed handshake makes no token operation.
# hsmtls-load --resume 0.5 (TLS 1.2 and 1.3): half the handshakes resumed,
# one signature per full handshake only.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=lib-mtls.sh
. "$(dirname "$0")/lib-mtls.sh"

need_tools openssl
e2e_init
provision_token_with --client-keys
start_backend

conf=$E2E_DIR/sessions.conf
mkdir -p "$E2E_DIR/state"
printf '[global]\nlog_level = info\ndrain_timeout = 5s\nstate_dir = %s\n\n' "$E2E_DIR/state" >"$conf"
write_token_section "$conf"
for l in "open:none::" "req:require:$HSMTLS_CA:" "nocache:none::session_cache = 0" "notix:none::session_tickets = no" \
	"tiny:none::session_cache = 1" "short:none::session_lifetime = 3s"; do
	IFS=: read -r name mode ca extra <<<"$l"
	write_listener "$conf" "$name" "client_auth = $mode" "${ca:+client_ca = $ca}" "proxy_protocol = v2" "$extra"
done
# the admin API, for the hsmtls_session_cache_* metrics
METRICS_TOKEN=sessions-metrics-token-0123456789
printf '[admin]\nlisten = unix:%s\ntoken = read:metrics:%s\n\n' "$E2E_DIR/admin.sock" \
	"$(printf %s "$METRICS_TOKEN" | sha256sum | cut -d' ' -f1)" >>"$conf"
start_daemon "$conf" || bail "daemon did not start"
wait_ready || bail "daemon did not log 'ready:'"
declare -A P=()
for n in open req nocache notix tiny short; do
	P[$n]=$(listener_port "$n")
	[ -n "${P[$n]}" ] || bail "no port for listener $n"
done

# (ossl, reused, answered, show_out, ops: lib-mtls.sh)
has_ticket() { openssl sess_id -in "$1" -noout -text 2>/dev/null | grep -q 'TLS session ticket:'; }
SNAP=0
SNAP_FILE=""
snap() {
	SNAP=$((SNAP + 1))
	usage_snapshot "$E2E_DIR/usage.$SNAP" || bail "cannot read the usage counters with SIGUSR1"
	SNAP_FILE=$E2E_DIR/usage.$SNAP
}
FILE_CERT=$HSMTLS_FILE_CLIENT_CERT
FILE_KEY=$HSMTLS_FILE_CLIENT_KEY

# full LISTENER NAME [args]: a full TLS 1.2 handshake without tickets whose
# session goes to $E2E_DIR/s-NAME.
full() {
	local l=$1 n=$2
	shift 2
	ossl "$l" "full-$n" 1.2 -no_ticket -sess_out "$E2E_DIR/s-$n" "$@"
	{ answered "full-$n" && [ -s "$E2E_DIR/s-$n" ]; } || bail "TLS 1.2 full handshake on $l failed (exit $RC)"
	! has_ticket "$E2E_DIR/s-$n" || bail "the session of $l has a ticket although the client sent -no_ticket"
}
# resume_case DESC LISTENER SESSION WANT(yes|no): offers the saved session
# SESSION to LISTENER; yes: resumed with no token operation; no: a full
# handshake (one signature).
resume_case() {
	local desc=$1 l=$2 n=$3 want=$4 b a d
	snap; b=$SNAP_FILE
	ossl "$l" "r-$n-$l" 1.2 -no_ticket -sess_in "$E2E_DIR/s-$n"
	snap; a=$SNAP_FILE
	d=$(($(ops "$a") - $(ops "$b")))
	if [ "$want" = yes ] && reused && answered "r-$n-$l" && [ "$d" = 0 ]; then
		ok "$desc: resumed by session ID, no token operation"
	elif [ "$want" = no ] && ! reused && answered "r-$n-$l" && [ "$(usage_delta "$b" "$a" p256 sign)" = 1 ]; then
		ok "$desc: full handshake (one signature)"
	else
		fail "$desc: want resumed=$want: reused=$(reused && echo yes || echo no), answered=$(answered "r-$n-$l" && echo yes || echo no), exit $RC, $d token operations"
		show_out
	fi
}

# ------------------------------------------------ the session-ID cache
full open open
resume_case "TLS 1.2 without tickets, open" open open yes
resume_case "TLS 1.2 without tickets, open, again" open open yes

full req req -cert "$FILE_CERT" -key "$FILE_KEY"
[ "$(pp_field "$OUT" Client-Byte)" = 0x07 ] || fail "req full handshake: client byte $(pp_field "$OUT" Client-Byte), want 0x07"
resume_case "TLS 1.2 without tickets, req (client certificate in the cached session)" req req yes
v=$(pp_field "$OUT" Client-Byte) c=$(pp_field "$OUT" Client-CN) s=$(pp_field "$OUT" Client-SHA256) vf=$(pp_field "$OUT" Verify)
if [ "$v" = 0x05 ] && [ "$vf" = 0 ] && [ "$c" = "$(cert_cn "$FILE_CERT")" ] && [ "$s" = "$(cert_sha256 "$FILE_CERT")" ]; then
	ok "req resumed by session ID: PROXY SSL|CERT_SESS, verify 0, the same CN and SHA-256 (resumed_check ran)"
else
	fail "req resumed by session ID: client byte $v, verify $vf, CN $c, SHA-256 $s"
fi
check_grep "daemon log: the session-ID resumption on req names its client" "$DAEMON_LOG" \
	"listener req: 127\\.0\\.0\\.1:[0-9]+: .*TLS1\\.2.* key=none\\(resumed\\) client=\"$(cert_subject "$FILE_CERT")\""

# ------------------------------------------- one cache per listener
snap; b=$SNAP_FILE
ossl req "x-open-req" 1.2 -no_ticket -sess_in "$E2E_DIR/s-open"
snap; a=$SNAP_FILE
al=$(alert_of "$OUT")
if ! reused && ! answered "x-open-req" && [ "$al" = 40 ] && [ "$(usage_delta "$b" "$a" p256 sign)" = 1 ]; then
	ok "open's session ID offered to req: full handshake (one signature), refused for want of a certificate (40)"
else
	fail "open's session ID offered to req: reused=$(reused && echo yes || echo no), alert ${al:-none}, $(usage_delta "$b" "$a" p256 sign) signatures"
	show_out
fi
resume_case "req's session ID (with its client certificate) offered to open" open req no
! pp_has "$OUT" Client-CN || fail "open reported req's client identity: $(pp_field "$OUT" Client-CN)"

# ------------------------------------------------------ session_cache = 0
full nocache nocache
resume_case "session_cache = 0: no session-ID resumption" nocache nocache no

# ---------------------------------------------------- session_tickets = no
ossl notix "notix-1.2" 1.2 -sess_out "$E2E_DIR/s-notix"
{ answered notix-1.2 && [ -s "$E2E_DIR/s-notix" ]; } || bail "TLS 1.2 full handshake on notix failed"
check_not "session_tickets = no: TLS 1.2 session without a ticket (the client offered the extension)" has_ticket "$E2E_DIR/s-notix"
resume_case "session_tickets = no, TLS 1.2: the session ID still resumes" notix notix yes
ossl open "open-1.3" 1.3 -sess_out "$E2E_DIR/s-open13"
ossl open "open-1.3r" 1.3 -sess_in "$E2E_DIR/s-open13"
check "TLS 1.3 with tickets (open): resumed" reused
ossl notix "notix-1.3" 1.3 -sess_out "$E2E_DIR/s-notix13"
answered notix-1.3 || bail "TLS 1.3 full handshake on notix failed"
# Without a NewSessionTicket openssl saves no session at all.
if [ ! -s "$E2E_DIR/s-notix13" ]; then
	ok "session_tickets = no, TLS 1.3: no ticket sent (the client saved no session)"
else
	ossl notix "notix-1.3r" 1.3 -sess_in "$E2E_DIR/s-notix13"
	if answered notix-1.3r && ! reused; then
		ok "session_tickets = no, TLS 1.3: no resumption"
	else
		fail "session_tickets = no, TLS 1.3: reused=$(reused && echo yes || echo no), exit $RC"
	fi
fi
[ -s "$E2E_DIR/s-open13" ] || fail "TLS 1.3 on open: the client saved no session (no ticket)"

# --------------------------------------------------- gnutls-cli --resume
# gnutls_resume DESC LISTENER PRIORITY: gnutls-cli --resume (a full
# handshake, then a second connection that resumes it; the request goes on
# the second). Resumed, answered, and the two handshakes together made one
# token operation: the full handshake's signature, none for the resumed.
gnutls_resume() {
	local desc=$1 l=$2 prio=$3 b a d out off
	out=$E2E_DIR/gnutls-resume.out
	snap; b=$SNAP_FILE
	off=$(stat -c %s "$DAEMON_LOG")
	{
		printf 'GET /gr-%s HTTP/1.1\r\nHost: www.hsmtls.test\r\nConnection: close\r\n\r\n' "$l"
		wait_until 10 grep -qE 'hello from backend|Peer has closed|\*\*\* Fatal|Error' "$out"
	} | timeout 20 gnutls-cli --resume --x509cafile="$HSMTLS_CA" --port="${P[$l]}" --sni-hostname=www.hsmtls.test \
		--verify-hostname=www.hsmtls.test --priority="$prio" 127.0.0.1 >"$out" 2>&1
	snap; a=$SNAP_FILE
	d=$(($(ops "$a") - $(ops "$b")))
	if grep -q '^\*\*\* This is a resumed session' "$out" && grep -q "^hello from backend: GET /gr-$l HTTP/1.1" "$out" &&
		[ "$d" = 1 ] && [ "$(usage_delta "$b" "$a" p256 sign)" = 1 ] &&
		tail -c +$((off + 1)) "$DAEMON_LOG" | grep -q "listener $l: 127\.0\.0\.1:[0-9]*: .* key=none(resumed) "; then
		ok "$desc: gnutls-cli --resume resumed; one token operation for both handshakes (the full one's signature), none for the resumed"
	else
		fail "$desc: resumed=$(grep -q 'This is a resumed session' "$out" && echo yes || echo no), answered=$(grep -q 'hello from backend' "$out" && echo yes || echo no), $d token operations for the two handshakes (want 1)"
		grep -E '^\*\*\*|^- (Session ID|Resume|Disconnect)|Error' "$out" | head -n 10 | sed 's/^/#   /'
	fi
}
gnutls_resume "TLS 1.2, ticket (nocache: session_cache = 0, so only the ticket can resume)" nocache NORMAL:-VERS-ALL:+VERS-TLS1.2
gnutls_resume "TLS 1.2, session ID (notix: session_tickets = no)" notix NORMAL:-VERS-ALL:+VERS-TLS1.2
gnutls_resume "TLS 1.3, ticket (open)" open NORMAL:-VERS-ALL:+VERS-TLS1.3

# ------------------------------------------------ hsmtls-load --resume
# 20 handshakes on one thread, half of them resuming the thread's latest
# session: 10 resumed, and the token made 10 signatures (the full ones).
load_resume() { # DESC LISTENER TLS
	local b a out
	snap; b=$SNAP_FILE
	out=$(timeout 60 "$HSMTLS_LOAD" --connect "127.0.0.1:${P[$2]}" --sni www.hsmtls.test --cafile "$HSMTLS_CA" --tls "$3" \
		--threads 1 --count 20 --resume 0.5 2>&1)
	snap; a=$SNAP_FILE
	local res sig
	res=$(sed -n 's/^resumed: *\([0-9]*\) of \([0-9]*\) offered.*/\1\/\2/p' <<<"$out")
	sig=$(usage_delta "$b" "$a" p256 sign)
	if [ "$res" = 10/10 ] && [ "$sig" = 10 ] && grep -q '^handshakes: *20 ' <<<"$out" && grep -q '^errors: *0 ' <<<"$out"; then
		ok "$1: hsmtls-load --resume 0.5: 10 of 20 handshakes resumed, 10 signatures on the token"
	else
		fail "$1: hsmtls-load --resume 0.5: resumed ${res:-?} (want 10/10), $sig signatures (want 10)"
		sed 's/^/#   /' <<<"$out"
	fi
}
if [ -x "${HSMTLS_LOAD:-}" ]; then
	load_resume "TLS 1.2 (open: tickets and cache)" open 1.2
	load_resume "TLS 1.2 (notix: session ID)" notix 1.2
	load_resume "TLS 1.3 (open: tickets)" open 1.3
else
	skipped "hsmtls-load --resume" "HSMTLS_LOAD is not set"
fi

# ------------------------------------------------------ session_cache = 1
full tiny tiny-a
resume_case "session_cache = 1: the one session resumes" tiny tiny-a yes
full tiny tiny-b
resume_case "session_cache = 1: the second session resumes" tiny tiny-b yes
resume_case "session_cache = 1: the second session pushed the first out" tiny tiny-a no

# ------------------------------------------------ hsmtls_session_cache_*
# tiny so far: two session-ID resumptions (hits), one session pushed out
# and then offered (a miss); one entry of one. nocache has no cache.
metric() { # NAME LISTENER: its value in $E2E_DIR/metrics.txt
	awk -v k="$1{listener=\"$2\"}" '$1 == k {print $2}' "$E2E_DIR/metrics.txt"
}
curl -sS --max-time 30 --unix-socket "$E2E_DIR/admin.sock" -H "Authorization: Bearer $METRICS_TOKEN" \
	-o "$E2E_DIR/metrics.txt" http://hsmtlsd/metrics || fail "GET /metrics failed"
got="hits=$(metric hsmtls_session_cache_hits_total tiny) misses=$(metric hsmtls_session_cache_misses_total tiny)"
got="$got entries=$(metric hsmtls_session_cache_entries tiny) max=$(metric hsmtls_session_cache_max_entries tiny)"
check_eq "metrics: the session cache counters of tiny" "hits=2 misses=1 entries=1 max=1" "$got"
ev=$(metric hsmtls_session_cache_evictions_total tiny)
check "metrics: tiny's cache evicted at least one session (${ev:-none})" test "${ev:-0}" -ge 1
check_eq "metrics: nocache (session_cache = 0) has no session cache lines" "" "$(metric hsmtls_session_cache_entries nocache)"
if command -v promtool >/dev/null; then
	check "promtool check metrics accepts /metrics" sh -c "promtool check metrics <'$E2E_DIR/metrics.txt'"
fi

# ------------------------------------------------ session_lifetime = 3s
full short short
t0=$(date +%s)
resume_case "session_lifetime = 3s: resumes at once" short short yes
# shellcheck disable=SC2317 # called through wait_until
past() { [ "$(date +%s)" -gt "$1" ]; }
wait_until 30 past $((t0 + 5)) || bail "the clock did not move"
resume_case "session_lifetime = 3s: not after 5 s" short short no

stop_daemon 10
check_eq "hsmtlsd exits 0 on SIGTERM" 0 "$DAEMON_RC"
e2e_finish
