/* Token layer: PKCS#11 modules through p11-kit, tokens and keys by RFC 7512
 * URI, one login per token, a pool of sessions per token, cached object
 * handles and recovery. The only part of hsmtls that calls C_* functions;
 * nothing above it includes pkcs11.h. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "usage.h"

typedef struct hsm_token hsm_token;
typedef struct hsm_key hsm_key;

typedef struct hsm_token_config {
        const char *name;       /* for log lines; defaults to the token label */
        const char *uri;        /* pkcs11: URI naming the token (object attributes ignored) */
        const char *module;     /* registered p11-kit module name, a module path, or NULL for all registered modules */
        const char *pin_source; /* PIN source spec (see pin.h), or NULL: pin-source= of the URI, or no login */
        unsigned max_sessions;  /* 0: sized from the token's ulMaxSessionCount */
} hsm_token_config;

/* Opens (and logs in to) the token. On failure *errmsg (malloc'd, may be NULL)
 * explains why in words fit for an operator. */
int hsm_token_open(const hsm_token_config *cfg, hsm_token **ret, char **errmsg);
hsm_token *hsm_token_ref(hsm_token *t);
void hsm_token_unref(hsm_token *t);

const char *hsm_token_name(const hsm_token *t);
const char *hsm_token_label(const hsm_token *t);
unsigned hsm_token_max_sessions(const hsm_token *t);
unsigned hsm_token_open_sessions(const hsm_token *t);
/* Counters of recovery actions, for tests and metrics. */
typedef struct hsm_token_stats {
        uint64_t sessions_opened;
        uint64_t sessions_reopened;
        uint64_t logins;
        uint64_t handles_refreshed;
} hsm_token_stats;
void hsm_token_get_stats(hsm_token *t, hsm_token_stats *ret);
/* Closes every session this process has on the token (which also logs it
 * out). The pool reopens sessions and logs in again on next use. */
int hsm_token_drop_sessions(hsm_token *t);

enum hsm_key_type { HSM_KEY_RSA = 1, HSM_KEY_ECDSA, HSM_KEY_ED25519 };
enum hsm_curve { HSM_CURVE_NONE = 0, HSM_CURVE_P256, HSM_CURVE_P384, HSM_CURVE_P521, HSM_CURVE_ED25519 };

enum hsm_key_flag {
        HSM_KEY_SENSITIVE = 1 << 0,
        HSM_KEY_EXTRACTABLE = 1 << 1,
        HSM_KEY_ALWAYS_SENSITIVE = 1 << 2,
        HSM_KEY_NEVER_EXTRACTABLE = 1 << 3,
        HSM_KEY_ALWAYS_AUTHENTICATE = 1 << 4,
        HSM_KEY_CAN_SIGN = 1 << 5,
        HSM_KEY_CAN_DECRYPT = 1 << 6,
};

/* Finds exactly one private key on the token by its pkcs11: URI (object=,
 * id=, type=private). The token part of the URI, if any, must match. */
int hsm_token_find_key(hsm_token *t, const char *uri, hsm_key **ret, char **errmsg);

hsm_key *hsm_key_ref(hsm_key *k);
void hsm_key_unref(hsm_key *k);
hsm_token *hsm_key_token(const hsm_key *k);
const char *hsm_key_label(const hsm_key *k);
const char *hsm_key_uri(const hsm_key *k);
enum hsm_key_type hsm_key_type(const hsm_key *k);
enum hsm_curve hsm_key_curve(const hsm_key *k);
unsigned hsm_key_bits(const hsm_key *k);
unsigned hsm_key_flags(const hsm_key *k);
/* Whether the token offers the mechanism for this key (sign or decrypt). */
bool hsm_key_supports(const hsm_key *k, enum hsm_mech m);
/* Length of a raw signature (RSA: modulus bytes; ECDSA: r||s; Ed25519: 64). */
size_t hsm_key_signature_size(const hsm_key *k);

/* Public parts of the key as the token gives them. RSA: modulus and exponent.
 * ECDSA/Ed25519: DER EC parameters and the EC point (DER OCTET STRING or raw). */
typedef struct hsm_key_public {
        uint8_t *modulus, *exponent, *ec_params, *ec_point;
        size_t modulus_len, exponent_len, ec_params_len, ec_point_len;
} hsm_key_public;
int hsm_key_get_public(hsm_key *k, hsm_key_public *ret);
void hsm_key_public_done(hsm_key_public *p);

/* One signature on the token. in: for RSA PKCS#1 v1.5 the DigestInfo, for
 * RSA-PSS and ECDSA the hash, for EdDSA the message. out must hold
 * hsm_key_signature_size() bytes. */
int hsm_key_sign(hsm_key *k, enum hsm_mech m, enum hsm_hash h,
                 const uint8_t *in, size_t in_len, uint8_t *out, size_t *out_len);
/* RSA PKCS#1 v1.5 decryption on the token. out must hold modulus bytes.
 * A padding failure is returned as -EBADMSG and never logged above debug. */
int hsm_key_decrypt(hsm_key *k, const uint8_t *in, size_t in_len, uint8_t *out, size_t *out_len);

/* Usage counters (see usage.h). */
hsm_usage *hsm_key_usage(hsm_key *k);
