# tests/e2e/lib-mtls.sh - helpers for the client-certificate, connector and
# PROXY v2 tests (client-auth.sh, connector.sh, mtls-chain.sh) and the
# resumption tests (resumption.sh, sessions.sh, fleet.sh). Source it
# after lib.sh.
#
# shellcheck shell=bash
# shellcheck disable=SC2034 # TOKEN_DIR, DAEMON_* are for the scripts that source this

# provision_token_with OPTION...: like provision_token (lib.sh), with options
# for hsm-config/provision (--client-keys, --file-keys). Sets TOKEN_DIR and
# sources TOKEN_DIR/uris.env.
provision_token_with() {
	TOKEN_DIR=$E2E_DIR/token
	need_tools p11tool certtool pkcs11-tool script
	local out
	out=$("$SRCDIR/hsm-config/provision" "$TOKEN_DIR" --quiet "$@" 2>&1) || {
		printf '%s\n' "$out" | sed 's/^/#   /'
		bail "hsm-config/provision $TOKEN_DIR $* failed"
	}
	# shellcheck disable=SC1091
	. "$TOKEN_DIR/uris.env"
	[ -n "${HSMTLS_CLIENTKEY_P256:-}" ] || bail "provision did not write the client key settings to uris.env"
}

# free_port: a TCP port on 127.0.0.1 that was free a moment ago (for servers
# that need a fixed port, such as gnutls-serv); callers retry on
# "address in use".
free_port() { "$BACKEND" --free-port; }

# connector_port NAME: the local port connector NAME got (from the log).
connector_port() {
	sed -n "s/.*connector $1: listening on .*:\([0-9][0-9]*\), TLS to .*/\1/p" "$DAEMON_LOG" | tail -n 1
}

# wait_ready: waits (10 s) for the daemon's "ready:" line, logged after every
# listener and connector is listening. start_daemon (lib.sh) counts only
# [listener] sections; connectors need this.
wait_ready() {
	wait_until 10 _ready_or_exited && grep -q ' ready: ' "$DAEMON_LOG"
}
_ready_or_exited() { daemon_exited || grep -q ' ready: ' "$DAEMON_LOG"; }

# save_daemon PREFIX / use_daemon PREFIX: keep the DAEMON_* variables of one
# of several daemons (start_daemon and stop_daemon work on DAEMON_*).
save_daemon() {
	printf -v "${1}_PID" '%s' "$DAEMON_PID"
	printf -v "${1}_LOG" '%s' "$DAEMON_LOG"
	printf -v "${1}_RC_FILE" '%s' "$DAEMON_RC_FILE"
}
use_daemon() {
	local v
	v=${1}_PID && DAEMON_PID=${!v}
	v=${1}_LOG && DAEMON_LOG=${!v}
	v=${1}_RC_FILE && DAEMON_RC_FILE=${!v}
}

# exit_usage LOG OUT: the usage lines logged at exit (after "stopped:").
exit_usage() { awk '/ stopped: /{f=1} f && / usage: /' "$1" >"$2"; }

# ------------------------------------------------------- resumption
# (resumption.sh, sessions.sh, fleet.sh: ports by listener name in P)

# ossl LISTENER PATH VER [s_client args]: one openssl s_client connection to
# port ${P[LISTENER]} with one request (TLS VER: 1.2 or 1.3); sets OUT and RC.
ossl() {
	local port=${P[$1]} path=$2 ver=$3
	shift 3
	RC=0
	OUT=$(openssl_get "$port" www.hsmtls.test "$path" "-tls${ver/./_}" "$@") || RC=$?
}
# reused: the last ossl resumed its session; answered PATH: the backend answered it.
reused() { grep -q '^Reused, TLSv' <<<"$OUT"; }
answered() { grep -q "^hello from backend: GET /$1 HTTP/1.1" <<<"$OUT"; }
# show_out: the last ossl's output without the hex and PEM dumps (15 lines).
show_out() { tr -d '\r' <<<"$OUT" | grep -vE '^ *[0-9a-f]{4} - |^[A-Za-z0-9+/=]{64}$' | tail -n 15 | sed 's/^/#   /'; }
# ops FILE: all token operations in a usage snapshot (any key, operation,
# result).
ops() { awk '/ usage: /{for (i = 1; i <= NF; i++) {split($i, kv, "="); if (kv[1] == "count") s += kv[2]}} END {print s + 0}' "$1"; }

# ------------------------------------------------------- certificates

# cert_sha256 FILE: SHA-256 fingerprint of the first certificate in FILE,
# lower-case hex without colons (openssl; certtool if openssl is missing).
cert_sha256() {
	if command -v openssl >/dev/null 2>&1; then
		openssl x509 -in "$1" -noout -fingerprint -sha256 | sed 's/.*=//; s/://g' | tr 'A-F' 'a-f'
	else
		certtool -i --infile "$1" | awk '/Fingerprint:/{f=1} f && /sha256:/{sub(/.*sha256:/, ""); print; exit}' |
			tr -d ': ' | tr 'A-F' 'a-f'
	fi
}

# cert_sha256_certtool FILE: the same, computed by certtool (a cross-check).
cert_sha256_certtool() {
	certtool -i --infile "$1" | awk '/Fingerprint:/{f=1} f && /sha256:/{sub(/.*sha256:/, ""); print; exit}' |
		tr -d ': ' | tr 'A-F' 'a-f'
}

# cert_subject FILE: RFC 4514 (RFC 2253) subject of the first certificate.
cert_subject() { openssl x509 -in "$1" -noout -subject -nameopt RFC2253 | sed 's/^subject=//'; }

# cert_cn FILE: its common name.
cert_cn() { cert_subject "$1" | tr ',' '\n' | sed -n 's/^CN=//p' | head -n 1; }

# ------------------------------------------------------------ answers

# pp_field OUT NAME: the value of the first "X-Proxy-NAME: value" line in
# OUT (headers or body; CR stripped); empty if none. pp_has OUT NAME: 0 if
# there is such a line.
pp_field() { tr -d '\r' <<<"$1" | sed -n "s/^X-Proxy-$2: //p" | head -n 1; }
pp_has() { tr -d '\r' <<<"$1" | grep -q "^X-Proxy-$2: "; }

# alert_of OUT: the number of the TLS alert a client reports in OUT
# (openssl s_client "SSL alert number N", gnutls-cli "Received alert [N]",
# curl: OpenSSL's alert text), or "" if none.
alert_of() {
	local n
	n=$(sed -n 's/.*SSL alert number \([0-9][0-9]*\).*/\1/p; s/.*Received alert \[\([0-9][0-9]*\)\].*/\1/p' <<<"$1" | head -n 1)
	if [ -z "$n" ]; then
		case $1 in
		*"alert certificate required"*) n=116 ;;
		*"alert handshake failure"*) n=40 ;;
		*"alert bad certificate"*) n=42 ;;
		*"alert unknown ca"*) n=48 ;;
		*"alert decode error"*) n=50 ;;
		*"alert certificate unknown"*) n=46 ;;
		*"alert access denied"*) n=49 ;;
		*"alert decrypt error"*) n=51 ;;
		esac
	fi
	echo "$n"
}

alert_name() {
	case $1 in
	40) echo handshake_failure ;;
	42) echo bad_certificate ;;
	46) echo certificate_unknown ;;
	48) echo unknown_ca ;;
	49) echo access_denied ;;
	50) echo decode_error ;;
	51) echo decrypt_error ;;
	116) echo certificate_required ;;
	reset) echo "TCP reset, no alert" ;;
	"") echo "no alert" ;;
	*) echo "alert $1" ;;
	esac
}

# tcp_send_read PORT DATA BYTES [SECONDS]: connects with bash /dev/tcp,
# writes DATA (printf %b), reads BYTES bytes (or until EOF; 0 = until EOF)
# and prints them; at most SECONDS (default 10). The exit status is that of
# the read side (124 on timeout).
tcp_send_read() {
	# shellcheck disable=SC2016 # expanded by the inner bash
	timeout "${4:-10}" bash -c '
		exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 3
		printf "%b" "$2" >&3
		if [ "$3" -gt 0 ]; then head -c "$3" <&3; else cat <&3; fi 2>/dev/null' _ "$1" "$2" "$3"
}
