/* libFuzzer target: a PEM chain uploaded to POST /v1/certificates
 * (admin_parse_chain in src/admin/parse.c: GnuTLS's PEM and X.509 parsers,
 * the order and signature check of the chain, the leaf's fingerprint and
 * SPKI hash). Checks: a refusal is 400 (does not parse) or 422 (out of
 * order, not signed by the next) about /pem, and frees everything; an
 * accepted chain has at least one certificate, a fingerprint of 64 hex
 * digits that is the SHA-256 of the leaf's DER, and each certificate
 * verifies against the next. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/crypto.h>

#include "parse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        struct admin_chain c = { NULL, 0 };
        struct admin_perr e;
        char fp[65];
        uint8_t spki[32];
        if (admin_parse_chain((const char *)data, size, &c, fp, spki, &e) < 0) {
                if (c.crts || c.n)
                        abort(); /* a refusal keeps nothing */
                if ((e.status != 400 && e.status != 422) || strcmp(e.field, "/pem") != 0 || !e.reason[0])
                        abort();
                return 0;
        }
        if (c.n < 1 || strlen(fp) != 64 || strspn(fp, "0123456789abcdef") != 64)
                abort();
        gnutls_datum_t der = { NULL, 0 };
        uint8_t d[32];
        char hex[65];
        if (gnutls_x509_crt_export2(c.crts[0], GNUTLS_X509_FMT_DER, &der) < 0 ||
            gnutls_hash_fast(GNUTLS_DIG_SHA256, der.data, der.size, d) < 0)
                abort();
        hex_encode(d, 32, hex);
        if (strcmp(hex, fp) != 0)
                abort();
        gnutls_free(der.data);
        for (unsigned i = 0; i + 1 < c.n; i++) {
                unsigned status = 0;
                if (gnutls_x509_crt_verify(c.crts[i], &c.crts[i + 1], 1, 0, &status) < 0 || status)
                        abort();
        }
        admin_chain_done(&c);
        return 0;
}
