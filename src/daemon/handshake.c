/* The handshake pool: threads that run TLS handshakes, each of which may
 * block on the token. Sized to the tokens' session pools, not to cores, so
 * that a slow token is kept busy; established connections never wait here. */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "internal.h"
#include "proxyproto.h"
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
        pthread_mutex_unlock(&s->hs_lock);
        uint64_t one = 1;
        if (write(s->hs_efd, &one, sizeof(one)) < 0)
                hsm_err("cannot wake a handshake thread: %s", strerror(errno));
}

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

/* Connects to the listener's backend or the connector's server; returns
 * the socket or a negative errno code. */
static int connect_to(struct conn *c, uint64_t deadline_ns)
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
                r = wait_fd(fd, POLLOUT, deadline_ns);
                int err = 0;
                socklen_t len = sizeof(err);
                if (r == 0 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err)
                        r = -err;
                if (r < 0) {
                        close(fd);
                        return r;
                }
        }
        return fd;
}

/* Client certificates (client_auth optional or require): none is fine here
 * (with require GnuTLS has refused that already); one that is there must
 * verify against client_ca and be meant for TLS clients (an extended key
 * usage without clientAuth is refused, as curl and browsers do for
 * servers). Also run for resumed sessions (resumed_check). */
static int verify_client(gnutls_session_t session)
{
        struct conn *c = gnutls_session_get_ptr(session);
        gnutls_typed_vdata_st purpose = { .type = GNUTLS_DT_KEY_PURPOSE_OID, .data = (unsigned char *)GNUTLS_KP_TLS_WWW_CLIENT };
        unsigned n = 0, status = 0;
        if (!gnutls_certificate_get_peers(session, &n) || n == 0) {
                c->verify_status = -1;
                return 0;
        }
        if (gnutls_certificate_verify_peers(session, &purpose, 1, &status) < 0)
                status = GNUTLS_CERT_INVALID;
        c->verify_status = (int)status;
        return status ? GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR : 0;
}

/* Hook after the client's Finished: a resumed session skips the client's
 * Certificate message and so verify_client. GnuTLS keeps the peer
 * certificates in the session state (TLS 1.2 tickets and TLS 1.3 PSK
 * alike; they are back in the session from this point on, not at the
 * ClientHello): check that certificate again, against this listener's
 * client_ca as it is now (one that expired or lost its CA since is refused,
 * before a new ticket is sent), and refuse require without one. Tickets are
 * per listener (server.c), so this is the second line, not the first. */
static int resumed_check(gnutls_session_t session, unsigned htype, unsigned when, unsigned incoming,
                         const gnutls_datum_t *msg)
{
        struct conn *c = gnutls_session_get_ptr(session);
        if (!incoming || !gnutls_session_is_resumed(session))
                return 0;
        /* Without client_ca (client_auth = none) a certificate cannot verify. */
        int r = verify_client(session);
        if (r < 0)
                return r;
        if (c->verify_status < 0 && c->l->conf->client_auth == HSM_CLIENT_AUTH_REQUIRE)
                return GNUTLS_E_NO_CERTIFICATE_FOUND;
        return 0;
}

/* Returns 0 when done, a GnuTLS error code, or 1 for a timeout or socket
 * error (no alert is sent then). */
static int run_handshake(hsm_server *s, struct conn *c, const char **why)
{
        struct listener *l = c->l;
        const hsm_conf_listener *lc = l->conf;
        bool client = lc->kind == HSM_CONNECTOR;
        int r = gnutls_init(&c->tls, (client ? GNUTLS_CLIENT : GNUTLS_SERVER) | GNUTLS_NONBLOCK | GNUTLS_NO_SIGNAL);
        if (r < 0) {
                *why = gnutls_strerror(r);
                return r;
        }
        gnutls_priority_set(c->tls, l->prio);
        gnutls_credentials_set(c->tls, GNUTLS_CRD_CERTIFICATE, l->creds->cred);
        if (client) {
                /* The server is verified (CA, name, and the serverAuth
                 * purpose when the certificate lists purposes) inside the
                 * handshake: a failure ends it; there is no unverified link.
                 * No session is saved or offered: every connection is a
                 * full handshake, so none is offered to another name. */
                gnutls_typed_vdata_st vd[2] = {
                        { .type = GNUTLS_DT_DNS_HOSTNAME, .data = (unsigned char *)lc->server_name },
                        { .type = GNUTLS_DT_KEY_PURPOSE_OID, .data = (unsigned char *)GNUTLS_KP_TLS_WWW_SERVER },
                };
                gnutls_server_name_set(c->tls, GNUTLS_NAME_DNS, lc->server_name, strlen(lc->server_name));
                gnutls_session_set_verify_cert2(c->tls, vd, 2, 0);
        } else {
                gnutls_certificate_server_set_request(c->tls, lc->client_auth == HSM_CLIENT_AUTH_REQUIRE    ? GNUTLS_CERT_REQUIRE
                                                              : lc->client_auth == HSM_CLIENT_AUTH_OPTIONAL ? GNUTLS_CERT_REQUEST
                                                                                                            : GNUTLS_CERT_IGNORE);
                if (lc->client_auth != HSM_CLIENT_AUTH_NONE)
                        gnutls_session_set_verify_function(c->tls, verify_client);
                /* This listener's own ticket key: a session resumes only
                 * where it was made; resumed_check re-verifies its client. */
                gnutls_session_ticket_enable_server(c->tls, &l->ticket_key);
                gnutls_handshake_set_hook_function(c->tls, GNUTLS_HANDSHAKE_FINISHED, GNUTLS_HOOK_POST, resumed_check);
        }
        gnutls_session_set_ptr(c->tls, c);
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

/* Why a peer certificate was refused, in words. */
static void verify_reason(struct conn *c, char *buf, size_t size)
{
        gnutls_datum_t out = { NULL, 0 };
        unsigned status = c->l->conf->kind == HSM_CONNECTOR ? gnutls_session_get_verify_cert_status(c->tls)
                                                             : (unsigned)(c->verify_status > 0 ? c->verify_status : 0);
        buf[0] = 0;
        if (status && gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) >= 0) {
                snprintf(buf, size, " (%s%s)", gnutls_session_is_resumed(c->tls) ? "resumed session, checked again: " : "",
                         (char *)out.data);
                gnutls_free(out.data);
        }
}

static void log_established(struct conn *c, uint64_t t0)
{
        const hsm_conf_listener *lc = c->l->conf;
        char sni[256] = "-", subject[512] = "", fp[65] = "", peer_id[700] = "";
        size_t sni_len = sizeof(sni);
        unsigned type;
        if (lc->kind == HSM_LISTENER && gnutls_server_name_get(c->tls, sni, &sni_len, &type, 0) < 0)
                strcpy(sni, "-");
        if (hsm_peer_identity(c->tls, subject, sizeof(subject), fp, sizeof(fp)) == 0)
                snprintf(peer_id, sizeof(peer_id), " %s=\"%s\" sha256=%s", lc->kind == HSM_CONNECTOR ? "server" : "client",
                         subject, fp);
        char *desc = gnutls_session_get_desc(c->tls);
        const char *key = gnutls_session_is_resumed(c->tls) ? "none(resumed)"
                          : c->chain >= 0                   ? c->l->creds->chains[c->chain].key_name
                                                            : "none";
        if (lc->kind == HSM_CONNECTOR)
                hsm_info("connector %s: %s -> %s: %s server_name=%s client_key=%s%s handshake=%.1fms", lc->name, c->peer,
                         lc->backend.text, desc ? desc : "?", lc->server_name, key, peer_id,
                         (double)(hsm_now_ns() - t0) / 1e6);
        else
                hsm_info("listener %s: %s: %s sni=%s key=%s%s handshake=%.1fms (%.1fms after accept)", lc->name, c->peer,
                         desc ? desc : "?", sni, key, peer_id, (double)(hsm_now_ns() - t0) / 1e6,
                         (double)(hsm_now_ns() - c->accepted_ns) / 1e6);
        gnutls_free(desc);
}

/* After a fatal alert or close_notify: shut our side and let an I/O loop
 * read what the client still sends until it closes (bounded), so that the
 * client reads the alert instead of a TCP reset. */
static void refuse(hsm_server *s, struct conn *c)
{
        gnutls_deinit(c->tls);
        c->tls = NULL;
        free(c->pre);
        c->pre = NULL;
        shutdown(c->cfd, SHUT_WR);
        c->lingering = 1;
        unsigned i = __atomic_fetch_add(&s->next_loop, 1, __ATOMIC_RELAXED) % s->n_loops;
        hsm_ioloop_adopt(&s->loops[i], c);
}

static void handshake_one(hsm_server *s, struct conn *c)
{
        const hsm_conf_listener *lc = c->l->conf;
        const char *why = NULL;
        uint64_t t0 = hsm_now_ns();
        int r;

        if (lc->kind == HSM_CONNECTOR) {
                uint64_t dl = t0 + (uint64_t)lc->connect_timeout_ms * 1000000u;
                r = connect_to(c, dl < c->deadline_ns ? dl : c->deadline_ns);
                if (r < 0) {
                        hsm_warn("connector %s: cannot connect to %s for %s: %s", lc->name, lc->backend.text, c->peer,
                                 strerror(-r));
                        __atomic_add_fetch(&s->handshakes_failed, 1, __ATOMIC_RELAXED);
                        hsm_conn_free(s, c);
                        return;
                }
                c->cfd = r;
        }

        r = run_handshake(s, c, &why);
        if (r != 0) {
                __atomic_add_fetch(&s->handshakes_failed, 1, __ATOMIC_RELAXED);
                char reason[256] = "";
                if (r == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR || r == GNUTLS_E_CERTIFICATE_ERROR)
                        verify_reason(c, reason, sizeof(reason));
                if (lc->kind == HSM_CONNECTOR)
                        hsm_warn("connector %s: TLS to %s (server name %s) failed for %s: %s%s; closing the local connection",
                                 lc->name, lc->backend.text, lc->server_name, c->peer, why ? why : "error", reason);
                else
                        /* One line, the same for every cause inside the TLS layer: a
                         * bad RSA ClientKeyExchange reads like any bad Finished. */
                        hsm_info("listener %s: handshake with %s failed: %s%s", lc->name, c->peer, why ? why : "error", reason);
                /* Tell the peer why, with the alert GnuTLS picks for the
                 * error (best effort: the socket is non-blocking). A missing
                 * client certificate: certificate_required in TLS 1.3,
                 * handshake_failure in TLS 1.2 (RFC 5246 7.4.6). */
                if (r == GNUTLS_E_NO_CERTIFICATE_FOUND)
                        gnutls_alert_send(c->tls, GNUTLS_AL_FATAL,
                                          gnutls_protocol_get_version(c->tls) == GNUTLS_TLS1_3 ? GNUTLS_A_CERTIFICATE_REQUIRED
                                                                                               : GNUTLS_A_HANDSHAKE_FAILURE);
                else if (r < 0 && c->tls && r != GNUTLS_E_PREMATURE_TERMINATION)
                        gnutls_alert_send_appropriate(c->tls, r);
                if (lc->kind == HSM_LISTENER && r < 0)
                        refuse(s, c);
                else
                        hsm_conn_free(s, c);
                return;
        }
        __atomic_add_fetch(&s->handshakes_ok, 1, __ATOMIC_RELAXED);
        c->chain = hsm_creds_chain_of(c->l->creds, c->tls);

        if (lc->kind == HSM_LISTENER) {
                r = connect_to(c, hsm_now_ns() + (uint64_t)lc->connect_timeout_ms * 1000000u);
                if (r < 0) {
                        hsm_warn("listener %s: cannot connect to backend %s for %s: %s", lc->name, lc->backend.text, c->peer,
                                 strerror(-r));
                        /* close_notify, then no more writes: the client sees a clean end. */
                        gnutls_bye(c->tls, GNUTLS_SHUT_WR);
                        refuse(s, c);
                        return;
                }
                c->bfd = r;
                if (lc->proxy_protocol) {
                        struct sockaddr_storage local;
                        socklen_t len = sizeof(local);
                        getsockname(c->cfd, (struct sockaddr *)&local, &len);
                        /* Queued as the first bytes for the backend. */
                        if (hsm_proxy_v2_build(c->tls, (struct sockaddr *)&c->peer_addr, (struct sockaddr *)&local, &c->c2b,
                                               &c->c2b_len) < 0) {
                                hsm_warn("listener %s: cannot build the PROXY v2 header for %s", lc->name, c->peer);
                                hsm_conn_free(s, c);
                                return;
                        }
                        c->c2b_off = 0;
                }
        }
        if (hsm_log_get_level() >= HSM_LOG_INFO)
                log_established(c, t0);
        unsigned i = __atomic_fetch_add(&s->next_loop, 1, __ATOMIC_RELAXED) % s->n_loops;
        hsm_ioloop_adopt(&s->loops[i], c);
}

static struct conn *queue_pop(hsm_server *s)
{
        uint64_t token;
        /* One eventfd count per queued connection (EFD_SEMAPHORE). */
        if (read(s->hs_efd, &token, sizeof(token)) != sizeof(token))
                return NULL;
        pthread_mutex_lock(&s->hs_lock);
        struct conn *c = s->hs_head;
        if (c) {
                s->hs_head = c->next;
                if (!s->hs_head)
                        s->hs_tail = NULL;
                s->hs_queued--;
                s->hs_busy++;
        }
        pthread_mutex_unlock(&s->hs_lock);
        return c;
}

static void run_one(hsm_server *s, struct conn *c)
{
        if (hsm_now_ns() >= c->deadline_ns) {
                __atomic_add_fetch(&s->handshakes_failed, 1, __ATOMIC_RELAXED);
                hsm_info("%s %s: handshake with %s failed: waited too long for a handshake thread", EP_KIND(c->l),
                         c->l->conf->name, c->peer);
                hsm_conn_free(s, c);
        } else
                handshake_one(s, c);
        pthread_mutex_lock(&s->hs_lock);
        s->hs_busy--;
        pthread_mutex_unlock(&s->hs_lock);
}

/* A listener's socket is readable: take one connection. With
 * TCP_DEFER_ACCEPT its ClientHello is usually in already, and this thread
 * does the handshake at once; otherwise the main loop waits for it. */
static void accept_one(hsm_server *s, struct listener *l)
{
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        int fd = accept4(l->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
                if (errno == EMFILE || errno == ENFILE)
                        hsm_out_of_fds(l);
                return;
        }
        struct conn *c = hsm_conn_accepted(l, fd, &ss, len);
        if (!c)
                return;
        int h = hsm_hello_read(c);
        if (h == 0)
                hsm_hello_wait(s, c);
        if (h != 1)
                return;
        pthread_mutex_lock(&s->hs_lock);
        s->hs_busy++;
        pthread_mutex_unlock(&s->hs_lock);
        run_one(s, c);
}

static int ep_add(int ep, int fd, uint32_t events, void *ptr)
{
        struct epoll_event ev = { .events = events, .data.ptr = ptr };
        return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

void *hsm_handshake_worker(void *arg)
{
        hsm_server *s = arg;
        /* Established connections come first: when the CPU is short, the
         * I/O threads win over handshakes (Linux: nice is per thread). */
        if (s->conf->handshake_nice > 0) {
                pid_t tid = (pid_t)syscall(SYS_gettid);
                errno = 0;
                int cur = getpriority(PRIO_PROCESS, (id_t)tid);
                if (errno == 0)
                        setpriority(PRIO_PROCESS, (id_t)tid, cur + s->conf->handshake_nice);
        }
        /* Tags for the non-listener entries of the epoll set. */
        static char tag_queue, tag_drain, tag_stop;
        int ep = epoll_create1(EPOLL_CLOEXEC);
        if (ep < 0 || ep_add(ep, s->hs_efd, EPOLLIN | EPOLLEXCLUSIVE, &tag_queue) < 0 ||
            ep_add(ep, s->drain_efd, EPOLLIN, &tag_drain) < 0 || ep_add(ep, s->stop_efd, EPOLLIN, &tag_stop) < 0) {
                hsm_err("handshake thread: epoll: %s", strerror(errno));
                __atomic_add_fetch(&s->accept_acks, 1, __ATOMIC_RELEASE);
                if (ep >= 0)
                        close(ep);
                return NULL;
        }
        for (unsigned i = 0; i < s->n_listeners; i++)
                if (s->listeners[i].conf->kind == HSM_LISTENER)
                        ep_add(ep, s->listeners[i].fd, EPOLLIN | EPOLLEXCLUSIVE, &s->listeners[i]);

        for (;;) {
                struct epoll_event evs[8];
                int n = epoll_wait(ep, evs, 8, -1);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        hsm_err("handshake thread: epoll_wait: %s", strerror(errno));
                        if (!__atomic_load_n(&s->accept_stopped, __ATOMIC_ACQUIRE))
                                __atomic_add_fetch(&s->accept_acks, 1, __ATOMIC_RELEASE);
                        break;
                }
                for (int i = 0; i < n; i++) {
                        void *p = evs[i].data.ptr;
                        if (p == &tag_queue) {
                                struct conn *c = queue_pop(s);
                                if (c)
                                        run_one(s, c);
                        } else if (p == &tag_drain) {
                                /* Stop accepting; the main loop closes the
                                 * sockets once every thread has done this. */
                                for (unsigned j = 0; j < s->n_listeners; j++)
                                        if (s->listeners[j].conf->kind == HSM_LISTENER)
                                                epoll_ctl(ep, EPOLL_CTL_DEL, s->listeners[j].fd, NULL);
                                epoll_ctl(ep, EPOLL_CTL_DEL, s->drain_efd, NULL);
                                __atomic_add_fetch(&s->accept_acks, 1, __ATOMIC_RELEASE);
                        } else if (p == &tag_stop) {
                                /* Finish what is queued, then end. */
                                struct conn *c;
                                while ((c = queue_pop(s)))
                                        run_one(s, c);
                                close(ep);
                                return NULL;
                        } else if (!__atomic_load_n(&s->accept_stopped, __ATOMIC_ACQUIRE))
                                accept_one(s, p);
                }
        }
        close(ep);
        return NULL;
}
