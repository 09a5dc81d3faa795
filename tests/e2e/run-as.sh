#!/usr/bin/env bash
# e2e: [global] user = / group = (privileges dropped after binding).
# Needs root (skipped otherwise, with the reason). The daemon starts as
# root with user = nobody, a [listener] and an [admin] unix socket in its
# state directory, its PIN in a root:nogroup 0640 file and a token that
# closes all sessions every 3rd signature (slowtoken), so that it logs in
# again, reading the PIN file, after the drop:
#  - /proc/PID/status: Uid and Gid are nobody's (real, effective, saved,
#    fs), Groups is nobody's own (nogroup), no capabilities;
#  - handshakes work, with re-logins after the drop;
#  - the state directory, state.db and the admin socket belong to nobody,
#    and a process running as nobody reaches the admin API;
#  - group = daemon: Gid and Groups are daemon's;
#  - chown_state follows no link: a symbolic link in the state directory is
#    left alone (its target keeps its owner), a hard link, a state_dir that
#    is a symbolic link and one that belongs to a third user refuse the start;
#  - an unknown user, an unknown group and group without user are refused
#    at start with FILE:LINE: reason; a user = for a non-root start too.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

[ "$(id -u)" = 0 ] || skip "needs root to start the daemon as root and drop to another user (runs as uid $(id -u))"
need_tools curl stat setpriv getent
[ -n "${SLOWTOKEN:-}" ] && [ -f "$SLOWTOKEN" ] || skip "the slowtoken module was not built (SLOWTOKEN unset)"
getent passwd nobody >/dev/null || skip "no user nobody"
getent group daemon >/dev/null || skip "no group daemon"
NOBODY_UID=$(id -u nobody)
NOBODY_GID=$(id -g nobody)
DAEMON_GID=$(getent group daemon | cut -d: -f3)
e2e_init
provision_token
start_backend
# The token (SoftHSM's files) is the user's after the drop; the PIN file
# stays root's, readable by the user's group (README: Configuration).
chown -R "$NOBODY_UID:$NOBODY_GID" "$E2E_DIR"
chmod 755 "$E2E_DIR"
chown "0:$NOBODY_GID" "$HSMTLS_PIN_FILE"
chmod 640 "$HSMTLS_PIN_FILE"
STATE=$E2E_DIR/state

write_conf() { # write_conf FILE USER-LINES...
	local f=$1
	shift
	{
		echo "[global]"
		echo "state_dir = $STATE"
		printf '%s\n' "$@"
		echo
		echo "[token demo]"
		echo "uri = $HSMTLS_TOKEN_URI"
		echo "module = $SLOWTOKEN"
		echo "pin_file = $HSMTLS_PIN_FILE"
		echo "max_sessions = 2"
		echo
		echo "[listener www]"
		echo "listen = 127.0.0.1:0"
		echo "backend = 127.0.0.1:$BACKEND_PORT"
		echo "cert = $HSMTLS_CERT_P256"
		echo "key = $HSMTLS_KEY_P256"
		echo
		echo "[admin]"
		echo "token = read:viewer:$(printf %s "not-a-secret" | sha256sum | cut -d' ' -f1)"
	} >"$f"
	chmod 644 "$f"
}

# status_field NAME: the values of NAME: in /proc/PID/status, space-separated.
status_field() { awk -v f="$1:" '$1 == f { s = ""; for (i = 2; i <= NF; i++) s = s (i > 2 ? " " : "") $i; print s }' "/proc/$DAEMON_PID/status"; }

handshakes() { # handshakes N: how many of N curl requests got the backend's answer
	local oks=0 i
	for i in $(seq "$1"); do
		curl_get "$port" www.hsmtls.test "https://www.hsmtls.test:$port/r$i" 2>/dev/null | grep -q 'hello from backend' &&
			oks=$((oks + 1))
	done
	echo "$oks"
}

# ---- user = nobody
conf=$E2E_DIR/run-as.conf
write_conf "$conf" "user = nobody"
HSMTLS_SLOWTOKEN_MODULE=$HSMTLS_MODULE HSMTLS_SLOWTOKEN_CLOSE_SESSIONS_EVERY=3 \
	start_daemon "$conf" || bail "the daemon did not start"
port=$(listener_port www)
check_grep "it says whom it runs as" "$DAEMON_LOG" "running as user nobody \\(uid $NOBODY_UID, gid $NOBODY_GID, 1 supplementary group\\)"
check_eq "Uid: real, effective, saved, fs are nobody's" "$NOBODY_UID $NOBODY_UID $NOBODY_UID $NOBODY_UID" "$(status_field Uid)"
check_eq "Gid: nobody's group" "$NOBODY_GID $NOBODY_GID $NOBODY_GID $NOBODY_GID" "$(status_field Gid)"
check_eq "Groups: nobody's own, not root's" "$NOBODY_GID" "$(status_field Groups)"
check_eq "no effective capabilities" 0000000000000000 "$(status_field CapEff)"
check_eq "no permitted capabilities" 0000000000000000 "$(status_field CapPrm)"
check_eq "six handshakes succeed" 6 "$(handshakes 6)"
check_grep "with re-logins after the drop (the PIN file read as nobody)" "$DAEMON_LOG" 'session lost .*reopening'
check_eq "the state directory is nobody's" "$NOBODY_UID" "$(stat -c %u "$STATE")"
check_eq "state.db is nobody's" "$NOBODY_UID" "$(stat -c %u "$STATE/state.db")"
check_eq "the admin socket is nobody's" "$NOBODY_UID" "$(stat -c %u "$STATE/admin.sock")"
check "a process running as nobody reaches the admin API" \
	setpriv --reuid="$NOBODY_UID" --regid="$NOBODY_GID" --clear-groups -- \
	curl -sS --fail --max-time 10 --unix-socket "$STATE/admin.sock" http://hsmtlsd/v1/live
stop_daemon
check_eq "it exits cleanly (the usage totals written as nobody)" 0 "$DAEMON_RC"
check_not "no error at exit" grep -q 'error:' "$DAEMON_LOG"

# ---- user = nobody, group = daemon; and a second start over the same state
write_conf "$conf" "user = nobody" "group = daemon"
HSMTLS_SLOWTOKEN_MODULE=$HSMTLS_MODULE start_daemon "$conf" "$E2E_DIR/hsmtlsd-2.log" || bail "the daemon did not start with group = daemon"
port=$(listener_port www)
check_eq "group = daemon: Gid" "$DAEMON_GID $DAEMON_GID $DAEMON_GID $DAEMON_GID" "$(status_field Gid)"
check_eq "group = daemon: Groups (nobody's with group daemon)" "$DAEMON_GID" "$(status_field Groups)"
check_eq "group = daemon: Uid" "$NOBODY_UID $NOBODY_UID $NOBODY_UID $NOBODY_UID" "$(status_field Uid)"
check_eq "two handshakes succeed" 2 "$(handshakes 2)"
stop_daemon
check_eq "it exits cleanly" 0 "$DAEMON_RC"

# ---- a PIN file that belongs to the user (0600): read by root at the
# start (the daemon's user may own it) and by the user after the drop
chown "$NOBODY_UID:$NOBODY_GID" "$HSMTLS_PIN_FILE"
chmod 600 "$HSMTLS_PIN_FILE"
HSMTLS_SLOWTOKEN_MODULE=$HSMTLS_MODULE start_daemon "$conf" "$E2E_DIR/hsmtlsd-pin.log" ||
	fail "the daemon did not start with a PIN file of its user (0600)"
port=$(listener_port www)
check_eq "a PIN file of the daemon's user: two handshakes succeed" 2 "$(handshakes 2)"
stop_daemon
chown "0:$NOBODY_GID" "$HSMTLS_PIN_FILE"
chmod 640 "$HSMTLS_PIN_FILE"

# ---- the state directory may be the user's: root follows no link in it
# (chown_state): a symbolic link is left alone, a hard link refuses the
# start, and so do a state_dir that is a symbolic link and one that belongs
# to a third user; no file outside changes its owner.
OUTSIDE=$E2E_DIR/outside
mkdir "$OUTSIDE"
echo not-the-users >"$OUTSIDE/linked"
echo not-the-users >"$OUTSIDE/hard"
chown 0:0 "$OUTSIDE" "$OUTSIDE/linked" "$OUTSIDE/hard"
owners() { stat -c %u "$OUTSIDE" "$OUTSIDE/linked" "$OUTSIDE/hard" | tr '\n' ' '; }
STATE=$E2E_DIR/state-users
mkdir "$STATE"
chown "$NOBODY_UID:$NOBODY_GID" "$STATE"
ln -s "$OUTSIDE/linked" "$STATE/symlink"
ln "$OUTSIDE/hard" "$STATE/hardlink"
start_refused() { # DESC REGEX: hsmtlsd -c $conf exits 1 with a line matching REGEX
	local out rc=0
	out=$(HSMTLS_SLOWTOKEN_MODULE=$HSMTLS_MODULE timeout 20 "$HSMTLSD" -c "$conf" 2>&1 </dev/null) || rc=$?
	if [ "$rc" = 1 ] && printf '%s\n' "$out" | grep -qE -- "$2"; then
		ok "$1"
	else
		fail "$1 (exit $rc)"
		printf '%s\n' "$out" | tail -n 5 | sed 's/^/#   /'
	fi
}
write_conf "$conf" "user = nobody"
start_refused "a hard link in the state directory refuses the start" \
	"state directory $STATE: hardlink has 2 hard links: it may be a file outside the directory"
check_eq "no file outside the state directory changed its owner" "0 0 0 " "$(owners)"
rm "$STATE/hardlink"
HSMTLS_SLOWTOKEN_MODULE=$HSMTLS_MODULE start_daemon "$conf" "$E2E_DIR/hsmtlsd-3.log" ||
	fail "the daemon did not start with a symbolic link in its state directory"
check_grep "the symbolic link is left alone" "$DAEMON_LOG" "state directory $STATE: symlink is a symbolic link: left alone"
check_eq "its target outside keeps its owner" "0 0 0 " "$(owners)"
check_eq "state.db is nobody's" "$NOBODY_UID" "$(stat -c %u "$STATE/state.db")"
stop_daemon
ln -s "$OUTSIDE" "$E2E_DIR/state-link"
STATE=$E2E_DIR/state-link
write_conf "$conf" "user = nobody"
start_refused "a state_dir that is a symbolic link refuses the start" \
	"state directory $STATE: cannot open it without following a link: it is a symbolic link"
check_eq "the directory it points to keeps its owner" "0 0 0 " "$(owners)"
STATE=$E2E_DIR/state-third
mkdir "$STATE"
chown "1:1" "$STATE"
write_conf "$conf" "user = nobody"
start_refused "a state directory of a third user refuses the start" \
	"state directory $STATE belongs to uid 1, neither root nor user nobody"
check_eq "and keeps its owner" 1 "$(stat -c %u "$STATE")"
STATE=$E2E_DIR/state

# ---- refused at start
refused() { # refused DESC CONF LINE REGEX: hsmtlsd -c CONF exits 1 with CONF:LINE: REGEX
	local out rc=0
	out=$(timeout 20 "$HSMTLSD" -c "$2" 2>&1 </dev/null) || rc=$?
	if [ "$rc" = 1 ] && printf '%s\n' "$out" | grep -qE -- "$(basename "$2"):$3: $4"; then
		ok "$1"
	else
		fail "$1 (exit $rc)"
		printf '%s\n' "$out" | tail -n 5 | sed 's/^/#   /'
	fi
}
bad=$E2E_DIR/bad.conf
write_conf "$bad" "user = hsmtls-no-such-user"
refused "an unknown user is refused with file:line" "$bad" 3 "user = hsmtls-no-such-user: unknown user"
write_conf "$bad" "user = nobody" "group = hsmtls-no-such-group"
refused "an unknown group is refused with file:line" "$bad" 4 "group = hsmtls-no-such-group: unknown group"
write_conf "$bad" "group = daemon"
refused "group without user is refused" "$bad" 3 "group = daemon needs user = too"
write_conf "$bad" "user = root"
refused "user = root is refused (nothing would be dropped)" "$bad" 3 "user = root is root"
write_conf "$bad" "user = daemon"
out=$(setpriv --reuid="$NOBODY_UID" --regid="$NOBODY_GID" --clear-groups -- timeout 20 "$HSMTLSD" -c "$bad" 2>&1 </dev/null)
rc=$?
if [ "$rc" = 1 ] && printf '%s\n' "$out" | grep -qE "bad.conf:3: user = daemon: hsmtlsd must start as root"; then
	ok "started as nobody with user = daemon: refused with file:line"
else
	fail "started as nobody with user = daemon: exit $rc"
	printf '%s\n' "$out" | tail -n 5 | sed 's/^/#   /'
fi
e2e_finish
