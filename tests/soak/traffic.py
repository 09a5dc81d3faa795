#!/usr/bin/env python3
"""Soak traffic through hsmtlsd (tests/soak/run): one client loop for SECONDS.

  traffic.py echo   PORT SNI CAFILE SECONDS  full handshakes, each carrying
                                             64 KiB to the echo backend and back
  traffic.py resume PORT SNI CAFILE SECONDS  resumed handshakes, TLS 1.2 and
                                             1.3 in turn, one HTTP request each

Prints "ERR EPOCH_MS reason" for every failed connection (the soak checks
the time against its fault windows), then "SUMMARY ok=N err=N resumed=N
full=N bytes=N".
"""
import os
import socket
import ssl
import sys
import time


def now_ms():
    return int(time.time() * 1000)


def main():
    mode, port, sni, cafile, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
    end = time.monotonic() + seconds
    ctxs = {}
    for v in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        c = ssl.create_default_context(cafile=cafile)
        c.minimum_version = c.maximum_version = v
        ctxs[v] = c
    sessions = {}
    ok = err = resumed = full = nbytes = 0
    i = 0
    blob = os.urandom(65536)
    while time.monotonic() < end:
        v = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)[i % 2] if mode == "resume" else ssl.TLSVersion.TLSv1_3
        i += 1
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with ctxs[v].wrap_socket(raw, server_hostname=sni, session=sessions.get(v) if mode == "resume" else None) as s:
                    if mode == "echo":
                        s.sendall(blob)
                        got = bytearray()
                        while len(got) < len(blob):
                            b = s.recv(65536)
                            if not b:
                                break
                            got += b
                        if bytes(got) != blob:
                            raise OSError("echo: %d of %d bytes came back, or different ones" % (len(got), len(blob)))
                        nbytes += len(got)
                    else:
                        s.sendall(b"GET /soak HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % sni.encode())
                        got = bytearray()
                        while True:
                            b = s.recv(65536)
                            if not b:
                                break
                            got += b
                        if b"hello from backend" not in got:
                            raise OSError("no answer from the backend")
                        nbytes += len(got)
                    if s.session_reused:
                        resumed += 1
                    else:
                        full += 1
                    sessions[v] = s.session
            ok += 1
        except (OSError, ssl.SSLError) as e:
            err += 1
            sessions.pop(v, None)
            print("ERR %d %s" % (now_ms(), str(e).replace("\n", " ")), flush=True)
            time.sleep(0.05)
        if mode == "resume":
            time.sleep(0.01)
    print("SUMMARY ok=%d err=%d resumed=%d full=%d bytes=%d" % (ok, err, resumed, full, nbytes), flush=True)


if __name__ == "__main__":
    main()
