/* Private to the daemon's server parts (server.c, handshake.c, proxy.c). */
#pragma once

#include <pthread.h>
#include <sys/socket.h>
#include <stdint.h>
#include <gnutls/gnutls.h>
#include <event2/event.h>

#include "conf.h"
#include "creds.h"
#include "server.h"

struct ioloop;

#define EP_KIND(l) ((l)->conf->kind == HSM_CONNECTOR ? "connector" : "listener")

struct listener {
        hsm_server *srv;
        const hsm_conf_listener *conf;
        int fd;
        struct event *ev;
        hsm_creds *creds;
        gnutls_priority_t prio;
        gnutls_datum_t ticket_key; /* listeners: session tickets of this listener only */
        unsigned active; /* atomic */
        char addr[96];
};

struct conn {
        struct conn *next, *prev; /* handshake queue, then the I/O loop's list */
        struct listener *l;
        int cfd, bfd;
        char peer[96];
        struct sockaddr_storage peer_addr;
        gnutls_session_t tls;
        uint64_t accepted_ns;
        uint64_t deadline_ns; /* end of the handshake */
        struct event *ev_hello;
        uint8_t *pre; /* bytes read before the handshake (the ClientHello record) */
        size_t pre_len, pre_off;

        struct ioloop *loop;
        struct event *ev_cr, *ev_cw, *ev_br, *ev_bw, *ev_timer;
        struct event *ev_again; /* pump again at the next pass (a busy connection yielded) */
        unsigned armed; /* which of the four events are added */
        uint8_t *c2b, *b2c; /* unsent remainders, malloc'd only while pending */
        size_t c2b_len, c2b_off, b2c_len, b2c_off;
        unsigned c_eof : 1, b_eof : 1, b_shut : 1, c_bye : 1;
        unsigned lingering : 1; /* refused: alert sent, reading what the client still sends until it closes */
        int verify_status;      /* client certificate verification (GnuTLS status bits), -1: none presented */
        uint64_t bytes_in, bytes_out;
        int chain;
};

struct ioloop {
        hsm_server *srv;
        pthread_t thread;
        struct event_base *base;
        struct event *wake;
        pthread_mutex_t lock;
        struct conn *inbox;
        struct conn *conns; /* established connections on this loop */
        unsigned n_conns;
        int stop;
        uint8_t buf[16384 + 256];
};

struct hsm_server {
        hsm_conf *conf;
        hsm_keystore *ks;
        struct listener *listeners;
        unsigned n_listeners;
        struct event_base *base; /* main thread: accept, ClientHello, signals */
        struct event *ev_term, *ev_int, *ev_usr1, *ev_hup, *ev_drain;
        int draining;
        uint64_t drain_deadline_ns;
        unsigned active; /* atomic: connections from accept to close */

        /* Handshake threads wait in epoll (each its own set) on the
         * listening sockets (EPOLLEXCLUSIVE: one is woken per connection)
         * and on hs_efd, an eventfd semaphore counting the queue below. */
        int hs_efd;
        int drain_efd;    /* becomes readable at drain: stop accepting */
        int stop_efd;     /* becomes readable at exit: finish the queue, end */
        int accept_stopped;
        unsigned accept_acks; /* atomic: threads that stopped accepting */
        int listeners_closed;
        pthread_mutex_t hs_lock;
        struct conn *hs_head, *hs_tail;
        unsigned hs_queued, hs_busy;

        pthread_t *hs_threads;
        unsigned n_hs_threads;

        struct ioloop *loops;
        unsigned n_loops, next_loop;

        uint64_t handshakes_ok, handshakes_failed; /* atomic */
};

/* handshake.c */
void *hsm_handshake_worker(void *arg);
void hsm_handshake_enqueue(hsm_server *s, struct conn *c);

/* proxy.c */
int hsm_ioloop_start(hsm_server *s, struct ioloop *loop);
void hsm_ioloop_stop(struct ioloop *loop);
/* Hands an established connection to a loop (any thread). */
void hsm_ioloop_adopt(struct ioloop *loop, struct conn *c);

/* server.c */
void hsm_conn_free(hsm_server *s, struct conn *c);
/* A connection accept()ed on listener l: limits, then a new conn (NULL if
 * refused; the socket is closed then). */
struct conn *hsm_conn_accepted(struct listener *l, int fd, const struct sockaddr_storage *ss, socklen_t len);
/* Reads the ClientHello record: 1 whole, 0 more to come, -1 dropped (freed). */
int hsm_hello_read(struct conn *c);
/* accept() ran out of descriptors: warn (at most once a second), pause. */
void hsm_out_of_fds(struct listener *l);
/* Lets the main loop wait for the rest of the ClientHello (any thread). */
void hsm_hello_wait(hsm_server *s, struct conn *c);
