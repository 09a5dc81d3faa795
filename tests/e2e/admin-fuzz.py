#!/usr/bin/env python3
"""admin-fuzz.py SOCKET TOKEN N SEED: sends N mutated request bodies (JSON
that is cut, flipped, re-typed, nested, or padded) to the admin API's body
routes over its unix socket and checks that each answer is a documented
status with a JSON body (an Error object for 4xx/5xx), and that the server
stays up. Prints "ok N" or the first bad answer; exit 0 or 1."""
import http.client
import json
import random
import socket
import sys

sock_path, token, n, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rnd = random.Random(seed)


class UnixConnection(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(sock_path)


SEEDS = [
    ("/v1/keys/demo/02/csr", {"subject": "CN=x,O=y", "dns": ["a.test"], "ip": ["192.0.2.1"],
                              "email": ["a@b.test"], "uri": ["https://a.test/"]}),
    ("/v1/certificates", {"pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", "store": "both"}),
    # generation on a token that does not exist (mutations never make it "demo"), so nothing is made
    ("/v1/keys", {"token": "no-such-token", "label": "fuzz", "type": "rsa", "curve": "P-256"}),
]
WEIRD = [None, True, 0, -1, 2 ** 63, 1.5, "", "x" * 300, [], {}, [1, "a"], {"a": {"b": [None]}}, "\u0000", "\udfff"]


def mutate(obj):
    o = json.loads(json.dumps(obj))
    for _ in range(rnd.randint(1, 3)):
        k = rnd.choice(list(o.keys()) + ["extra"])
        c = rnd.random()
        if c < 0.4:
            o[k] = rnd.choice(WEIRD)
        elif c < 0.6:
            o.pop(k, None)
        elif c < 0.8 and isinstance(o.get(k), list):
            o[k] = o[k] + [rnd.choice(WEIRD)]
        else:
            o[k] = {"nested": o.get(k)}
    try:
        raw = json.dumps(o, ensure_ascii=rnd.random() < 0.5).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        raw = b"{}"
    c = rnd.random()
    if c < 0.15:
        raw = raw[: rnd.randint(0, len(raw))]
    elif c < 0.3:
        i = rnd.randrange(len(raw))
        raw = raw[:i] + bytes([rnd.randrange(256)]) + raw[i + 1:]
    elif c < 0.35:
        raw = b"[" * 1900 + b"]" * 1900  # deep, but under the test's max_body (4096)
    return raw


allowed = {200, 400, 404, 409, 413, 415, 422}
for i in range(n):
    path, base = rnd.choice(SEEDS)
    body = mutate(base)
    conn = UnixConnection("hsmtlsd")
    try:
        conn.request("POST", path, body=body, headers={"Authorization": "Bearer " + token,
                                                        "Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
    except OSError as e:
        print(f"request {i} to {path} failed: {e}; body {body[:200]!r}")
        sys.exit(1)
    finally:
        conn.close()
    if r.status not in allowed:
        print(f"request {i} to {path}: status {r.status}: {data[:300]!r}; body {body[:200]!r}")
        sys.exit(1)
    try:
        j = json.loads(data)
    except ValueError:
        print(f"request {i} to {path}: status {r.status} with a body that is not JSON: {data[:200]!r}")
        sys.exit(1)
    if r.status >= 400 and not (isinstance(j.get("error"), dict) and "reason" in j["error"]):
        print(f"request {i} to {path}: status {r.status} without an Error body: {data[:200]!r}")
        sys.exit(1)
print(f"ok {n}")  # (seed in the caller's note)
