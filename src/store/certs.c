/* Certificate chains uploaded through the admin API, kept in the state
 * database (the PEM as uploaded), named by the SHA-256 of the leaf's DER. */
#include "internal.h"

#include <errno.h>
#include <string.h>
#include <time.h>

#include "log.h"

const char hsm_store_certs_schema[] =
        "CREATE TABLE IF NOT EXISTS certificates ("
        " fingerprint TEXT PRIMARY KEY, token TEXT NOT NULL, key_id TEXT NOT NULL, stored TEXT NOT NULL,"
        " pem TEXT NOT NULL, created INTEGER NOT NULL);";

int hsm_store_cert_add(hsm_store *st, const char *fp, const char *token, const char *key_id, const char *stored,
                       const char *pem)
{
        sqlite3_stmt *q = NULL;
        int r = -EIO;
        pthread_mutex_lock(&st->lock);
        if (sqlite3_prepare_v2(st->db, "INSERT INTO certificates VALUES (?, ?, ?, ?, ?, ?)", -1, &q, NULL) != SQLITE_OK)
                goto out;
        sqlite3_bind_text(q, 1, fp, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 2, token, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 3, key_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 4, stored, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 5, pem, -1, SQLITE_STATIC);
        sqlite3_bind_int64(q, 6, (int64_t)time(NULL));
        int rc = sqlite3_step(q);
        if (rc == SQLITE_DONE)
                r = 0;
        else if (rc == SQLITE_CONSTRAINT)
                r = -EEXIST;
        else
                hsm_err("state database: storing certificate %s: %s", fp, sqlite3_errmsg(st->db));
out:
        sqlite3_finalize(q);
        pthread_mutex_unlock(&st->lock);
        return r;
}

int hsm_store_cert_list(hsm_store *st, const char *only_fp, hsm_cert_cb cb, void *userdata)
{
        sqlite3_stmt *q = NULL;
        int n = 0, rc;
        pthread_mutex_lock(&st->lock);
        rc = sqlite3_prepare_v2(st->db,
                                only_fp ? "SELECT fingerprint, token, key_id, stored, pem, created FROM certificates"
                                          " WHERE fingerprint = ?"
                                        : "SELECT fingerprint, token, key_id, stored, pem, created FROM certificates"
                                          " ORDER BY created, fingerprint",
                                -1, &q, NULL);
        if (rc != SQLITE_OK) {
                pthread_mutex_unlock(&st->lock);
                return -EIO;
        }
        if (only_fp)
                sqlite3_bind_text(q, 1, only_fp, -1, SQLITE_STATIC);
        while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
                n++;
                if (cb((const char *)sqlite3_column_text(q, 0), (const char *)sqlite3_column_text(q, 1),
                       (const char *)sqlite3_column_text(q, 2), (const char *)sqlite3_column_text(q, 3),
                       (const char *)sqlite3_column_text(q, 4), userdata) != 0) {
                        rc = SQLITE_DONE;
                        break;
                }
        }
        sqlite3_finalize(q);
        pthread_mutex_unlock(&st->lock);
        return rc == SQLITE_DONE ? n : -EIO;
}

int hsm_store_cert_delete(hsm_store *st, const char *fp)
{
        sqlite3_stmt *q = NULL;
        int r = -EIO;
        pthread_mutex_lock(&st->lock);
        if (sqlite3_prepare_v2(st->db, "DELETE FROM certificates WHERE fingerprint = ?", -1, &q, NULL) == SQLITE_OK) {
                sqlite3_bind_text(q, 1, fp, -1, SQLITE_STATIC);
                if (sqlite3_step(q) == SQLITE_DONE)
                        r = sqlite3_changes(st->db) > 0 ? 0 : -ENOENT;
        }
        sqlite3_finalize(q);
        pthread_mutex_unlock(&st->lock);
        return r;
}
