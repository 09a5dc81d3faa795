/* The state database of hsmtlsd: one SQLite file (WAL) in the state
 * directory. Holds the lifetime usage totals of every key (written from the
 * lock-free in-memory counters by a thread of its own, at least every
 * interval and at close: the hot path never waits for it) and the audit log,
 * whose every record carries the SHA-256 of the one before. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "hsmtls.h"

typedef struct hsm_store hsm_store;

/* Opens DIR/state.db, creating DIR (mode 0700) and the database (0600) when
 * missing; refuses a DIR that others may write to. Loads nothing yet. */
int hsm_store_open(const char *dir, hsm_store **ret, char **errmsg);
/* Opens DIR/state.db read-only (hsmtlsd --check: the bindings and
 * certificates it holds): -ENOENT when there is none. Changes nothing. */
int hsm_store_open_readonly(const char *dir, hsm_store **ret, char **errmsg);
/* Stops the writer (after a last flush) and closes. NULL is accepted. */
void hsm_store_close(hsm_store *st);

/* Tracks the counters u of a key, named by its token's configuration name
 * and its URI; loads what earlier runs counted for it. Any thread, also
 * after start. A key tracked already under that name and URI with other
 * counters (its token opened again by a reload) goes on with u, what the
 * old counters held kept in its totals. */
int hsm_store_track(hsm_store *st, const char *token, const char *key, hsm_usage *u);
/* Starts the writer thread: a flush every interval_ms (and at close). */
int hsm_store_start(hsm_store *st, unsigned interval_ms);
/* Writes every tracked key's totals now (any thread). */
int hsm_store_flush(hsm_store *st);
/* Lifetime count of one counter of a tracked key: earlier runs plus this
 * one; -1 in *ret when the key is not tracked. */
int64_t hsm_store_lifetime(hsm_store *st, const char *token, const char *key, enum hsm_op op, enum hsm_mech mech,
                           enum hsm_result res);
/* Lifetime failures of a tracked key by operation, mechanism and reason
 * (hsm_usage_failures() plus earlier runs) in ret; -ENOENT (ret untouched)
 * when the key is not tracked. Rows of a state.db from a version without
 * reasons: their errors are in hsm_store_lifetime() only. */
int hsm_store_failure_lifetimes(hsm_store *st, const char *token, const char *key,
                                uint64_t ret[HSM_OP__MAX][HSM_MECH__MAX][HSM_REASON__MAX]);
/* Tracks a listener's handshake counters c (hsm_hs_counters, usage.h)
 * under its name, loading what earlier runs counted; may be called after
 * start, and again for a name tracked already (c then replaces its
 * counters: the daemon's belong to the name, so they are the same). Written
 * with the key totals. */
struct hsm_hs_counters;
int hsm_store_track_listener(hsm_store *st, const char *name, const struct hsm_hs_counters *c);
/* Lifetime handshakes of a tracked listener by version (enum
 * hsm_tls_version), result and resumption; -1 when not tracked. */
int64_t hsm_store_listener_lifetime(hsm_store *st, const char *name, int version, bool ok, bool resumed);
/* Calls cb for each key with full handshakes on the listener, in this run
 * or an earlier one: its URI, since start and lifetime. */
int hsm_store_listener_keys(hsm_store *st, const char *name,
                            void (*cb)(const char *uri, uint64_t since_start, uint64_t lifetime, void *ud), void *ud);
/* Number of flushes that wrote something (tests, metrics). */
uint64_t hsm_store_flushes(hsm_store *st);

/* ------------------------------------------------------------ certificates */

/* A chain uploaded through the admin API: fp the SHA-256 of the leaf's DER
 * (hex), the token and key id (hex) of its key, where it is kept ("state",
 * "token,state"), the PEM. -EEXIST when fp is already stored. */
int hsm_store_cert_add(hsm_store *st, const char *fp, const char *token, const char *key_id, const char *stored,
                       const char *pem);
typedef int (*hsm_cert_cb)(const char *fp, const char *token, const char *key_id, const char *stored, const char *pem,
                           void *userdata);
/* Calls cb for every stored chain (or only fp's); returns how many. */
int hsm_store_cert_list(hsm_store *st, const char *only_fp, hsm_cert_cb cb, void *userdata);
/* -ENOENT when fp is not stored. */
int hsm_store_cert_delete(hsm_store *st, const char *fp);

/* ------------------------------------------------------------ bindings */

/* One row of a listener's bindings, once the API changed them; the rows
 * are in the order the chains are served. kind "api": a chain bound
 * through the API (certificate: the fingerprint of a stored chain; names:
 * a JSON array of the names given, "" for the leaf's own); "config": where
 * a configuration file chain (by fingerprint) is; "tombstone": a
 * configuration file chain the API unbound or replaced. */
typedef struct hsm_store_binding {
        const char *certificate;
        const char *names;
        const char *kind;
} hsm_store_binding;
/* Replaces every row of listener with rows (in order), in one transaction:
 * all or nothing. */
int hsm_store_bindings_set(hsm_store *st, const char *listener, const hsm_store_binding *rows, unsigned n);
/* The same for several listeners (a change of the admin API that touches
 * them all), in one transaction: a restart sees all of it or none. */
typedef struct hsm_store_listener_rows {
        const char *listener;
        const hsm_store_binding *rows;
        unsigned n;
} hsm_store_listener_rows;
int hsm_store_bindings_set_many(hsm_store *st, const hsm_store_listener_rows *ls, unsigned n);
typedef int (*hsm_binding_cb)(const char *listener, const hsm_store_binding *b, void *userdata);
/* Calls cb for every row (of listener, or all), in order; returns how many.
 * A non-zero cb return stops. */
int hsm_store_bindings_list(hsm_store *st, const char *listener, hsm_binding_cb cb, void *userdata);

/* ------------------------------------------------------------ audit */

typedef struct hsm_audit_record {
        int64_t seq;
        const char *time; /* RFC 3339 UTC, milliseconds */
        const char *who, *peer, *method, *path, *action;
        int status;
        const char *detail;
        const char *prev_sha256, *sha256; /* hex */
} hsm_audit_record;

/* Appends one record (synchronously: it is on disk when this returns).
 * Strings may be NULL (stored as ""). *ret_seq (may be NULL) gets its seq. */
int hsm_store_audit(hsm_store *st, const char *who, const char *peer, const char *method, const char *path,
                    const char *action, int status, const char *detail, int64_t *ret_seq);

/* Before a change: appends the record that it is about to be made
 * (action "change.begin", status 0, its who, peer, method and path), in
 * the one transaction that orders the chain (waiting at most wait_ms for
 * another writer). A change is made only after this succeeded, so that
 * none is without its record; its outcome is appended after it. 0,
 * -EBUSY (another process holds the lock), -EROFS (read-only), -EIO; why
 * says it (logged here). */
int hsm_store_audit_begin(hsm_store *st, unsigned wait_ms, const char *who, const char *peer, const char *method,
                          const char *path, int64_t *ret_seq, char *why, size_t why_size);

/* Calls cb for records with seq > after, oldest first, at most limit;
 * returns how many, or a negative errno code. A non-zero cb return stops. */
typedef int (*hsm_audit_cb)(const hsm_audit_record *r, void *userdata);
int hsm_store_audit_list(hsm_store *st, int64_t after, unsigned limit, hsm_audit_cb cb, void *userdata);

typedef struct hsm_audit_check {
        uint64_t records;
        int64_t first_bad; /* seq of the first record that does not check, or 0 */
        char reason[256];
} hsm_audit_check;
/* Checks the chain: seq 1, 2, 3... without gaps, each record's SHA-256
 * recomputed from its fields and the previous record's SHA-256, and the last
 * record is the head recorded at the last append. 0: intact; -EBADMSG:
 * broken (ret says where and why); another negative errno: cannot read. */
int hsm_store_audit_verify(hsm_store *st, hsm_audit_check *ret);
/* The same on DIR/state.db opened read-only (hsmtlsd --check-audit DIR). */
int hsm_audit_check_dir(const char *dir, hsm_audit_check *ret, char **errmsg);
