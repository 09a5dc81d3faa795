#!/usr/bin/env bash
# e2e: configurations that must be refused. Each one gives a non-zero exit
# from `hsmtlsd --check -c FILE` and from `hsmtlsd -c FILE` (run under
# timeout: a daemon that wrongly starts is killed and counted as a failure),
# and a message on stderr that names the file and the line ("FILE:LINE:")
# and the reason. A good configuration passes --check.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

e2e_init
unset HSMTLS_E2E_UNSET_PIN HSMTLS_E2E_PIN
provision_token
start_backend

PIN=$(head -n 1 "$HSMTLS_PIN_FILE")
WRONG_PIN_FILE=$E2E_DIR/wrong-pin
# Another 16-hex-digit PIN, surely different from the real one.
WRONG_PIN=$(printf '%s' "$PIN" | tr '0-9a-f' '1-9a-f0')
(umask 077 && printf '%s\n' "$WRONG_PIN" >"$WRONG_PIN_FILE")

good=$E2E_DIR/good.conf
cat >"$good" <<EOF
; hsmtlsd e2e: a good configuration
[global]
log_level = info
drain_timeout = 2s

[token demo]
uri = $HSMTLS_TOKEN_URI
module = $HSMTLS_MODULE
pin_file = $HSMTLS_PIN_FILE

[listener www]
listen = 127.0.0.1:0
backend = 127.0.0.1:$BACKEND_PORT
cert = $HSMTLS_CERT_RSA2048
key = $HSMTLS_KEY_RSA2048
cert = $HSMTLS_CERT_P256
key = $HSMTLS_KEY_P256
EOF

# ---------------------------------------------------------- good config
out=$(timeout 20 "$HSMTLSD" --check -c "$good" 2>&1)
rc=$?
check_eq "good config: hsmtlsd --check exit status" 0 "$rc"
grep -q 'configuration OK' <<<"$out" && ok "good config: --check says 'configuration OK'" ||
	fail "good config: --check output: $(tail -n 3 <<<"$out")"
if start_daemon "$good" "$E2E_DIR/good.log"; then
	ok "good config: hsmtlsd -c starts and listens"
	port=$(listener_port www)
	check_eq "good config: a request is served" "hello from backend: GET /good HTTP/1.1" \
		"$(curl_get "$port" www.hsmtls.test "https://www.hsmtls.test:$port/good" 2>&1)"
	check "good config: hsmtlsd still runs after serving" daemon_running
	stop_daemon 10
	check_eq "good config: hsmtlsd exits 0 on SIGTERM" 0 "$DAEMON_RC"
else
	fail "good config: hsmtlsd -c starts and listens"
fi

# ----------------------------------------------- unix socket listeners
# A socket left behind at the listen path (the daemon was killed) is
# replaced; any other file there is left alone and the daemon refuses to
# start.
SOCK=$E2E_DIR/www.sock
sed -e "s|^listen = .*|listen = unix:$SOCK|" "$good" >"$E2E_DIR/unix.conf"
unix_get() { timeout 20 curl -sS --fail --cacert "$HSMTLS_CA" --unix-socket "$SOCK" "https://www.hsmtls.test/$1" 2>&1; }
if start_daemon "$E2E_DIR/unix.conf" "$E2E_DIR/unix-1.log"; then
	check_eq "unix listener: a request is served" "hello from backend: GET /unix-1 HTTP/1.1" "$(unix_get unix-1)"
	kill -KILL "$DAEMON_PID"
	wait_until 10 daemon_exited || bail "hsmtlsd did not die of SIGKILL"
	forget_pid "$DAEMON_PID"
	check "unix listener: a killed daemon leaves its socket behind" test -S "$SOCK"
	if start_daemon "$E2E_DIR/unix.conf" "$E2E_DIR/unix-2.log"; then
		ok "unix listener: starts again over the stale socket"
		check_eq "unix listener: the new socket serves" "hello from backend: GET /unix-2 HTTP/1.1" "$(unix_get unix-2)"
		stop_daemon 10
	else
		fail "unix listener: does not start again over the stale socket"
	fi
else
	fail "unix listener: hsmtlsd -c starts and listens on $SOCK"
fi
rm -f -- "$SOCK"
printf 'not a socket\n' >"$SOCK"
out=$(timeout 5 "$HSMTLSD" -c "$E2E_DIR/unix.conf" 2>&1 </dev/null)
rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && grep -q "cannot listen on unix:$SOCK" <<<"$out"; then
	ok "unix listener: a regular file at the path is refused (exit $rc)"
else
	fail "unix listener: a regular file at the path: exit $rc: $(tail -n 2 <<<"$out")"
fi
check_eq "unix listener: the regular file is left alone" "not a socket" "$(cat "$SOCK" 2>/dev/null)"

# The PIN from the environment (pin_env) works too.
sed -e "s|^pin_file = .*|pin_env = HSMTLS_E2E_PIN|" "$good" >"$E2E_DIR/good-env.conf"
out=$(HSMTLS_E2E_PIN=$PIN timeout 20 "$HSMTLSD" --check -c "$E2E_DIR/good-env.conf" 2>&1)
check_eq "good config with pin_env: hsmtlsd --check exit status" 0 "$?"
grep -qF -- "$PIN" <<<"$out" && fail "pin_env: the PIN appears in the output" ||
	ok "pin_env: the PIN does not appear in the output"
# The running daemon takes the PIN out of its environment: not in
# /proc/PID/environ (the value's memory is wiped; the variable is unset).
if HSMTLS_E2E_PIN=$PIN start_daemon "$E2E_DIR/good-env.conf" "$E2E_DIR/good-env.log"; then
	if tr '\0' '\n' <"/proc/$DAEMON_PID/environ" | grep -qF -- "$PIN"; then
		fail "pin_env: the PIN is still in the daemon's environment (/proc/PID/environ)"
	else
		ok "pin_env: the PIN is not in the daemon's environment (/proc/PID/environ)"
	fi
	check_not "pin_env: the variable's value is wiped in the daemon's environment" \
		sh -c "tr '\\0' '\\n' <'/proc/$DAEMON_PID/environ' | grep -q '^HSMTLS_E2E_PIN=.'"
	stop_daemon 10
	check_eq "pin_env: hsmtlsd exits 0 on SIGTERM" 0 "$DAEMON_RC"
fi

# --------------------------------------------------------- bad configs
n=0
# bad NAME SED-SCRIPT LINE-ERE REASON-ERE [REASON-ERE...]
#   The config is the good one edited by SED-SCRIPT; the message must name
#   FILE:N: where N is the (first) line matching LINE-ERE, and match every
#   REASON-ERE (case-insensitive).
bad() {
	local name=$1 script=$2 line_re=$3
	shift 3
	n=$((n + 1))
	local conf=$E2E_DIR/bad-$n.conf
	sed -e "$script" "$good" >"$conf"
	if cmp -s "$conf" "$good"; then
		bail "$name: the sed script did not change the config"
	fi
	local lines line
	lines=$(grep -nE -- "$line_re" "$conf" | cut -d: -f1 | tr '\n' ' ')
	[ -n "$lines" ] || bail "$name: no line matches /$line_re/ in the config"
	local mode out rc
	for mode in --check run; do
		if [ "$mode" = --check ]; then
			out=$(timeout 20 "$HSMTLSD" --check -c "$conf" 2>&1 </dev/null)
		else
			out=$(timeout 5 "$HSMTLSD" -c "$conf" 2>&1 </dev/null)
		fi
		rc=$?
		local what="$name: hsmtlsd ${mode/run/-c}"
		[ "$mode" = --check ] && what="$name: hsmtlsd --check"
		local bad_=""
		if [ "$rc" -eq 124 ]; then
			bad_+=" the daemon started (killed by timeout);"
		elif [ "$rc" -eq 0 ]; then
			bad_+=" exit status 0;"
		fi
		local found=0
		for line in $lines; do
			grep -qF -- "$conf:$line: " <<<"$out" && found=1
		done
		[ "$found" -eq 1 ] || bad_+=" no '$(basename "$conf"):{${lines% }}: ' in the message;"
		local re
		for re in "$@"; do
			grep -qiE -- "$re" <<<"$out" || bad_+=" no /$re/ in the message;"
		done
		if grep -qF -- "$PIN" <<<"$out"; then
			bad_+=" the PIN appears in the output!;"
		fi
		if [ -z "$bad_" ]; then
			ok "$what: exit $rc: $(grep -m1 -o -- "$(basename "$conf"):[0-9]*: .*" <<<"$out" | cut -c1-120)${KNOWN_BUG:+ (known bug fixed? remove KNOWN_BUG)}"
		elif [ -n "${KNOWN_BUG:-}" ]; then
			known_bug "$what:$bad_" "$KNOWN_BUG"
		else
			fail "$what:$bad_"
			printf '%s\n' "$out" | tail -n 5 | sed 's/^/#   /'
		fi
		LAST_OUT=$out
	done
}

bad "unknown setting in a listener" '/^\[listener www\]/a foo = bar' \
	'^foo = bar' "unknown setting" "foo"
bad "unknown setting in a token section" '/^\[token demo\]/a colour = blue' \
	'^colour = blue' "unknown setting" "colour"
bad "unknown section" '$a [frobnicate x]\nfoo = 1' \
	'^\[frobnicate x\]' "unknown section" "frobnicate"
bad "malformed token URI" 's|^uri = .*|uri = notauri|' \
	'^uri = notauri' "pkcs11:|RFC 7512|URI"
bad "malformed key URI (no such scheme)" 's|^key = .*rsa2048.*|key = pkcs12:object=rsa2048|' \
	'^key = pkcs12:' "pkcs12|URI|key|cannot read"
bad "key URI naming an object that is not on the token" \
	's|^key = .*rsa2048.*|key = pkcs11:token=hsmtls;object=nosuchkey;type=private|' \
	'^key = .*nosuchkey' "nosuchkey" "no private key|not found|does not exist|no such"
bad "token URI naming a token that does not exist" 's|^uri = .*|uri = pkcs11:token=nosuchtoken|' \
	'^\[token demo\]|^uri = ' "token" "not present|not found|no token|does not exist|no such"
bad "key URI naming a token that is not configured" \
	's|^key = .*rsa2048.*|key = pkcs11:token=othertoken;object=rsa2048;type=private|' \
	'^key = .*othertoken' "othertoken|token"
bad "wrong PIN" "s|^pin_file = .*|pin_file = $WRONG_PIN_FILE|" \
	'^\[token demo\]|^pin_file = ' "login" "fail|incorrect|wrong"
if grep -qF -- "$WRONG_PIN" <<<"$LAST_OUT"; then
	fail "wrong PIN: the wrong PIN itself appears in the output"
else
	ok "wrong PIN: neither the PIN nor the wrong PIN appears in the output"
fi
# The wrong PIN is tried exactly once (SoftHSM never locks, so only a count
# shows it): the same configuration through the counting module tests/slowtoken.
if [ -n "${SLOWTOKEN:-}" ] && [ -f "$SLOWTOKEN" ]; then
	sed -e "s|^pin_file = .*|pin_file = $WRONG_PIN_FILE|" -e "s|^module = .*|module = $SLOWTOKEN|" "$good" >"$E2E_DIR/wrong-pin-slow.conf"
	for mode in --check run; do
		counts=$E2E_DIR/wrong-pin-$mode.counts
		rm -f "$counts"
		if [ "$mode" = --check ]; then
			HSMTLS_SLOWTOKEN_MODULE=$HSMTLS_MODULE HSMTLS_SLOWTOKEN_COUNT_FILE=$counts \
				timeout 20 "$HSMTLSD" --check -c "$E2E_DIR/wrong-pin-slow.conf" >/dev/null 2>&1 </dev/null
		else
			HSMTLS_SLOWTOKEN_MODULE=$HSMTLS_MODULE HSMTLS_SLOWTOKEN_COUNT_FILE=$counts \
				timeout 5 "$HSMTLSD" -c "$E2E_DIR/wrong-pin-slow.conf" >/dev/null 2>&1 </dev/null
		fi
		rc=$?
		check "wrong PIN through the counting module: hsmtlsd $mode fails (exit $rc)" test "$rc" -ne 0 -a "$rc" -ne 124
		logins=$(tr ' ' '\n' <"$counts" 2>/dev/null | awk -F= '$1 == "C_Login" { print $2 }')
		check_eq "wrong PIN: hsmtlsd $mode calls C_Login exactly once (not retried)" 1 "${logins:-none}"
	done
else
	note "wrong PIN login count: skipped (the slowtoken module was not built)"
fi

# A FIFO where the PIN file should be: refused at once as not a regular
# file (opening it must not block the login until someone writes to it).
mkfifo "$E2E_DIR/pin-fifo"
bad "PIN file that is a FIFO" "s|^pin_file = .*|pin_file = $E2E_DIR/pin-fifo|" \
	'^\[token demo\]|^pin_file = ' "pin-fifo" "not a regular file"

# A PIN file others may read (they would know the PIN) or write (every
# login would present their PIN: a real token locks) is refused.
cp "$HSMTLS_PIN_FILE" "$E2E_DIR/pin-0644" && chmod 0644 "$E2E_DIR/pin-0644"
bad "PIN file readable by other users" "s|^pin_file = .*|pin_file = $E2E_DIR/pin-0644|" \
	'^\[token demo\]|^pin_file = ' "pin-0644" "other users"
cp "$HSMTLS_PIN_FILE" "$E2E_DIR/pin-0660" && chmod 0660 "$E2E_DIR/pin-0660"
bad "PIN file writable by its group" "s|^pin_file = .*|pin_file = $E2E_DIR/pin-0660|" \
	'^\[token demo\]|^pin_file = ' "pin-0660" "other users"
if [ "$(id -u)" = 0 ]; then
	cp "$HSMTLS_PIN_FILE" "$E2E_DIR/pin-nobody" && chmod 0600 "$E2E_DIR/pin-nobody" && chown 65534 "$E2E_DIR/pin-nobody"
	bad "PIN file of another user" "s|^pin_file = .*|pin_file = $E2E_DIR/pin-nobody|" \
		'^\[token demo\]|^pin_file = ' "pin-nobody" "another user"
else
	note "PIN file of another user: not checked (needs root to make one)"
fi

bad "PIN file that does not exist" "s|^pin_file = .*|pin_file = $E2E_DIR/no-such-pin|" \
	'^\[token demo\]|^pin_file = ' "no-such-pin" "not exist|no such|cannot read"
bad "pin_env naming a variable that is not set" 's|^pin_file = .*|pin_env = HSMTLS_E2E_UNSET_PIN|' \
	'^\[token demo\]|^pin_env = ' "HSMTLS_E2E_UNSET_PIN"
bad "module that does not exist" "s|^module = .*|module = $E2E_DIR/no-such-module.so|" \
	'^\[token demo\]|^module = ' "no-such-module"
bad "certificate that does not match its key (p256 cert, rsa2048 key)" \
	"s|^cert = .*rsa2048-chain.pem|cert = $HSMTLS_CERT_P256|" \
	'^key = .*rsa2048|^cert = .*p256' "does not match|mismatch"
bad "certificate file that does not exist" "s|^cert = .*rsa2048-chain.pem|cert = $E2E_DIR/nothere.pem|" \
	'^cert = .*nothere' "nothere.pem" "cannot read|not exist|no such"
bad "pin_value in a token section" '/^pin_file = /a pin_value = 1234' \
	'^pin_value' "pin_value|PIN" "pin_file|not written|refused|not allowed"
bad "pin_value instead of pin_file" 's|^pin_file = .*|pin_value = 1234|' \
	'^pin_value' "pin_value|PIN" "pin_file|not written|refused|not allowed"
bad "pin-value= in the token URI" "s|^uri = .*|uri = $HSMTLS_TOKEN_URI?pin-value=1234|" \
	'^uri = ' "pin-value" "refused|not allowed"
bad "pin-value= in a key URI" "s|^key = \\(.*rsa2048.*\\)|key = \\1?pin-value=1234|" \
	'^key = .*pin-value' "pin-value" "refused|not allowed"
bad "missing listen address" '/^listen = /d' \
	'^\[listener www\]' "listen"
bad "listen port out of range" 's|^listen = .*|listen = 127.0.0.1:70000|' \
	'^listen = ' "port"
bad "listen address that is no address" 's|^listen = .*|listen = nowhere|' \
	'^listen = ' "listen|HOST:PORT|address"
bad "missing backend" '/^backend = /d' \
	'^\[listener www\]' "backend"
bad "key before its cert" '/^cert = .*rsa2048-chain.pem/d; s|^\(key = .*rsa2048.*\)|\1\ncert = '"$HSMTLS_CERT_RSA2048"'|' \
	'^key = .*rsa2048' "cert"
bad "unknown log level" 's|^log_level = .*|log_level = loud|' \
	'^log_level' "log_level"
bad "malformed duration" 's|^drain_timeout = .*|drain_timeout = soon|' \
	'^drain_timeout' "drain_timeout|duration"
bad "line that is no setting" '/^\[listener www\]/a this is not a setting' \
	'^this is not a setting' "syntax|expected"
bad "listener defined twice" '$a [listener www]\nlisten = 127.0.0.1:0' \
	'^\[listener www\]$' "twice|duplicate|already"

# A state directory whose state.db (or its -wal) is a symbolic link: the
# daemon refuses to start and never writes where the link points (the
# directory belongs to the daemon's user, who must not make root write
# elsewhere).
for side in state.db state.db-wal; do
	sd=$E2E_DIR/state-link-${side#state.db}x
	mkdir -m 700 "$sd"
	ln -s "$E2E_DIR/victim$side" "$sd/$side"
	sed -e "s|^drain_timeout = .*|&\nstate_dir = $sd|" "$good" >"$E2E_DIR/state-link.conf"
	out=$(timeout 5 "$HSMTLSD" -c "$E2E_DIR/state-link.conf" 2>&1 </dev/null)
	rc=$?
	if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && grep -q "$side: .*\(symbolic link\|not a regular file\)" <<<"$out"; then
		ok "$side a symbolic link: refused at start ($(grep -m1 -o "$side: .*" <<<"$out" | cut -c1-90))"
	else
		fail "$side a symbolic link: exit $rc: $(tail -n 2 <<<"$out")"
	fi
	check "$side a symbolic link: nothing written where it points" test ! -e "$E2E_DIR/victim$side"
done

# --check compiles the priority string too, and the error names the
# priority line (this was a bug once).
KNOWN_BUG=""
bad "invalid priority string" '/^\[listener www\]/a priority = NORMAL:+NONSENSE-THING' \
	'^priority = ' "priority" "NONSENSE"
KNOWN_BUG=""

e2e_finish
