#!/usr/bin/env bash
# e2e: usage per listener and the audit log's limits, on the real daemon.
#
# Handshakes are counted per listener, by TLS version, result and resumption
# (GET /v1/usage "listeners", /metrics hsmtls_handshakes_total), with the
# full handshakes per key, the time each key waited for a session and its
# last use; the key operations that fail, by reason (the token behind
# tests/slowtoken: held past the deadline with a queue of 1, hung, answering
# CKR_DEVICE_ERROR) in /v1/usage, /metrics and the SIGUSR1 log; the lifetime
# counts survive a SIGTERM restart (state.db). Every
# JSON response is validated against api/openapi.yaml, /metrics with
# promtool. Then the audit log: refused requests are rate-limited per client
# address (one "suppressed" record for the rest), and a change whose audit
# record cannot be written (state.db locked by another sqlite3 process, then
# a read-only database) is refused with a 5xx and changes nothing.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=lib-admin.sh
. "$(dirname "$0")/lib-admin.sh"

need_tools curl gnutls-cli openssl sqlite3 promtool python3
python3 -c 'import jsonschema, yaml' 2>/dev/null || skip "python3-jsonschema and python3-yaml are needed (hsm-config/install-deps)"
e2e_init
provision_token
start_backend

admin_init
slowtoken_control

conf=$E2E_DIR/usage.conf
printf '[global]\nlog_level = info\ndrain_timeout = 2s\nstate_dir = %s\nhandshake_threads = 8\n\n' "$STATE" >"$conf"
# One operation on the token at once, one waiting (the failures below).
write_token_section "$conf" demo "$SLOWTOKEN"
printf 'concurrency_max = 1\nqueue_limit = 1\n\n' >>"$conf"
cat >>"$conf" <<CONF
[listener a]
listen = 127.0.0.1:0
backend = 127.0.0.1:$BACKEND_PORT
cert = $HSMTLS_CERT_P256
key = $HSMTLS_KEY_P256

[listener b]
listen = 127.0.0.1:0
backend = 127.0.0.1:$BACKEND_PORT
cert = $HSMTLS_CERT_RSA2048
key = $HSMTLS_KEY_RSA2048

[listener f]
listen = 127.0.0.1:0
backend = 127.0.0.1:$BACKEND_PORT
cert = $HSMTLS_CERT_P384
key = $HSMTLS_KEY_P384
handshake_timeout = 4s

CONF
write_admin_section "$conf"
start_admin

api() { # METHOD PATH [curl args]: the status; the body in $BODY
	local method=$1 path=$2
	shift 2
	curl -sS --max-time 30 --unix-socket "$SOCK" -o "$BODY" -w '%{http_code}' -X "$method" \
		-H "Authorization: Bearer $ADMIN_TOKEN" "$@" "http://hsmtlsd$path"
}
contract() { # DESC METHOD TEMPLATE STATUS: $BODY matches the contract
	local out
	if out=$("$SRCDIR/tests/e2e/oas-check.py" "$SPEC" "$BODY" "$2" "$3" "$4" 2>&1); then
		ok "$1 matches api/openapi.yaml"
	else
		fail "$1 does not match api/openapi.yaml: $out"
	fi
}
# hs LISTENER VERSION RESULT RESUMED FIELD: one handshake counter of /v1/usage (0 when absent)
hs() {
	api GET /v1/usage >/dev/null
	jq_ "sum(c['$5'] for l in d['listeners'] if l['name'] == '$1' for c in l['handshakes'] if c['version'] == '$2' and c['result'] == '$3' and c['resumed'] == $4)"
}
lkey() { # LISTENER LABEL FIELD: full handshakes with that key on the listener
	api GET /v1/usage >/dev/null
	jq_ "sum(k['$3'] for l in d['listeners'] if l['name'] == '$1' for k in l['keys'] if k['label'] == '$2')"
}
PA=$(listener_port a)
PB=$(listener_port b)

# ------------------------------------------------------------ handshakes per listener
api GET /v1/usage >/dev/null
WAIT0=$(jq_ '[k for k in d["keys"] if k["label"] == "p256"][0]["session_wait"]["count"]')
for i in 1 2 3; do
	gnutls-cli --no-ca-verification --priority 'NORMAL:-VERS-ALL:+VERS-TLS1.3' -p "$PA" 127.0.0.1 </dev/null \
		>/dev/null 2>&1 || fail "TLS 1.3 handshake $i with listener a"
done
openssl s_client -connect "127.0.0.1:$PB" -tls1_2 -sess_out "$E2E_DIR/b.sess" </dev/null >/dev/null 2>&1 ||
	fail "TLS 1.2 handshake with listener b"
out=$(openssl s_client -connect "127.0.0.1:$PB" -tls1_2 -sess_in "$E2E_DIR/b.sess" </dev/null 2>&1)
grep -q '^Reused, ' <<<"$out" || fail "the TLS 1.2 session did not resume on listener b"
# TLS 1.1 only: a handshake that fails before any version is agreed.
check_not "a TLS 1.1 client is refused by listener b" timeout 10 gnutls-cli --no-ca-verification \
	--priority 'NORMAL:-VERS-ALL:+VERS-TLS1.1' -p "$PB" 127.0.0.1 </dev/null

code=$(api GET /v1/usage)
check_eq "GET /v1/usage: 200" 200 "$code"
contract "GET /v1/usage with listeners" get /v1/usage 200
check_eq "listener a: 3 full TLS 1.3 handshakes" 3 "$(hs a TLSv1.3 ok False since_start)"
check_eq "listener a: no TLS 1.2 handshake, no failure" "0 0" "$(hs a TLSv1.2 ok False since_start) $(jq_ '[l for l in d["listeners"] if l["name"] == "a"][0]["handshakes_failed"]')"
check_eq "listener b: 1 full TLS 1.2 handshake" 1 "$(hs b TLSv1.2 ok False since_start)"
check_eq "listener b: 1 resumed TLS 1.2 handshake" 1 "$(hs b TLSv1.2 ok True since_start)"
check_eq "listener b: the TLS 1.1 client is 1 failed handshake, version unknown" 1 "$(hs b unknown error False since_start)"
check_eq "listener b: handshakes_ok 2, handshakes_failed 1" "2 1" \
	"$(jq_ 'str([l for l in d["listeners"] if l["name"] == "b"][0]["handshakes_ok"]) + " " + str([l for l in d["listeners"] if l["name"] == "b"][0]["handshakes_failed"])')"
check_eq "key per listener: p256 made the 3 full handshakes of a" 3 "$(lkey a p256 since_start)"
check_eq "key per listener: rsa2048 made 1 full handshake on b (the resumed one used no key)" 1 "$(lkey b rsa2048 since_start)"
check_eq "key per listener: rsa2048 did nothing on a, p256 nothing on b" "0 0" "$(lkey a rsa2048 since_start) $(lkey b p256 since_start)"
check_eq "key per listener: the configured token is named" demo "$(jq_ '[k["token"] for l in d["listeners"] for k in l["keys"] if k["label"] == "p256"][0]')"
api GET /v1/usage >/dev/null
check_eq "session wait: the p256 key waited for a session 3 more times (0 < p50 <= p99)" "$((WAIT0 + 3)) True" \
	"$(jq_ 'str([k for k in d["keys"] if k["label"] == "p256"][0]["session_wait"]["count"]) + " " + str(0 < [k for k in d["keys"] if k["label"] == "p256"][0]["session_wait"]["p50_seconds"] <= [k for k in d["keys"] if k["label"] == "p256"][0]["session_wait"]["p99_seconds"])')"
now=$(date +%s)
check_eq "last use of p256: within the last 5 minutes" True \
	"$(jq_ "abs(__import__('datetime').datetime.strptime([k for k in d['keys'] if k['label'] == 'p256'][0]['last_use'], '%Y-%m-%dT%H:%M:%SZ').replace(tzinfo=__import__('datetime').timezone.utc).timestamp() - $now) < 300")"

code=$(api GET /metrics)
cp "$BODY" "$E2E_DIR/metrics.txt"
check_eq "GET /metrics: 200" 200 "$code"
check "promtool check metrics accepts /metrics" sh -c "promtool check metrics <'$E2E_DIR/metrics.txt'"
M=$(cat "$E2E_DIR/metrics.txt")
has() { if grep -Eq -- "$2" <<<"$M"; then ok "$1"; else fail "$1: no line matches $2"; fi; }
has "metrics: a's TLS 1.3 full handshakes" '^hsmtls_handshakes_total\{listener="a",version="TLSv1.3",result="ok",resumed="false"\} 3$'
has "metrics: b's resumed TLS 1.2 handshake" '^hsmtls_handshakes_total\{listener="b",version="TLSv1.2",result="ok",resumed="true"\} 1$'
has "metrics: b's failure" '^hsmtls_handshakes_total\{listener="b",version="unknown",result="error",resumed="false"\} 1$'
has "metrics: a has no failure" '^hsmtls_handshakes_total\{listener="a",version="unknown",result="error",resumed="false"\} 0$'
has "metrics: full handshakes per listener and key" '^hsmtls_listener_key_handshakes_total\{listener="a",token="demo",key="p256"\} 3$'
has "metrics: the session wait histogram of p256" "^hsmtls_key_session_wait_seconds_count\\{token=\"demo\",key=\"p256\"\\} $((WAIT0 + 3))\$"
has "metrics: ... its +Inf bucket" "^hsmtls_key_session_wait_seconds_bucket\\{token=\"demo\",key=\"p256\",le=\"\\+Inf\"\\} $((WAIT0 + 3))\$"
has "metrics: the last use of p256" '^hsmtls_key_last_use_timestamp_seconds\{token="demo",key="p256"\} [0-9.]+$'
check_eq "metrics: 10 handshake series per listener (the combinations that can happen)" 30 \
	"$(grep -c '^hsmtls_handshakes_total{' <<<"$M")"

# ------------------------------------------------------------ failures by reason
# The p384 key of listener f (handshake_timeout 4s). FIELD is since_start
# or lifetime; 0 when absent.
fails() { # REASON [FIELD]: failed signatures of p384 with that reason (/v1/usage)
	api GET /v1/usage >/dev/null
	jq_ "sum(f['${2:-since_start}'] for k in d['keys'] if k['label'] == 'p384' for f in k['failures'] if f['op'] == 'sign' and f['mechanism'] == 'CKM_ECDSA' and f['reason'] == '$1')"
}
fails_is() { [ "$(fails "$1")" = "$2" ]; }
errors() { # FIELD: the error counter of p384's signatures
	api GET /v1/usage >/dev/null
	jq_ "sum(c['$1'] for k in d['keys'] if k['label'] == 'p384' for c in k['counters'] if c['op'] == 'sign' and c['result'] == 'error')"
}
metric_fails() { # REASON: its hsmtls_key_operation_failures_total of p384 (empty when absent)
	api GET /metrics >/dev/null
	sed -n "s/^hsmtls_key_operation_failures_total{token=\"demo\",key=\"p384\",op=\"sign\",mechanism=\"CKM_ECDSA\",reason=\"$1\"} \([0-9]*\)\$/\1/p" "$BODY"
}
admission() { # FIELD: FIELD= of a fresh "token demo: concurrency" line (SIGUSR1)
	local off
	off=$(stat -c %s "$DAEMON_LOG")
	kill -USR1 "$DAEMON_PID" || return 1
	wait_until 10 _log_after_has "$off" 'handshakes: shed=' || return 1
	tail -c +$((off + 1)) "$DAEMON_LOG" | grep -E "token demo: concurrency " | tr ' ' '\n' |
		awk -F= -v f="$1" '$1 == f { print $2 }' | tail -n 1
}
admission_is() { [ "$(admission "$1")" = "$2" ]; }
fclient() { # NAME: a TLS 1.3 handshake with listener f in the background; NAME.rc gets its exit status
	(
		timeout 30 gnutls-cli --no-ca-verification --priority 'NORMAL:-VERS-ALL:+VERS-TLS1.3' -p "$PF" 127.0.0.1 \
			</dev/null >"$E2E_DIR/$1.out" 2>&1
		echo $? >"$E2E_DIR/$1.rc"
	) &
	E2E_PIDS+=("$!")
}
fclient_failed() { [ -s "$E2E_DIR/$1.rc" ] && [ "$(cat "$E2E_DIR/$1.rc")" != 0 ]; }
PF=$(listener_port f)
fclient warm
wait_until 30 test -s "$E2E_DIR/warm.rc"
check_eq "listener f: a first handshake with p384 is served" 0 "$(cat "$E2E_DIR/warm.rc")"

# queue and deadline: one signature held in the token (hold) past its
# deadline, one waiting for its turn until its deadline, two shed because
# the queue (queue_limit = 1) is full.
control hold
fclient held
wait_until 15 admission_is in_flight 1 || fail "the first handshake did not reach the token"
fclient queued
wait_until 15 admission_is queued 1 || fail "the second handshake is not waiting for its turn"
fclient shed1
fclient shed2
check "the two handshakes past the full queue fail" wait_until 15 sh -c "[ -s '$E2E_DIR/shed1.rc' ] && [ -s '$E2E_DIR/shed2.rc' ] && [ \$(cat '$E2E_DIR/shed1.rc') != 0 ] && [ \$(cat '$E2E_DIR/shed2.rc') != 0 ]"
check "reason queue: 2 in /v1/usage" wait_until 10 fails_is queue 2
check "the waiting handshake fails at its deadline (4 s)" wait_until 15 fclient_failed queued
check "the held handshake fails at its deadline" wait_until 15 fclient_failed held
check_eq "reason deadline: 1 (the one that waited its turn)" 1 "$(fails deadline)"
check_eq "reason late: 0 while the held signature has not returned" 0 "$(fails late)"
control present
check "reason late: 1 once the held signature returns, past its deadline" wait_until 15 fails_is late 1

# late: a token that does not answer (hang) past handshake_timeout.
control hang
fclient hung
check "a handshake with the hung token fails at its deadline" wait_until 15 fclient_failed hung
check_eq "reason late: still 1 while the token hangs" 1 "$(fails late)"
control present
check "reason late: 2 once the hung token answers" wait_until 15 fails_is late 2

# token_error: every C_Sign answers CKR_DEVICE_ERROR.
control device-error
for i in 1 2 3; do
	check_not "device-error: handshake $i with listener f fails" timeout 30 gnutls-cli --no-ca-verification \
		--priority 'NORMAL:-VERS-ALL:+VERS-TLS1.3' -p "$PF" 127.0.0.1 </dev/null
done
control present
check_eq "reason token_error: 3 (CKR_DEVICE_ERROR)" 3 "$(fails token_error)"
check_eq "the reasons add up to the error counter: 2 queue + 1 deadline + 2 late + 3 token_error" 8 "$(errors since_start)"
for r in rate absent failed login session key mechanism; do
	[ "$(fails "$r")" = 0 ] || fail "reason $r: $(fails "$r") failures counted, none caused"
done
ok "no failure counted under the reasons not caused"
code=$(api GET /v1/usage)
contract "GET /v1/usage with failures" get /v1/usage 200
code=$(api GET /metrics)
cp "$BODY" "$E2E_DIR/metrics-failures.txt"
check "promtool check metrics accepts /metrics with failures" sh -c "promtool check metrics <'$E2E_DIR/metrics-failures.txt'"
check_eq "metrics: failures of p384 by reason (queue deadline late token_error rate)" "2 1 2 3 0" \
	"$(metric_fails queue) $(metric_fails deadline) $(metric_fails late) $(metric_fails token_error) $(metric_fails rate)"
check_eq "metrics: every reason listed for p384's signatures (11 series)" 11 \
	"$(grep -c '^hsmtls_key_operation_failures_total{token="demo",key="p384",op="sign",mechanism="CKM_ECDSA",' "$E2E_DIR/metrics-failures.txt")"
check_eq "metrics: none for the unused p384 decryption" 0 \
	"$(grep -c '^hsmtls_key_operation_failures_total{token="demo",key="p384",op="decrypt",' "$E2E_DIR/metrics-failures.txt")"
usage_snapshot "$E2E_DIR/usr1.txt" || fail "no usage lines after SIGUSR1"
check_eq "SIGUSR1: the failures of p384 by reason" "queue=2 deadline=1 token_error=3 late=2" \
	"$(for r in queue deadline token_error late; do printf '%s=%s ' "$r" "$(sed -n "s/.* usage: token=demo key=p384 op=sign mech=CKM_ECDSA failed=$r count=\([0-9]*\)\$/\1/p" "$E2E_DIR/usr1.txt")"; done | sed 's/ $//')"

# ------------------------------------------------------------ lifetime
stop_daemon 10
check_eq "SIGTERM: the daemon exits 0" 0 "$DAEMON_RC"
check_eq "state.db keeps a's TLS 1.3 handshakes" 3 \
	"$(sqlite3 "$STATE/state.db" "SELECT count FROM handshakes WHERE listener = 'a' AND version = 'TLSv1.3' AND result = 'ok' AND resumed = 0")"
start_admin
PA=$(listener_port a)
check_eq "after a restart: a's TLS 1.3 lifetime 3, since start 0" "3 0" \
	"$(hs a TLSv1.3 ok False lifetime) $(hs a TLSv1.3 ok False since_start)"
check_eq "after a restart: b's failure lifetime 1" 1 "$(hs b unknown error False lifetime)"
check_eq "after a restart: p256 on a, lifetime 3" 3 "$(lkey a p256 lifetime)"
check_eq "after a restart: p384's failures by reason, lifetime (queue deadline late token_error)" "2 1 2 3" \
	"$(fails queue lifetime) $(fails deadline lifetime) $(fails late lifetime) $(fails token_error lifetime)"
check_eq "... since start: none" "0 0 0 0" "$(fails queue) $(fails deadline) $(fails late) $(fails token_error)"
check_eq "... the error counter's lifetime 8" 8 "$(errors lifetime)"
check_eq "state.db: the usage_failures rows of p384" "deadline=1 late=2 queue=2 token_error=3" \
	"$(sqlite3 "$STATE/state.db" "SELECT group_concat(reason || '=' || count, ' ') FROM (SELECT reason, count FROM usage_failures WHERE token = 'demo' AND op = 'sign' AND mech = 'CKM_ECDSA' AND key LIKE '%object=p384%' ORDER BY reason)")"
gnutls-cli --no-ca-verification --priority 'NORMAL:-VERS-ALL:+VERS-TLS1.3' -p "$PA" 127.0.0.1 </dev/null \
	>/dev/null 2>&1 || fail "TLS 1.3 handshake with listener a after the restart"
check_eq "one more: lifetime 4, since start 1" "4 1" "$(hs a TLSv1.3 ok False lifetime) $(hs a TLSv1.3 ok False since_start)"
check_eq "one more: p256 on a, lifetime 4" 4 "$(lkey a p256 lifetime)"
contract "GET /v1/usage after a restart" get /v1/usage 200
db_hs() { [ "$(sqlite3 "$STATE/state.db" "SELECT count FROM handshakes WHERE listener = 'a' AND version = 'TLSv1.3' AND result = 'ok' AND resumed = 0")" = 4 ]; }
check "the writer thread puts a's new total (4) in state.db within 10 s, without a shutdown" wait_until 10 db_hs

# ------------------------------------------------------------ audit: rate limit of refused requests
before=$(audit_n "action = 'auth.refused'")
urls=()
for i in $(seq 60); do urls+=("http://hsmtlsd/v1/keys?n=$i"); done
t0=$(date +%s%N)
curl -sS --max-time 60 --unix-socket "$SOCK" "${urls[@]}" >/dev/null || fail "60 requests without a credential"
t1=$(date +%s%N)
written=$(($(audit_n "action = 'auth.refused'") - before))
secs=$(((t1 - t0 + 999999999) / 1000000000))
bound=$((10 + (secs + 1) / 2 + 1))
if [ "$written" -ge 1 ] && [ "$written" -le "$bound" ]; then
	ok "audit rate limit: 60 refused requests in ${secs} s wrote $written records (burst 10, then 1 every 2 s: at most $bound)"
else
	fail "audit rate limit: 60 refused requests in ${secs} s wrote $written records (expected 1..$bound)"
fi
# A refused request of an identity is written all the same (it is accountable).
code=$(api POST /v1/keys -H 'Content-Type: application/json' -d '{"token":"demo","type":"ecdsa"}')
check_eq "after the flood: a bad body from token:ops gets 400" 400 "$code"
check_eq "... and is written to the audit log (identities are not rate-limited)" 1 \
	"$(audit_n "who = 'token:ops' AND status = 400 AND action = 'key.generate'")"
summary() {
	curl -sS --max-time 10 --unix-socket "$SOCK" -o /dev/null http://hsmtlsd/v1/live # any request writes the summaries due
	[ "$(audit_n "action = 'audit.suppressed'")" -ge 1 ]
}
check "audit rate limit: a summary record follows once the address has a token again" wait_until 15 summary
detail=$(sqlite3 "$STATE/state.db" "SELECT detail FROM audit WHERE action = 'audit.suppressed' ORDER BY seq DESC LIMIT 1")
n_supp=$(sed -n 's/^\([0-9][0-9]*\) refused requests from unix suppressed since .*/\1/p' <<<"$detail")
check_eq "audit rate limit: the summary says from where ($detail)" 1 "$([ -n "$n_supp" ] && echo 1)"
check_eq "audit rate limit: written + suppressed = the 60 refused requests" 60 "$((written + ${n_supp:-0}))"
code=$(api GET /v1/audit/verify)
check_eq "audit verify after the summary: ok" "200 True" "$code $(jq_ 'd["ok"]')"
check_eq "hsmtlsd --check-audit after the summary: intact" 0 "$("$HSMTLSD" --check-audit "$STATE" >/dev/null 2>&1; echo $?)"

# ------------------------------------------------------------ audit: no change without its record
# Another process holds state.db's write lock (sqlite3, BEGIN EXCLUSIVE).
db_lock
audit_before=$(audit_n)
code=$(api POST /v1/keys -H 'Content-Type: application/json' -d '{"token":"demo","label":"locked-out","type":"ecdsa","curve":"P-256"}')
check_eq "state.db locked by another process: POST /v1/keys is refused with 503" 503 "$code"
check_eq "... error audit_unavailable" audit_unavailable "$(jq_ 'd["error"]["code"]')"
contract "the 503 audit_unavailable answer" post /v1/keys 503
code=$(api GET /v1/keys)
check_eq "... and no key was made (GET /v1/keys)" "200 False" "$code $(jq_ 'any(k["label"] == "locked-out" for k in d["keys"])')"
check_not "... nor on the token (check-token)" grep -q '^locked-out ' <<<"$("$SRCDIR/hsm-config/check-token" "$TOKEN_DIR" 2>&1)"
code=$(api DELETE "/v1/certificates/$(printf '0%.0s' $(seq 64))")
check_eq "state.db locked: DELETE /v1/certificates is refused with 503 too" 503 "$code"
check "the daemon logged why" grep -q 'the audit log cannot be written' "$DAEMON_LOG"
db_unlock
check_eq "the lock held: the audit table did not change" "$audit_before" "$(audit_n)"
code=$(api POST /v1/keys -H 'Content-Type: application/json' -d '{"token":"demo","label":"locked-out","type":"ecdsa","curve":"P-256"}')
check_eq "the lock gone: the same POST /v1/keys makes the key (201)" 201 "$code"
check_eq "... and its audit record is written" 1 "$(audit_n "action = 'key.generate' AND status = 201 AND detail LIKE '%label=locked-out%'")"
code=$(api GET /v1/audit/verify)
check_eq "audit verify at the end: ok" "200 True" "$code $(jq_ 'd["ok"]')"

# ------------------------------------------------------------ audit: per address, not per connection (TCP)
stop_daemon 10
sed -i "s|^listen = unix:$SOCK|listen = 127.0.0.1:0|" "$conf"
start_admin
AP=$(sed -n 's/.*admin: listening on 127.0.0.1:\([0-9]*\) (HTTP).*/\1/p' "$DAEMON_LOG" | tail -1)
[ -n "$AP" ] || bail "no TCP admin port in the log"
before=$(audit_n "action = 'auth.refused' AND peer LIKE '127.0.0.1:%'")
t0=$(date +%s%N)
for i in $(seq 30); do # each its own connection, from its own port
	curl -sS --max-time 10 -o /dev/null "http://127.0.0.1:$AP/v1/keys?c=$i" || fail "refused request $i over TCP"
done
t1=$(date +%s%N)
written=$(($(audit_n "action = 'auth.refused' AND peer LIKE '127.0.0.1:%'") - before))
secs=$(((t1 - t0 + 999999999) / 1000000000))
bound=$((10 + (secs + 1) / 2 + 1))
if [ "$written" -ge 1 ] && [ "$written" -le "$bound" ]; then
	ok "TCP: 30 refused requests on 30 connections in ${secs} s wrote $written records (one bucket for 127.0.0.1: at most $bound)"
else
	fail "TCP: 30 refused requests on 30 connections in ${secs} s wrote $written records (expected 1..$bound: the limit is per address, not per port)"
fi
tcp_summary() {
	curl -sS --max-time 10 -o /dev/null "http://127.0.0.1:$AP/v1/live"
	[ "$(audit_n "action = 'audit.suppressed' AND peer = '127.0.0.1'")" -ge 1 ]
}
check "TCP: the summary record names the address 127.0.0.1" wait_until 15 tcp_summary
n_supp=$(sqlite3 "$STATE/state.db" "SELECT detail FROM audit WHERE action = 'audit.suppressed' AND peer = '127.0.0.1' ORDER BY seq DESC LIMIT 1" |
	sed -n 's/^\([0-9][0-9]*\) refused requests from 127.0.0.1 suppressed since .*/\1/p')
check_eq "TCP: written + suppressed = the 30 refused requests" 30 "$((written + ${n_supp:-0}))"

# ------------------------------------------------------------ audit: the limits are settings; a flood that goes on
# Per address: 3 at once, then 60 a minute; a summary every 2 s while the
# refusals go on. A client refused without a pause for 8 s gets its 3
# records and then summaries only (not one record a second).
stop_daemon 10
printf 'audit_refusals_burst_per_address = 3\naudit_refusals_per_minute_per_address = 60\naudit_refusals_summary_interval = 2s\n' >>"$conf"
start_admin
AP=$(sed -n 's/.*admin: listening on 127.0.0.1:\([0-9]*\) (HTTP).*/\1/p' "$DAEMON_LOG" | tail -1)
[ -n "$AP" ] || bail "no TCP admin port in the log"
last=$(sqlite3 "$STATE/state.db" "SELECT max(seq) FROM audit")
sent=0
end=$(($(date +%s) + 8))
while [ "$(date +%s)" -lt "$end" ]; do
	urls=()
	for i in $(seq 10); do urls+=("http://127.0.0.1:$AP/v1/keys?flood=$sent-$i"); done
	curl -sS --max-time 10 -o /dev/null "${urls[@]}" || fail "refused requests over TCP"
	sent=$((sent + 10))
done
flood_end=$(sqlite3 "$STATE/state.db" "SELECT max(seq) FROM audit")
suppressed_sum() {
	sqlite3 "$STATE/state.db" "SELECT detail FROM audit WHERE seq > $last AND action = 'audit.suppressed' AND peer = '127.0.0.1'" |
		sed -n 's/^\([0-9][0-9]*\) refused requests from 127.0.0.1 suppressed since .*/\1/p' | awk '{s += $1} END {print s + 0}'
}
counted() {
	curl -sS --max-time 10 -o /dev/null "http://127.0.0.1:$AP/v1/live" # any request writes the summaries due
	[ $(($(audit_n "seq > $last AND action = 'auth.refused'") + $(suppressed_sum))) -eq "$sent" ]
}
check "a flood of $sent refused requests for 8 s: each one written or counted in a summary" wait_until 20 counted
written=$(audit_n "seq > $last AND action = 'auth.refused'")
if [ "$written" -ge 3 ] && [ "$written" -le 5 ]; then
	ok "... $written of them written one by one: the burst of 3 (audit_refusals_burst_per_address), no more while refused"
else
	fail "... $written of them written one by one (expected 3, at most 5: the bucket must not refill while refused)"
fi
during=$(audit_n "seq > $last AND seq <= $flood_end AND action = 'audit.suppressed' AND peer = '127.0.0.1'")
if [ "$during" -ge 2 ] && [ "$during" -le 6 ]; then
	ok "... while it went on, $during summary records (audit_refusals_summary_interval = 2s)"
else
	fail "... while it went on, $during summary records (expected 2 to 6: one every 2 s)"
fi
code=$(curl -sS --max-time 30 -o "$BODY" -w '%{http_code}' -H "Authorization: Bearer $ADMIN_TOKEN" "http://127.0.0.1:$AP/v1/audit/verify")
check_eq "audit verify after the flood: ok" "200 True" "$code $(jq_ 'd["ok"]')"
contract "GET /v1/audit/verify after the flood" get /v1/audit/verify 200

stop_daemon 10
e2e_finish
