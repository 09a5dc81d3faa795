#!/usr/bin/env python3
"""Writes a DER OCSP response about the first certificate of CHAIN, signed
by the CA (CA-CERT, CA-KEY), for the OCSP stapling tests (ocsp.sh).

usage: mk_ocsp.py CHAIN CA-CERT CA-KEY good|revoked THIS-UPDATE NEXT-UPDATE OUT
THIS-UPDATE, NEXT-UPDATE: seconds from now (negative: in the past)."""
import datetime
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp


def main():
    chain, ca_cert, ca_key, status, this_s, next_s, out = sys.argv[1:8]
    leaf = x509.load_pem_x509_certificates(open(chain, "rb").read())[0]
    ca = x509.load_pem_x509_certificate(open(ca_cert, "rb").read())
    key = serialization.load_pem_private_key(open(ca_key, "rb").read(), password=None)
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    revoked = status == "revoked"
    b = ocsp.OCSPResponseBuilder().add_response(
        cert=leaf,
        issuer=ca,
        algorithm=hashes.SHA1(),
        cert_status=ocsp.OCSPCertStatus.REVOKED if revoked else ocsp.OCSPCertStatus.GOOD,
        this_update=now + datetime.timedelta(seconds=int(this_s)),
        next_update=now + datetime.timedelta(seconds=int(next_s)),
        revocation_time=now - datetime.timedelta(days=1) if revoked else None,
        revocation_reason=None,
    ).responder_id(ocsp.OCSPResponderEncoding.HASH, ca)
    resp = b.sign(key, hashes.SHA256())
    with open(out + ".tmp", "wb") as f:
        f.write(resp.public_bytes(serialization.Encoding.DER))
    import os
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()
