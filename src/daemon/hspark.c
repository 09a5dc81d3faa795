/* Parked handshakes: between two steps a handshake that waits on its peer
 * (the ClientHello, its next flight, a socket that is full, a connect)
 * waits on the main loop, not in a thread; when its socket is ready it goes
 * back to the handshake queue (hspool.c), at its deadline it fails. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "handshake.h"
#include "internal.h"
#include "log.h"

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
                hsm_handshake_failed(s, c, 1, "handshake timed out");
                return;
        case PH_CONNECT:
        case PH_BACKEND:
                hsm_handshake_connect_failed(s, c, -ETIMEDOUT);
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
