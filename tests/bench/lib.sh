# tests/bench/lib.sh - sourced by tests/bench/run and tests/bench/resume:
# ports and processes, and nginx as a TLS stream proxy whose key is on a
# PKCS#11 token through the OpenSSL 3 pkcs11 engine (libp11, Debian
# libengine-pkcs11-openssl). Defines functions; sets nothing else but the
# port registry. Every process started here is in the caller's pids[]
# (track), stopped by stop_pid.
# shellcheck shell=bash

track() { pids+=("$1"); }
stop_pid() { # PID [SIGNAL]: TERM (or SIGNAL), wait up to 5 s, then KILL
	local pid=$1 sig=${2:-TERM} i
	[ -n "$pid" ] || return 0
	kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
	kill -"$sig" "$pid" 2>/dev/null
	for ((i = 0; i < 50; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		kill -KILL "$pid" 2>/dev/null
	fi
	wait "$pid" 2>/dev/null
	return 0
}

# A TCP port of 127.0.0.1 that no socket uses now, below the ephemeral range
# (the load generator makes tens of thousands of outgoing connections).
declare -A given_ports=()
free_port() {
	local used p hex i
	used=$(awk 'NR > 1 { split($2, a, ":"); print a[2] }' /proc/net/tcp /proc/net/tcp6 2>/dev/null)
	for ((i = 0; i < 200; i++)); do
		p=$((20000 + RANDOM % 12000))
		[ -z "${given_ports[$p]:-}" ] || continue
		printf -v hex '%04X' "$p"
		grep -qx "$hex" <<<"$used" && continue
		given_ports[$p]=1
		echo "$p"
		return 0
	done
	return 1
}
port_listening() { # PORT: a socket listens on it (state 0A)
	local hex
	printf -v hex '%04X' "$1"
	awk -v h="$hex" 'NR > 1 && $4 == "0A" { split($2, a, ":"); if (a[2] == h) f = 1 } END { exit !f }' \
		/proc/net/tcp /proc/net/tcp6 2>/dev/null
}
wait_listen() { # PID PORT [TENTHS]: the process lives and listens
	local pid=$1 port=$2 n=${3:-150} i
	for ((i = 0; i < n; i++)); do
		kill -0 "$pid" 2>/dev/null || return 1
		port_listening "$port" && return 0
		sleep 0.1
	done
	return 1
}

# bench_find_nginx_parts: sets engine_so (the pkcs11 engine, "" when
# missing) and stream_mod (nginx's stream module: a path, "builtin", or "").
bench_find_nginx_parts() {
	local c
	engine_so=""
	for c in /usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so /usr/lib/*-linux-gnu*/engines-3/pkcs11.so \
		/usr/lib64/engines-3/pkcs11.so /usr/lib/engines-3/pkcs11.so; do
		[ -f "$c" ] && { engine_so=$c; break; }
	done
	stream_mod=""
	for c in /usr/lib/nginx/modules/ngx_stream_module.so /usr/lib64/nginx/modules/ngx_stream_module.so; do
		[ -f "$c" ] && { stream_mod=$c; break; }
	done
	if nginx -V 2>&1 | grep -q -- '--with-stream '; then stream_mod="builtin"; fi
}

# bench_drop_ed25519 MODULE PIN LOG: libp11 0.4.12 (the OpenSSL pkcs11
# engine of Debian 12) cannot enumerate the keys of a token that holds a
# CKK_EC_EDWARDS key ("Unable to enumerate private keys"), so nginx could
# load no key at all: remove the Ed25519 objects from the run's token
# ($HSMTLS_TOKEN_URI). Nothing in the benchmarks uses them.
bench_drop_ed25519() {
	GNUTLS_PIN=$2 p11tool --provider "$1" --login --batch --delete "$HSMTLS_TOKEN_URI;object=ed25519" >"$3" 2>&1
}

# bench_start_nginx DIR BACKEND-PORT CERT KEY-URI MODULE PIN SESSIONS [ENV...]
# nginx in DIR: a stream TLS proxy to 127.0.0.1:BACKEND-PORT, 2 workers, the
# key KEY-URI through the engine on MODULE (the PIN in DIR/openssl.cnf, mode
# 0600). SESSIONS: "on" (tickets and a shared session cache, 10 MB, 2 h) or
# "off" (neither). ENV: env(1) arguments for nginx (VAR=VALUE, -u VAR); the
# workers keep SOFTHSM2_CONF, OPENSSL_CONF and the slowtoken's variables.
# Sets NGINX_PID and NGINX_PORT, or NGINX_FAIL (the reason) and returns 1.
# shellcheck disable=SC2034 # NGINX_*: for the caller
bench_start_nginx() {
	local d=$1 backend=$2 cert=$3 key=$4 module=$5 pin=$6 sessions=$7 port pid mod="" user="" sess v envs=""
	shift 7
	NGINX_PID="" NGINX_PORT="" NGINX_FAIL=""
	[ -n "$engine_so" ] || { NGINX_FAIL="no OpenSSL pkcs11 engine (libengine-pkcs11-openssl)"; return 1; }
	[ -n "$stream_mod" ] || { NGINX_FAIL="no nginx stream module (Debian: libnginx-mod-stream)"; return 1; }
	[ "$stream_mod" = builtin ] || mod="load_module $stream_mod;"
	[ "$(id -u)" -eq 0 ] && user="user root root;"
	mkdir -p "$d"
	# nginx calls ENGINE_load_private_key without ENGINE_init: init = 1
	cat >"$d/openssl.cnf" <<EOF
openssl_conf = openssl_init
[openssl_init]
engines = engine_section
[engine_section]
pkcs11 = pkcs11_section
[pkcs11_section]
engine_id = pkcs11
dynamic_path = $engine_so
MODULE_PATH = $module
PIN = $pin
init = 1
EOF
	chmod 600 "$d/openssl.cnf"
	if [ "$sessions" = on ]; then
		sess="ssl_session_tickets on; ssl_session_cache shared:SSL:10m; ssl_session_timeout 2h;"
	else
		sess="ssl_session_tickets off; ssl_session_cache off;"
	fi
	# libp11 initialises the module again in each forked worker, which
	# sees only the variables named by env
	for v in SOFTHSM2_CONF OPENSSL_CONF HSMTLS_SLOWTOKEN_MODULE HSMTLS_SLOWTOKEN_DELAY_MS HSMTLS_SLOWTOKEN_MAX_CONCURRENT \
		HSMTLS_SLOWTOKEN_COUNT_FILE HSMTLS_SLOWTOKEN_COUNT_EVERY; do envs+="env $v; "; done
	for _ in 1 2 3; do
		port=$(free_port) || break
		cat >"$d/nginx.conf" <<EOF
$mod
$user
worker_processes 2;
worker_rlimit_nofile 16384;
pid $d/nginx.pid;
error_log $d/error.log warn;
$envs
events { worker_connections 8192; }
stream {
  upstream backend { server 127.0.0.1:$backend; }
  server {
    listen 127.0.0.1:$port ssl backlog=4096;
    ssl_certificate $cert;
    ssl_certificate_key "engine:pkcs11:$key";
    ssl_protocols TLSv1.2 TLSv1.3;
    $sess
    proxy_pass backend;
  }
}
EOF
		: >"$d/error.log"
		env "$@" OPENSSL_CONF="$d/openssl.cnf" nginx -e "$d/error.log" -p "$d" -c "$d/nginx.conf" \
			-g 'daemon off;' >"$d/out.log" 2>&1 </dev/null &
		pid=$!
		track "$pid"
		if wait_listen "$pid" "$port"; then
			sleep 0.3 # the workers
			NGINX_PID=$pid NGINX_PORT=$port
			return 0
		fi
		stop_pid "$pid"
		grep -q 'Address already in use' "$d/error.log" || break
	done
	NGINX_FAIL="nginx did not start: $(grep -h -e emerg -e alert -e 'not found' "$d/out.log" "$d/error.log" | tail -2 | tr '\n' ' ')"
	return 1
}
