/* Per-key usage accounting: operation, mechanism, result, latency. In
 * memory, lock-free on the hot path. */
#pragma once

#include <stdint.h>

enum hsm_op { HSM_OP_SIGN = 0, HSM_OP_DECRYPT, HSM_OP__MAX };
enum hsm_mech { HSM_MECH_RSA_PKCS = 0, HSM_MECH_RSA_PKCS_PSS, HSM_MECH_ECDSA, HSM_MECH_EDDSA, HSM_MECH__MAX };
enum hsm_result { HSM_RESULT_OK = 0, HSM_RESULT_ERROR, HSM_RESULT__MAX };
enum hsm_hash { HSM_HASH_NONE = 0, HSM_HASH_SHA256, HSM_HASH_SHA384, HSM_HASH_SHA512 };

typedef struct hsm_usage hsm_usage;

typedef struct hsm_usage_entry {
        enum hsm_op op;
        enum hsm_mech mech;
        enum hsm_result result;
        uint64_t count;
        uint64_t total_ns;
        uint64_t max_ns;
} hsm_usage_entry;

hsm_usage *hsm_usage_new(void);
void hsm_usage_free(hsm_usage *u);
void hsm_usage_record(hsm_usage *u, enum hsm_op op, enum hsm_mech mech, enum hsm_result res, uint64_t ns);
/* Copies the non-zero counters into ret (at most max entries); returns the count. */
int hsm_usage_snapshot(hsm_usage *u, hsm_usage_entry *ret, int max);
/* Sum of counts for op (any mechanism) with result, or any result if res < 0. */
uint64_t hsm_usage_total(hsm_usage *u, enum hsm_op op, int res);

const char *hsm_op_name(enum hsm_op op);
const char *hsm_mech_name(enum hsm_mech m);
const char *hsm_result_name(enum hsm_result r);
uint64_t hsm_now_ns(void);
