/* Pure parsing and validation of admin request bodies and PEM uploads
 * (parse.h): no request, token or database here, so that the fuzz targets
 * run exactly this code. */
#include "parse.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/abstract.h>
#include <gnutls/crypto.h>

static int perr(struct admin_perr *e, unsigned status, const char *code, const char *field, const char *fmt, ...)
        __attribute__((format(printf, 5, 6)));
static int perr(struct admin_perr *e, unsigned status, const char *code, const char *field, const char *fmt, ...)
{
        e->status = status;
        e->code = code;
        snprintf(e->field, sizeof(e->field), "%s", field ? field : "");
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->reason, sizeof(e->reason), fmt, ap);
        va_end(ap);
        return -EINVAL;
}

void hex_encode(const uint8_t *p, size_t n, char *out)
{
        static const char d[] = "0123456789abcdef";
        for (size_t i = 0; i < n; i++) {
                out[2 * i] = d[p[i] >> 4];
                out[2 * i + 1] = d[p[i] & 15];
        }
        out[2 * n] = 0;
}

static int hexv(char c)
{
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        if (c >= 'A' && c <= 'F')
                return c - 'A' + 10;
        return -1;
}

int hex_decode(const char *s, uint8_t *out, size_t max, size_t *ret_len)
{
        size_t n = strlen(s);
        if (n == 0 || n % 2 || n / 2 > max)
                return -EINVAL;
        for (size_t i = 0; i < n / 2; i++) {
                int h = hexv(s[2 * i]), l = hexv(s[2 * i + 1]);
                if (h < 0 || l < 0)
                        return -EINVAL;
                out[i] = (uint8_t)(h << 4 | l);
        }
        *ret_len = n / 2;
        return 0;
}

/* The length of the valid UTF-8 sequence at p (1-4), or 0 (RFC 3629: no
 * overlong forms, no surrogates, nothing above U+10FFFF). */
static size_t utf8_seq(const unsigned char *p)
{
        if (p[0] < 0x80)
                return 1;
        size_t n = p[0] >= 0xc2 && p[0] <= 0xdf ? 2 : p[0] >= 0xe0 && p[0] <= 0xef ? 3 : p[0] >= 0xf0 && p[0] <= 0xf4 ? 4 : 0;
        for (size_t i = 1; i < n; i++)
                if ((p[i] & 0xc0) != 0x80)
                        return 0;
        if ((n == 3 && p[0] == 0xe0 && p[1] < 0xa0) || (n == 3 && p[0] == 0xed && p[1] > 0x9f) ||
            (n == 4 && p[0] == 0xf0 && p[1] < 0x90) || (n == 4 && p[0] == 0xf4 && p[1] > 0x8f))
                return 0;
        return n;
}

json_t *json_text(const char *s)
{
        if (!s)
                return json_null();
        size_t len = strlen(s), o = 0;
        char *out = malloc(4 * len + 1);
        if (!out)
                return NULL;
        for (size_t i = 0; i < len;) {
                size_t n = utf8_seq((const unsigned char *)s + i);
                if (n == 0) {
                        /* A byte that is no UTF-8 (a %ff in a URL, a cut
                         * character): kept visible, as \xNN. */
                        o += (size_t)sprintf(out + o, "\\x%02x", (unsigned char)s[i]);
                        i++;
                        continue;
                }
                memcpy(out + o, s + i, n);
                o += n;
                i += n;
        }
        out[o] = 0;
        json_t *j = json_string(out);
        free(out);
        return j;
}

int admin_parse_object(const char *body, size_t len, const char *const *allowed, json_t **ret, struct admin_perr *e)
{
        json_error_t je;
        *ret = NULL;
        json_t *o = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
        if (!o)
                return perr(e, 400, "invalid_json", NULL, "the body is not JSON: %s (line %d, column %d)", je.text,
                            je.line, je.column);
        if (!json_is_object(o)) {
                json_decref(o);
                return perr(e, 400, "invalid_json", NULL, "the body must be a JSON object");
        }
        const char *k;
        json_t *v;
        json_object_foreach(o, k, v) {
                bool known = false;
                for (size_t i = 0; allowed[i]; i++)
                        if (strcmp(k, allowed[i]) == 0)
                                known = true;
                if (!known) {
                        char f[200];
                        snprintf(f, sizeof(f), "/%.150s", k);
                        perr(e, 400, "unknown_field", f, "unknown field '%.100s'", k);
                        json_decref(o);
                        return -EINVAL;
                }
        }
        *ret = o;
        return 0;
}

/* A string member: NULL when absent; -EINVAL (400) when not a string. */
static int string_member(json_t *o, const char *name, const char **ret, struct admin_perr *e)
{
        json_t *v = json_object_get(o, name);
        *ret = NULL;
        if (!v)
                return 0;
        if (!json_is_string(v)) {
                char f[100];
                snprintf(f, sizeof(f), "/%s", name);
                return perr(e, 400, "invalid_field", f, "%s must be a string", name);
        }
        *ret = json_string_value(v);
        return 0;
}

int admin_parse_keygen(json_t *o, struct admin_keygen *k, struct admin_perr *e)
{
        memset(k, 0, sizeof(*k));
        const char *curve = NULL, *id_s = NULL;
        if (string_member(o, "token", &k->token, e) < 0 || string_member(o, "label", &k->label, e) < 0 ||
            string_member(o, "id", &id_s, e) < 0 || string_member(o, "type", &k->type, e) < 0 ||
            string_member(o, "curve", &curve, e) < 0)
                return -EINVAL;
        json_t *bits_j = json_object_get(o, "bits");
        hsm_keygen *g = &k->g;
        if (!k->token)
                return perr(e, 400, "missing_field", "/token", "token is required");
        if (!k->label)
                return perr(e, 400, "missing_field", "/label", "label is required");
        if (!*k->label || strlen(k->label) > 64)
                return perr(e, 400, "invalid_field", "/label", "the label must be 1 to 64 bytes");
        if (!k->type)
                return perr(e, 400, "missing_field", "/type", "type is required (rsa, ecdsa or ed25519)");
        if (bits_j && !json_is_integer(bits_j))
                return perr(e, 400, "invalid_field", "/bits", "bits must be an integer");
        if (strcmp(k->type, "rsa") == 0) {
                g->type = HSM_KEY_RSA;
                json_int_t b = bits_j ? json_integer_value(bits_j) : 3072;
                if (b != 2048 && b != 3072 && b != 4096)
                        return perr(e, 400, "invalid_field", "/bits", "RSA keys are 2048, 3072 or 4096 bits");
                g->bits = (unsigned)b;
                if (curve)
                        return perr(e, 400, "invalid_field", "/curve", "curve is for ecdsa keys only");
        } else if (strcmp(k->type, "ecdsa") == 0) {
                g->type = HSM_KEY_ECDSA;
                if (bits_j)
                        return perr(e, 400, "invalid_field", "/bits", "bits is for rsa keys only (ecdsa: curve)");
                if (!curve || strcmp(curve, "P-256") == 0)
                        g->curve = HSM_CURVE_P256;
                else if (strcmp(curve, "P-384") == 0)
                        g->curve = HSM_CURVE_P384;
                else
                        return perr(e, 400, "invalid_field", "/curve", "ECDSA keys are on P-256 or P-384");
        } else if (strcmp(k->type, "ed25519") == 0) {
                g->type = HSM_KEY_ED25519;
                g->curve = HSM_CURVE_ED25519;
                if (bits_j || curve)
                        return perr(e, 400, "invalid_field", bits_j ? "/bits" : "/curve", "ed25519 keys take no bits or curve");
        } else
                return perr(e, 400, "invalid_field", "/type", "type must be rsa, ecdsa or ed25519");
        k->id_len = 8;
        if (id_s) {
                if (hex_decode(id_s, k->id, sizeof(k->id), &k->id_len) < 0)
                        return perr(e, 400, "invalid_field", "/id", "id must be 2 to 64 hex digits (1 to 32 bytes)");
                k->has_id = true;
        }
        return 0;
}

static int string_list(json_t *o, const char *name, const char ***ret, struct admin_perr *e)
{
        json_t *v = json_object_get(o, name);
        *ret = NULL;
        if (!v)
                return 0;
        char f[64];
        snprintf(f, sizeof(f), "/%s", name);
        if (!json_is_array(v) || json_array_size(v) > 100)
                return perr(e, 400, "invalid_field", f, "%s must be an array of at most 100 strings", name);
        const char **l = calloc(json_array_size(v) + 1, sizeof(*l));
        if (!l)
                return perr(e, 500, "internal", NULL, "out of memory");
        size_t i;
        json_t *x;
        json_array_foreach(v, i, x) {
                if (!json_is_string(x)) {
                        snprintf(f, sizeof(f), "/%s/%zu", name, i);
                        free(l);
                        return perr(e, 400, "invalid_field", f, "%s must hold strings only", name);
                }
                l[i] = json_string_value(x);
        }
        *ret = l;
        return 0;
}

void admin_csr_done(struct admin_csr *c)
{
        free(c->dns);
        free(c->ip);
        free(c->email);
        free(c->uri);
        memset(c, 0, sizeof(*c));
}

int admin_parse_csr(json_t *o, struct admin_csr *c, struct admin_perr *e)
{
        memset(c, 0, sizeof(*c));
        if (string_member(o, "subject", &c->subject, e) < 0 || string_list(o, "dns", &c->dns, e) < 0 ||
            string_list(o, "ip", &c->ip, e) < 0 || string_list(o, "email", &c->email, e) < 0 ||
            string_list(o, "uri", &c->uri, e) < 0) {
                admin_csr_done(c);
                return -EINVAL;
        }
        if (!c->subject) {
                admin_csr_done(c);
                return perr(e, 400, "missing_field", "/subject", "subject is required");
        }
        return 0;
}

int admin_parse_upload(json_t *o, const char **pem, bool *on_token, bool *in_state, struct admin_perr *e)
{
        const char *store = NULL;
        if (string_member(o, "pem", pem, e) < 0 || string_member(o, "store", &store, e) < 0)
                return -EINVAL;
        if (!*pem)
                return perr(e, 400, "missing_field", "/pem", "pem is required (the chain, leaf first)");
        *on_token = false;
        *in_state = true;
        if (store) {
                if (strcmp(store, "token") == 0)
                        *on_token = true, *in_state = false;
                else if (strcmp(store, "both") == 0)
                        *on_token = true;
                else if (strcmp(store, "state") != 0)
                        return perr(e, 400, "invalid_field", "/store", "store must be token, state or both");
        }
        return 0;
}

int admin_crt_spki(gnutls_x509_crt_t crt, uint8_t out[32])
{
        gnutls_pubkey_t pub = NULL;
        gnutls_datum_t der = { NULL, 0 };
        int r = -EINVAL;
        if (gnutls_pubkey_init(&pub) >= 0 && gnutls_pubkey_import_x509(pub, crt, 0) >= 0 &&
            gnutls_pubkey_export2(pub, GNUTLS_X509_FMT_DER, &der) >= 0 &&
            gnutls_hash_fast(GNUTLS_DIG_SHA256, der.data, der.size, out) >= 0)
                r = 0;
        gnutls_free(der.data);
        gnutls_pubkey_deinit(pub);
        return r;
}

/* The SHA-256 of the certificate's DER as it was given (and is served):
 * gnutls_x509_crt_get_fingerprint() hashes an encoding of its own, which
 * differs for a certificate that is not canonical DER (found by
 * fuzz-admin-pem), so that the fingerprint the API showed was not the one a
 * client computes, and two different uploads could share one. */
int admin_crt_fingerprint(gnutls_x509_crt_t crt, char hex[65])
{
        uint8_t fp[32];
        gnutls_datum_t der = { NULL, 0 };
        int r = gnutls_x509_crt_export2(crt, GNUTLS_X509_FMT_DER, &der) < 0 ||
                                gnutls_hash_fast(GNUTLS_DIG_SHA256, der.data, der.size, fp) < 0
                        ? -EINVAL
                        : 0;
        gnutls_free(der.data);
        if (r == 0)
                hex_encode(fp, 32, hex);
        return r;
}

void admin_chain_done(struct admin_chain *c)
{
        for (unsigned i = 0; i < c->n; i++)
                gnutls_x509_crt_deinit(c->crts[i]);
        gnutls_free(c->crts);
        c->crts = NULL;
        c->n = 0;
}

int admin_parse_chain(const char *pem, size_t len, struct admin_chain *c, char fp[65], uint8_t spki[32],
                      struct admin_perr *e)
{
        gnutls_datum_t d = { (unsigned char *)pem, (unsigned)len };
        c->crts = NULL;
        c->n = 0;
        if (len > UINT32_MAX)
                return perr(e, 400, "invalid_field", "/pem", "the PEM is too large");
        int g = gnutls_x509_crt_list_import2(&c->crts, &c->n, &d, GNUTLS_X509_FMT_PEM,
                                             GNUTLS_X509_CRT_LIST_FAIL_IF_UNSORTED);
        if (g < 0) {
                c->crts = NULL;
                c->n = 0;
        }
        if (g == GNUTLS_E_CERTIFICATE_LIST_UNSORTED)
                return perr(e, 422, "unprocessable", "/pem",
                            "the chain is not in order: each certificate must be issued by the next (leaf first)");
        if (g < 0 || c->n == 0) {
                admin_chain_done(c);
                return perr(e, 400, "invalid_field", "/pem", "the PEM does not parse as X.509 certificates: %s",
                            g < 0 ? gnutls_strerror(g) : "no certificate");
        }
        for (unsigned i = 0; i + 1 < c->n; i++) {
                unsigned status = 0;
                if (gnutls_x509_crt_verify(c->crts[i], &c->crts[i + 1], 1, 0, &status) < 0 || status != 0) {
                        admin_chain_done(c);
                        return perr(e, 422, "unprocessable", "/pem",
                                    "certificate %u of the chain is not signed by certificate %u", i + 1, i + 2);
                }
        }
        if (admin_crt_fingerprint(c->crts[0], fp) < 0 || admin_crt_spki(c->crts[0], spki) < 0) {
                admin_chain_done(c);
                return perr(e, 400, "invalid_field", "/pem", "cannot read the leaf's public key");
        }
        return 0;
}
