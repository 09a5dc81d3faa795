/* Private to the daemon's server parts (server.c, handshake.c, hspool.c, hspark.c, proxy.c). */
#pragma once

#include <pthread.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <stdint.h>
#include <gnutls/gnutls.h>
#include <event2/event.h>

#include "conf.h"
#include "creds.h"
#include "server.h"
#include "sesscache.h"
#include "token.h"
#include "usage.h"

struct ioloop;

#define EP_KIND(l) ((l)->conf->kind == HSM_CONNECTOR ? "connector" : "listener")

struct listener {
        hsm_server *srv;
        const hsm_conf_listener *conf;
        int fd;
        struct event *ev;
        /* The current credentials: read with hsm_listener_creds() (a
         * reference), replaced by hsm_server_stage_commit(). */
        pthread_mutex_t creds_lock;
        hsm_creds *creds;
        gnutls_priority_t prio;
        gnutls_datum_t ticket_key; /* listeners: session tickets of this listener only (none: session_tickets = no) */
        gnutls_datum_t alpn[16];   /* listeners: the protocols offered (conf->alpn_protos) */
        hsm_sesscache *sesscache;  /* listeners: TLS 1.2 session IDs of this listener only (NULL: session_cache = 0) */
        unsigned active; /* atomic */
        char addr[96];
        /* A connector's server checks (name, serverAuth purpose): GnuTLS
         * keeps a pointer to this array for the life of each session
         * (gnutls_session_set_verify_cert2), so it lives here, not on a
         * stack. */
        gnutls_typed_vdata_st server_checks[2];
        /* Reload (reload.c): LIVE, or RETIRING (removed from the file:
         * no longer accepting, its connections drain), then FREE (drained,
         * the slot may be reused). Written by the main loop only. */
        int state;            /* atomic */
        unsigned retire_gen;  /* the listeners_gen that took it out of the epoll sets */
        uint64_t retire_deadline_ns;
        int kill_now;         /* atomic: drain timeout: the I/O loops close its connections */
        int fd_moved;         /* fd was handed over to the listener that replaced it: not closed here */
        /* Handshakes of this listener's name (hsstats.c): the counters
         * belong to the name, not to the slot (a listener a reload replaces
         * goes on counting in its new slot; a slot reused for another name
         * counts for that name). Set by hsm_listener_setup; atomic. */
        hsm_hs_counters *hs;
        /* A unix socket this slot bound (or took over): its file, so that
         * a socket file of a live listener is never unlinked (bind_listener). */
        dev_t sock_dev;
        ino_t sock_ino;
};

/* Handshake counters by name (server.c), never freed before the server:
 * the store and /metrics hold pointers to them. Main loop only. */
struct hs_name {
        struct hs_name *next;
        hsm_hs_counters hs;
        char name[];
};

enum { LISTENER_LIVE = 0, LISTENER_RETIRING, LISTENER_FREE };

/* Where a connection is in its handshake. Between steps it waits either
 * in the handshake queue (for a thread) or parked on the main loop (for its
 * socket); a thread runs one step and never waits on a peer. */
enum conn_phase {
        PH_HELLO,   /* reading the first record (the ClientHello) */
        PH_CONNECT, /* connector: connecting to the TLS server */
        PH_TLS,     /* gnutls_handshake */
        PH_BACKEND, /* listener: handshake done, connecting to the backend */
};

struct conn {
        struct conn *next, *prev; /* handshake queue or parked list, then the I/O loop's list */
        struct listener *l;
        int cfd, bfd;
        char peer[96];
        struct sockaddr_storage peer_addr;
        gnutls_session_t tls;
        hsm_creds *creds; /* a reference from tls_setup until after gnutls_deinit */
        uint64_t accepted_ns;
        uint64_t deadline_ns; /* end of the handshake */
        uint64_t tls_start_ns;
        enum conn_phase phase;
        struct event *ev_park; /* parked: waiting on park_fd for park_what until park_until_ns */
        int park_fd;
        short park_what;
        uint64_t park_until_ns;
        uint8_t *out; /* a handshake step's output, sent when the step ends */
        size_t out_len, out_off, out_cap;
        unsigned buffering : 1, tls_done : 1;
        int shed; /* the token layer shed one of its operations (hsm_token_watch.shed) */
        int abandoned; /* under its slot's lock: failed by the watchdog while its thread is in the token */
        struct token_overrun *overrun;
        uint8_t *pre; /* bytes read before the handshake (the ClientHello record) */
        size_t pre_len, pre_off;

        struct ioloop *loop;
        struct event *ev_cr, *ev_cw, *ev_br, *ev_bw, *ev_timer;
        struct event *ev_again; /* pump again at the next pass (a busy connection yielded) */
        unsigned armed; /* which of the four events are added */
        uint8_t *c2b, *b2c; /* unsent remainders, malloc'd only while pending */
        size_t c2b_len, c2b_off, b2c_len, b2c_off;
        unsigned c_eof : 1, b_eof : 1, b_shut : 1, c_bye : 1;
        /* A side that ended without a proper end: the TLS peer closed
         * without close_notify (c_cut), the plaintext peer's read failed
         * (b_cut, e.g. a reset). The other side is then reset, not ended. */
        unsigned c_cut : 1, b_cut : 1;
        int b_errno; /* b_cut: the failed read's errno */
        unsigned lingering : 1; /* refused: alert sent, reading what the client still sends until it closes */
        int verify_status;      /* client certificate verification (GnuTLS status bits), -1: none presented */
        uint64_t bytes_in, bytes_out;
        int chain;
};

struct ioloop {
        hsm_server *srv;
        pthread_t thread;
        struct event_base *base;
        struct event *wake; /* on wake_fd */
        int wake_fd;        /* eventfd: the inbox became non-empty, or stop / kill_now */
        pthread_mutex_t lock;
        struct conn *inbox;
        struct conn *conns; /* established connections on this loop */
        unsigned n_conns;
        int stop;
        uint8_t buf[16384 + 256];
};

/* One per handshake thread. c is the connection inside gnutls_handshake on
 * that thread (under lock), for the watchdog on the main loop; watch is
 * the thread's hsm_token_watch (its deadline, the token it is on). */
struct hs_slot {
        hsm_server *srv;
        pthread_t thread;
        pthread_mutex_t lock;
        struct conn *c;
        hsm_token_watch watch;
        /* The CPU gate (hspool.c; under srv->cpu_lock): this thread's
         * place in its queue, and whether it holds a slot. */
        pthread_cond_t gate_cond;
        struct hs_slot *gate_next;
        uint64_t gate_key, gate_since_ns;
        uint64_t gate_key_self; /* accept time of the connection this thread runs */
        int gate_granted, on_cpu;
        int exited; /* atomic */
        int joined;
        int *reg;            /* per listener slot: the fd in this thread's epoll set, -1 none */
        unsigned synced_gen; /* atomic: the listeners_gen its epoll set matches */
};

/* A token whose call outlasted a handshake's deadline (main thread, except
 * stuck: atomic, decremented by the thread when the call returns). */
struct token_overrun {
        hsm_token *token;
        unsigned stuck;
};

/* change_lock's holder is the reload's build (fn describes what it does,
 * under holder_lock, and returns since when it is in its current step, 0:
 * between steps), or none (fn NULL): set after taking it, cleared before
 * releasing it. */
void hsm_server_changes_holder(hsm_server *s, uint64_t (*fn)(void *arg, char *buf, size_t len), void *arg);

struct hsm_server {
        hsm_conf *conf;
        hsm_keystore *ks;
        struct listener *listeners; /* cap_listeners slots, never moved; n_listeners in use (grows at reload) */
        unsigned n_listeners;       /* atomic */
        unsigned cap_listeners;
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

        struct hs_slot *hs_slots;
        unsigned n_hs_threads;
        unsigned threads_left; /* threads inside a token call, not joined at exit */

        /* Parked handshakes (main thread; the inbox under park_lock). */
        pthread_mutex_t park_lock;
        struct conn *park_inbox, *park_inbox_tail;
        struct conn *parked_head, *parked_tail;
        unsigned n_waiting, n_connecting; /* atomic reads; parked on a client / on a connect */
        unsigned waiting_limit;
        int stopping; /* under park_lock: parks are refused (freed) */
        int stop_now; /* a second signal */
        struct event *ev_park_wake, *ev_watchdog, *ev_stop_tick;
        struct token_overrun *overruns;
        unsigned n_overruns;
        unsigned stuck; /* atomic: failed handshakes whose thread is still in the token */

        struct ioloop *loops;
        unsigned n_loops, next_loop;

        pthread_mutex_t change_lock; /* hsm_server_changes_lock: credential changes serialise */
        /* Who holds change_lock (under holder_lock; set and cleared by the
         * holder while it holds change_lock), for a change refused at its
         * wait's deadline (hsm_server_changes_lock_wait). */
        pthread_mutex_t holder_lock;
        char holder[300];                 /* "" : none, or one that does not say */
        uint64_t holder_since_ns;
        uint64_t (*holder_fn)(void *arg, char *buf, size_t len); /* a reload's build: describes its step */
        void *holder_arg;
        hsm_token_watch holder_watch;     /* an admin change: the token its thread is inside */
        bool holder_watched;

        /* Reload (reload.c). */
        const char *conf_path;
        struct hsm_store *store; /* state.db (the admin API's bindings), or NULL */
        int log_level_forced; /* -l given: the file's log_level is not applied */
        void (*on_reload)(void *arg, const hsm_conf *conf);
        void *on_reload_arg;
        hsm_conf **reloaded; /* every configuration a reload loaded (kept: listeners point into them) */
        unsigned n_reloaded;
        int sync_efd;           /* written at each change of the listener table: threads resync their epoll sets */
        int park_efd;           /* the park inbox became non-empty (hsm_handshake_park) */
        unsigned listeners_gen; /* atomic */
        struct event *ev_retire;
        uint64_t reloads_ok, reloads_refused;
        struct reload_job *reload_job; /* main loop: the reload being built (on a thread of its own), or NULL */
        struct event *ev_reload;       /* its progress: the thread activates it, the main loop checks deadlines */
        int reload_again;              /* a SIGHUP came while a reload was built: one more once it ends */
        unsigned reload_left;          /* at exit: a reload's thread left inside a token call */
        struct hs_name *hs_names; /* every listener name configured since start */

        uint64_t handshakes_ok, handshakes_failed; /* atomic */
        uint64_t waiting_closed, token_overruns;   /* atomic */
        /* Handshake steps on the CPU at once (handshake_cpus): a queue in
         * arrival order (accept time) of threads waiting for a slot. */
        pthread_mutex_t cpu_lock;
        unsigned cpu_slots, cpu_busy;
        struct hs_slot *cpu_head;
        struct conn *def_cont_head, *def_cont_tail, *def_new_head, *def_new_tail; /* work waiting for a slot */
        unsigned n_deferred;
        uint64_t cpu_revoked;     /* under cpu_lock: slots taken back from a thread stuck in a token call */
        uint64_t handshakes_shed; /* atomic: failed at once, with an alert, to shed load */
        uint64_t client_waits;    /* atomic: handshakes parked for their client's next flight */
};

/* handshake.c (the steps), hspool.c (queue, CPU gate, threads, watchdog), hspark.c (parked) */
void *hsm_handshake_worker(void *slot);
void hsm_handshake_enqueue(hsm_server *s, struct conn *c);
/* Parks c on the main loop until fd is ready for what (EV_READ/EV_WRITE)
 * or until_ns; then it goes back to the queue (any thread). */
void hsm_handshake_park(hsm_server *s, struct conn *c, int fd, short what, uint64_t until_ns);
/* Main loop: the park inbox (event callback). */
void hsm_handshake_on_park_wake(evutil_socket_t fd, short what, void *arg);
/* Main loop: fails handshakes past their deadline whose thread is inside
 * a token call (alert, close, count, log the token once). */
void hsm_handshake_watchdog(hsm_server *s);
/* Sets up the CPU gate and the threads' hooks (before the threads start). */
void hsm_handshake_sched_init(hsm_server *s, unsigned cpu_slots);
/* One line per token: its admission (limit, queue, shed), and the shed count. */
void hsm_handshake_log_admission(hsm_server *s);
/* At exit: refuse parks from now, free every parked connection. */
void hsm_handshake_unpark_all(hsm_server *s);
/* Threads that are inside a token call (watch.token set). */
unsigned hsm_handshake_in_token(hsm_server *s);

/* proxy.c */
int hsm_ioloop_start(hsm_server *s, struct ioloop *loop);
void hsm_ioloop_stop(struct ioloop *loop);
/* Hands an established connection to a loop (any thread). */
void hsm_ioloop_adopt(struct ioloop *loop, struct conn *c);
/* Makes the loop look at its connections (those of a listener whose drain
 * timed out, kill_now, are closed). */
void hsm_ioloop_wake(struct ioloop *loop);

/* server.c */
/* A listener's slot from its configuration lc (of conf): credentials (cr,
 * taken over; NULL: loaded from the file with hsm_creds_load), priority,
 * bound socket (or donor's, the socket of the listener it replaces, whose
 * options it leaves alone), ticket key, session cache, the name's handshake
 * counters. On failure the slot is cleaned
 * up (hsm_listener_done). */
int hsm_listener_setup(hsm_server *s, struct listener *l, const hsm_conf *conf, const hsm_conf_listener *lc, hsm_creds *cr,
                       const struct listener *donor, char **errmsg);
/* Frees what hsm_listener_setup made (closes the socket if still open). */
void hsm_listener_done(struct listener *l);
/* A reload refused: frees what hsm_listener_setup made for a slot that was
 * never served, and removes the unix socket file it bound (if that file is
 * still its own). Not for a socket taken over (still the donor's). */
void hsm_listener_abort(struct listener *l, const struct listener *donor);
/* Socket options that follow the listener's settings (TCP_DEFER_ACCEPT
 * from handshake_timeout): at bind, and by a reload's commit for a socket
 * taken over (never before: a refused reload leaves live sockets alone). */
void hsm_listener_socket_options(struct listener *l);
/* The handshake counters of listener name (made at first use); NULL: out
 * of memory. Whoever sets listeners up: the start, a reload's build thread
 * (one at a time, under the change lock). */
hsm_hs_counters *hsm_server_hs_counters(hsm_server *s, const char *name);
/* Connectors: the main loop's accept event. */
int hsm_connector_start(hsm_server *s, struct listener *l);
/* Logs "listener X: listening on ..." (at start and when a reload adds one). */
void hsm_listener_log_start(struct listener *l);
/* Handshake thread: brings its epoll set in step with the listener table
 * (listeners LIVE and not draining in, others out), then acknowledges
 * listeners_gen. */
void hsm_listeners_sync(struct hs_slot *slot, int ep);
/* A listener by name, LIVE only. */
struct listener *hsm_find_listener(hsm_server *s, const char *name);

/* reload.c */
/* SIGHUP on the main loop: re-reads conf_path, builds, checks, commits or refuses. */
void hsm_reload(hsm_server *s);
/* Main loop timer: retiring listeners close, drain and free. */
void hsm_reload_retire_tick(evutil_socket_t fd, short what, void *arg);
/* Main loop (ev_reload): the reload being built: its deadline, its commit. */
void hsm_reload_tick(evutil_socket_t fd, short what, void *arg);
/* SIGTERM: a reload being built is refused (nothing of it is applied). */
void hsm_reload_abandon(hsm_server *s, const char *why);
/* At exit, after the main loop: waits briefly for a reload's thread; one
 * still inside a token call is left (reload_left). */
void hsm_reload_stop(hsm_server *s);

/* The listener's current credentials, a reference (any thread). */
hsm_creds *hsm_listener_creds(struct listener *l);
void hsm_conn_free(hsm_server *s, struct conn *c);
/* hsstats.c: one handshake of c's listener ended (ok or not), counted by
 * version, result, resumption and key. HSM_HS_NOTLS: failed, and c->tls
 * must not be read (another thread may be inside it). */
enum { HSM_HS_OK, HSM_HS_FAILED, HSM_HS_NOTLS };
void hsm_hs_count(struct conn *c, int how);
/* A connection accept()ed on listener l: limits, then a new conn (NULL if
 * refused; the socket is closed then). */
struct conn *hsm_conn_accepted(struct listener *l, int fd, const struct sockaddr_storage *ss, socklen_t len);
/* Reads the ClientHello record: 1 whole, 0 more to come, -1 dropped (freed). */
int hsm_hello_read(struct conn *c);
/* accept() ran out of descriptors: warn (at most once a second), pause. */
void hsm_out_of_fds(struct listener *l);
/* true at most once a second for *last (a warning's rate limit; any thread). */
bool hsm_once_a_second(uint64_t *last);
