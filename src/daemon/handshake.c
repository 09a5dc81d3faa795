/* The handshake pool: threads that run TLS handshakes, each of which may
 * block on the token. Sized to the tokens' session pools, not to cores, so
 * that a slow token is kept busy; established connections never wait here. */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "internal.h"
#include "log.h"
#include "usage.h"

void hsm_handshake_enqueue(hsm_server *s, struct conn *c)
{
        c->next = NULL;
        pthread_mutex_lock(&s->hs_lock);
        if (s->hs_tail)
                s->hs_tail->next = c;
        else
                s->hs_head = c;
        s->hs_tail = c;
        s->hs_queued++;
        pthread_cond_signal(&s->hs_cond);
        pthread_mutex_unlock(&s->hs_lock);
}

/* Returns 0 when done, a GnuTLS error code, or 1 for a timeout or socket
 * error (no alert is sent then). */
static int run_handshake(hsm_server *s, struct conn *c, const char **why);

/* Transport: the ClientHello bytes read by the main thread come first. */
static ssize_t conn_pull(gnutls_transport_ptr_t ptr, void *data, size_t len)
{
        struct conn *c = ptr;
        if (c->pre) {
                size_t n = c->pre_len - c->pre_off;
                if (n > len)
                        n = len;
                memcpy(data, c->pre + c->pre_off, n);
                c->pre_off += n;
                if (c->pre_off == c->pre_len) {
                        free(c->pre);
                        c->pre = NULL;
                }
                return (ssize_t)n;
        }
        ssize_t r = recv(c->cfd, data, len, 0);
        if (r < 0)
                gnutls_transport_set_errno(c->tls, errno);
        return r;
}

static ssize_t conn_vec_push(gnutls_transport_ptr_t ptr, const giovec_t *iov, int iovcnt)
{
        struct conn *c = ptr;
        struct msghdr m = { .msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)iovcnt };
        ssize_t r = sendmsg(c->cfd, &m, MSG_NOSIGNAL);
        if (r < 0)
                gnutls_transport_set_errno(c->tls, errno);
        return r;
}

static int wait_fd(int fd, short events, uint64_t deadline_ns)
{
        for (;;) {
                uint64_t now = hsm_now_ns();
                if (now >= deadline_ns)
                        return -ETIMEDOUT;
                struct pollfd p = { .fd = fd, .events = events };
                int ms = (int)((deadline_ns - now + 999999) / 1000000);
                int r = poll(&p, 1, ms);
                if (r > 0)
                        return 0;
                if (r == 0)
                        return -ETIMEDOUT;
                if (errno != EINTR)
                        return -errno;
        }
}

static int connect_backend(struct conn *c)
{
        const hsm_addr *b = &c->l->conf->backend;
        int fd = socket(b->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        if (b->ss.ss_family != AF_UNIX) {
                int one = 1;
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        }
        int r = connect(fd, (const struct sockaddr *)&b->ss, b->len);
        if (r < 0 && errno != EINPROGRESS) {
                r = -errno;
                close(fd);
                return r;
        }
        if (r < 0) {
                r = wait_fd(fd, POLLOUT, hsm_now_ns() + (uint64_t)c->l->conf->connect_timeout_ms * 1000000u);
                int err = 0;
                socklen_t len = sizeof(err);
                if (r == 0 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err)
                        r = -err;
                if (r < 0) {
                        close(fd);
                        return r;
                }
        }
        c->bfd = fd;
        return 0;
}

static int run_handshake(hsm_server *s, struct conn *c, const char **why)
{
        struct listener *l = c->l;
        int r = gnutls_init(&c->tls, GNUTLS_SERVER | GNUTLS_NONBLOCK | GNUTLS_NO_SIGNAL);
        if (r < 0) {
                *why = gnutls_strerror(r);
                return r;
        }
        gnutls_priority_set(c->tls, l->prio);
        gnutls_credentials_set(c->tls, GNUTLS_CRD_CERTIFICATE, l->creds->cred);
        gnutls_certificate_server_set_request(c->tls, GNUTLS_CERT_IGNORE);
        gnutls_session_ticket_enable_server(c->tls, &s->ticket_key);
        gnutls_transport_set_ptr(c->tls, c);
        gnutls_transport_set_pull_function(c->tls, conn_pull);
        gnutls_transport_set_vec_push_function(c->tls, conn_vec_push);

        for (;;) {
                r = gnutls_handshake(c->tls);
                if (r == 0)
                        return 0;
                if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
                        short ev = gnutls_record_get_direction(c->tls) ? POLLOUT : POLLIN;
                        int w = wait_fd(c->cfd, ev, c->deadline_ns);
                        if (w == -ETIMEDOUT) {
                                *why = "handshake timed out";
                                return 1;
                        }
                        if (w < 0) {
                                *why = "socket error";
                                return 1;
                        }
                        continue;
                }
                if (!gnutls_error_is_fatal(r))
                        continue;
                *why = gnutls_strerror(r);
                return r;
        }
}

static void handshake_one(hsm_server *s, struct conn *c)
{
        const char *why = NULL;
        uint64_t t0 = hsm_now_ns();
        int r = run_handshake(s, c, &why);
        if (r != 0) {
                __atomic_add_fetch(&s->handshakes_failed, 1, __ATOMIC_RELAXED);
                /* One line, the same for every cause inside the TLS layer: a
                 * bad RSA ClientKeyExchange reads like any bad Finished. */
                hsm_info("listener %s: handshake with %s failed: %s", c->l->conf->name, c->peer, why ? why : "error");
                /* Tell the client why, with the alert GnuTLS picks for the
                 * error (best effort: the socket is non-blocking). */
                if (r < 0 && c->tls && r != GNUTLS_E_PREMATURE_TERMINATION)
                        gnutls_alert_send_appropriate(c->tls, r);
                hsm_conn_free(s, c);
                return;
        }
        __atomic_add_fetch(&s->handshakes_ok, 1, __ATOMIC_RELAXED);
        c->chain = hsm_creds_chain_of(c->l->creds, c->tls);

        r = connect_backend(c);
        if (r < 0) {
                hsm_warn("listener %s: cannot connect to backend %s for %s: %s", c->l->conf->name, c->l->conf->backend.text,
                         c->peer, strerror(-r));
                /* close_notify, then no more writes: the client sees a clean end. */
                gnutls_bye(c->tls, GNUTLS_SHUT_WR);
                shutdown(c->cfd, SHUT_WR);
                hsm_conn_free(s, c);
                return;
        }
        if (hsm_log_get_level() >= HSM_LOG_INFO) {
                char sni[256] = "";
                size_t sni_len = sizeof(sni);
                unsigned type;
                if (gnutls_server_name_get(c->tls, sni, &sni_len, &type, 0) < 0)
                        strcpy(sni, "-");
                char *desc = gnutls_session_get_desc(c->tls);
                hsm_info("listener %s: %s: %s sni=%s key=%s handshake=%.1fms (%.1fms after accept)", c->l->conf->name, c->peer,
                         desc ? desc : "?", sni,
                         gnutls_session_is_resumed(c->tls) ? "none(resumed)"
                         : c->chain >= 0                   ? c->l->creds->chains[c->chain].key_name
                                                           : "?",
                         (double)(hsm_now_ns() - t0) / 1e6, (double)(hsm_now_ns() - c->accepted_ns) / 1e6);
                gnutls_free(desc);
        }
        unsigned i = __atomic_fetch_add(&s->next_loop, 1, __ATOMIC_RELAXED) % s->n_loops;
        hsm_ioloop_adopt(&s->loops[i], c);
}

void *hsm_handshake_worker(void *arg)
{
        hsm_server *s = arg;
        for (;;) {
                pthread_mutex_lock(&s->hs_lock);
                while (!s->hs_head && !s->hs_stop)
                        pthread_cond_wait(&s->hs_cond, &s->hs_lock);
                if (!s->hs_head) {
                        pthread_mutex_unlock(&s->hs_lock);
                        break;
                }
                struct conn *c = s->hs_head;
                s->hs_head = c->next;
                if (!s->hs_head)
                        s->hs_tail = NULL;
                s->hs_queued--;
                s->hs_busy++;
                pthread_mutex_unlock(&s->hs_lock);

                if (hsm_now_ns() >= c->deadline_ns) {
                        __atomic_add_fetch(&s->handshakes_failed, 1, __ATOMIC_RELAXED);
                        hsm_info("listener %s: handshake with %s failed: waited too long for a handshake thread",
                                 c->l->conf->name, c->peer);
                        hsm_conn_free(s, c);
                } else
                        handshake_one(s, c);

                pthread_mutex_lock(&s->hs_lock);
                s->hs_busy--;
                if (!s->hs_head && !s->hs_busy)
                        pthread_cond_broadcast(&s->hs_idle);
                pthread_mutex_unlock(&s->hs_lock);
        }
        return NULL;
}
