#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

static const char usage_schema[] =
        "CREATE TABLE IF NOT EXISTS usage ("
        " token TEXT NOT NULL, key TEXT NOT NULL, op TEXT NOT NULL, mech TEXT NOT NULL, result TEXT NOT NULL,"
        " count INTEGER NOT NULL, total_ns INTEGER NOT NULL, max_ns INTEGER NOT NULL, updated INTEGER NOT NULL,"
        " PRIMARY KEY (token, key, op, mech, result));"
        /* The errors of usage by reason (enum hsm_reason, by name); a
         * state.db from before has no such table: made here, empty. */
        "CREATE TABLE IF NOT EXISTS usage_failures ("
        " token TEXT NOT NULL, key TEXT NOT NULL, op TEXT NOT NULL, mech TEXT NOT NULL, reason TEXT NOT NULL,"
        " count INTEGER NOT NULL, updated INTEGER NOT NULL, PRIMARY KEY (token, key, op, mech, reason));";

int hsm_store_exec(sqlite3 *db, const char *sql)
{
        char *e = NULL;
        if (sqlite3_exec(db, sql, NULL, NULL, &e) != SQLITE_OK) {
                hsm_err("state database: %s (in: %.60s)", e ? e : sqlite3_errmsg(db), sql);
                sqlite3_free(e);
                return -EIO;
        }
        return 0;
}

static int make_dir(const char *dir, char **errmsg)
{
        struct stat sb;
        if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
                int r = -errno;
                hsm_set_error(errmsg, "state directory %s: cannot create it: %s", dir, strerror(errno));
                return r;
        }
        /* Never through a link: it is opened as root, and SQLite would
         * refuse it (SQLITE_OPEN_NOFOLLOW) with a vaguer message. */
        if (lstat(dir, &sb) == 0 && S_ISLNK(sb.st_mode)) {
                hsm_set_error(errmsg, "state directory %s: cannot open it without following a link: it is a symbolic link "
                                      "(name the directory it points to)", dir);
                return -ELOOP;
        }
        if (stat(dir, &sb) < 0 || !S_ISDIR(sb.st_mode)) {
                hsm_set_error(errmsg, "state directory %s: not a directory", dir);
                return -ENOTDIR;
        }
        if (sb.st_mode & 022) {
                hsm_set_error(errmsg, "state directory %s: others may write to it (mode %04o; make it 0700)", dir,
                              (unsigned)(sb.st_mode & 07777));
                return -EPERM;
        }
        return 0;
}

static int open_db(const char *dir, bool readonly, sqlite3 **ret, char **errmsg)
{
        char *path = NULL;
        if (asprintf(&path, "%s/state.db", dir) < 0)
                return -ENOMEM;
        if (!readonly) {
                /* Create it 0600 ourselves: SQLite would use 0644, and gives
                 * its -wal and -shm files the database file's mode. */
                int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
                if (fd < 0) {
                        int r = -errno;
                        hsm_set_error(errmsg, "state database %s: %s", path,
                                      errno == ELOOP ? "is a symbolic link (refused: the state directory's files are "
                                                       "opened as they are, never followed elsewhere)"
                                                     : strerror(errno));
                        free(path);
                        return r;
                }
                struct stat sb;
                bool ok = fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode) && sb.st_nlink == 1;
                close(fd);
                if (!ok) {
                        hsm_set_error(errmsg, "state database %s: not a regular file with one name (refused)", path);
                        free(path);
                        return -EPERM;
                }
        }
        /* SQLite's -wal and -shm beside it: never links either (SQLite
         * would follow them when it opens them). */
        static const char *const sfx[] = { "-wal", "-shm", "-journal" };
        for (size_t i = 0; i < sizeof(sfx) / sizeof(sfx[0]); i++) {
                char *side = NULL;
                struct stat sb;
                if (asprintf(&side, "%s%s", path, sfx[i]) < 0) {
                        free(path);
                        return -ENOMEM;
                }
                bool bad = lstat(side, &sb) == 0 && (!S_ISREG(sb.st_mode) || sb.st_nlink != 1);
                if (bad)
                        hsm_set_error(errmsg, "state database %s: not a regular file with one name (refused)", side);
                free(side);
                if (bad) {
                        free(path);
                        return -EPERM;
                }
        }
        sqlite3 *db = NULL;
        int flags = (readonly ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE) | SQLITE_OPEN_NOFOLLOW;
        int rc = sqlite3_open_v2(path, &db, flags | SQLITE_OPEN_FULLMUTEX, NULL);
        if (rc != SQLITE_OK) {
                hsm_set_error(errmsg, "state database %s: %s", path, db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
                sqlite3_close(db);
                free(path);
                return -EIO;
        }
        free(path);
        sqlite3_busy_timeout(db, 5000);
        *ret = db;
        return 0;
}

int hsm_store_open(const char *dir, hsm_store **ret, char **errmsg)
{
        int r = make_dir(dir, errmsg);
        if (r < 0)
                return r;
        hsm_store *st = calloc(1, sizeof(*st));
        if (!st || !(st->dir = strdup(dir))) {
                free(st);
                return -ENOMEM;
        }
        pthread_mutex_init(&st->lock, NULL);
        pthread_mutex_init(&st->wlock, NULL);
        pthread_cond_init(&st->wcond, NULL);
        r = open_db(dir, false, &st->db, errmsg);
        if (r < 0)
                goto fail;
        /* WAL: the writer's commits do not block readers; synchronous=NORMAL
         * loses nothing when the process dies (only when the OS does). */
        if (hsm_store_exec(st->db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;") < 0 ||
            hsm_store_exec(st->db, usage_schema) < 0 || hsm_store_exec(st->db, hsm_store_audit_schema) < 0 ||
            hsm_store_exec(st->db, hsm_store_certs_schema) < 0 || hsm_store_exec(st->db, hsm_store_bindings_schema) < 0) {
                hsm_set_error(errmsg, "state database %s/state.db: %s", dir, sqlite3_errmsg(st->db));
                r = -EIO;
                goto fail;
        }
        *ret = st;
        return 0;
fail:
        hsm_store_close(st);
        return r;
}

int hsm_store_open_readonly(const char *dir, hsm_store **ret, char **errmsg)
{
        char path[4096];
        snprintf(path, sizeof(path), "%s/state.db", dir);
        if (access(path, F_OK) < 0)
                return errno == ENOENT ? -ENOENT : -errno;
        if (access(path, R_OK) < 0)
                return -EACCES;
        hsm_store *st = calloc(1, sizeof(*st));
        if (!st || !(st->dir = strdup(dir))) {
                free(st);
                return -ENOMEM;
        }
        st->readonly = true;
        pthread_mutex_init(&st->lock, NULL);
        pthread_mutex_init(&st->wlock, NULL);
        pthread_cond_init(&st->wcond, NULL);
        int r = open_db(dir, true, &st->db, errmsg);
        if (r < 0) {
                hsm_store_close(st);
                return r;
        }
        *ret = st;
        return 0;
}

static int lookup_enum(const char *s, const char *(*name)(int), int max)
{
        for (int i = 0; i < max; i++)
                if (strcmp(s, name(i)) == 0)
                        return i;
        return -1;
}

static const char *op_name(int i) { return hsm_op_name(i); }
static const char *mech_name(int i) { return hsm_mech_name(i); }
static const char *result_name(int i) { return hsm_result_name(i); }
static const char *reason_name(int i) { return hsm_reason_name(i); }

/* What earlier runs counted of the failures of key on token (t->fail_base).
 * Returns an SQLite result code: SQLITE_DONE when all was read. */
static int load_failures(hsm_store *st, struct tracked *t)
{
        sqlite3_stmt *q = NULL;
        int rc = sqlite3_prepare_v2(st->db, "SELECT op, mech, reason, count FROM usage_failures WHERE token = ? AND key = ?",
                                    -1, &q, NULL);
        if (rc != SQLITE_OK)
                return rc;
        sqlite3_bind_text(q, 1, t->token, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 2, t->key, -1, SQLITE_STATIC);
        while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
                int o = lookup_enum((const char *)sqlite3_column_text(q, 0), op_name, HSM_OP__MAX);
                int m = lookup_enum((const char *)sqlite3_column_text(q, 1), mech_name, HSM_MECH__MAX);
                int w = lookup_enum((const char *)sqlite3_column_text(q, 2), reason_name, HSM_REASON__MAX);
                if (o < 0 || m < 0 || w <= HSM_REASON_NONE)
                        continue; /* written by a later version: kept in the table, not counted */
                t->fail_base[o][m][w] = (uint64_t)sqlite3_column_int64(q, 3);
        }
        sqlite3_finalize(q);
        return rc;
}

int hsm_store_track(hsm_store *st, const char *token, const char *key, hsm_usage *u)
{
        pthread_mutex_lock(&st->lock);
        /* Tracked already: the same token name and URI on a token that a
         * reload opened again. The counts so far go on from the new key's. */
        for (unsigned i = 0; i < st->n_keys; i++) {
                struct tracked *t = &st->keys[i];
                if (strcmp(t->token, token) != 0 || strcmp(t->key, key) != 0)
                        continue;
                if (t->u != u) {
                        hsm_usage_entry e[HSM_OP__MAX * HSM_MECH__MAX * HSM_RESULT__MAX];
                        int n = hsm_usage_snapshot(t->u, e, (int)(sizeof(e) / sizeof(e[0])));
                        for (int j = 0; j < n; j++) {
                                struct tracked_slot *b = &t->base[e[j].op][e[j].mech][e[j].result];
                                b->count += e[j].count;
                                b->total_ns += e[j].total_ns;
                                if (e[j].max_ns > b->max_ns)
                                        b->max_ns = e[j].max_ns;
                        }
                        for (int o = 0; o < HSM_OP__MAX; o++)
                                for (int m = 0; m < HSM_MECH__MAX; m++)
                                        for (int w = HSM_REASON_NONE + 1; w < HSM_REASON__MAX; w++)
                                                t->fail_base[o][m][w] += hsm_usage_failures(t->u, o, m, w);
                        t->u = u;
                }
                pthread_mutex_unlock(&st->lock);
                return 0;
        }
        struct tracked *n = realloc(st->keys, (st->n_keys + 1) * sizeof(*n));
        if (!n) {
                pthread_mutex_unlock(&st->lock);
                return -ENOMEM;
        }
        st->keys = n;
        struct tracked *t = &st->keys[st->n_keys];
        memset(t, 0, sizeof(*t));
        t->token = strdup(token);
        t->key = strdup(key);
        t->u = u;
        if (!t->token || !t->key) {
                free(t->token);
                free(t->key);
                pthread_mutex_unlock(&st->lock);
                return -ENOMEM;
        }
        sqlite3_stmt *q = NULL;
        int rc = sqlite3_prepare_v2(st->db,
                                    "SELECT op, mech, result, count, total_ns, max_ns FROM usage WHERE token = ? AND key = ?",
                                    -1, &q, NULL);
        if (rc == SQLITE_OK) {
                sqlite3_bind_text(q, 1, token, -1, SQLITE_STATIC);
                sqlite3_bind_text(q, 2, key, -1, SQLITE_STATIC);
                while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
                        int o = lookup_enum((const char *)sqlite3_column_text(q, 0), op_name, HSM_OP__MAX);
                        int m = lookup_enum((const char *)sqlite3_column_text(q, 1), mech_name, HSM_MECH__MAX);
                        int s = lookup_enum((const char *)sqlite3_column_text(q, 2), result_name, HSM_RESULT__MAX);
                        if (o < 0 || m < 0 || s < 0)
                                continue; /* written by a later version: kept in the table, not counted */
                        t->base[o][m][s] = (struct tracked_slot){ (uint64_t)sqlite3_column_int64(q, 3),
                                                                  (uint64_t)sqlite3_column_int64(q, 4),
                                                                  (uint64_t)sqlite3_column_int64(q, 5) };
                }
        }
        sqlite3_finalize(q);
        if (rc == SQLITE_DONE)
                rc = load_failures(st, t);
        if (rc != SQLITE_DONE) {
                hsm_err("state database: loading the usage of %s on token %s: %s", key, token, sqlite3_errmsg(st->db));
                pthread_mutex_unlock(&st->lock);
                free(t->token);
                free(t->key);
                return -EIO;
        }
        memcpy(t->written, t->base, sizeof(t->base));
        memcpy(t->fail_written, t->fail_base, sizeof(t->fail_base));
        st->n_keys++;
        pthread_mutex_unlock(&st->lock);
        return 0;
}

/* The failure counts that changed since the last flush, in the transaction
 * flush_locked() began (or begins it: *begun). */
static int flush_failures_locked(hsm_store *st, bool *begun, int64_t now)
{
        sqlite3_stmt *q = NULL;
        int r = 0;
        for (unsigned i = 0; i < st->n_keys && r == 0; i++) {
                struct tracked *t = &st->keys[i];
                for (int o = 0; o < HSM_OP__MAX; o++)
                        for (int m = 0; m < HSM_MECH__MAX; m++)
                                for (int w = HSM_REASON_NONE + 1; w < HSM_REASON__MAX && r == 0; w++) {
                                        uint64_t v = t->fail_base[o][m][w] + hsm_usage_failures(t->u, o, m, w);
                                        if (v == t->fail_written[o][m][w] || (!v && t->fail_written[o][m][w] == UINT64_MAX))
                                                continue;
                                        t->fail_written[o][m][w] = v; /* undone by flush_locked() if it fails */
                                        if (!*begun) {
                                                if (hsm_store_exec(st->db, "BEGIN") < 0)
                                                        return -EIO;
                                                *begun = true;
                                        }
                                        if (!q && sqlite3_prepare_v2(st->db,
                                                                     "INSERT INTO usage_failures (token, key, op, mech,"
                                                                     " reason, count, updated) VALUES (?, ?, ?, ?, ?, ?, ?)"
                                                                     " ON CONFLICT (token, key, op, mech, reason) DO UPDATE"
                                                                     " SET count = excluded.count, updated = excluded.updated",
                                                                     -1, &q, NULL) != SQLITE_OK) {
                                                r = -EIO;
                                                break;
                                        }
                                        sqlite3_reset(q);
                                        sqlite3_bind_text(q, 1, t->token, -1, SQLITE_STATIC);
                                        sqlite3_bind_text(q, 2, t->key, -1, SQLITE_STATIC);
                                        sqlite3_bind_text(q, 3, hsm_op_name(o), -1, SQLITE_STATIC);
                                        sqlite3_bind_text(q, 4, hsm_mech_name(m), -1, SQLITE_STATIC);
                                        sqlite3_bind_text(q, 5, hsm_reason_name(w), -1, SQLITE_STATIC);
                                        sqlite3_bind_int64(q, 6, (int64_t)v);
                                        sqlite3_bind_int64(q, 7, now);
                                        if (sqlite3_step(q) != SQLITE_DONE)
                                                r = -EIO;
                                }
        }
        sqlite3_finalize(q);
        return r;
}

static int flush_locked(hsm_store *st)
{
        hsm_usage_entry e[HSM_OP__MAX * HSM_MECH__MAX * HSM_RESULT__MAX];
        sqlite3_stmt *q = NULL;
        bool begun = false;
        int r = 0;
        int64_t now = (int64_t)time(NULL);
        for (unsigned i = 0; i < st->n_keys; i++) {
                struct tracked *t = &st->keys[i];
                int n = hsm_usage_snapshot(t->u, e, (int)(sizeof(e) / sizeof(e[0])));
                for (int j = 0; j < n; j++) {
                        struct tracked_slot *b = &t->base[e[j].op][e[j].mech][e[j].result];
                        struct tracked_slot *w = &t->written[e[j].op][e[j].mech][e[j].result];
                        struct tracked_slot v = { b->count + e[j].count, b->total_ns + e[j].total_ns,
                                                  e[j].max_ns > b->max_ns ? e[j].max_ns : b->max_ns };
                        if (v.count == w->count && v.max_ns == w->max_ns)
                                continue;
                        *w = v; /* undone below if the transaction fails */
                        if (!begun) {
                                if (hsm_store_exec(st->db, "BEGIN") < 0)
                                        return -EIO;
                                begun = true;
                                if (sqlite3_prepare_v2(st->db,
                                                       "INSERT INTO usage (token, key, op, mech, result, count, total_ns,"
                                                       " max_ns, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                                                       " ON CONFLICT (token, key, op, mech, result) DO UPDATE SET"
                                                       " count = excluded.count, total_ns = excluded.total_ns,"
                                                       " max_ns = excluded.max_ns, updated = excluded.updated",
                                                       -1, &q, NULL) != SQLITE_OK) {
                                        r = -EIO;
                                        goto out;
                                }
                        }
                        sqlite3_reset(q);
                        sqlite3_bind_text(q, 1, t->token, -1, SQLITE_STATIC);
                        sqlite3_bind_text(q, 2, t->key, -1, SQLITE_STATIC);
                        sqlite3_bind_text(q, 3, hsm_op_name(e[j].op), -1, SQLITE_STATIC);
                        sqlite3_bind_text(q, 4, hsm_mech_name(e[j].mech), -1, SQLITE_STATIC);
                        sqlite3_bind_text(q, 5, hsm_result_name(e[j].result), -1, SQLITE_STATIC);
                        sqlite3_bind_int64(q, 6, (int64_t)v.count);
                        sqlite3_bind_int64(q, 7, (int64_t)v.total_ns);
                        sqlite3_bind_int64(q, 8, (int64_t)v.max_ns);
                        sqlite3_bind_int64(q, 9, now);
                        if (sqlite3_step(q) != SQLITE_DONE) {
                                r = -EIO;
                                goto out;
                        }
                }
        }
        if (r == 0)
                r = flush_failures_locked(st, &begun, now);
out:
        sqlite3_finalize(q);
        if (!begun)
                return 0;
        if (r < 0)
                hsm_err("state database: writing usage totals: %s", sqlite3_errmsg(st->db));
        else if (hsm_store_exec(st->db, "COMMIT") < 0)
                r = -EIO;
        if (r < 0) {
                hsm_store_exec(st->db, "ROLLBACK");
                /* Nothing was written: make the next flush write everything. */
                for (unsigned i = 0; i < st->n_keys; i++) {
                        memset(st->keys[i].written, 0xff, sizeof(st->keys[i].written));
                        memset(st->keys[i].fail_written, 0xff, sizeof(st->keys[i].fail_written));
                }
                return r;
        }
        st->flushes++;
        return 0;
}

int hsm_store_flush(hsm_store *st)
{
        pthread_mutex_lock(&st->lock);
        int r = flush_locked(st);
        int r2 = hsm_store_flush_listeners_locked(st);
        pthread_mutex_unlock(&st->lock);
        r = r < 0 ? r : r2;
        return r;
}

/* The writer's flush. The store's lock is held while it writes, and admin
 * changes need that lock for their audit records: while another process
 * holds state.db's write lock (a backup, an sqlite3 shell), the writer
 * waits WRITER_WAIT_MS for it and then leaves the totals in memory until
 * its next interval (nothing is lost; logged once until it is free again),
 * rather than holding the store's lock through sqlite3's 5 s waits. The
 * flush at exit (hsm_store_close()) waits the 5 s. */
#define WRITER_WAIT_MS 100
static void writer_flush(hsm_store *st)
{
        pthread_mutex_lock(&st->lock);
        sqlite3_busy_timeout(st->db, WRITER_WAIT_MS);
        bool free_now = sqlite3_exec(st->db, "BEGIN IMMEDIATE", NULL, NULL, NULL) == SQLITE_OK;
        if (free_now)
                sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
        if (!free_now && !st->busy_said)
                hsm_warn("state database: another process holds its write lock (%s): the usage totals stay in "
                         "memory until it is free",
                         sqlite3_errmsg(st->db));
        else if (free_now && st->busy_said)
                hsm_notice("state database: its write lock is free again: the usage totals are written");
        st->busy_said = !free_now;
        if (free_now) {
                flush_locked(st);
                hsm_store_flush_listeners_locked(st);
        }
        sqlite3_busy_timeout(st->db, 5000);
        pthread_mutex_unlock(&st->lock);
}

static void *writer_main(void *arg)
{
        hsm_store *st = arg;
        /* Flushes start every interval_ms on a fixed schedule (not
         * interval_ms after the last one ended), so that what a kill -9
         * loses is at most an interval plus one flush; a flush that took
         * longer than an interval is followed by the next at once. */
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        pthread_mutex_lock(&st->wlock);
        while (!st->stop) {
                ts.tv_sec += st->interval_ms / 1000;
                ts.tv_nsec += (long)(st->interval_ms % 1000) * 1000000L;
                if (ts.tv_nsec >= 1000000000L) {
                        ts.tv_sec++;
                        ts.tv_nsec -= 1000000000L;
                }
                struct timespec now;
                clock_gettime(CLOCK_MONOTONIC, &now);
                if (now.tv_sec > ts.tv_sec || (now.tv_sec == ts.tv_sec && now.tv_nsec > ts.tv_nsec))
                        ts = now;
                else
                        while (!st->stop && pthread_cond_timedwait(&st->wcond, &st->wlock, &ts) != ETIMEDOUT)
                                ;
                if (st->stop)
                        break;
                pthread_mutex_unlock(&st->wlock);
                writer_flush(st);
                pthread_mutex_lock(&st->wlock);
        }
        pthread_mutex_unlock(&st->wlock);
        return NULL;
}

int hsm_store_start(hsm_store *st, unsigned interval_ms)
{
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_destroy(&st->wcond);
        pthread_cond_init(&st->wcond, &ca);
        pthread_condattr_destroy(&ca);
        st->interval_ms = interval_ms ? interval_ms : 1000;
        int r = pthread_create(&st->writer, NULL, writer_main, st);
        if (r != 0) {
                hsm_err("state database: cannot start its writer thread: %s", strerror(r));
                return -r;
        }
        st->running = true;
        return 0;
}

void hsm_store_close(hsm_store *st)
{
        if (!st)
                return;
        if (st->running) {
                pthread_mutex_lock(&st->wlock);
                st->stop = true;
                pthread_cond_signal(&st->wcond);
                pthread_mutex_unlock(&st->wlock);
                pthread_join(st->writer, NULL);
        }
        if (st->db) {
                if (!st->readonly)
                        hsm_store_flush(st);
                sqlite3_close(st->db);
        }
        for (unsigned i = 0; i < st->n_keys; i++) {
                free(st->keys[i].token);
                free(st->keys[i].key);
        }
        free(st->keys);
        hsm_store_free_listeners(st);
        pthread_mutex_destroy(&st->lock);
        pthread_mutex_destroy(&st->wlock);
        pthread_cond_destroy(&st->wcond);
        free(st->dir);
        free(st);
}

int64_t hsm_store_lifetime(hsm_store *st, const char *token, const char *key, enum hsm_op op, enum hsm_mech mech,
                           enum hsm_result res)
{
        if (op >= HSM_OP__MAX || mech >= HSM_MECH__MAX || res >= HSM_RESULT__MAX)
                return -1;
        int64_t r = -1;
        pthread_mutex_lock(&st->lock); /* keys may be tracked meanwhile */
        for (unsigned i = 0; i < st->n_keys; i++) {
                struct tracked *t = &st->keys[i];
                if (strcmp(t->token, token) != 0 || strcmp(t->key, key) != 0)
                        continue;
                hsm_usage_entry e[HSM_OP__MAX * HSM_MECH__MAX * HSM_RESULT__MAX];
                int n = hsm_usage_snapshot(t->u, e, (int)(sizeof(e) / sizeof(e[0])));
                uint64_t c = t->base[op][mech][res].count;
                for (int j = 0; j < n; j++)
                        if (e[j].op == op && e[j].mech == mech && e[j].result == res)
                                c += e[j].count;
                r = (int64_t)c;
                break;
        }
        pthread_mutex_unlock(&st->lock);
        return r;
}

int hsm_store_failure_lifetimes(hsm_store *st, const char *token, const char *key,
                                uint64_t ret[HSM_OP__MAX][HSM_MECH__MAX][HSM_REASON__MAX])
{
        int r = -ENOENT;
        pthread_mutex_lock(&st->lock);
        for (unsigned i = 0; i < st->n_keys && r < 0; i++) {
                struct tracked *t = &st->keys[i];
                if (strcmp(t->token, token) != 0 || strcmp(t->key, key) != 0)
                        continue;
                for (int o = 0; o < HSM_OP__MAX; o++)
                        for (int m = 0; m < HSM_MECH__MAX; m++)
                                for (int w = 0; w < HSM_REASON__MAX; w++)
                                        ret[o][m][w] = t->fail_base[o][m][w] + hsm_usage_failures(t->u, o, m, w);
                r = 0;
        }
        pthread_mutex_unlock(&st->lock);
        return r;
}

uint64_t hsm_store_flushes(hsm_store *st)
{
        pthread_mutex_lock(&st->lock);
        uint64_t n = st->flushes;
        pthread_mutex_unlock(&st->lock);
        return n;
}

int hsm_audit_check_dir(const char *dir, hsm_audit_check *ret, char **errmsg)
{
        hsm_store st = { 0 };
        pthread_mutex_init(&st.lock, NULL);
        int r = open_db(dir, true, &st.db, errmsg);
        if (r < 0)
                return r;
        r = hsm_store_audit_verify(&st, ret);
        sqlite3_close(st.db);
        pthread_mutex_destroy(&st.lock);
        return r;
}
