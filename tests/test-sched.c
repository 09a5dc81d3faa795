/* Admission of token operations (src/lib/admit.c) through tests/slowtoken:
 * the adaptive limit converges for a CPU-bound token and for a 20 ms token
 * with a capacity, the queue is served in arrival order, it is bounded,
 * an operation that cannot start before its deadline is shed, and the
 * per-key rate refuses past the rate. Every check reads reported values
 * (hsm_token_get_concurrency), never the clock. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <gnutls/gnutls.h>

#include "log.h"
#include "testlib.h"
#include "token.h"
#include "usage.h"

static test_token tt;
static const char *slow_module;
static char *pin_spec;

static const char *const vars[] = { "HSMTLS_SLOWTOKEN_DELAY_MS", "HSMTLS_SLOWTOKEN_MAX_CONCURRENT",
                                    "HSMTLS_SLOWTOKEN_BURN_US", NULL };

/* The token through slowtoken with settings (read by its C_Initialize). */
static hsm_token *open_slow(unsigned max_sessions, const char *const *settings, hsm_key **ret_key)
{
        for (int i = 0; vars[i]; i++)
                unsetenv(vars[i]);
        setenv("HSMTLS_SLOWTOKEN_MODULE", tt.module, 1);
        for (int i = 0; settings && settings[i]; i++)
                putenv((char *)settings[i]);
        hsm_token_config cfg = { .name = "sched", .uri = tt.token_uri, .module = slow_module, .pin_source = pin_spec,
                                 .max_sessions = max_sessions };
        hsm_token *t = NULL;
        char *err = NULL;
        int r = hsm_token_open(&cfg, &t, &err);
        if (r == 0)
                r = hsm_token_find_key(t, tt.key[TK_P256], ret_key, &err);
        for (int i = 0; vars[i]; i++)
                unsetenv(vars[i]);
        if (r < 0) {
                fprintf(stderr, "cannot open the token: %s\n", err ? err : strerror(-r));
                exit(1);
        }
        free(err);
        return t;
}

static int sign(hsm_key *k)
{
        uint8_t hash[32] = { 4, 5, 6 }, sig[132];
        size_t len = sizeof(sig);
        return hsm_key_sign(k, HSM_MECH_ECDSA, HSM_HASH_NONE, hash, sizeof(hash), sig, &len);
}

/* The key's failed ECDSA signatures counted under reason why. */
static uint64_t failures(hsm_key *k, enum hsm_reason why)
{
        return hsm_usage_failures(hsm_key_usage(k), HSM_OP_SIGN, HSM_MECH_ECDSA, why);
}

static hsm_token_concurrency conc(hsm_token *t)
{
        hsm_token_concurrency c;
        hsm_token_get_concurrency(t, &c);
        return c;
}

/* ------------------------------------------------------------ load */

struct load {
        hsm_key *key;
        unsigned target; /* operations in all */
        unsigned done;   /* atomic */
        unsigned failed; /* atomic */
};

static void *load_thread(void *p)
{
        struct load *l = p;
        while (__atomic_load_n(&l->done, __ATOMIC_RELAXED) < l->target) {
                if (sign(l->key) < 0)
                        __atomic_add_fetch(&l->failed, 1, __ATOMIC_RELAXED);
                __atomic_add_fetch(&l->done, 1, __ATOMIC_RELAXED);
        }
        return NULL;
}

static void run_load(hsm_key *k, unsigned threads, unsigned ops, struct load *l)
{
        pthread_t th[64];
        *l = (struct load){ k, ops, 0, 0 };
        for (unsigned i = 0; i < threads; i++)
                pthread_create(&th[i], NULL, load_thread, l);
        for (unsigned i = 0; i < threads; i++)
                pthread_join(th[i], NULL);
}

/* ------------------------------------------------------------ order */

struct ordered {
        hsm_key *key;
        int id;
        int r;
};
static pthread_mutex_t order_lock = PTHREAD_MUTEX_INITIALIZER;
static int order[16], n_order;

static void *ordered_thread(void *p)
{
        struct ordered *o = p;
        o->r = sign(o->key);
        pthread_mutex_lock(&order_lock);
        order[n_order++] = o->id;
        pthread_mutex_unlock(&order_lock);
        return NULL;
}

/* Polls (bounded, 20 s) until the token reports want in flight and queued. */
static bool wait_for(hsm_token *t, unsigned in_flight, unsigned queued)
{
        for (int i = 0; i < 4000; i++) {
                hsm_token_concurrency c = conc(t);
                if (c.in_flight == in_flight && c.queued == queued)
                        return true;
                usleep(5000);
        }
        return false;
}

int main(void)
{
        gnutls_global_init();
        hsm_log_set_level(getenv("HSMTLS_DEBUG") ? HSM_LOG_DEBUG : HSM_LOG_WARNING);
        slow_module = getenv("SLOWTOKEN");
        if (!slow_module) {
                fprintf(stderr, "SLOWTOKEN not set\n");
                return 77;
        }
        test_token_make(&tt, false);
        if (asprintf(&pin_spec, "file:%s", tt.pin_file) < 0)
                return 1;
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        if (cores < 1)
                cores = 1;
        hsm_key *k;
        hsm_token *t;
        struct load l;

        /* 1. A CPU-bound token (2 ms of CPU per signature, no waiting):
         * sixteen threads at once, limit bounded by max_sessions = 32. More
         * than the cores at once only adds latency: the limit settles near
         * the number of cores. */
        {
                static const char *const set[] = { "HSMTLS_SLOWTOKEN_BURN_US=2000", NULL };
                t = open_slow(32, set, &k);
                hsm_token_concurrency c0 = conc(t);
                run_load(k, 16, 800, &l);
                hsm_token_concurrency c = conc(t);
                unsigned hi = cores * 2 > 4 ? (unsigned)cores * 2 : 4;
                CHECK(l.failed == 0, "CPU-bound token: %u signatures, %u failed", l.done, l.failed);
                CHECK(c0.limit == 1 && c.max == 32, "the limit starts at %u, bounded by max_sessions (max %u)", c0.limit, c.max);
                CHECK(c.limit >= 1 && c.limit <= hi,
                      "CPU-bound token (%ld cores): the limit settles at %u, within [1, %u] (floor %.2f ms, recent %.2f ms, %llu changes)",
                      cores, c.limit, hi, c.latency_floor_us / 1e3, c.latency_us / 1e3, (unsigned long long)c.limit_changes);
                hsm_key_unref(k);
                hsm_token_unref(t);
        }

        /* 2. A network HSM: 20 ms per signature, 12 at once (more wait
         * inside the token); 32 threads. The limit climbs from 1 to the
         * token's capacity and stays near it. */
        {
                static const char *const set[] = { "HSMTLS_SLOWTOKEN_DELAY_MS=20", "HSMTLS_SLOWTOKEN_MAX_CONCURRENT=12", NULL };
                t = open_slow(64, set, &k);
                run_load(k, 32, 1500, &l);
                hsm_token_concurrency c = conc(t);
                CHECK(l.failed == 0, "20 ms token: %u signatures, %u failed", l.done, l.failed);
                CHECK(c.limit >= 8 && c.limit <= 18,
                      "20 ms token with a capacity of 12: the limit settles at %u, within [8, 18] (floor %.2f ms, recent %.2f ms, %llu changes)",
                      c.limit, c.latency_floor_us / 1e3, c.latency_us / 1e3, (unsigned long long)c.limit_changes);
                hsm_key_unref(k);
                hsm_token_unref(t);
        }

        /* 3. Arrival order, a bounded queue, deadlines: one at a time on a
         * token of 150 ms per signature. */
        {
                static const char *const set[] = { "HSMTLS_SLOWTOKEN_DELAY_MS=150", NULL };
                t = open_slow(8, set, &k);
                CHECK(hsm_token_set_concurrency(t, 1, 1, 3, -1) == 0, "limit fixed at 1, at most 3 waiting");
                CHECK(hsm_token_set_concurrency(t, 5, 2, 0, -1) == -EINVAL, "min above max is refused");
                struct ordered o[4];
                pthread_t th[4];
                bool queued_ok = true;
                for (int i = 0; i < 4; i++) {
                        o[i] = (struct ordered){ k, i, 0 };
                        pthread_create(&th[i], NULL, ordered_thread, &o[i]);
                        /* the next one comes only once this one waits */
                        queued_ok &= wait_for(t, 1, (unsigned)i);
                }
                CHECK(queued_ok, "one signature in flight, three waiting");
                /* The queue is full: refused at once, counted. */
                int r1 = sign(k), r2 = sign(k);
                hsm_token_concurrency c = conc(t);
                CHECK(r1 == -EBUSY && r2 == -EBUSY && c.shed_queue_full == 2,
                      "a full queue refuses at once (%d, %d), counted (%llu)", r1, r2, (unsigned long long)c.shed_queue_full);
                CHECK(failures(k, HSM_REASON_QUEUE) == 2 && failures(k, HSM_REASON_RATE) == 0,
                      "the key's usage counts both under reason queue (%llu)", (unsigned long long)failures(k, HSM_REASON_QUEUE));
                for (int i = 0; i < 4; i++)
                        pthread_join(th[i], NULL);
                bool all_ok = true;
                for (int i = 0; i < 4; i++)
                        all_ok &= o[i].r == 0;
                CHECK(all_ok && n_order == 4 && order[0] == 0 && order[1] == 1 && order[2] == 2 && order[3] == 3,
                      "served in arrival order: %d %d %d %d", order[0], order[1], order[2], order[3]);

                /* A deadline the queue cannot meet: shed at once, before
                 * any wait (the recent latency is ~150 ms). */
                hsm_token_watch w = { 0 };
                n_order = 0;
                o[0] = (struct ordered){ k, 0, 0 };
                pthread_create(&th[0], NULL, ordered_thread, &o[0]);
                bool busy = wait_for(t, 1, 0);
                hsm_token_watch_thread(&w);
                w.deadline_ns = hsm_now_ns() + 20000000u; /* 20 ms */
                int r = sign(k);
                c = conc(t);
                CHECK(busy && r == -ETIMEDOUT && w.shed == -ETIMEDOUT && c.shed_deadline == 1,
                      "an operation that cannot start before its deadline is shed (%d, shed %d, counted %llu)", r, w.shed,
                      (unsigned long long)c.shed_deadline);
                CHECK(failures(k, HSM_REASON_DEADLINE) == 1 && failures(k, HSM_REASON_QUEUE) == 2,
                      "... under reason deadline (%llu)", (unsigned long long)failures(k, HSM_REASON_DEADLINE));
                /* One that can wait for its turn gets it. */
                w.shed = 0;
                w.deadline_ns = hsm_now_ns() + 20000000000ull;
                r = sign(k);
                CHECK(r == 0 && w.shed == 0, "with time to wait, it is served (%d)", r);
                hsm_token_watch_thread(NULL);
                pthread_join(th[0], NULL);
                hsm_key_unref(k);
                hsm_token_unref(t);
        }

        /* 4. The per-key rate: 5 a second, 40 signatures as fast as they
         * go. */
        {
                t = open_slow(8, NULL, &k);
                CHECK(hsm_token_set_concurrency(t, 0, 0, 0, 5) == 0, "key rate 5 operations a second");
                uint64_t t0 = hsm_now_ns();
                int ok = 0, refused = 0, other = 0;
                for (int i = 0; i < 40; i++) {
                        int r = sign(k);
                        if (r == 0)
                                ok++;
                        else if (r == -EBUSY)
                                refused++;
                        else
                                other++;
                }
                double secs = (double)(hsm_now_ns() - t0) / 1e9;
                hsm_token_concurrency c = conc(t);
                int most = 5 + (int)(secs * 5) + 1;
                CHECK(other == 0 && ok >= 5 && ok <= most && refused == 40 - ok && c.rate_refused == (uint64_t)refused,
                      "past the rate refused at once: %d served (at most %d in %.2f s), %d refused, counted %llu", ok, most,
                      secs, refused, (unsigned long long)c.rate_refused);
                CHECK(c.key_ops_per_second == 5, "the rate is reported (%u)", c.key_ops_per_second);
                CHECK(failures(k, HSM_REASON_RATE) == (uint64_t)refused && failures(k, HSM_REASON_QUEUE) == 0 &&
                              hsm_usage_total(hsm_key_usage(k), HSM_OP_SIGN, HSM_RESULT_ERROR) == (uint64_t)refused,
                      "the refused ones are the key's errors, all under reason rate (%llu)",
                      (unsigned long long)failures(k, HSM_REASON_RATE));
                hsm_token_set_concurrency(t, 0, 0, 0, 0);
                CHECK(sign(k) == 0, "rate limit off again: served");
                hsm_key_unref(k);
                hsm_token_unref(t);
        }

        test_token_cleanup(&tt);
        return test_done();
}
