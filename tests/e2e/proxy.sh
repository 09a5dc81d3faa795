#!/usr/bin/env bash
# e2e: the proxy part. Byte-exact bidirectional data (1 MiB through the echo
# backend), keep-alive (many requests on one TLS connection), 20 parallel
# clients, the handshake timeout for silent clients (without blocking other
# clients), the idle timeout, and drain on SIGTERM: open connections keep
# being served, new ones are refused, the daemon exits 0 once they are done
# (or when drain_timeout runs out).
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools openssl curl mkfifo
e2e_init
provision_token
start_backend

conf=$E2E_DIR/proxy.conf
cat >"$conf" <<EOF
[global]
log_level = info
drain_timeout = 5s

EOF
write_token_section "$conf"
write_listener "$conf" www "cert = $HSMTLS_CERT_RSA2048" "key = $HSMTLS_KEY_RSA2048" "handshake_timeout = 1s"
write_listener "$conf" idle "idle_timeout = 1s"

start_daemon "$conf" || bail "daemon did not start"
PORT=$(listener_port www)
IDLE_PORT=$(listener_port idle)
[ -n "$PORT" ] && [ -n "$IDLE_PORT" ] || bail "no ports in the log"

now_ms() { echo $(($(date +%s%N) / 1000000)); }
file_size() { stat -c %s "$1" 2>/dev/null || echo 0; }
size_at_least() { [ "$(file_size "$1")" -ge "$2" ]; }

# openssl s_client, verifying the server; -nocommands: a line starting with
# Q or R is data, not a command.
S_CLIENT=(openssl s_client -servername www.hsmtls.test -verify_hostname www.hsmtls.test
	-CAfile "$HSMTLS_CA" -verify_return_error -nocommands)

# ----------------------------------------------------- 1 MiB round trip
# The payload starts with a NUL byte so the backend picks echo mode.
payload=$E2E_DIR/payload.bin
{
	printf '\0'
	head -c $((1024 * 1024 - 1)) /dev/urandom
} >"$payload"
SIZE=$(file_size "$payload")
for proto in tls1_3 tls1_2; do
	out=$E2E_DIR/echo-$proto.out
	: >"$out"
	# -quiet implies -ign_eof: the client keeps reading after its stdin ends;
	# it is stopped once all bytes came back.
	"${S_CLIENT[@]}" -connect "127.0.0.1:$PORT" -"$proto" -quiet <"$payload" >"$out" 2>"$out.err" &
	pid=$!
	E2E_PIDS+=("$pid")
	t0=$(now_ms)
	wait_until 30 size_at_least "$out" "$SIZE"
	kill "$pid" 2>/dev/null
	wait "$pid" 2>/dev/null
	forget_pid "$pid"
	got=$(file_size "$out")
	if [ "$got" -eq "$SIZE" ] && [ "$(sha256sum <"$out")" = "$(sha256sum <"$payload")" ]; then
		ok "1 MiB echo round trip with openssl s_client -$proto: sha256 matches ($(($(now_ms) - t0)) ms)"
	else
		fail "1 MiB echo round trip with openssl s_client -$proto: got $got of $SIZE bytes or a different sha256"
		tail -n 5 "$out.err" | sed 's/^/#   /'
	fi
done

# The same with gnutls-cli, if there: it says goodbye when its stdin ends,
# so stdin is held open (fifo) until every byte came back.
if command -v gnutls-cli >/dev/null 2>&1; then
	out=$E2E_DIR/echo-gnutls.out
	fifo=$E2E_DIR/gnutls.fifo
	mkfifo "$fifo"
	: >"$out"
	timeout 30 gnutls-cli --x509cafile="$HSMTLS_CA" --port="$PORT" --sni-hostname=www.hsmtls.test \
		--verify-hostname=www.hsmtls.test --logfile="$out.err" 127.0.0.1 <"$fifo" >"$out" 2>>"$out.err" &
	pid=$!
	E2E_PIDS+=("$pid")
	exec 7>"$fifo"
	cat "$payload" >&7 &
	catpid=$!
	# gnutls-cli writes only the received data to stdout (--logfile takes the rest).
	wait_until 30 size_at_least "$out" "$SIZE"
	wait "$catpid" 2>/dev/null
	exec 7>&-
	wait "$pid" 2>/dev/null
	forget_pid "$pid"
	got=$(file_size "$out")
	if [ "$got" -eq "$SIZE" ] && [ "$(sha256sum <"$out")" = "$(sha256sum <"$payload")" ]; then
		ok "1 MiB echo round trip with gnutls-cli: sha256 matches"
	else
		fail "1 MiB echo round trip with gnutls-cli: got $got of $SIZE bytes or a different sha256"
		tail -n 5 "$out.err" | sed 's/^/#   /'
	fi
fi

# ------------------------------------------------------------ keep-alive
hs_lines() { grep -cE "listener www: 127\.0\.0\.1:[0-9]+: \(TLS" "$DAEMON_LOG"; }
before=$(hs_lines)
urls=()
for i in $(seq 1 25); do urls+=("https://www.hsmtls.test:$PORT/ka-$i"); done
out=$(curl_get "$PORT" www.hsmtls.test -w 'connects=%{num_connects}\n' "${urls[@]}" 2>&1)
rc=$?
answers=$(grep -c '^hello from backend: GET /ka-[0-9]* HTTP/1.1$' <<<"$out")
connects=$(sed -n 's/^connects=//p' <<<"$out" | awk '{s += $1} END {print s + 0}')
in_order=1
for i in $(seq 1 25); do
	[ "$(grep '^hello from backend' <<<"$out" | sed -n "${i}p")" = "hello from backend: GET /ka-$i HTTP/1.1" ] || in_order=0
done
check_eq "keep-alive: curl exit status" 0 "$rc"
check_eq "keep-alive: 25 requests on one curl command line all answered, in order" "25 1" "$answers $in_order"
check_eq "keep-alive: curl opened one connection for the 25 requests" 1 "$connects"
hs_lines_at_least() { [ "$(hs_lines)" -ge "$1" ]; }
wait_until 5 hs_lines_at_least $((before + 1))
check_eq "keep-alive: the daemon made one handshake for them" 1 $(($(hs_lines) - before))

# ------------------------------------------------------- parallel clients
pids=()
for i in $(seq 1 20); do
	curl_get "$PORT" www.hsmtls.test -o "$E2E_DIR/par.$i" "https://www.hsmtls.test:$PORT/par-$i" 2>"$E2E_DIR/par.$i.err" &
	pids+=($!)
done
par_ok=0
for i in $(seq 1 20); do
	wait "${pids[$((i - 1))]}" && [ "$(cat "$E2E_DIR/par.$i")" = "hello from backend: GET /par-$i HTTP/1.1" ] &&
		par_ok=$((par_ok + 1))
done
check_eq "20 parallel curl clients all answered" 20 "$par_ok"

# ---------------------------------------------------- handshake timeout
# Three silent clients and one that stops after a partial record header;
# a real client meanwhile is served at once; all four are closed after
# about handshake_timeout (1 s).
t0=$(now_ms)
for fd in 3 4 5 6; do
	eval "exec $fd<>/dev/tcp/127.0.0.1/$PORT" || bail "cannot connect to 127.0.0.1:$PORT"
done
printf '\x16\x03' >&6
out=$(curl_get "$PORT" www.hsmtls.test "https://www.hsmtls.test:$PORT/while-silent" 2>&1)
t_curl=$(($(now_ms) - t0))
if [ "$out" = "hello from backend: GET /while-silent HTTP/1.1" ] && [ "$t_curl" -lt 900 ]; then
	ok "a client is served while 4 silent connections wait for their handshake ($t_curl ms)"
else
	fail "a client next to 4 silent connections: ${t_curl} ms, answer: $out"
fi
closed=0
for fd in 3 4 5 6; do
	# read returns at EOF (the daemon closed) or after 5 s.
	if timeout 5 cat <&$fd >/dev/null; then closed=$((closed + 1)); fi
	eval "exec $fd<&-"
done
t_close=$(($(now_ms) - t0))
if [ "$closed" -eq 4 ] && [ "$t_close" -ge 900 ] && [ "$t_close" -lt 3000 ]; then
	ok "4 silent clients closed after the 1 s handshake timeout ($t_close ms)"
else
	fail "silent clients: $closed of 4 closed, after $t_close ms (expected about 1000)"
fi
check_grep "the daemon logs the handshake timeout" "$DAEMON_LOG" 'no ClientHello within the handshake timeout'

# --------------------------------------------------------- idle timeout
# A TLS connection that sends nothing after the handshake is closed after
# idle_timeout (1 s) on listener "idle": the client itself sees the end
# (s_client -quiet exits when the server closes). One with traffic every
# 0.5 s lives on for 3 s, and is closed 1 s after its last byte.
running() { kill -0 "$1" 2>/dev/null; }
stopped() { ! kill -0 "$1" 2>/dev/null; }
fifo=$E2E_DIR/idle.fifo
mkfifo "$fifo"
t0=$(now_ms)
"${S_CLIENT[@]}" -connect "127.0.0.1:$IDLE_PORT" -quiet <"$fifo" >"$E2E_DIR/idle.out" 2>"$E2E_DIR/idle.err" &
pid=$!
E2E_PIDS+=("$pid")
exec 7>"$fifo"
if wait_until 5 stopped "$pid"; then
	t=$(($(now_ms) - t0))
	if [ "$t" -ge 900 ] && [ "$t" -lt 3000 ]; then
		ok "an idle TLS connection is closed after idle_timeout = 1s: the client saw the end ($t ms)"
	else
		fail "idle connection: the client saw the end after $t ms (expected about 1000)"
	fi
else
	fail "an idle TLS connection: the client still runs 5 s later (idle_timeout = 1s)"
	kill "$pid" 2>/dev/null
fi
check_grep "the daemon logs the idle timeout" "$DAEMON_LOG" 'listener idle: .*closed \(idle timeout: the backend is reset\)'
exec 7>&-
wait "$pid" 2>/dev/null
forget_pid "$pid"

fifo=$E2E_DIR/busy.fifo
mkfifo "$fifo"
out=$E2E_DIR/busy.out
"${S_CLIENT[@]}" -connect "127.0.0.1:$IDLE_PORT" -quiet <"$fifo" >"$out" 2>"$out.err" &
pid=$!
E2E_PIDS+=("$pid")
exec 7>"$fifo"
t0=$(now_ms) echoed=0
for i in 1 2 3 4 5 6 7; do
	(printf 'tick-%s\n' "$i" >&7) 2>/dev/null || break # (a subshell: SIGPIPE once closed)
	wait_until 2 grep -q "^tick-$i\$" "$out" || break
	echoed=$i
	[ "$i" -lt 7 ] && sleep 0.5 # the traffic pattern under test, not a wait
done
t_last=$(now_ms)
if [ "$echoed" -eq 7 ] && running "$pid"; then
	ok "a connection with traffic every 0.5 s outlives idle_timeout = 1s ($((t_last - t0)) ms, 7 echoes)"
else
	fail "a connection with traffic every 0.5 s: $echoed of 7 echoes, closed after $((t_last - t0)) ms"
fi
if wait_until 5 stopped "$pid"; then
	t=$(($(now_ms) - t_last))
	if [ "$t" -ge 700 ] && [ "$t" -lt 3000 ]; then
		ok "and is closed about idle_timeout after its last byte ($t ms)"
	else
		fail "busy connection closed $t ms after its last byte (expected about 1000)"
	fi
else
	fail "busy connection: still open 5 s after its last byte"
	kill "$pid" 2>/dev/null
fi
exec 7>&-
wait "$pid" 2>/dev/null
forget_pid "$pid"

# ----------------------------------------------------------------- drain
fifo=$E2E_DIR/drain.fifo
mkfifo "$fifo"
out=$E2E_DIR/drain.out
"${S_CLIENT[@]}" -connect "127.0.0.1:$PORT" <"$fifo" >"$out" 2>"$out.err" &
cpid=$!
E2E_PIDS+=("$cpid")
exec 7>"$fifo"
printf 'ping-one\n' >&7
wait_until 10 grep -q '^ping-one$' "$out" || fail "drain: no echo before SIGTERM"
kill -TERM "$DAEMON_PID"
wait_until 5 grep -q 'draining: no new connections, 1 open' "$DAEMON_LOG" &&
	ok "drain: SIGTERM starts draining with 1 open connection" ||
	fail "drain: no 'draining: ... 1 open' line"
t_term=$(now_ms)
out2=$(curl_get "$PORT" www.hsmtls.test --connect-timeout 2 "https://www.hsmtls.test:$PORT/after-term" 2>&1)
rc=$?
if [ "$rc" -ne 0 ] && ! grep -q 'hello from backend' <<<"$out2"; then
	ok "drain: a new connection is refused (curl exit $rc)"
else
	fail "drain: a new connection was served: $out2"
fi
printf 'ping-two\n' >&7
if wait_until 3 grep -q '^ping-two$' "$out"; then
	ok "drain: the open connection is still served"
else
	fail "drain: the open connection got no echo after SIGTERM"
fi
check "drain: the daemon still runs while the connection is open" daemon_running
# The client ends: stdin EOF makes s_client send close_notify and exit.
exec 7>&-
t_close=$(now_ms)
if wait_until 10 daemon_exited; then
	DAEMON_RC=$(cat "$DAEMON_RC_FILE")
	t_exit=$(now_ms)
	check_eq "drain: hsmtlsd exits 0 after the last client finished" 0 "$DAEMON_RC"
	if [ $((t_exit - t_close)) -lt 2000 ] && [ $((t_exit - t_term)) -lt 5000 ]; then
		ok "drain: exit $((t_exit - t_close)) ms after the client closed, before drain_timeout (5 s)"
	else
		fail "drain: exit $((t_exit - t_close)) ms after the client closed, $((t_exit - t_term)) ms after SIGTERM"
	fi
	check_not "drain: not ended by the drain timeout" grep -q 'drain timeout: closing' "$DAEMON_LOG"
else
	fail "drain: hsmtlsd still runs 10 s after its last client closed"
	stop_daemon 5
fi
forget_pid "$DAEMON_PID"
wait "$cpid" 2>/dev/null
forget_pid "$cpid"
check_grep "usage lines at exit" "$DAEMON_LOG" 'usage: token=demo key=p256 op=sign mech=CKM_ECDSA result=ok count=[1-9]'

# --------------------------------------------------- drain timeout runs out
# A client that never finishes: the daemon gives up after drain_timeout.
sed -i 's/^drain_timeout = .*/drain_timeout = 1s/' "$conf"
start_daemon "$conf" "$E2E_DIR/hsmtlsd-2.log" || bail "second daemon did not start"
PORT=$(listener_port www)
fifo=$E2E_DIR/drain2.fifo
mkfifo "$fifo"
out=$E2E_DIR/drain2.out
"${S_CLIENT[@]}" -connect "127.0.0.1:$PORT" <"$fifo" >"$out" 2>"$out.err" &
cpid=$!
E2E_PIDS+=("$cpid")
exec 7>"$fifo"
printf 'ping\n' >&7
wait_until 10 grep -q '^ping$' "$out" || fail "drain timeout: no echo before SIGTERM"
t0=$(now_ms)
stop_daemon 10
t=$(($(now_ms) - t0))
check_eq "drain timeout: hsmtlsd exits 0" 0 "$DAEMON_RC"
if [ "$t" -ge 900 ] && [ "$t" -lt 4000 ]; then
	ok "drain timeout: exit after drain_timeout = 1s with a client still open ($t ms)"
else
	fail "drain timeout: exit after $t ms (expected about 1000)"
fi
check_grep "drain timeout: logged" "$DAEMON_LOG" 'drain timeout: closing the 1 connection'
exec 7>&-
wait_until 5 sh -c "! kill -0 $cpid 2>/dev/null" || kill "$cpid" 2>/dev/null
wait "$cpid" 2>/dev/null
forget_pid "$cpid"

e2e_finish
