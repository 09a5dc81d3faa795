#!/usr/bin/env bash
# e2e: client mode ([connector]). A local program (bash /dev/tcp) sends
# plaintext into a connector; hsmtlsd makes the TLS connection with a client
# certificate whose key is on the token and verifies the server (CA, name).
#  (a) against gnutls-serv --require-client-cert --verify-client-cert --echo,
#      TLS 1.3 and 1.2 (connector priority), RSA-2048, ECDSA P-256 and
#      Ed25519 (TLS 1.3) client keys: the bytes come back, one client
#      signature per connection with the right mechanism (TLS 1.2 RSA:
#      CKM_RSA_PKCS, TLS 1.3 RSA: CKM_RSA_PKCS_PSS), and gnutls-serv saw the
#      same signature algorithms;
#  (b) against openssl s_server -Verify 1 -verify_return_error -rev (lines
#      come back reversed), TLS 1.3 and 1.2;
#  (c) the CKA_ALWAYS_AUTHENTICATE key (client-auth) signs in a handshake;
#  (d) a server that fails verification (wrong ca_file, wrong server_name),
#      TLS 1.3 and 1.2: the local connection is closed without data, the
#      daemon logs why, and no client signature is made.
set -u
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=lib-mtls.sh
. "$(dirname "$0")/lib-mtls.sh"

need_tools gnutls-serv openssl certtool mkfifo od
e2e_init
provision_token_with --client-keys --file-keys
start_backend # for the marker listener that usage_snapshot needs

# ------------------------------------------------------------ the servers
# gnutls-serv needs a fixed port: a free one, retried if taken meanwhile.
GS_OUT=$E2E_DIR/gnutls-serv.out
for _ in 1 2 3; do
	GS_PORT=$(free_port)
	: >"$GS_OUT"
	gnutls-serv --require-client-cert --verify-client-cert --x509cafile="$HSMTLS_CA" \
		--x509certfile="$HSMTLS_FILECERT_P256" --x509keyfile="$HSMTLS_FILEKEY_P256" \
		--echo --port="$GS_PORT" >"$GS_OUT" 2>&1 </dev/null &
	GS_PID=$!
	E2E_PIDS+=("$GS_PID")
	wait_until 10 grep -qE 'IPv4 .*done|[Ee]rror|in use' "$GS_OUT"
	if grep -q 'IPv4 .*done' "$GS_OUT" && kill -0 "$GS_PID" 2>/dev/null; then
		break
	fi
	kill "$GS_PID" 2>/dev/null
	wait "$GS_PID" 2>/dev/null
	forget_pid "$GS_PID"
	GS_PID=""
done
[ -n "$GS_PID" ] || bail "gnutls-serv did not start: $(tail -n 3 "$GS_OUT")"

# openssl s_server binds port 0 and says which port it got.
OS_OUT=$E2E_DIR/s_server.out
: >"$OS_OUT"
# stdin: a fifo held open, so s_server does not see EOF on its console.
mkfifo "$E2E_DIR/s_server.in"
openssl s_server -accept 127.0.0.1:0 -Verify 1 -verify_return_error -CAfile "$HSMTLS_CA" \
	-cert "$HSMTLS_FILECERT_P256" -key "$HSMTLS_FILEKEY_P256" -rev \
	<"$E2E_DIR/s_server.in" >"$OS_OUT" 2>&1 &
OS_PID=$!
E2E_PIDS+=("$OS_PID")
exec 8>"$E2E_DIR/s_server.in"
wait_until 10 grep -q '^ACCEPT ' "$OS_OUT" || bail "openssl s_server did not start: $(tail -n 3 "$OS_OUT")"
OS_PORT=$(sed -n 's/^ACCEPT .*:\([0-9][0-9]*\)$/\1/p' "$OS_OUT" | head -n 1)
[ -n "$OS_PORT" ] || bail "no port in s_server's ACCEPT line"
note "gnutls-serv on $GS_PORT, openssl s_server on $OS_PORT"

# ------------------------------------------------------------- the daemon
V13='NORMAL:-VERS-ALL:+VERS-TLS1.3'
V12='NORMAL:-VERS-ALL:+VERS-TLS1.2'
conf=$E2E_DIR/connector.conf
printf '[global]\nlog_level = info\ndrain_timeout = 5s\n\n' >"$conf"
write_token_section "$conf"
write_marker_listener "$conf"
# connector NAME SERVER_PORT KEY(RSA2048|P256|ED25519|AUTH) PRIORITY [extra lines]
CONNECTORS=()
connector() {
	local name=$1 port=$2 k=$3 prio=$4 kv cv
	shift 4
	kv=HSMTLS_CLIENTKEY_$k cv=HSMTLS_CLIENTCERT_$k
	CONNECTORS+=("$name")
	{
		printf '[connector %s]\nlisten = 127.0.0.1:0\nconnect = 127.0.0.1:%s\n' "$name" "$port"
		printf 'cert = %s\nkey = %s\npriority = %s\n' "${!cv}" "${!kv}" "$prio"
		if [ $# -gt 0 ]; then printf '%s\n' "$@"; fi
		printf '\n'
	} >>"$conf"
}
GOOD=("server_name = www.hsmtls.test" "ca_file = $HSMTLS_CA")
connector gs-rsa-13 "$GS_PORT" RSA2048 "$V13" "${GOOD[@]}"
connector gs-rsa-12 "$GS_PORT" RSA2048 "$V12" "${GOOD[@]}"
connector gs-p256-13 "$GS_PORT" P256 "$V13" "${GOOD[@]}"
connector gs-p256-12 "$GS_PORT" P256 "$V12" "${GOOD[@]}"
connector gs-ed-13 "$GS_PORT" ED25519 "$V13" "${GOOD[@]}"
connector gs-auth-13 "$GS_PORT" AUTH "$V13" "${GOOD[@]}"
connector os-rsa-13 "$OS_PORT" RSA2048 "$V13" "${GOOD[@]}"
connector os-rsa-12 "$OS_PORT" RSA2048 "$V12" "${GOOD[@]}"
connector os-p256-13 "$OS_PORT" P256 "$V13" "${GOOD[@]}"
connector os-p256-12 "$OS_PORT" P256 "$V12" "${GOOD[@]}"
# (d): the same server with the wrong CA or the wrong name.
connector badca-13 "$GS_PORT" RSA2048 "$V13" "server_name = www.hsmtls.test" "ca_file = $HSMTLS_OTHER_CA"
connector badca-12 "$GS_PORT" P256 "$V12" "server_name = www.hsmtls.test" "ca_file = $HSMTLS_OTHER_CA"
connector badname-13 "$GS_PORT" P256 "$V13" "server_name = wrong.hsmtls.test" "ca_file = $HSMTLS_CA"
connector badname-12 "$GS_PORT" RSA2048 "$V12" "server_name = wrong.hsmtls.test" "ca_file = $HSMTLS_CA"
connector os-badca-13 "$OS_PORT" P256 "$V13" "server_name = www.hsmtls.test" "ca_file = $HSMTLS_OTHER_CA"
connector os-badname-12 "$OS_PORT" RSA2048 "$V12" "server_name = wrong.hsmtls.test" "ca_file = $HSMTLS_CA"

start_daemon "$conf" || bail "daemon did not start"
wait_ready || bail "daemon did not log 'ready:'"
declare -A CPORT=()
for c in "${CONNECTORS[@]}"; do
	CPORT[$c]=$(connector_port "$c")
	[ -n "${CPORT[$c]}" ] || bail "no port for connector $c in the log"
done
usage_snapshot "$E2E_DIR/usage-start" || bail "cannot read the usage counters with SIGUSR1"
for k in client-rsa2048 client-p256 client-ed25519 client-auth; do
	check_eq "key $k: no signature before the first connection" 0 "$(usage_count "$E2E_DIR/usage-start" "$k" sign)"
done

# ------------------------------------------------------------ the traffic
declare -A N_OK=() # connections that carried data, per connector
reverse() {
	local s=$1 r="" i
	for ((i = ${#s} - 1; i >= 0; i--)); do r+=${s:i:1}; done
	printf '%s' "$r"
}
# through_connector NAME N MODE(echo|rev): N connections, each sends a line
# and must get it back (echo) or reversed (rev).
through_connector() {
	local name=$1 n=$2 mode=$3 i msg want got good=0 err=""
	for ((i = 1; i <= n; i++)); do
		msg="hello $name #$i $(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')"
		want=$msg
		[ "$mode" = rev ] && want=$(reverse "$msg")
		got=$(tcp_send_read "${CPORT[$name]}" "$msg\\n" $((${#msg} + 1)) 10)
		if [ "$got" = "$want" ]; then
			good=$((good + 1))
		else
			err+=" #$i got '${got:0:40}'"
		fi
	done
	N_OK[$name]=$good
	if [ "$good" -eq "$n" ]; then
		ok "connector $name: $n connections, data came back ($mode)"
	else
		fail "connector $name: $good of $n connections carried data:$err"
		grep "connector $name:" "$DAEMON_LOG" | tail -n 3 | sed 's/^/#   /'
	fi
}

note "(a) gnutls-serv, echo"
through_connector gs-rsa-13 2 echo
through_connector gs-rsa-12 2 echo
through_connector gs-p256-13 2 echo
through_connector gs-p256-12 2 echo
through_connector gs-ed-13 2 echo
note "(c) the always-authenticate key"
through_connector gs-auth-13 2 echo
note "(b) openssl s_server -rev"
through_connector os-rsa-13 1 rev
through_connector os-rsa-12 1 rev
through_connector os-p256-13 1 rev
through_connector os-p256-12 1 rev

# What the daemon logged per connector: one line per connection, the
# forced version, the client key used, the server's identity.
srv_sha=$(cert_sha256 "$HSMTLS_FILECERT_P256")
for c in gs-rsa-13 gs-rsa-12 gs-p256-13 gs-p256-12 gs-ed-13 gs-auth-13 os-rsa-13 os-rsa-12 os-p256-13 os-p256-12; do
	v=TLS1.${c##*-1}
	case $c in
	*rsa*) k=client-rsa2048 ;; *p256*) k=client-p256 ;; *ed*) k=client-ed25519 ;; *auth*) k=client-auth ;;
	esac
	n=$(grep -cE "connector $c: 127\\.0\\.0\\.1:[0-9]+ -> 127\\.0\\.0\\.1:[0-9]+: \\($v\\).* server_name=www\\.hsmtls\\.test client_key=[^ ]*${k}[^ ]* server=\"CN=www\\.hsmtls\\.test\" sha256=$srv_sha" "$DAEMON_LOG")
	check_eq "daemon log: connector $c: one $v line per connection, client key $k, server certificate by SHA-256" "${N_OK[$c]:-x}" "$n"
done

# gnutls-serv's view of the client signatures (each connection prints a
# "- Client Signature:" line): RSA in TLS 1.2 is PKCS#1 v1.5, in TLS 1.3 PSS.
gs_sig() { grep -c -- "^- Client Signature: $1\$" "$GS_OUT"; }
check_eq "gnutls-serv saw RSA-PSS client signatures (TLS 1.3 RSA)" "${N_OK[gs-rsa-13]}" "$(gs_sig 'RSA-PSS-RSAE-SHA[0-9]*')"
check_eq "gnutls-serv saw RSA PKCS#1 v1.5 client signatures (TLS 1.2 RSA)" "${N_OK[gs-rsa-12]}" "$(gs_sig 'RSA-SHA[0-9]*')"
check_eq "gnutls-serv saw ECDSA client signatures (p256 1.3 + 1.2, client-auth)" \
	$((N_OK[gs-p256-13] + N_OK[gs-p256-12] + N_OK[gs-auth-13])) "$(gs_sig 'ECDSA-.*SHA256')"
check_eq "gnutls-serv saw Ed25519 client signatures" "${N_OK[gs-ed-13]}" "$(gs_sig 'EdDSA-Ed25519')"

# s_server's view: "Signature type:" per connection, with the protocol and
# the client's CN. GnuTLS as a TLS 1.2 client signs with RSA-PSS (rsae) when
# the server's CertificateRequest offers it first, as OpenSSL's does.
os_sigs() { awk '/^Protocol version:/{p=$3} /^Peer certificate:/{cn=$NF} /^Signature type:/{print p, cn, $3}' "$OS_OUT"; }
os_sig() { os_sigs | grep -c "^$1 $2 $3\$"; }
check_eq "s_server saw an RSA-PSS client signature in TLS 1.3 (client-rsa2048)" "${N_OK[os-rsa-13]}" "$(os_sig TLSv1.3 client-rsa2048 RSA-PSS)"
check_eq "s_server saw an ECDSA client signature in TLS 1.3 and 1.2 (client-p256)" \
	$((N_OK[os-p256-13] + N_OK[os-p256-12])) "$(os_sigs | grep -c ' client-p256 ECDSA$')"
os12_pss=$(os_sig TLSv1.2 client-rsa2048 RSA-PSS)
os12_pkcs=$(os_sig TLSv1.2 client-rsa2048 RSA)
check_eq "s_server saw one TLS 1.2 client signature (client-rsa2048) per connection" "${N_OK[os-rsa-12]}" $((os12_pss + os12_pkcs))
note "TLS 1.2 with client-rsa2048 against openssl s_server: $os12_pss RSA-PSS, $os12_pkcs PKCS#1 v1.5 (the server's preference decides)"

# ------------------------------------------------ (d) unverified servers
note "(d) the server fails verification"
usage_snapshot "$E2E_DIR/usage-before-d" || fail "cannot read the usage counters with SIGUSR1 (before d)"
bad_server() { # NAME REASON_ERE WHAT
	local name=$1 t0 ms got rc=0
	t0=$(date +%s%N)
	got=$(tcp_send_read "${CPORT[$name]}" "must not go out\\n" 0 10) || rc=$?
	ms=$((($(date +%s%N) - t0) / 1000000))
	# exit 0: EOF; 1: a reset (the daemon closed with our line unread)
	if [ "$rc" -le 1 ] && [ -z "$got" ]; then
		ok "connector $name ($3): local connection closed without data ($([ "$rc" -eq 0 ] && echo EOF || echo reset), $ms ms)"
	else
		fail "connector $name ($3): exit $rc, got '${got:0:40}' after $ms ms"
	fi
	check_grep "connector $name: the daemon logs the failure and why" "$DAEMON_LOG" \
		"connector $name: TLS to 127\\.0\\.0\\.1:[0-9]+ \\(server name [a-z.]+\\) failed for 127\\.0\\.0\\.1:[0-9]+: .*$2.*closing the local connection"
}
bad_server badca-13 "certificate.*issuer is unknown" "TLS 1.3, ca_file = the other CA"
bad_server badca-12 "certificate.*issuer is unknown" "TLS 1.2, ca_file = the other CA"
bad_server badname-13 "certificate.*name .*does not match" "TLS 1.3, server_name = wrong.hsmtls.test"
bad_server badname-12 "certificate.*name .*does not match" "TLS 1.2, server_name = wrong.hsmtls.test"
# The same against s_server, which prints the alert it received.
os_alerts() { grep -c 'SSL alert number' "$OS_OUT"; }
a0=$(os_alerts)
bad_server os-badca-13 "certificate.*issuer is unknown" "s_server, TLS 1.3, ca_file = the other CA"
bad_server os-badname-12 "certificate.*name .*does not match" "s_server, TLS 1.2, server_name = wrong.hsmtls.test"
os_alerts_at_least() { [ "$(os_alerts)" -ge "$1" ]; }
wait_until 5 os_alerts_at_least $((a0 + 2)) || true
check_eq "(d) s_server received a fatal bad_certificate alert from each failed connector" "2 2" \
	"$(($(os_alerts) - a0)) $(grep 'SSL alert number' "$OS_OUT" | tail -n 2 | grep -c 'alert bad certificate.*SSL alert number 42')"
usage_snapshot "$E2E_DIR/usage-after-d" || fail "cannot read the usage counters with SIGUSR1 (after d)"
for k in client-rsa2048 client-p256; do
	check_eq "(d) key $k: no client signature for an unverified server" 0 \
		"$(usage_delta "$E2E_DIR/usage-before-d" "$E2E_DIR/usage-after-d" "$k" sign)"
done
check_not "(d) gnutls-serv received no data from the failed connections" grep -q 'must not go out' "$GS_OUT"

# ------------------------------------------------------------- counters
stop_daemon 10
check_eq "hsmtlsd exits 0 on SIGTERM" 0 "$DAEMON_RC"
exit_usage "$DAEMON_LOG" "$E2E_DIR/usage-exit"
U=$E2E_DIR/usage-exit
S=$E2E_DIR/usage-start
# RSA mechanisms: TLS 1.3 always PSS; TLS 1.2 PKCS#1 v1.5 against gnutls-serv,
# against s_server whatever it reported above.
n_rsa12=$((N_OK[gs-rsa-12] + os12_pkcs))
n_rsa13=$((N_OK[gs-rsa-13] + N_OK[os-rsa-13] + os12_pss))
n_p256=$((N_OK[gs-p256-13] + N_OK[gs-p256-12] + N_OK[os-p256-13] + N_OK[os-p256-12]))
check_eq "client-rsa2048: CKM_RSA_PKCS = the PKCS#1 v1.5 signatures the servers saw (TLS 1.2 gnutls-serv: ${N_OK[gs-rsa-12]})" \
	"$n_rsa12" "$(usage_delta "$S" "$U" client-rsa2048 sign CKM_RSA_PKCS)"
check_eq "client-rsa2048: CKM_RSA_PKCS_PSS = the RSA-PSS signatures the servers saw (every TLS 1.3 one)" \
	"$n_rsa13" "$(usage_delta "$S" "$U" client-rsa2048 sign CKM_RSA_PKCS_PSS)"
check_eq "client-rsa2048: signatures = connections" \
	$((N_OK[gs-rsa-12] + N_OK[os-rsa-12] + N_OK[gs-rsa-13] + N_OK[os-rsa-13])) "$(usage_delta "$S" "$U" client-rsa2048 sign)"
check_eq "client-p256: CKM_ECDSA = connections" "$n_p256" "$(usage_delta "$S" "$U" client-p256 sign CKM_ECDSA)"
check_eq "client-p256: signatures = connections" "$n_p256" "$(usage_delta "$S" "$U" client-p256 sign)"
check_eq "client-ed25519: CKM_EDDSA = connections" "${N_OK[gs-ed-13]}" "$(usage_delta "$S" "$U" client-ed25519 sign CKM_EDDSA)"
check_eq "client-auth (always authenticate): CKM_ECDSA = connections" "${N_OK[gs-auth-13]}" "$(usage_delta "$S" "$U" client-auth sign CKM_ECDSA)"
check_eq "server key p256 (marker listener): no signature" 0 "$(usage_delta "$S" "$U" p256 sign)"
check_eq "no failed token operation" 0 "$(grep ' usage: ' "$DAEMON_LOG" | grep -v 'count=0$' | grep -vc ' result=ok ')"
stopped=$(sed -n 's/.* stopped: \([0-9]*\) handshakes completed, \([0-9]*\) failed.*/\1 \2/p' "$DAEMON_LOG")
n_all=0
for c in "${!N_OK[@]}"; do n_all=$((n_all + N_OK[$c])); done
check_eq "handshakes completed / failed" "$n_all 6" "$stopped"
check_not "the PIN does not appear in the daemon log" grep -qF -- "$(head -n 1 "$HSMTLS_PIN_FILE")" "$DAEMON_LOG"

# ------------------------------- a TCP listen address is no file name
# The bytes of a sockaddr_in read as a sockaddr_un path are the port (in
# network order) and what follows: port 0x6100 (24832) reads "a", and a
# stale-socket unlink() once removed ./a. A connector on such a port, run
# in a folder holding files of those names, must leave them alone.
note "a TCP connector does not unlink a file named like its port bytes"
cwd=$E2E_DIR/cwd
mkdir -p "$cwd"
conf2=$E2E_DIR/connector-port.conf
started=0
for b in 97 98 99 100 101 102; do # 'a'..'f': ports 24832, 25088, ...
	name=$(printf "\\$(printf %03o "$b")")
	printf 'keep me\n' >"$cwd/$name"
	printf '[global]\nlog_level = info\n\n' >"$conf2"
	write_token_section "$conf2"
	cat >>"$conf2" <<EOF
[connector c]
listen = 127.0.0.1:$((b * 256))
connect = 127.0.0.1:$GS_PORT
server_name = www.hsmtls.test
ca_file = $HSMTLS_CA
cert = $HSMTLS_CLIENTCERT_P256
key = $HSMTLS_CLIENTKEY_P256
EOF
	# a port that something else listens on is skipped
	timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ $((b * 256)) 2>/dev/null && continue
	cd "$cwd" || bail "cd $cwd"
	start_daemon "$conf2" "$E2E_DIR/connector-port-$b.log" && wait_ready && started=1
	cd - >/dev/null || bail "cd back"
	check_eq "connector on 127.0.0.1:$((b * 256)): ./$name (a regular file in its working directory) is still there" \
		"keep me" "$(cat "$cwd/$name" 2>/dev/null)"
	stop_daemon 10
	[ "$started" = 1 ] && check_eq "connector on port $((b * 256)): exits 0 on SIGTERM" 0 "$DAEMON_RC"
	break
done
[ "$started" = 1 ] || fail "no connector started on a port of 24832..26112"

exec 8>&-
e2e_finish
