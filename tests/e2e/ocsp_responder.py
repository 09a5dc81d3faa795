#!/usr/bin/env python3
"""A small OCSP responder on 127.0.0.1 (port 0; prints "PORT N"), for
ocsp-auto.sh where `openssl ocsp` cannot help: responses valid for only a
few seconds. Answers each POST about the first certificate of CHAIN (read
at each request), signed by the CA, with thisUpdate now - 1 s and
nextUpdate now + VALIDITY s, for the first GOOD requests; after that HTTP
503 (a responder gone bad). Prints "REQUEST n status nonce=HEX" for each
request (the request's nonce, "-" when it has none). NONCE (default
"none"): "none" sends no nonce; "wrong" sends a nonce that is not the
request's (an answer replayed from another request). STATUSES (default
"good"): a comma-separated list, the status of the nth answer (the last
one repeats): "good", "revoked", or "old-good": good with a thisUpdate an
hour ago (an answer made before a revocation, replayed).

usage: ocsp_responder.py CHAIN CA-CERT CA-KEY VALIDITY GOOD [none|wrong [STATUSES]]"""
import datetime
import http.server
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

chain, ca_cert, ca_key, validity, good = sys.argv[1:6]
nonce_mode = sys.argv[6] if len(sys.argv) > 6 else "none"
statuses = (sys.argv[7] if len(sys.argv) > 7 else "good").split(",")
count = 0


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        global count
        count += 1
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            asked = ocsp.load_der_ocsp_request(body).extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
        except (ValueError, x509.ExtensionNotFound):
            asked = None
        seen = asked.hex() if asked else "-"
        if count > int(good):
            print("REQUEST %d 503 nonce=%s" % (count, seen), flush=True)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        leaf = x509.load_pem_x509_certificates(open(chain, "rb").read())[0]
        ca = x509.load_pem_x509_certificate(open(ca_cert, "rb").read())
        key = serialization.load_pem_private_key(open(ca_key, "rb").read(), password=None)
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        status = statuses[min(count, len(statuses)) - 1]
        this_update = now - datetime.timedelta(seconds=3600 if status == "old-good" else 1)
        builder = ocsp.OCSPResponseBuilder()
        if nonce_mode == "wrong":
            builder = builder.add_extension(x509.OCSPNonce(os.urandom(len(asked or b"0123456789abcdef"))), critical=False)
        resp = builder.add_response(
            cert=leaf, issuer=ca, algorithm=hashes.SHA1(),
            cert_status=ocsp.OCSPCertStatus.REVOKED if status == "revoked" else ocsp.OCSPCertStatus.GOOD,
            this_update=this_update,
            next_update=now + datetime.timedelta(seconds=int(validity)),
            revocation_time=now - datetime.timedelta(days=1) if status == "revoked" else None, revocation_reason=None,
        ).responder_id(ocsp.OCSPResponderEncoding.HASH, ca).sign(key, hashes.SHA256())
        der = resp.public_bytes(serialization.Encoding.DER)
        print("REQUEST %d 200 nonce=%s %s" % (count, seen, status), flush=True)
        self.send_response(200)
        self.send_header("Content-Type", "application/ocsp-response")
        self.send_header("Content-Length", str(len(der)))
        self.end_headers()
        self.wfile.write(der)


srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
print("PORT %d" % srv.server_address[1], flush=True)
srv.serve_forever()
