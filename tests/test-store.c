/* The state database (src/store): usage totals survive a close and an open,
 * the writer thread flushes on its own, and the audit chain check notices an
 * altered, a removed and a dropped newest record. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sqlite3.h>

#include "log.h"
#include "store.h"
#include "usage.h"
#include "testlib.h"

static char dir[] = "/tmp/hsmtls-store-XXXXXX";

static int sql(const char *s)
{
        char *path = NULL;
        sqlite3 *db = NULL;
        if (asprintf(&path, "%s/state/state.db", dir) < 0)
                exit(1);
        int rc = sqlite3_open(path, &db);
        if (rc == SQLITE_OK)
                rc = sqlite3_exec(db, s, NULL, NULL, NULL);
        sqlite3_close(db);
        free(path);
        return rc == SQLITE_OK ? 0 : -1;
}

/* Lifetime failures of key's ECDSA signatures with reason why; -1: untracked. */
static int64_t flife(hsm_store *st, const char *token, const char *key, enum hsm_reason why)
{
        uint64_t v[HSM_OP__MAX][HSM_MECH__MAX][HSM_REASON__MAX];
        if (hsm_store_failure_lifetimes(st, token, key, v) < 0)
                return -1;
        return (int64_t)v[HSM_OP_SIGN][HSM_MECH_ECDSA][why];
}

static int count_cb(const hsm_audit_record *r, void *ud)
{
        (*(int *)ud)++;
        return 0;
}

int main(void)
{
        hsm_log_set_level(getenv("HSMTLS_DEBUG") ? HSM_LOG_DEBUG : HSM_LOG_ERR);
        if (!mkdtemp(dir))
                return 1;
        char *sd = NULL;
        if (asprintf(&sd, "%s/state", dir) < 0)
                return 1;

        /* Usage: 3 + 2 signatures across two runs. */
        hsm_store *st = NULL;
        char *err = NULL;
        int r = hsm_store_open(sd, &st, &err);
        CHECK(r == 0, "open a new state directory (%s)", err ? err : "ok");
        struct stat sb;
        CHECK(stat(sd, &sb) == 0 && (sb.st_mode & 0777) == 0700, "state directory is 0700 (%o)", sb.st_mode & 0777);
        char *dbp = NULL;
        if (asprintf(&dbp, "%s/state.db", sd) < 0)
                return 1;
        CHECK(stat(dbp, &sb) == 0 && (sb.st_mode & 0777) == 0600, "state.db is 0600 (%o)", sb.st_mode & 0777);
        hsm_usage *u = hsm_usage_new();
        CHECK(hsm_store_track(st, "tok", "pkcs11:object=k", u) == 0, "track a key");
        for (int i = 0; i < 3; i++)
                hsm_usage_record(u, HSM_OP_SIGN, HSM_MECH_ECDSA, HSM_REASON_NONE, 1000);
        hsm_usage_record(u, HSM_OP_SIGN, HSM_MECH_ECDSA, HSM_REASON_TOKEN_ERROR, 5000);
        hsm_usage_record(u, HSM_OP_SIGN, HSM_MECH_ECDSA, HSM_REASON_QUEUE, 10);
        hsm_usage_record(u, HSM_OP_SIGN, HSM_MECH_ECDSA, HSM_REASON_QUEUE, 10);
        CHECK(hsm_usage_total(u, HSM_OP_SIGN, HSM_RESULT_ERROR) == 3 &&
                      hsm_usage_failures(u, HSM_OP_SIGN, HSM_MECH_ECDSA, HSM_REASON_QUEUE) == 2 &&
                      hsm_usage_failures(u, HSM_OP_SIGN, HSM_MECH_ECDSA, HSM_REASON_TOKEN_ERROR) == 1 &&
                      hsm_usage_failures(u, HSM_OP_SIGN, HSM_MECH_ECDSA, HSM_REASON_LATE) == 0 &&
                      hsm_usage_failures(u, HSM_OP_SIGN, HSM_MECH_ECDSA, HSM_REASON_NONE) == 0,
              "3 errors: 2 counted under queue, 1 under token_error, none under the others");
        CHECK(strcmp(hsm_reason_name(HSM_REASON_QUEUE), "queue") == 0 && strcmp(hsm_reason_name(HSM_REASON_LATE), "late") == 0 &&
                      strcmp(hsm_reason_name(HSM_REASON_TOKEN_ERROR), "token_error") == 0 &&
                      strcmp(hsm_reason_name(HSM_REASON__MAX), "?") == 0,
              "reason names");
        CHECK(hsm_store_start(st, 50) == 0, "writer started");
        for (int i = 0; i < 200 && hsm_store_flushes(st) == 0; i++)
                usleep(10000);
        CHECK(hsm_store_flushes(st) > 0, "the writer flushed by itself");
        hsm_store_close(st);
        hsm_usage_free(u);

        u = hsm_usage_new();
        r = hsm_store_open(sd, &st, &err);
        CHECK(r == 0 && hsm_store_track(st, "tok", "pkcs11:object=k", u) == 0, "reopen and track again");
        CHECK(hsm_store_lifetime(st, "tok", "pkcs11:object=k", HSM_OP_SIGN, HSM_MECH_ECDSA, HSM_RESULT_OK) == 3,
              "lifetime count loaded from the first run: 3");
        hsm_usage_record(u, HSM_OP_SIGN, HSM_MECH_ECDSA, HSM_REASON_NONE, 1000);
        hsm_usage_record(u, HSM_OP_SIGN, HSM_MECH_ECDSA, HSM_REASON_NONE, 1000);
        CHECK(hsm_store_lifetime(st, "tok", "pkcs11:object=k", HSM_OP_SIGN, HSM_MECH_ECDSA, HSM_RESULT_OK) == 5,
              "lifetime = earlier runs + this one: 5");
        CHECK(hsm_store_lifetime(st, "tok", "pkcs11:object=other", HSM_OP_SIGN, HSM_MECH_ECDSA, HSM_RESULT_OK) == -1,
              "an untracked key has no lifetime");
        hsm_store_close(st); /* no writer: close flushes */
        hsm_usage_free(u);
        u = hsm_usage_new();
        r = hsm_store_open(sd, &st, &err);
        hsm_store_track(st, "tok", "pkcs11:object=k", u);
        CHECK(hsm_store_lifetime(st, "tok", "pkcs11:object=k", HSM_OP_SIGN, HSM_MECH_ECDSA, HSM_RESULT_OK) == 5 &&
                      hsm_store_lifetime(st, "tok", "pkcs11:object=k", HSM_OP_SIGN, HSM_MECH_ECDSA, HSM_RESULT_ERROR) == 3,
              "a third run sees 5 ok and 3 errors");
        CHECK(flife(st, "tok", "pkcs11:object=k", HSM_REASON_QUEUE) == 2 &&
                      flife(st, "tok", "pkcs11:object=k", HSM_REASON_TOKEN_ERROR) == 1 &&
                      flife(st, "tok", "pkcs11:object=k", HSM_REASON_DEADLINE) == 0 &&
                      flife(st, "tok", "pkcs11:object=other", HSM_REASON_QUEUE) == -1,
              "... and its failures by reason: queue 2, token_error 1, deadline 0 (untracked key: -1)");

        /* A state.db of the version before reasons: a usage table only,
         * with an error row. It opens, its counts load, the failures table
         * is added and the next flush fills it. */
        {
                char *od = NULL, *odb = NULL;
                sqlite3 *db = NULL;
                if (asprintf(&od, "%s/old", dir) < 0 || mkdir(od, 0700) < 0 || asprintf(&odb, "%s/state.db", od) < 0)
                        return 1;
                CHECK(sqlite3_open(odb, &db) == SQLITE_OK &&
                              sqlite3_exec(db,
                                           "CREATE TABLE usage (token TEXT NOT NULL, key TEXT NOT NULL, op TEXT NOT NULL, mech "
                                           "TEXT NOT NULL, result TEXT NOT NULL, count INTEGER NOT NULL, total_ns INTEGER NOT NULL, "
                                           "max_ns INTEGER NOT NULL, updated INTEGER NOT NULL, PRIMARY KEY (token, key, op, mech, "
                                           "result)); INSERT INTO usage VALUES ('tok', 'k', 'sign', 'CKM_ECDSA', 'error', 7, 70, "
                                           "10, 1), ('tok', 'k', 'sign', 'CKM_ECDSA', 'ok', 9, 90, 10, 1);",
                                           NULL, NULL, NULL) == SQLITE_OK,
                      "a state.db without usage_failures, as the version before wrote it");
                sqlite3_close(db);
                hsm_store *os = NULL;
                hsm_usage *ou = hsm_usage_new();
                r = hsm_store_open(od, &os, &err);
                CHECK(r == 0 && hsm_store_track(os, "tok", "k", ou) == 0, "the old state.db opens and the key is tracked (%s)",
                      err ? err : "ok");
                CHECK(hsm_store_lifetime(os, "tok", "k", HSM_OP_SIGN, HSM_MECH_ECDSA, HSM_RESULT_ERROR) == 7 &&
                              hsm_store_lifetime(os, "tok", "k", HSM_OP_SIGN, HSM_MECH_ECDSA, HSM_RESULT_OK) == 9 &&
                              flife(os, "tok", "k", HSM_REASON_DEADLINE) == 0,
                      "its counts load: 9 ok, 7 errors (no reason: none counted under a reason)");
                hsm_usage_record(ou, HSM_OP_SIGN, HSM_MECH_ECDSA, HSM_REASON_DEADLINE, 10);
                hsm_store_close(os);
                hsm_usage_free(ou);
                ou = hsm_usage_new();
                r = hsm_store_open(od, &os, &err);
                CHECK(r == 0 && hsm_store_track(os, "tok", "k", ou) == 0 &&
                              hsm_store_lifetime(os, "tok", "k", HSM_OP_SIGN, HSM_MECH_ECDSA, HSM_RESULT_ERROR) == 8 &&
                              flife(os, "tok", "k", HSM_REASON_DEADLINE) == 1,
                      "after one more failure and a restart: 8 errors, 1 of them deadline");
                hsm_store_close(os);
                hsm_usage_free(ou);
                free(od);
                free(odb);
        }

        /* Duration buckets and quantiles (usage.c). */
        hsm_usage *h = hsm_usage_new();
        for (int i = 0; i < 90; i++)
                hsm_usage_record(h, HSM_OP_SIGN, HSM_MECH_RSA_PKCS, HSM_REASON_NONE, 50000); /* 50 us */
        for (int i = 0; i < 9; i++)
                hsm_usage_record(h, HSM_OP_SIGN, HSM_MECH_RSA_PKCS, HSM_REASON_NONE, 300000); /* 300 us */
        hsm_usage_record(h, HSM_OP_SIGN, HSM_MECH_RSA_PKCS, HSM_REASON_NONE, 7000000000u); /* 7 s */
        uint64_t hist[HSM_USAGE_BUCKETS];
        hsm_usage_histogram(h, HSM_OP_SIGN, HSM_MECH_RSA_PKCS, HSM_RESULT_OK, hist);
        CHECK(hist[0] == 90 && hist[2] == 9 && hist[HSM_USAGE_BUCKETS - 1] == 1 && hist[1] == 0,
              "durations land in their buckets (<=100us: %llu, <=500us: %llu, >5s: %llu)",
              (unsigned long long)hist[0], (unsigned long long)hist[2], (unsigned long long)hist[HSM_USAGE_BUCKETS - 1]);
        CHECK(hsm_usage_quantile_ns(hist, 0.5) == 100000 && hsm_usage_quantile_ns(hist, 0.95) == 500000 &&
                      hsm_usage_quantile_ns(hist, 1.0) == UINT64_MAX,
              "quantiles: p50 <= 100 us, p95 <= 500 us, p100 past the last bound");
        hsm_usage_histogram(h, HSM_OP_DECRYPT, HSM_MECH_RSA_PKCS, HSM_RESULT_OK, hist);
        CHECK(hsm_usage_quantile_ns(hist, 0.5) == 0, "no operation: quantile 0");
        hsm_usage_free(h);

        /* Audit chain. */
        hsm_audit_check ck;
        CHECK(hsm_store_audit_verify(st, &ck) == 0 && ck.records == 0, "an empty audit log checks");
        for (int i = 0; i < 5; i++)
                CHECK(hsm_store_audit(st, "token:ops", "unix", "POST", "/v1/keys", "key.generate", 201, "label=x",
                                      NULL) == 0, "append audit record %d", i + 1);
        r = hsm_store_audit_verify(st, &ck);
        CHECK(r == 0 && ck.records == 5, "5 records check (%d, %s)", r, ck.reason);
        int n = 0;
        CHECK(hsm_store_audit_list(st, 2, 2, count_cb, &n) == 2 && n == 2, "list a page of 2 after seq 2");
        hsm_store_close(st);
        hsm_usage_free(u);
        CHECK(hsm_audit_check_dir(sd, &ck, &err) == 0 && ck.records == 5, "check-dir: intact");

        CHECK(sql("UPDATE audit SET status = 200 WHERE seq = 3") == 0, "alter record 3 with sqlite");
        r = hsm_audit_check_dir(sd, &ck, &err);
        CHECK(r == -EBADMSG && ck.first_bad == 3, "altered record 3 is found (%d, %s)", r, ck.reason);
        CHECK(sql("UPDATE audit SET status = 201 WHERE seq = 3") == 0, "restore it");
        CHECK(hsm_audit_check_dir(sd, &ck, &err) == 0, "intact again");
        CHECK(sql("UPDATE audit SET detail = 'label=y', sha256 = 'x' WHERE seq = 5") == 0, "alter record 5 and its hash");
        r = hsm_audit_check_dir(sd, &ck, &err);
        CHECK(r == -EBADMSG && ck.first_bad == 5, "altered newest record is found (%s)", ck.reason);
        CHECK(sql("DELETE FROM audit WHERE seq = 5") == 0, "remove record 5 (the newest)");
        r = hsm_audit_check_dir(sd, &ck, &err);
        CHECK(r == -EBADMSG, "removed newest record is found (%s)", ck.reason);
        CHECK(sql("DELETE FROM audit WHERE seq = 2") == 0, "remove record 2");
        r = hsm_audit_check_dir(sd, &ck, &err);
        CHECK(r == -EBADMSG && ck.first_bad == 2, "removed record 2 is found (%s)", ck.reason);

        /* A state directory others may write to is refused. */
        chmod(sd, 0777);
        CHECK(hsm_store_open(sd, &st, &err) == -EPERM, "a world-writable state directory is refused (%s)", err);
        free(err);
        free(sd);
        free(dbp);
        if (!getenv("HSMTLS_KEEP_TEST_DIR")) {
                char *cmd = NULL;
                if (asprintf(&cmd, "rm -rf %s", dir) >= 0 && system(cmd) != 0)
                        fprintf(stderr, "cleanup failed\n");
                free(cmd);
        }
        return test_done();
}
