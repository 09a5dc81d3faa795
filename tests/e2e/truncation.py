#!/usr/bin/env python3
"""e2e helper (alerts.sh): streams cut short must not reach the other side
as a proper end.

  truncation.py backend PORTFILE
      A plaintext backend on 127.0.0.1, port 0 (written to PORTFILE). For
      each connection: if the first line is "reset-after", it answers
      "partial\\n" and closes with a reset (SO_LINGER 0); otherwise it reads
      until the end and prints one line: "END <bytes>" for an end (FIN) or
      "RESET <bytes>" for a reset.
  truncation.py client PORT CA SNI MODE
      A TLS client. MODE "cut": sends "hello-cut\\n", then ends TCP without
      close_notify. MODE "clean": the same with close_notify. MODE "read":
      sends "reset-after\\n" and reads to the end; prints "CLOSE_NOTIFY
      <data>" when the stream ended with close_notify, "CUT <data>" when it
      ended without one.
"""
import socket
import ssl
import struct
import sys


def backend(portfile):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    with open(portfile + ".tmp", "w") as f:
        f.write(str(srv.getsockname()[1]))
    import os
    os.rename(portfile + ".tmp", portfile)
    while True:
        c, _ = srv.accept()
        c.settimeout(30)
        got = b""
        how = "END"
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    break
                got += d
                if got.startswith(b"reset-after\n"):
                    c.sendall(b"partial\n")
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    how = "SENT-RESET"
                    break
        except ConnectionResetError:
            how = "RESET"
        except socket.timeout:
            how = "TIMEOUT"
        c.close()
        if how != "SENT-RESET":
            print(f"{how} {len(got)}", flush=True)


def client(port, ca, sni, mode):
    ctx = ssl.create_default_context(cafile=ca)
    raw = socket.create_connection(("127.0.0.1", int(port)), timeout=20)
    s = ctx.wrap_socket(raw, server_hostname=sni, suppress_ragged_eofs=False)
    if mode in ("cut", "clean"):
        s.sendall(b"hello-cut\n")
        if mode == "clean":
            s.unwrap().close()
        else:
            # TCP's end, no TLS close_notify: the base class, not SSLSocket
            socket.socket.shutdown(s, socket.SHUT_WR)
            try:
                socket.socket.recv(s, 1)
            except OSError:
                pass
            socket.socket.close(s)
        print("SENT", flush=True)
        return
    s.sendall(b"reset-after\n")
    data = b""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                print("CLOSE_NOTIFY " + data.decode(errors="replace").strip(), flush=True)
                return
            data += d
    except (ssl.SSLEOFError, ConnectionResetError, ssl.SSLError) as e:
        print("CUT " + data.decode(errors="replace").strip(), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "backend":
        backend(sys.argv[2])
    else:
        client(*sys.argv[2:6])
