/* Listeners, accept, the ClientHello wait, threads, signals and drain. */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <event2/thread.h>

#include "clienthello.h"
#include "internal.h"
#include "log.h"
#include "notify.h"
#include "store.h"
#include "usage.h"

#define TLS_RECORD_MAX (16384 + 2048)
#define WATCHDOG_US 100000 /* how often handshakes on a thread are checked against their deadline */

void hsm_conn_free(hsm_server *s, struct conn *c)
{
        if (!c)
                return;
        if (c->ev_park)
                event_free(c->ev_park);
        if (c->tls)
                gnutls_deinit(c->tls);
        hsm_creds_unref(c->creds); /* after gnutls_deinit: the session used them */
        if (c->cfd >= 0)
                close(c->cfd);
        if (c->bfd >= 0)
                close(c->bfd);
        free(c->pre);
        free(c->out);
        __atomic_sub_fetch(&c->l->active, 1, __ATOMIC_RELAXED);
        __atomic_sub_fetch(&s->active, 1, __ATOMIC_RELAXED);
        free(c);
}

/* Reads the client's first record (the ClientHello: a TLS record, or an
 * SSLv2-format hello) on the main loop, before a handshake thread is spent
 * on the connection; clienthello.c says how long it is and what it holds.
 * Returns 1 when the whole record is in, 0 when more must come, -1 when
 * the connection was dropped (and freed). */
int hsm_hello_read(struct conn *c)
{
        hsm_server *s = c->l->srv;
        if (!c->pre) {
                c->pre = malloc(HSM_HELLO_RECORD_MAX + 5);
                if (!c->pre) {
                        hsm_conn_free(s, c);
                        return -1;
                }
        }
        size_t need;
        const char *why;
        for (;;) {
                if (hsm_clienthello_record_size(c->pre, c->pre_len, &need, &why) < 0) {
                        /* "not a TLS handshake": tests/e2e/lib.sh's marker waits for these words */
                        hsm_info("listener %s: %s: not a TLS handshake (%s)", c->l->conf->name, c->peer, why);
                        hsm_conn_free(s, c);
                        return -1;
                }
                if (c->pre_len >= need && need > 5)
                        break;
                /* As much as is there, in one call: what follows the
                 * record stays in c->pre, where GnuTLS reads it first. */
                ssize_t n = recv(c->cfd, c->pre + c->pre_len, HSM_HELLO_RECORD_MAX + 5 - c->pre_len, 0);
                if (n < 0 && (errno == EAGAIN || errno == EINTR))
                        return 0;
                if (n <= 0) {
                        hsm_debug("listener %s: %s: closed before the handshake", c->l->conf->name, c->peer);
                        hsm_conn_free(s, c);
                        return -1;
                }
                c->pre_len += (size_t)n;
        }
        hsm_clienthello h;
        char v[16];
        if (hsm_clienthello_parse(c->pre, need, &h, &why) < 0)
                /* GnuTLS reads it again and answers with the right alert */
                hsm_debug("listener %s: %s: a malformed ClientHello (%s)", c->l->conf->name, c->peer, why);
        else if (h.sslv2)
                /* GnuTLS answers it (TLS 1.2 at most: the format has no extensions) or alerts */
                hsm_info("listener %s: %s: an SSLv2-format ClientHello (%s, %u cipher specs), handed to GnuTLS",
                         c->l->conf->name, c->peer, hsm_clienthello_version_name(h.client_version, v, sizeof(v)), h.n_suites);
        return 1;
}

bool hsm_once_a_second(uint64_t *last)
{
        uint64_t now = hsm_now_ns(), prev = __atomic_load_n(last, __ATOMIC_RELAXED);
        return (prev == 0 || now - prev > 1000000000u) &&
               __atomic_compare_exchange_n(last, &prev, now, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

struct conn *hsm_conn_accepted(struct listener *l, int cfd, const struct sockaddr_storage *ss, socklen_t len)
{
        hsm_server *s = l->srv;
        unsigned total = __atomic_add_fetch(&s->active, 1, __ATOMIC_RELAXED);
        unsigned mine = __atomic_add_fetch(&l->active, 1, __ATOMIC_RELAXED);
        struct conn *c = calloc(1, sizeof(*c));
        if (!c || total > s->conf->max_connections || mine > l->conf->max_connections) {
                static uint64_t last_warn; /* atomic */
                uint64_t now = hsm_now_ns(), last = __atomic_load_n(&last_warn, __ATOMIC_RELAXED);
                if (now - last > 1000000000u && __atomic_compare_exchange_n(&last_warn, &last, now, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                        hsm_warn("%s %s: connection limit reached (%u on it, %u in all); refusing connections", EP_KIND(l),
                                 l->conf->name, l->conf->max_connections, s->conf->max_connections);
                close(cfd);
                free(c);
                __atomic_sub_fetch(&s->active, 1, __ATOMIC_RELAXED);
                __atomic_sub_fetch(&l->active, 1, __ATOMIC_RELAXED);
                return NULL;
        }
        c->l = l;
        /* cfd is always the TLS side, bfd the plaintext side. */
        c->cfd = l->conf->kind == HSM_CONNECTOR ? -1 : cfd;
        c->bfd = l->conf->kind == HSM_CONNECTOR ? cfd : -1;
        c->chain = -1;
        c->accepted_ns = hsm_now_ns();
        c->deadline_ns = c->accepted_ns + (uint64_t)l->conf->handshake_timeout_ms * 1000000u;
        hsm_sockaddr_format((const struct sockaddr *)ss, len, c->peer, sizeof(c->peer));
        memcpy(&c->peer_addr, ss, len);
        /* TCP_NODELAY: inherited from the listening socket (bind_listener) */
        return c;
}

void hsm_out_of_fds(struct listener *l)
{
        static uint64_t last_warn; /* atomic */
        uint64_t now = hsm_now_ns(), last = __atomic_load_n(&last_warn, __ATOMIC_RELAXED);
        if (now - last > 1000000000u && __atomic_compare_exchange_n(&last_warn, &last, now, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                hsm_warn("%s %s: out of file descriptors; pausing accept", EP_KIND(l), l->conf->name);
        /* The listening socket stays readable: without a pause every
         * thread woken for it would spin. */
        struct timespec ts = { 0, 100 * 1000000L };
        nanosleep(&ts, NULL);
}

/* The main loop accepts for connectors only: listeners' connections are
 * accepted by the handshake threads themselves (hspool.c). */
static void on_accept(evutil_socket_t fd, short what, void *arg)
{
        struct listener *l = arg;
        for (int i = 0; i < 64; i++) {
                struct sockaddr_storage ss;
                socklen_t len = sizeof(ss);
                int cfd = accept4(l->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (cfd < 0) {
                        if (errno == EMFILE || errno == ENFILE)
                                hsm_out_of_fds(l);
                        return;
                }
                struct conn *c = hsm_conn_accepted(l, cfd, &ss, len);
                if (c) {
                        /* Plaintext from a local program: straight to a handshake thread. */
                        c->phase = PH_CONNECT;
                        hsm_handshake_enqueue(l->srv, c);
                }
        }
}

void hsm_listener_socket_options(struct listener *l)
{
        if (l->fd < 0 || l->conf->listen.ss.ss_family == AF_UNIX)
                return;
        /* TLS clients speak first: accept() when their ClientHello is in
         * (or after the handshake timeout). Not for connectors, whose local
         * programs may wait for the server to speak (0: off). */
        int secs = l->conf->kind == HSM_LISTENER ? (int)((l->conf->handshake_timeout_ms + 999) / 1000) : 0;
        setsockopt(l->fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &secs, sizeof(secs));
}

/* The listener slot (other than l) whose unix socket file is st, or NULL. */
static const struct listener *unix_owner(const struct listener *l, const struct stat *st)
{
        hsm_server *s = l->srv;
        for (unsigned i = 0; i < s->cap_listeners; i++) {
                const struct listener *o = &s->listeners[i];
                if (o != l && o->fd >= 0 && o->conf && o->conf->listen.ss.ss_family == AF_UNIX &&
                    __atomic_load_n(&o->state, __ATOMIC_ACQUIRE) != LISTENER_FREE && o->sock_ino == st->st_ino &&
                    o->sock_dev == st->st_dev)
                        return o;
        }
        return NULL;
}

static int bind_listener(struct listener *l, char **errmsg)
{
        const hsm_addr *a = &l->conf->listen;
        const char *path = a->ss.ss_family == AF_UNIX ? ((const struct sockaddr_un *)&a->ss)->sun_path : NULL;
        struct stat st;
        if (path && lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) {
                /* A socket left behind by an earlier run is removed; any
                 * other file at that path stays, and bind() reports it. The
                 * socket of one of our own listeners (the same file under
                 * another spelling of its path) is never removed: a reload
                 * refused later would leave that listener unreachable. */
                const struct listener *o = unix_owner(l, &st);
                if (o) {
                        hsm_set_error(errmsg, "listener %s: cannot listen on %s: that is the socket of %s %s already", l->conf->name,
                                      a->text, EP_KIND(o), o->conf->name);
                        return -EADDRINUSE;
                }
                unlink(path);
        }
        int fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
                hsm_set_error(errmsg, "listener %s: socket: %s", l->conf->name, strerror(errno));
                return -errno;
        }
        int one = 1;
        if (!path) {
                setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
                /* Accepted sockets inherit it (Linux): no call per connection. */
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        }
        if (bind(fd, (const struct sockaddr *)&a->ss, a->len) < 0 || listen(fd, 1024) < 0) {
                int e = errno;
                hsm_set_error(errmsg, "listener %s: cannot listen on %s: %s", l->conf->name, a->text, strerror(e));
                close(fd);
                return -e;
        }
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        getsockname(fd, (struct sockaddr *)&ss, &len);
        if (path) {
                snprintf(l->addr, sizeof(l->addr), "%s", a->text);
                if (lstat(path, &st) == 0) {
                        l->sock_dev = st.st_dev;
                        l->sock_ino = st.st_ino;
                }
        } else
                hsm_sockaddr_format((struct sockaddr *)&ss, len, l->addr, sizeof(l->addr));
        l->fd = fd;
        hsm_listener_socket_options(l);
        return 0;
}

int hsm_listener_priority(const hsm_conf *c, const hsm_conf_listener *l, gnutls_priority_t *ret, char **errmsg)
{
        char *prio = NULL;
        if (asprintf(&prio, "%s%s", l->priority, l->rsa_key_exchange ? ":+RSA" : "") < 0)
                return -ENOMEM;
        const char *epos = NULL;
        int r = gnutls_priority_init2(ret, prio, &epos, 0);
        if (r < 0) {
                hsm_set_error(errmsg, "%s:%d: [listener %s]: invalid priority string near '%s'", c->path,
                        l->priority_line ? l->priority_line : l->line, l->name, epos ? epos : prio);
                free(prio);
                return -EINVAL;
        }
        free(prio);
        return 0;
}

void hsm_listener_done(struct listener *l)
{
        if (l->ev)
                event_free(l->ev);
        l->ev = NULL;
        if (l->fd >= 0 && !l->fd_moved)
                close(l->fd);
        l->fd = -1;
        l->fd_moved = 0;
        if (l->prio)
                gnutls_priority_deinit(l->prio);
        l->prio = NULL;
        pthread_mutex_lock(&l->creds_lock);
        hsm_creds *cr = l->creds;
        l->creds = NULL;
        pthread_mutex_unlock(&l->creds_lock);
        hsm_creds_unref(cr);
        hsm_sesscache_free(l->sesscache);
        l->sesscache = NULL;
        if (l->ticket_key.data) {
                gnutls_memset(l->ticket_key.data, 0, l->ticket_key.size);
                gnutls_free(l->ticket_key.data);
        }
        l->ticket_key.data = NULL;
        l->ticket_key.size = 0;
}

hsm_hs_counters *hsm_server_hs_counters(hsm_server *s, const char *name)
{
        for (struct hs_name *h = s->hs_names; h; h = h->next)
                if (strcmp(h->name, name) == 0)
                        return &h->hs;
        struct hs_name *h = calloc(1, sizeof(*h) + strlen(name) + 1);
        if (!h)
                return NULL;
        strcpy(h->name, name);
        h->next = s->hs_names;
        s->hs_names = h;
        return &h->hs;
}

void hsm_listener_abort(struct listener *l, const struct listener *donor)
{
        if (l->fd_moved || (donor && l->fd == donor->fd))
                l->fd = -1; /* still the donor's */
        const hsm_addr *a = &l->conf->listen;
        struct stat st;
        if (l->fd >= 0 && a->ss.ss_family == AF_UNIX && lstat(((const struct sockaddr_un *)&a->ss)->sun_path, &st) == 0 &&
            st.st_ino == l->sock_ino && st.st_dev == l->sock_dev)
                unlink(((const struct sockaddr_un *)&a->ss)->sun_path);
        hsm_listener_done(l);
}

int hsm_listener_setup(hsm_server *s, struct listener *l, const hsm_conf *conf, const hsm_conf_listener *lc, hsm_creds *cr,
                       const struct listener *donor, char **errmsg)
{
        int r;
        l->srv = s;
        l->conf = lc;
        hsm_hs_counters *hs = hsm_server_hs_counters(s, lc->name);
        if (!hs) {
                hsm_creds_unref(cr);
                return -ENOMEM;
        }
        __atomic_store_n(&l->hs, hs, __ATOMIC_RELEASE);
        l->server_checks[0] = (gnutls_typed_vdata_st){ .type = GNUTLS_DT_DNS_HOSTNAME, .data = (unsigned char *)lc->server_name };
        l->server_checks[1] = (gnutls_typed_vdata_st){ .type = GNUTLS_DT_KEY_PURPOSE_OID,
                                                       .data = (unsigned char *)GNUTLS_KP_TLS_WWW_SERVER };
        l->fd = -1;
        l->fd_moved = 0;
        l->kill_now = 0;
        l->retire_gen = 0;
        l->sock_dev = 0;
        l->sock_ino = 0;
        for (unsigned j = 0; j < lc->n_alpn; j++)
                l->alpn[j] = (gnutls_datum_t){ (unsigned char *)lc->alpn_protos[j], (unsigned)strlen(lc->alpn_protos[j]) };
        if (cr)
                l->creds = cr;
        else if ((r = hsm_creds_load(s->ks, conf, lc, false, &l->creds, errmsg)) < 0)
                goto fail;
        r = hsm_listener_priority(conf, lc, &l->prio, errmsg);
        if (r < 0)
                goto fail;
        if (donor) {
                /* A reload hands the socket of the listener this one
                 * replaces over: the address stays bound, nothing is lost
                 * from its backlog. Its options change at the commit
                 * (hsm_listener_socket_options): it serves until then. */
                l->fd = donor->fd;
                l->fd_moved = 1; /* the donor's until the commit makes it this slot's */
                l->sock_dev = donor->sock_dev;
                l->sock_ino = donor->sock_ino;
                snprintf(l->addr, sizeof(l->addr), "%s", donor->addr);
        } else if ((r = bind_listener(l, errmsg)) < 0)
                goto fail;
        /* One ticket key per listener: a session made here never
         * resumes on another listener (another client-auth policy). */
        if (lc->kind == HSM_LISTENER && lc->session_tickets && lc->ticket_key) {
                /* Derived on the token from ticket_key and the
                 * listener name: every process with that token and
                 * a listener of that name derives the same key. */
                const char *tn = NULL;
                char *e = NULL;
                l->ticket_key.data = gnutls_malloc(64);
                l->ticket_key.size = 64;
                r = l->ticket_key.data ? hsm_keystore_derive_ticket_key(s->ks, lc->ticket_key, lc->name, l->ticket_key.data, 64,
                                                                        &tn, &e)
                                       : -ENOMEM;
                if (r < 0) {
                        hsm_set_error(errmsg, "%s:%d: [listener %s]: %s", conf->path, lc->ticket_key_line, lc->name,
                                      e ? e : strerror(-r));
                        free(e);
                        goto fail;
                }
                hsm_info("listener %s: session ticket key derived on token %s from %s", lc->name, tn, lc->ticket_key);
        } else if (lc->kind == HSM_LISTENER && lc->session_tickets && gnutls_session_ticket_key_generate(&l->ticket_key) < 0) {
                hsm_set_error(errmsg, "listener %s: cannot make a session ticket key", lc->name);
                r = -ENOMEM;
                goto fail;
        }
        /* And one session-ID cache per listener, for the same reason. */
        if (lc->kind == HSM_LISTENER && lc->session_cache > 0 &&
            (r = hsm_sesscache_new(lc->name, lc->session_cache, lc->session_lifetime_ms / 1000, &l->sesscache)) < 0) {
                hsm_set_error(errmsg, "listener %s: cannot make a session cache of %u entries", lc->name, lc->session_cache);
                goto fail;
        }
        return 0;
fail:
        hsm_listener_abort(l, donor);
        return r;
}

/* Slots for listeners that reloads add while removed ones still drain. */
#define RELOAD_SPARE_LISTENERS 64

int hsm_server_new(hsm_conf *conf, hsm_keystore *ks, hsm_server **ret, char **errmsg)
{
        static pthread_once_t once = PTHREAD_ONCE_INIT;
        pthread_once(&once, (void (*)(void))evthread_use_pthreads);

        hsm_server *s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->conf = conf;
        s->ks = ks;
        s->log_level_forced = -1;
        pthread_mutex_init(&s->hs_lock, NULL);
        pthread_mutex_init(&s->park_lock, NULL);
        pthread_mutex_init(&s->change_lock, NULL);
        pthread_mutex_init(&s->holder_lock, NULL);
        s->hs_efd = eventfd(0, EFD_SEMAPHORE | EFD_NONBLOCK | EFD_CLOEXEC);
        s->drain_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        s->stop_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        s->sync_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        s->park_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (s->hs_efd < 0 || s->drain_efd < 0 || s->stop_efd < 0 || s->sync_efd < 0 || s->park_efd < 0) {
                hsm_server_free(s);
                return -errno;
        }
        s->cap_listeners = conf->n_listeners + RELOAD_SPARE_LISTENERS;
        s->listeners = calloc(s->cap_listeners, sizeof(*s->listeners));
        if (!s->listeners) {
                hsm_server_free(s);
                return -ENOMEM;
        }
        for (unsigned i = 0; i < s->cap_listeners; i++) {
                s->listeners[i].fd = -1;
                pthread_mutex_init(&s->listeners[i].creds_lock, NULL);
        }
        int r;
        for (unsigned i = 0; i < conf->n_listeners; i++) {
                s->n_listeners++;
                r = hsm_listener_setup(s, &s->listeners[i], conf, &conf->listeners[i], NULL, NULL, errmsg);
                if (r < 0)
                        goto fail;
        }
        *ret = s;
        return 0;
fail:
        hsm_server_free(s);
        return r;
}

void hsm_server_set_reload(hsm_server *s, const char *conf_path, struct hsm_store *store, int log_level_forced,
                           void (*on_reload)(void *arg, const hsm_conf *conf), void *arg)
{
        s->conf_path = conf_path;
        s->store = store;
        s->log_level_forced = log_level_forced;
        s->on_reload = on_reload;
        s->on_reload_arg = arg;
        /* Lifetime handshake counts per listener name (a reload tracks the
         * names it adds). */
        for (unsigned i = 0; store && i < s->n_listeners; i++)
                hsm_store_track_listener(store, s->listeners[i].conf->name, s->listeners[i].hs);
}

int hsm_connector_start(hsm_server *s, struct listener *l)
{
        l->ev = event_new(s->base, l->fd, EV_READ | EV_PERSIST, on_accept, l);
        if (!l->ev || event_add(l->ev, NULL) < 0)
                return -ENOMEM;
        return 0;
}

void hsm_listener_log_start(struct listener *l)
{
        if (l->conf->kind == HSM_CONNECTOR)
                hsm_notice("connector %s: listening on %s, TLS to %s (server name %s), %u client certificate chain%s", l->conf->name,
                           l->addr, l->conf->backend.text, l->conf->server_name, l->creds->n_chains,
                           l->creds->n_chains == 1 ? "" : "s");
        else
                hsm_notice("listener %s: listening on %s, backend %s, %u certificate chain%s%s%s%s", l->conf->name, l->addr,
                           l->conf->backend.text, l->creds->n_chains, l->creds->n_chains == 1 ? "" : "s",
                           l->conf->rsa_key_exchange ? ", RSA key exchange enabled" : "",
                           l->conf->client_auth == HSM_CLIENT_AUTH_REQUIRE    ? ", client certificates required"
                           : l->conf->client_auth == HSM_CLIENT_AUTH_OPTIONAL ? ", client certificates optional"
                                                                              : "",
                           l->conf->proxy_protocol ? ", PROXY v2 to the backend" : "");
}

void hsm_listeners_sync(struct hs_slot *slot, int ep)
{
        hsm_server *s = slot->srv;
        unsigned gen = __atomic_load_n(&s->listeners_gen, __ATOMIC_ACQUIRE);
        unsigned n = __atomic_load_n(&s->n_listeners, __ATOMIC_ACQUIRE);
        bool accepting = !__atomic_load_n(&s->accept_stopped, __ATOMIC_ACQUIRE);
        /* Out first, then in: a descriptor number never stands for two
         * slots at once in the set. */
        for (unsigned i = 0; i < s->cap_listeners; i++) {
                struct listener *l = &s->listeners[i];
                int want = -1;
                if (accepting && i < n && __atomic_load_n(&l->state, __ATOMIC_ACQUIRE) == LISTENER_LIVE &&
                    l->conf->kind == HSM_LISTENER)
                        want = l->fd;
                if (slot->reg[i] >= 0 && slot->reg[i] != want) {
                        epoll_ctl(ep, EPOLL_CTL_DEL, slot->reg[i], NULL);
                        slot->reg[i] = -1;
                }
        }
        for (unsigned i = 0; accepting && i < n; i++) {
                struct listener *l = &s->listeners[i];
                if (slot->reg[i] >= 0 || __atomic_load_n(&l->state, __ATOMIC_ACQUIRE) != LISTENER_LIVE ||
                    l->conf->kind != HSM_LISTENER || l->fd < 0)
                        continue;
                struct epoll_event ev = { .events = EPOLLIN | EPOLLEXCLUSIVE, .data.ptr = l };
                if (epoll_ctl(ep, EPOLL_CTL_ADD, l->fd, &ev) == 0)
                        slot->reg[i] = l->fd;
                else
                        hsm_err("handshake thread: epoll: listener %s: %s", l->conf->name, strerror(errno));
        }
        __atomic_store_n(&slot->synced_gen, gen, __ATOMIC_RELEASE);
}

static void on_usr1(evutil_socket_t fd, short what, void *arg)
{
        hsm_server_log_usage(arg);
        hsm_server_log_stats(arg);
}

void hsm_server_get_stats(hsm_server *s, hsm_server_stats *st)
{
        pthread_mutex_lock(&s->hs_lock);
        st->running = s->hs_busy;
        pthread_mutex_unlock(&s->hs_lock);
        st->completed = __atomic_load_n(&s->handshakes_ok, __ATOMIC_RELAXED);
        st->failed = __atomic_load_n(&s->handshakes_failed, __ATOMIC_RELAXED);
        st->in_token = s->hs_slots ? hsm_handshake_in_token(s) : 0;
        st->waiting = __atomic_load_n(&s->n_waiting, __ATOMIC_RELAXED);
        st->connecting = __atomic_load_n(&s->n_connecting, __ATOMIC_RELAXED);
        st->waiting_limit = s->waiting_limit;
        st->waiting_closed = __atomic_load_n(&s->waiting_closed, __ATOMIC_RELAXED);
        st->token_overruns = __atomic_load_n(&s->token_overruns, __ATOMIC_RELAXED);
        st->stuck = __atomic_load_n(&s->stuck, __ATOMIC_RELAXED);
}

void hsm_server_log_stats(hsm_server *s)
{
        hsm_server_stats st;
        hsm_server_get_stats(s, &st);
        hsm_notice("handshakes: completed=%llu failed=%llu running=%u in_token=%u waiting=%u connecting=%u waiting_limit=%u "
                   "waiting_closed=%llu token_overruns=%llu stuck=%u",
                   (unsigned long long)st.completed, (unsigned long long)st.failed, st.running, st.in_token, st.waiting,
                   st.connecting, st.waiting_limit, (unsigned long long)st.waiting_closed,
                   (unsigned long long)st.token_overruns, st.stuck);
        if (s->hs_slots)
                hsm_handshake_log_admission(s);
}

unsigned hsm_server_threads_left(const hsm_server *s)
{
        return s ? s->threads_left + hsm_creds_tests_running() + s->reload_left : 0;
}

static void on_hup(evutil_socket_t fd, short what, void *arg)
{
        hsm_server *s = arg;
        if (s->draining) {
                hsm_notice("SIGHUP: draining for exit: no reload");
                return;
        }
        hsm_reload(s);
}

static unsigned handshakes_pending(hsm_server *s)
{
        pthread_mutex_lock(&s->hs_lock);
        unsigned n = s->hs_queued + s->hs_busy;
        pthread_mutex_unlock(&s->hs_lock);
        return n;
}

static void close_listeners(hsm_server *s)
{
        if (s->listeners_closed)
                return;
        s->listeners_closed = 1;
        /* Not a free slot: a reload's build may be setting it up (its
         * thread undoes that itself). */
        for (unsigned i = 0; i < s->n_listeners; i++)
                if (s->listeners[i].fd >= 0 && __atomic_load_n(&s->listeners[i].state, __ATOMIC_ACQUIRE) != LISTENER_FREE) {
                        if (!s->listeners[i].fd_moved) /* else another slot's socket now */
                                close(s->listeners[i].fd);
                        s->listeners[i].fd = -1;
                }
}

static void on_drain_tick(evutil_socket_t fd, short what, void *arg)
{
        hsm_server *s = arg;
        if (__atomic_load_n(&s->accept_acks, __ATOMIC_ACQUIRE) >= s->n_hs_threads)
                close_listeners(s);
        /* Handshakes already failed whose thread is still inside the token
         * are not waited for. */
        unsigned active = __atomic_load_n(&s->active, __ATOMIC_RELAXED), stuck = __atomic_load_n(&s->stuck, __ATOMIC_RELAXED);
        active = active > stuck ? active - stuck : 0;
        if (active == 0 || hsm_now_ns() >= s->drain_deadline_ns) {
                if (active)
                        hsm_notice("drain timeout: closing the %u connection%s still open", active, active == 1 ? "" : "s");
                event_base_loopbreak(s->base);
        }
        hsm_notify_draining(active);
}

static void on_term(evutil_socket_t sig, short what, void *arg)
{
        hsm_server *s = arg;
        if (s->draining) {
                hsm_notice("second signal: stopping now");
                __atomic_store_n(&s->stop_now, 1, __ATOMIC_RELEASE);
                s->drain_deadline_ns = 0;
                event_base_loopbreak(s->base);
                return;
        }
        s->draining = 1;
        char why[120];
        snprintf(why, sizeof(why), "%s came while it was being built: draining for exit", strsignal((int)sig));
        hsm_reload_abandon(s, why);
        for (unsigned i = 0; i < s->n_listeners; i++) {
                struct listener *l = &s->listeners[i];
                if (l->ev)
                        event_del(l->ev);
        }
        /* The handshake threads take the listeners out of their epoll sets;
         * the sockets are closed once all have (close_listeners()). */
        __atomic_store_n(&s->accept_stopped, 1, __ATOMIC_RELEASE);
        uint64_t one = 1;
        if (write(s->drain_efd, &one, sizeof(one)) < 0)
                hsm_warn("cannot wake the handshake threads: %s", strerror(errno));
        s->drain_deadline_ns = hsm_now_ns() + (uint64_t)s->conf->drain_timeout_ms * 1000000u;
        hsm_notice("%s: draining: no new connections, %u open, up to %.1f s", strsignal((int)sig),
                   __atomic_load_n(&s->active, __ATOMIC_RELAXED), s->conf->drain_timeout_ms / 1000.0);
        hsm_notify_stopping(__atomic_load_n(&s->active, __ATOMIC_RELAXED));
        struct timeval tv = { 0, 50000 };
        s->ev_drain = event_new(s->base, -1, EV_PERSIST, on_drain_tick, s);
        event_add(s->ev_drain, &tv);
}

static void on_watchdog(evutil_socket_t fd, short what, void *arg)
{
        hsm_handshake_watchdog(arg);
        hsm_keystore_reap(((hsm_server *)arg)->ks); /* tokens a reload retired */
}

/* At exit: may thread i be left behind? A thread inside gnutls_handshake
 * for a handshake the watchdog failed is inside the token, with no end in
 * sight; after a second signal any thread inside gnutls_handshake is (the
 * rest only use the CPU and end at once). */
static bool may_leave(hsm_server *s, struct hs_slot *slot)
{
        pthread_mutex_lock(&slot->lock);
        bool r = slot->c && (slot->c->abandoned || __atomic_load_n(&s->stop_now, __ATOMIC_ACQUIRE));
        pthread_mutex_unlock(&slot->lock);
        return r;
}

static bool threads_done(hsm_server *s)
{
        for (unsigned i = 0; i < s->n_hs_threads; i++) {
                struct hs_slot *slot = &s->hs_slots[i];
                if (!__atomic_load_n(&slot->exited, __ATOMIC_ACQUIRE) && !may_leave(s, slot))
                        return false;
        }
        return true;
}

static void on_stop_tick(evutil_socket_t fd, short what, void *arg)
{
        hsm_server *s = arg;
        hsm_handshake_watchdog(s);
        if (threads_done(s))
                event_base_loopbreak(s->base);
}

/* Ends the handshake threads. Parked handshakes are closed, queued ones
 * run (dropped after a second signal); handshakes on a thread finish
 * within their deadline, the watchdog still running, and a second signal
 * cuts that short. Threads inside a token call for a failed handshake (or,
 * after a second signal, any) are left behind: their connection is marked
 * abandoned, so that they only free it if the call ever returns. */
static void stop_handshakes(hsm_server *s)
{
        hsm_handshake_unpark_all(s);
        uint64_t one = 1;
        if (write(s->stop_efd, &one, sizeof(one)) < 0)
                hsm_warn("cannot stop the handshake threads: %s", strerror(errno));
        if (s->ev_drain)
                event_del(s->ev_drain);
        if (!__atomic_load_n(&s->stop_now, __ATOMIC_ACQUIRE) && !threads_done(s)) {
                unsigned pending = handshakes_pending(s);
                if (pending)
                        hsm_notice("waiting for %u handshake%s in progress", pending, pending == 1 ? "" : "s");
                struct timeval tv = { 0, 20000 };
                s->ev_stop_tick = event_new(s->base, -1, EV_PERSIST, on_stop_tick, s);
                if (s->ev_stop_tick && event_add(s->ev_stop_tick, &tv) == 0)
                        event_base_dispatch(s->base);
                hsm_handshake_unpark_all(s);
        }
        /* Threads that only use the CPU end within moments. */
        for (int i = 0; i < 1000 && !threads_done(s); i++) {
                struct timespec ts = { 0, 2000000 };
                nanosleep(&ts, NULL);
        }
        for (unsigned i = 0; i < s->n_hs_threads; i++) {
                struct hs_slot *slot = &s->hs_slots[i];
                if (__atomic_load_n(&slot->exited, __ATOMIC_ACQUIRE)) {
                        pthread_join(slot->thread, NULL);
                        slot->joined = 1;
                        continue;
                }
                pthread_mutex_lock(&slot->lock);
                if (slot->c && !slot->c->abandoned) {
                        slot->c->abandoned = 1;
                        __atomic_add_fetch(&s->stuck, 1, __ATOMIC_RELAXED);
                }
                pthread_mutex_unlock(&slot->lock);
                s->threads_left++;
        }
        if (s->threads_left)
                hsm_notice("%u handshake thread%s still inside a token call: exiting without waiting for %s", s->threads_left,
                           s->threads_left == 1 ? " is" : "s are", s->threads_left == 1 ? "it" : "them");
        unsigned tests = hsm_creds_tests_running();
        if (tests)
                hsm_notice("%u test signature%s of a reload or an admin API change %s still inside a token call: exiting "
                           "without waiting for %s", tests, tests == 1 ? "" : "s", tests == 1 ? "is" : "are",
                           tests == 1 ? "it" : "them");
}

int hsm_server_run(hsm_server *s)
{
        int r = 0;
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        s->base = event_base_new();
        if (!s->base)
                return -ENOMEM;

        s->n_loops = s->conf->io_threads ? s->conf->io_threads : (unsigned)(cores > 0 ? cores : 1);
        s->loops = calloc(s->n_loops, sizeof(*s->loops));
        s->n_hs_threads = s->conf->handshake_threads;
        if (!s->n_hs_threads) {
                /* As many handshakes in flight as the tokens have sessions. */
                s->n_hs_threads = hsm_keystore_total_sessions(s->ks);
                if (s->n_hs_threads < 2 * (unsigned)cores)
                        s->n_hs_threads = 2 * (unsigned)cores;
                if (s->n_hs_threads > 256)
                        s->n_hs_threads = 256;
        }
        s->hs_slots = calloc(s->n_hs_threads, sizeof(*s->hs_slots));
        if (!s->loops || !s->hs_slots)
                return -ENOMEM;
        for (unsigned i = 0; i < s->n_hs_threads; i++) {
                s->hs_slots[i].srv = s;
                pthread_mutex_init(&s->hs_slots[i].lock, NULL);
                s->hs_slots[i].reg = malloc(s->cap_listeners * sizeof(int));
                if (!s->hs_slots[i].reg)
                        return -ENOMEM;
                for (unsigned j = 0; j < s->cap_listeners; j++)
                        s->hs_slots[i].reg[j] = -1;
        }
        /* Handshake steps on the CPU at once: one per core, so that the
         * I/O loops never queue behind a crowd of runnable handshakes. */
        hsm_handshake_sched_init(s, s->conf->handshake_cpus ? s->conf->handshake_cpus : (unsigned)(cores > 0 ? cores : 1));
        /* Default: half of max_connections, but never so few that normal
         * clients (a TLS 1.3 handshake parks once, for the client's
         * Finished) evict each other under a small max_connections. */
        s->waiting_limit = s->conf->max_waiting_handshakes;
        if (!s->waiting_limit) {
                s->waiting_limit = s->conf->max_connections / 2;
                unsigned floor = s->conf->max_connections < 64 ? s->conf->max_connections : 64;
                if (s->waiting_limit < floor)
                        s->waiting_limit = floor;
        }
        if (!s->waiting_limit)
                s->waiting_limit = 1;
        s->ev_park_wake = event_new(s->base, s->park_efd, EV_READ | EV_PERSIST, hsm_handshake_on_park_wake, s);
        s->ev_watchdog = event_new(s->base, -1, EV_PERSIST, on_watchdog, s);
        struct timeval tick = { 0, WATCHDOG_US };
        if (!s->ev_park_wake || !s->ev_watchdog || event_add(s->ev_park_wake, NULL) < 0 || event_add(s->ev_watchdog, &tick) < 0)
                return -ENOMEM;
        for (unsigned i = 0; i < s->n_loops; i++)
                if ((r = hsm_ioloop_start(s, &s->loops[i])) < 0) {
                        hsm_err("cannot start I/O thread: %s", strerror(-r));
                        return r;
                }
        unsigned started = 0;
        for (; started < s->n_hs_threads; started++)
                if (pthread_create(&s->hs_slots[started].thread, NULL, hsm_handshake_worker, &s->hs_slots[started]) != 0)
                        break;
        s->n_hs_threads = started;

        for (unsigned i = 0; i < s->n_listeners; i++) {
                struct listener *l = &s->listeners[i];
                if (l->conf->kind == HSM_CONNECTOR && hsm_connector_start(s, l) < 0)
                        return -ENOMEM;
                hsm_listener_log_start(l);
        }
        s->ev_term = evsignal_new(s->base, SIGTERM, on_term, s);
        s->ev_int = evsignal_new(s->base, SIGINT, on_term, s);
        s->ev_usr1 = evsignal_new(s->base, SIGUSR1, on_usr1, s);
        s->ev_hup = evsignal_new(s->base, SIGHUP, on_hup, s);
        s->ev_retire = event_new(s->base, -1, EV_PERSIST, hsm_reload_retire_tick, s);
        s->ev_reload = event_new(s->base, -1, 0, hsm_reload_tick, s);
        if (!s->ev_reload)
                return -ENOMEM;
        event_add(s->ev_hup, NULL);
        event_add(s->ev_term, NULL);
        event_add(s->ev_int, NULL);
        event_add(s->ev_usr1, NULL);
        hsm_notice("ready: %u handshake threads, %u I/O threads, %u handshake steps on the CPU at once", s->n_hs_threads,
                   s->n_loops, s->cpu_slots);
        unsigned n_connectors = 0;
        for (unsigned i = 0; i < s->n_listeners; i++)
                n_connectors += s->listeners[i].conf->kind == HSM_CONNECTOR;
        hsm_notify_ready(s->n_listeners - n_connectors, n_connectors);

        event_base_dispatch(s->base);

        hsm_reload_stop(s);
        stop_handshakes(s);
        close_listeners(s);
        for (unsigned i = 0; i < s->n_loops; i++)
                hsm_ioloop_stop(&s->loops[i]);
        hsm_server_log_stats(s);
        hsm_notice("stopped: %llu handshakes completed, %llu failed",
                   (unsigned long long)__atomic_load_n(&s->handshakes_ok, __ATOMIC_RELAXED),
                   (unsigned long long)__atomic_load_n(&s->handshakes_failed, __ATOMIC_RELAXED));
        hsm_notify_stopped();
        return 0;
}

void hsm_server_log_usage(hsm_server *s)
{
        hsm_keystore *ks = s->ks;
        for (unsigned i = 0; i < hsm_keystore_n_keys(ks); i++) {
                hsm_key *k = hsm_keystore_key(ks, i);
                hsm_usage_entry e[HSM_OP__MAX * HSM_MECH__MAX * HSM_RESULT__MAX];
                int n = hsm_usage_snapshot(hsm_key_usage(k), e, (int)(sizeof(e) / sizeof(e[0])));
                if (n == 0)
                        hsm_notice("usage: token=%s key=%s op=sign count=0", hsm_keystore_token_name(ks, i), hsm_key_label(k));
                for (int j = 0; j < n; j++)
                        hsm_notice("usage: token=%s key=%s op=%s mech=%s result=%s count=%llu avg_us=%.0f max_us=%.0f",
                                   hsm_keystore_token_name(ks, i), hsm_key_label(k), hsm_op_name(e[j].op), hsm_mech_name(e[j].mech),
                                   hsm_result_name(e[j].result), (unsigned long long)e[j].count,
                                   e[j].count ? (double)e[j].total_ns / (double)e[j].count / 1000.0 : 0.0,
                                   (double)e[j].max_ns / 1000.0);
                /* The errors above by reason (non-zero ones). */
                for (int o = 0; o < HSM_OP__MAX; o++)
                        for (int m = 0; m < HSM_MECH__MAX; m++)
                                for (int w = HSM_REASON_NONE + 1; w < HSM_REASON__MAX; w++) {
                                        uint64_t c = hsm_usage_failures(hsm_key_usage(k), o, m, w);
                                        if (c)
                                                hsm_notice("usage: token=%s key=%s op=%s mech=%s failed=%s count=%llu",
                                                           hsm_keystore_token_name(ks, i), hsm_key_label(k), hsm_op_name(o),
                                                           hsm_mech_name(m), hsm_reason_name(w), (unsigned long long)c);
                                }
        }
}

void hsm_server_free(hsm_server *s)
{
        if (!s)
                return;
        for (unsigned i = 0; s->listeners && i < s->cap_listeners; i++) {
                hsm_listener_done(&s->listeners[i]);
                pthread_mutex_destroy(&s->listeners[i].creds_lock);
        }
        free(s->listeners);
        /* Connections still waiting for a ClientHello. */
        if (s->base) {
                if (s->ev_term) event_free(s->ev_term);
                if (s->ev_int) event_free(s->ev_int);
                if (s->ev_usr1) event_free(s->ev_usr1);
                if (s->ev_hup) event_free(s->ev_hup);
                if (s->ev_retire) event_free(s->ev_retire);
                if (s->ev_reload) event_free(s->ev_reload);
                if (s->ev_drain) event_free(s->ev_drain);
                if (s->ev_park_wake) event_free(s->ev_park_wake);
                if (s->ev_watchdog) event_free(s->ev_watchdog);
                if (s->ev_stop_tick) event_free(s->ev_stop_tick);
                event_base_free(s->base);
        }
        free(s->loops);
        if (s->hs_slots)
                for (unsigned i = 0; i < s->n_hs_threads; i++) {
                        pthread_mutex_destroy(&s->hs_slots[i].lock);
                        free(s->hs_slots[i].reg);
                }
        free(s->hs_slots);
        free(s->overruns);
        pthread_mutex_destroy(&s->park_lock);
        pthread_mutex_destroy(&s->hs_lock);
        pthread_mutex_destroy(&s->change_lock);
        pthread_mutex_destroy(&s->holder_lock);
        for (unsigned i = 0; i < s->n_reloaded; i++)
                hsm_conf_free(s->reloaded[i]);
        free(s->reloaded);
        while (s->hs_names) {
                struct hs_name *h = s->hs_names;
                s->hs_names = h->next;
                free(h);
        }
        int efds[5] = { s->hs_efd, s->drain_efd, s->stop_efd, s->sync_efd, s->park_efd };
        for (int i = 0; i < 5; i++)
                if (efds[i] > 0)
                        close(efds[i]);
        free(s);
}

/* Read-only views for the admin API (src/admin): any thread, no lock (the
 * fields read are atomic counters or set before the admin server starts;
 * fd goes to -1 once at drain). */
unsigned hsm_server_n_listeners(const hsm_server *s) { return s ? __atomic_load_n(&s->n_listeners, __ATOMIC_ACQUIRE) : 0; }

int hsm_server_listener_info(const hsm_server *s, unsigned i, hsm_listener_info *ret)
{
        if (!s || i >= s->n_listeners)
                return -ENOENT;
        const struct listener *l = &s->listeners[i];
        if (__atomic_load_n(&l->state, __ATOMIC_ACQUIRE) != LISTENER_LIVE)
                return -ENOENT; /* removed by a reload */
        *ret = (hsm_listener_info){
                .name = l->conf->name,
                .kind = EP_KIND(l),
                .address = l->addr,
                .serving = __atomic_load_n(&l->fd, __ATOMIC_RELAXED) >= 0 && !__atomic_load_n(&s->draining, __ATOMIC_RELAXED),
                .connections = __atomic_load_n(&l->active, __ATOMIC_RELAXED),
        };
        return 0;
}

void hsm_server_handshakes(const hsm_server *s, uint64_t *ok, uint64_t *failed)
{
        *ok = s ? __atomic_load_n(&s->handshakes_ok, __ATOMIC_RELAXED) : 0;
        *failed = s ? __atomic_load_n(&s->handshakes_failed, __ATOMIC_RELAXED) : 0;
}

/* ------------------------------------------------ credential changes */

hsm_creds *hsm_listener_creds(struct listener *l)
{
        /* The load and the reference under one lock: a swap between a bare
         * atomic load and the increment could drop the last reference. Held
         * for two instructions; a swap takes it for one exchange. */
        pthread_mutex_lock(&l->creds_lock);
        hsm_creds *cr = hsm_creds_ref(l->creds);
        pthread_mutex_unlock(&l->creds_lock);
        return cr;
}

struct listener *hsm_find_listener(hsm_server *s, const char *name)
{
        unsigned n = __atomic_load_n(&s->n_listeners, __ATOMIC_ACQUIRE);
        for (unsigned i = 0; name && i < n; i++)
                if (__atomic_load_n(&s->listeners[i].state, __ATOMIC_ACQUIRE) == LISTENER_LIVE &&
                    strcmp(s->listeners[i].conf->name, name) == 0)
                        return &s->listeners[i];
        return NULL;
}

hsm_creds *hsm_server_creds(hsm_server *s, const char *name)
{
        struct listener *l = hsm_find_listener(s, name);
        return l ? hsm_listener_creds(l) : NULL;
}

/* Sets (what != NULL) or clears the holder of change_lock (held). */
static void holder_set(hsm_server *s, const char *what, bool watch)
{
        pthread_mutex_lock(&s->holder_lock);
        snprintf(s->holder, sizeof(s->holder), "%s", what ? what : "");
        s->holder_since_ns = hsm_now_ns();
        s->holder_fn = NULL;
        s->holder_arg = NULL;
        if (watch) {
                memset(&s->holder_watch, 0, sizeof(s->holder_watch));
                hsm_token_watch_thread(&s->holder_watch);
        } else if (s->holder_watched)
                hsm_token_watch_thread(NULL);
        s->holder_watched = watch;
        pthread_mutex_unlock(&s->holder_lock);
}

void hsm_server_changes_holder(hsm_server *s, uint64_t (*fn)(void *arg, char *buf, size_t len), void *arg)
{
        holder_set(s, NULL, false);
        pthread_mutex_lock(&s->holder_lock);
        s->holder_fn = fn;
        s->holder_arg = arg;
        pthread_mutex_unlock(&s->holder_lock);
}

void hsm_server_changes_lock(hsm_server *s)
{
        pthread_mutex_lock(&s->change_lock);
        holder_set(s, NULL, false);
}

void hsm_server_changes_unlock(hsm_server *s)
{
        holder_set(s, NULL, false);
        pthread_mutex_unlock(&s->change_lock);
}

/* Since when the holder of change_lock has been in what it waits on now
 * (a step of a reload's build, a token call of an admin change), or now
 * when it is between such (it runs); why says what holds it. */
static uint64_t holder_stuck_since(hsm_server *s, uint64_t now, char *why, size_t len)
{
        uint64_t since = now;
        pthread_mutex_lock(&s->holder_lock);
        if (s->holder_fn) {
                since = s->holder_fn(s->holder_arg, why, len);
        } else if (s->holder[0]) {
                /* The tokens an admin change is inside stay open while it
                 * holds the lock (a reload commits tokens under it). */
                hsm_token *t = __atomic_load_n(&s->holder_watch.token, __ATOMIC_ACQUIRE);
                since = __atomic_load_n(&s->holder_watch.since_ns, __ATOMIC_ACQUIRE);
                if (t && since && since <= now)
                        snprintf(why, len, "an admin API change (%s) has been inside token %s for %.1f s", s->holder,
                                 hsm_token_name(t), (double)(now - since) / 1e9);
                else {
                        since = now;
                        snprintf(why, len, "an admin API change (%s) has held it for %.1f s", s->holder,
                                 (double)(now - s->holder_since_ns) / 1e9);
                }
        } else
                snprintf(why, len, "another change holds it");
        pthread_mutex_unlock(&s->holder_lock);
        return since && since <= now ? since : now;
}

int hsm_server_changes_lock_wait(hsm_server *s, unsigned stuck_ms, const char *what, char *why, size_t len)
{
        uint64_t bound = (uint64_t)stuck_ms * 1000000u, now = hsm_now_ns();
        uint64_t cap = now + HSM_CHANGES_WAIT_MAX * bound, dl = now + bound;
        for (;;) {
                struct timespec ts = { (time_t)(dl / 1000000000u), (long)(dl % 1000000000u) };
                int e = pthread_mutex_clocklock(&s->change_lock, CLOCK_MONOTONIC, &ts);
                if (e == 0) {
                        holder_set(s, what, true);
                        return 0;
                }
                if (e != ETIMEDOUT)
                        return -e;
                now = hsm_now_ns();
                uint64_t since = holder_stuck_since(s, now, why, len);
                if (now - since >= bound || now >= cap)
                        return -ETIMEDOUT;
                /* The holder goes on: wait until it has been stuck that long. */
                dl = since + bound < cap ? since + bound : cap;
        }
}

struct hsm_server_staged {
        unsigned n;
        struct listener **l;
        hsm_creds **creds;
};

const hsm_creds *hsm_server_staged_creds(const hsm_server_staged *st, unsigned i)
{
        return i < st->n ? st->creds[i] : NULL;
}

void hsm_server_stage_abort(hsm_server_staged *st)
{
        if (!st)
                return;
        for (unsigned i = 0; i < st->n; i++)
                hsm_creds_unref(st->creds[i]);
        free(st->l);
        free(st->creds);
        free(st);
}

int hsm_server_stage(hsm_server *s, const hsm_listener_chains *set, unsigned n, hsm_server_staged **ret,
                     int *ret_listener, int *ret_chain, char **errmsg)
{
        int bad_l = -1, bad_c = -1, r = 0;
        hsm_server_staged *st = calloc(1, sizeof(*st));
        if (!st || !(st->l = calloc(n + 1, sizeof(*st->l))) || !(st->creds = calloc(n + 1, sizeof(*st->creds)))) {
                hsm_server_stage_abort(st);
                return -ENOMEM;
        }
        for (unsigned i = 0; i < n; i++) {
                bad_l = (int)i;
                bad_c = -1;
                struct listener *l = hsm_find_listener(s, set[i].listener);
                if (!l) {
                        hsm_set_error(errmsg, "no listener or connector named '%s'", set[i].listener ? set[i].listener : "");
                        r = -ENOENT;
                        goto fail;
                }
                for (unsigned j = 0; j < st->n; j++)
                        if (st->l[j] == l) {
                                hsm_set_error(errmsg, "listener %s is twice in one change", l->conf->name);
                                r = -EINVAL;
                                goto fail;
                        }
                if (set[i].n_chains == 0) {
                        hsm_set_error(errmsg, "%s %s would serve no certificate chain", EP_KIND(l), l->conf->name);
                        r = -EINVAL;
                        goto fail;
                }
                hsm_creds *cr = NULL;
                const hsm_conf_listener *lc = set[i].settings ? set[i].settings : l->conf;
                r = hsm_creds_build(s->ks, lc, set[i].chains, set[i].n_chains, HSM_CREDS_TEST_SIGN | HSM_CREDS_LIVE, &cr, &bad_c,
                                    errmsg);
                if (r == 0 && (r = hsm_creds_set_trust(cr, set[i].conf ? set[i].conf : s->conf, lc, false, errmsg)) < 0) {
                        hsm_creds_unref(cr);
                        bad_c = -1;
                }
                if (r < 0)
                        goto fail;
                st->l[st->n] = l;
                st->creds[st->n++] = cr;
        }
        *ret = st;
        return 0;
fail:
        if (ret_listener)
                *ret_listener = bad_l;
        if (ret_chain)
                *ret_chain = bad_c;
        hsm_server_stage_abort(st);
        return r;
}

void hsm_server_stage_commit(hsm_server *s, hsm_server_staged *st)
{
        for (unsigned i = 0; i < st->n; i++) {
                struct listener *l = st->l[i];
                hsm_creds *cr = st->creds[i];
                st->creds[i] = NULL;
                pthread_mutex_lock(&l->creds_lock);
                hsm_creds *old = l->creds;
                cr->generation = old ? old->generation + 1 : 1;
                l->creds = cr;
                pthread_mutex_unlock(&l->creds_lock);
                char fps[600] = "";
                size_t off = 0;
                for (unsigned j = 0; j < cr->n_chains && off + 70 < sizeof(fps); j++)
                        off += (size_t)snprintf(fps + off, sizeof(fps) - off, "%s%.16s", j ? "," : "", cr->chains[j].fingerprint);
                hsm_notice("%s %s: credentials generation %u swapped in: %u certificate chain%s (%s); generation %u stays "
                           "with the handshakes and connections that use it",
                           EP_KIND(l), l->conf->name, cr->generation, cr->n_chains, cr->n_chains == 1 ? "" : "s", fps,
                           old ? old->generation : 0);
                if (old) {
                        __atomic_store_n(&old->retired, 1, __ATOMIC_RELEASE);
                        hsm_creds_unref(old);
                }
        }
        hsm_server_stage_abort(st);
}

int hsm_server_commit(hsm_server *s, const hsm_listener_chains *set, unsigned n, int *ret_listener, int *ret_chain,
                      char **errmsg)
{
        hsm_server_staged *st = NULL;
        hsm_server_changes_lock(s);
        int r = hsm_server_stage(s, set, n, &st, ret_listener, ret_chain, errmsg);
        if (r == 0)
                hsm_server_stage_commit(s, st);
        hsm_server_changes_unlock(s);
        return r;
}
