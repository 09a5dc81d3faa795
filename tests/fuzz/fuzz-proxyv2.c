/* libFuzzer target: the PROXY v2 header built from hostile certificate
 * fields and session strings (hsm_proxy_v2_build_tls()). The input is cut
 * at 0xFF bytes into fields: [0] mode, then SNI, cipher, version, and the
 * subject: CN, O, OU, C, L, ST, emailAddress (mode bit 0: those as raw DER
 * values, else as strings; mode bit 1: the rest of the input is a DER
 * certificate instead). The certificate is signed with a fixed key. Checks:
 * the header's length field and every TLV length add up exactly, the
 * signature and version are right, and the SSL TLV is well formed. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/abstract.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include "proxyproto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static gnutls_x509_privkey_t key;

static void init(void)
{
        if (key)
                return;
        gnutls_global_init();
        if (gnutls_x509_privkey_init(&key) < 0 || gnutls_x509_privkey_generate(key, GNUTLS_PK_ECDSA, 256, 0) < 0)
                abort();
}

static size_t walk_tlvs(const uint8_t *p, size_t n)
{
        size_t off = 0;
        while (off < n) {
                if (n - off < 3)
                        abort();
                size_t len = ((size_t)p[off + 1] << 8) | p[off + 2];
                if (len > n - off - 3)
                        abort();
                if (p[off] == 0x20) { /* PP2_TYPE_SSL: client, verify, sub-TLVs */
                        if (len < 5)
                                abort();
                        walk_tlvs(p + off + 3 + 5, len - 5);
                }
                off += 3 + len;
        }
        return off;
}

static void check_header(const uint8_t *h, size_t n)
{
        static const uint8_t sig[12] = { 0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A };
        if (n < 16 || memcmp(h, sig, 12) != 0 || h[12] != 0x21)
                abort();
        size_t len = ((size_t)h[14] << 8) | h[15];
        if (len != n - 16)
                abort();
        size_t addr = h[13] == 0x11 ? 12 : h[13] == 0x21 ? 36 : h[13] == 0x00 ? 0 : (abort(), 0);
        if (addr > len)
                abort();
        walk_tlvs(h + 16 + addr, len - addr);
}

/* The next field (up to a 0xFF byte, or the end) as a NUL-terminated copy. */
static char *field(const uint8_t **p, const uint8_t *end, size_t *ret_len)
{
        const uint8_t *q = *p;
        while (q < end && *q != 0xFF)
                q++;
        size_t n = (size_t)(q - *p);
        char *s = malloc(n + 1);
        if (!s)
                abort();
        memcpy(s, *p, n);
        s[n] = 0;
        *ret_len = n;
        *p = q < end ? q + 1 : q;
        return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        init();
        if (size < 1 || size > 70000)
                return 0;
        const uint8_t *p = data + 1, *end = data + size;
        unsigned mode = data[0];
        size_t n;
        char *sni = field(&p, end, &n), *cipher = field(&p, end, &n), *version = field(&p, end, &n);
        gnutls_x509_crt_t crt = NULL;
        if (gnutls_x509_crt_init(&crt) < 0)
                abort();
        bool have = false;
        if (mode & 2) {
                gnutls_datum_t der = { (unsigned char *)p, (unsigned)(end - p) };
                have = gnutls_x509_crt_import(crt, &der, GNUTLS_X509_FMT_DER) >= 0;
        } else {
                static const char *const oids[] = { GNUTLS_OID_X520_COMMON_NAME, GNUTLS_OID_X520_ORGANIZATION_NAME,
                                                    GNUTLS_OID_X520_ORGANIZATIONAL_UNIT_NAME, GNUTLS_OID_X520_COUNTRY_NAME,
                                                    GNUTLS_OID_X520_LOCALITY_NAME, GNUTLS_OID_X520_STATE_OR_PROVINCE_NAME,
                                                    GNUTLS_OID_PKCS9_EMAIL };
                for (size_t i = 0; i < sizeof(oids) / sizeof(oids[0]) && p < end; i++) {
                        char *v = field(&p, end, &n);
                        if (n > 0)
                                (void)gnutls_x509_crt_set_dn_by_oid(crt, oids[i], mode & 1, v, (unsigned)n);
                        free(v);
                }
                unsigned char serial[1] = { 1 };
                have = gnutls_x509_crt_set_version(crt, 3) >= 0 && gnutls_x509_crt_set_serial(crt, serial, 1) >= 0 &&
                       gnutls_x509_crt_set_activation_time(crt, 1000000000) >= 0 &&
                       gnutls_x509_crt_set_expiration_time(crt, 2000000000) >= 0 && gnutls_x509_crt_set_key(crt, key) >= 0 &&
                       gnutls_x509_crt_sign2(crt, crt, key, GNUTLS_DIG_SHA256, 0) >= 0;
        }
        hsm_pp2_tls t = {
                .version = *version ? version : NULL,
                .cipher = *cipher ? cipher : NULL,
                .sni = *sni ? sni : NULL,
                .peer = have ? crt : NULL,
                .resumed = mode & 4,
        };
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(40000) }, d = a;
        struct sockaddr_in6 a6 = { .sin6_family = AF_INET6, .sin6_port = htons(40000) }, d6 = a6;
        a.sin_addr.s_addr = htonl(0x7f000001);
        d.sin_addr.s_addr = htonl(0x7f000002);
        uint8_t *h = NULL;
        size_t hn = 0;
        const struct sockaddr *src = mode & 8 ? (const struct sockaddr *)&a6 : (const struct sockaddr *)&a;
        const struct sockaddr *dst = mode & 8 ? (const struct sockaddr *)&d6 : (const struct sockaddr *)&d;
        if (hsm_proxy_v2_build_tls(&t, src, dst, &h, &hn) == 0) {
                check_header(h, hn);
                free(h);
        }
        gnutls_x509_crt_deinit(crt);
        free(sni);
        free(cipher);
        free(version);
        return 0;
}
