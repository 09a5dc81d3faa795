/* Private to src/store. */
#pragma once

#include <pthread.h>
#include <sqlite3.h>

#include "store.h"
#include "usage.h"

struct tracked_slot {
        uint64_t count, total_ns, max_ns;
};

struct tracked {
        char *token, *key;
        hsm_usage *u;
        struct tracked_slot base[HSM_OP__MAX][HSM_MECH__MAX][HSM_RESULT__MAX];    /* earlier runs */
        struct tracked_slot written[HSM_OP__MAX][HSM_MECH__MAX][HSM_RESULT__MAX]; /* last flushed */
        /* The failures by reason (table usage_failures), the same way. */
        uint64_t fail_base[HSM_OP__MAX][HSM_MECH__MAX][HSM_REASON__MAX];
        uint64_t fail_written[HSM_OP__MAX][HSM_MECH__MAX][HSM_REASON__MAX];
};

/* A listener's handshake counters (handshakes.c). */
#define TRACKED_LISTENER_KEYS 64
struct tracked_listener {
        char *name;
        const hsm_hs_counters *c;
        uint64_t base[HSM_TLSV__MAX][2][2], written[HSM_TLSV__MAX][2][2];
        struct tracked_lkey {
                char uri[HSM_HS_URI];
                uint64_t base, written;
        } keys[TRACKED_LISTENER_KEYS];
        unsigned n_keys;
};

struct hsm_store {
        char *dir;
        sqlite3 *db;
        pthread_mutex_t lock; /* the connection and everything below */
        struct tracked *keys;
        unsigned n_keys;
        uint64_t flushes;
        struct tracked_listener *listeners;
        unsigned n_listeners;

        pthread_mutex_t wlock; /* the writer's wake-up */
        pthread_cond_t wcond;
        pthread_t writer;
        bool running, stop;
        bool readonly; /* hsm_store_open_readonly: nothing is written */
        bool busy_said; /* the writer logged that another process holds the write lock */
        unsigned interval_ms;
};

/* Runs SQL without results; logs and returns -EIO on failure. */
int hsm_store_exec(sqlite3 *db, const char *sql);
/* The audit schema (audit.c), created by hsm_store_open. */
extern const char hsm_store_audit_schema[];
extern const char hsm_store_certs_schema[]; /* certs.c */
extern const char hsm_store_bindings_schema[]; /* bindings.c */

/* handshakes.c: writes the tracked listeners' counters (under st->lock);
 * frees them at close. */
int hsm_store_flush_listeners_locked(hsm_store *st);
void hsm_store_free_listeners(hsm_store *st);
