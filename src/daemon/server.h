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
/* Reload on SIGHUP (reload.c, README "Reload"): re-reads conf_path and
 * applies state.db's bindings (store, may be NULL) over it; on each commit
 * calls on_reload(arg, the new configuration) on the main loop (for the
 * admin API). log_level_forced >= 0: -l was given, the file's log_level is
 * not applied. Before hsm_server_run. */
struct hsm_store;
void hsm_server_set_reload(hsm_server *s, const char *conf_path, struct hsm_store *store, int log_level_forced,
                           void (*on_reload)(void *arg, const hsm_conf *conf), void *arg);

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

/* ------------------------------------------------ credential changes
 *
 * A listener's credentials (hsm_creds) are an immutable snapshot that a
 * change replaces as a whole. The one way to change them, for the admin
 * API's bindings and for a configuration reload alike:
 *
 *   hsm_server_changes_lock(s);          // changes serialise
 *   ... read the current state (hsm_server_creds), decide the set ...
 *   r = hsm_server_stage(s, set, n, &st, &bad_listener, &bad_chain, &err);
 *   if (r == 0 && persist(...) == 0) hsm_server_stage_commit(s, st);
 *   else hsm_server_stage_abort(st);
 *   hsm_server_changes_unlock(s);
 *
 * or hsm_server_commit() for stage + commit at once. */

/* The complete desired set of chains of one listener: what it serves
 * after the change (chains not listed are no longer served). */
typedef struct hsm_listener_chains {
        const char *listener;         /* the name of a configured listener or connector */
        const hsm_chain_spec *chains; /* in the order GnuTLS prefers them */
        unsigned n_chains;            /* at least 1 */
        /* The settings the credentials are built with (kind, client_ca or
         * ca_file) and the file they come from (for messages); NULL: the
         * listener's current ones. A reload that changes them passes the
         * new configuration's (and makes the listener use it itself). */
        const hsm_conf *conf;
        const hsm_conf_listener *settings;
} hsm_listener_chains;

typedef struct hsm_server_staged hsm_server_staged;

/* Serialises changes: held from reading the current state (and ETags)
 * until the commit or abort. Any thread but a handshake or I/O thread. */
void hsm_server_changes_lock(hsm_server *s);
void hsm_server_changes_unlock(hsm_server *s);
/* hsm_server_changes_lock for the admin API, where a reload's build or
 * another change may be left inside a token that does not answer, holding
 * the lock: it waits while the holder goes on, and gives up once the holder
 * has been in one step of its build or one token call for stuck_ms (and
 * after HSM_CHANGES_WAIT_MAX * stuck_ms in all). what names the change
 * ("POST /v1/changes"). While it holds the lock the thread's token calls
 * are watched (no deadline) so that a later caller is told the token it is
 * inside. Returns 0 (locked), or -ETIMEDOUT with why saying what holds the
 * lock and since when. */
#define HSM_CHANGES_WAIT_MAX 6
int hsm_server_changes_lock_wait(hsm_server *s, unsigned stuck_ms, const char *what, char *why, size_t len);

/* Builds and checks new credentials for every listener of set (n entries,
 * each listener at most once), off the hot path: each chain loaded and
 * checked against its key, one test signature per key, names unique per
 * listener, client_ca/ca_file loaded (hsm_creds_build with
 * HSM_CREDS_TEST_SIGN | HSM_CREDS_LIVE, then hsm_creds_set_trust). Changes
 * nothing that is served. Returns 0 and *ret, or a negative errno code
 * (-ENOENT unknown listener, -EINVAL empty set, else hsm_creds_build's) with
 * *ret_listener (index into set) and *ret_chain (index into its chains, -1:
 * the listener's own settings) naming the culprit and *errmsg why; then
 * nothing was built. ret_listener, ret_chain may be NULL. */
int hsm_server_stage(hsm_server *s, const hsm_listener_chains *set, unsigned n, hsm_server_staged **ret,
                     int *ret_listener, int *ret_chain, char **errmsg);
/* Swaps every staged listener's credentials in (one pointer exchange
 * each; the next handshake gets the new ones), logs each, drops the old
 * references (credentials still used by handshakes in flight and
 * established connections are freed when the last of them ends) and frees
 * st. Cannot fail. */
void hsm_server_stage_commit(hsm_server *s, hsm_server_staged *st);
/* The credentials staged for set[i] (owned by st; to read what will be
 * served, e.g. to persist it before the commit). */
const hsm_creds *hsm_server_staged_creds(const hsm_server_staged *st, unsigned i);
/* Frees what was staged; nothing changes. NULL is accepted. */
void hsm_server_stage_abort(hsm_server_staged *st);
/* hsm_server_stage + hsm_server_stage_commit, all or nothing, under
 * hsm_server_changes_lock (taken here: do not hold it). */
int hsm_server_commit(hsm_server *s, const hsm_listener_chains *set, unsigned n, int *ret_listener, int *ret_chain,
                      char **errmsg);
/* The current credentials of listener name (a reference: hsm_creds_unref
 * it), or NULL when there is no such listener. */
hsm_creds *hsm_server_creds(hsm_server *s, const char *name);
/* Listener i's handshake counters (hsstats.c; lock-free, read them with
 * hsm_hs_get and atomic loads). NULL past the last listener. */
struct hsm_hs_counters;
const struct hsm_hs_counters *hsm_server_listener_handshakes(const hsm_server *s, unsigned i);
