#!/usr/bin/env python3
"""tls-hold.py PORT SNI CAFILE: one TLS connection through hsmtlsd to the
e2e backend's echo. Prints "fp HEX" (SHA-256 of the leaf the server
presented) once the handshake is done, then reads commands on stdin, one a
line: "ping WORD" sends WORD and prints "pong WORD" when it is echoed back
(or "error ..."), "quit" closes. With --once: handshake, one ping, print
"fp HEX pong", exit (for a handshake started in the background)."""
import hashlib
import socket
import ssl
import sys


def main():
    once = "--once" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--once"]
    port, sni, cafile = int(args[0]), args[1], args[2]
    ctx = ssl.create_default_context(cafile=cafile)
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        s = ctx.wrap_socket(raw, server_hostname=sni)
        fp = hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest()
    except (OSError, ssl.SSLError) as e:
        print(f"error handshake: {e}", flush=True)
        return 1
    if once:
        print(f"fp {fp} {ping(s, 'once')}", flush=True)
        s.close()
        return 0
    print(f"fp {fp}", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "ping":
            print(ping(s, cmd[1]), flush=True)
    s.close()
    return 0


def ping(s, word):
    data = (word + "\n").encode()
    try:
        s.sendall(data)
        got = b""
        while not got.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                return "error closed"
            got += chunk
    except (OSError, ssl.SSLError) as e:
        return f"error {e}"
    return "pong " + got.decode().strip() if got == data else f"error echoed {got!r}"


sys.exit(main())
