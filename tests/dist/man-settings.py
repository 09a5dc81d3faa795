#!/usr/bin/env python3
"""Settings in step: man/hsmtlsd.conf.5, README.md's settings tables and the
names src/daemon/conf*.c accept must list the same settings per section
([global], [token], [listener], [connector], [admin]). Prints TAP; fails
when one of the three names a setting another does not.
Usage: man-settings.py SRCDIR [MAN README CONF...]  (files default to SRCDIR's)."""
import glob
import os
import re
import sys

SECTIONS = ("global", "token", "listener", "connector", "admin")


def man_settings(path):
    """.SS "[section ...]" then .TP/.TQ entries whose next line is .B name."""
    out = {s: set() for s in SECTIONS}
    sec, want = None, False
    for line in open(path, encoding="utf-8"):
        line = line.rstrip("\n")
        m = re.match(r'\.SS\s+"?\[(\w+)', line)
        if m:
            sec = m.group(1) if m.group(1) in SECTIONS else None
            want = False
            continue
        if sec is None or line.startswith(".SH"):
            sec = None if line.startswith(".SH") else sec
            continue
        if line in (".TP", ".TQ"):
            want = True
            continue
        if want:
            m = re.match(r"\.B\s+(\w+)\s*$", line)
            if m:
                out[sec].add(m.group(1))
            want = False
    return out


def readme_settings(path):
    """Tables with a "| setting |" header; the section is the last line
    naming one (`[global]`, `[token NAME]` ...; "Listeners can demand")."""
    out = {s: set() for s in SECTIONS}
    sec, in_table = None, False
    for line in open(path, encoding="utf-8"):
        m = re.match(r"^`\[(\w+)", line)
        if m:
            sec = m.group(1) if m.group(1) in SECTIONS else None
        elif line.startswith("Listeners can demand"):
            sec = "listener"
        elif line.startswith("#"):
            sec = None
        if line.startswith("| setting |"):
            in_table = sec is not None
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        if in_table and not line.startswith("|---"):
            first = line.split("|")[1]
            out[sec].update(re.findall(r"`(\w+)`", first))
    return out


def function_body(src, name):
    m = re.search(r"^(?:static )?int %s\(.*?^\}" % name, src, re.S | re.M)
    if not m:
        raise SystemExit("Bail out! %s not found in src/daemon/conf*.c" % name)
    return m.group(0)


def conf_settings(paths):
    """strcmp(name, "x") in each hsm_conf_*_setting() of conf*.c. In listener_setting
    `!conn &&` marks listener-only names, `conn &&` connector-only ones, and
    `conn ? "a" : "b"` a connector's a for a listener's b. Names whose `if`
    goes straight to `return hsm_conf_fail(` are refused, not accepted."""
    src = "".join(open(p, encoding="utf-8").read() for p in paths)
    out = {s: set() for s in SECTIONS}
    for sec, fn in (("global", "hsm_conf_global_setting"), ("token", "hsm_conf_token_setting"),
                    ("admin", "hsm_conf_admin_setting"), ("listener", "hsm_conf_listener_setting")):
        lines = function_body(src, fn).split("\n")
        for i, line in enumerate(lines):
            names = re.findall(r'strcmp\(name, "(\w+)"\)', line)
            pair = re.search(r'strcmp\(name, conn \? "(\w+)" : "(\w+)"\)', line)
            if not names and not pair:
                continue
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if line.strip().startswith("if (") and line.rstrip().endswith(")") and nxt.startswith("return hsm_conf_fail("):
                continue  # refused with a reason (e.g. pin, pin_value)
            if sec != "listener":
                out[sec].update(names)
                continue
            if pair:
                out["connector"].add(pair.group(1))
                out["listener"].add(pair.group(2))
            targets = ["listener"] if "!conn &&" in line else ["connector"] if re.search(r"(?<!!)conn &&", line) \
                else ["listener", "connector"]
            for t in targets:
                out[t].update(names)
    return out


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("SRCDIR", ".")
    man = sys.argv[2] if len(sys.argv) > 2 else os.path.join(src, "man", "hsmtlsd.conf.5")
    readme = sys.argv[3] if len(sys.argv) > 3 else os.path.join(src, "README.md")
    conf = sys.argv[4:] if len(sys.argv) > 4 else sorted(glob.glob(os.path.join(src, "src", "daemon", "conf*.c")))
    lists = {"hsmtlsd.conf(5)": man_settings(man), "README.md": readme_settings(readme), "src/daemon/conf*.c": conf_settings(conf)}
    n = failed = 0
    for sec in SECTIONS:
        union = set().union(*(l[sec] for l in lists.values()))
        for where, l in lists.items():
            n += 1
            missing = sorted(union - l[sec])
            if missing:
                failed += 1
                others = ", ".join(w for w, o in lists.items() if set(missing) & o[sec] and w != where)
                print("not ok %d - [%s] in %s: missing %s (listed by %s)" % (n, sec, where, ", ".join(missing), others))
            else:
                print("ok %d - [%s] in %s: all %d settings" % (n, sec, where, len(union)))
        if not union:
            n += 1
            failed += 1
            print("not ok %d - [%s]: no settings found anywhere (parser out of date?)" % (n, sec))
    print("1..%d" % n)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
