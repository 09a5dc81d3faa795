/* Key administration on a token, for the admin API: what the token is and
 * offers, every private key on it, key pairs generated on it, keys deleted
 * from it, and PKCS#10 requests signed by its keys. Separate from token.c and
 * key.c (the handshake path); C_* calls still go through P11(). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hsmtls.h"

typedef struct hsm_token_info {
        char label[33], manufacturer[33], model[17], serial[17];
        unsigned long slot_id;
        unsigned long flags;      /* CKF_* token flags */
        bool present;             /* C_GetTokenInfo answered */
        bool logged_in;           /* a pool session is in a user state (or no login is needed) */
        bool login_required;
        unsigned sessions_open, sessions_idle, sessions_max;
} hsm_token_info;
int hsm_token_get_info(hsm_token *t, hsm_token_info *ret);
/* Names of the CKF_* token flags set in flags ("rng", "login_required"...):
 * fills names[0..max-1], returns how many. */
unsigned hsm_token_flag_names(unsigned long flags, const char **names, unsigned max);

typedef struct hsm_mech_desc {
        char name[40];            /* "CKM_ECDSA", or "0x..." */
        unsigned long min_key_size, max_key_size;
        unsigned long flags;      /* CKF_* mechanism flags */
} hsm_mech_desc;
/* The token's mechanisms (malloc'd array in *ret, count returned). */
int hsm_token_mechanisms(hsm_token *t, hsm_mech_desc **ret);
unsigned hsm_mech_flag_names(unsigned long flags, const char **names, unsigned max);

/* Every private key on the token that may sign, each opened as an hsm_key
 * (one reference each). */
typedef struct hsm_key_entry {
        hsm_key *key;
        uint8_t id[64];
        size_t id_len;
        char *label;
} hsm_key_entry;
int hsm_token_list_keys(hsm_token *t, hsm_key_entry **ret, size_t *ret_n);
void hsm_key_entries_free(hsm_key_entry *e, size_t n);
/* SHA-256 of the key's SubjectPublicKeyInfo (DER). */
int hsm_key_spki_sha256(hsm_key *k, uint8_t out[32]);

/* A key pair generated on the token: the private key CKA_TOKEN, CKA_PRIVATE,
 * CKA_SENSITIVE, not CKA_EXTRACTABLE, may sign (RSA: and decrypt); the
 * public key on the token too, same CKA_LABEL and CKA_ID. */
typedef struct hsm_keygen {
        enum hsm_key_type type;
        unsigned bits;            /* RSA: 2048, 3072, 4096 */
        enum hsm_curve curve;     /* ECDSA: P256, P384; Ed25519: ED25519 */
        const char *label;
        const uint8_t *id;
        size_t id_len;
} hsm_keygen;
/* Returns 0, -EEXIST (a private key with that label or id is already on the
 * token: nothing made), -EOPNOTSUPP (the token cannot make that key),
 * -EINVAL, or another negative errno code; *errmsg says why. */
int hsm_token_generate_key(hsm_token *t, const hsm_keygen *g, char **errmsg);
/* Destroys the private and public key objects with CKA_ID id. -ENOENT when
 * there is no private key with that id. */
int hsm_token_delete_key(hsm_token *t, const uint8_t *id, size_t id_len, char **errmsg);

/* A certificate (DER) stored on the token as a CKO_CERTIFICATE next to its
 * key (same CKA_ID), and removed again (every certificate object with this
 * value; -ENOENT when there is none). */
int hsm_token_store_certificate(hsm_token *t, const uint8_t *id, size_t id_len, const char *label,
                                const gnutls_datum_t *der, char **errmsg);
int hsm_token_delete_certificate(hsm_token *t, const gnutls_datum_t *der, char **errmsg);

/* A PKCS#10 request for the key's public key, signed on the token.
 * subject: RFC 4514 DN; the SAN lists are NULL-terminated (or NULL).
 * -EINVAL with *errmsg naming the bad part (field: "subject", "dns", "ip",
 * "email", "uri" in *ret_field). *ret_pem: malloc'd PEM. */
typedef struct hsm_csr_request {
        const char *subject;
        const char *const *dns, *const *ip, *const *email, *const *uri;
} hsm_csr_request;
int hsm_key_make_csr(hsm_key *k, const hsm_csr_request *req, char **ret_pem, const char **ret_field, char **errmsg);
