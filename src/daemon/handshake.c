/* The handshake pool: threads that run TLS handshakes, each of which may
 * block on the token. Sized to the tokens' session pools, not to cores, so
 * that a slow token is kept busy; established connections never wait here. */
#include <assert.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
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

static bool cpu_full_locked(const hsm_server *s);
static void deferred_push_locked(hsm_server *s, struct conn *c, int cont);

void hsm_handshake_enqueue(hsm_server *s, struct conn *c)
{
        /* Every CPU slot taken: c joins the work deferred for the next free
         * slot, which the thread that ends its step takes itself. Waking an
         * idle thread now would only have it find no slot and sleep again
         * (a wake-up and an eventfd read and write per step for nothing). */
        if (s->cpu_slots) {
                pthread_mutex_lock(&s->cpu_lock);
                if (cpu_full_locked(s)) {
                        pthread_mutex_lock(&s->hs_lock);
                        s->hs_busy++; /* as queue_pop() counts it */
                        pthread_mutex_unlock(&s->hs_lock);
                        deferred_push_locked(s, c, 1);
                        pthread_mutex_unlock(&s->cpu_lock);
                        return;
                }
                pthread_mutex_unlock(&s->cpu_lock);
        }
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

#define OUT_MAX (256 * 1024)

/* During a handshake step what GnuTLS sends is kept and sent when the step
 * ends: a flight goes out whole or not at all, so that a step the watchdog
 * fails (inside the token) has sent nothing the peer could have keyed on,
 * and the watchdog's plaintext alert is what the peer reads next. */
static ssize_t out_keep(struct conn *c, const giovec_t *iov, int iovcnt)
{
        size_t n = 0;
        for (int i = 0; i < iovcnt; i++)
                n += iov[i].iov_len;
        if (c->out_len + n > c->out_cap) {
                size_t cap = c->out_cap ? c->out_cap : 4096;
                while (cap < c->out_len + n)
                        cap *= 2;
                uint8_t *p = cap > OUT_MAX ? NULL : realloc(c->out, cap);
                if (!p) {
                        gnutls_transport_set_errno(c->tls, ENOMEM);
                        return -1;
                }
                c->out = p;
                c->out_cap = cap;
        }
        for (int i = 0; i < iovcnt; i++) {
                memcpy(c->out + c->out_len, iov[i].iov_base, iov[i].iov_len);
                c->out_len += iov[i].iov_len;
        }
        return (ssize_t)n;
}

/* Sends what a step kept: 0 all sent, 1 the socket is full, or -errno. */
static int out_flush(struct conn *c)
{
        while (c->out_off < c->out_len) {
                ssize_t w = send(c->cfd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (w < 0 && errno == EINTR)
                        continue;
                if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                        return 1;
                if (w < 0)
                        return -errno;
                c->out_off += (size_t)w;
        }
        free(c->out);
        c->out = NULL;
        c->out_len = c->out_off = c->out_cap = 0;
        return 0;
}

static ssize_t conn_vec_push(gnutls_transport_ptr_t ptr, const giovec_t *iov, int iovcnt)
{
        struct conn *c = ptr;
        if (c->buffering)
                return out_keep(c, iov, iovcnt);
        struct msghdr m = { .msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)iovcnt };
        ssize_t r = sendmsg(c->cfd, &m, MSG_NOSIGNAL);
        if (r < 0)
                gnutls_transport_set_errno(c->tls, errno);
        return r;
}

/* After the socket of a connect became writable: 0 or the error. */
static int connect_result(int fd)
{
        int err = 0;
        socklen_t len = sizeof(err);
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
                return -errno;
        return -err;
}

/* Starts a non-blocking connect to the listener's backend or the
 * connector's server: 0 connected, 1 in progress (*ret_fd is set either
 * way), or a negative errno code. */
static int connect_start(struct conn *c, int *ret_fd)
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
        *ret_fd = fd;
        if (r == 0)
                return 0;
        /* Loopback is often done at once: no park then. A second connect()
         * says so in one call: 0 connected, EALREADY still in progress, or
         * the error (refused, ...). */
        if (connect(fd, (const struct sockaddr *)&b->ss, b->len) == 0 || errno == EISCONN)
                return 0;
        return errno == EALREADY || errno == EINPROGRESS || errno == EINTR ? 1 : -errno;
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

/* The GnuTLS session of c, once per connection. */
static int tls_setup(hsm_server *s, struct conn *c)
{
        struct listener *l = c->l;
        const hsm_conf_listener *lc = l->conf;
        bool client = lc->kind == HSM_CONNECTOR;
        int r = gnutls_init(&c->tls, (client ? GNUTLS_CLIENT : GNUTLS_SERVER) | GNUTLS_NONBLOCK | GNUTLS_NO_SIGNAL);
        if (r < 0) {
                c->tls = NULL;
                return r;
        }
        gnutls_priority_set(c->tls, l->prio);
        /* This handshake's credentials, kept until after gnutls_deinit (a
         * swap meanwhile serves the next handshake). */
        if (!c->creds)
                c->creds = hsm_listener_creds(l);
        gnutls_credentials_set(c->tls, GNUTLS_CRD_CERTIFICATE, c->creds->cred);
        if (client) {
                /* The server is verified (CA, name, and the serverAuth
                 * purpose when the certificate lists purposes) inside the
                 * handshake: a failure ends it; there is no unverified link.
                 * No session is saved or offered: every connection is a
                 * full handshake, so none is offered to another name. */
                gnutls_server_name_set(c->tls, GNUTLS_NAME_DNS, lc->server_name, strlen(lc->server_name));
                gnutls_session_set_verify_cert2(c->tls, l->server_checks, 2, 0);
        } else {
                gnutls_certificate_server_set_request(c->tls, lc->client_auth == HSM_CLIENT_AUTH_REQUIRE    ? GNUTLS_CERT_REQUIRE
                                                              : lc->client_auth == HSM_CLIENT_AUTH_OPTIONAL ? GNUTLS_CERT_REQUEST
                                                                                                            : GNUTLS_CERT_IGNORE);
                if (lc->client_auth != HSM_CLIENT_AUTH_NONE)
                        gnutls_session_set_verify_function(c->tls, verify_client);
                /* This listener's own ticket key and session cache: a
                 * session resumes only where it was made; resumed_check
                 * re-verifies its client (either way of resuming). No 0-RTT
                 * (GNUTLS_ENABLE_EARLY_DATA is never set): replayable. */
                if (lc->session_tickets)
                        gnutls_session_ticket_enable_server(c->tls, &l->ticket_key);
                if (l->sesscache)
                        hsm_sesscache_attach(l->sesscache, c->tls);
                gnutls_db_set_cache_expiration(c->tls, (int)(lc->session_lifetime_ms / 1000));
                /* ALPN: ours in order of preference; a client that offers
                 * only others gets no_application_protocol (RFC 7301), one
                 * that offers none goes on without. */
                if (lc->n_alpn && (r = gnutls_alpn_set_protocols(c->tls, l->alpn, lc->n_alpn,
                                                                 GNUTLS_ALPN_SERVER_PRECEDENCE | GNUTLS_ALPN_MANDATORY)) < 0) {
                        gnutls_deinit(c->tls);
                        c->tls = NULL;
                        return r;
                }
                gnutls_handshake_set_hook_function(c->tls, GNUTLS_HANDSHAKE_FINISHED, GNUTLS_HOOK_POST, resumed_check);
        }
        gnutls_session_set_ptr(c->tls, c);
        gnutls_transport_set_ptr(c->tls, c);
        gnutls_transport_set_pull_function(c->tls, conn_pull);
        gnutls_transport_set_vec_push_function(c->tls, conn_vec_push);
        return 0;
}

enum { TLS_ABANDONED = 1 };

/* One step of the handshake: gnutls_handshake until it is done, fails or
 * would wait on the peer (GNUTLS_E_AGAIN). While it runs, the watchdog can
 * see c in the slot; TLS_ABANDONED when it failed c meanwhile (the thread
 * was inside a token call past the deadline). */
static int tls_step(struct hs_slot *slot, struct conn *c)
{
        __atomic_store_n(&slot->watch.deadline_ns, c->deadline_ns, __ATOMIC_RELAXED);
        pthread_mutex_lock(&slot->lock);
        slot->c = c;
        pthread_mutex_unlock(&slot->lock);
        int r;
        c->buffering = 1;
        slot->watch.shed = 0;
        for (;;) {
                r = gnutls_handshake(c->tls);
                if (r == GNUTLS_E_INTERRUPTED)
                        continue;
                /* Warning alerts and the like: go on, within the deadline. */
                if (r < 0 && r != GNUTLS_E_AGAIN && !gnutls_error_is_fatal(r) && hsm_now_ns() < c->deadline_ns)
                        continue;
                break;
        }
        c->buffering = 0;
        if (slot->watch.shed)
                c->shed = slot->watch.shed;
        slot->watch.shed = 0;
        pthread_mutex_lock(&slot->lock);
        slot->c = NULL;
        int abandoned = c->abandoned;
        pthread_mutex_unlock(&slot->lock);
        return abandoned ? TLS_ABANDONED : r;
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
        char alpn[300] = "";
        gnutls_datum_t proto = { NULL, 0 };
        if (gnutls_alpn_get_selected_protocol(c->tls, &proto) == 0 && proto.size)
                snprintf(alpn, sizeof(alpn), " alpn=%.*s", (int)proto.size, (const char *)proto.data);
        char *desc = gnutls_session_get_desc(c->tls);
        const char *key = gnutls_session_is_resumed(c->tls) ? "none(resumed)"
                          : c->chain >= 0                   ? c->creds->chains[c->chain].key_name
                                                            : "none";
        if (lc->kind == HSM_CONNECTOR)
                hsm_info("connector %s: %s -> %s: %s server_name=%s client_key=%s%s handshake=%.1fms", lc->name, c->peer,
                         lc->backend.text, desc ? desc : "?", lc->server_name, key, peer_id,
                         (double)(hsm_now_ns() - t0) / 1e6);
        else
                hsm_info("listener %s: %s: %s sni=%s%s key=%s%s handshake=%.1fms (%.1fms after accept)", lc->name, c->peer,
                         desc ? desc : "?", sni, alpn, key, peer_id, (double)(hsm_now_ns() - t0) / 1e6,
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
        hsm_creds_unref(c->creds);
        c->creds = NULL;
        free(c->pre);
        free(c->out);
        c->out = NULL;
        c->pre = NULL;
        shutdown(c->cfd, SHUT_WR);
        c->lingering = 1;
        unsigned i = __atomic_fetch_add(&s->next_loop, 1, __ATOMIC_RELAXED) % s->n_loops;
        hsm_ioloop_adopt(&s->loops[i], c);
}

static void adopt(hsm_server *s, struct conn *c)
{
        unsigned i = __atomic_fetch_add(&s->next_loop, 1, __ATOMIC_RELAXED) % s->n_loops;
        hsm_ioloop_adopt(&s->loops[i], c);
}

/* A failed handshake: one line. r < 0: a GnuTLS error (the peer gets the
 * matching alert and, on a listener, a lingering close); r > 0: a timeout
 * or a socket error (closed, no alert). */
static void handshake_failed(hsm_server *s, struct conn *c, int r, const char *why)
{
        const hsm_conf_listener *lc = c->l->conf;
        __atomic_add_fetch(&s->handshakes_failed, 1, __ATOMIC_RELAXED);
        hsm_hs_count(c, HSM_HS_FAILED);
        char reason[256] = "";
        if (r == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR || r == GNUTLS_E_CERTIFICATE_ERROR)
                verify_reason(c, reason, sizeof(reason));
        if (lc->kind == HSM_CONNECTOR)
                hsm_warn("connector %s: TLS to %s (server name %s) failed for %s: %s%s; closing the local connection", lc->name,
                         lc->backend.text, lc->server_name, c->peer, why ? why : "error", reason);
        else
                /* One line, the same for every cause inside the TLS layer: a
                 * bad RSA ClientKeyExchange reads like any bad Finished. */
                hsm_info("listener %s: handshake with %s failed: %s%s", lc->name, c->peer, why ? why : "error", reason);
        /* Output of the step that the socket did not take: the alert would
         * land in the middle of a record. */
        if (r > 0 || !c->tls || c->out) {
                hsm_conn_free(s, c);
                return;
        }
        /* Tell the peer why, with the alert GnuTLS picks for the error
         * (best effort: the socket is non-blocking). A missing client
         * certificate: certificate_required in TLS 1.3, handshake_failure
         * in TLS 1.2 (RFC 5246 7.4.6). */
        if (r == GNUTLS_E_NO_CERTIFICATE_FOUND)
                gnutls_alert_send(c->tls, GNUTLS_AL_FATAL,
                                  gnutls_protocol_get_version(c->tls) == GNUTLS_TLS1_3 ? GNUTLS_A_CERTIFICATE_REQUIRED
                                                                                       : GNUTLS_A_HANDSHAKE_FAILURE);
        else if (r != GNUTLS_E_PREMATURE_TERMINATION)
                gnutls_alert_send_appropriate(c->tls, r);
        if (lc->kind == HSM_LISTENER)
                refuse(s, c);
        else
                hsm_conn_free(s, c);
}

static void connect_failed(hsm_server *s, struct conn *c, int err)
{
        const hsm_conf_listener *lc = c->l->conf;
        if (lc->kind == HSM_CONNECTOR) {
                hsm_warn("connector %s: cannot connect to %s for %s: %s", lc->name, lc->backend.text, c->peer, strerror(-err));
                __atomic_add_fetch(&s->handshakes_failed, 1, __ATOMIC_RELAXED);
                hsm_hs_count(c, HSM_HS_NOTLS);
                hsm_conn_free(s, c);
                return;
        }
        hsm_warn("listener %s: cannot connect to backend %s for %s: %s", lc->name, lc->backend.text, c->peer, strerror(-err));
        /* close_notify, then no more writes: the client sees a clean end. */
        gnutls_bye(c->tls, GNUTLS_SHUT_WR);
        refuse(s, c);
}

/* The handshake and the backend connect are done: to an I/O loop. */
static void established(hsm_server *s, struct conn *c)
{
        const hsm_conf_listener *lc = c->l->conf;
        if (lc->kind == HSM_LISTENER && lc->proxy_protocol) {
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
        if (hsm_log_get_level() >= HSM_LOG_INFO)
                log_established(c, c->tls_start_ns);
        adopt(s, c);
}

/* A thread that comes back from a token call whose handshake the watchdog
 * has failed: the connection is only freed now. */
static void abandoned_return(hsm_server *s, struct hs_slot *slot, struct conn *c)
{
        struct token_overrun *o = c->overrun;
        if (o && __atomic_sub_fetch(&o->stuck, 1, __ATOMIC_ACQ_REL) == 0)
                hsm_notice("token %s: the call that overran the handshake deadline returned; answering again",
                           hsm_token_name(o->token));
        __atomic_sub_fetch(&s->stuck, 1, __ATOMIC_RELAXED);
        hsm_conn_free(s, c);
}

/* Runs c from where it is until it is done, fails, or would wait on its
 * peer (then it is parked and this thread is free). */
static void advance(struct hs_slot *slot, struct conn *c)
{
        hsm_server *s = slot->srv;
        const hsm_conf_listener *lc = c->l->conf;
        int r;

        assert(c->phase != PH_HELLO); /* read on the main loop, never queued */
        switch (c->phase) {
        case PH_HELLO:
        case PH_CONNECT:
                if (c->cfd < 0) {
                        uint64_t dl = hsm_now_ns() + (uint64_t)lc->connect_timeout_ms * 1000000u;
                        if (dl > c->deadline_ns)
                                dl = c->deadline_ns;
                        r = connect_start(c, &c->cfd);
                        if (r == 1) {
                                hsm_handshake_park(s, c, c->cfd, EV_WRITE, dl);
                                return;
                        }
                } else
                        r = connect_result(c->cfd);
                if (r < 0) {
                        connect_failed(s, c, r);
                        return;
                }
                c->phase = PH_TLS;
                /* fall through */
        case PH_TLS:
                if (!c->tls) {
                        c->tls_start_ns = hsm_now_ns();
                        r = tls_setup(s, c);
                        if (r < 0) {
                                handshake_failed(s, c, 1, gnutls_strerror(r));
                                return;
                        }
                }
                if (c->out && (r = out_flush(c)) != 0) {
                        if (r < 0)
                                handshake_failed(s, c, 1, strerror(-r));
                        else
                                hsm_handshake_park(s, c, c->cfd, EV_WRITE, c->deadline_ns);
                        return;
                }
                if (c->tls_done)
                        goto tls_done;
                r = tls_step(slot, c);
                if (r == TLS_ABANDONED) {
                        abandoned_return(s, slot, c);
                        return;
                }
                int f = out_flush(c);
                if (r < 0 && r != GNUTLS_E_AGAIN) {
                        /* Past the deadline, the cause is the wait for the
                         * token (its pool) or the peer's slowness. */
                        char why[160];
                        int shed_r = c->shed;
                        if (shed_r) {
                                /* The token layer refused the operation to
                                 * shed load (before the token saw anything
                                 * of this handshake): counted, and an
                                 * internal_error alert (what a failed
                                 * signature gets), also for an RSA key
                                 * exchange that GnuTLS would carry on to a
                                 * failed Finished. */
                                __atomic_add_fetch(&s->handshakes_shed, 1, __ATOMIC_RELAXED);
                                snprintf(why, sizeof(why), "%s (shed)",
                                         shed_r == -ETIMEDOUT
                                                 ? "timed out waiting for the token: no turn before the handshake deadline"
                                                 : "the token is overloaded: its queue is full, or the key is over its rate");
                                r = GNUTLS_E_PK_SIGN_FAILED;
                        } else if (hsm_now_ns() >= c->deadline_ns)
                                snprintf(why, sizeof(why), "timed out waiting for the token (%s)", gnutls_strerror(r));
                        else
                                snprintf(why, sizeof(why), "%s", gnutls_strerror(r));
                        handshake_failed(s, c, r, why);
                        return;
                }
                if (f < 0) {
                        handshake_failed(s, c, 1, strerror(-f));
                        return;
                }
                if (r == GNUTLS_E_AGAIN) {
                        if (hsm_now_ns() >= c->deadline_ns) {
                                handshake_failed(s, c, 1, "handshake timed out");
                                return;
                        }
                        hsm_handshake_park(s, c, c->cfd,
                                           f == 1 || gnutls_record_get_direction(c->tls) ? EV_WRITE : EV_READ,
                                           c->deadline_ns);
                        return;
                }
                __atomic_add_fetch(&s->handshakes_ok, 1, __ATOMIC_RELAXED);
                c->chain = hsm_creds_chain_of(c->creds, c->tls);
                c->tls_done = 1;
                hsm_hs_count(c, HSM_HS_OK);
                if (f == 1) {
                        /* The last flight is still going out. */
                        hsm_handshake_park(s, c, c->cfd, EV_WRITE, c->deadline_ns);
                        return;
                }
        tls_done:
                if (lc->kind == HSM_CONNECTOR) {
                        established(s, c);
                        return;
                }
                c->phase = PH_BACKEND;
                r = connect_start(c, &c->bfd);
                if (r == 1) {
                        hsm_handshake_park(s, c, c->bfd, EV_WRITE, hsm_now_ns() + (uint64_t)lc->connect_timeout_ms * 1000000u);
                        return;
                }
                if (r < 0) {
                        connect_failed(s, c, r);
                        return;
                }
                established(s, c);
                return;
        case PH_BACKEND:
                r = connect_result(c->bfd);
                if (r < 0) {
                        connect_failed(s, c, r);
                        return;
                }
                established(s, c);
                return;
        }
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

/* ------------------------------------------------------------ CPU gate
 *
 * At most cpu_slots handshake steps run on the CPU at once (one per core by
 * default), so that handshakes never queue the I/O loops behind a crowd of
 * runnable threads, and the CPU goes to the oldest handshake first: waiting
 * threads are served in the order their connections were accepted (no
 * thread lottery). A thread lends its slot while it waits without using the
 * CPU (its turn at a token, an operation on a token that mostly waits: the
 * token layer's off_cpu hook), and the watchdog takes back a slot from a
 * thread that stays inside a token call, so a token that hangs holds no
 * slot for long. */

/* Work that found every CPU slot taken waits here (under cpu_lock), for
 * the next thread that ends a step: handshakes going on (a parked one
 * whose socket is ready) before new ones, each in arrival order (accept
 * time: the oldest handshake first, whichever thread accepted it or made
 * it ready). A thread that ends a step takes the next one itself, without
 * a hand-over to another thread. Doubly linked (next, prev: a deferred
 * connection is neither parked nor on an I/O loop); usually the newest
 * arrives last, so the place is looked for from the tail. */
static void deferred_push_locked(hsm_server *s, struct conn *c, int cont)
{
        struct conn **head = cont ? &s->def_cont_head : &s->def_new_head;
        struct conn **tail = cont ? &s->def_cont_tail : &s->def_new_tail;
        struct conn *after = *tail;
        while (after && after->accepted_ns > c->accepted_ns)
                after = after->prev;
        c->prev = after;
        c->next = after ? after->next : *head;
        if (c->next)
                c->next->prev = c;
        else
                *tail = c;
        if (after)
                after->next = c;
        else
                *head = c;
        s->n_deferred++;
}

static struct conn *deferred_pop_locked(hsm_server *s)
{
        struct conn **head = s->def_cont_head ? &s->def_cont_head : &s->def_new_head;
        struct conn **tail = s->def_cont_head ? &s->def_cont_tail : &s->def_new_tail;
        struct conn *c = *head;
        if (c) {
                *head = c->next;
                if (*head)
                        (*head)->prev = NULL;
                else
                        *tail = NULL;
                c->next = c->prev = NULL;
                s->n_deferred--;
        }
        return c;
}

/* Under cpu_lock: no slot for new work (all taken, or a thread that gave
 * its slot away waits to get one back first). */
static bool cpu_full_locked(const hsm_server *s)
{
        return s->cpu_head || s->cpu_busy >= s->cpu_slots;
}

/* Under cpu_lock: slots to the queue's head, in order; a slot still free
 * while work is deferred wakes an idle thread for it. */
static void cpu_grant_locked(hsm_server *s)
{
        while (s->cpu_head && s->cpu_busy < s->cpu_slots) {
                struct hs_slot *w = s->cpu_head;
                s->cpu_head = w->gate_next;
                s->cpu_busy++;
                w->on_cpu = 1;
                w->gate_granted = 1;
                w->gate_since_ns = hsm_now_ns();
                pthread_cond_signal(&w->gate_cond);
        }
        if (!cpu_full_locked(s) && s->n_deferred) {
                uint64_t n = s->cpu_slots - s->cpu_busy;
                if (n > s->n_deferred)
                        n = s->n_deferred;
                if (write(s->hs_efd, &n, sizeof(n)) < 0)
                        hsm_err("cannot wake a handshake thread: %s", strerror(errno));
        }
}

/* Under cpu_lock: takes a free slot (nobody waiting for one) and the
 * oldest deferred work: the work, or NULL (nothing deferred, or no slot). */
static struct conn *cpu_take_deferred_locked(struct hs_slot *slot)
{
        hsm_server *s = slot->srv;
        struct conn *c = NULL;
        if (!cpu_full_locked(s) && (c = deferred_pop_locked(s))) {
                s->cpu_busy++;
                slot->on_cpu = 1;
                slot->gate_since_ns = hsm_now_ns();
        }
        return c;
}

static struct conn *cpu_take_deferred(struct hs_slot *slot)
{
        pthread_mutex_lock(&slot->srv->cpu_lock);
        struct conn *c = cpu_take_deferred_locked(slot);
        pthread_mutex_unlock(&slot->srv->cpu_lock);
        return c;
}

/* c is ready to run: it joins the deferred work, and if a slot is free
 * this thread takes it with the oldest deferred work (returned). */
static struct conn *cpu_defer_and_take(struct hs_slot *slot, struct conn *c, int cont)
{
        hsm_server *s = slot->srv;
        pthread_mutex_lock(&s->cpu_lock);
        deferred_push_locked(s, c, cont);
        c = cpu_take_deferred_locked(slot);
        pthread_mutex_unlock(&s->cpu_lock);
        return c;
}

/* After a step, holding a slot: a thread waiting to go on gets the slot;
 * else the next deferred work (returned, the slot kept); else the slot
 * is freed. A slot the watchdog took back is not ours to give. */
static struct conn *cpu_leave_or_next(struct hs_slot *slot)
{
        hsm_server *s = slot->srv;
        struct conn *c = NULL;
        pthread_mutex_lock(&s->cpu_lock);
        if (!slot->on_cpu) {
                pthread_mutex_unlock(&s->cpu_lock);
                return cpu_take_deferred(slot);
        }
        if (!s->cpu_head && (c = deferred_pop_locked(s))) {
                slot->gate_since_ns = hsm_now_ns();
        } else {
                slot->on_cpu = 0;
                s->cpu_busy--;
                cpu_grant_locked(s);
        }
        pthread_mutex_unlock(&s->cpu_lock);
        return c;
}

static void cpu_enter(struct hs_slot *slot, uint64_t key)
{
        hsm_server *s = slot->srv;
        if (!s->cpu_slots)
                return;
        pthread_mutex_lock(&s->cpu_lock);
        if (!cpu_full_locked(s)) {
                s->cpu_busy++;
                slot->on_cpu = 1;
                slot->gate_since_ns = hsm_now_ns();
                pthread_mutex_unlock(&s->cpu_lock);
                return;
        }
        /* In accept order: an older handshake goes first. */
        slot->gate_key = key;
        slot->gate_granted = 0;
        struct hs_slot **pp = &s->cpu_head;
        while (*pp && (*pp)->gate_key <= key)
                pp = &(*pp)->gate_next;
        slot->gate_next = *pp;
        *pp = slot;
        while (!slot->gate_granted)
                pthread_cond_wait(&slot->gate_cond, &s->cpu_lock);
        pthread_mutex_unlock(&s->cpu_lock);
}

static void cpu_leave(struct hs_slot *slot)
{
        hsm_server *s = slot->srv;
        if (!s->cpu_slots)
                return;
        pthread_mutex_lock(&s->cpu_lock);
        /* A slot the watchdog took back is not ours to give. */
        if (slot->on_cpu) {
                slot->on_cpu = 0;
                s->cpu_busy--;
                cpu_grant_locked(s);
        }
        pthread_mutex_unlock(&s->cpu_lock);
}

/* The token layer's hook: the thread waits without using the CPU. */
static void slot_off_cpu(hsm_token_watch *w, int begin)
{
        struct hs_slot *slot = (struct hs_slot *)((char *)w - offsetof(struct hs_slot, watch));
        if (begin)
                cpu_leave(slot);
        else
                cpu_enter(slot, slot->gate_key_self);
}

/* Watchdog: a thread inside a token call for longer than this keeps no
 * CPU slot (a token that hangs, or one that became slow while it was
 * taken for CPU). */
#define CPU_HOLD_IN_TOKEN_NS 50000000ull

static void cpu_revoke_stuck(hsm_server *s, uint64_t now)
{
        if (!s->cpu_slots)
                return;
        for (unsigned i = 0; i < s->n_hs_threads; i++) {
                struct hs_slot *slot = &s->hs_slots[i];
                if (!__atomic_load_n(&slot->watch.token, __ATOMIC_ACQUIRE))
                        continue;
                uint64_t since = __atomic_load_n(&slot->watch.since_ns, __ATOMIC_RELAXED);
                if (now < since + CPU_HOLD_IN_TOKEN_NS)
                        continue;
                pthread_mutex_lock(&s->cpu_lock);
                if (slot->on_cpu && now >= slot->gate_since_ns + CPU_HOLD_IN_TOKEN_NS) {
                        slot->on_cpu = 0;
                        s->cpu_busy--;
                        s->cpu_revoked++;
                        cpu_grant_locked(s);
                }
                pthread_mutex_unlock(&s->cpu_lock);
        }
}

void hsm_handshake_sched_init(hsm_server *s, unsigned cpu_slots)
{
        pthread_mutex_init(&s->cpu_lock, NULL);
        s->cpu_slots = cpu_slots;
        for (unsigned i = 0; i < s->n_hs_threads; i++) {
                struct hs_slot *slot = &s->hs_slots[i];
                pthread_cond_init(&slot->gate_cond, NULL);
                slot->watch.off_cpu = slot_off_cpu;
        }
}

/* A handshake failed at once to shed load: an alert (internal_error) the
 * client reads before the close, counted. */
static void send_raw_alert(int fd);

static void shed(hsm_server *s, struct conn *c, const char *why)
{
        __atomic_add_fetch(&s->handshakes_failed, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&s->handshakes_shed, 1, __ATOMIC_RELAXED);
        hsm_hs_count(c, HSM_HS_NOTLS);
        hsm_info("%s %s: handshake with %s failed: %s (shed)", EP_KIND(c->l), c->l->conf->name, c->peer, why);
        if (c->tls)
                gnutls_alert_send(c->tls, GNUTLS_AL_FATAL, GNUTLS_A_INTERNAL_ERROR);
        else
                send_raw_alert(c->cfd);
        if (c->l->conf->kind == HSM_LISTENER && !c->out)
                refuse(s, c);
        else
                hsm_conn_free(s, c);
}

static void run_one(struct hs_slot *slot, struct conn *c)
{
        hsm_server *s = slot->srv;
        slot->gate_key_self = c->accepted_ns;
        if (__atomic_load_n(&s->stop_now, __ATOMIC_ACQUIRE))
                /* A second signal: what is queued is dropped. */
                hsm_conn_free(s, c);
        else if (c->phase != PH_BACKEND && hsm_now_ns() >= c->deadline_ns)
                shed(s, c, "waited too long for a handshake thread");
        else
                advance(slot, c);
        pthread_mutex_lock(&s->hs_lock);
        s->hs_busy--;
        pthread_mutex_unlock(&s->hs_lock);
}

/* Runs c, then deferred work, while this thread holds a CPU slot. */
static void run_held(struct hs_slot *slot, struct conn *c)
{
        while (c) {
                run_one(slot, c);
                c = cpu_leave_or_next(slot);
        }
}

/* c is ready for a handshake thread (counted in hs_busy): run now if a
 * CPU slot is free, else it waits, deferred, for the next free slot.
 * cont: a handshake going on (before new ones). */
static void dispatch(struct hs_slot *slot, struct conn *c, int cont)
{
        if (!slot->srv->cpu_slots) {
                run_one(slot, c);
                return;
        }
        run_held(slot, cpu_defer_and_take(slot, c, cont));
}

/* A listener's socket is readable: take one connection. With
 * TCP_DEFER_ACCEPT its ClientHello is usually in already, and this thread
 * does the handshake at once; otherwise it waits on the main loop. */
static void accept_one(struct hs_slot *slot, struct listener *l)
{
        hsm_server *s = slot->srv;
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
        c->phase = PH_HELLO;
        int h = hsm_hello_read(c);
        if (h == 0)
                hsm_handshake_park(s, c, c->cfd, EV_READ, c->deadline_ns);
        if (h != 1)
                return;
        c->phase = PH_TLS;
        pthread_mutex_lock(&s->hs_lock);
        s->hs_busy++;
        pthread_mutex_unlock(&s->hs_lock);
        dispatch(slot, c, 0);
}

/* ------------------------------------------------------------ parking */

static bool waits_on_client(const struct conn *c)
{
        return c->phase == PH_HELLO || c->phase == PH_TLS;
}

static void parked_unlink(hsm_server *s, struct conn *c)
{
        if (c->prev)
                c->prev->next = c->next;
        else
                s->parked_head = c->next;
        if (c->next)
                c->next->prev = c->prev;
        else
                s->parked_tail = c->prev;
        c->next = c->prev = NULL;
        __atomic_sub_fetch(waits_on_client(c) ? &s->n_waiting : &s->n_connecting, 1, __ATOMIC_RELAXED);
        if (c->ev_park) {
                event_free(c->ev_park);
                c->ev_park = NULL;
        }
}

/* A parked handshake's time is up (main loop). */
static void park_timeout(hsm_server *s, struct conn *c)
{
        switch (c->phase) {
        case PH_HELLO:
                hsm_info("listener %s: %s: no ClientHello within the handshake timeout", c->l->conf->name, c->peer);
                hsm_conn_free(s, c);
                return;
        case PH_TLS:
                handshake_failed(s, c, 1, "handshake timed out");
                return;
        case PH_CONNECT:
        case PH_BACKEND:
                connect_failed(s, c, -ETIMEDOUT);
                return;
        }
}

/* What is left of a parked handshake's wait. */
static struct timeval park_left(const struct conn *c)
{
        uint64_t now = hsm_now_ns();
        uint64_t left = c->park_until_ns > now ? c->park_until_ns - now : 0;
        return (struct timeval){ (time_t)(left / 1000000000u), (suseconds_t)(left % 1000000000u / 1000u) };
}

/* TLS 1.3 middlebox compatibility (RFC 8446, D.4): many clients (GnuTLS's
 * among them) send a change_cipher_spec record before their second flight,
 * often in a segment of its own, and a server must drop it unread. Dropping
 * it here, while the handshake waits on the main loop for that flight,
 * saves a round through a handshake thread that would only read it and park
 * again (two wake-ups and about eight system calls). Only a whole CCS record
 * alone in the socket, and only once the handshake is TLS 1.3 (in TLS 1.2
 * the CCS is part of the protocol). */
static bool drop_lone_ccs(struct conn *c)
{
        static const uint8_t ccs[6] = { 20, 3, 3, 0, 1, 1 };
        uint8_t b[7];
        if (!c->tls || c->cfd != c->park_fd || gnutls_protocol_get_version(c->tls) != GNUTLS_TLS1_3)
                return false;
        ssize_t n = recv(c->cfd, b, sizeof(b), MSG_PEEK | MSG_DONTWAIT);
        if (n != (ssize_t)sizeof(ccs) || memcmp(b, ccs, sizeof(ccs)) != 0)
                return false;
        return recv(c->cfd, b, sizeof(ccs), MSG_DONTWAIT) == (ssize_t)sizeof(ccs);
}

static void on_parked(evutil_socket_t fd, short what, void *arg)
{
        struct conn *c = arg;
        hsm_server *s = c->l->srv;
        if (!(what & EV_TIMEOUT) && c->phase == PH_TLS && c->park_what == EV_READ && drop_lone_ccs(c)) {
                /* Still parked: the same event, for the rest of its wait. */
                struct timeval tv = park_left(c);
                if (event_add(c->ev_park, &tv) == 0)
                        return;
        }
        parked_unlink(s, c);
        if (what & EV_TIMEOUT) {
                park_timeout(s, c);
                return;
        }
        if (c->phase != PH_HELLO) {
                hsm_handshake_enqueue(s, c);
                return;
        }
        int h = hsm_hello_read(c);
        if (h == 1) {
                c->phase = PH_TLS;
                hsm_handshake_enqueue(s, c);
        } else if (h == 0)
                hsm_handshake_park(s, c, c->cfd, EV_READ, c->deadline_ns);
}

/* Main loop: c joins the parked list. Handshakes waiting on their client
 * are bounded: beyond the limit the one parked longest is closed. */
static void park_add(hsm_server *s, struct conn *c)
{
        if (waits_on_client(c) && __atomic_load_n(&s->n_waiting, __ATOMIC_RELAXED) >= s->waiting_limit) {
                struct conn *old = s->parked_head;
                while (old && !waits_on_client(old))
                        old = old->next;
                static uint64_t last_warn;
                if (hsm_once_a_second(&last_warn))
                        hsm_warn("handshakes waiting on their peers: limit of %u reached (max_waiting_handshakes); closing the ones waiting longest",
                                 s->waiting_limit);
                __atomic_add_fetch(&s->waiting_closed, 1, __ATOMIC_RELAXED);
                if (old) {
                        parked_unlink(s, old);
                        hsm_debug("%s %s: %s: closed, too many handshakes waiting", EP_KIND(old->l), old->l->conf->name,
                                  old->peer);
                        if (old->phase == PH_TLS) {
                                __atomic_add_fetch(&s->handshakes_failed, 1, __ATOMIC_RELAXED);
                                hsm_hs_count(old, HSM_HS_NOTLS);
                        }
                        hsm_conn_free(s, old);
                } else {
                        if (c->phase == PH_TLS) {
                                __atomic_add_fetch(&s->handshakes_failed, 1, __ATOMIC_RELAXED);
                                hsm_hs_count(c, HSM_HS_NOTLS);
                        }
                        hsm_conn_free(s, c);
                        return;
                }
        }
        struct timeval tv = park_left(c);
        c->ev_park = event_new(s->base, c->park_fd, c->park_what, on_parked, c);
        if (!c->ev_park || event_add(c->ev_park, &tv) < 0) {
                hsm_warn("%s %s: %s: cannot wait for the socket: out of memory", EP_KIND(c->l), c->l->conf->name, c->peer);
                if (c->ev_park)
                        event_free(c->ev_park);
                c->ev_park = NULL;
                hsm_conn_free(s, c);
                return;
        }
        c->next = NULL;
        c->prev = s->parked_tail;
        if (s->parked_tail)
                s->parked_tail->next = c;
        else
                s->parked_head = c;
        s->parked_tail = c;
        __atomic_add_fetch(waits_on_client(c) ? &s->n_waiting : &s->n_connecting, 1, __ATOMIC_RELAXED);
}

void hsm_handshake_park(hsm_server *s, struct conn *c, int fd, short what, uint64_t until_ns)
{
        if (c->phase == PH_TLS && what == EV_READ)
                __atomic_add_fetch(&s->client_waits, 1, __ATOMIC_RELAXED);
        c->park_fd = fd;
        c->park_what = what;
        c->park_until_ns = until_ns;
        c->next = NULL;
        pthread_mutex_lock(&s->park_lock);
        if (s->stopping) {
                pthread_mutex_unlock(&s->park_lock);
                hsm_conn_free(s, c);
                return;
        }
        bool first = !s->park_inbox;
        if (s->park_inbox_tail)
                s->park_inbox_tail->next = c;
        else
                s->park_inbox = c;
        s->park_inbox_tail = c;
        pthread_mutex_unlock(&s->park_lock);
        /* The main loop takes the whole inbox at each wake: only the first
         * connection into an empty inbox wakes it. An eventfd of our own,
         * not event_active(): that takes the main loop's libevent lock,
         * which the loop holds whenever it is awake (a futex round per
         * park under load). */
        uint64_t one = 1;
        if (first && write(s->park_efd, &one, sizeof(one)) < 0)
                hsm_err("cannot wake the main loop: %s", strerror(errno));
}

void hsm_handshake_on_park_wake(evutil_socket_t fd, short what, void *arg)
{
        hsm_server *s = arg;
        uint64_t n; /* before the inbox is taken: a later push writes again */
        if (read(s->park_efd, &n, sizeof(n)) < 0 && errno != EAGAIN)
                hsm_err("main loop: cannot read its wake-up: %s", strerror(errno));
        pthread_mutex_lock(&s->park_lock);
        struct conn *list = s->park_inbox;
        s->park_inbox = s->park_inbox_tail = NULL;
        pthread_mutex_unlock(&s->park_lock);
        while (list) {
                struct conn *c = list;
                list = c->next;
                park_add(s, c);
        }
}

void hsm_handshake_unpark_all(hsm_server *s)
{
        pthread_mutex_lock(&s->park_lock);
        s->stopping = 1;
        struct conn *list = s->park_inbox;
        s->park_inbox = s->park_inbox_tail = NULL;
        pthread_mutex_unlock(&s->park_lock);
        while (list) {
                struct conn *c = list;
                list = c->next;
                hsm_conn_free(s, c);
        }
        while (s->parked_head) {
                struct conn *c = s->parked_head;
                parked_unlink(s, c);
                hsm_conn_free(s, c);
        }
}

/* ----------------------------------------------------------- watchdog */

static struct token_overrun *overrun_of(hsm_server *s, hsm_token *t)
{
        for (unsigned i = 0; i < s->n_overruns; i++)
                if (s->overruns[i].token == t)
                        return &s->overruns[i];
        struct token_overrun *o = realloc(s->overruns, (s->n_overruns + 1) * sizeof(*o));
        if (!o)
                return NULL;
        s->overruns = o;
        o = &s->overruns[s->n_overruns++];
        o->token = t;
        o->stuck = 0;
        return o;
}

/* A fatal internal_error alert, written on the socket directly: the
 * session belongs to the thread that is inside the token. */
static void send_raw_alert(int fd)
{
        static const uint8_t alert[7] = { 21, 3, 3, 0, 2, 2, 80 };
        if (send(fd, alert, sizeof(alert), MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
                hsm_debug("cannot send the alert: %s", strerror(errno));
}

void hsm_handshake_watchdog(hsm_server *s)
{
        uint64_t now = hsm_now_ns();
        cpu_revoke_stuck(s, now);
        for (unsigned i = 0; i < s->n_hs_threads; i++) {
                struct hs_slot *slot = &s->hs_slots[i];
                char peer[96], name[64];
                const char *kind = "";
                hsm_token *t = NULL;
                uint64_t since = 0;
                struct conn *c;

                pthread_mutex_lock(&slot->lock);
                c = slot->c;
                if (c && !c->abandoned && now >= c->deadline_ns &&
                    (t = __atomic_load_n(&slot->watch.token, __ATOMIC_ACQUIRE))) {
                        since = __atomic_load_n(&slot->watch.since_ns, __ATOMIC_RELAXED);
                        c->abandoned = 1;
                        c->overrun = overrun_of(s, t);
                        /* The peer learns now, not when the token answers.
                         * The descriptor stays open (the thread still uses
                         * it) until the call returns. */
                        send_raw_alert(c->cfd);
                        shutdown(c->cfd, SHUT_RDWR);
                        snprintf(peer, sizeof(peer), "%s", c->peer);
                        snprintf(name, sizeof(name), "%s", c->l->conf->name);
                        kind = EP_KIND(c->l);
                } else
                        t = NULL;
                pthread_mutex_unlock(&slot->lock);
                if (!t)
                        continue;
                __atomic_add_fetch(&s->handshakes_failed, 1, __ATOMIC_RELAXED);
                hsm_hs_count(c, HSM_HS_NOTLS);
                __atomic_add_fetch(&s->token_overruns, 1, __ATOMIC_RELAXED);
                __atomic_add_fetch(&s->stuck, 1, __ATOMIC_RELAXED);
                hsm_info("%s %s: handshake with %s failed: the token did not answer within the handshake timeout", kind, name,
                         peer);
                struct token_overrun *o = c->overrun;
                /* Logged once while the token overruns: the first call. */
                if (o && __atomic_add_fetch(&o->stuck, 1, __ATOMIC_ACQ_REL) == 1)
                        hsm_warn("token %s: a call has not returned by the handshake deadline (%.0f ms in the call); "
                                 "failing its handshake; more overruns are counted, not logged, until it answers",
                                 hsm_token_name(t), (double)(now - since) / 1e6);
        }
}

unsigned hsm_handshake_in_token(hsm_server *s)
{
        unsigned n = 0;
        for (unsigned i = 0; i < s->n_hs_threads; i++)
                if (__atomic_load_n(&s->hs_slots[i].watch.token, __ATOMIC_ACQUIRE))
                        n++;
        return n;
}

/* ----------------------------------------------------------- threads */

static int ep_add(int ep, int fd, uint32_t events, void *ptr)
{
        struct epoll_event ev = { .events = events, .data.ptr = ptr };
        return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

static void *worker(struct hs_slot *slot)
{
        hsm_server *s = slot->srv;
        hsm_token_watch_thread(&slot->watch);
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
        static char tag_queue, tag_drain, tag_stop, tag_sync;
        int ep = epoll_create1(EPOLL_CLOEXEC);
        if (ep < 0 || ep_add(ep, s->hs_efd, EPOLLIN | EPOLLEXCLUSIVE, &tag_queue) < 0 ||
            ep_add(ep, s->drain_efd, EPOLLIN, &tag_drain) < 0 || ep_add(ep, s->stop_efd, EPOLLIN, &tag_stop) < 0 ||
            ep_add(ep, s->sync_efd, EPOLLIN | EPOLLET, &tag_sync) < 0) {
                hsm_err("handshake thread: epoll: %s", strerror(errno));
                __atomic_add_fetch(&s->accept_acks, 1, __ATOMIC_RELEASE);
                if (ep >= 0)
                        close(ep);
                return NULL;
        }
        hsm_listeners_sync(slot, ep); /* the listening sockets; again at each reload (tag_sync) */

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
                                        dispatch(slot, c, 1);
                                else
                                        /* woken for deferred work */
                                        run_held(slot, cpu_take_deferred(slot));
                        } else if (p == &tag_drain) {
                                /* Stop accepting; the main loop closes the
                                 * sockets once every thread has done this. */
                                hsm_listeners_sync(slot, ep); /* accept_stopped: every listener out */
                                epoll_ctl(ep, EPOLL_CTL_DEL, s->drain_efd, NULL);
                                __atomic_add_fetch(&s->accept_acks, 1, __ATOMIC_RELEASE);
                        } else if (p == &tag_sync) {
                                hsm_listeners_sync(slot, ep);
                        } else if (p == &tag_stop) {
                                /* Finish what is queued (parks are refused
                                 * now), then end. */
                                struct conn *c;
                                while ((c = queue_pop(s)))
                                        dispatch(slot, c, 1);
                                /* and what waits for a CPU slot */
                                for (;;) {
                                        pthread_mutex_lock(&s->cpu_lock);
                                        c = deferred_pop_locked(s);
                                        pthread_mutex_unlock(&s->cpu_lock);
                                        if (!c)
                                                break;
                                        slot->gate_key_self = c->accepted_ns;
                                        cpu_enter(slot, c->accepted_ns);
                                        run_held(slot, c);
                                }
                                close(ep);
                                return NULL;
                        } else if (!__atomic_load_n(&s->accept_stopped, __ATOMIC_ACQUIRE)) {
                                /* A listener event of this batch may predate a
                                 * sync handled earlier in it (a reload retired
                                 * the listener): accept only on a listener this
                                 * thread still watches. The retire tick frees a
                                 * slot only after every thread synced, so this
                                 * check closes the window. */
                                struct listener *l = p;
                                size_t i = (size_t)(l - s->listeners);
                                if (i < s->cap_listeners && l->fd >= 0 && slot->reg[i] == l->fd &&
                                    __atomic_load_n(&l->state, __ATOMIC_ACQUIRE) == LISTENER_LIVE)
                                        accept_one(slot, p);
                        }
                }
        }
        close(ep);
        return NULL;
}

void *hsm_handshake_worker(void *arg)
{
        struct hs_slot *slot = arg;
        void *r = worker(slot);
        __atomic_store_n(&slot->exited, 1, __ATOMIC_RELEASE);
        return r;
}

void hsm_handshake_log_admission(hsm_server *s)
{
        hsm_keystore *ks = s->ks;
        hsm_token *seen[64];
        unsigned n_seen = 0;
        for (unsigned i = 0; i < hsm_keystore_n_keys(ks); i++) {
                hsm_token *t = hsm_key_token(hsm_keystore_key(ks, i));
                bool dup = false;
                for (unsigned j = 0; j < n_seen; j++)
                        dup |= seen[j] == t;
                if (dup || n_seen == 64)
                        continue;
                seen[n_seen++] = t;
                hsm_token_concurrency c;
                hsm_token_get_concurrency(t, &c);
                hsm_notice("token %s: concurrency limit=%u (%u..%u) in_flight=%u queued=%u queue_max=%u latency=%.2fms "
                           "floor=%.2fms admitted=%llu shed_queue_full=%llu shed_deadline=%llu rate_refused=%llu",
                           hsm_token_name(t), c.limit, c.min, c.max, c.in_flight, c.queued, c.queue_max, c.latency_us / 1e3,
                           c.latency_floor_us / 1e3, (unsigned long long)c.admitted, (unsigned long long)c.shed_queue_full,
                           (unsigned long long)c.shed_deadline, (unsigned long long)c.rate_refused);
        }
        pthread_mutex_lock(&s->cpu_lock);
        uint64_t revoked = s->cpu_revoked;
        unsigned busy = s->cpu_busy, waiting = s->n_deferred;
        for (struct hs_slot *w = s->cpu_head; w; w = w->gate_next)
                waiting++;
        pthread_mutex_unlock(&s->cpu_lock);
        /* cpu_waiting: handshakes waiting for a CPU slot (work deferred, and
         * threads that gave their slot away waiting to get one back);
         * client_waits: times a handshake was parked for its client's next
         * flight */
        hsm_notice("handshakes: shed=%llu cpu_slots=%u cpu_busy=%u cpu_waiting=%u cpu_slots_taken_back=%llu client_waits=%llu",
                   (unsigned long long)__atomic_load_n(&s->handshakes_shed, __ATOMIC_RELAXED), s->cpu_slots, busy,
                   waiting, (unsigned long long)revoked,
                   (unsigned long long)__atomic_load_n(&s->client_waits, __ATOMIC_RELAXED));
}
