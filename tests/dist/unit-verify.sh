#!/usr/bin/env bash
# The systemd unit: `systemd-analyze verify` passes on the built
# hsmtlsd.service (ExecStart pointed at the built hsmtlsd; the man pages are
# checked by tests/package, where they are installed), the hardening
# options README.md lists are all set, and `systemd-analyze security`
# rates it at most 2.0 (printed). TAP; exit 77 without systemd-analyze.
# Usage: unit-verify.sh BUILT-UNIT HSMTLSD
set -u
unit=$1 daemon=$2
command -v systemd-analyze >/dev/null 2>&1 || { echo "1..0 # SKIP systemd-analyze not installed (systemd)"; exit 77; }
n=0 failed=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
notok() { n=$((n + 1)); failed=$((failed + 1)); echo "not ok $n - $1"; }
dir=$(mktemp -d "${TMPDIR:-/tmp}/hsmtls-unit.XXXXXX") || exit 1
trap 'rm -rf -- "$dir"' EXIT
sed "s|^ExecStart=[^ ]*|ExecStart=$daemon|" "$unit" >"$dir/hsmtlsd.service"
if out=$(systemd-analyze verify --man=no "$dir/hsmtlsd.service" 2>&1) && [ -z "$out" ]; then
	ok "systemd-analyze verify: no complaint"
else
	notok "systemd-analyze verify: $(echo "$out" | tr '\n' ' ')"
fi
for opt in Type=notify NotifyAccess=main 'ExecReload=/bin/kill -HUP $MAINPID' ProtectSystem=strict ProtectHome=yes \
	PrivateTmp=yes NoNewPrivileges=yes CapabilityBoundingSet=CAP_NET_BIND_SERVICE \
	'RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6' SystemCallFilter=@system-service LoadCredential=pin: \
	StateDirectory=hsmtls ReadWritePaths=-/var/lib/softhsm; do
	if grep -qF -- "$opt" "$dir/hsmtlsd.service"; then ok "unit sets $opt"; else notok "unit lacks $opt"; fi
done
sec=$(systemd-analyze security --offline=true --threshold=20 "$dir/hsmtlsd.service" 2>&1)
rc=$?
score=$(sed -n 's/.*Overall exposure level for hsmtlsd.service: \([0-9.]*\).*/\1/p' <<<"$sec")
echo "# systemd-analyze security: ${score:-?} ($(grep -c '✗' <<<"$sec") findings open)"
grep '✗' <<<"$sec" | sed 's/^/#   /'
if [ "$rc" -eq 0 ] && [ -n "$score" ]; then ok "systemd-analyze security: exposure $score (at most 2.0)"; else notok "systemd-analyze security: exposure ${score:-?} above 2.0 (exit $rc)"; fi
echo "1..$n"
[ "$failed" -eq 0 ]
