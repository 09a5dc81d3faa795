#!/usr/bin/env python3
"""A minimal TLS 1.2 client with static RSA key exchange, for tests.

It speaks just enough TLS 1.2 (TLS_RSA_WITH_AES_128_GCM_SHA256) to send a
ClientKeyExchange of our own making: a good premaster, or a ciphertext whose
PKCS#1 v1.5 padding is bad in a chosen way, followed by ChangeCipherSpec and
a Finished that is right or tampered with. It reports what the server did:
the alert it sent (or its CCS and a Finished that verifies), how the
connection ended (EOF, reset) and how long the server took to answer the
flight ClientKeyExchange + ChangeCipherSpec + Finished.

Used by tests/e2e/rsa-kx-tamper.sh and tests/bench/rsa-kx-timing. Needs only
python3 and python3-cryptography (AES-GCM, X.509 parsing); raw RSA is pow().

    rsakx_client.py --port P [--host H] [--sni NAME] CASE [CASE...]

prints one JSON object per CASE. CASES: see CASES below.
"""
import hashlib
import hmac
import json
import os
import socket
import struct
import sys
import time

from cryptography import x509
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SUITE = 0x009C  # TLS_RSA_WITH_AES_128_GCM_SHA256

# case name -> what the ClientKeyExchange holds. The Finished is made with
# the client's premaster; with a bad ClientKeyExchange the server has another
# (synthetic) one, so the record fails like the tampered one of
# "bad-finished" (which is changed on the wire, as by someone without keys).
CASES = {
    "good": "a good premaster, a good Finished",
    "bad-finished": "a good premaster, a tampered Finished",
    "bad-type": "block type 01 instead of 02",
    "bad-first": "first byte 01 instead of 00",
    "no-separator": "no zero byte before the premaster",
    "short-ps": "a zero after 4 bytes of padding (PS shorter than 8)",
    "pm47": "valid padding, a 47-byte premaster",
    "pm49": "valid padding, a 49-byte premaster",
    "bad-version": "valid padding, premaster version 02 00",
    "zero-ct": "an all-zero ciphertext",
    "random-ct": "a random ciphertext below the modulus",
}


def p_hash(secret, seed, n, h=hashlib.sha256):
    out, a = b"", seed
    while len(out) < n:
        a = hmac.new(secret, a, h).digest()
        out += hmac.new(secret, a + seed, h).digest()
    return out[:n]


def prf(secret, label, seed, n):
    return p_hash(secret, label + seed, n)


def record(ctype, body):
    return struct.pack(">BHH", ctype, 0x0303, len(body)) + body


def handshake_msg(htype, body):
    return struct.pack(">B", htype) + len(body).to_bytes(3, "big") + body


def client_hello(rnd, sni):
    exts = b""
    if sni:
        name = sni.encode()
        sn = struct.pack(">BH", 0, len(name)) + name
        sn = struct.pack(">H", len(sn)) + sn
        exts += struct.pack(">HH", 0, len(sn)) + sn
    algs = [0x0401, 0x0501, 0x0804, 0x0805]
    sa = struct.pack(">H", 2 * len(algs)) + b"".join(struct.pack(">H", a) for a in algs)
    exts += struct.pack(">HH", 13, len(sa)) + sa
    exts += struct.pack(">HHB", 0xFF01, 1, 0)  # renegotiation_info, empty
    body = struct.pack(">H", 0x0303) + rnd + b"\x00"
    body += struct.pack(">HH", 2, SUITE) + b"\x01\x00"
    body += struct.pack(">H", len(exts)) + exts
    return handshake_msg(1, body)


class Conn:
    def __init__(self, host, port, timeout=10):
        self.s = socket.create_connection((host, port), timeout=timeout)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def read_exact(self, n):
        while len(self.buf) < n:
            d = self.s.recv(65536)
            if not d:
                raise EOFError("connection closed")
            self.buf += d
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_record(self):
        hdr = self.read_exact(5)
        ctype, _, ln = struct.unpack(">BHH", hdr)
        return ctype, self.read_exact(ln)

    def close_behaviour(self, limit=5.0):
        """What follows the last record: 'eof', 'reset', 'data' or 'open'."""
        self.s.settimeout(limit)
        try:
            while True:
                if self.buf:
                    return "data"
                d = self.s.recv(65536)
                if not d:
                    return "eof"
                self.buf += d
        except ConnectionResetError:
            return "reset"
        except socket.timeout:
            return "open"

    def close(self):
        self.s.close()


def server_flight(c):
    """Reads ServerHello .. ServerHelloDone; returns (transcript, server_random, cert_der)."""
    transcript, hs, srand, cert = b"", b"", None, None
    while True:
        ctype, body = c.read_record()
        if ctype == 21:
            raise RuntimeError("alert %d/%d during the server flight" % (body[0], body[1]))
        if ctype != 22:
            raise RuntimeError("unexpected record type %d" % ctype)
        hs += body
        while len(hs) >= 4:
            ln = int.from_bytes(hs[1:4], "big")
            if len(hs) < 4 + ln:
                break
            msg, hs = hs[: 4 + ln], hs[4 + ln :]
            transcript += msg
            t, b = msg[0], msg[4:]
            if t == 2:
                srand = b[2:34]
                sid_len = b[34]
                suite = struct.unpack(">H", b[35 + sid_len : 37 + sid_len])[0]
                if suite != SUITE:
                    raise RuntimeError("server chose suite 0x%04x" % suite)
            elif t == 11:
                cert = b[6 : 6 + int.from_bytes(b[3:6], "big")]
            elif t == 14:
                return transcript, srand, cert


def pkcs1_block(k, msg, bt=2, first=0, sep=True):
    ps_len = k - 3 - len(msg)
    ps = bytes((x % 255) + 1 for x in os.urandom(ps_len))
    return bytes([first, bt]) + ps + (b"\x00" if sep else b"\x01") + msg


def make_ciphertext(case, n, e, pms):
    k = (n.bit_length() + 7) // 8
    if case in ("good", "bad-finished"):
        em = pkcs1_block(k, pms)
    elif case == "bad-type":
        em = pkcs1_block(k, pms, bt=1)
    elif case == "bad-first":
        em = pkcs1_block(k, pms, first=1)
    elif case == "no-separator":  # and no zero byte in the premaster either
        em = pkcs1_block(k, bytes(b or 1 for b in pms), sep=False)
    elif case == "short-ps":
        em = bytearray(pkcs1_block(k, pms))
        em[6] = 0
        em = bytes(em)
    elif case == "pm47":
        em = pkcs1_block(k, pms[:47])
    elif case == "pm49":
        em = pkcs1_block(k, pms + b"\x42")
    elif case == "bad-version":
        em = pkcs1_block(k, b"\x02\x00" + pms[2:])
    elif case == "zero-ct":
        return bytes(k)
    elif case == "random-ct":
        return (int.from_bytes(os.urandom(k), "big") % n).to_bytes(k, "big")
    else:
        raise ValueError("unknown case " + case)
    return pow(int.from_bytes(em, "big"), e, n).to_bytes(k, "big")


def public_key(cert_der):
    pub = x509.load_der_x509_certificate(cert_der).public_key().public_numbers()
    return pub.n, pub.e


def run(host, port, case, sni=None, ciphertext=None, timeout=10):
    """One connection. ciphertext: a fixed ClientKeyExchange ciphertext to
    send (the benchmark), else one is made for case. Returns a dict."""
    crand = os.urandom(32)
    pms = b"\x03\x03" + os.urandom(46)
    c = Conn(host, port, timeout)
    res = {"case": case, "local_port": c.s.getsockname()[1]}
    try:
        ch = client_hello(crand, sni)
        c.s.sendall(record(22, ch))
        transcript, srand, cert = server_flight(c)
        transcript = ch + transcript
        n, e = public_key(cert)
        ct = ciphertext if ciphertext is not None else make_ciphertext(case, n, e, pms)
        cke = handshake_msg(16, struct.pack(">H", len(ct)) + ct)
        transcript += cke
        master = prf(pms, b"master secret", crand + srand, 48)
        kb = prf(master, b"key expansion", srand + crand, 40)
        ckey, skey, civ, siv = kb[0:16], kb[16:32], kb[32:36], kb[36:40]
        verify = prf(master, b"client finished", hashlib.sha256(transcript).digest(), 12)
        fin = handshake_msg(20, verify)
        explicit = bytes(8)
        aad = bytes(8) + struct.pack(">BHH", 22, 0x0303, len(fin))
        enc = bytearray(explicit + AESGCM(ckey).encrypt(civ + explicit, fin, aad))
        if case == "bad-finished":
            enc[-3] ^= 0x5A  # on the wire, as an attacker without the keys would
        enc = bytes(enc)
        flight = record(22, cke) + record(20, b"\x01") + record(22, enc)
        t0 = time.perf_counter_ns()
        c.s.sendall(flight)
        c.s.settimeout(timeout)
        first = c.s.recv(65536)
        t1 = time.perf_counter_ns()
        res["us"] = (t1 - t0) / 1000.0
        if not first:
            res["answer"] = "eof"
            res["close"] = "eof"
            return res
        c.buf = first
        ctype, body = c.read_record()
        if ctype == 21:
            res["answer"] = "alert"
            res["alert"] = [body[0], body[1]] if len(body) == 2 else None
        elif ctype == 20:
            res["answer"] = "ccs"
            ctype, body = c.read_record()
            sfin = handshake_msg(20, prf(master, b"server finished",
                                         hashlib.sha256(transcript + handshake_msg(20, verify)).digest(), 12))
            nonce = siv + body[:8]
            aad = body[:8] + struct.pack(">BHH", 22, 0x0303, len(body) - 24)
            try:
                res["server_finished_ok"] = AESGCM(skey).decrypt(nonce, body[8:], aad) == sfin
            except Exception:
                res["server_finished_ok"] = False
            return res
        else:
            res["answer"] = "record %d" % ctype
        res["close"] = c.close_behaviour()
        return res
    except (EOFError, ConnectionResetError) as ex:
        res["answer"] = res.get("answer", "error")
        res["error"] = str(ex)
        return res
    finally:
        c.close()


def main(argv):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--sni")
    ap.add_argument("cases", nargs="+", choices=sorted(CASES))
    a = ap.parse_args(argv)
    for case in a.cases:
        print(json.dumps(run(a.host, a.port, case, a.sni)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
