#!/usr/bin/env python3
"""e2e helper (alerts.sh): streams cut short must not reach the other side
as a proper end.

  truncation.py backend PORTFILE
      A plaintext backend on 127.0.0.1, port 0 (written to PORTFILE), one
      thread per connection. The first line of what a connection sends is
      its TAG; it prints "open TAG" when that line is in. "reset-after": it
      answers "partial\\n" and closes with a reset (SO_LINGER 0). "halfclose"
      or "halflong": it answers "reply\\n", shuts its sending side (a
      half-close) and reads on. For every TAG but "reset-after", once the
      connection ends it prints "TAG END <bytes>" for an end (FIN) or
      "TAG RESET <bytes>" for a reset (bytes: all it read, TAG line included).
  truncation.py client PORT CA SNI MODE [VERDICTS]
      A TLS client; sends "MODE\\n" first. "cut": then ends TCP without
      close_notify; "clean": with close_notify; both print "SENT". "read":
      sends "reset-after\\n" and reads to the end. "halfclose": reads the
      reply up to close_notify, waits (up to 20 s) for the backend's verdict
      on it in the file VERDICTS, then sends more. "idle": sends nothing
      more, waits for the verdict, then reads. Any other MODE (e.g. "hold"):
      reads until the daemon ends the stream. "halflong": reads the reply up to close_notify,
      pauses 6 s (past the 5 s after which hsmtlsd once closed such a
      connection), sends "more-after-the-pause\\n", then ends with
      close_notify and prints "SENT" (or "SEND-FAILED"). The reading modes
      print "CLOSE_NOTIFY <data>" when the stream ended with close_notify,
      "CUT <data>" when it ended without one.
"""
import os
import socket
import ssl
import struct
import sys
import threading
import time

LOCK = threading.Lock()


def say(line):
    with LOCK:
        print(line, flush=True)


def serve(c):
    c.settimeout(30)
    got = b""
    tag = None
    how = "END"
    try:
        while True:
            d = c.recv(65536)
            if not d:
                break
            got += d
            if tag is None and b"\n" in got:
                tag = got.split(b"\n", 1)[0].decode(errors="replace")
                say("open " + tag)
                if tag == "reset-after":
                    c.sendall(b"partial\n")
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    c.close()
                    return
                if tag in ("halfclose", "halflong"):
                    c.sendall(b"reply\n")
                    c.shutdown(socket.SHUT_WR)
    except ConnectionResetError:
        how = "RESET"
    except socket.timeout:
        how = "TIMEOUT"
    c.close()
    say(f"{tag} {how} {len(got)}")


def backend(portfile):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    with open(portfile + ".tmp", "w") as f:
        f.write(str(srv.getsockname()[1]))
    os.rename(portfile + ".tmp", portfile)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def read_to_end(s, data=b""):
    """Reads s to its end: ("CLOSE_NOTIFY" or "CUT", what was read)."""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                return "CLOSE_NOTIFY", data
            data += d
    except (ssl.SSLEOFError, ConnectionResetError, ssl.SSLError):
        return "CUT", data


def wait_verdict(path, tag):
    """Waits (bounded) until the backend printed its verdict on tag."""
    end = time.monotonic() + 20
    while time.monotonic() < end:
        try:
            with open(path) as f:
                if any(line.startswith(tag + " ") for line in f):
                    return
        except OSError:
            pass
        time.sleep(0.05)


def client(port, ca, sni, mode, verdicts=None):
    ctx = ssl.create_default_context(cafile=ca)
    raw = socket.create_connection(("127.0.0.1", int(port)), timeout=20)
    s = ctx.wrap_socket(raw, server_hostname=sni, suppress_ragged_eofs=False)
    s.sendall(b"reset-after\n" if mode == "read" else mode.encode() + b"\n")
    if mode in ("cut", "clean"):
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
    if mode == "idle":
        wait_verdict(verdicts, mode)
    how, data = read_to_end(s)
    if mode == "halfclose":
        wait_verdict(verdicts, mode)
        try:
            s.sendall(b"more\n")
        except OSError:
            pass
    if mode == "halflong":
        time.sleep(6)  # the stimulus: silence past the 5 s of old
        try:
            s.sendall(b"more-after-the-pause\n")
            s.unwrap().close()
            print("SENT", flush=True)
        except (OSError, ValueError):
            print("SEND-FAILED", flush=True)
        return
    print((how + " " + data.decode(errors="replace")).strip(), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "backend":
        backend(sys.argv[2])
    else:
        client(*sys.argv[2:7])
