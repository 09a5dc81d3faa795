/* Per-key usage accounting: operation, mechanism, result, latency. In
 * memory, lock-free on the hot path. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

/* The public part (enum hsm_op, hsm_mech, hsm_result, hsm_usage_entry,
 * hsm_usage_snapshot, hsm_usage_total, the names) is in hsmtls.h. */
#include "hsmtls.h"

enum hsm_hash { HSM_HASH_NONE = 0, HSM_HASH_SHA256, HSM_HASH_SHA384, HSM_HASH_SHA512 };

hsm_usage *hsm_usage_new(void);
void hsm_usage_free(hsm_usage *u);
/* One operation: ok (why HSM_REASON_NONE) or failed for reason why (counted
 * as HSM_RESULT_ERROR and under its reason); ns, its duration. */
void hsm_usage_record(hsm_usage *u, enum hsm_op op, enum hsm_mech mech, enum hsm_reason why, uint64_t ns);
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

/* Time waiting for a session of the key's token (lock-free like the
 * counters), in the same buckets; and the wall-clock time of the last
 * operation (Unix nanoseconds, 0: never in this run). */
void hsm_usage_wait(hsm_usage *u, uint64_t ns);
void hsm_usage_waits(hsm_usage *u, uint64_t hist[HSM_USAGE_BUCKETS], uint64_t *count, uint64_t *total_ns);
uint64_t hsm_usage_last_use(hsm_usage *u);

/* ------------------------------------------------------------ handshakes */

/* Handshakes of one listener or connector, by TLS version, result and
 * resumption, and the full handshakes per key: in memory, lock-free (one
 * relaxed atomic add per handshake, two for a full one). The label sets are
 * fixed (versions, results, resumed) or bounded by HSM_HS_KEYS. */
enum hsm_tls_version { HSM_TLSV_UNKNOWN = 0, HSM_TLSV_1_2, HSM_TLSV_1_3, HSM_TLSV_OTHER, HSM_TLSV__MAX };
#define HSM_HS_KEYS 16
#define HSM_HS_URI 256

struct hsm_hs_key {
        unsigned state;      /* 0 free, 1 being claimed, 2 in use (uri, label set) */
        uint32_t hash;       /* of uri */
        char uri[HSM_HS_URI]; /* the key's URI (cut at HSM_HS_URI - 1) */
        char label[64];
        uint64_t handshakes; /* full handshakes made with this key's chain (each signed or decrypted once with it) */
};

typedef struct hsm_hs_counters {
        uint64_t n[HSM_TLSV__MAX][2][2]; /* version, result (0 ok, 1 error), resumed */
        struct hsm_hs_key keys[HSM_HS_KEYS];
        uint64_t keys_dropped;           /* full handshakes of keys past HSM_HS_KEYS */
} hsm_hs_counters;

enum hsm_tls_version hsm_tls_version_of(int gnutls_protocol);
const char *hsm_tls_version_name(enum hsm_tls_version v); /* "TLSv1.2"..., "unknown" */
/* One handshake ended: ok or failed, resumed or not; key (may be NULL)
 * the token key whose chain a full handshake that succeeded used. */
void hsm_hs_record(hsm_hs_counters *c, enum hsm_tls_version v, bool ok, bool resumed, hsm_key *key);
uint64_t hsm_hs_get(const hsm_hs_counters *c, enum hsm_tls_version v, bool ok, bool resumed);
