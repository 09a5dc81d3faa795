#!/usr/bin/env bash
# e2e: listener slots across reloads (README, Reload), with connections held
# open on the slots that drain:
#  - a listener replaced on its socket (settings changed) and then removed
#    by a later reload: the connection still open on its first slot is
#    closed at that reload's drain_timeout (not left to idle_timeout);
#  - handshake counters belong to the listener's name: the replaced
#    listener's new slot goes on counting, a slot freed and reused for
#    another name starts at 0 for it (/metrics and state.db rows);
#  - while a replaced listener drains, /metrics has one series per label
#    set (its session cache and its successor's are merged) and
#    promtool check metrics accepts it;
#  - a refused reload leaves live sockets alone: a listener's
#    TCP_DEFER_ACCEPT (read from the daemon's socket with pidfd_getfd, as
#    root) keeps the old handshake_timeout's value, a unix-socket listener
#    whose path another new listener names under another spelling still
#    accepts, and a unix socket the refused reload bound is removed.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

need_tools openssl curl mkfifo python3 sqlite3 promtool
trap '' PIPE
e2e_init
provision_token
start_backend

STATE=$E2E_DIR/state
SOCK=$E2E_DIR/admin.sock
USOCK=$E2E_DIR/u.sock
ADMIN_TOKEN=admin-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
sha() { printf %s "$1" | sha256sum | cut -d' ' -f1; }

conf=$E2E_DIR/hsmtlsd.conf
# listener NAME LISTEN [EXTRA]: one [listener] section on the P-256 chain.
listener() {
	printf '\n[listener %s]\nlisten = %s\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\n%s\n' "$1" "$2" "$BACKEND_PORT" \
		"$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256" "${3:-}"
}
# write_conf SECTIONS: [global], [token], SECTIONS, [admin].
write_conf() {
	{
		printf '[global]\nlog_level = info\ndrain_timeout = %s\nstate_dir = %s\n\n' "${DRAIN:-30s}" "$STATE"
		printf '[token demo]\nuri = %s\nmodule = %s\npin_file = %s\n\n' "$HSMTLS_TOKEN_URI" "$HSMTLS_MODULE" "$HSMTLS_PIN_FILE"
		printf '%s\n' "$1"
		printf '[admin]\nlisten = unix:%s\ntoken = admin:ops:%s\n\n' "$SOCK" "$(sha "$ADMIN_TOKEN")"
	} >"$conf.new"
	mv "$conf.new" "$conf"
}

metrics() { # the /metrics text in $E2E_DIR/metrics.txt; its status
	curl -sS --max-time 30 --unix-socket "$SOCK" -o "$E2E_DIR/metrics.txt" -w '%{http_code}' \
		-H "Authorization: Bearer $ADMIN_TOKEN" http://hsmtlsd/metrics
}
# hs_total NAME: the listener's successful handshakes in /metrics (every version)
hs_total() {
	metrics >/dev/null
	awk -v l="$1" 'index($0, "hsmtls_handshakes_total{listener=\"" l "\",") == 1 && /result="ok"/ { s += $NF } END { print s + 0 }' \
		"$E2E_DIR/metrics.txt"
}
# db_total NAME: the listener's successful handshakes in state.db (0: no row)
db_total() {
	sqlite3 "$STATE/state.db" "SELECT coalesce(sum(count), 0) FROM handshakes WHERE listener = '$1' AND result = 'ok'" 2>/dev/null
}
handshakes() { # PORT N: N handshakes with one request each
	local i
	for i in $(seq "$2"); do
		openssl_get "$1" www.hsmtls.test "hs-$i" </dev/null 2>/dev/null | grep -q 'hello from backend' ||
			fail "handshake $i on port $1"
	done
}
# duplicates FILE: the series (name and labels) that appear twice
duplicates() { grep -v '^#' "$1" | sed 's/ [^ ]*$//' | sort | uniq -d; }

unix_serves() { # PATH: a TLS handshake and a request through the unix socket
	printf 'GET /u HTTP/1.1\r\nHost: www.hsmtls.test\r\nConnection: close\r\n\r\n' |
		timeout 10 openssl s_client -unix "$1" -servername www.hsmtls.test -CAfile "$HSMTLS_CA" -verify_return_error \
			-ign_eof 2>/dev/null | grep -q 'hello from backend'
}
# defer_accept PORT: TCP_DEFER_ACCEPT of the daemon's listening socket on
# PORT (pidfd_getfd needs root: the daemon is not dumpable).
defer_accept() {
	python3 - "$DAEMON_PID" "$1" <<'PY'
import ctypes, os, socket, sys
pid, port = int(sys.argv[1]), int(sys.argv[2])
inodes = set()
with open(f"/proc/{pid}/net/tcp") as f:
    for line in f.readlines()[1:]:
        x = line.split()
        if x[3] == "0A" and int(x[1].split(":")[1], 16) == port:
            inodes.add(x[9])
target = None
for fd in os.listdir(f"/proc/{pid}/fd"):
    try:
        t = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        continue
    if t.startswith("socket:[") and t[8:-1] in inodes:
        target = int(fd)
if target is None:
    sys.exit("no listening socket on port %d" % port)
libc = ctypes.CDLL(None, use_errno=True)
pidfd = os.pidfd_open(pid)
nfd = libc.syscall(438, pidfd, target, 0)  # pidfd_getfd
if nfd < 0:
    sys.exit("pidfd_getfd: " + os.strerror(ctypes.get_errno()))
s = socket.socket(fileno=nfd)
print(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT))
s.close()
PY
}

# ------------------------------------------------ start: a, b, u
write_conf "$(listener a 127.0.0.1:0)$(listener b 127.0.0.1:0)$(listener u "unix:$USOCK")"
start_daemon "$conf" || bail "daemon did not start"
wait_until 10 grep -q 'admin: listening on' "$DAEMON_LOG" || bail "the admin API did not start"
PA=$(listener_port a)
PB=$(listener_port b)
handshakes "$PA" 3
handshakes "$PB" 2
long_open "$PA" "$E2E_DIR/a1.in" "$E2E_DIR/a1.out"
HELD_PID=$LONG_PID
exec 7>"$E2E_DIR/a1.in"
long_ping "a" 7 "$E2E_DIR/a1.out"
A_BEFORE=$(hs_total a)
check_eq "a: its handshakes and the held connection's are counted" 4 "$A_BEFORE"
check_eq "b: 2 handshakes" 2 "$(hs_total b)"

# ------------------------------------------------ a replaced on its socket: counts go on, one series per name
write_conf "$(listener a 127.0.0.1:0 'idle_timeout = 299s')$(listener b 127.0.0.1:0)$(listener u "unix:$USOCK")"
hup "a: idle_timeout changed"
verdict "a: replaced on its socket" "settings changed: a (idle_timeout; same socket)"
check_eq "a: the same port" "$PA" "$(listener_port a)"
check_eq "a: the new slot goes on with the name's counts" "$A_BEFORE" "$(hs_total a)"
handshakes "$PA" 1
check_eq "a: and counts on (one more)" $((A_BEFORE + 1)) "$(hs_total a)"
check_eq "metrics while a drains: 200" 200 "$(metrics)"
check_grep "metrics while a drains: a's session cache is there" "$E2E_DIR/metrics.txt" '^hsmtls_session_cache_max_entries\{listener="a"\}'
dups=$(duplicates "$E2E_DIR/metrics.txt")
check_eq "metrics while a drains: no series twice" "" "$dups"
check "promtool check metrics accepts /metrics while a drains" sh -c "promtool check metrics <'$E2E_DIR/metrics.txt'"
long_ping "a replaced: on its first slot" 7 "$E2E_DIR/a1.out"

# ------------------------------------------------ a and b removed: every slot of a drains
A_TOTAL=$(hs_total a)
DRAIN=1s write_conf "$(listener u "unix:$USOCK")"
hup "a and b removed, drain_timeout 1 s"
verdict "a and b removed: a" "committed.*removed: .*a (0 open, draining)"
verdict "a and b removed: b" "committed.*removed: .*b (0 open, draining)"
check "a: the connection held on its first slot is closed at the 1 s drain_timeout of the reload that removed a (within 20 s)" \
	wait_until 20 sh -c "! kill -0 $HELD_PID 2>/dev/null"
check_grep "a: the drain timeout of its first slot is logged" "$DAEMON_LOG" \
	'listener a: removed by the reload: drain timeout: closing the 1 connection still open'
exec 7>&-
wait_until 20 sh -c "[ \$(grep -c 'listener a: removed by the reload: drained, closed' '$DAEMON_LOG') -ge 2 ]" &&
	ok "a: both of its slots are freed" || fail "a: not both of its slots were freed"
wait_until 20 grep -q 'listener b: removed by the reload: drained, closed' "$DAEMON_LOG" &&
	ok "b: its slot is freed" || fail "b: its slot was not freed"

# ------------------------------------------------ c added in a freed slot: counted from 0, under its own name
write_conf "$(listener c 127.0.0.1:0)$(listener u "unix:$USOCK")"
hup "c added"
verdict "c added" "added: c"
PC=$(listener_port c)
check_eq "c: a reused slot starts at 0 for its new name" 0 "$(hs_total c)"
handshakes "$PC" 2
check_eq "c: its own handshakes" 2 "$(hs_total c)"
wait_until 10 sh -c "[ \"\$(sqlite3 '$STATE/state.db' \"SELECT coalesce(sum(count), 0) FROM handshakes WHERE listener = 'c' AND result = 'ok'\" 2>/dev/null)\" = 2 ]"
check_eq "state.db: c's rows (a name a reload added is written)" 2 "$(db_total c)"
check_eq "state.db: a's rows keep a's handshakes (both slots), none of c's" "$A_TOTAL" "$(db_total a)"
check_eq "state.db: b's rows keep b's handshakes, none of c's" 2 "$(db_total b)"

# ------------------------------------------------ a refused reload leaves live sockets alone
unix_serves "$USOCK" && ok "u: serves on its unix socket" || fail "u: does not serve on $USOCK"
root_checks=0
if [ "$(id -u)" = 0 ] && DA0=$(defer_accept "$PC" 2>"$E2E_DIR/defer.err"); then
	root_checks=1
	note "c: TCP_DEFER_ACCEPT $DA0 (handshake_timeout 10 s)"
else
	skipped "TCP_DEFER_ACCEPT of a live socket" "pidfd_getfd needs root ($(cat "$E2E_DIR/defer.err" 2>/dev/null))"
fi
# c changed (taken over on its socket), a new unix listener v (bound), u2 at
# u's path spelled with '//', then a listener whose certificate file is missing.
write_conf "$(listener c 127.0.0.1:0 'handshake_timeout = 1s')$(listener u "unix:$USOCK")$(listener v "unix:$E2E_DIR/v.sock")$(listener u2 "unix:$E2E_DIR//u.sock")$(printf '\n[listener bad]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s/no-such.pem\nkey = %s\n' "$BACKEND_PORT" "$E2E_DIR" "$HSMTLS_KEY_P256")"
hup "refused after c's, u's and v's steps"
verdict "refused" "refused, nothing changed"
verdict "refused: u2 may not take u's socket file" "listener u2: cannot listen on unix:$E2E_DIR//u.sock: that is the socket of listener u already"
unix_serves "$USOCK" && ok "u: still serves on its unix socket after the refused reload" ||
	fail "u: its unix socket $USOCK no longer serves after a refused reload"
check_not "v: the socket file the refused reload bound is removed" test -e "$E2E_DIR/v.sock"
if [ "$root_checks" = 1 ]; then
	check_eq "c: TCP_DEFER_ACCEPT of its live socket is unchanged by the refused reload" "$DA0" "$(defer_accept "$PC")"
fi
check_eq "c: still serves on its port" 1 "$(openssl_get "$PC" www.hsmtls.test after </dev/null 2>/dev/null | grep -c 'hello from backend')"
write_conf "$(listener c 127.0.0.1:0 'handshake_timeout = 1s')$(listener u "unix:$USOCK")"
hup "c's handshake_timeout committed"
verdict "c replaced on its socket" "settings changed: c (handshake_timeout; same socket)"
if [ "$root_checks" = 1 ]; then
	DA1=$(defer_accept "$PC")
	[ "$DA1" != "$DA0" ] && ok "c: a committed reload sets TCP_DEFER_ACCEPT from the new handshake_timeout ($DA0 -> $DA1)" ||
		fail "c: TCP_DEFER_ACCEPT stayed $DA0 after the new handshake_timeout was committed"
fi

stop_daemon 40
check_eq "hsmtlsd exits 0" 0 "$DAEMON_RC"
e2e_finish
