/* hsmtlsd server mode: listeners, the handshake pool and the I/O loops. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include <gnutls/gnutls.h>

#include "conf.h"
#include "creds.h"

typedef struct hsm_server hsm_server;

/* Loads every listener's credentials and binds its socket. */
int hsm_server_new(hsm_conf *conf, hsm_keystore *ks, hsm_server **ret, char **errmsg);
/* Runs until SIGTERM or SIGINT, then drains: no new connections, in-flight
 * handshakes finish (each within its deadline), established connections
 * get drain_timeout to end. A second signal stops at once. */
int hsm_server_run(hsm_server *s);
/* After hsm_server_run: handshake threads still inside a token call, not
 * joined. Then the process must end with _exit() (after logging), without
 * hsm_server_free() or unloading the tokens under those threads. */
unsigned hsm_server_threads_left(const hsm_server *s);
void hsm_server_free(hsm_server *s);

/* Handshake counters and gauges, for the log and for health reports. */
typedef struct hsm_server_stats {
        uint64_t completed, failed;
        unsigned running;        /* on a handshake thread now */
        unsigned in_token;       /* of those, inside a token call */
        unsigned waiting;        /* parked, waiting on their client */
        unsigned connecting;     /* parked, connecting to a backend or server */
        unsigned waiting_limit;  /* max_waiting_handshakes */
        uint64_t waiting_closed; /* closed because of that limit */
        uint64_t token_overruns; /* failed at their deadline while inside a token call */
        unsigned stuck;          /* of those, calls that have not returned yet */
} hsm_server_stats;
void hsm_server_get_stats(hsm_server *s, hsm_server_stats *ret);
/* One "handshakes: completed=N failed=N ..." line. */
void hsm_server_log_stats(hsm_server *s);
/* The listener's GnuTLS priority (with +RSA when rsa_key_exchange is on). */
int hsm_listener_priority(const hsm_conf *c, const hsm_conf_listener *l, gnutls_priority_t *ret, char **errmsg);
/* One log line per key, operation, mechanism and result. */
void hsm_server_log_usage(hsm_server *s);

/* Read-only views for the admin API (any thread). */
typedef struct hsm_listener_info {
        const char *name, *kind, *address; /* owned by the server */
        bool serving;                      /* accepting (not draining) */
        unsigned connections;              /* from accept to close */
} hsm_listener_info;
unsigned hsm_server_n_listeners(const hsm_server *s);
int hsm_server_listener_info(const hsm_server *s, unsigned i, hsm_listener_info *ret);
void hsm_server_handshakes(const hsm_server *s, uint64_t *ok, uint64_t *failed);
/* Listener i's handshake counters (hsstats.c; lock-free, read them with
 * hsm_hs_get and atomic loads). NULL past the last listener. */
struct hsm_hs_counters;
const struct hsm_hs_counters *hsm_server_listener_handshakes(const hsm_server *s, unsigned i);
