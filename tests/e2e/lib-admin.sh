# tests/e2e/lib-admin.sh - helpers for the admin API tests (source after
# lib.sh, call admin_init after e2e_init).
#
# admin_init: sets SPEC, STATE, SOCK, ADMIN_TOKEN, READ_TOKEN, BODY, HDRS,
# RESP (the responses kept for check_contract) and JSON.
# write_admin_section FILE [EXTRA LINES...]: appends [admin] on $SOCK with
# the two tokens (role admin: token:ops, role read: token:viewer).
# start_admin: starts hsmtlsd -c "$conf" (its own log each time,
# hsmtlsd-1.log, -2...) and waits for the admin API.
# api TOKEN METHOD PATH [curl args]: the status; the body in $BODY, the
# headers in $HDRS. expect / expect_error: the status (and the error's code
# and field), the body kept and validated against api/openapi.yaml by
# check_contract (one validator process, python3-jsonschema).
# slowtoken_control: the token is reached through tests/slowtoken (give
# write_token_section the module $SLOWTOKEN), its condition set with
# control WORDS (tests/slowtoken/README.md, control file); skips without it.
# db_lock / db_unlock: another process (sqlite3) holds state.db's write
# lock (BEGIN EXCLUSIVE) until db_unlock. audit_n [WHERE]: audit records.

# shellcheck disable=SC2034 # the variables are for the scripts that source this
sha() { printf %s "$1" | sha256sum | cut -d' ' -f1; }
random_token() { printf '%s-%s' "$1" "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"; }

admin_init() {
	SPEC=$SRCDIR/api/openapi.yaml
	STATE=$E2E_DIR/state
	SOCK=$E2E_DIR/admin.sock
	ADMIN_TOKEN=$(random_token admin)
	READ_TOKEN=$(random_token read)
	BODY=$E2E_DIR/body
	HDRS=$E2E_DIR/headers
	RESP=$E2E_DIR/responses
	mkdir -p "$RESP"
	N_RESP=0
	N_START=0
	JSON=(-H 'Content-Type: application/json')
}

write_admin_section() {
	local f=$1 line
	shift
	printf '[admin]\nlisten = unix:%s\ntoken = admin:ops:%s\ntoken = read:viewer:%s\n' "$SOCK" "$(sha "$ADMIN_TOKEN")" \
		"$(sha "$READ_TOKEN")" >>"$f"
	for line in "$@"; do printf '%s\n' "$line" >>"$f"; done
}

start_admin() {
	N_START=$((N_START + 1))
	start_daemon "$conf" "$E2E_DIR/hsmtlsd-$N_START.log" || bail "daemon did not start"
	wait_until 10 grep -q 'admin: listening on' "$DAEMON_LOG" || bail "the admin API did not start"
}

api() {
	local tok=$1 method=$2 path=$3
	shift 3
	local auth=()
	[ -n "$tok" ] && auth=(-H "Authorization: Bearer $tok")
	curl -sS --max-time 60 --unix-socket "$SOCK" -D "$HDRS" -o "$BODY" -w '%{http_code}' -X "$method" "${auth[@]}" "$@" \
		"http://hsmtlsd$path"
}
jq_() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {"d": d}))' "${2:-$BODY}" "$1"; }
hdr_etag() { tr -d '\r' <"$HDRS" | sed -n 's/^[Ee][Tt][Aa][Gg]: //p'; }

# keep_response FILE METHOD TEMPLATE STATUS DESC: FILE is checked against the contract by check_contract.
keep_response() {
	N_RESP=$((N_RESP + 1))
	cp "$1" "$RESP/$N_RESP.json"
	printf '%s %s %s %s %s\n' "$RESP/$N_RESP.json" "$2" "$3" "$4" "$5" >>"$RESP/manifest"
}

# expect DESC STATUS TEMPLATE TOKEN METHOD PATH [curl args]
expect() {
	local desc=$1 want=$2 tmpl=$3 got
	shift 3
	got=$(api "$@")
	if [ "$got" != "$want" ]; then
		fail "$desc: status $got, expected $want ($(head -c 300 "$BODY"))"
		return 1
	fi
	keep_response "$BODY" "$2" "$tmpl" "$want" "$desc"
	ok "$desc: $want"
}

# expect_error DESC STATUS CODE FIELD TEMPLATE TOKEN METHOD PATH [curl args]
expect_error() {
	local desc=$1 want=$2 code=$3 field=$4 tmpl=$5
	shift 5
	expect "$desc" "$want" "$tmpl" "$@" || return 1
	local c f
	c=$(jq_ 'd["error"]["code"]')
	f=$(jq_ 'd["error"]["field"]')
	if [ "$c" = "$code" ] && [ "$f" = "$field" ]; then
		ok "$desc: error $code names field $field ($(jq_ 'd["error"]["reason"]'))"
	else
		fail "$desc: error code $c field $f, expected $code / $field ($(jq_ 'd["error"]["reason"]'))"
	fi
}

check_contract() {
	local line
	[ -s "$RESP/manifest" ] || return 0
	while IFS= read -r line; do
		case $line in
		PASS\ *) ok "matches api/openapi.yaml: ${line#PASS }" ;;
		*) fail "does not match api/openapi.yaml: ${line#FAIL }" ;;
		esac
	done < <("$SRCDIR/tests/e2e/oas-check.py" "$SPEC" --manifest "$RESP/manifest" 2>&1)
}

audit_n() { sqlite3 "$STATE/state.db" "SELECT count(*) FROM audit WHERE ${1:-1}"; }

_db_locked() { ! sqlite3 "$STATE/state.db" "PRAGMA busy_timeout = 0; BEGIN IMMEDIATE; ROLLBACK;" >/dev/null 2>&1; }
db_lock() {
	rm -f "$E2E_DIR/lock.fifo"
	mkfifo "$E2E_DIR/lock.fifo"
	sqlite3 "$STATE/state.db" <"$E2E_DIR/lock.fifo" >"$E2E_DIR/lock.out" 2>&1 &
	DB_LOCK_PID=$!
	E2E_PIDS+=("$DB_LOCK_PID")
	exec 9>"$E2E_DIR/lock.fifo"
	printf 'PRAGMA busy_timeout = 10000;\nBEGIN EXCLUSIVE;\nSELECT count(*) FROM audit;\n' >&9
	wait_until 15 _db_locked || bail "the sqlite3 process did not take the write lock"
}
db_unlock() {
	printf 'ROLLBACK;\n.quit\n' >&9
	exec 9>&-
	wait "$DB_LOCK_PID" 2>/dev/null
	forget_pid "$DB_LOCK_PID"
}

slowtoken_control() {
	[ -n "${SLOWTOKEN:-}" ] && [ -f "$SLOWTOKEN" ] || skip "the slowtoken module was not built (SLOWTOKEN unset)"
	CONTROL=$E2E_DIR/slowtoken.control
	control present
	export HSMTLS_SLOWTOKEN_MODULE=$HSMTLS_MODULE HSMTLS_SLOWTOKEN_CONTROL_FILE=$CONTROL
}
control() { printf '%s\n' "$1" >"$CONTROL.tmp" && mv "$CONTROL.tmp" "$CONTROL"; }

# admin_chain TOKEN ID NAME DNS...: a CSR made through the API for key ID of
# token TOKEN (subject CN=the first DNS name), signed by the test CA
# ($TOKEN_DIR/ca.key, $HSMTLS_CA) for those names, written with the CA to
# $E2E_DIR/NAME.pem and uploaded (state only); the leaf's SHA-256
# fingerprint on stdout.
admin_chain() {
	local tok=$1 id=$2 name=$3 dns code
	shift 3
	dns=$(printf '"%s",' "$@")
	[ -f "$E2E_DIR/leaf.tmpl" ] ||
		printf 'tls_www_server\nsigning_key\nexpiration_days = 30\nhonor_crq_extensions\n' >"$E2E_DIR/leaf.tmpl"
	api "$ADMIN_TOKEN" POST "/v1/keys/$tok/$id/csr" "${JSON[@]}" -d "{\"subject\":\"CN=$1\",\"dns\":[${dns%,}]}" >/dev/null
	jq_ 'd["csr"]' >"$E2E_DIR/$name.csr"
	certtool --generate-certificate --load-request "$E2E_DIR/$name.csr" --load-ca-privkey "$TOKEN_DIR/ca.key" \
		--load-ca-certificate "$HSMTLS_CA" --template "$E2E_DIR/leaf.tmpl" --outfile "$E2E_DIR/$name.leaf" >/dev/null 2>&1 ||
		bail "certtool could not sign $name"
	cat "$E2E_DIR/$name.leaf" "$HSMTLS_CA" >"$E2E_DIR/$name.pem"
	code=$(api "$ADMIN_TOKEN" POST /v1/certificates "${JSON[@]}" \
		-d "$(python3 -c 'import json,sys; print(json.dumps({"pem": open(sys.argv[1]).read()}))' "$E2E_DIR/$name.pem")")
	[ "$code" = 201 ] || bail "upload of $name: $code $(head -c 300 "$BODY")"
	openssl x509 -in "$E2E_DIR/$name.leaf" -outform DER | sha256sum | cut -d' ' -f1
}
