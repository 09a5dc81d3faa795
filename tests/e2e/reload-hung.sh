#!/usr/bin/env bash
# e2e: a reload against a token that does not answer (tests/slowtoken's
# control file). The build of a reload runs on a thread of its own, each
# step that may wait on a token with a deadline (the listener's
# handshake_timeout), while the main loop goes on (README, Reload):
#  - "hang" (no signature returns): the reload is refused at the deadline
#    of its test signature, naming the key, while the token still holds
#    the call; a reload while that call has not returned is refused at
#    once, also one that opens the token again (the key looked up anew);
#    once it returned, a reload commits again;
#  - "hang-all" (no call returns at all: the public key read that matches
#    a chain to its key hangs): while the reload is stuck the main loop
#    still serves handshakes on a listener with a file key (TLS 1.3 parks
#    on the main loop for the client's Finished) and answers SIGUSR1; the
#    reload is refused at the deadline naming the key, the token and the
#    step; a reload while that thread has not returned is refused at once;
#    once it returns (nothing of it applied), a reload commits again;
#    while that build holds the change lock, admin changes (a certificate
#    deletion, POST /v1/changes, an unbind) get 503 busy (the holder stuck half the
#    [admin] timeout) naming the build's step, GET /v1/live is answered, and
#    once the build returned a change is made;
#  - "hang-destroy": an admin key deletion stuck in C_DestroyObject holds
#    the change lock: another change gets 503 busy naming it and its token;
#  - a SIGTERM while a reload is stuck in the token ends the daemon within
#    a few seconds, exit 0, without waiting for the thread.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools openssl p11tool certtool pkcs11-tool script curl sqlite3 python3
need_slowtoken
e2e_init
# shellcheck source-path=SCRIPTDIR source=lib-admin.sh
. "$(dirname "$0")/lib-admin.sh"
admin_init
# A file key too (provision --file-keys): a listener that needs no token.
TOKEN_DIR=$E2E_DIR/token
"$SRCDIR/hsm-config/provision" "$TOKEN_DIR" --file-keys --quiet >"$E2E_DIR/provision.log" 2>&1 ||
	bail "hsm-config/provision $TOKEN_DIR --file-keys failed: $(tail -n 5 "$E2E_DIR/provision.log")"
# shellcheck disable=SC1091
. "$TOKEN_DIR/uris.env"
start_backend

now_ms() { echo $(($(date +%s%N) / 1000000)); }
CTL=$E2E_DIR/token.ctl
COUNTS=$E2E_DIR/token.counts
ctl() { # WORDS: the slow token's condition (written whole, then renamed)
	printf '%s\n' "$1" >"$CTL.new"
	mv "$CTL.new" "$CTL"
}
hung() { sed -n 's/.* hung=\([0-9]*\).*/\1/p' "$COUNTS" 2>/dev/null; }
hung_above() { [ "$(hung)" -gt "$1" ] 2>/dev/null; }
ctl present

conf=$E2E_DIR/hsmtlsd.conf
{
	printf '[global]\nlog_level = info\ndrain_timeout = 3s\nstate_dir = %s\n\n' "$STATE"
	printf '[token demo]\nuri = %s\nmodule = %s\npin_file = %s\n\n' "$HSMTLS_TOKEN_URI" "$SLOWTOKEN" "$HSMTLS_PIN_FILE"
	printf '[listener www]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\nhandshake_timeout = 4s\n\n' \
		"$BACKEND_PORT" "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
	printf '[listener files]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\nhandshake_timeout = 4s\n' \
		"$BACKEND_PORT" "$HSMTLS_FILECERT_P256" "$HSMTLS_FILEKEY_P256"
	printf '\n'
} >"$conf"
# The admin API: a change does not wait for a holder of the change lock
# stuck in one step or token call for half the [admin] timeout (3 s).
write_admin_section "$conf" "timeout = 6s"
mkdir -p "$STATE"
HSMTLS_SLOWTOKEN_MODULE="$HSMTLS_MODULE" HSMTLS_SLOWTOKEN_CONTROL_FILE="$CTL" HSMTLS_SLOWTOKEN_COUNT_FILE="$COUNTS" \
	start_daemon "$conf" || bail "daemon did not start"
PORT=$(listener_port www)
FPORT=$(listener_port files)
serves() { openssl_get "$PORT" www.hsmtls.test "$1" </dev/null 2>/dev/null | grep -q 'hello from backend'; }
# files_serves: one TLS 1.3 handshake with the file key (its server
# Finished waits on the main loop for the client's), one request.
files_serves() { openssl_get "$FPORT" www.hsmtls.test "$1" -tls1_3 </dev/null 2>/dev/null | grep -q 'hello from backend'; }
serves start && ok "start: www serves" || fail "start: www does not serve"
wait_until 10 grep -q 'admin: listening on' "$DAEMON_LOG" || bail "the admin API did not start"
# A stored certificate (the RSA file chain): deleting it takes the change lock.
RSA_FP=$(openssl x509 -in "$HSMTLS_CERT_RSA2048" -outform DER | sha256sum | cut -d' ' -f1)
code=$(api "$ADMIN_TOKEN" POST /v1/certificates "${JSON[@]}" \
	-d "$(python3 -c 'import json,sys; print(json.dumps({"pem": open(sys.argv[1]).read()}))' "$HSMTLS_CERT_RSA2048")")
check_eq "start: the RSA chain is stored (POST /v1/certificates)" 201 "$code"
# change_bg N METHOD PATH [curl args]: an admin change in the background,
# its status, time and body in $E2E_DIR/change-N.{out,body}.
change_bg() {
	local n=$1 method=$2 path=$3
	shift 3
	(
		t=$(now_ms)
		c=$(curl -sS --max-time 25 --unix-socket "$SOCK" -o "$E2E_DIR/change-$n.body" -w '%{http_code}' -X "$method" \
			-H "Authorization: Bearer $ADMIN_TOKEN" "$@" "http://hsmtlsd$path")
		echo "$c $(($(now_ms) - t))" >"$E2E_DIR/change-$n.out"
	) &
	CHANGE_PIDS+=($!)
}
files_serves start && ok "start: files serves" || fail "start: files does not serve"

HUP_WAIT=30

# ------------------------------------------------ the token's signatures hang
ctl hang
hup "a reload while the token hangs"
verdict "refused at the deadline, naming the key" \
	"refused, nothing changed.*listener www: .*the test signature with key p256 did not return within 4.0 s"
hup "a reload while that test signature has not returned"
verdict "refused at once: the earlier test signature with that key has not returned" \
	"refused, nothing changed.*the test signature of an earlier change with key p256 has not returned yet"
# The token opened again (max_sessions changed): the key is looked up anew
# (another object); the bound is still one test signature per key.
sed 's/^pin_file = .*/&\nmax_sessions = 6/' "$conf" >"$conf.new" && mv "$conf.new" "$conf"
hup "a reload that opens the token again while that test signature has not returned"
verdict "refused at once: the bound holds for the key on the token opened again" \
	"refused, nothing changed.*the test signature of an earlier change with key p256 has not returned yet"
ctl present
wait_until 30 grep -q 'key p256: the test signature that overran its deadline returned after' "$DAEMON_LOG" &&
	ok "once the token answers, the test signature's return is logged" ||
	fail "no line says the overrunning test signature returned"
hup "a reload once the token answers again"
verdict "committed once the token answers" "committed"
serves again && ok "www serves" || fail "www does not serve after the token answers again"

# ------------------------------------------------ the token answers no call at all
ctl hang-all
h0=$(hung)
off=$(stat -c %s "$DAEMON_LOG")
t0=$(now_ms)
kill -HUP "$DAEMON_PID"
wait_until 10 hung_above "$h0" && ok "hang-all: the reload's build is inside the token" ||
	fail "hang-all: the reload never reached the token (hung=$(hung))"
# The main loop is not held by it: a handshake that parks on it, SIGUSR1.
files_serves during && ok "while the reload is stuck in the token, files serves (TLS 1.3)" ||
	fail "while the reload is stuck in the token, files does not serve: the main loop is held"
uoff=$(stat -c %s "$DAEMON_LOG")
kill -USR1 "$DAEMON_PID"
wait_until 5 _log_after_has "$uoff" 'handshakes: completed=' &&
	ok "while the reload is stuck in the token, SIGUSR1 is answered" ||
	fail "while the reload is stuck in the token, SIGUSR1 gets no answer"
if wait_until 20 _log_after_has "$off" 'reload of .* \(committed\|refused\)'; then
	ms=$(($(now_ms) - t0))
	VERDICT=$(tail -c +$((off + 1)) "$DAEMON_LOG" | grep -m1 'reload of .* \(committed\|refused\)')
	note "hang-all: after $ms ms: $VERDICT"
	verdict "hang-all: refused at the deadline, naming the listener, key, token and step" \
		"refused, nothing changed.*listener www: key p256 on token demo: reading its public key did not finish within 4.0 s (the listener's handshake_timeout): the token does not answer"
	[ "$ms" -ge 3500 ] && ok "hang-all: not refused before the deadline ($ms ms)" ||
		fail "hang-all: refused after $ms ms, before the 4 s deadline"
else
	fail "hang-all: no reload verdict 20 s after SIGHUP (deadline 4 s)"
fi
hup "a reload while the stuck build has not returned"
verdict "refused at once: the earlier build has not returned" \
	"refused, nothing changed.*the build of an earlier reload, refused .* ago, has not returned (listener www: key p256 on token demo: reading its public key)"
files_serves "after the refusals" && ok "files still serves" || fail "files no longer serves"
# The stuck build keeps the change lock (by design): admin changes are
# refused (503 busy, naming the build's step) once the build has been stuck 3 s (half the [admin] timeout),
# instead of holding their admin threads (2) forever; GET /v1/live is
# answered meanwhile. (Not /v1/health: it asks the token itself, which
# answers no call here.)
CHANGE_PIDS=()
last=$(sqlite3 "$STATE/state.db" 'SELECT coalesce(max(seq), 0) FROM audit')
change_bg 1 DELETE "/v1/certificates/$RSA_FP"
change_bg 2 POST /v1/changes "${JSON[@]}" \
	-d "{\"operations\":[{\"op\":\"bind\",\"listener\":\"www\",\"certificate\":\"$RSA_FP\",\"if_match\":\"x\"}]}"
change_bg 3 DELETE "/v1/listeners/www/bindings/$RSA_FP" -H 'If-Match: "x"'
begun() { [ "$(audit_n "seq > $last AND action = 'change.begin'")" -ge "$1" ]; }
wait_until 10 begun 2 || fail "the admin changes did not begin (audit: $(audit_n "seq > $last"))"
t0=$(now_ms)
code=$(curl -sS --max-time 25 --unix-socket "$SOCK" -o /dev/null -w '%{http_code}' http://hsmtlsd/v1/live)
ms=$(($(now_ms) - t0))
[ "$code" = 200 ] && [ "$ms" -lt 15000 ] &&
	ok "while both admin threads wait for the lock, GET /v1/live answers ($ms ms)" ||
	fail "while both admin threads wait for the lock, GET /v1/live: status $code after $ms ms"
for p in "${CHANGE_PIDS[@]}"; do wait "$p"; done
CHANGE_M=(- delete post delete)
CHANGE_T=(- "/v1/certificates/{fingerprint}" /v1/changes "/v1/listeners/{listener}/bindings/{fingerprint}")
for n in 1 2 3; do
	read -r code ms <"$E2E_DIR/change-$n.out"
	if [ "$code" = 503 ] && [ "$ms" -lt 15000 ]; then
		ok "change $n while the build holds the lock: 503 after $ms ms"
		keep_response "$E2E_DIR/change-$n.body" "${CHANGE_M[$n]}" "${CHANGE_T[$n]}" 503 "change $n refused busy"
	else
		fail "change $n while the build holds the lock: status $code after $ms ms, expected 503 within the 3 s bound"
	fi
	check_grep "change $n: error busy, naming the reload's step in the token" "$E2E_DIR/change-$n.body" \
		'"code":"busy".*a reload.s build .* has been in .listener www: key p256 on token demo: reading its public key. for'
done
check_eq "the refused changes are audited: each begun and refused with 503" 3 \
	"$(audit_n "status = 503 AND detail LIKE '%busy%begun at seq%'")"
ctl present
wait_until 30 grep -q 'the build refused .* ago returned after' "$DAEMON_LOG" &&
	ok "once the token answers, the stuck build's return is logged" ||
	fail "no line says the stuck build returned"
hup "a reload once the token answers again"
verdict "committed once the token answers" "committed"
serves "after hang-all" && ok "www serves" || fail "www does not serve after hang-all"
code=$(api "$ADMIN_TOKEN" DELETE "/v1/certificates/$RSA_FP")
check_eq "once the build returned, an admin change is made (DELETE /v1/certificates/...)" 204 "$code"

# ------------------------------------------------ an admin change stuck in the token
# A key deletion whose C_DestroyObject does not return holds the change lock
# (its token calls have no deadline): another change is refused with 503
# busy once it has been in that call 3 s, naming it and the token; once the token answers,
# the deletion ends (204) and changes are made again.
code=$(api "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" -d '{"token":"demo","label":"stuck","id":"d1","type":"ecdsa","curve":"P-256"}')
check_eq "a key to delete (POST /v1/keys)" 201 "$code"
SPKI=$(jq_ 'd["spki_sha256"]')
code=$(api "$ADMIN_TOKEN" POST /v1/certificates "${JSON[@]}" \
	-d "$(python3 -c 'import json,sys; print(json.dumps({"pem": open(sys.argv[1]).read()}))' "$HSMTLS_CERT_RSA2048")")
check_eq "the RSA chain stored again" 201 "$code"
ctl hang-destroy
h0=$(hung)
CHANGE_PIDS=()
change_bg 4 DELETE "/v1/keys/demo/d1?spki_sha256=$SPKI"
wait_until 20 hung_above "$h0" && ok "the key deletion is inside the token (C_DestroyObject)" ||
	fail "the key deletion never reached C_DestroyObject (hung=$(hung))"
change_bg 5 DELETE "/v1/certificates/$RSA_FP"
wait "${CHANGE_PIDS[1]}"
read -r code ms <"$E2E_DIR/change-5.out"
if [ "$code" = 503 ] && [ "$ms" -lt 15000 ]; then
	ok "a change while an admin change is stuck in the token: 503 after $ms ms"
	keep_response "$E2E_DIR/change-5.body" delete "/v1/certificates/{fingerprint}" 503 "change 5 refused busy"
else
	fail "a change while an admin change is stuck in the token: status $code after $ms ms, expected 503 within the 3 s bound"
fi
check_grep "... busy, naming the stuck change and its token" "$E2E_DIR/change-5.body" \
	'"code":"busy".*an admin API change \(DELETE /v1/keys/demo/d1 by token:ops\) has been inside token demo for [0-9.]+ s'
ctl present
wait "${CHANGE_PIDS[0]}"
read -r code ms <"$E2E_DIR/change-4.out"
check_eq "once the token answers, the stuck key deletion ends" 204 "$code"
code=$(api "$ADMIN_TOKEN" DELETE "/v1/certificates/$RSA_FP")
check_eq "... and a change is made again" 204 "$code"

# ------------------------------------------------ SIGTERM while a reload is stuck in the token
ctl hang-all
h0=$(hung)
off=$(stat -c %s "$DAEMON_LOG")
kill -HUP "$DAEMON_PID"
wait_until 10 hung_above "$h0" || fail "the reload did not reach the token"
t0=$(now_ms)
kill -TERM "$DAEMON_PID"
# No connection is open: the drain ends at once; the token never answers.
if wait_until 20 daemon_exited; then
	ms=$(($(now_ms) - t0))
	note "SIGTERM during a reload stuck in the token: exited after $ms ms"
	[ "$ms" -lt 6000 ] && ok "SIGTERM during a reload stuck in the token: exited within 6 s ($ms ms)" ||
		fail "SIGTERM during a reload stuck in the token: exited only after $ms ms"
	check_eq "it exits 0" 0 "$(cat "$DAEMON_RC_FILE")"
	forget_pid "$DAEMON_PID"
else
	fail "SIGTERM during a reload stuck in the token: still running 20 s later"
	kill -KILL "$DAEMON_PID" 2>/dev/null
fi
tail -c +$((off + 1)) "$DAEMON_LOG" >"$E2E_DIR/term.log"
check_grep "that reload was refused by the SIGTERM" "$E2E_DIR/term.log" \
	"refused, nothing changed.*Terminated came while it was being built: draining for exit"
check_grep "the exit did not wait for the build's thread" "$E2E_DIR/term.log" \
	'the build of a reload is still inside a token call \(listener www: key p256 on token demo: reading its public key\): exiting without waiting'
ctl present
check_contract
e2e_finish
