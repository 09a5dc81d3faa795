/* hsmtls.h - the public API of libhsmtls.
 *
 * libhsmtls turns a private key that lives on a PKCS#11 token (smartcard,
 * HSM, SoftHSM) into a GnuTLS gnutls_privkey_t. Signatures (and RSA PKCS#1
 * v1.5 decryption) run on the token through a pool of sessions, with one
 * login per token and recovery from lost sessions, logins and handles; every
 * operation is counted per key (operation, mechanism, result, latency).
 *
 *     #include <hsmtls.h>
 *     cc prog.c $(pkg-config --cflags --libs hsmtls)
 *
 * Typical use:
 *
 *     hsm_token_config cfg = { .uri = "pkcs11:token=hsmtls", .module = "softhsm2",
 *                              .pin_source = "file:/etc/hsmtls/pin" };
 *     hsm_token *tok; hsm_key *key; gnutls_privkey_t pk; char *err = NULL;
 *     if (hsm_token_open(&cfg, &tok, &err) < 0) { fprintf(stderr, "%s\n", err); ... }
 *     hsm_token_find_key(tok, "pkcs11:object=p256;type=private", &key, &err);
 *     hsm_privkey_import(key, &pk);      // use pk like any gnutls_privkey_t
 *     ...
 *     gnutls_privkey_deinit(pk);         // or let GnuTLS credentials own it
 *     hsm_key_unref(key);
 *     hsm_token_unref(tok);
 *
 * Conventions:
 * - Functions that can fail return int: 0 (or more) on success, a negative
 *   errno-style code on failure (-EINVAL, -ENOENT, -EACCES, ...). Output
 *   parameters ret_* are left untouched on failure.
 * - Where a function takes char **errmsg, a failure may store there a
 *   malloc'd sentence fit for an operator (free() it); *errmsg is set to
 *   NULL first, and it may stay NULL. errmsg itself may be NULL.
 * - Tokens and keys are reference counted: *_unref() drops one reference and
 *   accepts NULL. A key holds a reference on its token, and a
 *   gnutls_privkey_t made by hsm_privkey_import() holds one on its key, so
 *   they may be dropped in any order.
 * - A token, its keys and their privkeys may be used from many threads at
 *   once. Open tokens after fork(), not before.
 * - PINs are read from a PIN source when a login needs it, used once and
 *   wiped; they never appear in log lines or error messages. A refused PIN is
 *   never retried (the token would lock).
 * - Only symbols named hsm_* are exported, in the ELF version node
 *   HSMTLS_0.1. The layout of the structures below is part of the ABI of
 *   soname libhsmtls.so.0.
 * - This header does not include pkcs11.h: nothing here is a PKCS#11 type.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <gnutls/abstract.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#ifndef HSM_EXPORT
#if defined(__GNUC__) && __GNUC__ >= 4
#define HSM_EXPORT __attribute__((visibility("default")))
#else
#define HSM_EXPORT
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------ version */

/* The library's version, e.g. "0.1.0" (a static string). */
HSM_EXPORT const char *hsm_version(void);

/* ------------------------------------------------------------ logging */

/* The library writes log lines to stderr, one write per line:
 * "2024-01-01T00:00:00.000Z IDENT[PID]: LEVEL: message". Lower layers log
 * at debug level only (e.g. every failing PKCS#11 call with its CKR_*). */
enum hsm_log_level {
        HSM_LOG_ERR = 3,
        HSM_LOG_WARNING = 4,
        HSM_LOG_NOTICE = 5,
        HSM_LOG_INFO = 6,
        HSM_LOG_DEBUG = 7,
};

/* Lines above level are dropped (default HSM_LOG_INFO). Thread-safe. */
HSM_EXPORT void hsm_log_set_level(int level);
HSM_EXPORT int hsm_log_get_level(void);
/* "error", "warning", "notice", "info", "debug" (any case) -> the level, or
 * -EINVAL. */
HSM_EXPORT int hsm_log_level_from_string(const char *s);
/* The IDENT of log lines (default "hsmtls"). The string is not copied: it
 * must stay valid for as long as the library may log. */
HSM_EXPORT void hsm_log_set_ident(const char *ident);

/* ------------------------------------------------------------ usage counters */

enum hsm_op { HSM_OP_SIGN = 0, HSM_OP_DECRYPT, HSM_OP__MAX };
/* HSM_MECH_RSA_X_509 (raw RSA) is used only for decryption: the TLS premaster
 * is unpadded by libhsmtls in constant time (see hsm_privkey_import()). */
enum hsm_mech { HSM_MECH_RSA_PKCS = 0, HSM_MECH_RSA_PKCS_PSS, HSM_MECH_ECDSA, HSM_MECH_EDDSA, HSM_MECH_RSA_X_509, HSM_MECH__MAX };
enum hsm_result { HSM_RESULT_OK = 0, HSM_RESULT_ERROR, HSM_RESULT__MAX };
/* Why an operation failed (each one counted with result HSM_RESULT_ERROR
 * has exactly one reason; see hsm_usage_failures()). A fixed set, in the
 * order the operation meets them:
 *   rate         refused: the key is over the token's key_ops_per_second
 *   queue        shed: the token's queue of waiting operations was full
 *   deadline     no turn of the token, or no free session of its pool,
 *                before the caller's deadline (e.g. a handshake timeout)
 *   absent       the token is absent or was removed (its state, or the
 *                token answered CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT...)
 *   failed       the token or its module has failed (state failed, or the
 *                module is being initialised again)
 *   login        no login: the PIN was refused or is locked (the token is
 *                locked, the PIN not tried again), a lost login could not
 *                be redone, a context-specific login failed
 *   session      no session could be opened or kept (C_OpenSession failed,
 *                lost again after reopening, CKR_SESSION_COUNT, an
 *                operation left active on the replacement too)
 *   key          the key is not (or not uniquely) on the token any more
 *   mechanism    the token refused the mechanism for this key
 *                (CKR_MECHANISM_INVALID, CKR_KEY_FUNCTION_NOT_PERMITTED...)
 *   token_error  the token answered another error (CKR_DEVICE_ERROR,
 *                CKR_GENERAL_ERROR, CKR_FUNCTION_FAILED...)
 *   late         the token answered, but after the caller's deadline (a hung
 *                or very slow token): the answer came too late to be used
 * HSM_REASON_NONE is no failure (an operation that succeeded). */
enum hsm_reason {
        HSM_REASON_NONE = 0,
        HSM_REASON_RATE,
        HSM_REASON_QUEUE,
        HSM_REASON_DEADLINE,
        HSM_REASON_ABSENT,
        HSM_REASON_FAILED,
        HSM_REASON_LOGIN,
        HSM_REASON_SESSION,
        HSM_REASON_KEY,
        HSM_REASON_MECHANISM,
        HSM_REASON_TOKEN_ERROR,
        HSM_REASON_LATE,
        HSM_REASON__MAX
};

/* The usage counters of one key (see hsm_key_usage()). Lock-free: reading
 * them never slows down the key's operations. */
typedef struct hsm_usage hsm_usage;

/* One counter: how many operations op with mechanism mech ended with
 * result, and how long they took on the token (nanoseconds). */
typedef struct hsm_usage_entry {
        enum hsm_op op;
        enum hsm_mech mech;
        enum hsm_result result;
        uint64_t count;
        uint64_t total_ns;
        uint64_t max_ns;
} hsm_usage_entry;

/* Copies the non-zero counters of u into ret[0..max-1] and returns how many
 * it copied (0..max; never negative). Counters beyond max are left out; a
 * ret of HSM_OP__MAX * HSM_MECH__MAX * HSM_RESULT__MAX entries always holds
 * them all. */
HSM_EXPORT int hsm_usage_snapshot(hsm_usage *u, hsm_usage_entry *ret, int max);
/* Sum of the counts of operation op (any mechanism) that ended with result
 * res (an enum hsm_result), or with any result if res < 0. */
HSM_EXPORT uint64_t hsm_usage_total(hsm_usage *u, enum hsm_op op, int res);
/* Failed operations op with mechanism mech whose reason was why (since the
 * key was found; 0 for HSM_REASON_NONE or out of range). Summed over the
 * reasons, they are the HSM_RESULT_ERROR counts of hsm_usage_snapshot(). */
HSM_EXPORT uint64_t hsm_usage_failures(hsm_usage *u, enum hsm_op op, enum hsm_mech mech, enum hsm_reason why);

/* Names for log lines and output (static strings; "?" when out of range):
 * "sign"/"decrypt"; "CKM_RSA_PKCS", "CKM_RSA_PKCS_PSS", "CKM_ECDSA",
 * "CKM_EDDSA", "CKM_RSA_X_509"; "ok"/"error"; the reasons above ("rate",
 * "queue", ..., "late"; "none" for HSM_REASON_NONE). */
HSM_EXPORT const char *hsm_op_name(enum hsm_op op);
HSM_EXPORT const char *hsm_mech_name(enum hsm_mech m);
HSM_EXPORT const char *hsm_result_name(enum hsm_result r);
HSM_EXPORT const char *hsm_reason_name(enum hsm_reason why);

/* ------------------------------------------------------------ tokens */

typedef struct hsm_token hsm_token;
typedef struct hsm_key hsm_key;

/* What hsm_token_open() opens. Zero-initialise it and set what you need;
 * the strings are copied, they need not outlive the call. */
typedef struct hsm_token_config {
        const char *name;       /* for log lines and errors; NULL: the URI */
        const char *uri;        /* RFC 7512 pkcs11: URI naming exactly one token (token=, serial=,
                                 * model=, manufacturer=, slot-id=...; object attributes are ignored;
                                 * module-name=/module-path= and pin-source= are understood;
                                 * pin-value= is refused). Required. */
        const char *module;     /* a registered p11-kit module name ("softhsm2"), or the path of a
                                 * PKCS#11 module; NULL: the URI's module-*=, else every module
                                 * registered with p11-kit */
        const char *pin_source; /* "file:PATH" (a regular file), "env:VARIABLE" or "credential:NAME"
                                 * (systemd $CREDENTIALS_DIRECTORY/NAME); NULL: the URI's
                                 * pin-source=, else no login. An env: variable is taken out of
                                 * the environment by hsm_token_open() (its value overwritten in
                                 * place, so not a read-only string given to putenv(), and unset)
                                 * and kept in locked memory for later logins. */
        unsigned max_sessions;  /* size of the session pool (operations at once); 0: the token's
                                 * ulMaxSessionCount, or 32 when it reports no limit */
} hsm_token_config;

/* Loads the module(s), finds the one token cfg->uri names, logs in to it
 * (when it needs a login and a PIN source is given) and opens the first
 * session of its pool. On success *ret holds a new token with one reference
 * (drop it with hsm_token_unref()). Returns 0, or e.g. -EINVAL (bad URI or
 * PIN source), -ENOENT (no such module), -ENODEV (no token matches the
 * URI), -ENOTUNIQ (the URI matches several tokens), -EACCES (PIN refused
 * or missing), -EPERM (PIN locked), -EIO; *errmsg says why. */
HSM_EXPORT int hsm_token_open(const hsm_token_config *cfg, hsm_token **ret, char **errmsg);
/* Takes one more reference; returns t. NULL is passed through. */
HSM_EXPORT hsm_token *hsm_token_ref(hsm_token *t);
/* Drops one reference; the last one closes the token's sessions and unloads
 * the module(s) when nothing else uses them. NULL is accepted. */
HSM_EXPORT void hsm_token_unref(hsm_token *t);

/* The name given in the configuration (or the URI), and the token's label.
 * Owned by the token. */
HSM_EXPORT const char *hsm_token_name(const hsm_token *t);
HSM_EXPORT const char *hsm_token_label(const hsm_token *t);
/* Size of the session pool. */
HSM_EXPORT unsigned hsm_token_max_sessions(const hsm_token *t);

/* The health of a token. Every change is logged once, with its reason.
 * - READY: operations run.
 * - DEGRADED: operations run, but some failed with a device error
 *   (CKR_DEVICE_ERROR, CKR_FUNCTION_FAILED, a CKR_GENERAL_ERROR that the
 *   module does not repeat); ready again after 16 successes in a row.
 * - ABSENT: the token is gone (CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT,
 *   CKR_SLOT_ID_INVALID). Operations on its keys fail at once (-ENODEV);
 *   a thread of the library probes the slot list with backoff (50 ms
 *   doubling to 2 s) and, when a token matching the URI is back (in any
 *   slot), logs in, looks the keys up again, makes a test signature and
 *   makes the token READY.
 * - FAILED: the module failed (CKR_CRYPTOKI_NOT_INITIALIZED, or
 *   CKR_GENERAL_ERROR that a second call confirms). Operations fail at once
 *   (-EIO); the module is finalized and initialized again once no thread is
 *   inside it (same backoff), then the token is found again as above.
 * - LOCKED: the token refused the PIN (or it is locked). Never retried:
 *   operations on its keys fail at once (-EACCES, -EPERM) until the token
 *   is opened again. Other tokens are not affected by any of these. */
enum hsm_token_state {
        HSM_TOKEN_READY = 0,
        HSM_TOKEN_DEGRADED,
        HSM_TOKEN_ABSENT,
        HSM_TOKEN_LOCKED,
        HSM_TOKEN_FAILED,
};
/* The token's state; with ret_reason, also a malloc'd sentence saying why
 * (free() it; untouched if out of memory). Thread-safe and cheap. */
HSM_EXPORT enum hsm_token_state hsm_token_state(hsm_token *t, char **ret_reason);
/* "ready", "degraded", "absent", "locked", "failed" ("?" out of range). */
HSM_EXPORT const char *hsm_token_state_name(enum hsm_token_state s);

/* Admission (symbol version HSMTLS_0.3). Each token runs at most `limit`
 * signatures and decryptions at once; the others wait in a queue served in
 * order of their deadlines (hsm_token_watch; without one, in arrival order).
 * The limit adapts to the token: it grows while the operations' latency
 * stays near its floor (the lowest seen) and throughput grows with it, and
 * shrinks when latency rises without more throughput (an in-process token
 * that is CPU settles near the number of cores, a network HSM near its
 * capacity); min <= limit <= max <= max_sessions. An operation that finds
 * queue_max waiting is refused at once (-EBUSY), one that cannot start
 * before its caller's deadline at once or when it passes (-ETIMEDOUT):
 * shed, counted, never left to stall. key_ops_per_second (0: none) limits
 * every key of the token to that many operations a second (a bucket of one
 * second's worth, at least 1): past it -EBUSY at once. */
typedef struct hsm_token_concurrency {
        unsigned limit;              /* operations at once allowed now */
        unsigned min, max;           /* bounds of the limit */
        unsigned in_flight;          /* operations running now */
        unsigned queued;             /* operations waiting for their turn now */
        unsigned queue_max;          /* most that may wait */
        unsigned key_ops_per_second; /* 0: no rate limit */
        unsigned reserved0;
        uint64_t latency_floor_us;   /* the floor of the operations' latency (lowest window mean; rises slowly) */
        uint64_t latency_us;         /* recent mean latency of an operation */
        uint64_t admitted;           /* operations that ran */
        uint64_t shed_queue_full;    /* refused at once: queue_max were waiting */
        uint64_t shed_deadline;      /* refused or given up: could not start before the caller's deadline */
        uint64_t rate_refused;       /* refused: over key_ops_per_second */
        uint64_t limit_changes;      /* times the limit changed */
        uint64_t reserved[8];
} hsm_token_concurrency;
/* A snapshot (thread-safe, cheap). */
HSM_EXPORT int hsm_token_get_concurrency(hsm_token *t, hsm_token_concurrency *ret);
/* Bounds of the adaptive limit (0: keep the current value; max is capped at
 * max_sessions; min = max fixes it), the queue's size (0: keep) and the
 * per-key rate (-1: keep, 0: none). Returns 0 or -EINVAL (min > max). */
HSM_EXPORT int hsm_token_set_concurrency(hsm_token *t, unsigned min, unsigned max, unsigned queue_max,
                                         int key_ops_per_second);

/* ------------------------------------------------------------ keys */

enum hsm_key_type { HSM_KEY_RSA = 1, HSM_KEY_ECDSA, HSM_KEY_ED25519 };
enum hsm_curve { HSM_CURVE_NONE = 0, HSM_CURVE_P256, HSM_CURVE_P384, HSM_CURVE_P521, HSM_CURVE_ED25519 };

/* Bits of hsm_key_flags(): the key's PKCS#11 attributes. */
enum hsm_key_flag {
        HSM_KEY_SENSITIVE = 1 << 0,
        HSM_KEY_EXTRACTABLE = 1 << 1,
        HSM_KEY_ALWAYS_SENSITIVE = 1 << 2,
        HSM_KEY_NEVER_EXTRACTABLE = 1 << 3,
        HSM_KEY_ALWAYS_AUTHENTICATE = 1 << 4,
        HSM_KEY_CAN_SIGN = 1 << 5,
        HSM_KEY_CAN_DECRYPT = 1 << 6,
};

/* Finds exactly one private key on token t by its pkcs11: URI (object=,
 * id=, type=private; the token part, if any, must match t). The key must be
 * allowed to sign. On success *ret holds a new key with one reference (drop
 * it with hsm_key_unref()); it holds a reference on t. Returns 0, or
 * -EINVAL (bad URI, unsupported key), -ENOENT (no such key), -ENOTUNIQ (the
 * URI matches several keys), -EPERM (the key may not sign), -EOPNOTSUPP (key
 * type not supported), -ENODEV, -EIO; *errmsg says why. */
HSM_EXPORT int hsm_token_find_key(hsm_token *t, const char *uri, hsm_key **ret, char **errmsg);

/* Derives out_len bytes (1 to 8160; hsmtlsd takes 64, a GnuTLS session
 * ticket master key) on token t from the secret key that key_uri names
 * (object= or id=, type=secret-key; CKK_GENERIC_SECRET or CKK_SHA256_HMAC,
 * sensitive, never extractable, allowed to sign): HKDF-Expand (RFC 5869)
 * with HMAC-SHA256, each HMAC computed on the token (CKM_SHA256_HMAC, one
 * C_Sign per 32 bytes) with that key as the PRK and, as info, the fixed
 * versioned label "hsmtls session ticket master key v1", a NUL byte and
 * context (hsmtlsd: the listener name). The same key and context give the
 * same bytes on every process that opens the token. On failure out is
 * wiped. Returns 0, or -EINVAL (bad URI), -ENODEV (the URI names another
 * token), -ENOENT, -ENOTUNIQ, -EPERM (key type, not sensitive, extractable,
 * may not sign), -EOPNOTSUPP (no CKM_SHA256_HMAC), -EIO; *errmsg says why. */
HSM_EXPORT int hsm_token_derive_ticket_key(hsm_token *t, const char *key_uri, const char *context, uint8_t *out,
                                           size_t out_len, char **errmsg);
/* Takes one more reference; returns k. NULL is passed through. */
HSM_EXPORT hsm_key *hsm_key_ref(hsm_key *k);
/* Drops one reference. NULL is accepted. */
HSM_EXPORT void hsm_key_unref(hsm_key *k);

/* The key's token (no reference taken), label (CKA_LABEL), and the URI it
 * was found by; strings owned by the key. */
HSM_EXPORT hsm_token *hsm_key_token(const hsm_key *k);
HSM_EXPORT const char *hsm_key_label(const hsm_key *k);
HSM_EXPORT const char *hsm_key_uri(const hsm_key *k);
HSM_EXPORT enum hsm_key_type hsm_key_type(const hsm_key *k);
HSM_EXPORT enum hsm_curve hsm_key_curve(const hsm_key *k);
/* RSA: modulus bits; EC: curve bits (256, 384, 521); Ed25519: 256. */
HSM_EXPORT unsigned hsm_key_bits(const hsm_key *k);
/* An OR of enum hsm_key_flag. */
HSM_EXPORT unsigned hsm_key_flags(const hsm_key *k);
/* Whether the token offers signature mechanism m for this key (false for
 * HSM_MECH_RSA_X_509, which is used only to decrypt). */
HSM_EXPORT bool hsm_key_supports(const hsm_key *k, enum hsm_mech m);

/* The key's usage counters, owned by the key (valid while you hold a
 * reference on it): every signature and decryption, whether through a
 * gnutls_privkey_t or otherwise, counted by operation, mechanism, result,
 * and the failures by reason. */
HSM_EXPORT hsm_usage *hsm_key_usage(hsm_key *k);

/* ------------------------------------------------------------ GnuTLS */

/* Makes a gnutls_privkey_t whose operations run on the token
 * (gnutls_privkey_import_ext4 over the session pool): RSA PKCS#1 v1.5,
 * RSA-PSS, ECDSA and Ed25519 signatures, and TLS 1.2 RSA key exchange when the
 * key may decrypt: the decryption always yields 48 bytes, the premaster or,
 * for any bad ciphertext (padding, length), a synthetic one derived from the
 * ciphertext and a secret of the key (implicit rejection), handled, logged
 * and counted alike. It is meant for TLS premasters only. GnuTLS is told only the signature algorithms whose mechanism
 * the token offers. Use it like any privkey: gnutls_certificate_set_key(),
 * gnutls_privkey_sign_data2(), ... The privkey holds a reference on key;
 * gnutls_privkey_deinit() (or the credentials that took it over) drops it.
 * Returns 0, -ENOMEM or -EINVAL. */
HSM_EXPORT int hsm_privkey_import(hsm_key *key, gnutls_privkey_t *ret);
/* The key's public key, built from the token's attributes; the caller owns
 * *ret (gnutls_pubkey_deinit()). Returns 0 or a negative errno code. */
HSM_EXPORT int hsm_pubkey_import(hsm_key *key, gnutls_pubkey_t *ret);
/* 0 if the certificate carries this key's public key, -EKEYREJECTED if it
 * does not, another negative errno code if it cannot tell. */
HSM_EXPORT int hsm_key_matches_certificate(hsm_key *key, gnutls_x509_crt_t crt);

#ifdef __cplusplus
}
#endif
