#!/usr/bin/env python3
"""A TLS 1.3 client that sends its change_cipher_spec record (RFC 8446 D.4,
middlebox compatibility) in a segment of its own, waits until the server
has read it from the socket (the server side's receive queue of this
connection is empty, /proc/net/tcp), and only then sends its Finished.

Usage: split_ccs.py PORT CAFILE
Prints "CCS READ" once the server took the CCS, then "DONE" when the
handshake is done on the client, and exits 0; exits 1 otherwise.
"""
import socket
import ssl
import sys
import time

CCS = bytes([20, 3, 3, 0, 1, 1])


def server_rx_queue(port, peer_port):
    """The receive queue of the server's socket of this connection, or None."""
    want_local, want_remote = "%04X" % port, "%04X" % peer_port
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1].split(":")[1], fields[2].split(":")[1]
            if local == want_local and remote == want_remote:
                return int(fields[4].split(":")[1], 16)
    return None


def main():
    port, cafile = int(sys.argv[1]), sys.argv[2]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="www.hsmtls.test")
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(30)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    s.sendall(out.read())
    while True:
        data = s.recv(65536)
        if not data:
            sys.exit("the server closed before its flight was in")
        inc.write(data)
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            continue
    flight = out.read()
    if not flight.startswith(CCS) or len(flight) <= len(CCS):
        sys.exit("the client's second flight does not start with a CCS record")
    s.sendall(flight[:len(CCS)])
    end = time.monotonic() + 30
    while server_rx_queue(port, s.getsockname()[1]) != 0:
        if time.monotonic() > end:
            sys.exit("the server did not read the CCS")
        time.sleep(0.01)
    print("CCS READ", flush=True)
    s.sendall(flight[len(CCS):])
    print("DONE", flush=True)
    s.shutdown(socket.SHUT_WR)
    try:
        while s.recv(65536):
            pass
    except OSError:
        pass
    s.close()


if __name__ == "__main__":
    main()
