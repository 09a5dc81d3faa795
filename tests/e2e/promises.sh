#!/usr/bin/env bash
# e2e: README promises that no other test touches, each against the real
# daemon:
#  - the command line: --version, --help, a bad option, --log-level debug
#    overriding the file (and the PIN absent from that debug log, from the
#    process arguments and from every log line);
#  - PIN sources: pin_source = file: and env:, pin_credential (systemd's
#    $CREDENTIALS_DIRECTORY), the URI's pin-source=, module-path= in the
#    URI instead of module =, module-name= (a p11-kit registered module), an
#    id= key URI; a URI that matches two tokens
#    is refused with a reason;
#  - addresses: a listener on unix:/PATH, a listener on [::1] with PROXY v2
#    (family TCP6, the client's [::1] address), a connector on unix:/PATH, a
#    listener whose backend is unix:/PATH (that connector);
#  - an unreachable backend: the client gets a clean TLS end, the log says why;
#    a backend that never answers the connect: connect_timeout ends it;
#  - SIGINT drains and exits 0 like SIGTERM;
#  - the global max_connections counts all listeners together;
#  - handshake_threads, io_threads and handshake_nice: the thread counts the
#    daemon reports and the nice value of its handshake threads.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools openssl curl mkfifo softhsm2-util
e2e_init
provision_token
start_backend

PIN=$(head -n 1 "$HSMTLS_PIN_FILE")
[ -n "$PIN" ] || bail "empty PIN file"

listener_block() { # NAME LISTEN BACKEND [extra lines...]
	local name=$1 listen=$2 backend=$3
	shift 3
	printf '[listener %s]\nlisten = %s\nbackend = %s\ncert = %s\nkey = %s\n' "$name" "$listen" "$backend" \
		"$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
	local l
	for l in "$@"; do printf '%s\n' "$l"; done
	printf '\n'
}

get_ok() { # PORT PATH: one HTTPS request through the listener on PORT
	curl_get "$1" www.hsmtls.test "https://www.hsmtls.test:$1/$2" 2>&1
}

# ---------------------------------------------------------- command line
out=$("$HSMTLSD" --version 2>&1)
rc=$?
check_eq "--version exits 0" 0 "$rc"
check "--version prints the version" grep -qE '^hsmtlsd [0-9]+\.[0-9]+\.[0-9]+' <<<"$out"
out=$("$HSMTLSD" --help 2>&1)
check_eq "--help exits 0" 0 "$?"
grep -q -- '--config' <<<"$out" && grep -q -- '--check' <<<"$out" && grep -q -- '--log-level' <<<"$out" &&
	ok "--help names --config, --check and --log-level" || fail "--help: $out"
"$HSMTLSD" --no-such-option >/dev/null 2>&1
rc=$?
[ "$rc" -ne 0 ] && ok "an unknown option exits non-zero ($rc)" || fail "an unknown option exits 0"
"$HSMTLSD" --log-level loud -c /dev/null >/dev/null 2>"$E2E_DIR/badlevel.err"
rc=$?
[ "$rc" -ne 0 ] && grep -q "unknown log level 'loud'" "$E2E_DIR/badlevel.err" &&
	ok "an unknown --log-level is refused with its name" || fail "--log-level loud: exit $rc, $(cat "$E2E_DIR/badlevel.err")"

# ------------------------------------- debug log, PIN sources, URIs, ids
# The key's CKA_ID, for an id= URI.
key_id=$(p11tool --provider "$HSMTLS_MODULE" --list-privkeys --login --set-pin="$PIN" "$HSMTLS_TOKEN_URI" 2>/dev/null |
	sed -n 's/.*object=p384;.*id=\([^;]*\).*/\1/p; s/.*id=\([^;]*\);.*object=p384;.*/\1/p' | head -n 1)
[ -n "$key_id" ] || key_id=$(p11tool --provider "$HSMTLS_MODULE" --list-privkeys --login --set-pin="$PIN" "$HSMTLS_TOKEN_URI" 2>/dev/null |
	grep 'object=p384' | grep -o 'id=[^;]*' | head -n 1 | cut -d= -f2)
[ -n "$key_id" ] || bail "no CKA_ID found for the p384 key"
key_by_id="pkcs11:token=$HSMTLS_TOKEN_LABEL;id=$key_id;type=private"

mkdir -p "$E2E_DIR/creds"
cp "$HSMTLS_PIN_FILE" "$E2E_DIR/creds/token-pin"
chmod 0600 "$E2E_DIR/creds/token-pin"

conf=$E2E_DIR/sources.conf
{
	printf '[global]\nlog_level = info\n\n'
	# module by path in the URI's query (RFC 7512), PIN by pin_source = file:
	printf '[token t1]\nuri = %s?module-path=%s\npin_source = file:%s\n\n' "$HSMTLS_TOKEN_URI" "$HSMTLS_MODULE" "$HSMTLS_PIN_FILE"
	listener_block file 127.0.0.1:0 "127.0.0.1:$BACKEND_PORT"
	printf '[listener byid]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\n\n' \
		"$BACKEND_PORT" "$HSMTLS_CERT_P384" "$key_by_id"
} >"$conf"
start_daemon_debug() { # CONF LOG [env...]: start_daemon with --log-level debug
	local c=$1 log=$2
	shift 2
	local real=$HSMTLSD
	HSMTLSD=$E2E_DIR/hsmtlsd-debug
	printf '#!/bin/sh\nexec env %s "%s" --log-level debug "$@"\n' "$*" "$real" >"$HSMTLSD"
	chmod +x "$HSMTLSD"
	start_daemon "$c" "$log"
	local r=$?
	HSMTLSD=$real
	return $r
}
if start_daemon_debug "$conf" "$E2E_DIR/sources.log"; then
	P=$(listener_port file)
	check "module-path= in the URI, pin_source = file:, --log-level debug: serves" sh -c "curl -sS --fail --cacert '$HSMTLS_CA' --resolve www.hsmtls.test:$P:127.0.0.1 https://www.hsmtls.test:$P/a | grep -q 'hello from backend'"
	P=$(listener_port byid)
	check "a key named by id= in its URI serves (P-384 chain)" sh -c "curl -sS --fail --cacert '$HSMTLS_CA' --resolve api.hsmtls.test:$P:127.0.0.1 https://api.hsmtls.test:$P/b | grep -q 'hello from backend'"
	check_grep "--log-level debug overrides log_level = info" "$DAEMON_LOG" ' debug: '
	check_not "the PIN is not in the process arguments" grep -qF -- "$PIN" "/proc/$DAEMON_PID/cmdline"
	stop_daemon 10
	check_not "the PIN is in no log line, at debug level either" grep -qF -- "$PIN" "$DAEMON_LOG"
else
	fail "daemon with module-path=, pin_source = file:, id= did not start"
fi

conf=$E2E_DIR/sources2.conf
{
	printf '[global]\nlog_level = info\n\n'
	printf '[token t1]\nuri = %s;pin-source=file:%s\nmodule = %s\n\n' "$HSMTLS_TOKEN_URI" "$HSMTLS_PIN_FILE" "$HSMTLS_MODULE"
	listener_block uri 127.0.0.1:0 "127.0.0.1:$BACKEND_PORT"
} >"$conf"
if start_daemon "$conf" "$E2E_DIR/sources2.log"; then
	P=$(listener_port uri)
	check "the URI's pin-source= logs in" sh -c "curl -sS --fail --cacert '$HSMTLS_CA' --resolve www.hsmtls.test:$P:127.0.0.1 https://www.hsmtls.test:$P/c | grep -q 'hello from backend'"
	stop_daemon 10
else
	fail "daemon with pin-source= in the URI did not start"
fi

# The module by its p11-kit registered name in the URI's query (Debian's
# softhsm2 package registers it as "softhsm2"), no module = line.
conf=$E2E_DIR/modname.conf
{
	printf '[global]\nlog_level = info\n\n'
	printf '[token t1]\nuri = %s?module-name=softhsm2\npin_file = %s\n\n' "$HSMTLS_TOKEN_URI" "$HSMTLS_PIN_FILE"
	listener_block modname 127.0.0.1:0 "127.0.0.1:$BACKEND_PORT"
} >"$conf"
if p11-kit list-modules 2>/dev/null | grep -q '^softhsm2:'; then
	if start_daemon "$conf" "$E2E_DIR/modname.log"; then
		P=$(listener_port modname)
		check "module-name=softhsm2 in the URI (a p11-kit registered module) logs in and serves" sh -c "curl -sS --fail --cacert '$HSMTLS_CA' --resolve www.hsmtls.test:$P:127.0.0.1 https://www.hsmtls.test:$P/m | grep -q 'hello from backend'"
		stop_daemon 10
	else
		fail "daemon with module-name= in the URI did not start"
	fi
else
	skipped "module-name=: p11-kit has no module registered as softhsm2"
fi

for kind in env credential; do
	conf=$E2E_DIR/$kind.conf
	{
		printf '[global]\nlog_level = info\n\n[token t1]\nuri = %s\nmodule = %s\n' "$HSMTLS_TOKEN_URI" "$HSMTLS_MODULE"
		if [ "$kind" = env ]; then printf 'pin_source = env:E2E_TOKEN_PIN\n\n'; else printf 'pin_credential = token-pin\n\n'; fi
		listener_block "$kind" 127.0.0.1:0 "127.0.0.1:$BACKEND_PORT"
	} >"$conf"
	if [ "$kind" = env ]; then
		E2E_TOKEN_PIN=$PIN start_daemon "$conf" "$E2E_DIR/$kind.log"
	else
		CREDENTIALS_DIRECTORY=$E2E_DIR/creds start_daemon "$conf" "$E2E_DIR/$kind.log"
	fi
	if [ $? -eq 0 ]; then
		P=$(listener_port "$kind")
		check "pin_$kind: logs in and serves" sh -c "curl -sS --fail --cacert '$HSMTLS_CA' --resolve www.hsmtls.test:$P:127.0.0.1 https://www.hsmtls.test:$P/d | grep -q 'hello from backend'"
		stop_daemon 10
	else
		fail "daemon with the PIN from $kind did not start"
	fi
done
conf=$E2E_DIR/nocred.conf
sed 's/^pin_credential = token-pin/pin_credential = no-such-credential/' "$E2E_DIR/credential.conf" >"$conf"
out=$(CREDENTIALS_DIRECTORY=$E2E_DIR/creds timeout 20 "$HSMTLSD" -c "$conf" --check 2>&1)
rc=$?
[ "$rc" -ne 0 ] && grep -q 'no-such-credential' <<<"$out" && ok "a missing credential is refused, named ($rc)" ||
	fail "missing credential: exit $rc: $out"

# Two tokens that one URI matches: refused, with the reason.
softhsm2-util --init-token --free --label second --so-pin 12345678 --pin 87654321 >/dev/null 2>&1 ||
	bail "softhsm2-util could not make a second token"
conf=$E2E_DIR/two.conf
{
	printf '[token any]\nuri = pkcs11:model=SoftHSM%%20v2\nmodule = %s\npin_file = %s\n\n' "$HSMTLS_MODULE" "$HSMTLS_PIN_FILE"
	listener_block two 127.0.0.1:0 "127.0.0.1:$BACKEND_PORT"
} >"$conf"
out=$(timeout 20 "$HSMTLSD" -c "$conf" --check 2>&1)
rc=$?
[ "$rc" -ne 0 ] && grep -qE '2 tokens match the URI' <<<"$out" && ok "a URI matching two tokens is refused: $(grep -o '2 tokens match[^;]*' <<<"$out")" ||
	fail "a URI matching two tokens: exit $rc: $out"

# ------------------------------------------------ unix, IPv6, unix backend
have_ipv6=1
dead_port=$("$BACKEND" --free-port)
ip -6 addr show lo 2>/dev/null | grep -q '::1' || have_ipv6=0
conf=$E2E_DIR/addr.conf
printf '[global]\nlog_level = info\n\n' >"$conf"
write_token_section "$conf"
{
	listener_block tcp 127.0.0.1:0 "127.0.0.1:$BACKEND_PORT"
	listener_block unixl "unix:$E2E_DIR/listener.sock" "127.0.0.1:$BACKEND_PORT"
	[ "$have_ipv6" = 1 ] && listener_block six "[::1]:0" "127.0.0.1:$BACKEND_PORT" "proxy_protocol = v2"
	listener_block viaunix 127.0.0.1:0 "unix:$E2E_DIR/connector.sock"
	listener_block dead 127.0.0.1:0 "127.0.0.1:$dead_port" "connect_timeout = 2s"
} >>"$conf"
# The connector speaks TLS to the unix listener (a fixed path).
cat >>"$conf" <<EOF
[connector local]
listen = unix:$E2E_DIR/connector.sock
connect = unix:$E2E_DIR/listener.sock
server_name = www.hsmtls.test
ca_file = $HSMTLS_CA
EOF
if start_daemon "$conf" "$E2E_DIR/addr.log"; then
	check "a listener on unix:/PATH serves (openssl s_client -unix)" sh -c \
		"printf 'GET /u HTTP/1.1\r\nHost: www.hsmtls.test\r\nConnection: close\r\n\r\n' | timeout 10 openssl s_client -unix '$E2E_DIR/listener.sock' -servername www.hsmtls.test -CAfile '$HSMTLS_CA' -verify_return_error -ign_eof 2>&1 | grep -q 'hello from backend: GET /u'"
	check "a connector on unix:/PATH, TLS to a unix listener (curl --unix-socket)" sh -c \
		"timeout 10 curl -sS --fail --unix-socket '$E2E_DIR/connector.sock' http://www.hsmtls.test/c | grep -q 'hello from backend: GET /c'"
	P=$(listener_port viaunix)
	check "a listener whose backend is unix:/PATH (that connector) serves" sh -c \
		"curl -sS --fail --cacert '$HSMTLS_CA' --resolve www.hsmtls.test:$P:127.0.0.1 https://www.hsmtls.test:$P/v | grep -q 'hello from backend: GET /v'"
	if [ "$have_ipv6" = 1 ]; then
		P=$(sed -n 's/.*listener six: listening on \[::1\]:\([0-9]*\),.*/\1/p' "$DAEMON_LOG" | tail -n 1)
		out=$(timeout 10 curl -sS --fail -g --cacert "$HSMTLS_CA" --resolve "www.hsmtls.test:$P:[::1]" "https://www.hsmtls.test:$P/six" 2>&1)
		check "a listener on [::1]: serves" grep -q 'hello from backend: GET /six' <<<"$out"
		check "PROXY v2 from an IPv6 listener: family TCP6" grep -q 'X-Proxy-Family: TCP6' <<<"$out"
		check "PROXY v2 from an IPv6 listener: the client's [::1] address" grep -qE 'X-Proxy-Src: \[::1\]:[0-9]+' <<<"$out"
	else
		note "no ::1 on this machine: the IPv6 checks are skipped"
	fi
	P=$(listener_port dead)
	out=$(printf 'GET /x HTTP/1.1\r\nHost: www.hsmtls.test\r\n\r\n' | timeout 10 openssl s_client -connect "127.0.0.1:$P" -servername www.hsmtls.test -CAfile "$HSMTLS_CA" -ign_eof 2>&1)
	check_not "an unreachable backend: no answer reaches the client" grep -q 'hello from backend' <<<"$out"
	check "an unreachable backend: the client sees a clean TLS end (close_notify), not a hang" grep -qE 'closed|DONE|read:errno=0' <<<"$out"
	check_grep "an unreachable backend is logged with the reason" "$DAEMON_LOG" "listener dead: cannot connect to backend 127\.0\.0\.1:$dead_port for .*: Connection refused"
	# SIGINT drains like SIGTERM.
	kill -INT "$DAEMON_PID"
	if wait_until 10 daemon_exited; then
		check_eq "SIGINT: exits 0" 0 "$(cat "$DAEMON_RC_FILE")"
		check_grep "SIGINT: drains like SIGTERM" "$DAEMON_LOG" 'Interrupt: draining: no new connections'
	else
		fail "SIGINT: still running after 10 s"
		stop_daemon 5
	fi
	forget_pid "$DAEMON_PID"
else
	fail "daemon with unix/IPv6 listeners and a connector did not start"
fi

# ------------------------------------------------------- connect_timeout
# A backend that never answers: a listen backlog of 0 that is never
# accepted, filled by one held connection, so the daemon's connect hangs.
nb_out=$E2E_DIR/noaccept.out
"$BACKEND" --quiet --no-accept >"$nb_out" 2>/dev/null </dev/null &
E2E_PIDS+=("$!")
wait_until 10 grep -q '^PORT [0-9]' "$nb_out" || bail "the --no-accept backend did not report its port"
NB_PORT=$(awk '/^PORT /{print $2; exit}' "$nb_out")
holders=()
for _ in 1 2; do
	# Output to /dev/null: nothing of these may hold the test's pipes open.
	timeout 30 bash -c 'exec 3<>/dev/tcp/127.0.0.1/$1; sleep 25' _ "$NB_PORT" >/dev/null 2>&1 </dev/null &
	holders+=("$!")
done
E2E_PIDS+=("${holders[@]}")
conf=$E2E_DIR/ctimeout.conf
printf '[global]\nlog_level = info\n\n' >"$conf"
write_token_section "$conf"
listener_block slowb 127.0.0.1:0 "127.0.0.1:$NB_PORT" "connect_timeout = 1s" >>"$conf"
if start_daemon "$conf" "$E2E_DIR/ctimeout.log"; then
	P=$(listener_port slowb)
	t0=$(($(date +%s%N) / 1000000))
	out=$(printf 'GET /x HTTP/1.1\r\nHost: www.hsmtls.test\r\n\r\n' | timeout 20 openssl s_client -connect "127.0.0.1:$P" -servername www.hsmtls.test -CAfile "$HSMTLS_CA" -ign_eof 2>&1)
	t=$(($(date +%s%N) / 1000000 - t0))
	check_grep "connect_timeout = 1s: a backend that never answers is logged with the reason" "$DAEMON_LOG" \
		"listener slowb: cannot connect to backend 127\.0\.0\.1:$NB_PORT for .*: (Connection timed out|.*timed out.*)"
	if [ "$t" -ge 800 ] && [ "$t" -lt 8000 ]; then
		ok "connect_timeout = 1s: the client's connection ends after about 1 s ($t ms)"
	else
		fail "connect_timeout = 1s: the client's connection ended after $t ms"
	fi
	check_not "connect_timeout: no answer reaches the client" grep -q 'hello from backend' <<<"$out"
	stop_daemon 10
	kill "${holders[@]}" 2>/dev/null
else
	fail "daemon for the connect_timeout check did not start"
fi

# --------------------------------------- global max_connections, threads
conf=$E2E_DIR/global.conf
printf '[global]\nlog_level = info\nmax_connections = 2\nhandshake_threads = 3\nio_threads = 1\nhandshake_nice = 7\n\n' >"$conf"
write_token_section "$conf"
{
	listener_block a 127.0.0.1:0 "127.0.0.1:$BACKEND_PORT"
	listener_block b 127.0.0.1:0 "127.0.0.1:$BACKEND_PORT"
} >>"$conf"
if start_daemon "$conf" "$E2E_DIR/global.log"; then
	check_grep "handshake_threads = 3, io_threads = 1: reported" "$DAEMON_LOG" 'ready: 3 handshake threads, 1 I/O threads'
	nice_count=0
	for t in /proc/"$DAEMON_PID"/task/*; do
		n=$(awk '{print $19}' "$t/stat" 2>/dev/null)
		[ "$n" = 7 ] && nice_count=$((nice_count + 1))
	done
	check_eq "handshake_nice = 7: the 3 handshake threads run at nice 7" 3 "$nice_count"
	PA=$(listener_port a)
	PB=$(listener_port b)
	held=()
	for i in 1 2; do
		f=$E2E_DIR/hold-$i.fifo
		mkfifo "$f"
		timeout 30 openssl s_client -connect "127.0.0.1:$PA" -servername www.hsmtls.test -CAfile "$HSMTLS_CA" -quiet <"$f" >"$E2E_DIR/hold-$i.out" 2>&1 &
		held+=("$!")
		exec {fd}>"$f"
		eval "HOLD_FD_$i=$fd"
		printf 'held-%s\n' "$i" >&"$fd"
	done
	E2E_PIDS+=("${held[@]}")
	wait_until 10 grep -q '^held-2$' "$E2E_DIR/hold-2.out" && wait_until 10 grep -q '^held-1$' "$E2E_DIR/hold-1.out" ||
		fail "global max_connections: the two held connections did not get their echo"
	out=$(get_ok "$PB" third)
	check_not "global max_connections = 2: a third connection, on another listener, is refused" grep -q 'hello from backend' <<<"$out"
	check_grep "global max_connections: the refusal is logged" "$DAEMON_LOG" 'connection limit reached'
	eval "exec $HOLD_FD_1>&- $HOLD_FD_2>&-"
	for p in "${held[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; forget_pid "$p"; done
	wait_until 10 sh -c "curl -sS --fail --cacert '$HSMTLS_CA' --resolve www.hsmtls.test:$PB:127.0.0.1 https://www.hsmtls.test:$PB/after 2>/dev/null | grep -q 'hello from backend'" &&
		ok "global max_connections: served again once the held connections closed" ||
		fail "global max_connections: still refused after the held connections closed"
	stop_daemon 10
else
	fail "daemon with global limits and thread settings did not start"
fi

e2e_finish
