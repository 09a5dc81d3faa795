/* e2e backend: a tiny plaintext server for the end-to-end tests.
 *
 * Binds 127.0.0.1 on a port the kernel picks, prints "PORT <n>" on stdout
 * and serves until killed, one thread per connection.
 *
 * A connection whose first bytes look like an HTTP/1.x request line is
 * served as HTTP: every request on the kept-alive connection is answered
 * with "200 OK" and the body "hello from backend: <request line>\n"; a
 * request body (Content-Length) is read and discarded; "Connection: close"
 * (or HTTP/1.0 without keep-alive) closes after the answer.
 * Anything else is echoed back byte for byte until the peer closes its side
 * (then the write side is shut down too, so the peer sees EOF); with
 * --slow-echo CHUNK:US in reads of at most CHUNK bytes, each followed by a
 * pause of US microseconds (a slow backend). --no-accept: never accepts
 * (a listen backlog of 0): connects beyond the first hang (connect_timeout).
 *
 * PROXY protocol v2 (HAProxy's specification): a connection that starts with
 * the 12-byte v2 signature must carry a well-formed header, which is parsed
 * byte for byte (version/command 0x21 or 0x20, family 0x11 TCP/IPv4, 0x21
 * TCP/IPv6 or 0x00 UNSPEC, length, addresses and ports, then TLVs:
 * 0x01 ALPN, 0x02 AUTHORITY, 0x04 NOOP, 0x20 SSL = client byte, 32-bit verify and the
 * sub-TLVs 0x21 version, 0x22 CN, 0x23 cipher, 0x24 signature algorithm,
 * 0x25 key algorithm; the custom 0xE0 client subject DN and 0xE1 SHA-256 of
 * the client certificate, exactly 32 bytes). A malformed header (bad
 * version, command or family, a length that does not fit, a truncated or
 * duplicate TLV, an SSL TLV shorter than 5 bytes, a 0xE1 that is not 32
 * bytes, a string TLV with a NUL byte) is logged on stderr as
 * "backend: bad PROXY v2 header: REASON" (also with --quiet) and the
 * connection is closed without an answer. After the header the connection
 * goes on as above (HTTP or echo). HTTP answers then also carry what the
 * header said, both as response headers and as lines after the "hello"
 * line of the body (omitted when the header did not say it):
 *   X-Proxy-Command: PROXY|LOCAL      X-Proxy-Family: TCP4|TCP6|UNSPEC
 *   X-Proxy-Src: ip:port              X-Proxy-Dst: ip:port   ([ip]:port for IPv6)
 *   X-Proxy-TLVs: 02 20 e0 e1         (types in the order received, hex)
 *   X-Proxy-ALPN: PROTOCOL
 *   X-Proxy-Authority: NAME
 *   X-Proxy-SSL: 0|1                  (client byte & PP2_CLIENT_SSL)
 *   X-Proxy-Client-Cert: 0|1          (client byte & PP2_CLIENT_CERT_CONN)
 *   X-Proxy-Client-Byte: 0xNN         X-Proxy-Verify: <uint32>
 *   X-Proxy-TLS-Version: ...          X-Proxy-Cipher: ...
 *   X-Proxy-Client-CN: ...            X-Proxy-Sig-Alg: ...   X-Proxy-Key-Alg: ...
 *   X-Proxy-Client-Subject: ...       X-Proxy-Client-SHA256: <64 lower-case hex>
 * (bytes outside printable ASCII in strings are shown as \xNN). With
 * --verbose logging (the default) each header is also logged on stderr.
 * Connections without the signature behave exactly as before.
 *
 * Usage: backend [--quiet]      (--quiet: no per-connection log on stderr)
 *        backend --free-port    (prints a TCP port on 127.0.0.1 that was free
 *                                a moment ago, for servers that need a fixed
 *                                port such as gnutls-serv, and exits)
 */
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define HDR_MAX 16384
#define PP2_MAX (16 + 65535) /* signature, ver/cmd, family, length, payload */

static int verbose = 1;
/* --slow-echo CHUNK:US: echo reads at most CHUNK bytes, then sleeps US
 * microseconds: a slow peer, so that every buffer of the proxy fills. */
static size_t echo_chunk = 65536;
static unsigned echo_delay_us;

static int write_all(int fd, const void *buf, size_t len)
{
        const char *p = buf;
        while (len > 0) {
                ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -1;
                }
                p += n;
                len -= (size_t)n;
        }
        return 0;
}

static void echo_loop(int fd, const char *first, size_t first_len)
{
        char buf[65536];
        unsigned long long total = first_len;
        if (first_len && write_all(fd, first, first_len) < 0)
                return;
        for (;;) {
                ssize_t n = recv(fd, buf, echo_chunk < sizeof(buf) ? echo_chunk : sizeof(buf), 0);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        break;
                total += (unsigned long long)n;
                if (echo_delay_us)
                        usleep(echo_delay_us);
                if (write_all(fd, buf, (size_t)n) < 0)
                        return;
        }
        shutdown(fd, SHUT_WR);
        if (verbose)
                fprintf(stderr, "backend: echo connection done, %llu bytes\n", total);
}

static char *find_hdr_end(char *b, size_t n)
{
        for (size_t i = 0; i + 3 < n; i++)
                if (b[i] == '\r' && b[i + 1] == '\n' && b[i + 2] == '\r' && b[i + 3] == '\n')
                        return b + i + 4;
        for (size_t i = 0; i + 1 < n; i++)
                if (b[i] == '\n' && b[i + 1] == '\n')
                        return b + i + 2;
        return NULL;
}

/* Case-insensitive header lookup in [hdrs, end): returns the value (trimmed) in out. */
static int header_value(const char *hdrs, const char *end, const char *name, char *out, size_t out_size)
{
        size_t nl = strlen(name);
        const char *p = hdrs;
        while (p < end) {
                const char *eol = memchr(p, '\n', (size_t)(end - p));
                if (!eol)
                        eol = end;
                if ((size_t)(eol - p) > nl && strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
                        const char *v = p + nl + 1;
                        while (v < eol && (*v == ' ' || *v == '\t'))
                                v++;
                        const char *ve = eol;
                        while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t'))
                                ve--;
                        size_t l = (size_t)(ve - v);
                        if (l >= out_size)
                                l = out_size - 1;
                        memcpy(out, v, l);
                        out[l] = 0;
                        return 1;
                }
                p = eol + 1;
        }
        return 0;
}


/* ------------------------------------------------------- PROXY protocol v2 */

static const unsigned char pp2_sig[12] = { 0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A };

enum { PP_STR_MAX = 1024 };

struct ppinfo {
        int present;
        unsigned char cmd, family;
        char src[64], dst[64];
        char tlvs[256]; /* "02 20 e0 e1" */
        int has_authority, has_ssl, has_subject, has_sha256, has_alpn;
        char authority[PP_STR_MAX];
        char alpn[PP_STR_MAX];
        unsigned char client;
        uint32_t verify;
        int has_version, has_cn, has_cipher, has_sig, has_key;
        char version[PP_STR_MAX], cn[PP_STR_MAX], cipher[PP_STR_MAX], sig_alg[PP_STR_MAX], key_alg[PP_STR_MAX];
        char subject[4 * PP_STR_MAX];
        char sha256[65];
};

/* A string TLV value for display: no NUL allowed; bytes outside printable
 * ASCII become \xNN. Returns NULL (the header is malformed) on a NUL. */
static const char *pp_string(const unsigned char *v, size_t n, char *out, size_t out_size)
{
        size_t o = 0;
        for (size_t i = 0; i < n; i++) {
                if (v[i] == 0)
                        return NULL;
                if (o + 5 >= out_size)
                        break;
                if (v[i] >= 0x20 && v[i] < 0x7f && v[i] != '\\')
                        out[o++] = (char)v[i];
                else
                        o += (size_t)snprintf(out + o, out_size - o, "\\x%02x", v[i]);
        }
        out[o] = 0;
        return out;
}

static void pp_addr(char *out, size_t size, int family, const unsigned char *a, const unsigned char *port)
{
        char ip[INET6_ADDRSTRLEN] = "?";
        inet_ntop(family, a, ip, sizeof(ip));
        unsigned p = ((unsigned)port[0] << 8) | port[1];
        if (family == AF_INET6)
                snprintf(out, size, "[%s]:%u", ip, p);
        else
                snprintf(out, size, "%s:%u", ip, p);
}

static void pp_tlv_seen(struct ppinfo *pp, unsigned type)
{
        size_t l = strlen(pp->tlvs);
        if (l + 4 < sizeof(pp->tlvs))
                snprintf(pp->tlvs + l, sizeof(pp->tlvs) - l, "%s%02x", l ? " " : "", type);
}

/* The sub-TLVs of PP2_TYPE_SSL. Returns NULL or why they are malformed. */
static const char *pp_parse_ssl_sub(struct ppinfo *pp, const unsigned char *p, size_t n)
{
        while (n > 0) {
                if (n < 3)
                        return "truncated sub-TLV header in PP2_TYPE_SSL";
                unsigned type = p[0];
                size_t len = ((size_t)p[1] << 8) | p[2];
                if (len > n - 3)
                        return "sub-TLV length beyond the end of PP2_TYPE_SSL";
                const unsigned char *v = p + 3;
                int *has = NULL;
                char *dst = NULL;
                switch (type) {
                case 0x21: has = &pp->has_version; dst = pp->version; break;
                case 0x22: has = &pp->has_cn; dst = pp->cn; break;
                case 0x23: has = &pp->has_cipher; dst = pp->cipher; break;
                case 0x24: has = &pp->has_sig; dst = pp->sig_alg; break;
                case 0x25: has = &pp->has_key; dst = pp->key_alg; break;
                default: break; /* unknown sub-TLV: ignored, as the specification says */
                }
                if (has) {
                        if (*has)
                                return "duplicate sub-TLV in PP2_TYPE_SSL";
                        if (len == 0)
                                return "empty string sub-TLV in PP2_TYPE_SSL";
                        if (!pp_string(v, len, dst, PP_STR_MAX))
                                return "NUL byte in a string sub-TLV of PP2_TYPE_SSL";
                        *has = 1;
                }
                p += 3 + len;
                n -= 3 + len;
        }
        return NULL;
}

/* Parses a whole v2 header (h[0..total), signature included). Returns NULL
 * or the reason it is malformed. */
static const char *pp_parse(struct ppinfo *pp, const unsigned char *h, size_t total)
{
        memset(pp, 0, sizeof(*pp));
        pp->present = 1;
        if (total < 16 || memcmp(h, pp2_sig, 12) != 0)
                return "no v2 signature";
        pp->cmd = h[12];
        pp->family = h[13];
        size_t len = ((size_t)h[14] << 8) | h[15];
        if (total != 16 + len)
                return "length field does not match the header";
        if ((pp->cmd >> 4) != 2)
                return "version is not 2";
        if ((pp->cmd & 0x0f) > 1)
                return "command is neither LOCAL nor PROXY";
        size_t alen;
        switch (pp->family) {
        case 0x11: alen = 12; break;
        case 0x21: alen = 36; break;
        case 0x00: alen = 0; break;
        default: return "unsupported address family/protocol byte (expected 0x11, 0x21 or 0x00)";
        }
        if (len < alen)
                return "length shorter than the addresses of the family";
        const unsigned char *p = h + 16;
        if (pp->family == 0x11) {
                pp_addr(pp->src, sizeof(pp->src), AF_INET, p, p + 8);
                pp_addr(pp->dst, sizeof(pp->dst), AF_INET, p + 4, p + 10);
        } else if (pp->family == 0x21) {
                pp_addr(pp->src, sizeof(pp->src), AF_INET6, p, p + 32);
                pp_addr(pp->dst, sizeof(pp->dst), AF_INET6, p + 16, p + 34);
        }
        p += alen;
        size_t n = len - alen;
        while (n > 0) {
                if (n < 3)
                        return "truncated TLV header";
                unsigned type = p[0];
                size_t tl = ((size_t)p[1] << 8) | p[2];
                if (tl > n - 3)
                        return "TLV length beyond the end of the header";
                const unsigned char *v = p + 3;
                pp_tlv_seen(pp, type);
                switch (type) {
                case 0x01: /* PP2_TYPE_ALPN */
                        if (pp->has_alpn)
                                return "duplicate PP2_TYPE_ALPN";
                        if (tl == 0)
                                return "empty PP2_TYPE_ALPN";
                        if (!pp_string(v, tl, pp->alpn, sizeof(pp->alpn)))
                                return "NUL byte in PP2_TYPE_ALPN";
                        pp->has_alpn = 1;
                        break;
                case 0x02: /* PP2_TYPE_AUTHORITY */
                        if (pp->has_authority)
                                return "duplicate PP2_TYPE_AUTHORITY";
                        if (tl == 0)
                                return "empty PP2_TYPE_AUTHORITY";
                        if (!pp_string(v, tl, pp->authority, sizeof(pp->authority)))
                                return "NUL byte in PP2_TYPE_AUTHORITY";
                        pp->has_authority = 1;
                        break;
                case 0x20: { /* PP2_TYPE_SSL */
                        if (pp->has_ssl)
                                return "duplicate PP2_TYPE_SSL";
                        if (tl < 5)
                                return "PP2_TYPE_SSL shorter than client byte + verify";
                        pp->has_ssl = 1;
                        pp->client = v[0];
                        pp->verify = ((uint32_t)v[1] << 24) | ((uint32_t)v[2] << 16) | ((uint32_t)v[3] << 8) | v[4];
                        const char *why = pp_parse_ssl_sub(pp, v + 5, tl - 5);
                        if (why)
                                return why;
                        break;
                }
                case 0xE0: /* custom: client subject DN */
                        if (pp->has_subject)
                                return "duplicate 0xE0 (client subject)";
                        if (tl == 0)
                                return "empty 0xE0 (client subject)";
                        if (!pp_string(v, tl, pp->subject, sizeof(pp->subject)))
                                return "NUL byte in 0xE0 (client subject)";
                        pp->has_subject = 1;
                        break;
                case 0xE1: /* custom: SHA-256 of the client certificate */
                        if (pp->has_sha256)
                                return "duplicate 0xE1 (client SHA-256)";
                        if (tl != 32)
                                return "0xE1 (client SHA-256) is not 32 bytes";
                        for (size_t i = 0; i < 32; i++)
                                snprintf(pp->sha256 + 2 * i, 3, "%02x", v[i]);
                        pp->has_sha256 = 1;
                        break;
                default: /* 0x04 NOOP and anything else: skipped */
                        break;
                }
                p += 3 + tl;
                n -= 3 + tl;
        }
        return NULL;
}

/* Appends "Name: value\r\n" (hdr) or "Name: value\n" (body) lines. */
struct sbuf {
        char *p;
        size_t len, cap;
};

static void sb_printf(struct sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(struct sbuf *b, const char *fmt, ...)
{
        va_list ap;
        for (;;) {
                va_start(ap, fmt);
                int n = vsnprintf(b->p ? b->p + b->len : NULL, b->p ? b->cap - b->len : 0, fmt, ap);
                va_end(ap);
                if (n < 0)
                        return;
                if (b->p && b->len + (size_t)n < b->cap) {
                        b->len += (size_t)n;
                        return;
                }
                size_t cap = (b->cap + (size_t)n + 1) * 2;
                char *q = realloc(b->p, cap);
                if (!q)
                        return;
                b->p = q;
                b->cap = cap;
        }
}

static void pp_lines(struct sbuf *b, const struct ppinfo *pp, const char *eol)
{
        if (!pp || !pp->present)
                return;
        sb_printf(b, "X-Proxy-Command: %s%s", (pp->cmd & 0x0f) == 1 ? "PROXY" : "LOCAL", eol);
        sb_printf(b, "X-Proxy-Family: %s%s",
                  pp->family == 0x11 ? "TCP4" : pp->family == 0x21 ? "TCP6" : "UNSPEC", eol);
        if (pp->src[0])
                sb_printf(b, "X-Proxy-Src: %s%sX-Proxy-Dst: %s%s", pp->src, eol, pp->dst, eol);
        sb_printf(b, "X-Proxy-TLVs: %s%s", pp->tlvs, eol);
        if (pp->has_alpn)
                sb_printf(b, "X-Proxy-ALPN: %s%s", pp->alpn, eol);
        if (pp->has_authority)
                sb_printf(b, "X-Proxy-Authority: %s%s", pp->authority, eol);
        if (pp->has_ssl) {
                sb_printf(b, "X-Proxy-SSL: %d%s", pp->client & 0x01 ? 1 : 0, eol);
                sb_printf(b, "X-Proxy-Client-Cert: %d%s", pp->client & 0x02 ? 1 : 0, eol);
                sb_printf(b, "X-Proxy-Client-Byte: 0x%02x%s", pp->client, eol);
                sb_printf(b, "X-Proxy-Verify: %lu%s", (unsigned long)pp->verify, eol);
        }
        if (pp->has_version)
                sb_printf(b, "X-Proxy-TLS-Version: %s%s", pp->version, eol);
        if (pp->has_cipher)
                sb_printf(b, "X-Proxy-Cipher: %s%s", pp->cipher, eol);
        if (pp->has_cn)
                sb_printf(b, "X-Proxy-Client-CN: %s%s", pp->cn, eol);
        if (pp->has_sig)
                sb_printf(b, "X-Proxy-Sig-Alg: %s%s", pp->sig_alg, eol);
        if (pp->has_key)
                sb_printf(b, "X-Proxy-Key-Alg: %s%s", pp->key_alg, eol);
        if (pp->has_subject)
                sb_printf(b, "X-Proxy-Client-Subject: %s%s", pp->subject, eol);
        if (pp->has_sha256)
                sb_printf(b, "X-Proxy-Client-SHA256: %s%s", pp->sha256, eol);
}

static void http_loop(int fd, char *buf, size_t len, const struct ppinfo *pp)
{
        unsigned requests = 0;
        for (;;) {
                char *end;
                while (!(end = find_hdr_end(buf, len))) {
                        if (len >= HDR_MAX) {
                                static const char tl[] = "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                                write_all(fd, tl, sizeof(tl) - 1);
                                goto out;
                        }
                        ssize_t n = recv(fd, buf + len, HDR_MAX - len, 0);
                        if (n < 0 && errno == EINTR)
                                continue;
                        if (n <= 0)
                                goto out;
                        len += (size_t)n;
                }
                /* Request line. */
                char *eol = memchr(buf, '\n', (size_t)(end - buf));
                size_t rl_len = (size_t)(eol - buf);
                if (rl_len && buf[rl_len - 1] == '\r')
                        rl_len--;
                char line[1024];
                if (rl_len >= sizeof(line))
                        rl_len = sizeof(line) - 1;
                memcpy(line, buf, rl_len);
                line[rl_len] = 0;

                char v[256];
                int close_after = 0;
                int http10 = strstr(line, "HTTP/1.0") != NULL;
                if (header_value(eol + 1, end, "Connection", v, sizeof(v))) {
                        if (strcasestr(v, "close"))
                                close_after = 1;
                        else if (http10 && strcasestr(v, "keep-alive"))
                                http10 = 0;
                }
                if (http10)
                        close_after = 1;
                unsigned long long body = 0;
                if (header_value(eol + 1, end, "Content-Length", v, sizeof(v)))
                        body = strtoull(v, NULL, 10);

                /* Drop the header and the body from the buffer. */
                size_t used = (size_t)(end - buf);
                memmove(buf, end, len - used);
                len -= used;
                while (body > 0) {
                        if (len > 0) {
                                size_t k = body < len ? (size_t)body : len;
                                memmove(buf, buf + k, len - k);
                                len -= k;
                                body -= k;
                                continue;
                        }
                        ssize_t n = recv(fd, buf, HDR_MAX, 0);
                        if (n < 0 && errno == EINTR)
                                continue;
                        if (n <= 0)
                                goto out;
                        len = (size_t)n;
                }

                /* The answer: the hello line, then what the PROXY header said
                 * (as headers and as body lines). */
                struct sbuf body_b = { 0 }, resp_b = { 0 };
                sb_printf(&body_b, "hello from backend: %s\n", line);
                pp_lines(&body_b, pp, "\n");
                sb_printf(&resp_b, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n%s",
                          body_b.len, close_after ? "Connection: close\r\n" : "");
                pp_lines(&resp_b, pp, "\r\n");
                sb_printf(&resp_b, "\r\n%.*s", (int)body_b.len, body_b.p ? body_b.p : "");
                int wr = resp_b.p ? write_all(fd, resp_b.p, resp_b.len) : -1;
                free(body_b.p);
                free(resp_b.p);
                if (wr < 0)
                        goto out;
                requests++;
                if (close_after)
                        break;
        }
out:
        if (verbose)
                fprintf(stderr, "backend: http connection done, %u requests\n", requests);
}

/* recv() more into buf[len..cap); returns the new length, or 0 on EOF/error. */
static size_t recv_more(int fd, char *buf, size_t len, size_t cap)
{
        for (;;) {
                ssize_t n = recv(fd, buf + len, cap - len, 0);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        return 0;
                return len + (size_t)n;
        }
}

static void *serve(void *arg)
{
        int fd = (int)(intptr_t)arg;
        size_t cap = PP2_MAX + HDR_MAX;
        char *buf = malloc(cap);
        size_t len = 0, m;
        int http = -1;
        struct ppinfo *pp = NULL;
        if (!buf)
                goto out;
        /* A PROXY v2 header? Read until the first bytes either differ from
         * the signature or hold all 12 of it. */
        for (;;) {
                m = len < sizeof(pp2_sig) ? len : sizeof(pp2_sig);
                if (len > 0 && memcmp(buf, pp2_sig, m) != 0)
                        break;
                if (len >= sizeof(pp2_sig))
                        break;
                if (!(len = recv_more(fd, buf, len, cap)))
                        goto out;
        }
        if (len >= sizeof(pp2_sig) && memcmp(buf, pp2_sig, sizeof(pp2_sig)) == 0) {
                while (len < 16)
                        if (!(len = recv_more(fd, buf, len, cap))) {
                                fprintf(stderr, "backend: bad PROXY v2 header: connection closed inside the header\n");
                                goto out;
                        }
                size_t total = 16 + (((size_t)(unsigned char)buf[14] << 8) | (unsigned char)buf[15]);
                while (len < total)
                        if (!(len = recv_more(fd, buf, len, cap))) {
                                fprintf(stderr, "backend: bad PROXY v2 header: connection closed inside the header\n");
                                goto out;
                        }
                pp = malloc(sizeof(*pp));
                if (!pp)
                        goto out;
                const char *why = pp_parse(pp, (const unsigned char *)buf, total);
                if (why) {
                        fprintf(stderr, "backend: bad PROXY v2 header: %s\n", why);
                        goto out;
                }
                if (verbose) {
                        struct sbuf b = { 0 };
                        pp_lines(&b, pp, "; ");
                        fprintf(stderr, "backend: PROXY v2 header, %zu bytes: %.*s\n", total, (int)b.len, b.p ? b.p : "");
                        free(b.p);
                }
                memmove(buf, buf + total, len - total);
                len -= total;
        }
        /* Decide on the first bytes: an upper-case word followed by a space is HTTP. */
        while (http < 0) {
                if (len > 0) {
                        size_t i = 0;
                        while (i < len && i < 16 && isupper((unsigned char)buf[i]))
                                i++;
                        if (i == 0 || i == 16 || (i < len && buf[i] != ' '))
                                http = 0;
                        else if (i < len)
                                http = 1;
                        /* else: only upper-case letters so far, read more */
                        if (http >= 0)
                                break;
                }
                if (!(len = recv_more(fd, buf, len, HDR_MAX > len ? HDR_MAX : len)))
                        goto out;
        }
        if (http)
                http_loop(fd, buf, len, pp);
        else
                echo_loop(fd, buf, len);
out:
        free(pp);
        free(buf);
        close(fd);
        return NULL;
}

int main(int argc, char **argv)
{
        int free_port = 0, no_accept = 0;
        for (int i = 1; i < argc; i++) {
                if (strcmp(argv[i], "--quiet") == 0)
                        verbose = 0;
                else if (strcmp(argv[i], "--free-port") == 0)
                        free_port = 1;
                else if (strcmp(argv[i], "--no-accept") == 0)
                        no_accept = 1;
                else if (strcmp(argv[i], "--slow-echo") == 0 && i + 1 < argc &&
                         sscanf(argv[i + 1], "%zu:%u", &echo_chunk, &echo_delay_us) == 2 && echo_chunk > 0)
                        i++;
                else {
                        fprintf(stderr, "usage: %s [--quiet] [--slow-echo CHUNK:US] [--no-accept] | --free-port\n", argv[0]);
                        return 2;
                }
        }
        signal(SIGPIPE, SIG_IGN);
        int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (lfd < 0) {
                perror("backend: socket");
                return 1;
        }
        int one = 1;
        setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = 0 };
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, no_accept ? 0 : 512) < 0) {
                perror("backend: bind/listen");
                return 1;
        }
        socklen_t sl = sizeof(sa);
        if (getsockname(lfd, (struct sockaddr *)&sa, &sl) < 0) {
                perror("backend: getsockname");
                return 1;
        }
        if (free_port) {
                printf("%u\n", ntohs(sa.sin_port));
                close(lfd);
                return 0;
        }
        printf("PORT %u\n", ntohs(sa.sin_port));
        fflush(stdout);
        /* --no-accept: a backlog of 0 that is never accepted: once one
         * connection waits in it, the kernel drops further SYNs and their
         * connect() hangs (a backend that does not answer). */
        while (no_accept)
                pause();

        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        for (;;) {
                int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
                if (fd < 0) {
                        if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE)
                                continue;
                        perror("backend: accept");
                        return 1;
                }
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                pthread_t t;
                if (pthread_create(&t, &attr, serve, (void *)(intptr_t)fd) != 0) {
                        close(fd);
                        continue;
                }
        }
}
