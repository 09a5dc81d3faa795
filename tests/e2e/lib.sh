# tests/e2e/lib.sh - shared helpers for the end-to-end tests (source it).
#
# Environment (set by meson's test(); defaults for running a script by hand
# from a source tree built in ./build):
#   HSMTLSD   path of the hsmtlsd binary
#   BACKEND   path of the e2e backend (tests/e2e/backend.c)
#   SRCDIR    project source root (for hsm-config/provision)
#   E2E_KEEP=1          keep the temporary directory (its path is printed)
#   E2E_KEEP_ON_FAIL=1  keep it only when the script fails
#
# Conventions: every check prints "ok - ..." or "not ok - ...";
# e2e_finish exits 1 if anything failed, 0 otherwise; a missing client tool
# exits 77 (skip) with the reason. All waits are bounded polls, never blind
# sleeps. Servers bind port 0 and report the port they got.

# shellcheck disable=SC2034 # BACKEND_PORT, DAEMON_RC, ... are for the scripts that source this
set -u

E2E_NAME=$(basename "$0" .sh)
E2E_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
: "${SRCDIR:=$(cd "$E2E_HERE/../.." && pwd -P)}"
: "${HSMTLSD:=$SRCDIR/build/src/daemon/hsmtlsd}"
: "${BACKEND:=$SRCDIR/build/tests/e2e/e2e-backend}"

E2E_PASS=0
E2E_FAIL=0
E2E_PIDS=()       # processes to kill at exit (daemons, backends, clients)
E2E_DIR=""
E2E_T0=$(date +%s%N)

# ------------------------------------------------------------------ output

note() { printf '# %s\n' "$*"; }

ok() {
	E2E_PASS=$((E2E_PASS + 1))
	printf 'ok - %s\n' "$*"
}

fail() {
	E2E_FAIL=$((E2E_FAIL + 1))
	printf 'not ok - %s\n' "$*"
}

# known_bug DESC REASON: a check that fails because of a known, reported
# daemon bug: printed as a TAP TODO ("not ok - DESC # TODO REASON"), not
# counted as a failure. Remove the marker when the bug is fixed.
E2E_TODO=0
known_bug() {
	E2E_TODO=$((E2E_TODO + 1))
	printf 'not ok - %s # TODO %s\n' "$1" "$2"
}

# skipped DESC REASON: a check that cannot run on this machine (a client
# tool lacks a feature): "ok - DESC # SKIP REASON", counted apart in the
# summary line.
E2E_SKIP=0
skipped() {
	E2E_SKIP=$((E2E_SKIP + 1))
	printf 'ok - %s # SKIP %s\n' "$1" "$2"
}

# check DESC CMD...: ok if CMD succeeds (its output is hidden unless it fails).
check() {
	local desc=$1 out rc=0
	shift
	out=$("$@" 2>&1) || rc=$?
	if [ "$rc" -eq 0 ]; then
		ok "$desc"
	else
		fail "$desc (exit $rc)"
		[ -z "$out" ] || printf '%s\n' "$out" | tail -n 20 | sed 's/^/#   /'
	fi
	return "$rc"
}

# check_not DESC CMD...: ok if CMD fails.
check_not() {
	local desc=$1 out rc=0
	shift
	out=$("$@" 2>&1) || rc=$?
	if [ "$rc" -ne 0 ]; then
		ok "$desc"
		return 0
	fi
	fail "$desc (unexpectedly succeeded)"
	[ -z "$out" ] || printf '%s\n' "$out" | tail -n 20 | sed 's/^/#   /'
	return 1
}

# check_eq DESC EXPECTED ACTUAL
check_eq() {
	if [ "$2" = "$3" ]; then
		ok "$1 ($3)"
		return 0
	fi
	fail "$1: expected '$2', got '$3'"
	return 1
}

# check_grep DESC FILE ERE: FILE contains a line matching ERE.
check_grep() {
	if grep -Eq -- "$3" "$2" 2>/dev/null; then
		ok "$1"
		return 0
	fi
	fail "$1: no line matching /$3/ in $(basename "$2")"
	[ -f "$2" ] && tail -n 15 "$2" | sed 's/^/#   /'
	return 1
}

# skip REASON: the whole test is skipped (exit 77).
skip() {
	printf '1..0 # SKIP %s: %s\n' "$E2E_NAME" "$*"
	exit 77
}

# need_tools TOOL...: skip unless every tool is on PATH.
need_tools() {
	local t
	for t in "$@"; do
		command -v "$t" >/dev/null 2>&1 || skip "required client tool '$t' not found"
	done
}

# need_slowtoken: skip unless tests/slowtoken was built ($SLOWTOKEN).
need_slowtoken() {
	[ -n "${SLOWTOKEN:-}" ] && [ -f "$SLOWTOKEN" ] || skip "the slowtoken module was not built (SLOWTOKEN unset)"
}

bail() { # a broken test fixture, not a failed check: stop now
	printf 'Bail out! %s\n' "$*"
	E2E_FAIL=$((E2E_FAIL + 1))
	exit 99
}

# ------------------------------------------------------------ setup/cleanup

e2e_cleanup() {
	local rc=$? p
	for p in "${E2E_PIDS[@]}"; do
		[ -n "$p" ] || continue
		kill -KILL "$p" 2>/dev/null || true
	done
	wait 2>/dev/null || true
	if [ -n "$E2E_DIR" ] && [ -d "$E2E_DIR" ]; then
		if [ "${E2E_KEEP:-0}" = 1 ] || { [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ] && [ "${E2E_KEEP_ON_FAIL:-0}" = 1 ]; }; then
			printf '# kept %s\n' "$E2E_DIR"
		else
			rm -rf -- "$E2E_DIR"
		fi
	fi
	exit "$rc"
}

# e2e_init: checks the binaries, makes $E2E_DIR, installs the cleanup trap.
e2e_init() {
	[ -x "$HSMTLSD" ] || bail "HSMTLSD=$HSMTLSD is not an executable (build first: ninja -C build)"
	[ -x "$BACKEND" ] || bail "BACKEND=$BACKEND is not an executable (build first: ninja -C build)"
	[ -x "$SRCDIR/hsm-config/provision" ] || bail "SRCDIR=$SRCDIR has no hsm-config/provision"
	need_tools timeout sha256sum awk grep sed
	E2E_DIR=$(mktemp -d "${TMPDIR:-/tmp}/hsmtls-e2e-$E2E_NAME.XXXXXX") || bail "mktemp -d failed"
	trap e2e_cleanup EXIT
	trap 'exit 130' INT TERM
	note "$E2E_NAME: work directory $E2E_DIR"
}

# e2e_finish: summary line and exit status.
e2e_finish() {
	local ms=$((($(date +%s%N) - E2E_T0) / 1000000))
	printf '1..%d\n' $((E2E_PASS + E2E_FAIL + E2E_TODO + E2E_SKIP))
	note "$E2E_NAME: $E2E_PASS passed, $E2E_FAIL failed, $E2E_SKIP skipped, $E2E_TODO known daemon bugs (TODO), $ms ms"
	[ "$E2E_FAIL" -eq 0 ] && exit 0
	exit 1
}

# forget_pid PID: no longer killed at exit.
forget_pid() {
	local i
	for i in "${!E2E_PIDS[@]}"; do
		[ "${E2E_PIDS[$i]}" = "$1" ] && E2E_PIDS[$i]=""
	done
	return 0
}

# wait_until SECONDS CMD...: polls CMD (every 20 ms) until it succeeds; 1 on timeout.
wait_until() {
	local limit=$1 end
	shift
	end=$(($(date +%s%N) + limit * 1000000000))
	while :; do
		"$@" && return 0
		[ "$(date +%s%N)" -lt "$end" ] || return 1
		sleep 0.02
	done
}

# ------------------------------------------------------------------ token

# provision_token [DIR]: a fresh SoftHSM token; sources DIR/uris.env.
# Sets TOKEN_DIR.
provision_token() {
	TOKEN_DIR=${1:-$E2E_DIR/token}
	need_tools p11tool certtool pkcs11-tool script
	local out
	out=$("$SRCDIR/hsm-config/provision" "$TOKEN_DIR" --quiet 2>&1) || {
		printf '%s\n' "$out" | sed 's/^/#   /'
		bail "hsm-config/provision $TOKEN_DIR failed"
	}
	# shellcheck disable=SC1091
	. "$TOKEN_DIR/uris.env"
}

# ---------------------------------------------------------------- backend

# start_backend: starts the e2e backend; sets BACKEND_PID and BACKEND_PORT.
start_backend() {
	local out=$E2E_DIR/backend.out
	: >"$out"
	"$BACKEND" --quiet >"$out" 2>"$E2E_DIR/backend.err" &
	BACKEND_PID=$!
	E2E_PIDS+=("$BACKEND_PID")
	wait_until 10 grep -q '^PORT [0-9]' "$out" || bail "backend did not report its port"
	BACKEND_PORT=$(awk '/^PORT /{print $2; exit}' "$out")
}

# ----------------------------------------------------------------- daemon

# write_token_section FILE [NAME [MODULE]]: appends a [token] section for
# the provisioned token (module by path, PIN from the PIN file; MODULE,
# e.g. $SLOWTOKEN, instead of the token's own).
write_token_section() {
	cat >>"$1" <<EOF
[token ${2:-demo}]
uri = $HSMTLS_TOKEN_URI
module = ${3:-$HSMTLS_MODULE}
pin_file = $HSMTLS_PIN_FILE

EOF
}

# write_listener FILE NAME [LINE...]: appends [listener NAME] on 127.0.0.1
# port 0 in front of the e2e backend, with the provisioned P-256 certificate
# and key, then each LINE (more cert/key pairs, settings) and a blank line.
write_listener() {
	local f=$1 name=$2
	shift 2
	{
		printf '[listener %s]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\n' "$name" "$BACKEND_PORT"
		printf 'cert = %s\nkey = %s\n' "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256"
		[ $# -eq 0 ] || printf '%s\n' "$@"
		echo
	} >>"$f"
}

# write_marker_listener FILE: appends [listener marker], a listener that only
# serves usage_snapshot's marker connection (a configuration whose other
# sections are connectors needs one; no TLS is made on it).
write_marker_listener() { write_listener "$1" marker; }

# start_daemon CONF [LOG]: starts hsmtlsd -c CONF with stderr in LOG
# (default $E2E_DIR/hsmtlsd.log) and waits up to 10 s until every listener
# and connector logged "listening on" with its port (or unix path), and
# requires the daemon to be running then. Sets DAEMON_PID, DAEMON_LOG,
# DAEMON_RC_FILE. Returns 1 (and prints the log) if the daemon exited or did
# not get ready.
start_daemon() {
	local conf=$1
	DAEMON_LOG=${2:-$E2E_DIR/hsmtlsd.log}
	DAEMON_RC_FILE=$DAEMON_LOG.rc
	local pidfile=$DAEMON_LOG.pid
	rm -f -- "$DAEMON_RC_FILE" "$pidfile"
	: >"$DAEMON_LOG"
	# The subshell records the exit status; sh -c writes the pid that exec
	# then hands to hsmtlsd, so signals go to the daemon itself.
	(
		sh -c 'echo $$ >"$1"; shift; exec "$@"' sh "$pidfile" "$HSMTLSD" -c "$conf" 2>>"$DAEMON_LOG" </dev/null >/dev/null
		echo $? >"$DAEMON_RC_FILE"
	) &
	E2E_PIDS+=("$!")
	wait_until 10 test -s "$pidfile" || {
		fail "hsmtlsd did not start"
		return 1
	}
	DAEMON_PID=$(cat "$pidfile")
	E2E_PIDS+=("$DAEMON_PID")
	local n
	n=$(grep -cE '^\[(listener|connector) ' "$conf")
	if ! wait_until 10 daemon_ready "$n"; then
		fail "hsmtlsd -c $(basename "$conf") did not report $n listener(s)/connector(s) listening within 10 s"
		sed 's/^/#   /' "$DAEMON_LOG" | tail -n 20
		return 1
	fi
	if daemon_exited; then
		fail "hsmtlsd -c $(basename "$conf") exited (status $(cat "$DAEMON_RC_FILE")) instead of serving"
		sed 's/^/#   /' "$DAEMON_LOG" | tail -n 20
		forget_pid "$DAEMON_PID"
		return 1
	fi
	return 0
}

# daemon_ready N: N "listening on" lines with a port (or a unix path), or
# the daemon exited (stop waiting: start_daemon tells the two apart).
daemon_ready() {
	daemon_exited && return 0
	[ "$(grep -cE ' listening on ([^ ]*:[1-9][0-9]*|unix:/[^ ]*), ' "$DAEMON_LOG")" -ge "$1" ]
}

daemon_running() { [ ! -s "$DAEMON_RC_FILE" ]; }
daemon_exited() { [ -s "$DAEMON_RC_FILE" ]; }

# listener_port NAME: the port listener NAME got (from the log).
listener_port() {
	sed -n "s/.*listener $1: listening on .*:\([0-9][0-9]*\), backend.*/\1/p" "$DAEMON_LOG" | tail -n 1
}

# stop_daemon [SECONDS]: SIGTERM, wait up to SECONDS (default 10) for the
# exit; sets DAEMON_RC (or "timeout", after which the daemon is killed; or
# "exited before SIGTERM (status N)" when there was no daemon to signal).
stop_daemon() {
	local limit=${1:-10} gone=0
	kill -TERM "$DAEMON_PID" 2>/dev/null || gone=1
	if wait_until "$limit" daemon_exited; then
		DAEMON_RC=$(cat "$DAEMON_RC_FILE")
		[ "$gone" = 0 ] || DAEMON_RC="exited before SIGTERM (status $DAEMON_RC)"
	else
		DAEMON_RC=timeout
		kill -KILL "$DAEMON_PID" 2>/dev/null || true
		wait_until 5 daemon_exited || true
	fi
	forget_pid "$DAEMON_PID"
}

# hup DESC: SIGHUP to the daemon; waits (up to ${HUP_WAIT:-20} s) for the
# reload's verdict line logged after it ("reload of ... committed" or
# "... refused") and puts it in VERDICT (empty, and a failed check, when
# none came).
hup() {
	local off
	off=$(stat -c %s "$DAEMON_LOG")
	kill -HUP "$DAEMON_PID"
	wait_until "${HUP_WAIT:-20}" _log_after_has "$off" 'reload of .* \(committed\|refused\)' || {
		fail "$1: no reload verdict in the log"
		VERDICT=
		return 1
	}
	VERDICT=$(tail -c +$((off + 1)) "$DAEMON_LOG" | grep -m1 'reload of .* \(committed\|refused\)')
	note "$1: $VERDICT"
}

# verdict DESC PATTERN: the last reload's VERDICT matches PATTERN (grep).
verdict() {
	if printf '%s' "$VERDICT" | grep ${VERDICT_GREP:-} -q -- "$2"; then
		ok "$1"
	else
		fail "$1: the verdict does not say '$2': $VERDICT"
	fi
}

# long_open PORT FIFO OUT: a TLS connection held open (openssl s_client
# -quiet reading FIFO, writing OUT, its stderr in OUT.err); sets LONG_PID.
# The caller opens FIFO for writing (exec N>FIFO) and pings with long_ping.
long_open() {
	mkfifo "$2"
	: >"$3"
	timeout 300 openssl s_client -connect "127.0.0.1:$1" -servername www.hsmtls.test -CAfile "$HSMTLS_CA" \
		-verify_return_error -quiet <"$2" >"$3" 2>"$3.err" &
	LONG_PID=$!
	E2E_PIDS+=("$LONG_PID")
}
# long_ping DESC FD OUT: a line through the open connection comes back.
long_ping() {
	N_PING=$((${N_PING:-0} + 1))
	local line="long-$N_PING-$RANDOM"
	printf '%s\n' "$line" >&"$2" 2>/dev/null
	if wait_until 10 grep -q "^$line$" "$3"; then
		ok "$1: the connection opened before keeps passing data"
	else
		fail "$1: no echo through the connection opened before ($(tail -n 3 "$3.err" | tr '\n' ' '))"
	fi
}

# hold_client PORT: a TLS connection held open (openssl s_client reading the
# FIFO $fifo, which this shell keeps open for writing on fd 7, and writing
# $held); returns once a ping came back through it (bails if none did).
# Sets fifo, held and cpid (the client's pid).
hold_client() {
	fifo=$E2E_DIR/held.fifo
	mkfifo "$fifo"
	held=$E2E_DIR/held.out
	openssl s_client -connect "127.0.0.1:$1" -servername www.hsmtls.test -CAfile "$HSMTLS_CA" \
		-verify_return_error -nocommands <"$fifo" >"$held" 2>"$held.err" &
	cpid=$!
	E2E_PIDS+=("$cpid")
	exec 7>"$fifo"
	printf 'ping\n' >&7
	wait_until 10 grep -q '^ping$' "$held" || bail "the held client got no echo"
}

# usage_count LOGFILE KEY OP [MECH]: sum of count= over the "usage:" lines
# with result=ok for KEY/OP (and MECH) in LOGFILE (0 if none).
usage_count() {
	awk -v key="$2" -v op="$3" -v mech="${4:-}" '
		/ usage: / {
			k = ""; o = ""; m = ""; r = ""; c = 0
			for (i = 1; i <= NF; i++) {
				split($i, kv, "=")
				if (kv[1] == "key") k = kv[2]
				else if (kv[1] == "op") o = kv[2]
				else if (kv[1] == "mech") m = kv[2]
				else if (kv[1] == "result") r = kv[2]
				else if (kv[1] == "count") c = kv[2] + 0
			}
			if (k == key && o == op && r == "ok" && (mech == "" || m == mech)) sum += c
		}
		END { print sum + 0 }' "$1"
}

# usage_snapshot OUTFILE: makes the running daemon log its usage counters
# (SIGUSR1) and copies exactly those lines to OUTFILE. The end of the burst
# is found with a marker: a non-TLS connection, which the same event loop
# logs ("not a TLS handshake", log level info) after it finished the usage
# lines. Returns 1 if that did not work within 10 s.
usage_snapshot() {
	local out=$1 off
	off=$(stat -c %s "$DAEMON_LOG")
	kill -USR1 "$DAEMON_PID" || return 1
	wait_until 10 _log_after_has "$off" ' usage: ' || return 1
	_send_marker || return 1
	wait_until 10 _log_after_has "$off" 'not a TLS handshake' || return 1
	tail -c +$((off + 1)) "$DAEMON_LOG" | awk '/not a TLS handshake/{exit} / usage: /' >"$out"
}

_log_after_has() { tail -c +$(($1 + 1)) "$DAEMON_LOG" | grep -q -- "$2"; }

_send_marker() {
	local port
	port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9][0-9]*\), backend.*/\1/p' "$DAEMON_LOG" | head -n 1)
	[ -n "$port" ] || return 1
	# 5 bytes that are no TLS record header.
	timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/$1; printf "MARK\n" >&3; exec 3>&-' _ "$port" 2>/dev/null
}

# usage_delta BEFORE AFTER KEY OP [MECH]: AFTER - BEFORE counts.
usage_delta() {
	local a b
	a=$(usage_count "$1" "$3" "$4" "${5:-}")
	b=$(usage_count "$2" "$3" "$4" "${5:-}")
	echo $((b - a))
}

# ---------------------------------------------------------------- clients

# gnutls_get PORT SNI PRIORITY PATH [extra gnutls-cli args]: one handshake
# (no resumption), one HTTP request for /PATH with "Connection: close";
# prints the client's whole transcript. stdin stays open until the answer
# (or an error) is in the transcript: gnutls-cli says goodbye on stdin EOF
# and would drop an answer that had not arrived yet.
gnutls_get() {
	local port=$1 sni=$2 prio=$3 path=$4 out
	shift 4
	out=$(mktemp "$E2E_DIR/gnutls-cli.XXXXXX")
	{
		printf 'GET /%s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$sni"
		wait_until 10 grep -qE 'hello from backend|Peer has closed|\*\*\* |Error' "$out"
	} | timeout 10 gnutls-cli --x509cafile="$HSMTLS_CA" --port="$port" --sni-hostname="$sni" \
		--verify-hostname="$sni" --priority="$prio" "$@" 127.0.0.1 >"$out" 2>&1
	local rc=${PIPESTATUS[1]}
	cat "$out"
	rm -f -- "$out"
	return "$rc"
}

# openssl_get PORT SNI PATH [extra s_client args]: one handshake (no
# -sess_in, so no resumption), one HTTP request; -ign_eof keeps reading
# until the server closes.
openssl_get() {
	local port=$1 sni=$2 path=$3
	shift 3
	printf 'GET /%s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$sni" |
		timeout 10 openssl s_client -connect "127.0.0.1:$port" -servername "$sni" -verify_hostname "$sni" \
			-CAfile "$HSMTLS_CA" -verify_return_error -ign_eof "$@" 2>&1
}

# curl_get PORT HOST CURL-ARGS...: one curl process, HOST resolved to 127.0.0.1.
curl_get() {
	local port=$1 host=$2
	shift 2
	timeout 20 curl -sS --fail --cacert "$HSMTLS_CA" --resolve "$host:$port:127.0.0.1" "$@"
}

# handshakes_field FIELD: FIELD= of a fresh "handshakes: shed=" line of the
# daemon (SIGUSR1; cpu_waiting, cpu_slots_taken_back, client_waits, ...).
handshakes_field() {
	local off
	off=$(stat -c %s "$DAEMON_LOG")
	kill -USR1 "$DAEMON_PID" || return 1
	wait_until 10 sh -c "tail -c +$((off + 1)) '$DAEMON_LOG' | grep -q 'handshakes: shed='" || return 1
	tail -c +$((off + 1)) "$DAEMON_LOG" | grep 'handshakes: shed=' | tr ' ' '\n' | awk -F= -v f="$1" '$1 == f { print $2 }' | tail -n 1
}

# ------------------------------------------------------------- admin API

# admin_setup: an admin API on a unix socket: sets SOCK, ADMIN_TOKEN (a
# fresh bearer token of role admin) and ADMIN_SECTION (the [admin]
# section that serves them, for a configuration file).
admin_setup() {
	SOCK=$E2E_DIR/admin.sock
	ADMIN_TOKEN=admin-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
	ADMIN_SECTION=$(printf '[admin]\nlisten = unix:%s\ntoken = admin:ops:%s\n' "$SOCK" \
		"$(printf %s "$ADMIN_TOKEN" | sha256sum | cut -d' ' -f1)")
}

# admin_api SOCK TOKEN METHOD PATH [curl args]: one request to the admin API
# on unix socket SOCK with bearer TOKEN; prints the status, the body goes to
# $E2E_DIR/api.body (read it with api_json).
admin_api() {
	local sock=$1 tok=$2 method=$3 path=$4
	shift 4
	curl -sS --max-time 30 --unix-socket "$sock" -o "$E2E_DIR/api.body" -w '%{http_code}' -X "$method" \
		-H "Authorization: Bearer $tok" "$@" "http://hsmtlsd$path"
}

# api_json EXPR: a Python expression over the last admin_api body (d).
api_json() {
	python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {"d": d}))' "$E2E_DIR/api.body" "$1"
}

# api_sign_count TOKEN LABEL FIELD: from the last GET /v1/usage body, the
# signatures (result ok) of the key LABEL on token TOKEN, FIELD since_start
# or lifetime (0 when the key is not listed).
api_sign_count() {
	api_json "sum(c['$3'] for k in d['keys'] if k['token'] == '$1' and k['label'] == '$2' for c in k['counters'] if c['op'] == 'sign' and c['result'] == 'ok')"
}

# sighup DESC: SIGHUP to the daemon; waits for the reload's verdict line
# after it and puts it in VERDICT (empty, and a failed check, if none came).
sighup() { HUP_WAIT=${HUP_WAIT:-30} hup "$@"; }

# verdict_has DESC PATTERN: as verdict, PATTERN a grep ERE.
verdict_has() { VERDICT_GREP=-E verdict "$@"; }
