#include "usage.h"

#include <stdlib.h>
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
};

hsm_usage *hsm_usage_new(void) { return calloc(1, sizeof(hsm_usage)); }
void hsm_usage_free(hsm_usage *u) { free(u); }

uint64_t hsm_now_ns(void)
{
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void hsm_usage_record(hsm_usage *u, enum hsm_op op, enum hsm_mech mech, enum hsm_result res, uint64_t ns)
{
        if (!u || op >= HSM_OP__MAX || mech >= HSM_MECH__MAX || res >= HSM_RESULT__MAX)
                return;
        struct slot *s = &u->s[op][mech][res];
        __atomic_add_fetch(&s->count, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&s->total_ns, ns, __ATOMIC_RELAXED);
        unsigned b = 0;
        while (b < HSM_USAGE_BUCKETS - 1 && ns > hsm_usage_bucket_ns[b])
                b++;
        __atomic_add_fetch(&s->hist[b], 1, __ATOMIC_RELAXED);
        uint64_t cur = __atomic_load_n(&s->max_ns, __ATOMIC_RELAXED);
        while (ns > cur && !__atomic_compare_exchange_n(&s->max_ns, &cur, ns, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                ;
}

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
