#!/usr/bin/env bash
# e2e: what the daemon believes of a token that comes back, and of a token's
# answers. One SoftHSM token (label hsmtls) through tests/slowtoken; the test
# fails the module (control file), swaps SoftHSM's token folder while the
# module is down, and lets the recovery C_Initialize it again:
#  1. another token with the same label (its own serial number, PIN and
#     keys): the daemon never gives it the PIN (no C_Login reaches the real
#     module), logs once what differed, keeps refusing handshakes; the
#     original token back: served again, same process;
#  2. a copy of the token (same serial number and PIN) whose p384 key was
#     replaced by another one (the key that gets no test signature): logged
#     in, but refused for that key's public key; the original back: served;
#  1b. with that other token in place, a reload that opens the [token]
#     again (max_sessions changed; same URI and module): refused, with
#     the file, line and reason; no C_Login reaches the other token;
#  2b. a copy whose p256 private key was replaced, its public key object
#     kept: the recovery's test signature does not verify: refused;
#  2c. the same for the p384 key (not the first key: every key that can
#     sign makes a test signature);
#  4. another serial number in the slot between two handshakes
#     (slowtoken's swapped=): the failure is counted under reason absent;
#     again: POST /v1/keys is refused (502) and no C_GenerateKeyPair
#     reaches the other token;
#  5. a one-off failure reading a key's point when it is found: a later
#     recovery still accepts the key (its value from the next read);
#  3. a token that claims a longer signature than it wrote
#     (HSMTLS_SLOWTOKEN_SIGN_LEN_ADD): every handshake fails cleanly with an
#     alert, the length is logged, the daemon survives (under ASan too: no
#     read past the signature buffers).
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=lib-admin.sh
. "$(dirname "$0")/lib-admin.sh"

need_tools gnutls-cli p11tool curl
need_slowtoken
e2e_init
admin_init
provision_token "$E2E_DIR/one"
ORIG=$(basename "$(ls -d "$E2E_DIR"/one/tokens/*/)")
PIN=$(cat "$HSMTLS_PIN_FILE")
# The other token: same label, its own serial number, PIN and keys.
out=$("$SRCDIR/hsm-config/provision" "$E2E_DIR/rogue" --label "$HSMTLS_TOKEN_LABEL" --quiet 2>&1) || {
	printf '%s\n' "$out" | sed 's/^/#   /'
	bail "provision of the other token failed"
}
ROGUE=$(basename "$(ls -d "$E2E_DIR"/rogue/tokens/*/)")
# The twin: a copy of the token (same serial number, same PIN) with a new
# p384 key pair under the old label and id.
mkdir -p "$E2E_DIR/twin/tokens" && cp -a "$E2E_DIR/one/tokens/$ORIG" "$E2E_DIR/twin/tokens/" ||
	bail "cannot copy the token"
sed "s|$E2E_DIR/one/tokens|$E2E_DIR/twin/tokens|" "$E2E_DIR/one/softhsm2.conf" >"$E2E_DIR/twin/softhsm2.conf"
twin_p11() { SOFTHSM2_CONF=$E2E_DIR/twin/softhsm2.conf GNUTLS_PIN=$PIN p11tool --provider "$HSMTLS_MODULE" --batch --login "$@"; }
twin_p11 --delete "pkcs11:token=$HSMTLS_TOKEN_LABEL;id=%03" >/dev/null 2>&1 || bail "cannot delete the twin's p384 key"
twin_p11 --generate-privkey=ecdsa --curve=secp384r1 --label=p384 --id=03 --mark-private --mark-sign \
	--outfile="$E2E_DIR/twin/p384.pub" "pkcs11:token=$HSMTLS_TOKEN_LABEL" >/dev/null 2>&1 ||
	bail "cannot make the twin's new p384 key"
# The second twin: the p256 private key replaced by another one, its public
# key object kept (the point the recovery compares is the original one).
mkdir -p "$E2E_DIR/twin2/tokens" && cp -a "$E2E_DIR/one/tokens/$ORIG" "$E2E_DIR/twin2/tokens/" ||
	bail "cannot copy the token"
sed "s|$E2E_DIR/one/tokens|$E2E_DIR/twin2/tokens|" "$E2E_DIR/one/softhsm2.conf" >"$E2E_DIR/twin2/softhsm2.conf"
twin2_p11() { SOFTHSM2_CONF=$E2E_DIR/twin2/softhsm2.conf GNUTLS_PIN=$PIN p11tool --provider "$HSMTLS_MODULE" --batch --login "$@"; }
certtool --generate-privkey --ecc --curve secp256r1 --outfile "$E2E_DIR/twin2/p256.key" >/dev/null 2>&1 ||
	bail "cannot make a P-256 key"
twin2_p11 --delete "pkcs11:token=$HSMTLS_TOKEN_LABEL;id=%02;type=private" >/dev/null 2>&1 ||
	bail "cannot delete the second twin's p256 private key"
twin2_p11 --write --load-privkey "$E2E_DIR/twin2/p256.key" --label=p256 --id=02 --mark-private --mark-sign \
	"pkcs11:token=$HSMTLS_TOKEN_LABEL" >/dev/null 2>&1 || bail "cannot write the second twin's p256 key"
# The third twin: the p384 private key replaced, its public key object kept.
mkdir -p "$E2E_DIR/twin3/tokens" && cp -a "$E2E_DIR/one/tokens/$ORIG" "$E2E_DIR/twin3/tokens/" ||
	bail "cannot copy the token"
sed "s|$E2E_DIR/one/tokens|$E2E_DIR/twin3/tokens|" "$E2E_DIR/one/softhsm2.conf" >"$E2E_DIR/twin3/softhsm2.conf"
twin3_p11() { SOFTHSM2_CONF=$E2E_DIR/twin3/softhsm2.conf GNUTLS_PIN=$PIN p11tool --provider "$HSMTLS_MODULE" --batch --login "$@"; }
certtool --generate-privkey --ecc --curve secp384r1 --outfile "$E2E_DIR/twin3/p384.key" >/dev/null 2>&1 ||
	bail "cannot make a P-384 key"
twin3_p11 --delete "pkcs11:token=$HSMTLS_TOKEN_LABEL;id=%03;type=private" >/dev/null 2>&1 ||
	bail "cannot delete the third twin's p384 private key"
twin3_p11 --write --load-privkey "$E2E_DIR/twin3/p384.key" --label=p384 --id=03 --mark-private --mark-sign \
	"pkcs11:token=$HSMTLS_TOKEN_LABEL" >/dev/null 2>&1 || bail "cannot write the third twin's p384 key"
mkdir -p "$E2E_DIR/stash"
start_backend

CONTROL=$E2E_DIR/control
COUNTS=$E2E_DIR/counts
control() { printf '%s\n' "$1" >"$CONTROL.tmp" && mv "$CONTROL.tmp" "$CONTROL"; }
counts() { tr ' ' '\n' <"$COUNTS" | awk -F= -v f="$1" '$1 == f { print $2 }'; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }
control present

conf=$E2E_DIR/trust.conf
cat >"$conf" <<EOF
[global]
log_level = info
drain_timeout = 2s
state_dir = $STATE

[token demo]
uri = $HSMTLS_TOKEN_URI
module = $SLOWTOKEN
pin_file = $HSMTLS_PIN_FILE

[listener p256]
listen = 127.0.0.1:0
backend = 127.0.0.1:$BACKEND_PORT
cert = $HSMTLS_CERT_P256
key = $HSMTLS_KEY_P256

[listener p384]
listen = 127.0.0.1:0
backend = 127.0.0.1:$BACKEND_PORT
cert = $HSMTLS_CERT_P384
key = $HSMTLS_KEY_P384

[listener rsa]
listen = 127.0.0.1:0
backend = 127.0.0.1:$BACKEND_PORT
cert = $HSMTLS_CERT_RSA2048
key = $HSMTLS_KEY_RSA2048

EOF
write_admin_section "$conf"

export HSMTLS_SLOWTOKEN_MODULE=$HSMTLS_MODULE HSMTLS_SLOWTOKEN_CONTROL_FILE=$CONTROL HSMTLS_SLOWTOKEN_COUNT_FILE=$COUNTS
start_daemon "$conf" || bail "the daemon did not start"
PID0=$DAEMON_PID
P256=$(listener_port p256)
P384=$(listener_port p384)
PRSA=$(listener_port rsa)

# get PORT NAME: one handshake and request; prints its output; 0 if served.
# (the p384 certificate is for api.hsmtls.test, the others for www.)
get() {
	local out sni=www.hsmtls.test
	[ "$1" = "$P384" ] && sni=api.hsmtls.test
	out=$(gnutls_get "$1" "$sni" NORMAL "$2" 2>&1)
	printf '%s\n' "$out"
	printf '%s\n' "$out" | grep -q 'hello from backend'
}
served() { get "$1" "$2" >/dev/null; }

# refused PORT NAME: the handshake fails, with an alert, and fast.
refused() {
	local t0 t1 out rc
	t0=$(now_ms)
	out=$(get "$1" "refused-$2")
	rc=$?
	t1=$(now_ms)
	check_eq "$2: the handshake fails" "$rc" 1
	if printf '%s\n' "$out" | grep -q 'Received alert'; then
		ok "$2: with an alert ($(printf '%s\n' "$out" | grep -m1 -o 'Received alert.*'))"
	else
		fail "$2: no alert received: $(printf '%s\n' "$out" | tail -n 3 | tr '\n' ' ')"
	fi
	check "$2: and fast ($((t1 - t0)) ms)" test $((t1 - t0)) -lt 5000
}

# wait_served PORT NAME LIMIT: polls until a request on PORT succeeds.
wait_served() {
	local t0 i=0 ms=-1
	t0=$(now_ms)
	while [ $(($(now_ms) - t0)) -lt $(($3 * 1000)) ]; do
		i=$((i + 1))
		if served "$1" "$2-$i"; then
			ms=$(($(now_ms) - t0))
			break
		fi
		sleep 0.1
	done
	check "$2: served again without a restart (after $ms ms)" test "$ms" -ge 0
}

# take_down GEN: the module fails (generation GEN) with the token removed;
# a handshake makes the daemon see it; the recovery then initializes the
# module again and again, finding no token, until the test says present.
failed_lines() { [ "$(grep -c 'token demo: .* -> failed' "$DAEMON_LOG")" -ge "$1" ]; }
take_down() {
	control "removed fail=$1"
	get "$P256" "down-$1" >/dev/null
	wait_until 20 failed_lines "$1" || bail "the token did not go to failed"
	local n
	n=$(counts initializations)
	wait_until 20 sh -c "[ \"\$(tr ' ' '\n' <'$COUNTS' | awk -F= '\$1 == \"initializations\" { print \$2 }')\" -gt $n ]" ||
		bail "the recovery did not initialize the module again"
}
# swap OUT IN TO: SoftHSM's token folder OUT goes to the stash, IN
# (a path) takes its place as TO.
swap() {
	mv "$E2E_DIR/one/tokens/$1" "$E2E_DIR/stash/$1.$(date +%s%N)" && mv "$2" "$E2E_DIR/one/tokens/$3" ||
		bail "cannot swap the token folder"
}

for p in "$P256" "$P384" "$PRSA"; do check "served at start (port $p)" served "$p" start; done
logins0=$(counts user_logins)
check_eq "one login at start" 1 "$logins0"

# 1. Another token with the same label.
take_down 1
cp -a "$E2E_DIR/one/tokens/$ORIG" "$E2E_DIR/stash/$ORIG" || bail "cannot keep the token"
swap "$ORIG" "$E2E_DIR/rogue/tokens/$ROGUE" "$ROGUE"
control present
wait_until 20 grep -q 'token demo: still failed, refused: a different token' "$DAEMON_LOG"
check_grep "other token: refused, and the log says what differed" "$DAEMON_LOG" \
	"token demo: still failed, refused: a different token has the label 'hsmtls': serial number '[^']*', not '[^']*' as when it was opened; no login to it"
refused "$P256" other-token
refused "$PRSA" other-token-rsa
# Twice the recovery's longest backoff: it probes the other token again.
inits=$(counts initializations)
wait_until 10 sh -c "[ \"\$(tr ' ' '\n' <'$COUNTS' | awk -F= '\$1 == \"initializations\" { print \$2 }')\" -ge $((inits + 2)) ]"
check "other token: probed again ($(counts initializations) initializations, $inits before)" \
	test "$(counts initializations)" -ge $((inits + 2))
check_eq "other token: the PIN never reached it (no C_Login)" "$logins0" "$(counts user_logins)"
check_not "other token: no login was tried (no C_Login answer logged)" grep -q 'C_Login answered' "$DAEMON_LOG"
check_not "other token: the token is not locked" grep -q -- '-> locked' "$DAEMON_LOG"
check_eq "other token: the refusal is logged once, not per probe" 1 "$(grep -c 'refused: a different token' "$DAEMON_LOG")"
check_not "the PIN is never logged" grep -qF -- "$PIN" "$DAEMON_LOG"
# 1b. A reload that opens the token again finds the other token.
logins1=$(counts user_logins)
cp "$conf" "$conf.orig" && sed -i '/^pin_file = /a max_sessions = 3' "$conf" || bail "cannot edit the configuration"
hup "reload, the other token in place"
verdict "reload: refused" "reload of .* refused"
verdict "reload: file, line and reason" \
	"$conf:[0-9]*: \[token demo\]: a different token has the label 'hsmtls': serial number '[^']*', not '[^']*' as when it was opened; no login to it"
check_eq "reload: the PIN never reached the other token (no C_Login)" "$logins1" "$(counts user_logins)"
cp "$conf.orig" "$conf" || bail "cannot restore the configuration"
# The original back.
swap "$ROGUE" "$E2E_DIR/stash/$ORIG" "$ORIG"
wait_served "$P256" back 20
check "back: p384 served" served "$P384" back
check "back: rsa served" served "$PRSA" back
check_grep "back: logged: same token, keys checked, test signature verified" "$DAEMON_LOG" \
	"token demo: failed -> ready: found again .*logged in, 3 keys looked up, test signatures made and verified with keys 'p256', 'p384', 'rsa2048'; serial number and public keys as when opened"
check_eq "back: one more login, on the original" $((logins0 + 1)) "$(counts user_logins)"

# 2. The twin: same serial number and PIN, another p384 key.
take_down 2
cp -a "$E2E_DIR/one/tokens/$ORIG" "$E2E_DIR/stash/$ORIG" || bail "cannot keep the token"
swap "$ORIG" "$E2E_DIR/twin/tokens/$ORIG" "$ORIG"
ready0=$(grep -c 'token demo: .* -> ready' "$DAEMON_LOG")
control present
wait_until 20 grep -q 'token demo: still failed, refused: key ' "$DAEMON_LOG"
check_grep "twin: refused for the p384 key's public key" "$DAEMON_LOG" \
	"token demo: still failed, refused: key $HSMTLS_KEY_P384 on the token with label 'hsmtls' is another key: its public key is not the one it had"
refused "$P384" twin-p384
refused "$P256" twin-p256
check_eq "twin: not ready meanwhile" "$ready0" "$(grep -c 'token demo: .* -> ready' "$DAEMON_LOG")"
swap "$ORIG" "$E2E_DIR/stash/$ORIG" "$ORIG"
wait_served "$P384" twin-back 20
check "twin-back: p256 served" served "$P256" twin-back

# 2b. The second twin: same serial number, PIN and public keys, but the
# p256 private key is another one: the test signature does not verify.
take_down 3
cp -a "$E2E_DIR/one/tokens/$ORIG" "$E2E_DIR/stash/$ORIG" || bail "cannot keep the token"
swap "$ORIG" "$E2E_DIR/twin2/tokens/$ORIG" "$ORIG"
ready0=$(grep -c 'token demo: .* -> ready' "$DAEMON_LOG")
control present
wait_until 20 grep -q 'token demo: still failed, refused: the test signature' "$DAEMON_LOG"
check_grep "twin2: refused: the test signature does not verify" "$DAEMON_LOG" \
	"token demo: still failed, refused: the test signature with key $HSMTLS_KEY_P256 does not verify with its public key"
refused "$P256" twin2-p256
check_eq "twin2: not ready meanwhile" "$ready0" "$(grep -c 'token demo: .* -> ready' "$DAEMON_LOG")"
swap "$ORIG" "$E2E_DIR/stash/$ORIG" "$ORIG"
wait_served "$P256" twin2-back 20

# 2c. The third twin: the p384 private key is another one (its public key
# object kept): its own test signature does not verify.
take_down 4
cp -a "$E2E_DIR/one/tokens/$ORIG" "$E2E_DIR/stash/$ORIG" || bail "cannot keep the token"
swap "$ORIG" "$E2E_DIR/twin3/tokens/$ORIG" "$ORIG"
ready0=$(grep -c 'token demo: .* -> ready' "$DAEMON_LOG")
control present
wait_until 20 grep -q "token demo: still failed, refused: the test signature with key $HSMTLS_KEY_P384" "$DAEMON_LOG"
check_grep "twin3: refused: the p384 test signature does not verify" "$DAEMON_LOG" \
	"token demo: still failed, refused: the test signature with key $HSMTLS_KEY_P384 does not verify with its public key"
refused "$P384" twin3-p384
check_eq "twin3: not ready meanwhile" "$ready0" "$(grep -c 'token demo: .* -> ready' "$DAEMON_LOG")"
swap "$ORIG" "$E2E_DIR/stash/$ORIG" "$ORIG"
wait_served "$P384" twin3-back 20

# 4. Another token in the slot between two handshakes (slowtoken's
# swapped=: every session and the login gone, another serial number): the
# new session's login is refused to it, and the handshake's failure is
# counted under reason absent (the token is), not session or login.
fails() { sed -n "s/.* key=p256 op=sign .* failed=$2 count=\([0-9]*\)\$/\1/p" "$1" | awk '{ s += $1 } END { print s + 0 }'; }
usage_snapshot "$E2E_DIR/usage0" || bail "no usage lines (before)"
control "swapped=0123456789abcdef"
refused "$P256" swapped
wait_until 20 grep -q 'token demo: .*-> absent' "$DAEMON_LOG"
usage_snapshot "$E2E_DIR/usage1" || bail "no usage lines (after)"
check "swapped: the failure is counted as absent ($(fails "$E2E_DIR/usage0" absent) -> $(fails "$E2E_DIR/usage1" absent))" \
	test "$(fails "$E2E_DIR/usage1" absent)" -gt "$(fails "$E2E_DIR/usage0" absent)"
check_eq "swapped: not as session" "$(fails "$E2E_DIR/usage0" session)" "$(fails "$E2E_DIR/usage1" session)"
check_eq "swapped: not as login" "$(fails "$E2E_DIR/usage0" login)" "$(fails "$E2E_DIR/usage1" login)"
control present
wait_served "$P256" swapped-back 20
# 4b. Swapped again (another serial): a key made through the admin API
# meets the other token first in its read-write session: refused before
# any C_GenerateKeyPair reaches it.
wait_until 10 grep -q 'admin: listening on' "$DAEMON_LOG" || bail "the admin API did not start"
gen0=$(counts C_GenerateKeyPair)
control "swapped=fedcba9876543210"
st=$(api "$ADMIN_TOKEN" POST /v1/keys "${JSON[@]}" -d '{"token":"demo","label":"swapped-key","type":"ecdsa"}')
check_eq "swapped: POST /v1/keys is refused ($(head -c 200 "$BODY"))" 502 "$st"
check_eq "swapped: no C_GenerateKeyPair reached the other token" "$gen0" "$(counts C_GenerateKeyPair)"
check_grep "swapped: the token is absent, and why" "$DAEMON_LOG" \
	"token demo: ready -> absent: a different token has the label 'hsmtls': serial number 'fedcba9876543210'"
control present
wait_served "$P256" swapped-back2 20

check "the daemon never restarted (pid $PID0 still runs)" kill -0 "$PID0"
stop_daemon
check_eq "it exits cleanly" "$DAEMON_RC" 0

# 3. A token that claims longer signatures than it wrote.
control present
HSMTLS_SLOWTOKEN_SIGN_LEN_ADD=100 start_daemon "$conf" "$E2E_DIR/siglen.log" || bail "the daemon did not start (siglen)"
PID1=$DAEMON_PID
P256=$(listener_port p256)
P384=$(listener_port p384)
PRSA=$(listener_port rsa)
refused "$P256" siglen-p256
refused "$P384" siglen-p384
refused "$PRSA" siglen-rsa
check_grep "siglen: the p256 length is logged" "$DAEMON_LOG" "key 'p256' answered a signature of 164 bytes, not 64; the signature is refused"
check_grep "siglen: the rsa length is logged" "$DAEMON_LOG" "key 'rsa2048' answered a signature of 356 bytes, not 256"
check "siglen: the daemon survives" kill -0 "$PID1"
check_not "siglen: no sanitizer report" grep -q 'ERROR: AddressSanitizer\|runtime error:' "$DAEMON_LOG"
stop_daemon
check_eq "siglen: it exits cleanly" "$DAEMON_RC" 0

# 5. A one-off failure reading the p256 key's point when it is found: the
# value comes from the next read (the certificate check), and a recovery
# of the same token later accepts the key.
control "present point-rv-once=0x30"
start_daemon "$conf" "$E2E_DIR/point.log" || bail "the daemon did not start (point)"
check_eq "point: the read failed once" 1 "$(counts injected_point)"
P256=$(listener_port p256)
check "point: p256 served" served "$P256" point
take_down 1 # a new process and log: generation 1 again
control present
wait_served "$P256" point-back 20
check_grep "point: the recovery accepts the key" "$DAEMON_LOG" "token demo: failed -> ready: found again .*3 keys looked up"
stop_daemon
check_eq "point: it exits cleanly" "$DAEMON_RC" 0
e2e_finish
