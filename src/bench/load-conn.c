/* hsmtls-load: connections, TLS handshakes, HTTP/1.1 requests and responses,
 * and the worker threads of both modes. */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <gnutls/gnutls.h>

#include "load.h"

#define HEADER_MAX (64 * 1024)

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

/* --resume: whether this connection offers the saved session. An
 * accumulator makes the share exact: RATIO per connection, one resumption
 * each time it reaches 1 (the first connection of a thread is full). */
static bool want_resume(struct worker *w)
{
        if (opt.resume <= 0)
                return false;
        w->resume_acc += opt.resume;
        if (w->resume_acc < 1 || !w->saved.size)
                return false;
        w->resume_acc -= 1;
        return true;
}

/* --resume: keeps the session of a connection that is done (TLS 1.3: only
 * once a ticket came, which is after the handshake). */
static void save_session(struct worker *w, struct conn *c)
{
        gnutls_datum_t d = { NULL, 0 };
        if (opt.resume <= 0 || !c->s)
                return;
        if (gnutls_protocol_get_version(c->s) == GNUTLS_TLS1_3 && !(gnutls_session_get_flags(c->s) & GNUTLS_SFLAGS_SESSION_TICKET))
                return;
        if (gnutls_session_get_data2(c->s, &d) < 0 || d.size == 0) {
                gnutls_free(d.data);
                return;
        }
        gnutls_free(w->saved.data);
        w->saved = d;
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

        /* A fresh session: no tickets, no resumption data (with --resume:
         * tickets, and the saved session when this one is to resume). */
        bool resume = want_resume(w);
        ret = gnutls_init(&c->s, opt.resume > 0 ? GNUTLS_CLIENT : GNUTLS_CLIENT | GNUTLS_NO_TICKETS);
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
        if (resume && gnutls_session_set_data(c->s, w->saved.data, w->saved.size) == 0)
                w->resume_offered++;
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
        if (resume && gnutls_session_is_resumed(c->s))
                w->resumed++;

        if (leaf_log) {
                unsigned n = 0;
                const gnutls_datum_t *peer = gnutls_certificate_get_peers(c->s, &n);
                unsigned char fp[32];
                size_t fl = sizeof(fp);
                char hex[65] = "none";
                if (n > 0 && gnutls_fingerprint(GNUTLS_DIG_SHA256, &peer[0], fp, &fl) >= 0 && fl == 32)
                        for (unsigned i = 0; i < 32; i++)
                                snprintf(hex + 2 * i, 3, "%02x", fp[i]);
                pthread_mutex_lock(&err_lock);
                fprintf(leaf_log, "%s\n", hex);
                fflush(leaf_log);
                pthread_mutex_unlock(&err_lock);
        }
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

static atomic_ulong tickets;            /* connections started, for --count */

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

void *handshake_worker(void *arg)
{
        struct worker *w = arg;
        struct conn c;

        while (take_ticket()) {
                if (conn_open(w, &c) < 0)
                        continue;
                if (opt.requests == 0 && opt.confirm && gnutls_protocol_get_version(c.s) == GNUTLS_TLS1_3) {
                        if (confirm_tls13(w, &c) == 0)
                                save_session(w, &c);
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
                save_session(w, &c);
                conn_close(&c, true);
        }
        return NULL;
}

/* Keep-alive probes: one connection per thread, one request per interval.
 * The first probe of connection i is shifted by i/C of an interval, so
 * that the probes are spread evenly rather than sent in bursts. */
void *probe_worker(void *arg)
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
