#!/usr/bin/env python3
"""A stand-in for systemd's notify socket: binds a unix datagram socket at
SOCK (for $NOTIFY_SOCKET) and writes one line per message to OUT:
  MSG<TAB>listening=N<TAB>port=ok|refused|none<TAB>selftest=yes|no
where N is the number of "listening on" lines in the daemon's LOG when the
message arrived, port says whether the first TCP listener in LOG accepted a
connection then, and selftest whether LOG had the start-up test signature
line. Newlines inside a message become "|". Exits after STATUS=stopped or
when killed.
Usage: notify_listener.py SOCK OUT LOG"""
import os
import re
import socket
import sys

sock_path, out_path, log_path = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sock_path)
with open(out_path + ".ready", "w") as f:
    f.write("bound\n")
while True:
    msg = s.recv(4096).decode("utf-8", "replace")
    try:
        log = open(log_path, encoding="utf-8", errors="replace").read()
    except OSError:
        log = ""
    listening = len(re.findall(r" listening on ", log))
    m = re.search(r"listener \S+: listening on 127\.0\.0\.1:(\d+),", log)
    port = "none"
    if m:
        c = socket.socket()
        c.settimeout(5)
        try:
            c.connect(("127.0.0.1", int(m.group(1))))
            port = "ok"
        except OSError:
            port = "refused"
        finally:
            c.close()
    selftest = "yes" if "start-up test signatures: " in log else "no"
    with open(out_path, "a") as f:
        f.write("%s\tlistening=%d\tport=%s\tselftest=%s\n" % (msg.strip().replace("\n", "|"), listening, port, selftest))
    if "STATUS=stopped" in msg:
        break
os.unlink(sock_path)
