/* Listener bindings made through the admin API, kept in the state database
 * and applied over the configuration file at start (README, Admin API):
 * per listener, the API-bound chains in the order they are served and
 * tombstones for configuration file chains that were unbound or replaced. */
#include "internal.h"

#include <errno.h>
#include <string.h>
#include <time.h>

#include "log.h"

const char hsm_store_bindings_schema[] =
        "CREATE TABLE IF NOT EXISTS bindings ("
        " listener TEXT NOT NULL, certificate TEXT NOT NULL, names TEXT NOT NULL, kind TEXT NOT NULL,"
        " pos INTEGER NOT NULL, created INTEGER NOT NULL, PRIMARY KEY (listener, certificate));";

int hsm_store_bindings_set(hsm_store *st, const char *listener, const hsm_store_binding *rows, unsigned n)
{
        hsm_store_listener_rows one = { listener, rows, n };
        return hsm_store_bindings_set_many(st, &one, 1);
}

int hsm_store_bindings_set_many(hsm_store *st, const hsm_store_listener_rows *ls, unsigned n_ls)
{
        sqlite3_stmt *del = NULL, *q = NULL;
        int r = -EIO;
        const char *listener = n_ls ? ls[0].listener : "";
        pthread_mutex_lock(&st->lock);
        if (hsm_store_exec(st->db, "BEGIN IMMEDIATE") < 0)
                goto out;
        if (sqlite3_prepare_v2(st->db, "DELETE FROM bindings WHERE listener = ?", -1, &del, NULL) != SQLITE_OK ||
            sqlite3_prepare_v2(st->db, "INSERT INTO bindings VALUES (?, ?, ?, ?, ?, ?)", -1, &q, NULL) != SQLITE_OK)
                goto rollback;
        for (unsigned k = 0; k < n_ls; k++) {
                listener = ls[k].listener;
                sqlite3_reset(del);
                sqlite3_bind_text(del, 1, listener, -1, SQLITE_STATIC);
                if (sqlite3_step(del) != SQLITE_DONE)
                        goto rollback;
                for (unsigned i = 0; i < ls[k].n; i++) {
                        const hsm_store_binding *b = &ls[k].rows[i];
                        sqlite3_reset(q);
                        sqlite3_bind_text(q, 1, listener, -1, SQLITE_STATIC);
                        sqlite3_bind_text(q, 2, b->certificate, -1, SQLITE_STATIC);
                        sqlite3_bind_text(q, 3, b->names ? b->names : "", -1, SQLITE_STATIC);
                        sqlite3_bind_text(q, 4, b->kind, -1, SQLITE_STATIC);
                        sqlite3_bind_int(q, 5, (int)i);
                        sqlite3_bind_int64(q, 6, (int64_t)time(NULL));
                        if (sqlite3_step(q) != SQLITE_DONE)
                                goto rollback;
                }
        }
        sqlite3_finalize(del);
        sqlite3_finalize(q);
        del = q = NULL;
        if (hsm_store_exec(st->db, "COMMIT") < 0)
                goto rollback;
        r = 0;
        goto out;
rollback:
        hsm_err("state database: storing the bindings of listener %s: %s", listener, sqlite3_errmsg(st->db));
        sqlite3_finalize(del);
        sqlite3_finalize(q);
        del = q = NULL;
        hsm_store_exec(st->db, "ROLLBACK");
out:
        pthread_mutex_unlock(&st->lock);
        return r;
}

int hsm_store_bindings_list(hsm_store *st, const char *listener, hsm_binding_cb cb, void *userdata)
{
        sqlite3_stmt *q = NULL;
        int n = 0, rc;
        pthread_mutex_lock(&st->lock);
        rc = sqlite3_prepare_v2(st->db,
                                listener ? "SELECT listener, certificate, names, kind FROM bindings WHERE listener = ?"
                                           " ORDER BY pos"
                                         : "SELECT listener, certificate, names, kind FROM bindings ORDER BY listener, pos",
                                -1, &q, NULL);
        if (rc != SQLITE_OK) {
                pthread_mutex_unlock(&st->lock);
                return -EIO;
        }
        if (listener)
                sqlite3_bind_text(q, 1, listener, -1, SQLITE_STATIC);
        while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
                n++;
                hsm_store_binding b = { (const char *)sqlite3_column_text(q, 1), (const char *)sqlite3_column_text(q, 2),
                                        (const char *)sqlite3_column_text(q, 3) };
                if (cb((const char *)sqlite3_column_text(q, 0), &b, userdata) != 0) {
                        rc = SQLITE_DONE;
                        break;
                }
        }
        sqlite3_finalize(q);
        pthread_mutex_unlock(&st->lock);
        return rc == SQLITE_DONE ? n : -EIO;
}
