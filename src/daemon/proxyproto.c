#include "proxyproto.h"

#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/x509.h>

static const uint8_t signature[12] = { 0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A };

enum {
        PP2_TYPE_ALPN = 0x01,
        PP2_TYPE_AUTHORITY = 0x02,
        PP2_TYPE_SSL = 0x20,
        PP2_SUBTYPE_SSL_VERSION = 0x21,
        PP2_SUBTYPE_SSL_CN = 0x22,
        PP2_SUBTYPE_SSL_CIPHER = 0x23,
        PP2_SUBTYPE_SSL_SIG_ALG = 0x24,
        PP2_SUBTYPE_SSL_KEY_ALG = 0x25,
        PP2_CLIENT_SSL = 0x01,
        PP2_CLIENT_CERT_CONN = 0x02,
        PP2_CLIENT_CERT_SESS = 0x04,
};

struct buf {
        uint8_t *p;
        size_t len, cap;
};

static int put(struct buf *b, const void *data, size_t n)
{
        if (b->len + n > b->cap) {
                size_t cap = (b->cap ? b->cap * 2 : 256) + n;
                uint8_t *p = realloc(b->p, cap);
                if (!p)
                        return -ENOMEM;
                b->p = p;
                b->cap = cap;
        }
        memcpy(b->p + b->len, data, n);
        b->len += n;
        return 0;
}

static int put_tlv(struct buf *b, uint8_t type, const void *v, size_t n)
{
        uint8_t h[3] = { type, (uint8_t)(n >> 8), (uint8_t)n };
        if (n > 0xffff)
                return -E2BIG;
        return put(b, h, 3) < 0 ? -ENOMEM : put(b, v, n);
}

static int load_peer(gnutls_session_t s, gnutls_x509_crt_t *ret)
{
        unsigned n = 0;
        const gnutls_datum_t *certs = gnutls_certificate_get_peers(s, &n);
        if (!certs || n == 0)
                return -ENOENT;
        if (gnutls_x509_crt_init(ret) < 0)
                return -ENOMEM;
        if (gnutls_x509_crt_import(*ret, &certs[0], GNUTLS_X509_FMT_DER) < 0) {
                gnutls_x509_crt_deinit(*ret);
                return -EINVAL;
        }
        return 0;
}

int hsm_peer_identity(gnutls_session_t s, char *subject, size_t subject_size, char *sha256_hex, size_t hex_size)
{
        gnutls_x509_crt_t crt;
        int r = load_peer(s, &crt);
        if (r < 0)
                return r;
        size_t n;
        gnutls_datum_t dn = { NULL, 0 };
        if (gnutls_x509_crt_get_dn3(crt, &dn, 0) >= 0) {
                snprintf(subject, subject_size, "%s", (char *)dn.data);
                gnutls_free(dn.data);
        } else if (subject_size)
                subject[0] = 0;
        uint8_t fp[32];
        n = sizeof(fp);
        if (gnutls_x509_crt_get_fingerprint(crt, GNUTLS_DIG_SHA256, fp, &n) >= 0 && hex_size >= 65) {
                for (size_t i = 0; i < 32; i++)
                        snprintf(sha256_hex + 2 * i, 3, "%02x", fp[i]);
        } else if (hex_size)
                sha256_hex[0] = 0;
        gnutls_x509_crt_deinit(crt);
        return 0;
}

static int ssl_tlv(struct buf *out, const hsm_pp2_tls *t)
{
        struct buf sub = { 0 };
        gnutls_x509_crt_t crt = t->peer;
        int have_cert = crt != NULL;
        /* CERT_SESS: the TLS session has a client certificate; CERT_CONN:
         * it was sent on this connection (not in a resumed session, whose
         * certificate comes from the ticket). */
        uint8_t client = PP2_CLIENT_SSL | (have_cert ? PP2_CLIENT_CERT_SESS : 0) |
                         (have_cert && !t->resumed ? PP2_CLIENT_CERT_CONN : 0);
        /* verify: 0 when a certificate was presented and verified (the
         * handshake fails otherwise; a resumed session's certificate is
         * verified again, handshake.c), non-zero when none was presented. */
        uint8_t verify[4] = { 0, 0, 0, have_cert ? 0 : 1 };
        int r = put(&sub, &client, 1);
        r = r < 0 ? r : put(&sub, verify, 4);
        const char *ver = t->version;
        char vbuf[16] = "";
        if (ver && strncmp(ver, "TLS1.", 5) == 0)
                snprintf(vbuf, sizeof(vbuf), "TLSv1.%s", ver + 5);
        r = r < 0 ? r : put_tlv(&sub, PP2_SUBTYPE_SSL_VERSION, vbuf, strlen(vbuf));
        const char *cipher = t->cipher;
        if (cipher)
                r = r < 0 ? r : put_tlv(&sub, PP2_SUBTYPE_SSL_CIPHER, cipher, strlen(cipher));
        if (have_cert) {
                char cn[256];
                size_t n = sizeof(cn);
                if (gnutls_x509_crt_get_dn_by_oid(crt, GNUTLS_OID_X520_COMMON_NAME, 0, 0, cn, &n) >= 0)
                        r = r < 0 ? r : put_tlv(&sub, PP2_SUBTYPE_SSL_CN, cn, strlen(cn));
                int sig = gnutls_x509_crt_get_signature_algorithm(crt);
                const char *sn = sig >= 0 ? gnutls_sign_get_name(sig) : NULL;
                if (sn)
                        r = r < 0 ? r : put_tlv(&sub, PP2_SUBTYPE_SSL_SIG_ALG, sn, strlen(sn));
                unsigned bits = 0;
                int pk = gnutls_x509_crt_get_pk_algorithm(crt, &bits);
                char kb[64];
                snprintf(kb, sizeof(kb), "%s%u", pk >= 0 ? gnutls_pk_get_name(pk) : "?", bits);
                r = r < 0 ? r : put_tlv(&sub, PP2_SUBTYPE_SSL_KEY_ALG, kb, strlen(kb));
        }
        r = r < 0 ? r : put_tlv(out, PP2_TYPE_SSL, sub.p, sub.len);
        if (have_cert && r >= 0) {
                gnutls_datum_t dn = { NULL, 0 };
                if (gnutls_x509_crt_get_dn3(crt, &dn, 0) >= 0) {
                        r = put_tlv(out, HSM_PP2_TYPE_CLIENT_SUBJECT, dn.data, dn.size);
                        gnutls_free(dn.data);
                }
                uint8_t fp[32];
                size_t n = sizeof(fp);
                if (r >= 0 && gnutls_x509_crt_get_fingerprint(crt, GNUTLS_DIG_SHA256, fp, &n) >= 0)
                        r = put_tlv(out, HSM_PP2_TYPE_CLIENT_SHA256, fp, n);
        }
        free(sub.p);
        return r;
}

int hsm_proxy_v2_build(gnutls_session_t s, const struct sockaddr *src, const struct sockaddr *dst, uint8_t **ret,
                       size_t *ret_len)
{
        hsm_pp2_tls t = {
                .version = gnutls_protocol_get_name(gnutls_protocol_get_version(s)),
                .cipher = gnutls_ciphersuite_get(s),
                .resumed = gnutls_session_is_resumed(s),
        };
        char sni[256];
        size_t sni_len = sizeof(sni);
        unsigned type;
        if (gnutls_server_name_get(s, sni, &sni_len, &type, 0) >= 0 && type == GNUTLS_NAME_DNS)
                t.sni = sni;
        gnutls_datum_t proto = { NULL, 0 };
        if (gnutls_alpn_get_selected_protocol(s, &proto) == 0 && proto.size) {
                t.alpn = proto.data;
                t.alpn_len = proto.size;
        }
        if (load_peer(s, &t.peer) < 0)
                t.peer = NULL;
        int r = hsm_proxy_v2_build_tls(&t, src, dst, ret, ret_len);
        if (t.peer)
                gnutls_x509_crt_deinit(t.peer);
        return r;
}

int hsm_proxy_v2_build_tls(const hsm_pp2_tls *t, const struct sockaddr *src, const struct sockaddr *dst, uint8_t **ret,
                           size_t *ret_len)
{
        struct buf b = { 0 };
        uint8_t head[4] = { 0x21, 0x00, 0, 0 }; /* version 2, PROXY; family; length */
        int r = put(&b, signature, sizeof(signature));
        r = r < 0 ? r : put(&b, head, sizeof(head));
        if (r < 0) {
                free(b.p);
                return r;
        }
        if (src->sa_family == AF_INET && dst->sa_family == AF_INET) {
                const struct sockaddr_in *a = (const void *)src, *d = (const void *)dst;
                b.p[13] = 0x11; /* TCP over IPv4 */
                r = r < 0 ? r : put(&b, &a->sin_addr, 4);
                r = r < 0 ? r : put(&b, &d->sin_addr, 4);
                r = r < 0 ? r : put(&b, &a->sin_port, 2);
                r = r < 0 ? r : put(&b, &d->sin_port, 2);
        } else if (src->sa_family == AF_INET6 && dst->sa_family == AF_INET6) {
                const struct sockaddr_in6 *a = (const void *)src, *d = (const void *)dst;
                b.p[13] = 0x21; /* TCP over IPv6 */
                r = r < 0 ? r : put(&b, &a->sin6_addr, 16);
                r = r < 0 ? r : put(&b, &d->sin6_addr, 16);
                r = r < 0 ? r : put(&b, &a->sin6_port, 2);
                r = r < 0 ? r : put(&b, &d->sin6_port, 2);
        } /* else: AF_UNSPEC, no addresses (a unix socket client) */
        if (r >= 0 && t->alpn && t->alpn_len)
                r = put_tlv(&b, PP2_TYPE_ALPN, t->alpn, t->alpn_len);
        if (r >= 0 && t->sni)
                r = put_tlv(&b, PP2_TYPE_AUTHORITY, t->sni, strlen(t->sni));
        r = r < 0 ? r : ssl_tlv(&b, t);
        if (r < 0 || b.len - 16 > 0xffff) {
                free(b.p);
                return r < 0 ? r : -E2BIG;
        }
        b.p[14] = (uint8_t)((b.len - 16) >> 8);
        b.p[15] = (uint8_t)(b.len - 16);
        *ret = b.p;
        *ret_len = b.len;
        return 0;
}
