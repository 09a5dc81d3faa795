#!/usr/bin/env python3
"""Re-issues the leaf of CHAIN (same subject, public key and SAN, a new
serial) with an Authority Information Access naming the OCSP responder URL,
signed by the CA; writes OUT (leaf then CA: a chain for 'cert') and prints
the leaf's line for an `openssl ocsp -index` file. For ocsp-auto.sh.

usage: mk_aia_cert.py CHAIN CA-CERT CA-KEY URL OUT"""
import datetime
import sys
import warnings

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID


def main():
    warnings.simplefilter("ignore")
    chain, ca_cert, ca_key, url, out = sys.argv[1:6]
    old = x509.load_pem_x509_certificates(open(chain, "rb").read())[0]
    ca_pem = open(ca_cert, "rb").read()
    ca = x509.load_pem_x509_certificate(ca_pem)
    key = serialization.load_pem_private_key(open(ca_key, "rb").read(), password=None)
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    b = (x509.CertificateBuilder()
         .subject_name(old.subject)
         .issuer_name(old.issuer)
         .public_key(old.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(days=30)))
    for ext in old.extensions:
        if ext.oid in (ExtensionOID.AUTHORITY_INFORMATION_ACCESS, ExtensionOID.AUTHORITY_KEY_IDENTIFIER):
            continue
        b = b.add_extension(ext.value, ext.critical)
    b = b.add_extension(x509.AuthorityInformationAccess([
        x509.AccessDescription(AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(url))]), False)
    try:  # the CA's own key identifier (certtool's is not always SHA-1 of the key)
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key())
    b = b.add_extension(aki, False)
    leaf = b.sign(key, hashes.SHA256())
    with open(out, "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM) + ca_pem)
    exp = leaf.not_valid_after.strftime("%y%m%d%H%M%SZ")
    subj = "".join("/%s=%s" % (a.rfc4514_attribute_name, a.value) for a in leaf.subject)
    print("V\t%s\t\t%X\tunknown\t%s" % (exp, leaf.serial_number, subj))


if __name__ == "__main__":
    main()
