#!/usr/bin/env python3
"""The CPU gate's arrival order, for cpu-gate.sh.

Sends TLS 1.3 ClientHellos, one connection each, in the order of LABELS
(the key each one asks for: a ClientHello whose signature_algorithms list
holds only that key's scheme, so the server signs with that key). The
first one must reach the token (a new line in the slowtoken sign log) and
is held there (slowtoken's control file says "hold"), holding the daemon's
only CPU slot. Each next one is sent only once every earlier one is
accounted for: in the sign log, or waiting for the CPU slot (the daemon's
SIGUSR1 line "handshakes: ... cpu_waiting=N"), so the order they arrived
in is known, not guessed from timing. Then it waits until every one of
them reached the token and prints the order of their C_SignInit calls:

  ORDER p256 rsa2048 p384 ...

then releases the hold, reads each server flight and closes.

Usage: gate_order.py PORT DAEMON_PID DAEMON_LOG SIGN_LOG CONTROL_FILE LABEL...
"""
import importlib.util
import os
import re
import signal
import socket
import ssl
import sys
import time

SCHEME = {"p256": 0x0403, "p384": 0x0503, "rsa2048": 0x0804, "ed25519": 0x0807}
LIMIT = 30.0


def base_hello():
    """A TLS 1.3 ClientHello record: stall-client.py's."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stall-client.py")
    spec = importlib.util.spec_from_file_location("stall_client", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.client_hello(ssl.TLSVersion.TLSv1_3)


def with_scheme(rec, scheme):
    """The ClientHello record rec with signature_algorithms = [scheme]."""
    body = rec[9:]  # record header (5), handshake type and length (4)
    p = 2 + 32
    p += 1 + body[p]  # session id
    p += 2 + int.from_bytes(body[p:p + 2], "big")  # cipher suites
    p += 1 + body[p]  # compression methods
    end = p + 2 + int.from_bytes(body[p:p + 2], "big")
    q, exts = p + 2, b""
    while q < end:
        t, n = int.from_bytes(body[q:q + 2], "big"), int.from_bytes(body[q + 2:q + 4], "big")
        data = body[q + 4:q + 4 + n]
        q += 4 + n
        if t == 13:
            data = (2).to_bytes(2, "big") + scheme.to_bytes(2, "big")
        exts += t.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data
    hello = body[:p] + len(exts).to_bytes(2, "big") + exts
    msg = bytes([1]) + len(hello).to_bytes(3, "big") + hello
    return rec[:3] + len(msg).to_bytes(2, "big") + msg


def sign_log(path, skip):
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = []
    return [re.search(r"label=(\S+)", l).group(1) for l in lines[skip:] if "label=" in l]


def cpu_waiting(pid, log):
    """Sends SIGUSR1 and returns cpu_waiting= of the new "handshakes:" line."""
    off = os.path.getsize(log)
    os.kill(pid, signal.SIGUSR1)
    end = time.monotonic() + LIMIT
    while time.monotonic() < end:
        with open(log) as f:
            f.seek(off)
            m = re.search(r"handshakes: shed=.* cpu_waiting=(\d+)", f.read())
        if m:
            return int(m.group(1))
        time.sleep(0.02)
    sys.exit("no 'handshakes: ... cpu_waiting=' line after SIGUSR1")


def wait_for(what, cond):
    end = time.monotonic() + LIMIT
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    sys.exit("timed out waiting for " + what)


def write_control(path, words):
    with open(path + ".tmp", "w") as f:
        f.write(words + "\n")
    os.replace(path + ".tmp", path)


def main():
    port, pid, log, slog, control = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    labels = sys.argv[6:]
    base = base_hello()
    skip = len(sign_log(slog, 0))
    conns = []
    for i, label in enumerate(labels):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(with_scheme(base, SCHEME[label]))
        conns.append(s)
        if i == 0:
            wait_for("the first handshake at the token", lambda: len(sign_log(slog, skip)) >= 1)
        else:
            # at the token (read first) or waiting for the slot: never counted twice
            wait_for("handshake %d in the gate's queue" % i,
                     lambda: len(sign_log(slog, skip)) + cpu_waiting(pid, log) >= i + 1)
        print("SENT %s" % label, flush=True)
    wait_for("every handshake at the token", lambda: len(sign_log(slog, skip)) >= len(labels))
    print("ORDER " + " ".join(sign_log(slog, skip)), flush=True)
    write_control(control, "present")
    flights = 0
    for s in conns:
        s.settimeout(LIMIT)
        try:
            if s.recv(65536):
                flights += 1
        except OSError:
            pass
        s.close()
    print("FLIGHTS %d" % flights, flush=True)


if __name__ == "__main__":
    main()
