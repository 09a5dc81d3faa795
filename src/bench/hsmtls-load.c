/* hsmtls-load: a TLS handshake load generator (GnuTLS, threads).
 *
 * Handshake mode (default): --threads threads each open connections back to
 * back, for --duration seconds or until --count connections were made.  Each
 * connection is a full handshake (no tickets, no resumption, a fresh
 * session), then --requests HTTP/1.1 GET requests on the kept-alive
 * connection, then close_notify.  The handshake latency runs from the start
 * of connect() to the end of gnutls_handshake(); a request's round trip from
 * its first byte sent to the last byte of its response read.
 *
 * Keep-alive probe mode (--keepalive-probes): --connections connections are
 * opened once and kept; every --interval-ms each sends one request and
 * measures its round trip.  This shows how established connections fare
 * while another load generator hammers handshakes.
 *
 * The generator is closed-loop: a thread starts its next connection when the
 * previous one ends, so a slow server lowers the offered load.  Every
 * latency is measured on the client and includes the client's own work.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#define MAX_THREADS 4096
#define HEADER_MAX (64 * 1024)

/* ------------------------------------------------------------- options */

static struct {
        const char *connect;
        char *host;            /* from --connect, brackets removed */
        char *port;
        const char *sni;       /* NULL: host if it is a name; "": none */
        const char *cafile;
        bool insecure;
        unsigned threads;
        double duration;       /* seconds; 0 = not set */
        unsigned long count;   /* 0 = not set */
        const char *tls;
        const char *priority;
        const char *cert, *key;
        unsigned requests;
        const char *path;
        const char *host_header;
        bool probes;
        unsigned connections;
        unsigned interval_ms;
        double timeout;
        bool json;
        bool verbose;
        bool confirm;
} opt = {
        .confirm = true,
        .threads = 16,
        .path = "/",
        .connections = 10,
        .interval_ms = 100,
        .timeout = 10,
};

static struct addrinfo *target;
static gnutls_certificate_credentials_t cred;
static gnutls_priority_t prio;
static const char *prio_string;
static const char *verify_name;     /* NULL: no verification */
static const char *sni_name;        /* NULL: no SNI */
static const char *host_header;

/* ------------------------------------------------------------- results */

struct samples {
        double *v;
        size_t n, cap;
};

static int samples_add(struct samples *s, double ms)
{
        if (s->n == s->cap) {
                size_t cap = s->cap ? s->cap * 2 : 1024;
                double *v = realloc(s->v, cap * sizeof(*v));
                if (!v)
                        return -ENOMEM;
                s->v = v;
                s->cap = cap;
        }
        s->v[s->n++] = ms;
        return 0;
}

static int samples_merge(struct samples *into, const struct samples *from)
{
        for (size_t i = 0; i < from->n; i++)
                if (samples_add(into, from->v[i]) < 0)
                        return -ENOMEM;
        return 0;
}

static int cmp_double(const void *a, const void *b)
{
        double x = *(const double *)a, y = *(const double *)b;
        return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of sorted samples. */
static double percentile(const struct samples *s, double q)
{
        size_t rank;

        if (s->n == 0)
                return NAN;
        rank = (size_t)ceil(q * (double)s->n);
        if (rank < 1)
                rank = 1;
        if (rank > s->n)
                rank = s->n;
        return s->v[rank - 1];
}

static double mean(const struct samples *s)
{
        double sum = 0;

        for (size_t i = 0; i < s->n; i++)
                sum += s->v[i];
        return s->n ? sum / (double)s->n : NAN;
}

struct worker {
        pthread_t thread;
        unsigned index;
        struct samples hs;      /* handshake latencies, ms */
        struct samples rq;      /* request round trips, ms */
        unsigned long connections;
        unsigned long errors_connect, errors_handshake, errors_request;
        unsigned long late;     /* probes sent more than one interval late */
};

static atomic_bool stop;
static atomic_ulong tickets;            /* connections started, for --count */
static atomic_ulong errors_total;
static pthread_mutex_t err_lock = PTHREAD_MUTEX_INITIALIZER;
static char first_error[512];
static char negotiated[256];
static struct timespec t_start;

static double now_ms(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static double since_start_ms(void)
{
        return now_ms() - ((double)t_start.tv_sec * 1e3 + (double)t_start.tv_nsec / 1e6);
}

static void record_error(unsigned long *counter, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void record_error(unsigned long *counter, const char *fmt, ...)
{
        char msg[512];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        (*counter)++;
        if (atomic_fetch_add(&errors_total, 1) == 0) {
                pthread_mutex_lock(&err_lock);
                if (!first_error[0])
                        snprintf(first_error, sizeof(first_error), "%s", msg);
                pthread_mutex_unlock(&err_lock);
        }
        if (opt.verbose)
                fprintf(stderr, "hsmtls-load: %.3f s: %s\n", since_start_ms() / 1e3, msg);
}

/* --------------------------------------------------------- connections */

struct conn {
        int fd;
        gnutls_session_t s;
        bool open;              /* handshake done, may carry requests */
        char buf[16384];        /* bytes received and not consumed yet */
        size_t start, end;
};

static void conn_close(struct conn *c, bool notify)
{
        if (c->s) {
                if (notify && c->open)
                        gnutls_bye(c->s, GNUTLS_SHUT_WR);
                gnutls_deinit(c->s);
                c->s = NULL;
        }
        if (c->fd >= 0) {
                close(c->fd);
                c->fd = -1;
        }
        c->open = false;
        c->start = c->end = 0;
}

static void set_timeouts(int fd)
{
        struct timeval tv;

        tv.tv_sec = (time_t)opt.timeout;
        tv.tv_usec = (suseconds_t)((opt.timeout - (double)tv.tv_sec) * 1e6);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

static const char *gnutls_error_text(gnutls_session_t s, int ret, char *buf, size_t size)
{
        if (ret == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
                gnutls_datum_t out = { NULL, 0 };
                unsigned status = gnutls_session_get_verify_cert_status(s);
                if (gnutls_certificate_verification_status_print(status, gnutls_certificate_type_get(s),
                                                                 &out, 0) == 0) {
                        snprintf(buf, size, "%s", (const char *)out.data);
                        gnutls_free(out.data);
                        return buf;
                }
        }
        if (ret == GNUTLS_E_FATAL_ALERT_RECEIVED || ret == GNUTLS_E_WARNING_ALERT_RECEIVED) {
                snprintf(buf, size, "%s: %s", gnutls_strerror(ret),
                         gnutls_alert_get_name(gnutls_alert_get(s)));
                return buf;
        }
        if (ret == GNUTLS_E_AGAIN) {
                snprintf(buf, size, "timed out after %g s", opt.timeout);
                return buf;
        }
        snprintf(buf, size, "%s", gnutls_strerror(ret));
        return buf;
}

/* Connects and handshakes; records the handshake latency.  0 or -1. */
static int conn_open(struct worker *w, struct conn *c)
{
        char err[256];
        double t0;
        int ret, one = 1;

        c->fd = -1;
        c->s = NULL;
        c->open = false;
        c->start = c->end = 0;
        w->connections++;

        c->fd = socket(target->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c->fd < 0) {
                record_error(&w->errors_connect, "socket: %s", strerror(errno));
                return -1;
        }
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        set_timeouts(c->fd);   /* also bounds connect() on Linux */

        /* A fresh session: no tickets, no resumption data. */
        ret = gnutls_init(&c->s, GNUTLS_CLIENT | GNUTLS_NO_TICKETS);
        if (ret < 0) {
                c->s = NULL;
                record_error(&w->errors_handshake, "gnutls_init: %s", gnutls_strerror(ret));
                goto fail;
        }
        if ((ret = gnutls_priority_set(c->s, prio)) < 0 ||
            (ret = gnutls_credentials_set(c->s, GNUTLS_CRD_CERTIFICATE, cred)) < 0 ||
            (sni_name && (ret = gnutls_server_name_set(c->s, GNUTLS_NAME_DNS, sni_name, strlen(sni_name))) < 0)) {
                record_error(&w->errors_handshake, "session setup: %s", gnutls_strerror(ret));
                goto fail;
        }
        if (verify_name)
                gnutls_session_set_verify_cert(c->s, verify_name, 0);
        gnutls_handshake_set_timeout(c->s, (unsigned)(opt.timeout * 1000));
        gnutls_transport_set_int(c->s, c->fd);

        t0 = now_ms();
        if (connect(c->fd, target->ai_addr, target->ai_addrlen) < 0) {
                record_error(&w->errors_connect, "connect to %s: %s", opt.connect,
                             errno == EINPROGRESS ? "timed out" : strerror(errno));
                goto fail;
        }
        do
                ret = gnutls_handshake(c->s);
        while (ret == GNUTLS_E_INTERRUPTED || (ret == GNUTLS_E_AGAIN && now_ms() - t0 < opt.timeout * 1e3));
        if (ret < 0) {
                record_error(&w->errors_handshake, "handshake with %s: %s", opt.connect,
                             gnutls_error_text(c->s, ret, err, sizeof(err)));
                goto fail;
        }
        if (samples_add(&w->hs, now_ms() - t0) < 0) {
                record_error(&w->errors_handshake, "out of memory");
                goto fail;
        }
        c->open = true;

        if (!negotiated[0]) {
                char *desc = gnutls_session_get_desc(c->s);
                pthread_mutex_lock(&err_lock);
                if (!negotiated[0] && desc)
                        snprintf(negotiated, sizeof(negotiated), "%s", desc);
                pthread_mutex_unlock(&err_lock);
                gnutls_free(desc);
        }
        return 0;
fail:
        conn_close(c, false);
        return -1;
}

/* Reads more bytes into c->buf.  >0: bytes read; 0: the peer closed;
 * <0: error (message in err). */
static ssize_t conn_fill(struct conn *c, char *err, size_t errsize)
{
        ssize_t n;

        if (c->start > 0 && c->start == c->end)
                c->start = c->end = 0;
        if (c->end == sizeof(c->buf)) {
                if (c->start == 0) {
                        snprintf(err, errsize, "response header too long");
                        return -1;
                }
                memmove(c->buf, c->buf + c->start, c->end - c->start);
                c->end -= c->start;
                c->start = 0;
        }
        /* GnuTLS returns GNUTLS_E_AGAIN on a blocking socket when the
         * receive timeout expired, and also right after it handled a TLS 1.3
         * post-handshake message (a session ticket): retry until the deadline. */
        double deadline = now_ms() + opt.timeout * 1e3;
        do
                n = gnutls_record_recv(c->s, c->buf + c->end, sizeof(c->buf) - c->end);
        while (n == GNUTLS_E_INTERRUPTED || (n == GNUTLS_E_AGAIN && now_ms() < deadline));
        if (n == GNUTLS_E_PREMATURE_TERMINATION)
                return 0;   /* closed without close_notify; the caller decides */
        if (n < 0) {
                gnutls_error_text(c->s, (int)n, err, errsize);
                return -1;
        }
        c->end += (size_t)n;
        return n;
}

/* Discards LEN body bytes. */
static int conn_skip(struct conn *c, unsigned long long len, char *err, size_t errsize)
{
        while (len > 0) {
                size_t have = c->end - c->start;
                if (have == 0) {
                        ssize_t n = conn_fill(c, err, errsize);
                        if (n <= 0) {
                                if (n == 0)
                                        snprintf(err, errsize, "connection closed in the response body");
                                return -1;
                        }
                        continue;
                }
                if (have > len)
                        have = (size_t)len;
                c->start += have;
                len -= have;
        }
        return 0;
}

/* Reads one CRLF-terminated line (for chunk sizes) into line. */
static int conn_line(struct conn *c, char *line, size_t size, char *err, size_t errsize)
{
        for (;;) {
                char *nl = memchr(c->buf + c->start, '\n', c->end - c->start);
                if (nl) {
                        size_t len = (size_t)(nl - (c->buf + c->start));
                        if (len >= size) {
                                snprintf(err, errsize, "chunk line too long");
                                return -1;
                        }
                        memcpy(line, c->buf + c->start, len);
                        line[len] = '\0';
                        if (len > 0 && line[len - 1] == '\r')
                                line[len - 1] = '\0';
                        c->start += len + 1;
                        return 0;
                }
                ssize_t n = conn_fill(c, err, errsize);
                if (n <= 0) {
                        if (n == 0)
                                snprintf(err, errsize, "connection closed in a chunked body");
                        return -1;
                }
        }
}

/* Sends one GET and reads the whole response.  0: done, the connection can
 * carry another request; 1: done, the server closes the connection; -1:
 * error (message in err). */
static int http_request(struct conn *c, char *err, size_t errsize)
{
        char req[2048], hdr[HEADER_MAX + 1], line[128];
        unsigned long long content_length = 0;
        bool have_length = false, chunked = false, keep_alive, http10;
        size_t hlen = 0;
        int status, len;
        ssize_t n;

        len = snprintf(req, sizeof(req),
                       "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: hsmtls-load\r\nAccept: */*\r\n\r\n",
                       opt.path, host_header);
        if (len < 0 || (size_t)len >= sizeof(req)) {
                snprintf(err, errsize, "request too long");
                return -1;
        }
        for (int off = 0; off < len;) {
                double deadline = now_ms() + opt.timeout * 1e3;
                do
                        n = gnutls_record_send(c->s, req + off, (size_t)(len - off));
                while (n == GNUTLS_E_INTERRUPTED || (n == GNUTLS_E_AGAIN && now_ms() < deadline));
                if (n < 0) {
                        gnutls_error_text(c->s, (int)n, err, errsize);
                        return -1;
                }
                off += (int)n;
        }

        /* The header, up to the empty line. */
        for (;;) {
                char *p = c->buf + c->start;
                size_t have = c->end - c->start;
                char *e = memmem(p, have, "\r\n\r\n", 4);
                if (e) {
                        hlen = (size_t)(e - p) + 4;
                        if (hlen > HEADER_MAX) {
                                snprintf(err, errsize, "response header longer than %d bytes", HEADER_MAX);
                                return -1;
                        }
                        memcpy(hdr, p, hlen);
                        hdr[hlen] = '\0';
                        c->start += hlen;
                        break;
                }
                if (have > HEADER_MAX) {
                        snprintf(err, errsize, "response header longer than %d bytes", HEADER_MAX);
                        return -1;
                }
                n = conn_fill(c, err, errsize);
                if (n == 0) {
                        snprintf(err, errsize, "connection closed before the response%s",
                                 have ? " was complete" : "");
                        return -1;
                }
                if (n < 0)
                        return -1;
        }

        if (sscanf(hdr, "HTTP/1.%*1[01] %3d", &status) != 1) {
                snprintf(err, errsize, "not an HTTP/1.x response: %.40s", hdr);
                return -1;
        }
        http10 = strncmp(hdr, "HTTP/1.0", 8) == 0;
        keep_alive = !http10;
        for (char *save = NULL, *l = strtok_r(strchr(hdr, '\n') + 1, "\r\n", &save); l;
             l = strtok_r(NULL, "\r\n", &save)) {
                char *colon = strchr(l, ':');
                if (!colon)
                        continue;
                *colon = '\0';
                char *v = colon + 1;
                v += strspn(v, " \t");
                if (strcasecmp(l, "Content-Length") == 0) {
                        char *end;
                        errno = 0;
                        content_length = strtoull(v, &end, 10);
                        if (errno || end == v) {
                                snprintf(err, errsize, "bad Content-Length: %.40s", v);
                                return -1;
                        }
                        have_length = true;
                } else if (strcasecmp(l, "Transfer-Encoding") == 0 && strcasestr(v, "chunked")) {
                        chunked = true;
                } else if (strcasecmp(l, "Connection") == 0) {
                        if (strcasestr(v, "close"))
                                keep_alive = false;
                        else if (strcasestr(v, "keep-alive"))
                                keep_alive = true;
                }
        }

        if (status == 204 || status == 304 || (status >= 100 && status < 200)) {
                /* no body */
        } else if (chunked) {
                for (;;) {
                        unsigned long long size;
                        char *end;
                        if (conn_line(c, line, sizeof(line), err, errsize) < 0)
                                return -1;
                        size = strtoull(line, &end, 16);
                        if (end == line) {
                                snprintf(err, errsize, "bad chunk size: %.40s", line);
                                return -1;
                        }
                        if (size == 0) {
                                /* trailers up to an empty line */
                                do
                                        if (conn_line(c, line, sizeof(line), err, errsize) < 0)
                                                return -1;
                                while (line[0]);
                                break;
                        }
                        if (conn_skip(c, size, err, errsize) < 0 ||
                            conn_line(c, line, sizeof(line), err, errsize) < 0)
                                return -1;
                }
        } else if (have_length) {
                if (conn_skip(c, content_length, err, errsize) < 0)
                        return -1;
        } else {
                /* The body runs to the end of the connection. */
                for (;;) {
                        c->start = c->end = 0;
                        n = conn_fill(c, err, errsize);
                        if (n == 0)
                                break;
                        if (n < 0)
                                return -1;
                }
                keep_alive = false;
        }

        if (status < 200 || status >= 400) {
                snprintf(err, errsize, "HTTP status %d", status);
                return -1;
        }
        return keep_alive ? 0 : 1;
}

/* One request with its round trip recorded.  0: the connection stays
 * usable; 1: the server closed it after this response; -1: error. */
static int timed_request(struct worker *w, struct conn *c)
{
        char err[256];
        double t0 = now_ms();
        int r = http_request(c, err, sizeof(err));

        if (r < 0) {
                record_error(&w->errors_request, "request to %s%s: %s", opt.connect, opt.path, err);
                return -1;
        }
        if (samples_add(&w->rq, now_ms() - t0) < 0) {
                record_error(&w->errors_request, "out of memory");
                return -1;
        }
        return r;
}

/* ---------------------------------------------------------------- modes */

static bool take_ticket(void)
{
        if (atomic_load(&stop))
                return false;
        if (opt.count && atomic_fetch_add(&tickets, 1) >= opt.count)
                return false;
        return true;
}

/* In TLS 1.3 the client's handshake ends before the server has checked the
 * client's Finished and certificate: a server that rejects them says so only
 * afterwards.  With no request to show it, send close_notify and wait for
 * the server's answer (its close_notify, or its close) to see a rejection.
 * Returns 0, or -1 with the error recorded and the sample withdrawn. */
static int confirm_tls13(struct worker *w, struct conn *c)
{
        double deadline = now_ms() + opt.timeout * 1e3;
        char err[256];
        int ret;

        do
                ret = gnutls_bye(c->s, GNUTLS_SHUT_RDWR);
        while (ret == GNUTLS_E_INTERRUPTED || (ret == GNUTLS_E_AGAIN && now_ms() < deadline));
        c->open = false;   /* close_notify sent */
        if (ret == 0 || ret == GNUTLS_E_PREMATURE_TERMINATION || ret == GNUTLS_E_AGAIN ||
            ret == GNUTLS_E_PUSH_ERROR || ret == GNUTLS_E_PULL_ERROR)
                return 0;   /* answered, closed, or silent: no rejection seen */
        w->hs.n--;
        record_error(&w->errors_handshake, "handshake with %s rejected after the client finished: %s",
                     opt.connect, gnutls_error_text(c->s, ret, err, sizeof(err)));
        return -1;
}

static void *handshake_worker(void *arg)
{
        struct worker *w = arg;
        struct conn c;

        while (take_ticket()) {
                if (conn_open(w, &c) < 0)
                        continue;
                if (opt.requests == 0 && opt.confirm && gnutls_protocol_get_version(c.s) == GNUTLS_TLS1_3) {
                        confirm_tls13(w, &c);
                        conn_close(&c, false);
                        continue;
                }
                for (unsigned i = 0; i < opt.requests; i++) {
                        int r = timed_request(w, &c);
                        if (r < 0)
                                break;
                        if (r == 1 && i + 1 < opt.requests) {
                                record_error(&w->errors_request,
                                             "server closed the connection after request %u of %u "
                                             "(no keep-alive)", i + 1, opt.requests);
                                c.open = false;
                                break;
                        }
                        if (r == 1)
                                c.open = false;
                }
                conn_close(&c, true);
        }
        return NULL;
}

static void timespec_add_ms(struct timespec *t, double ms)
{
        long long ns = t->tv_nsec + (long long)(ms * 1e6);

        t->tv_sec += (time_t)(ns / 1000000000LL);
        t->tv_nsec = (long)(ns % 1000000000LL);
}

/* Keep-alive probes: one connection per thread, one request per interval.
 * The first probe of connection i is shifted by i/C of an interval, so
 * that the probes are spread evenly rather than sent in bursts. */
static void *probe_worker(void *arg)
{
        struct worker *w = arg;
        struct timespec next = t_start;
        unsigned long done = 0;
        struct conn c = { .fd = -1 };
        bool up = false;

        up = conn_open(w, &c) == 0;
        timespec_add_ms(&next, (double)opt.interval_ms * (1.0 + (double)w->index / opt.connections));
        while (!atomic_load(&stop) && (!opt.count || done < opt.count)) {
                while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
                        ;
                if (atomic_load(&stop))
                        break;
                struct timespec now;
                clock_gettime(CLOCK_MONOTONIC, &now);
                double late = (double)(now.tv_sec - next.tv_sec) * 1e3 +
                              (double)(now.tv_nsec - next.tv_nsec) / 1e6;
                if (late > opt.interval_ms)
                        w->late++;
                /* The next tick still ahead; ticks missed are skipped. */
                do {
                        timespec_add_ms(&next, opt.interval_ms);
                        late -= opt.interval_ms;
                } while (late >= 0);

                if (!up) {
                        up = conn_open(w, &c) == 0;
                        if (!up)
                                continue;
                }
                done++;
                int r = timed_request(w, &c);
                if (r != 0) {
                        if (r == 1)
                                record_error(&w->errors_request, "server closed a kept-alive connection");
                        conn_close(&c, r == 1);
                        up = false;
                }
        }
        if (up)
                conn_close(&c, true);
        return NULL;
}

/* --------------------------------------------------------------- output */

static void json_string(FILE *f, const char *s)
{
        fputc('"', f);
        for (; *s; s++) {
                unsigned char ch = (unsigned char)*s;
                if (ch == '"' || ch == '\\')
                        fprintf(f, "\\%c", ch);
                else if (ch < 0x20)
                        fprintf(f, "\\u%04x", ch);
                else
                        fputc(ch, f);
        }
        fputc('"', f);
}

static void json_number(FILE *f, double v)
{
        if (isnan(v))
                fputs("null", f);
        else
                fprintf(f, "%.3f", v);
}

static void json_latency(FILE *f, const char *name, const struct samples *s)
{
        fprintf(f, ",\"%s\":{\"count\":%zu,\"p50\":", name, s->n);
        json_number(f, percentile(s, 0.50));
        fputs(",\"p90\":", f);
        json_number(f, percentile(s, 0.90));
        fputs(",\"p99\":", f);
        json_number(f, percentile(s, 0.99));
        fputs(",\"max\":", f);
        json_number(f, s->n ? s->v[s->n - 1] : NAN);
        fputs(",\"mean\":", f);
        json_number(f, mean(s));
        fputc('}', f);
}

static void text_latency(const char *name, const struct samples *s)
{
        if (s->n == 0)
                printf("%-15s none\n", name);
        else
                printf("%-15s p50 %.2f  p90 %.2f  p99 %.2f  max %.2f  mean %.2f\n", name,
                       percentile(s, 0.50), percentile(s, 0.90), percentile(s, 0.99), s->v[s->n - 1], mean(s));
}

/* -------------------------------------------------------------- set up */

static void usage(FILE *f)
{
        fputs("Usage: hsmtls-load --connect HOST:PORT [options]\n"
              "\n"
              "Handshake mode (default): threads open full TLS handshakes back to back.\n"
              "  --connect HOST:PORT    server to load ([v6addr]:PORT for IPv6)\n"
              "  --sni NAME             server name to send and to verify (default: HOST if it\n"
              "                         is a name, none if an address; --sni '' sends none)\n"
              "  --cafile FILE          trust these CA certificates (default: the system's)\n"
              "  --insecure             do not verify the server certificate\n"
              "  --cert FILE --key FILE client certificate chain and its key\n"
              "  --tls 1.2|1.3          only this protocol version (default: what NORMAL allows)\n"
              "  --priority STRING      GnuTLS priority string (overrides --tls)\n"
              "  --threads N            parallel connections (default 16)\n"
              "  --duration SECONDS     run this long (default 10 unless --count)\n"
              "  --count N              make N connections in all\n"
              "  --requests N           HTTP/1.1 GET requests per connection after the handshake\n"
              "                         (default 0: handshake, then close_notify)\n"
              "  --path PATH            request path (default /)\n"
              "  --host-header NAME     Host header (default: SNI name or HOST)\n"
              "  --timeout SECONDS      per connect, handshake and request (default 10)\n"
              "  --no-confirm           TLS 1.3 without --requests: close at once; by default\n"
              "                         the client sends close_notify and waits for the server's\n"
              "                         answer, to see a rejection (of a client certificate)\n"
              "                         that TLS 1.3 reports only after the client finished\n"
              "\n"
              "Keep-alive probe mode:\n"
              "  --keepalive-probes     keep --connections connections open and send one\n"
              "                         request on each every --interval-ms\n"
              "  --connections C        (default 10)\n"
              "  --interval-ms MS       (default 100)\n"
              "  --duration/--count     run this long / this many probes per connection\n"
              "\n"
              "Output:\n"
              "  --json                 one JSON object instead of text\n"
              "  --verbose              print every error to stderr\n"
              "\n"
              "Exit status: 0 no error, 1 some connections or requests failed, 2 bad usage.\n",
              f);
}

static int parse_ulong(const char *name, const char *s, unsigned long min, unsigned long max, unsigned long *ret)
{
        unsigned long v;
        char *end;

        errno = 0;
        v = strtoul(s, &end, 10);
        if (errno || end == s || *end || *s == '-' || v < min || v > max) {
                fprintf(stderr, "hsmtls-load: %s must be a number from %lu to %lu, not '%s'\n", name, min, max, s);
                return -1;
        }
        *ret = v;
        return 0;
}

static int parse_seconds(const char *name, const char *s, double *ret)
{
        char *end;
        double v;

        errno = 0;
        v = strtod(s, &end);
        if (errno || end == s || *end || !(v > 0) || v > 86400 * 7) {
                fprintf(stderr, "hsmtls-load: %s must be a positive number of seconds, not '%s'\n", name, s);
                return -1;
        }
        *ret = v;
        return 0;
}

static bool is_address(const char *host)
{
        struct in6_addr a6;
        struct in_addr a4;

        return inet_pton(AF_INET, host, &a4) == 1 || inet_pton(AF_INET6, host, &a6) == 1;
}

static int parse_connect(void)
{
        const char *s = opt.connect, *colon;
        struct addrinfo hints = { .ai_socktype = SOCK_STREAM };
        int r;

        if (s[0] == '[') {
                const char *close = strchr(s, ']');
                if (!close || close[1] != ':')
                        goto bad;
                opt.host = strndup(s + 1, (size_t)(close - s - 1));
                opt.port = strdup(close + 2);
        } else {
                colon = strrchr(s, ':');
                if (!colon || colon == s || strchr(s, ':') != colon)
                        goto bad;
                opt.host = strndup(s, (size_t)(colon - s));
                opt.port = strdup(colon + 1);
        }
        if (!opt.host || !opt.port || !*opt.port)
                goto bad;
        r = getaddrinfo(opt.host, opt.port, &hints, &target);
        if (r != 0) {
                fprintf(stderr, "hsmtls-load: cannot resolve %s: %s\n", opt.connect, gai_strerror(r));
                return -1;
        }
        return 0;
bad:
        fprintf(stderr, "hsmtls-load: --connect wants HOST:PORT or [ADDRESS]:PORT, not '%s'\n", s);
        return -1;
}

static void on_signal(int sig)
{
        atomic_store(&stop, true);
}

enum {
        OPT_CONNECT = 256, OPT_SNI, OPT_CAFILE, OPT_INSECURE, OPT_THREADS, OPT_DURATION, OPT_COUNT,
        OPT_TLS, OPT_PRIORITY, OPT_CERT, OPT_KEY, OPT_REQUESTS, OPT_PATH, OPT_HOST_HEADER,
        OPT_PROBES, OPT_CONNECTIONS, OPT_INTERVAL, OPT_TIMEOUT, OPT_JSON, OPT_VERBOSE, OPT_NO_CONFIRM,
};

static int parse_args(int argc, char **argv)
{
        static const struct option longopts[] = {
                { "connect", required_argument, NULL, OPT_CONNECT },
                { "sni", required_argument, NULL, OPT_SNI },
                { "cafile", required_argument, NULL, OPT_CAFILE },
                { "insecure", no_argument, NULL, OPT_INSECURE },
                { "threads", required_argument, NULL, OPT_THREADS },
                { "duration", required_argument, NULL, OPT_DURATION },
                { "count", required_argument, NULL, OPT_COUNT },
                { "tls", required_argument, NULL, OPT_TLS },
                { "priority", required_argument, NULL, OPT_PRIORITY },
                { "cert", required_argument, NULL, OPT_CERT },
                { "key", required_argument, NULL, OPT_KEY },
                { "requests", required_argument, NULL, OPT_REQUESTS },
                { "path", required_argument, NULL, OPT_PATH },
                { "host-header", required_argument, NULL, OPT_HOST_HEADER },
                { "keepalive-probes", no_argument, NULL, OPT_PROBES },
                { "connections", required_argument, NULL, OPT_CONNECTIONS },
                { "interval-ms", required_argument, NULL, OPT_INTERVAL },
                { "timeout", required_argument, NULL, OPT_TIMEOUT },
                { "json", no_argument, NULL, OPT_JSON },
                { "verbose", no_argument, NULL, OPT_VERBOSE },
                { "no-confirm", no_argument, NULL, OPT_NO_CONFIRM },
                { "help", no_argument, NULL, 'h' },
                { NULL, 0, NULL, 0 },
        };
        unsigned long v;
        int c;

        while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
                switch (c) {
                case OPT_CONNECT: opt.connect = optarg; break;
                case OPT_SNI: opt.sni = optarg; break;
                case OPT_CAFILE: opt.cafile = optarg; break;
                case OPT_INSECURE: opt.insecure = true; break;
                case OPT_THREADS:
                        if (parse_ulong("--threads", optarg, 1, MAX_THREADS, &v) < 0)
                                return -1;
                        opt.threads = (unsigned)v;
                        break;
                case OPT_DURATION:
                        if (parse_seconds("--duration", optarg, &opt.duration) < 0)
                                return -1;
                        break;
                case OPT_COUNT:
                        if (parse_ulong("--count", optarg, 1, ULONG_MAX / 2, &opt.count) < 0)
                                return -1;
                        break;
                case OPT_TLS:
                        if (strcmp(optarg, "1.2") != 0 && strcmp(optarg, "1.3") != 0) {
                                fprintf(stderr, "hsmtls-load: --tls must be 1.2 or 1.3\n");
                                return -1;
                        }
                        opt.tls = optarg;
                        break;
                case OPT_PRIORITY: opt.priority = optarg; break;
                case OPT_CERT: opt.cert = optarg; break;
                case OPT_KEY: opt.key = optarg; break;
                case OPT_REQUESTS:
                        if (parse_ulong("--requests", optarg, 0, 1000000, &v) < 0)
                                return -1;
                        opt.requests = (unsigned)v;
                        break;
                case OPT_PATH: opt.path = optarg; break;
                case OPT_HOST_HEADER: opt.host_header = optarg; break;
                case OPT_PROBES: opt.probes = true; break;
                case OPT_CONNECTIONS:
                        if (parse_ulong("--connections", optarg, 1, MAX_THREADS, &v) < 0)
                                return -1;
                        opt.connections = (unsigned)v;
                        break;
                case OPT_INTERVAL:
                        if (parse_ulong("--interval-ms", optarg, 1, 3600000, &v) < 0)
                                return -1;
                        opt.interval_ms = (unsigned)v;
                        break;
                case OPT_TIMEOUT:
                        if (parse_seconds("--timeout", optarg, &opt.timeout) < 0)
                                return -1;
                        break;
                case OPT_JSON: opt.json = true; break;
                case OPT_VERBOSE: opt.verbose = true; break;
                case OPT_NO_CONFIRM: opt.confirm = false; break;
                case 'h':
                        usage(stdout);
                        exit(0);
                default:
                        usage(stderr);
                        return -1;
                }
        }
        if (optind < argc) {
                fprintf(stderr, "hsmtls-load: unexpected argument '%s'\n", argv[optind]);
                return -1;
        }
        if (!opt.connect) {
                fprintf(stderr, "hsmtls-load: --connect HOST:PORT is required\n");
                usage(stderr);
                return -1;
        }
        if (opt.cafile && opt.insecure) {
                fprintf(stderr, "hsmtls-load: --cafile and --insecure exclude each other\n");
                return -1;
        }
        if (!opt.cert != !opt.key) {
                fprintf(stderr, "hsmtls-load: --cert and --key go together\n");
                return -1;
        }
        if (opt.path[0] != '/' || strpbrk(opt.path, " \r\n")) {
                fprintf(stderr, "hsmtls-load: --path must start with / and hold no spaces or line breaks\n");
                return -1;
        }
        if (opt.host_header && strpbrk(opt.host_header, "\r\n")) {
                fprintf(stderr, "hsmtls-load: --host-header must not hold line breaks\n");
                return -1;
        }
        if (opt.probes && opt.requests) {
                fprintf(stderr, "hsmtls-load: --requests is for handshake mode; a probe is one request\n");
                return -1;
        }
        if (opt.duration == 0 && opt.count == 0)
                opt.duration = 10;
        return 0;
}

static int setup_tls(void)
{
        static char prio_buf[512];
        const char *errpos = NULL;
        int ret;

        if ((ret = gnutls_global_init()) < 0 ||
            (ret = gnutls_certificate_allocate_credentials(&cred)) < 0) {
                fprintf(stderr, "hsmtls-load: GnuTLS: %s\n", gnutls_strerror(ret));
                return -1;
        }
        if (opt.cafile) {
                ret = gnutls_certificate_set_x509_trust_file(cred, opt.cafile, GNUTLS_X509_FMT_PEM);
                if (ret <= 0) {
                        fprintf(stderr, "hsmtls-load: no CA certificate loaded from %s: %s\n", opt.cafile,
                                ret < 0 ? gnutls_strerror(ret) : "the file holds none");
                        return -1;
                }
        } else if (!opt.insecure) {
                ret = gnutls_certificate_set_x509_system_trust(cred);
                if (ret <= 0) {
                        fprintf(stderr, "hsmtls-load: no system CA certificates (%s); use --cafile or --insecure\n",
                                ret < 0 ? gnutls_strerror(ret) : "none found");
                        return -1;
                }
        }
        if (opt.cert) {
                ret = gnutls_certificate_set_x509_key_file2(cred, opt.cert, opt.key, GNUTLS_X509_FMT_PEM, NULL, 0);
                if (ret < 0) {
                        fprintf(stderr, "hsmtls-load: cannot load --cert %s / --key %s: %s\n", opt.cert, opt.key,
                                gnutls_strerror(ret));
                        return -1;
                }
        }

        if (opt.priority) {
                if (opt.tls)
                        fprintf(stderr, "hsmtls-load: --priority given, --tls %s is ignored\n", opt.tls);
                prio_string = opt.priority;
        } else if (opt.tls) {
                snprintf(prio_buf, sizeof(prio_buf), "NORMAL:-VERS-ALL:+VERS-TLS%s", opt.tls);
                prio_string = prio_buf;
        } else {
                prio_string = "NORMAL";
        }
        ret = gnutls_priority_init2(&prio, prio_string, &errpos, 0);
        if (ret < 0) {
                fprintf(stderr, "hsmtls-load: bad priority string '%s' at '%s': %s\n", prio_string,
                        errpos ? errpos : "", gnutls_strerror(ret));
                return -1;
        }

        if (opt.sni)
                sni_name = opt.sni[0] ? opt.sni : NULL;
        else
                sni_name = is_address(opt.host) ? NULL : opt.host;
        if (!opt.insecure)
                verify_name = opt.sni && opt.sni[0] ? opt.sni : opt.host;
        host_header = opt.host_header ? opt.host_header : sni_name ? sni_name : opt.host;
        return 0;
}

int main(int argc, char **argv)
{
        struct worker *workers;
        struct samples hs = { 0 }, rq = { 0 };
        unsigned long connections = 0, e_conn = 0, e_hs = 0, e_rq = 0, late = 0;
        unsigned nthreads, started = 0;
        struct sigaction sa = { .sa_handler = on_signal };
        sigset_t block, old;
        double elapsed_ms;
        pthread_attr_t attr;

        setvbuf(stdout, NULL, _IOLBF, 0);
        if (parse_args(argc, argv) < 0)
                return 2;
        if (parse_connect() < 0 || setup_tls() < 0)
                return 2;

        signal(SIGPIPE, SIG_IGN);
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGTERM, &sa, NULL);

        nthreads = opt.probes ? opt.connections : opt.threads;
        workers = calloc(nthreads, sizeof(*workers));
        if (!workers) {
                fprintf(stderr, "hsmtls-load: out of memory\n");
                return 2;
        }
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 512 * 1024);

        /* Workers leave SIGINT and SIGTERM to the main thread. */
        sigemptyset(&block);
        sigaddset(&block, SIGINT);
        sigaddset(&block, SIGTERM);
        pthread_sigmask(SIG_BLOCK, &block, &old);
        clock_gettime(CLOCK_MONOTONIC, &t_start);
        for (unsigned i = 0; i < nthreads; i++) {
                workers[i].index = i;
                if (pthread_create(&workers[i].thread, &attr, opt.probes ? probe_worker : handshake_worker,
                                   &workers[i]) != 0) {
                        fprintf(stderr, "hsmtls-load: cannot start thread %u of %u\n", i + 1, nthreads);
                        atomic_store(&stop, true);
                        break;
                }
                started++;
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        pthread_attr_destroy(&attr);

        if (opt.duration > 0) {
                struct timespec until = t_start;
                timespec_add_ms(&until, opt.duration * 1000);
                while (!atomic_load(&stop) &&
                       clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL) == EINTR)
                        ;
                atomic_store(&stop, true);
        }
        for (unsigned i = 0; i < started; i++)
                pthread_join(workers[i].thread, NULL);
        elapsed_ms = since_start_ms();

        for (unsigned i = 0; i < started; i++) {
                struct worker *w = &workers[i];
                if (samples_merge(&hs, &w->hs) < 0 || samples_merge(&rq, &w->rq) < 0) {
                        fprintf(stderr, "hsmtls-load: out of memory\n");
                        return 2;
                }
                connections += w->connections;
                e_conn += w->errors_connect;
                e_hs += w->errors_handshake;
                e_rq += w->errors_request;
                late += w->late;
                free(w->hs.v);
                free(w->rq.v);
        }
        if (hs.n)
                qsort(hs.v, hs.n, sizeof(double), cmp_double);
        if (rq.n)
                qsort(rq.v, rq.n, sizeof(double), cmp_double);
        unsigned long errors = e_conn + e_hs + e_rq;
        double secs = elapsed_ms / 1e3;

        if (opt.json) {
                printf("{\"mode\":\"%s\",\"connect\":", opt.probes ? "keepalive-probes" : "handshake");
                json_string(stdout, opt.connect);
                printf(",\"sni\":");
                if (sni_name)
                        json_string(stdout, sni_name);
                else
                        fputs("null", stdout);
                printf(",\"priority\":");
                json_string(stdout, prio_string);
                printf(",\"negotiated\":");
                json_string(stdout, negotiated);
                printf(",\"threads\":%u", started);
                if (opt.probes)
                        printf(",\"connections_kept\":%u,\"interval_ms\":%u", opt.connections, opt.interval_ms);
                printf(",\"requests_per_connection\":%u,\"elapsed_s\":%.3f", opt.requests, secs);
                printf(",\"connections\":%lu,\"handshakes\":%zu,\"handshakes_per_s\":%.1f", connections, hs.n,
                       (double)hs.n / secs);
                json_latency(stdout, "handshake_ms", &hs);
                printf(",\"requests\":%zu,\"requests_per_s\":%.1f", rq.n, (double)rq.n / secs);
                json_latency(stdout, "request_ms", &rq);
                if (opt.probes)
                        printf(",\"late_probes\":%lu", late);
                printf(",\"errors\":%lu,\"errors_connect\":%lu,\"errors_handshake\":%lu,\"errors_request\":%lu",
                       errors, e_conn, e_hs, e_rq);
                printf(",\"first_error\":");
                if (errors)
                        json_string(stdout, first_error);
                else
                        fputs("null", stdout);
                printf("}\n");
        } else {
                printf("target:         %s (sni %s, %s)\n", opt.connect, sni_name ? sni_name : "none",
                       opt.insecure ? "not verified" : "verified");
                printf("priority:       %s\n", prio_string);
                printf("negotiated:     %s\n", negotiated[0] ? negotiated : "-");
                if (opt.probes)
                        printf("mode:           keep-alive probes, %u connections, every %u ms, %.2f s\n",
                               opt.connections, opt.interval_ms, secs);
                else
                        printf("mode:           handshakes, %u threads, %u requests each, %.2f s\n", started,
                               opt.requests, secs);
                printf("connections:    %lu\n", connections);
                if (opt.probes)
                        printf("handshakes:     %zu\n", hs.n);
                else
                        printf("handshakes:     %zu (%.1f/s)\n", hs.n, (double)hs.n / secs);
                text_latency("handshake ms:", &hs);
                if (opt.requests || opt.probes) {
                        printf("requests:       %zu (%.1f/s)\n", rq.n, (double)rq.n / secs);
                        text_latency("request ms:", &rq);
                }
                if (opt.probes)
                        printf("late probes:    %lu (sent more than one interval late)\n", late);
                printf("errors:         %lu (connect %lu, handshake %lu, request %lu)\n", errors, e_conn, e_hs, e_rq);
                if (errors)
                        printf("first error:    %s\n", first_error);
        }

        free(hs.v);
        free(rq.v);
        free(workers);
        gnutls_priority_deinit(prio);
        gnutls_certificate_free_credentials(cred);
        freeaddrinfo(target);
        free(opt.host);
        free(opt.port);
        gnutls_global_deinit();
        return errors ? 1 : 0;
}
