/* Per-key usage accounting: operation, mechanism, result, latency. In
 * memory, lock-free on the hot path. */
#pragma once

#include <stdint.h>

/* The public part (enum hsm_op, hsm_mech, hsm_result, hsm_usage_entry,
 * hsm_usage_snapshot, hsm_usage_total, the names) is in hsmtls.h. */
#include "hsmtls.h"

enum hsm_hash { HSM_HASH_NONE = 0, HSM_HASH_SHA256, HSM_HASH_SHA384, HSM_HASH_SHA512 };

hsm_usage *hsm_usage_new(void);
void hsm_usage_free(hsm_usage *u);
void hsm_usage_record(hsm_usage *u, enum hsm_op op, enum hsm_mech mech, enum hsm_result res, uint64_t ns);
uint64_t hsm_now_ns(void);

/* Durations per counter, in buckets (lock-free like the counters; one more
 * relaxed atomic add per operation). Bucket b holds operations that took at
 * most hsm_usage_bucket_ns[b] (and more than the bound before); the last
 * bucket holds the longer ones. */
#define HSM_USAGE_BUCKETS 16
extern const uint64_t hsm_usage_bucket_ns[HSM_USAGE_BUCKETS - 1];
void hsm_usage_histogram(hsm_usage *u, enum hsm_op op, enum hsm_mech mech, enum hsm_result res,
                         uint64_t ret[HSM_USAGE_BUCKETS]);
/* The upper bound of the bucket that holds quantile q (0..1) of hist: the
 * q-quantile is at most this. 0 for no operation; UINT64_MAX past the last
 * bound. */
uint64_t hsm_usage_quantile_ns(const uint64_t hist[HSM_USAGE_BUCKETS], double q);
