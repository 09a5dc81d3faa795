/* The ClientHello peek's parser (see clienthello.h). */
#include "clienthello.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

/* A bounded reader: every read checks what is left; a short read marks the
 * cursor short and returns zeros, so callers test once after a group. */
struct cur {
        const uint8_t *p;
        size_t left;
        bool short_read;
};

static bool take(struct cur *c, size_t n, const uint8_t **ret)
{
        if (c->short_read || c->left < n) {
                c->short_read = true;
                *ret = NULL;
                return false;
        }
        *ret = c->p;
        c->p += n;
        c->left -= n;
        return true;
}

static unsigned u8(struct cur *c)
{
        const uint8_t *p;
        return take(c, 1, &p) ? p[0] : 0;
}

static unsigned u16(struct cur *c)
{
        const uint8_t *p;
        return take(c, 2, &p) ? ((unsigned)p[0] << 8) | p[1] : 0;
}

static unsigned u24(struct cur *c)
{
        const uint8_t *p;
        return take(c, 3, &p) ? ((unsigned)p[0] << 16) | ((unsigned)p[1] << 8) | p[2] : 0;
}

/* A sub-cursor over the next n bytes (short when fewer are left). */
static struct cur sub(struct cur *c, size_t n)
{
        const uint8_t *p;
        if (!take(c, n, &p))
                return (struct cur){ NULL, 0, true };
        return (struct cur){ p, n, false };
}

int hsm_clienthello_record_size(const uint8_t *buf, size_t len, size_t *need, const char **why)
{
        *why = NULL;
        if (len == 0) {
                *need = 5;
                return 0;
        }
        if (buf[0] & 0x80) {
                /* SSLv2 2-byte header: the length in the low 15 bits; the
                 * ClientHello's msg_type (1) and major version (3, or 2 for
                 * a real SSL 2.0 client) follow. */
                if (len < 2) {
                        *need = 2;
                        return 0;
                }
                size_t n = ((size_t)(buf[0] & 0x7f) << 8) | buf[1];
                if (len >= 3 && buf[2] != 1) {
                        *why = "an SSLv2 record that is no ClientHello";
                        return -EPROTO;
                }
                if (n < 9 || n > HSM_HELLO_RECORD_MAX) {
                        *why = n < 9 ? "an SSLv2-format ClientHello too short to hold one" : "an SSLv2-format record larger than any ClientHello";
                        return -EMSGSIZE;
                }
                *need = 2 + n;
                return 0;
        }
        if (buf[0] != 22 || (len >= 2 && buf[1] != 3)) {
                *why = "neither a TLS handshake record nor an SSLv2-format ClientHello";
                return -EPROTO;
        }
        if (len < 5) {
                *need = 5;
                return 0;
        }
        size_t n = ((size_t)buf[3] << 8) | buf[4];
        if (n == 0 || n > HSM_HELLO_RECORD_MAX) {
                *why = n == 0 ? "an empty TLS record" : "a TLS record larger than allowed";
                return -EMSGSIZE;
        }
        *need = 5 + n;
        return 0;
}

static bool is_grease(unsigned v)
{
        return (v & 0x0f0f) == 0x0a0a && (v >> 8) == (v & 0xff);
}

static int parse_sni(struct cur e, hsm_clienthello *h, const char **why)
{
        struct cur list = sub(&e, u16(&e));
        if (e.short_read || e.left) {
                *why = "server_name: bad length";
                return -EBADMSG;
        }
        while (list.left) {
                unsigned type = u8(&list);
                unsigned n = u16(&list);
                const uint8_t *name;
                if (!take(&list, n, &name)) {
                        *why = "server_name: bad name length";
                        return -EBADMSG;
                }
                if (type != 0 || h->has_sni)
                        continue; /* only the first host_name counts (RFC 6066 3) */
                if (n == 0 || n >= sizeof(h->sni) || memchr(name, 0, n)) {
                        *why = "server_name: a host_name that is empty, too long or holds a NUL";
                        return -EBADMSG;
                }
                memcpy(h->sni, name, n);
                h->sni[n] = 0;
                h->has_sni = true;
        }
        return 0;
}

static int parse_alpn(struct cur e, hsm_clienthello *h, const char **why)
{
        size_t n = u16(&e);
        struct cur list = sub(&e, n);
        if (e.short_read || e.left || n == 0) {
                *why = "ALPN: bad length";
                return -EBADMSG;
        }
        h->alpn = list.p;
        h->alpn_len = n;
        h->n_alpn = 0;
        while (list.left) {
                unsigned l = u8(&list);
                const uint8_t *p;
                if (l == 0 || !take(&list, l, &p)) {
                        *why = "ALPN: an empty or overlong protocol name";
                        h->alpn = NULL;
                        h->alpn_len = 0;
                        return -EBADMSG;
                }
                h->n_alpn++;
        }
        return 0;
}

static int parse_versions(struct cur e, hsm_clienthello *h, const char **why)
{
        unsigned n = u8(&e);
        struct cur list = sub(&e, n);
        if (e.short_read || e.left || n == 0 || n % 2) {
                *why = "supported_versions: bad length";
                return -EBADMSG;
        }
        unsigned max = 0;
        while (list.left) {
                unsigned v = u16(&list);
                if (!is_grease(v) && v > max)
                        max = v;
        }
        if (max)
                h->max_version = (uint16_t)max;
        return 0;
}

static int parse_sslv2(struct cur c, hsm_clienthello *h, const char **why)
{
        /* msg_type, version, cipher_spec_length, session_id_length, challenge_length */
        unsigned type = u8(&c);
        unsigned version = u16(&c);
        unsigned specs = u16(&c), sid = u16(&c), challenge = u16(&c);
        if (c.short_read || type != 1) {
                *why = "an SSLv2 record that is no ClientHello";
                return -EBADMSG;
        }
        h->sslv2 = true;
        h->record_version = 0x0200;
        h->client_version = h->max_version = (uint16_t)version;
        if ((version >> 8) != 3) {
                *why = "an SSL 2.0 client (version 2): SSL 2.0 itself is not spoken";
                return -EBADMSG;
        }
        if (specs == 0 || specs % 3 || (sid != 0 && sid != 16) || challenge < 16 || challenge > 32 ||
            (size_t)specs + sid + challenge != c.left) {
                *why = "an SSLv2-format ClientHello with bad lengths";
                return -EBADMSG;
        }
        h->n_suites = specs / 3;
        return 0;
}

int hsm_clienthello_parse(const uint8_t *buf, size_t len, hsm_clienthello *ret, const char **why)
{
        size_t need;
        int r = hsm_clienthello_record_size(buf, len, &need, why);
        if (r < 0)
                return r;
        if (len != need) {
                *why = len < need ? "the record is not all in" : "bytes after the first record";
                return -EINVAL;
        }
        hsm_clienthello h;
        memset(&h, 0, sizeof(h));
        if (buf[0] & 0x80) {
                r = parse_sslv2((struct cur){ buf + 2, len - 2, false }, &h, why);
                if (r == 0)
                        *ret = h;
                return r;
        }
        h.record_version = (uint16_t)(((unsigned)buf[1] << 8) | buf[2]);
        struct cur rec = { buf + 5, len - 5, false };
        unsigned type = u8(&rec);
        size_t mlen = u24(&rec);
        if (rec.short_read || type != 1) {
                *why = "the first handshake message is no ClientHello";
                return -EBADMSG;
        }
        /* The message may go on in the next records: parse what is here. */
        if (mlen > rec.left)
                h.truncated = true;
        else
                rec.left = mlen;
        h.client_version = h.max_version = (uint16_t)u16(&rec);
        const uint8_t *random;
        take(&rec, 32, &random);
        unsigned sid_len = u8(&rec);
        if (!rec.short_read && sid_len > 32) {
                *why = "a session ID longer than 32 bytes";
                return -EBADMSG;
        }
        sub(&rec, sid_len);
        unsigned suites_len = u16(&rec);
        if (!rec.short_read && (suites_len < 2 || suites_len % 2)) {
                *why = "bad cipher_suites length";
                return -EBADMSG;
        }
        sub(&rec, suites_len);
        h.n_suites = rec.short_read ? 0 : suites_len / 2;
        unsigned comp_len = u8(&rec);
        if (!rec.short_read && comp_len < 1) {
                *why = "no compression methods";
                return -EBADMSG;
        }
        sub(&rec, comp_len);
        if (rec.short_read) {
                if (h.truncated)
                        goto done;
                *why = "the ClientHello ends early";
                return -EBADMSG;
        }
        if (rec.left == 0)
                goto done; /* no extensions */
        size_t ext_len = u16(&rec);
        struct cur exts = sub(&rec, ext_len);
        if (exts.short_read) {
                if (!h.truncated) {
                        *why = "extensions: bad length";
                        return -EBADMSG;
                }
                /* as far as this record goes */
                exts = (struct cur){ rec.p, rec.left, false };
        } else if (rec.left && !h.truncated) {
                *why = "bytes after the extensions";
                return -EBADMSG;
        }
        while (exts.left) {
                unsigned et = u16(&exts);
                size_t el = u16(&exts);
                struct cur e = sub(&exts, el);
                if (exts.short_read) {
                        if (h.truncated)
                                break;
                        *why = "an extension longer than the extensions";
                        return -EBADMSG;
                }
                r = 0;
                if (et == 0)
                        r = parse_sni(e, &h, why);
                else if (et == 16)
                        r = parse_alpn(e, &h, why);
                else if (et == 43)
                        r = parse_versions(e, &h, why);
                if (r < 0)
                        return r;
        }
done:
        *ret = h;
        return 0;
}

const char *hsm_clienthello_version_name(uint16_t v, char *buf, size_t size)
{
        if (v == 0x0300)
                snprintf(buf, size, "SSL 3.0");
        else if ((v >> 8) == 3 && (v & 0xff) <= 9)
                snprintf(buf, size, "TLS 1.%u", (v & 0xff) - 1);
        else
                snprintf(buf, size, "0x%04x", v);
        return buf;
}
