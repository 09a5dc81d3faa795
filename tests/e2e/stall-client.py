#!/usr/bin/env python3
"""Stalled TLS clients for the e2e tests: each connection sends a prefix of
a real handshake and then stops sending, while reading (and counting) what
the server sends, until the server closes or the hold time ends.

Kinds:
  one-byte    a handshake record of length 1 (16 03 01 00 01 01)
  half-hello  the first half of a real ClientHello record
  hello13     a whole TLS 1.3 ClientHello, then silence (the server's whole
              first flight comes back; the client never answers it)
  hello12     the same with a TLS 1.2 ClientHello

Usage: stall-client.py PORT HOLD_SECONDS KIND...
Prints "READY N" once every connection has sent its bytes, "FLIGHT KIND
INDEX" when the server's first bytes came in on a connection, and one line
per connection: "CLOSED KIND INDEX MS BYTES" when the server closed it
(MS after its bytes were sent, BYTES received), or "OPEN KIND INDEX BYTES"
for those still open when the hold time ended. Exits 0.
"""
import select
import socket
import ssl
import sys
import time


def client_hello(version):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = version
    ctx.maximum_version = version
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="www.hsmtls.test")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    data = out.read()
    assert data[0] == 22 and len(data) == 5 + (data[3] << 8 | data[4]), "not one ClientHello record"
    return data


def main():
    port, hold, kinds = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
    hello13 = client_hello(ssl.TLSVersion.TLSv1_3)
    hello12 = client_hello(ssl.TLSVersion.TLSv1_2)
    payload = {
        "one-byte": bytes([0x16, 0x03, 0x01, 0x00, 0x01, 0x01]),
        "half-hello": hello13[: len(hello13) // 2],
        "hello13": hello13,
        "hello12": hello12,
    }
    conns = []
    for i, kind in enumerate(kinds):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(payload[kind])
        conns.append({"sock": s, "kind": kind, "i": i, "t0": time.monotonic(), "bytes": 0})
    print("READY %d" % len(conns), flush=True)
    end = time.monotonic() + hold
    open_ = {c["sock"].fileno(): c for c in conns}
    while open_ and time.monotonic() < end:
        r, _, _ = select.select(list(open_), [], [], max(0.0, min(0.2, end - time.monotonic())))
        for fd in r:
            c = open_[fd]
            try:
                data = c["sock"].recv(65536)
            except OSError:
                data = b""
            if data:
                if not c["bytes"]:
                    print("FLIGHT %s %d" % (c["kind"], c["i"]), flush=True)
                c["bytes"] += len(data)
                continue
            ms = int((time.monotonic() - c["t0"]) * 1000)
            print("CLOSED %s %d %d %d" % (c["kind"], c["i"], ms, c["bytes"]), flush=True)
            c["sock"].close()
            del open_[fd]
    for c in open_.values():
        print("OPEN %s %d %d" % (c["kind"], c["i"], c["bytes"]), flush=True)
        c["sock"].close()


if __name__ == "__main__":
    main()
