#!/usr/bin/env python3
"""fake-admin.py SPEC SOCKET LOG: a stand-in admin API on a unix socket for
the client's binding requests (bind, replace, unbind): each request is
checked against api/openapi.yaml (method and path of an operation, its
If-Match header, the JSON body against the operation's request schema) and
one line goes to LOG: "OK METHOD PATH if-match=ETAG body=JSON" or
"BAD METHOD PATH: why". Answers like the contract: 428 without If-Match,
201 (POST) or 200 with an ETag otherwise."""
import json
import os
import re
import socketserver
import sys
from http.server import BaseHTTPRequestHandler

import jsonschema
import yaml

spec_path, sock, log_path = sys.argv[1:4]
with open(spec_path) as f:
    spec = yaml.safe_load(f)


def operation(method, path):
    for tmpl, item in spec["paths"].items():
        rx = "^" + re.sub(r"\{[^}]+\}", "[^/]+", tmpl) + "$"
        if re.match(rx, path) and method.lower() in item:
            return tmpl, item[method.lower()]
    return None, None


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def answer(self, status, body, etag=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if etag:
            self.send_header("ETag", etag)
        self.end_headers()
        self.wfile.write(data)

    def handle_any(self):
        path = self.path.split("?")[0]
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        tmpl, op = operation(self.command, path)
        why = None
        body = None
        if not op:
            why = "no such operation in the contract"
        elif not self.headers.get("Authorization", "").startswith("Bearer "):
            why = "no bearer token"
        else:
            rb = op.get("requestBody")
            if rb:
                if self.headers.get("Content-Type") != "application/json":
                    why = "Content-Type is not application/json"
                else:
                    try:
                        body = json.loads(raw)
                        schema = dict(rb["content"]["application/json"]["schema"])
                        schema["components"] = spec["components"]
                        jsonschema.validate(body, schema)
                    except Exception as e:  # noqa: BLE001
                        why = f"body: {e}".splitlines()[0]
            elif raw:
                why = "a body where the contract has none"
        im = self.headers.get("If-Match")
        with open(log_path, "a") as f:
            if why:
                f.write(f"BAD {self.command} {path}: {why}\n")
            else:
                f.write(f"OK {self.command} {tmpl} if-match={im} body={json.dumps(body, sort_keys=True)}\n")
        if why:
            return self.answer(400, {"error": {"code": "bad_request", "field": None, "reason": why}})
        if not im:
            return self.answer(428, {"error": {"code": "precondition_required", "field": "If-Match",
                                               "reason": "a change needs If-Match with the listener's ETag"}})
        self.answer(201 if self.command == "POST" else 200, {"name": "www", "bindings": []}, etag='"e2"')

    do_POST = do_PUT = do_DELETE = do_GET = handle_any


class S(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):
        conn, _ = super().get_request()
        return conn, ("unix", 0)


if os.path.exists(sock):
    os.unlink(sock)
with S(sock, H) as s:
    s.serve_forever()
