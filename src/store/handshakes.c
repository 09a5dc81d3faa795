/* Lifetime handshake counts per listener (version, result, resumption) and
 * full handshakes per listener and key, written from the lock-free counters
 * of the listeners (hsm_hs_counters) with the key totals: at every flush,
 * only what changed. */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"

static const char schema[] =
        "CREATE TABLE IF NOT EXISTS handshakes ("
        " listener TEXT NOT NULL, version TEXT NOT NULL, result TEXT NOT NULL, resumed INTEGER NOT NULL,"
        " count INTEGER NOT NULL, updated INTEGER NOT NULL, PRIMARY KEY (listener, version, result, resumed));"
        "CREATE TABLE IF NOT EXISTS listener_keys ("
        " listener TEXT NOT NULL, key TEXT NOT NULL, handshakes INTEGER NOT NULL, updated INTEGER NOT NULL,"
        " PRIMARY KEY (listener, key));";

static int version_of(const char *s)
{
        for (int v = 0; v < HSM_TLSV__MAX; v++)
                if (strcmp(s, hsm_tls_version_name(v)) == 0)
                        return v;
        return -1;
}

static struct tracked_lkey *lkey(struct tracked_listener *t, const char *uri, bool add)
{
        for (unsigned i = 0; i < t->n_keys; i++)
                if (strcmp(t->keys[i].uri, uri) == 0)
                        return &t->keys[i];
        if (!add || t->n_keys >= TRACKED_LISTENER_KEYS)
                return NULL;
        struct tracked_lkey *k = &t->keys[t->n_keys++];
        memset(k, 0, sizeof(*k));
        snprintf(k->uri, sizeof(k->uri), "%s", uri);
        return k;
}

static int load(hsm_store *st, struct tracked_listener *t)
{
        sqlite3_stmt *q = NULL;
        int rc = sqlite3_prepare_v2(st->db, "SELECT version, result, resumed, count FROM handshakes WHERE listener = ?",
                                    -1, &q, NULL);
        if (rc == SQLITE_OK) {
                sqlite3_bind_text(q, 1, t->name, -1, SQLITE_STATIC);
                while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
                        int v = version_of((const char *)sqlite3_column_text(q, 0));
                        const char *res = (const char *)sqlite3_column_text(q, 1);
                        int resumed = sqlite3_column_int(q, 2);
                        if (v < 0 || !res || (strcmp(res, "ok") != 0 && strcmp(res, "error") != 0) || resumed < 0 ||
                            resumed > 1)
                                continue; /* a later version's row: kept, not counted */
                        t->base[v][strcmp(res, "ok") == 0 ? 0 : 1][resumed] = (uint64_t)sqlite3_column_int64(q, 3);
                }
        }
        sqlite3_finalize(q);
        q = NULL;
        if (rc != SQLITE_DONE)
                return -EIO;
        rc = sqlite3_prepare_v2(st->db, "SELECT key, handshakes FROM listener_keys WHERE listener = ?", -1, &q, NULL);
        if (rc == SQLITE_OK) {
                sqlite3_bind_text(q, 1, t->name, -1, SQLITE_STATIC);
                while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
                        struct tracked_lkey *k = lkey(t, (const char *)sqlite3_column_text(q, 0), true);
                        if (k)
                                k->base = k->written = (uint64_t)sqlite3_column_int64(q, 1);
                }
        }
        sqlite3_finalize(q);
        return rc == SQLITE_DONE ? 0 : -EIO;
}

static struct tracked_listener *find(hsm_store *st, const char *name);

int hsm_store_track_listener(hsm_store *st, const char *name, const hsm_hs_counters *c)
{
        pthread_mutex_lock(&st->lock);
        int r = -ENOMEM;
        struct tracked_listener *t0 = find(st, name);
        if (t0) {
                /* Tracked already (at start, or by an earlier reload): the
                 * counters belong to the name, so they are the same ones. */
                t0->c = c;
                pthread_mutex_unlock(&st->lock);
                return 0;
        }
        struct tracked_listener *n = realloc(st->listeners, (st->n_listeners + 1) * sizeof(*n));
        if (!n)
                goto out;
        st->listeners = n;
        struct tracked_listener *t = &n[st->n_listeners];
        memset(t, 0, sizeof(*t));
        t->c = c;
        if (!(t->name = strdup(name)))
                goto out;
        if (hsm_store_exec(st->db, schema) < 0 || load(st, t) < 0) {
                hsm_err("state database: loading the handshakes of listener %s: %s", name, sqlite3_errmsg(st->db));
                free(t->name);
                r = -EIO;
                goto out;
        }
        memcpy(t->written, t->base, sizeof(t->base));
        st->n_listeners++;
        r = 0;
out:
        pthread_mutex_unlock(&st->lock);
        return r;
}

static struct tracked_listener *find(hsm_store *st, const char *name)
{
        for (unsigned i = 0; i < st->n_listeners; i++)
                if (strcmp(st->listeners[i].name, name) == 0)
                        return &st->listeners[i];
        return NULL;
}

int64_t hsm_store_listener_lifetime(hsm_store *st, const char *name, int v, bool ok, bool resumed)
{
        if (v < 0 || v >= HSM_TLSV__MAX)
                return -1;
        pthread_mutex_lock(&st->lock);
        struct tracked_listener *t = find(st, name);
        int64_t r = t ? (int64_t)(t->base[v][ok ? 0 : 1][resumed] + hsm_hs_get(t->c, v, ok, resumed)) : -1;
        pthread_mutex_unlock(&st->lock);
        return r;
}

/* What the counters of key slot i say now (0 for a slot not in use). */
static uint64_t slot_count(const hsm_hs_counters *c, unsigned i, const char **uri)
{
        if (__atomic_load_n(&c->keys[i].state, __ATOMIC_ACQUIRE) != 2)
                return *uri = NULL, 0;
        *uri = c->keys[i].uri;
        return __atomic_load_n(&c->keys[i].handshakes, __ATOMIC_RELAXED);
}

int hsm_store_listener_keys(hsm_store *st, const char *name,
                            void (*cb)(const char *uri, uint64_t since_start, uint64_t lifetime, void *ud), void *ud)
{
        pthread_mutex_lock(&st->lock);
        struct tracked_listener *t = find(st, name);
        if (!t) {
                pthread_mutex_unlock(&st->lock);
                return -ENOENT;
        }
        int n = 0;
        bool shown[TRACKED_LISTENER_KEYS] = { false };
        for (unsigned i = 0; i < HSM_HS_KEYS; i++) {
                const char *uri;
                uint64_t now = slot_count(t->c, i, &uri);
                if (!uri)
                        continue;
                struct tracked_lkey *k = lkey(t, uri, false);
                if (k)
                        shown[k - t->keys] = true;
                cb(uri, now, now + (k ? k->base : 0), ud);
                n++;
        }
        for (unsigned i = 0; i < t->n_keys; i++)
                if (!shown[i] && t->keys[i].base) {
                        cb(t->keys[i].uri, 0, t->keys[i].base, ud);
                        n++;
                }
        pthread_mutex_unlock(&st->lock);
        return n;
}

static int upsert_hs(sqlite3_stmt *q, const char *name, int v, int res, int resumed, uint64_t count, int64_t now)
{
        sqlite3_reset(q);
        sqlite3_bind_text(q, 1, name, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 2, hsm_tls_version_name(v), -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 3, res ? "error" : "ok", -1, SQLITE_STATIC);
        sqlite3_bind_int(q, 4, resumed);
        sqlite3_bind_int64(q, 5, (int64_t)count);
        sqlite3_bind_int64(q, 6, now);
        return sqlite3_step(q) == SQLITE_DONE ? 0 : -EIO;
}

/* The flush's transaction, begun at the first row that changed. */
static int begin_once(hsm_store *st, bool *begun)
{
        if (*begun)
                return 0;
        if (hsm_store_exec(st->db, "BEGIN") < 0)
                return -EIO;
        *begun = true;
        return 0;
}

int hsm_store_flush_listeners_locked(hsm_store *st)
{
        if (!st->n_listeners)
                return 0;
        sqlite3_stmt *qh = NULL, *qk = NULL;
        bool begun = false;
        int r = 0;
        int64_t now = (int64_t)time(NULL);
        /* What is written, to be undone when the transaction fails. */
        size_t wsize = st->n_listeners * sizeof(struct tracked_listener);
        struct tracked_listener *undo = malloc(wsize);
        if (!undo)
                return -ENOMEM;
        memcpy(undo, st->listeners, wsize);
        for (unsigned i = 0; i < st->n_listeners && r == 0; i++) {
                struct tracked_listener *t = &st->listeners[i];
                for (int v = 0; v < HSM_TLSV__MAX && r == 0; v++)
                        for (int res = 0; res < 2 && r == 0; res++)
                                for (int rs = 0; rs < 2 && r == 0; rs++) {
                                        uint64_t c = t->base[v][res][rs] + hsm_hs_get(t->c, v, !res, rs);
                                        if (c == t->written[v][res][rs])
                                                continue;
                                        if ((r = begin_once(st, &begun)) < 0)
                                                break;
                                        if (!qh && sqlite3_prepare_v2(st->db,
                                                                      "INSERT INTO handshakes VALUES (?, ?, ?, ?, ?, ?)"
                                                                      " ON CONFLICT (listener, version, result, resumed)"
                                                                      " DO UPDATE SET count = excluded.count,"
                                                                      " updated = excluded.updated",
                                                                      -1, &qh, NULL) != SQLITE_OK) {
                                                r = -EIO;
                                                break;
                                        }
                                        r = upsert_hs(qh, t->name, v, res, rs, c, now);
                                        t->written[v][res][rs] = c;
                                }
                for (unsigned j = 0; j < HSM_HS_KEYS && r == 0; j++) {
                        const char *uri;
                        uint64_t c = slot_count(t->c, j, &uri);
                        struct tracked_lkey *k = uri ? lkey(t, uri, true) : NULL;
                        if (!k || k->base + c == k->written)
                                continue;
                        if ((r = begin_once(st, &begun)) < 0)
                                break;
                        if (!qk && sqlite3_prepare_v2(st->db,
                                                      "INSERT INTO listener_keys VALUES (?, ?, ?, ?)"
                                                      " ON CONFLICT (listener, key) DO UPDATE SET"
                                                      " handshakes = excluded.handshakes, updated = excluded.updated",
                                                      -1, &qk, NULL) != SQLITE_OK) {
                                r = -EIO;
                                break;
                        }
                        sqlite3_reset(qk);
                        sqlite3_bind_text(qk, 1, t->name, -1, SQLITE_STATIC);
                        sqlite3_bind_text(qk, 2, k->uri, -1, SQLITE_STATIC);
                        sqlite3_bind_int64(qk, 3, (int64_t)(k->base + c));
                        sqlite3_bind_int64(qk, 4, now);
                        if (sqlite3_step(qk) != SQLITE_DONE)
                                r = -EIO;
                        k->written = k->base + c;
                }
        }
        sqlite3_finalize(qh);
        sqlite3_finalize(qk);
        if (begun) {
                if (r < 0)
                        hsm_err("state database: writing handshake totals: %s", sqlite3_errmsg(st->db));
                else if (hsm_store_exec(st->db, "COMMIT") < 0)
                        r = -EIO;
                if (r < 0) {
                        hsm_store_exec(st->db, "ROLLBACK");
                        /* Nothing was written: the next flush tries again. */
                        memcpy(st->listeners, undo, wsize);
                } else
                        st->flushes++;
        }
        free(undo);
        return r;
}

void hsm_store_free_listeners(hsm_store *st)
{
        for (unsigned i = 0; i < st->n_listeners; i++)
                free(st->listeners[i].name);
        free(st->listeners);
        st->listeners = NULL;
        st->n_listeners = 0;
}
