#include "usage.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/gnutls.h>
#include <time.h>

struct slot {
        uint64_t count, total_ns, max_ns;
        uint64_t hist[HSM_USAGE_BUCKETS]; /* operations per duration bucket (not cumulative) */
};

/* Upper bounds of the duration buckets (the last bucket is everything
 * longer): 100 us to 5 s, the spread from SoftHSM to a slow network HSM. */
const uint64_t hsm_usage_bucket_ns[HSM_USAGE_BUCKETS - 1] = {
        100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000, 25000000,
        50000000, 100000000, 250000000, 500000000, 1000000000, 2500000000u, 5000000000u,
};

struct hsm_usage {
        struct slot s[HSM_OP__MAX][HSM_MECH__MAX][HSM_RESULT__MAX];
        /* The errors of s[op][mech][HSM_RESULT_ERROR] by reason: a count
         * each, no durations (8 bytes a reason, not a slot's 152: 960
         * bytes a key for the 12 reasons). */
        uint64_t fail[HSM_OP__MAX][HSM_MECH__MAX][HSM_REASON__MAX];
        /* waits for a session (not cumulative buckets, like hist) */
        uint64_t wait_hist[HSM_USAGE_BUCKETS], wait_count, wait_total_ns;
        uint64_t last_use_ns; /* CLOCK_REALTIME */
};

hsm_usage *hsm_usage_new(void) { return calloc(1, sizeof(hsm_usage)); }
void hsm_usage_free(hsm_usage *u) { free(u); }

uint64_t hsm_now_ns(void)
{
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static unsigned bucket_of(uint64_t ns);

void hsm_usage_record(hsm_usage *u, enum hsm_op op, enum hsm_mech mech, enum hsm_reason why, uint64_t ns)
{
        if (!u || op >= HSM_OP__MAX || mech >= HSM_MECH__MAX || why >= HSM_REASON__MAX)
                return;
        struct slot *s = &u->s[op][mech][why == HSM_REASON_NONE ? HSM_RESULT_OK : HSM_RESULT_ERROR];
        if (why != HSM_REASON_NONE)
                __atomic_add_fetch(&u->fail[op][mech][why], 1, __ATOMIC_RELAXED);
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        __atomic_store_n(&u->last_use_ns, (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec, __ATOMIC_RELAXED);
        __atomic_add_fetch(&s->count, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&s->total_ns, ns, __ATOMIC_RELAXED);
        __atomic_add_fetch(&s->hist[bucket_of(ns)], 1, __ATOMIC_RELAXED);
        uint64_t cur = __atomic_load_n(&s->max_ns, __ATOMIC_RELAXED);
        while (ns > cur && !__atomic_compare_exchange_n(&s->max_ns, &cur, ns, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                ;
}

static unsigned bucket_of(uint64_t ns)
{
        unsigned b = 0;
        while (b < HSM_USAGE_BUCKETS - 1 && ns > hsm_usage_bucket_ns[b])
                b++;
        return b;
}

void hsm_usage_wait(hsm_usage *u, uint64_t ns)
{
        if (!u)
                return;
        __atomic_add_fetch(&u->wait_hist[bucket_of(ns)], 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&u->wait_total_ns, ns, __ATOMIC_RELAXED);
        __atomic_add_fetch(&u->wait_count, 1, __ATOMIC_RELAXED);
}

void hsm_usage_waits(hsm_usage *u, uint64_t hist[HSM_USAGE_BUCKETS], uint64_t *count, uint64_t *total_ns)
{
        for (unsigned b = 0; b < HSM_USAGE_BUCKETS; b++)
                hist[b] = u ? __atomic_load_n(&u->wait_hist[b], __ATOMIC_RELAXED) : 0;
        *count = u ? __atomic_load_n(&u->wait_count, __ATOMIC_RELAXED) : 0;
        *total_ns = u ? __atomic_load_n(&u->wait_total_ns, __ATOMIC_RELAXED) : 0;
}

uint64_t hsm_usage_last_use(hsm_usage *u) { return u ? __atomic_load_n(&u->last_use_ns, __ATOMIC_RELAXED) : 0; }

int hsm_usage_snapshot(hsm_usage *u, hsm_usage_entry *ret, int max)
{
        int n = 0;
        for (int o = 0; o < HSM_OP__MAX; o++)
                for (int m = 0; m < HSM_MECH__MAX; m++)
                        for (int r = 0; r < HSM_RESULT__MAX; r++) {
                                struct slot *s = &u->s[o][m][r];
                                uint64_t c = __atomic_load_n(&s->count, __ATOMIC_RELAXED);
                                if (!c || n >= max)
                                        continue;
                                ret[n++] = (hsm_usage_entry){
                                        .op = o, .mech = m, .result = r, .count = c,
                                        .total_ns = __atomic_load_n(&s->total_ns, __ATOMIC_RELAXED),
                                        .max_ns = __atomic_load_n(&s->max_ns, __ATOMIC_RELAXED),
                                };
                        }
        return n;
}

void hsm_usage_histogram(hsm_usage *u, enum hsm_op op, enum hsm_mech mech, enum hsm_result res,
                         uint64_t ret[HSM_USAGE_BUCKETS])
{
        for (unsigned b = 0; b < HSM_USAGE_BUCKETS; b++)
                ret[b] = u && op < HSM_OP__MAX && mech < HSM_MECH__MAX && res < HSM_RESULT__MAX
                                 ? __atomic_load_n(&u->s[op][mech][res].hist[b], __ATOMIC_RELAXED)
                                 : 0;
}

uint64_t hsm_usage_quantile_ns(const uint64_t hist[HSM_USAGE_BUCKETS], double q)
{
        uint64_t total = 0, seen = 0;
        for (unsigned b = 0; b < HSM_USAGE_BUCKETS; b++)
                total += hist[b];
        if (!total)
                return 0;
        for (unsigned b = 0; b < HSM_USAGE_BUCKETS; b++) {
                seen += hist[b];
                if ((double)seen >= q * (double)total)
                        return b < HSM_USAGE_BUCKETS - 1 ? hsm_usage_bucket_ns[b] : UINT64_MAX;
        }
        return UINT64_MAX;
}

uint64_t hsm_usage_total(hsm_usage *u, enum hsm_op op, int res)
{
        uint64_t t = 0;
        for (int m = 0; m < HSM_MECH__MAX; m++)
                for (int r = 0; r < HSM_RESULT__MAX; r++)
                        if (res < 0 || res == r)
                                t += __atomic_load_n(&u->s[op][m][r].count, __ATOMIC_RELAXED);
        return t;
}

uint64_t hsm_usage_failures(hsm_usage *u, enum hsm_op op, enum hsm_mech mech, enum hsm_reason why)
{
        if (!u || op >= HSM_OP__MAX || mech >= HSM_MECH__MAX || why >= HSM_REASON__MAX)
                return 0;
        return __atomic_load_n(&u->fail[op][mech][why], __ATOMIC_RELAXED);
}

const char *hsm_op_name(enum hsm_op op)
{
        static const char *const n[] = { "sign", "decrypt" };
        return op < HSM_OP__MAX ? n[op] : "?";
}

const char *hsm_mech_name(enum hsm_mech m)
{
        static const char *const n[] = { "CKM_RSA_PKCS", "CKM_RSA_PKCS_PSS", "CKM_ECDSA", "CKM_EDDSA", "CKM_RSA_X_509" };
        return m < HSM_MECH__MAX ? n[m] : "?";
}

const char *hsm_result_name(enum hsm_result r)
{
        return r == HSM_RESULT_OK ? "ok" : "error";
}

const char *hsm_reason_name(enum hsm_reason why)
{
        static const char *const n[] = { "none",    "rate",      "queue",       "deadline", "absent", "failed",
                                         "login",   "session",   "key",         "mechanism", "token_error", "late" };
        _Static_assert(sizeof(n) / sizeof(n[0]) == HSM_REASON__MAX, "a name for every reason");
        return why < HSM_REASON__MAX ? n[why] : "?";
}

/* ------------------------------------------------------------ handshakes */

enum hsm_tls_version hsm_tls_version_of(int p)
{
        switch (p) {
        case GNUTLS_TLS1_2:
                return HSM_TLSV_1_2;
        case GNUTLS_TLS1_3:
                return HSM_TLSV_1_3;
        case 0:
        case GNUTLS_VERSION_UNKNOWN:
                return HSM_TLSV_UNKNOWN;
        default:
                return HSM_TLSV_OTHER;
        }
}

const char *hsm_tls_version_name(enum hsm_tls_version v)
{
        static const char *const n[] = { "unknown", "TLSv1.2", "TLSv1.3", "other" };
        return v < HSM_TLSV__MAX ? n[v] : "unknown";
}

static uint32_t fnv1a(const char *s)
{
        uint32_t h = 2166136261u;
        for (; *s; s++)
                h = (h ^ (unsigned char)*s) * 16777619u;
        return h;
}

/* The slot of key's URI, claimed on first use (a compare-and-swap: the
 * first handshake of each key per listener writes its URI once; after
 * that, a hash and a string compare). NULL when the table is full. */
static struct hsm_hs_key *key_slot(hsm_hs_counters *c, hsm_key *key)
{
        const char *uri = hsm_key_uri(key);
        char cut[HSM_HS_URI];
        snprintf(cut, sizeof(cut), "%s", uri);
        uint32_t h = fnv1a(cut);
        for (unsigned i = 0; i < HSM_HS_KEYS; i++) {
                struct hsm_hs_key *k = &c->keys[i];
                unsigned st = __atomic_load_n(&k->state, __ATOMIC_ACQUIRE);
                if (st == 0) {
                        unsigned zero = 0;
                        if (__atomic_compare_exchange_n(&k->state, &zero, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                                memcpy(k->uri, cut, sizeof(cut));
                                snprintf(k->label, sizeof(k->label), "%s", hsm_key_label(key));
                                k->hash = h;
                                __atomic_store_n(&k->state, 2, __ATOMIC_RELEASE);
                                return k;
                        }
                        st = zero;
                }
                /* Another thread is writing this slot: wait for it (a few
                 * stores), it may be ours. */
                while (st == 1)
                        st = __atomic_load_n(&k->state, __ATOMIC_ACQUIRE);
                if (k->hash == h && strcmp(k->uri, cut) == 0)
                        return k;
        }
        return NULL;
}

void hsm_hs_record(hsm_hs_counters *c, enum hsm_tls_version v, bool ok, bool resumed, hsm_key *key)
{
        if (!c)
                return;
        if (v >= HSM_TLSV__MAX)
                v = HSM_TLSV_UNKNOWN;
        __atomic_add_fetch(&c->n[v][ok ? 0 : 1][resumed ? 1 : 0], 1, __ATOMIC_RELAXED);
        if (!key || resumed || !ok)
                return;
        struct hsm_hs_key *k = key_slot(c, key);
        if (k)
                __atomic_add_fetch(&k->handshakes, 1, __ATOMIC_RELAXED);
        else
                __atomic_add_fetch(&c->keys_dropped, 1, __ATOMIC_RELAXED);
}

uint64_t hsm_hs_get(const hsm_hs_counters *c, enum hsm_tls_version v, bool ok, bool resumed)
{
        return c && v < HSM_TLSV__MAX ? __atomic_load_n(&c->n[v][ok ? 0 : 1][resumed ? 1 : 0], __ATOMIC_RELAXED) : 0;
}
