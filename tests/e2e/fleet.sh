#!/usr/bin/env bash
# e2e: session tickets shared by a fleet through ticket keys derived on the
# token (ticket_key). Three daemons on one SoftHSM token (provision's
# generic secret keys ticket-a and ticket-b), p256 on the token, PROXY v2:
#   A: [listener web] ticket_key = ticket-a; [listener solo] (no ticket_key)
#   B: [global] ticket_key = ticket-a; [listener web] (inherits it),
#      [listener web2] ticket_key = ticket-b, [listener other] (ticket-a)
#   C: [listener web] with no ticket_key (a random key per process)
# Checks: a TLS 1.3 and a TLS 1.2 ticket from A's web resumes on B's web
# with no token operation on B (usage counters); it does not resume (a
# full handshake, one signature) on B's web2 (another ticket_key), on B's
# other (another listener name, same key), on C's web (no ticket_key); a
# ticket of A's solo (random key) does not resume on B; A restarted
# resumes its own earlier tickets. A ticket_key that names no secret key,
# or a private key, stops the start with the reason.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=lib-mtls.sh
. "$(dirname "$0")/lib-mtls.sh"

need_tools openssl
e2e_init
provision_token_with --client-keys
[ -n "${HSMTLS_TICKET_KEY_A:-}" ] && [ -n "${HSMTLS_TICKET_KEY_B:-}" ] ||
	bail "provision did not write HSMTLS_TICKET_KEY_A/_B to uris.env"
start_backend

# listener NAME [EXTRA]: a [listener] section.
listener() {
	printf '[listener %s]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:%s\ncert = %s\nkey = %s\nproxy_protocol = v2\n%s\n\n' \
		"$1" "$BACKEND_PORT" "$HSMTLS_CERT_P256" "$HSMTLS_KEY_P256" "${2:-}"
}
mkconf() { # FILE GLOBAL-EXTRA: [global] and [token]
	printf '[global]\nlog_level = info\ndrain_timeout = 5s\n%s\n\n' "${2:-}" >"$1"
	write_token_section "$1"
}
mkconf "$E2E_DIR/a.conf"
{ listener web "ticket_key = $HSMTLS_TICKET_KEY_A"; listener solo; } >>"$E2E_DIR/a.conf"
mkconf "$E2E_DIR/b.conf" "ticket_key = $HSMTLS_TICKET_KEY_A"
{ listener web; listener web2 "ticket_key = $HSMTLS_TICKET_KEY_B"; listener other; } >>"$E2E_DIR/b.conf"
mkconf "$E2E_DIR/c.conf"
listener web >>"$E2E_DIR/c.conf"

declare -A P=()
start_one() { # PREFIX CONF LISTENERS...
	local d=$1 conf=$2 n
	shift 2
	start_daemon "$conf" "$E2E_DIR/$d.log" || bail "daemon $d did not start"
	wait_ready || bail "daemon $d did not log 'ready:'"
	save_daemon "$d"
	for n in "$@"; do
		P[$d-$n]=$(listener_port "$n")
		[ -n "${P[$d-$n]}" ] || bail "no port for listener $n of $d"
	done
}
start_one A "$E2E_DIR/a.conf" web solo
check_grep "A: the ticket key of web is derived on the token" "$A_LOG" \
	"listener web: session ticket key derived on token [^ ]+ from .*object=ticket-a"
start_one B "$E2E_DIR/b.conf" web web2 other
check_grep "B: web inherits [global] ticket_key" "$B_LOG" "listener web: session ticket key derived on token .*object=ticket-a"
check_grep "B: web2 has its own ticket_key" "$B_LOG" "listener web2: session ticket key derived on token .*object=ticket-b"
start_one C "$E2E_DIR/c.conf" web
check_not "C: no ticket_key, nothing derived" grep -q 'session ticket key derived' "$C_LOG"

# ossl DAEMON-LISTENER PATH VER, reused, answered, ops: lib-mtls.sh
SNAP=0
snap() { # DAEMON: a usage snapshot of it in SNAP_FILE
	SNAP=$((SNAP + 1))
	use_daemon "$1"
	usage_snapshot "$E2E_DIR/usage.$SNAP" || bail "cannot read the usage counters of $1"
	SNAP_FILE=$E2E_DIR/usage.$SNAP
}
# offer DESC SESSION TARGET WANT(yes|no): resumed with no token operation
# on TARGET's daemon, or a full handshake there (one signature).
offer() {
	local desc=$1 sess=$2 target=$3 want=$4 ver=$5 d=${3%%-*} b a n
	snap "$d"; b=$SNAP_FILE
	ossl "$target" "o-$sess-$target" "$ver" -sess_in "$E2E_DIR/s-$sess"
	snap "$d"; a=$SNAP_FILE
	n=$(($(ops "$a") - $(ops "$b")))
	if [ "$want" = yes ] && reused && answered "o-$sess-$target" && [ "$n" = 0 ]; then
		ok "$desc: resumed, no token operation on $d"
	elif [ "$want" = no ] && ! reused && answered "o-$sess-$target" && [ "$(usage_delta "$b" "$a" p256 sign)" = 1 ]; then
		ok "$desc: full handshake (one signature on $d)"
	else
		fail "$desc: want resumed=$want: reused=$(reused && echo yes || echo no), answered=$(answered "o-$sess-$target" && echo yes || echo no), exit $RC, $n token operations on $d"
	fi
}

for v in 1.3 1.2; do
	note "TLS $v"
	ossl A-web "a-web-$v" "$v" -sess_out "$E2E_DIR/s-aweb-$v"
	{ answered "a-web-$v" && [ -s "$E2E_DIR/s-aweb-$v" ]; } || bail "TLS $v on A's web failed (exit $RC)"
	if [ "$v" = 1.2 ]; then
		openssl sess_id -in "$E2E_DIR/s-aweb-$v" -noout -text | grep -q 'TLS session ticket:' ||
			bail "A's web gave no TLS 1.2 ticket"
	fi
	ossl A-solo "a-solo-$v" "$v" -sess_out "$E2E_DIR/s-asolo-$v"
	answered "a-solo-$v" || bail "TLS $v on A's solo failed"
	offer "TLS $v: A's web ticket on A's web" "aweb-$v" A-web yes "$v"
	offer "TLS $v: A's web ticket on B's web (same token key, same listener name)" "aweb-$v" B-web yes "$v"
	offer "TLS $v: A's web ticket on B's web2 (another ticket_key)" "aweb-$v" B-web2 no "$v"
	offer "TLS $v: A's web ticket on B's other (same key, another listener name)" "aweb-$v" B-other no "$v"
	offer "TLS $v: A's web ticket on C's web (no ticket_key)" "aweb-$v" C-web no "$v"
done
# A's solo has a random key: even B's web with ticket_key cannot read it.
offer "TLS 1.3: A's solo ticket (random key) on B's web" asolo-1.3 B-web no 1.3

# A restarted: the same key again, so its earlier tickets still resume.
use_daemon A
stop_daemon 10
check_eq "A exits 0 on SIGTERM" 0 "$DAEMON_RC"
start_one A "$E2E_DIR/a.conf" web solo
offer "TLS 1.3: a ticket from before A's restart, on the restarted A" aweb-1.3 A-web yes 1.3

for d in A B C; do
	use_daemon "$d"
	stop_daemon 10
	check_eq "$d exits 0 on SIGTERM" 0 "$DAEMON_RC"
done

# ------------------------------------------------ refused ticket keys
bad_key() { # DESC URI WANT-REGEX
	local conf=$E2E_DIR/bad.conf log=$E2E_DIR/bad.log rc=0
	mkconf "$conf"
	listener web "ticket_key = $2" >>"$conf"
	timeout 20 "$HSMTLSD" -c "$conf" >/dev/null 2>"$log" </dev/null || rc=$?
	if [ "$rc" != 0 ] && [ "$rc" != 124 ] && grep -qE "$3" "$log"; then
		ok "$1: hsmtlsd refuses to start (status $rc): $(grep -E "$3" "$log" | head -n 1 | cut -c1-160)"
	else
		fail "$1: status $rc, log: $(tail -n 3 "$log" | tr '\n' ' ')"
	fi
}
bad_key "ticket_key naming no key" "${HSMTLS_TICKET_KEY_A/ticket-a/nosuch}" 'bad\.conf:[0-9]+: \[listener web\]: ticket_key .*no secret key on token'
bad_key "ticket_key naming a private key" "$HSMTLS_KEY_P256" 'ticket_key .*another type than type=secret-key'
e2e_finish
