/* The audit log: one row per admin change or refused request, each with the
 * SHA-256 of the row before it (the first: 64 zeros), so that an altered or
 * removed row breaks the chain. The head (last seq and hash) is kept in a
 * row of its own, so that dropping the newest records shows too; and every
 * append logs its seq and hash, so that the log can serve as a witness
 * against someone who rewrites the whole file. */
#include "internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <gnutls/crypto.h>

#include "log.h"

const char hsm_store_audit_schema[] =
        "CREATE TABLE IF NOT EXISTS audit ("
        " seq INTEGER PRIMARY KEY, time TEXT NOT NULL, who TEXT NOT NULL, peer TEXT NOT NULL,"
        " method TEXT NOT NULL, path TEXT NOT NULL, action TEXT NOT NULL, status INTEGER NOT NULL,"
        " detail TEXT NOT NULL, prev_sha256 TEXT NOT NULL, sha256 TEXT NOT NULL);"
        "CREATE TABLE IF NOT EXISTS audit_head (id INTEGER PRIMARY KEY CHECK (id = 1),"
        " seq INTEGER NOT NULL, sha256 TEXT NOT NULL);";

static const char zero_hash[] = "0000000000000000000000000000000000000000000000000000000000000000";

/* SHA-256 over a length-prefixed encoding of every field, so that no two
 * different records encode the same. */
static int record_hash(const hsm_audit_record *r, char out[65])
{
        char *buf = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&buf, &len);
        if (!f)
                return -ENOMEM;
        const char *fields[] = { r->time, r->who, r->peer, r->method, r->path, r->action, r->detail, r->prev_sha256 };
        fprintf(f, "hsmtls-audit-1\n%lld\n%d\n", (long long)r->seq, r->status);
        for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++)
                fprintf(f, "%zu:%s\n", strlen(fields[i]), fields[i]);
        if (fclose(f) != 0) {
                free(buf);
                return -ENOMEM;
        }
        uint8_t d[32];
        int g = gnutls_hash_fast(GNUTLS_DIG_SHA256, buf, len, d);
        free(buf);
        if (g < 0)
                return -EIO;
        for (int i = 0; i < 32; i++)
                snprintf(out + 2 * i, 3, "%02x", d[i]);
        return 0;
}

static void now_rfc3339(char *buf, size_t size)
{
        struct timespec ts;
        struct tm tm;
        clock_gettime(CLOCK_REALTIME, &ts);
        gmtime_r(&ts.tv_sec, &tm);
        size_t n = strftime(buf, size, "%Y-%m-%dT%H:%M:%S", &tm);
        snprintf(buf + n, size - n, ".%03ldZ", ts.tv_nsec / 1000000L);
}

static const char *nz(const char *s) { return s ? s : ""; }

/* For the log line: control characters (a decoded %0a in a path, say) would
 * forge log lines; they become '?'. The database keeps the original. */
static const char *printable(const char *s, char *buf, size_t size)
{
        size_t i = 0;
        for (; s[i] && i + 1 < size; i++)
                buf[i] = (unsigned char)s[i] < 0x20 || s[i] == 0x7f ? '?' : s[i];
        buf[i] = 0;
        return buf;
}

/* What a failed write says: -EBUSY (another process holds the write
 * lock), -EROFS (read-only), -EIO. */
static int write_error(sqlite3 *db)
{
        int ext = sqlite3_extended_errcode(db) & 0xff;
        return ext == SQLITE_BUSY || ext == SQLITE_LOCKED ? -EBUSY : ext == SQLITE_READONLY ? -EROFS : -EIO;
}

/* Appends rec (seq, prev_sha256 and sha256 are filled in here) in one
 * transaction, under st->lock: reading the head and writing the record
 * that follows it cannot interleave with another append. wait_ms: how long
 * BEGIN IMMEDIATE waits for another writer (0: the connection's 5 s). */
static int append(hsm_store *st, unsigned wait_ms, hsm_audit_record *rec, int64_t *ret_seq, char *why, size_t why_size)
{
        char when[40], prev[65], hash[65];
        sqlite3_stmt *q = NULL;
        int r = -EIO;
        now_rfc3339(when, sizeof(when));
        rec->time = when;
        pthread_mutex_lock(&st->lock);
        if (wait_ms)
                sqlite3_busy_timeout(st->db, (int)wait_ms);
        bool begun = sqlite3_exec(st->db, "BEGIN IMMEDIATE", NULL, NULL, NULL) == SQLITE_OK;
        if (wait_ms)
                sqlite3_busy_timeout(st->db, 5000);
        if (!begun)
                goto out;
        int64_t seq = 1;
        memcpy(prev, zero_hash, sizeof(prev));
        if (sqlite3_prepare_v2(st->db, "SELECT seq, sha256 FROM audit ORDER BY seq DESC LIMIT 1", -1, &q, NULL) !=
            SQLITE_OK)
                goto out;
        int rc = sqlite3_step(q);
        if (rc == SQLITE_ROW) {
                seq = sqlite3_column_int64(q, 0) + 1;
                snprintf(prev, sizeof(prev), "%s", (const char *)sqlite3_column_text(q, 1));
        } else if (rc != SQLITE_DONE)
                goto out;
        sqlite3_finalize(q);
        q = NULL;
        rec->seq = seq;
        rec->prev_sha256 = prev;
        if (record_hash(rec, hash) < 0)
                goto out;
        if (sqlite3_prepare_v2(st->db, "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", -1, &q, NULL) !=
            SQLITE_OK)
                goto out;
        sqlite3_bind_int64(q, 1, seq);
        sqlite3_bind_text(q, 2, rec->time, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 3, rec->who, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 4, rec->peer, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 5, rec->method, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 6, rec->path, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 7, rec->action, -1, SQLITE_STATIC);
        sqlite3_bind_int(q, 8, rec->status);
        sqlite3_bind_text(q, 9, rec->detail, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 10, prev, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 11, hash, -1, SQLITE_STATIC);
        if (sqlite3_step(q) != SQLITE_DONE)
                goto out;
        sqlite3_finalize(q);
        q = NULL;
        if (sqlite3_prepare_v2(st->db, "INSERT OR REPLACE INTO audit_head VALUES (1, ?, ?)", -1, &q, NULL) != SQLITE_OK)
                goto out;
        sqlite3_bind_int64(q, 1, seq);
        sqlite3_bind_text(q, 2, hash, -1, SQLITE_STATIC);
        if (sqlite3_step(q) != SQLITE_DONE)
                goto out;
        sqlite3_finalize(q);
        q = NULL;
        if (hsm_store_exec(st->db, "COMMIT") < 0)
                goto out;
        r = 0;
        char pw[256], pp[96], pm[32], pa[256], pt[64];
        hsm_info("audit: seq=%lld sha256=%s who=%s peer=%s %s %s action=%s status=%d", (long long)seq, hash,
                 printable(rec->who, pw, sizeof(pw)), printable(rec->peer, pp, sizeof(pp)),
                 printable(rec->method, pm, sizeof(pm)), printable(rec->path, pa, sizeof(pa)),
                 printable(rec->action, pt, sizeof(pt)), rec->status);
        if (ret_seq)
                *ret_seq = seq;
out:
        if (r < 0) {
                r = write_error(st->db);
                snprintf(why, why_size, "%s", sqlite3_errmsg(st->db));
                if (begun)
                        hsm_store_exec(st->db, "ROLLBACK");
        }
        sqlite3_finalize(q);
        pthread_mutex_unlock(&st->lock);
        return r;
}

int hsm_store_audit(hsm_store *st, const char *who, const char *peer, const char *method, const char *path,
                    const char *action, int status, const char *detail, int64_t *ret_seq)
{
        hsm_audit_record rec = { .who = nz(who), .peer = nz(peer), .method = nz(method), .path = nz(path),
                                 .action = nz(action), .status = status, .detail = nz(detail) };
        char why[200];
        int r = append(st, 0, &rec, ret_seq, why, sizeof(why));
        if (r < 0)
                hsm_err("state database: appending an audit record: %s", why);
        return r;
}

int hsm_store_audit_begin(hsm_store *st, unsigned wait_ms, const char *who, const char *peer, const char *method,
                          const char *path, int64_t *ret_seq, char *why, size_t why_size)
{
        hsm_audit_record rec = { .who = nz(who), .peer = nz(peer), .method = nz(method), .path = nz(path),
                                 .action = "change.begin", .status = 0, .detail = "" };
        int r = append(st, wait_ms, &rec, ret_seq, why, why_size);
        if (r < 0)
                hsm_err("state database: the audit log cannot be written: %s", why);
        return r;
}

static void row_record(sqlite3_stmt *q, hsm_audit_record *r)
{
        *r = (hsm_audit_record){
                .seq = sqlite3_column_int64(q, 0),
                .time = nz((const char *)sqlite3_column_text(q, 1)),
                .who = nz((const char *)sqlite3_column_text(q, 2)),
                .peer = nz((const char *)sqlite3_column_text(q, 3)),
                .method = nz((const char *)sqlite3_column_text(q, 4)),
                .path = nz((const char *)sqlite3_column_text(q, 5)),
                .action = nz((const char *)sqlite3_column_text(q, 6)),
                .status = sqlite3_column_int(q, 7),
                .detail = nz((const char *)sqlite3_column_text(q, 8)),
                .prev_sha256 = nz((const char *)sqlite3_column_text(q, 9)),
                .sha256 = nz((const char *)sqlite3_column_text(q, 10)),
        };
}

int hsm_store_audit_list(hsm_store *st, int64_t after, unsigned limit, hsm_audit_cb cb, void *userdata)
{
        sqlite3_stmt *q = NULL;
        int n = 0, rc;
        pthread_mutex_lock(&st->lock);
        if (sqlite3_prepare_v2(st->db,
                               "SELECT seq, time, who, peer, method, path, action, status, detail, prev_sha256, sha256"
                               " FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                               -1, &q, NULL) != SQLITE_OK) {
                pthread_mutex_unlock(&st->lock);
                return -EIO;
        }
        sqlite3_bind_int64(q, 1, after);
        sqlite3_bind_int64(q, 2, limit);
        while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
                hsm_audit_record r;
                row_record(q, &r);
                n++;
                if (cb(&r, userdata) != 0) {
                        rc = SQLITE_DONE;
                        break;
                }
        }
        sqlite3_finalize(q);
        pthread_mutex_unlock(&st->lock);
        return rc == SQLITE_DONE ? n : -EIO;
}

static int bad(hsm_audit_check *ret, int64_t seq, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int bad(hsm_audit_check *ret, int64_t seq, const char *fmt, ...)
{
        va_list ap;
        va_start(ap, fmt);
        ret->first_bad = seq;
        vsnprintf(ret->reason, sizeof(ret->reason), fmt, ap);
        va_end(ap);
        return -EBADMSG;
}

int hsm_store_audit_verify(hsm_store *st, hsm_audit_check *ret)
{
        sqlite3_stmt *q = NULL;
        char prev[65], hash[65];
        int64_t expect = 1;
        int r = 0, rc;
        memset(ret, 0, sizeof(*ret));
        memcpy(prev, zero_hash, sizeof(prev));
        pthread_mutex_lock(&st->lock);
        if (sqlite3_prepare_v2(st->db,
                               "SELECT seq, time, who, peer, method, path, action, status, detail, prev_sha256, sha256"
                               " FROM audit ORDER BY seq",
                               -1, &q, NULL) != SQLITE_OK) {
                r = -EIO;
                goto out;
        }
        while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
                hsm_audit_record rec;
                row_record(q, &rec);
                if (rec.seq != expect) {
                        r = bad(ret, expect, "record %lld is missing (next is %lld)", (long long)expect,
                                (long long)rec.seq);
                        goto out;
                }
                if (strcmp(rec.prev_sha256, prev) != 0) {
                        r = bad(ret, rec.seq, "record %lld does not follow the one before (prev_sha256 %s, expected %s)",
                                (long long)rec.seq, rec.prev_sha256, prev);
                        goto out;
                }
                /* Recomputed from the fields and the previous hash as
                 * verified so far, not from what the row claims. */
                rec.prev_sha256 = prev;
                if ((r = record_hash(&rec, hash)) < 0)
                        goto out;
                if (strcmp(hash, rec.sha256) != 0) {
                        r = bad(ret, rec.seq, "record %lld was altered (its fields hash to %s, it says %s)",
                                (long long)rec.seq, hash, rec.sha256);
                        goto out;
                }
                memcpy(prev, hash, sizeof(prev));
                ret->records++;
                expect++;
        }
        if (rc != SQLITE_DONE) {
                r = -EIO;
                goto out;
        }
        sqlite3_finalize(q);
        q = NULL;
        if (sqlite3_prepare_v2(st->db, "SELECT seq, sha256 FROM audit_head WHERE id = 1", -1, &q, NULL) != SQLITE_OK) {
                r = -EIO;
                goto out;
        }
        rc = sqlite3_step(q);
        if (rc == SQLITE_ROW) {
                int64_t hs = sqlite3_column_int64(q, 0);
                const char *hh = nz((const char *)sqlite3_column_text(q, 1));
                if (hs != expect - 1 || strcmp(hh, prev) != 0)
                        r = bad(ret, expect, "the newest records are missing: the head is record %lld (%.16s...), the "
                                "table ends at %lld", (long long)hs, hh, (long long)(expect - 1));
        } else if (rc == SQLITE_DONE) {
                if (ret->records)
                        r = bad(ret, 1, "the head record is missing");
        } else
                r = -EIO;
out:
        if (r == -EIO)
                snprintf(ret->reason, sizeof(ret->reason), "cannot read the audit table: %s", sqlite3_errmsg(st->db));
        sqlite3_finalize(q);
        pthread_mutex_unlock(&st->lock);
        return r;
}
