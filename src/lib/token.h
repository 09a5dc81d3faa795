/* Token layer: PKCS#11 modules through p11-kit, tokens and keys by RFC 7512
 * URI, one login per token, a pool of sessions per token, cached object
 * handles and recovery. The only part of hsmtls that calls C_* functions;
 * nothing above it includes pkcs11.h. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The public part (hsm_token_config, hsm_token_open/_ref/_unref, names,
 * hsm_token_find_key, hsm_key_ref/_unref and the key's properties, the key
 * enums, hsm_key_usage) is declared and documented in hsmtls.h. This header
 * adds what only the library, the daemon and the tests use. */
#include "hsmtls.h"
#include "usage.h"

/* hsm_token_open(), but the token found must be the one `same` is (its
 * serial number, manufacturer and model), checked before any session or
 * login (a reload opening a [token] again on the same URI and module); if
 * not, -EKEYREJECTED and *errmsg says what differs. same may be NULL. */
int hsm_token_open_same(const hsm_token_config *cfg, const hsm_token *same, hsm_token **ret, char **errmsg);
unsigned hsm_token_open_sessions(const hsm_token *t);
/* References held now (the daemon's keystore: whether a retired token is
 * still used by anything but itself). */
unsigned hsm_token_refs(const hsm_token *t);
unsigned hsm_key_refs(const hsm_key *k);
/* Closes the idle sessions of the pool (a token no one uses any more; the
 * last session of the process on the slot logs it out); returns how many.
 * A later operation would open a session again. */
unsigned hsm_token_close_sessions(hsm_token *t);

/* A thread's deadline for token operations, and where the token layer shows
 * what the thread is doing on a token, for a watchdog in another thread.
 * The owner thread registers it (hsm_token_watch_thread) and sets
 * deadline_ns (CLOCK_MONOTONIC, as hsm_now_ns(); 0: none). The wait for a
 * free session of the pool ends at the deadline (-ETIMEDOUT); without one it
 * ends after 30 s. While the thread holds a session (token calls running or
 * about to run), token points at the token and since_ns says since when;
 * read them with __atomic_load_n. */
typedef struct hsm_token_watch {
        uint64_t deadline_ns;
        hsm_token *token;
        uint64_t since_ns;
        /* Optional (the owner sets it): called with begin = 1 before the
         * thread waits in the token layer without using the CPU (its turn
         * in a token's queue, an operation on a token that mostly waits),
         * and with 0 when it goes on; a CPU scheduler can lend the thread's
         * CPU slot meanwhile. Always paired. */
        void (*off_cpu)(struct hsm_token_watch *w, int begin);
        /* Set by the token layer when it refused an operation of this
         * thread to shed load: -EBUSY (the token's queue was full, or the
         * key's rate), -ETIMEDOUT (it could not start before deadline_ns);
         * the owner clears it. */
        int shed;
} hsm_token_watch;
/* This thread's watch (NULL: none). The caller keeps w alive while set. */
void hsm_token_watch_thread(hsm_token_watch *w);
/* Counters of recovery actions, for tests and metrics. */
typedef struct hsm_token_stats {
        uint64_t sessions_opened;
        uint64_t sessions_reopened;
        uint64_t logins;
        uint64_t handles_refreshed;
        uint64_t state_changes;      /* state changes since the token was opened */
        uint64_t recoveries;         /* absent or failed -> ready */
        uint64_t module_reinits;     /* C_Finalize + C_Initialize done by this token's recovery */
        uint64_t recovery_attempts;  /* probes made by the recovery (found or not) */
        uint64_t last_recovery_ms;   /* from leaving ready to ready again, for the last recovery */
        uint64_t fast_failures;      /* operations refused at once because the token was not usable */
} hsm_token_stats;
void hsm_token_get_stats(hsm_token *t, hsm_token_stats *ret);
/* Closes every session this process has on the token (which also logs it
 * out). The pool reopens sessions and logs in again on next use. */
int hsm_token_drop_sessions(hsm_token *t);

/* RSA decryption (CKM_RSA_X_509 or CKM_RSA_PKCS) allowed by the key and
 * offered by the token; hsm_key_can_decrypt_raw(): CKM_RSA_X_509 (the
 * mechanism list says CKF_DECRYPT and CKA_ALLOWED_MECHANISMS, if the key has
 * it, lists it). */
bool hsm_key_can_decrypt(const hsm_key *k);
bool hsm_key_can_decrypt_raw(const hsm_key *k);
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

/* One test signature of a fixed message (RSA PKCS#1 v1.5, ECDSA, EdDSA),
 * not counted in the key's usage: 0 when the token answered it, negative
 * errno when it did not, -EOPNOTSUPP for a key that cannot be tried so (it
 * needs a context-specific login, may not sign, or the token lacks the
 * mechanism). The daemon's readiness check under systemd. */
int hsm_key_self_test(hsm_key *k);

/* One signature on the token. in: for RSA PKCS#1 v1.5 the DigestInfo, for
 * RSA-PSS and ECDSA the hash, for EdDSA the message. out must hold
 * hsm_key_signature_size() bytes. */
int hsm_key_sign(hsm_key *k, enum hsm_mech m, enum hsm_hash h,
                 const uint8_t *in, size_t in_len, uint8_t *out, size_t *out_len);
/* RSA decryption on the token, m = HSM_MECH_RSA_PKCS or HSM_MECH_RSA_X_509
 * (raw: out gets the whole padded block as the token returns it). out must
 * hold modulus bytes. Returns 0 when C_Decrypt was reached, whatever it
 * answered: *ret_ok is then all ones if it answered CKR_OK and 0 otherwise
 * (and *out_len is 0), computed without branches; C_Decrypt's answer is
 * never logged, retried or acted on, and always counted as ok. A negative
 * errno means C_Decrypt was not reached (no session, C_DecryptInit refused;
 * counted as an error). */
int hsm_key_decrypt(hsm_key *k, enum hsm_mech m, const uint8_t *in, size_t in_len, uint8_t *out, size_t *out_len,
                    uint32_t *ret_ok);
/* The synthetic TLS premaster for a ciphertext that does not decrypt to
 * one: HMAC-SHA384 of the ciphertext under a random secret made when the
 * key was loaded (the same ciphertext always gives the same 48 bytes). */
void hsm_key_synthetic_premaster(const hsm_key *k, const uint8_t *in, size_t in_len, uint8_t out[48]);

