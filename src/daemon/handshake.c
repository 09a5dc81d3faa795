/* The handshake steps: a connection from its ClientHello (read on the main
 * loop, clienthello.c) to an I/O loop. The transport (a step's output sent
 * whole when it ends), the connects to the backend or the TLS server, the
 * GnuTLS session (credentials, client certificates, tickets, ALPN), one
 * gnutls_handshake step under the watchdog's eye, and how a handshake
 * ends: established, or failed with an alert and a log line. A handshake
 * thread (hspool.c) runs one step; a step that would wait on its peer
 * parks the connection on the main loop (hspark.c). */
#include <assert.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "handshake.h"
#include "internal.h"
#include "proxyproto.h"
#include "log.h"
#include "usage.h"

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
void hsm_handshake_refuse(hsm_server *s, struct conn *c)
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
void hsm_handshake_failed(hsm_server *s, struct conn *c, int r, const char *why)
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
                hsm_handshake_refuse(s, c);
        else
                hsm_conn_free(s, c);
}

void hsm_handshake_connect_failed(hsm_server *s, struct conn *c, int err)
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
        hsm_handshake_refuse(s, c);
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
void hsm_handshake_advance(struct hs_slot *slot, struct conn *c)
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
                        hsm_handshake_connect_failed(s, c, r);
                        return;
                }
                c->phase = PH_TLS;
                /* fall through */
        case PH_TLS:
                if (!c->tls) {
                        c->tls_start_ns = hsm_now_ns();
                        r = tls_setup(s, c);
                        if (r < 0) {
                                hsm_handshake_failed(s, c, 1, gnutls_strerror(r));
                                return;
                        }
                }
                if (c->out && (r = out_flush(c)) != 0) {
                        if (r < 0)
                                hsm_handshake_failed(s, c, 1, strerror(-r));
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
                        hsm_handshake_failed(s, c, r, why);
                        return;
                }
                if (f < 0) {
                        hsm_handshake_failed(s, c, 1, strerror(-f));
                        return;
                }
                if (r == GNUTLS_E_AGAIN) {
                        if (hsm_now_ns() >= c->deadline_ns) {
                                hsm_handshake_failed(s, c, 1, "handshake timed out");
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
                        hsm_handshake_connect_failed(s, c, r);
                        return;
                }
                established(s, c);
                return;
        case PH_BACKEND:
                r = connect_result(c->bfd);
                if (r < 0) {
                        hsm_handshake_connect_failed(s, c, r);
                        return;
                }
                established(s, c);
                return;
        }
}
