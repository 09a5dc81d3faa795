/* I/O loops: established connections, proxied between TLS and the backend
 * on libevent loops that never call the token. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"
#include "log.h"

enum { ARM_CR = 1, ARM_CW = 2, ARM_BR = 4, ARM_BW = 8 };
#define REFUSED_LINGER_MS 2000

static void conn_close(struct conn *c, const char *why);
static void record_error(struct conn *c, int err);

/* Closing fd sends a reset (TCP; a unix socket sees an end either way). */
static void reset_on_close(int fd)
{
        static const struct linger lg = { 1, 0 };
        if (fd >= 0)
                setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
}

/* One side of c was cut (see c_cut, b_cut): what came from it before is
 * delivered, then the other side is reset and never given a proper end (a
 * FIN to the plaintext peer, close_notify to the TLS peer), so that a stream
 * cut by the network or a failing peer is never taken for a whole one (the
 * truncation attack on protocols that end a message with the connection).
 * conn_close() resets the plaintext side by itself unless it was given the
 * TLS peer's end. */
static void conn_abort(struct conn *c, int fd, const char *why)
{
        reset_on_close(fd);
        conn_close(c, why);
}

/* The plaintext peer, as the log names it. */
static const char *plain_peer(const struct conn *c)
{
        return c->l->conf->kind == HSM_CONNECTOR ? "the local client" : "the backend";
}

/* A record for the TLS peer could not be sent (it reset the connection,
 * or went away): the plaintext side is reset by conn_close(). */
static void tls_send_failed(struct conn *c, ssize_t err)
{
        char why[128];
        snprintf(why, sizeof(why), "sending to the %s failed (%s)",
                 c->l->conf->kind == HSM_CONNECTOR ? "server" : "client", gnutls_strerror((int)err));
        conn_close(c, why);
}

static void set_armed(struct conn *c, unsigned want)
{
        struct event *evs[4] = { c->ev_cr, c->ev_cw, c->ev_br, c->ev_bw };
        for (int i = 0; i < 4; i++) {
                unsigned bit = 1u << i;
                if ((want & bit) && !(c->armed & bit))
                        event_add(evs[i], NULL);
                else if (!(want & bit) && (c->armed & bit))
                        event_del(evs[i]);
        }
        c->armed = want;
}

static int keep(uint8_t **buf, size_t *len, size_t *off, const uint8_t *data, size_t n)
{
        *buf = malloc(n);
        if (!*buf)
                return -ENOMEM;
        memcpy(*buf, data, n);
        *len = n;
        *off = 0;
        return 0;
}

static void drop(uint8_t **buf, size_t *len, size_t *off)
{
        free(*buf);
        *buf = NULL;
        *len = *off = 0;
}

/* One timer, idle_timeout, also after the plaintext peer ended and its end
 * went on as close_notify: the TLS peer may still send (a half-close), and
 * if it neither sends nor ends within idle_timeout, conn_close() resets the
 * plaintext side, whose upload was never ended. */
static void touch_timer(struct conn *c)
{
        unsigned ms = c->l->conf->idle_timeout_ms;
        struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };
        event_add(c->ev_timer, &tv);
}

/* Moves data both ways until nothing more can be done without waiting. */
static void pump(struct conn *c)
{
        uint8_t *buf = c->loop->buf;
        unsigned want = 0;
        int progress, rounds = 0;

        do {
                progress = 0;
                want = 0;

                /* client -> backend */
                if (!c->c2b && !c->c_eof) {
                        ssize_t n = gnutls_record_recv(c->tls, buf, 16384);
                        if (n > 0) {
                                c->bytes_in += (uint64_t)n;
                                progress = 1;
                                if (c->b_shut) {
                                        /* the backend is gone: discard */
                                } else {
                                        ssize_t w = send(c->bfd, buf, (size_t)n, MSG_NOSIGNAL);
                                        if (w < 0 && errno != EAGAIN && errno != EINTR) {
                                                conn_close(c, "backend write failed");
                                                return;
                                        }
                                        if (w < 0)
                                                w = 0;
                                        if (w < n && keep(&c->c2b, &c->c2b_len, &c->c2b_off, buf + w, (size_t)(n - w)) < 0) {
                                                conn_close(c, "out of memory");
                                                return;
                                        }
                                }
                        } else if (n == 0) {
                                c->c_eof = 1;
                                progress = 1;
                        } else if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED) {
                                want |= gnutls_record_get_direction(c->tls) ? ARM_CW : ARM_CR;
                        } else if (n == GNUTLS_E_REHANDSHAKE) {
                                /* A TLS 1.2 client asks for renegotiation: never
                                 * done. A warning alone would not do: GnuTLS
                                 * keeps the ClientHello and the next read fails
                                 * with unexpected_message; so the refusal ends
                                 * the connection with no_renegotiation, fatal. */
                                record_error(c, (int)n);
                                return;
                        } else if (!gnutls_error_is_fatal((int)n)) {
                                progress = 1;
                        } else if (n == GNUTLS_E_PREMATURE_TERMINATION) {
                                /* TCP closed without close_notify: a cut, not an end */
                                c->c_eof = 1;
                                c->c_cut = 1;
                                progress = 1;
                        } else {
                                record_error(c, (int)n);
                                return;
                        }
                }
                if (c->c2b) {
                        ssize_t w = send(c->bfd, c->c2b + c->c2b_off, c->c2b_len - c->c2b_off, MSG_NOSIGNAL);
                        if (w < 0 && errno != EAGAIN && errno != EINTR) {
                                conn_close(c, "backend write failed");
                                return;
                        }
                        if (w > 0) {
                                c->c2b_off += (size_t)w;
                                progress = 1;
                                if (c->c2b_off == c->c2b_len)
                                        drop(&c->c2b, &c->c2b_len, &c->c2b_off);
                        }
                        if (c->c2b)
                                want |= ARM_BW;
                }
                if (c->c_eof && !c->c2b && !c->b_shut) {
                        if (c->c_cut) {
                                conn_abort(c, c->bfd, c->l->conf->kind == HSM_CONNECTOR ? "the server closed without close_notify"
                                                                                        : "the client closed without close_notify");
                                return;
                        }
                        shutdown(c->bfd, SHUT_WR);
                        c->b_shut = 1;
                        progress = 1;
                }

                /* backend -> client */
                if (!c->b2c && !c->b_eof) {
                        ssize_t n = recv(c->bfd, buf, 16384, 0);
                        if (n > 0) {
                                progress = 1;
                                ssize_t w = gnutls_record_send(c->tls, buf, (size_t)n);
                                if (w == GNUTLS_E_AGAIN || w == GNUTLS_E_INTERRUPTED) {
                                        /* GnuTLS holds the record; it is retried with the same data. */
                                        if (keep(&c->b2c, &c->b2c_len, &c->b2c_off, buf, (size_t)n) < 0) {
                                                conn_close(c, "out of memory");
                                                return;
                                        }
                                } else if (w < 0) {
                                        tls_send_failed(c, w);
                                        return;
                                } else {
                                        c->bytes_out += (uint64_t)w;
                                        if (w < n && keep(&c->b2c, &c->b2c_len, &c->b2c_off, buf + w, (size_t)(n - w)) < 0) {
                                                conn_close(c, "out of memory");
                                                return;
                                        }
                                }
                        } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
                                c->b_eof = 1;
                                c->b_cut = n < 0;
                                c->b_errno = n < 0 ? errno : 0;
                                progress = 1;
                        } else
                                want |= ARM_BR;
                }
                if (c->b2c) {
                        ssize_t w = gnutls_record_send(c->tls, c->b2c + c->b2c_off, c->b2c_len - c->b2c_off);
                        if (w >= 0) {
                                c->bytes_out += (uint64_t)w;
                                c->b2c_off += (size_t)w;
                                progress = 1;
                                if (c->b2c_off >= c->b2c_len)
                                        drop(&c->b2c, &c->b2c_len, &c->b2c_off);
                        } else if (w != GNUTLS_E_AGAIN && w != GNUTLS_E_INTERRUPTED) {
                                tls_send_failed(c, w);
                                return;
                        }
                        if (c->b2c)
                                want |= ARM_CW;
                }
                if (c->b_eof && !c->b2c && !c->c_bye && c->b_cut) {
                        char why[160];
                        snprintf(why, sizeof(why), "%s read failed (%s): closed without close_notify",
                                 c->l->conf->kind == HSM_CONNECTOR ? "the local client's" : "the backend's", strerror(c->b_errno));
                        conn_abort(c, c->cfd, why);
                        return;
                }
                if (c->b_eof && !c->b2c && !c->c_bye) {
                        int r = gnutls_bye(c->tls, GNUTLS_SHUT_WR);
                        if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
                                want |= ARM_CW;
                        else {
                                c->c_bye = 1;
                                progress = 1;
                                shutdown(c->cfd, SHUT_WR);
                        }
                }
                if (c->c_eof && c->b_eof && c->c_bye && !c->c2b && !c->b2c) {
                        conn_close(c, NULL);
                        return;
                }
        } while (progress && ++rounds < 16);

        set_armed(c, want);
        touch_timer(c);
        /* A busy connection does not keep its loop's other connections
         * waiting: after 16 rounds it yields and goes on at the next pass
         * of the loop, after the loop has polled its sockets again (a
         * zero timer: event_active() would run it in this same pass).
         * Through an event of its own, never ev_cr: libevent does not
         * register an fd event with epoll while that event is active, so
         * activating ev_cr and then adding it (from another callback of
         * this connection in the same pass) left it active, then neither
         * active nor watched: the connection stopped reading its client
         * for good. */
        if (progress) {
                static const struct timeval now = { 0, 0 };
                evtimer_add(c->ev_again, &now);
        }
}

static void on_event(evutil_socket_t fd, short what, void *arg)
{
        pump(arg);
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
        struct conn *c = arg;
        char why[96];
        if (c->c_bye && c->b_eof) /* the TLS peer has our close_notify; its end never came */
                snprintf(why, sizeof(why), "idle timeout after %s ended and close_notify was sent", plain_peer(c));
        else
                snprintf(why, sizeof(why), "idle timeout");
        conn_close(c, c->lingering ? NULL : why);
}

/* The plaintext side gets a proper end (FIN) only when it was given the TLS
 * peer's (b_shut: close_notify; a cut never is, see c_cut); every other
 * close (idle timeout, also after the plaintext peer's own end; a failed
 * send to the TLS peer; a drain timeout; shutdown) resets it, so that an
 * upload cut there is never taken for a whole one. The TLS peer gets
 * close_notify only from pump(), after the plaintext peer's end. */
static void conn_close(struct conn *c, const char *why)
{
        struct ioloop *loop = c->loop;
        char reset[40] = "";
        if (c->bfd >= 0 && !c->b_shut) {
                reset_on_close(c->bfd);
                if (!c->b_cut) /* a peer whose read failed is gone already */
                        snprintf(reset, sizeof(reset), ": %s is reset", plain_peer(c));
        }
        if (why)
                hsm_info("%s %s: %s: closed (%s%s), %llu bytes in, %llu bytes out", EP_KIND(c->l), c->l->conf->name, c->peer, why,
                         reset, (unsigned long long)c->bytes_in, (unsigned long long)c->bytes_out);
        else
                hsm_debug("%s %s: %s: closed, %llu bytes in, %llu bytes out", EP_KIND(c->l), c->l->conf->name, c->peer,
                          (unsigned long long)c->bytes_in, (unsigned long long)c->bytes_out);
        struct event *evs[6] = { c->ev_cr, c->ev_cw, c->ev_br, c->ev_bw, c->ev_timer, c->ev_again };
        for (int i = 0; i < 6; i++)
                if (evs[i])
                        event_free(evs[i]);
        c->ev_cr = c->ev_cw = c->ev_br = c->ev_bw = c->ev_timer = c->ev_again = NULL;
        drop(&c->c2b, &c->c2b_len, &c->c2b_off);
        drop(&c->b2c, &c->b2c_len, &c->b2c_off);
        if (c->prev)
                c->prev->next = c->next;
        else
                loop->conns = c->next;
        if (c->next)
                c->next->prev = c->prev;
        loop->n_conns--;
        hsm_conn_free(loop->srv, c);
}

/* A refused connection: its alert is sent and our side shut; read and drop
 * what the client still sends until it closes, so that closing does not
 * reset the connection before the client has read the alert. */
static void on_linger(evutil_socket_t fd, short what, void *arg)
{
        struct conn *c = arg;
        for (;;) {
                ssize_t n = recv(c->cfd, c->loop->buf, sizeof(c->loop->buf), 0);
                if (n > 0)
                        continue;
                if (n < 0 && (errno == EAGAIN || errno == EINTR))
                        return;
                conn_close(c, NULL);
                return;
        }
}

/* Puts c on the loop's list of connections (closed at shutdown). */
static void loop_link(struct ioloop *loop, struct conn *c)
{
        c->loop = loop;
        c->prev = NULL;
        c->next = loop->conns;
        if (loop->conns)
                loop->conns->prev = c;
        loop->conns = c;
        loop->n_conns++;
}

static void start_linger(struct ioloop *loop, struct conn *c)
{
        c->loop = loop;
        c->ev_cr = event_new(loop->base, c->cfd, EV_READ | EV_PERSIST, on_linger, c);
        c->ev_timer = evtimer_new(loop->base, on_timer, c);
        loop_link(loop, c);
        struct timeval tv = { REFUSED_LINGER_MS / 1000, (REFUSED_LINGER_MS % 1000) * 1000 };
        if (!c->ev_cr || !c->ev_timer || event_add(c->ev_cr, NULL) < 0 || event_add(c->ev_timer, &tv) < 0)
                conn_close(c, NULL);
}

/* A fatal error on the TLS side after the handshake (a record that does
 * not decrypt or authenticate, an unexpected or malformed message): the
 * client gets the fatal alert GnuTLS names for the error (RFC 8446 6.2,
 * RFC 5246 7.2.2), sent without waiting on the socket; the backend side is
 * closed; then the connection lingers like a refused one, so that the
 * client reads the alert rather than a reset. */
static void record_error(struct conn *c, int err)
{
        struct ioloop *loop = c->loop;
        int level = GNUTLS_AL_FATAL;
        int alert = err == GNUTLS_E_REHANDSHAKE ? GNUTLS_A_NO_RENEGOTIATION : gnutls_error_to_alert(err, &level);
        char sent[96] = "no alert";
        /* Nothing to tell a peer that is gone or that sent an alert itself. */
        if (alert >= 0 && err != GNUTLS_E_PUSH_ERROR && err != GNUTLS_E_PULL_ERROR && err != GNUTLS_E_FATAL_ALERT_RECEIVED) {
                /* GnuTLS may still hold a record for the client that a full
                 * socket stopped (b2c pending): an alert sent now would
                 * only flush that record, so flush first; if the client
                 * reads nothing, the alert cannot go out and the log says so. */
                int r = 0;
                if (c->b2c)
                        r = (int)gnutls_record_send(c->tls, NULL, 0);
                if (r >= 0)
                        r = gnutls_alert_send(c->tls, GNUTLS_AL_FATAL, (gnutls_alert_description_t)alert);
                const char *name = gnutls_alert_get_name((gnutls_alert_description_t)alert);
                snprintf(sent, sizeof(sent), "%s alert %s", r < 0 ? "could not send" : "sent", name ? name : "?");
        }
        hsm_info("%s %s: %s: closed (%s; %s), %llu bytes in, %llu bytes out", EP_KIND(c->l), c->l->conf->name, c->peer,
                 gnutls_strerror(err), sent, (unsigned long long)c->bytes_in, (unsigned long long)c->bytes_out);
        struct event *evs[6] = { c->ev_cr, c->ev_cw, c->ev_br, c->ev_bw, c->ev_timer, c->ev_again };
        for (int i = 0; i < 6; i++)
                if (evs[i])
                        event_free(evs[i]);
        c->ev_cr = c->ev_cw = c->ev_br = c->ev_bw = c->ev_timer = c->ev_again = NULL;
        c->armed = 0;
        drop(&c->c2b, &c->c2b_len, &c->c2b_off);
        drop(&c->b2c, &c->b2c_len, &c->b2c_off);
        if (c->bfd >= 0) { /* reset, not ended: what came before the bad record may be cut */
                reset_on_close(c->bfd);
                close(c->bfd);
                c->bfd = -1;
        }
        shutdown(c->cfd, SHUT_WR);
        c->lingering = 1;
        c->ev_cr = event_new(loop->base, c->cfd, EV_READ | EV_PERSIST, on_linger, c);
        c->ev_timer = evtimer_new(loop->base, on_timer, c);
        struct timeval tv = { REFUSED_LINGER_MS / 1000, (REFUSED_LINGER_MS % 1000) * 1000 };
        if (!c->ev_cr || !c->ev_timer || event_add(c->ev_cr, NULL) < 0 || event_add(c->ev_timer, &tv) < 0)
                conn_close(c, NULL);
}

static void start_conn(struct ioloop *loop, struct conn *c)
{
        if (c->lingering) {
                start_linger(loop, c);
                return;
        }
        c->loop = loop;
        c->ev_cr = event_new(loop->base, c->cfd, EV_READ | EV_PERSIST, on_event, c);
        c->ev_cw = event_new(loop->base, c->cfd, EV_WRITE | EV_PERSIST, on_event, c);
        c->ev_br = event_new(loop->base, c->bfd, EV_READ | EV_PERSIST, on_event, c);
        c->ev_bw = event_new(loop->base, c->bfd, EV_WRITE | EV_PERSIST, on_event, c);
        c->ev_timer = evtimer_new(loop->base, on_timer, c);
        c->ev_again = evtimer_new(loop->base, on_event, c);
        loop_link(loop, c);
        if (!c->ev_cr || !c->ev_cw || !c->ev_br || !c->ev_bw || !c->ev_timer || !c->ev_again) {
                conn_close(c, "out of memory");
                return;
        }
        pump(c);
}

static void on_wake(evutil_socket_t fd, short what, void *arg)
{
        struct ioloop *loop = arg;
        uint64_t n; /* before the inbox is taken: a later adopt writes again */
        if (read(loop->wake_fd, &n, sizeof(n)) < 0 && errno != EAGAIN)
                hsm_err("I/O loop: cannot read its wake-up: %s", strerror(errno));
        pthread_mutex_lock(&loop->lock);
        struct conn *list = loop->inbox;
        loop->inbox = NULL;
        int stop = loop->stop;
        pthread_mutex_unlock(&loop->lock);
        while (list) {
                struct conn *c = list;
                list = c->next;
                start_conn(loop, c);
        }
        /* A listener removed by a reload whose drain timed out. */
        for (struct conn *c = loop->conns, *next; c; c = next) {
                next = c->next;
                if (__atomic_load_n(&c->l->kill_now, __ATOMIC_ACQUIRE))
                        conn_close(c, "listener removed by a reload: drain timeout");
        }
        if (stop) {
                while (loop->conns)
                        conn_close(loop->conns, "shutting down");
                event_base_loopbreak(loop->base);
        }
}

/* An eventfd of the loop's own, not event_active(): that takes the loop's
 * libevent lock, which the loop holds whenever it is awake. */
void hsm_ioloop_wake(struct ioloop *loop)
{
        uint64_t one = 1;
        if (write(loop->wake_fd, &one, sizeof(one)) < 0)
                hsm_err("cannot wake an I/O loop: %s", strerror(errno));
}

void hsm_ioloop_adopt(struct ioloop *loop, struct conn *c)
{
        pthread_mutex_lock(&loop->lock);
        bool first = !loop->inbox; /* the loop takes the whole inbox at each wake */
        c->next = loop->inbox;
        loop->inbox = c;
        pthread_mutex_unlock(&loop->lock);
        if (first)
                hsm_ioloop_wake(loop);
}

static void *loop_main(void *arg)
{
        struct ioloop *loop = arg;
        event_base_loop(loop->base, EVLOOP_NO_EXIT_ON_EMPTY);
        return NULL;
}

int hsm_ioloop_start(hsm_server *s, struct ioloop *loop)
{
        loop->srv = s;
        pthread_mutex_init(&loop->lock, NULL);
        loop->base = event_base_new();
        if (!loop->base)
                return -ENOMEM;
        loop->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        loop->wake = loop->wake_fd >= 0 ? event_new(loop->base, loop->wake_fd, EV_READ | EV_PERSIST, on_wake, loop) : NULL;
        int r = loop->wake_fd < 0 ? errno : !loop->wake ? ENOMEM : 0;
        if (!r)
                event_add(loop->wake, NULL);
        if (!r)
                r = pthread_create(&loop->thread, NULL, loop_main, loop);
        if (r) {
                /* not started: hsm_ioloop_stop() has nothing to stop */
                if (loop->wake)
                        event_free(loop->wake);
                if (loop->wake_fd >= 0)
                        close(loop->wake_fd);
                event_base_free(loop->base);
                loop->base = NULL;
        }
        return -r;
}

void hsm_ioloop_stop(struct ioloop *loop)
{
        if (!loop->base)
                return;
        pthread_mutex_lock(&loop->lock);
        loop->stop = 1;
        pthread_mutex_unlock(&loop->lock);
        hsm_ioloop_wake(loop);
        pthread_join(loop->thread, NULL);
        event_free(loop->wake);
        close(loop->wake_fd);
        event_base_free(loop->base);
        pthread_mutex_destroy(&loop->lock);
        loop->base = NULL;
}
