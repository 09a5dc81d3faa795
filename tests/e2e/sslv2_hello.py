#!/usr/bin/env python3
"""Sends an SSLv2-format ClientHello (RFC 5246 E.2) to 127.0.0.1:PORT and
prints what the server answers first:
  SERVERHELLO <version hex> <cipher suite hex>
  ALERT <level> <description>
  CLOSED                 (no answer)
  OTHER <hex>
usage: sslv2_hello.py PORT [VERSION-HEX [SUITE-HEX,...]]
VERSION: the client_version (default 0303, TLS 1.2; 0002 is a real SSL 2.0
client). The cipher specs are the suites given, each as 00 + the TLS suite."""
import socket
import struct
import sys


def hello(version, suites):
    specs = b"".join(b"\x00" + struct.pack(">H", s) for s in suites)
    challenge = bytes(range(1, 33))
    body = b"\x01" + struct.pack(">HHHH", version, len(specs), 0, len(challenge)) + specs + challenge
    return struct.pack(">H", 0x8000 | len(body)) + body


def recv_exact(s, n):
    d = b""
    while len(d) < n:
        c = s.recv(n - len(d))
        if not c:
            break
        d += c
    return d


def main():
    port = int(sys.argv[1])
    version = int(sys.argv[2], 16) if len(sys.argv) > 2 else 0x0303
    suites = [int(x, 16) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else \
        [0xc02b, 0xc02c, 0xc02f, 0xc030, 0xcca8, 0xcca9, 0x009c, 0x00ff]
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(hello(version, suites))
    try:
        hdr = recv_exact(s, 5)
        if len(hdr) < 5:
            print("CLOSED")
            return
        n = struct.unpack(">H", hdr[3:5])[0]
        body = recv_exact(s, min(n, 128))
    except (ConnectionResetError, socket.timeout):
        print("CLOSED")
        return
    if hdr[0] == 22 and body[:1] == b"\x02" and len(body) >= 6:
        # handshake type 2, 3-byte length, server_version, random(32), session_id, cipher_suite
        sid = body[38] if len(body) > 38 else 0
        suite = body[39 + sid:41 + sid].hex() if len(body) >= 41 + sid else "?"
        print("SERVERHELLO %s %s" % (body[4:6].hex(), suite))
    elif hdr[0] == 21 and len(body) >= 2:
        print("ALERT %d %d" % (body[0], body[1]))
    else:
        print("OTHER " + (hdr + body).hex())


if __name__ == "__main__":
    main()
