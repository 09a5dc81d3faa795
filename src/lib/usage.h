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
