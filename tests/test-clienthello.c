/* The ClientHello peek's parser (src/daemon/clienthello.c) on real hellos
 * captured from gnutls-cli, openssl s_client and curl (the fuzz seed corpus,
 * tests/fuzz/corpus/clienthello), on SSLv2-format hellos, and on truncated,
 * split and foreign input. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clienthello.h"

static int failures;
#define CHECK(cond, ...)                                                   \
        do {                                                               \
                if (!(cond)) {                                             \
                        printf("not ok - %s:%d: ", __FILE__, __LINE__);   \
                        printf(__VA_ARGS__);                               \
                        printf("\n");                                      \
                        failures++;                                        \
                }                                                          \
        } while (0)

static size_t load(const char *name, uint8_t *buf, size_t size)
{
        char path[4096];
        snprintf(path, sizeof(path), "%s/tests/fuzz/corpus/clienthello/%s", getenv("SRCDIR") ? getenv("SRCDIR") : ".", name);
        FILE *f = fopen(path, "rb");
        if (!f) {
                printf("Bail out! cannot read %s\n", path);
                exit(99);
        }
        size_t n = fread(buf, 1, size, f);
        fclose(f);
        return n;
}

/* As the peek does: the first record's size, then the parse of it. */
static int peek(const uint8_t *buf, size_t len, hsm_clienthello *h, const char **why)
{
        size_t need = 0, have = 0;
        for (;;) {
                int r = hsm_clienthello_record_size(buf, have, &need, why);
                if (r < 0)
                        return r;
                if (need == have)
                        break;
                if (need > len)
                        return -EAGAIN;
                have = need;
        }
        return hsm_clienthello_parse(buf, have, h, why);
}

static void alpn_has(const hsm_clienthello *h, const char *name, const char *file)
{
        size_t off = 0, n = strlen(name);
        bool found = false;
        while (h->alpn && off < h->alpn_len) {
                if (h->alpn[off] == n && memcmp(h->alpn + off + 1, name, n) == 0)
                        found = true;
                off += 1 + h->alpn[off];
        }
        CHECK(found, "%s: ALPN offers %s", file, name);
}

int main(void)
{
        static uint8_t buf[65536];
        hsm_clienthello h;
        const char *why = NULL;
        char v[16];

        struct {
                const char *file;
                bool sni;
                unsigned max_version;
                const char *alpn1, *alpn2;
        } real[] = {
                { "gnutls-cli-tls13", true, 0x0304, "h2", "http/1.1" },
                { "gnutls-cli-tls12", true, 0x0303, NULL, NULL },
                { "openssl-alpn", true, 0x0304, "h2", "http/1.1" },
                { "openssl-tls12", true, 0x0303, NULL, NULL },
                { "curl-http2", true, 0x0304, "h2", "http/1.1" },
                { "openssl-nosni", false, 0x0304, NULL, NULL },
        };
        for (size_t i = 0; i < sizeof(real) / sizeof(real[0]); i++) {
                size_t n = load(real[i].file, buf, sizeof(buf));
                int r = peek(buf, n, &h, &why);
                CHECK(r == 0, "%s: parsed (%d, %s)", real[i].file, r, why ? why : "");
                if (r < 0)
                        continue;
                CHECK(!h.sslv2 && !h.truncated, "%s: a whole TLS record", real[i].file);
                CHECK(h.has_sni == real[i].sni && (!real[i].sni || strcmp(h.sni, "www.hsmtls.test") == 0), "%s: SNI '%s'",
                      real[i].file, h.has_sni ? h.sni : "(none)");
                CHECK(h.max_version == real[i].max_version, "%s: highest version %s", real[i].file,
                      hsm_clienthello_version_name(h.max_version, v, sizeof(v)));
                CHECK(h.client_version == 0x0303, "%s: legacy_version 3.3", real[i].file);
                CHECK(h.n_suites > 2, "%s: cipher suites (%u)", real[i].file, h.n_suites);
                if (real[i].alpn1) {
                        CHECK(h.n_alpn == 2, "%s: two ALPN names (%u)", real[i].file, h.n_alpn);
                        alpn_has(&h, real[i].alpn1, real[i].file);
                        alpn_has(&h, real[i].alpn2, real[i].file);
                } else
                        CHECK(h.alpn == NULL && h.n_alpn == 0, "%s: no ALPN", real[i].file);
        }

        size_t n = load("sslv2-tls12", buf, sizeof(buf));
        CHECK(peek(buf, n, &h, &why) == 0 && h.sslv2 && h.client_version == 0x0303 && h.n_suites == 4 && !h.has_sni,
              "sslv2-tls12: an SSLv2-format hello for TLS 1.2 with 4 cipher specs");
        n = load("sslv2-tls10-sid", buf, sizeof(buf));
        CHECK(peek(buf, n, &h, &why) == 0 && h.sslv2 && h.client_version == 0x0301, "sslv2-tls10-sid: TLS 1.0, a session ID");
        n = load("sslv2-ssl20", buf, sizeof(buf));
        CHECK(peek(buf, n, &h, &why) == -EBADMSG && strstr(why, "SSL 2.0"), "sslv2-ssl20: refused (%s)", why);
        n = load("split-two-records", buf, sizeof(buf));
        CHECK(peek(buf, n, &h, &why) == 0 && h.truncated && !h.has_sni, "split-two-records: the first record parsed, truncated");
        n = load("truncated-header", buf, sizeof(buf));
        CHECK(peek(buf, n, &h, &why) == -EAGAIN, "truncated-header: more must come");
        n = load("truncated-record", buf, sizeof(buf));
        CHECK(peek(buf, n, &h, &why) == -EAGAIN, "truncated-record: more must come");
        n = load("not-tls-http", buf, sizeof(buf));
        CHECK(peek(buf, n, &h, &why) == -EPROTO, "not-tls-http: not TLS");

        /* a record header over the limit, an empty record */
        const uint8_t big[] = { 22, 3, 1, 0xff, 0xff }, empty[] = { 22, 3, 1, 0, 0 }, v2big[] = { 0xff, 0xff, 1 };
        size_t need;
        CHECK(hsm_clienthello_record_size(big, sizeof(big), &need, &why) == -EMSGSIZE, "a 64 KiB record is refused");
        CHECK(hsm_clienthello_record_size(empty, sizeof(empty), &need, &why) == -EMSGSIZE, "an empty record is refused");
        CHECK(hsm_clienthello_record_size(v2big, sizeof(v2big), &need, &why) == -EMSGSIZE, "a 32 KiB SSLv2 record is refused");
        /* every prefix of a real hello: never an error, always more to come */
        n = load("curl-http2", buf, sizeof(buf));
        for (size_t i = 0; i < n; i++) {
                int r = peek(buf, i, &h, &why);
                CHECK(r == -EAGAIN, "curl-http2 cut at %zu: more must come (%d)", i, r);
        }
        /* a hello whose SNI extension lies about its length */
        n = load("openssl-tls12", buf, sizeof(buf));
        for (size_t i = 5 + 4 + 2 + 32; i + 4 < n; i++)
                if (buf[i] == 0 && buf[i + 1] == 0 && buf[i + 4] == 0 && buf[i + 2] == 0 && buf[i + 3] > 4) {
                        buf[i + 3] = 0xff; /* extension 0 (server_name), length 0x00ff: past the end */
                        CHECK(peek(buf, n, &h, &why) == -EBADMSG, "an overlong server_name extension is malformed");
                        break;
                }
        printf("%s - clienthello parser\n", failures ? "not ok" : "ok");
        return failures ? 1 : 0;
}
