/* Token layer against a fresh SoftHSM token: lookup, attributes, every
 * mechanism, concurrency through the session pool, recovery, PIN sources. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gnutls/abstract.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#include "log.h"
#include "pin.h"
#include "privkey.h"
#include "testlib.h"
#include "token.h"

static test_token tt;

static hsm_token *open_token(const char *module, const char *pin_source, unsigned max_sessions, int *ret_r, char **ret_err)
{
        hsm_token_config cfg = { .name = "test", .uri = tt.token_uri, .module = module, .pin_source = pin_source,
                                 .max_sessions = max_sessions };
        hsm_token *t = NULL;
        char *err = NULL;
        int r = hsm_token_open(&cfg, &t, &err);
        if (ret_r)
                *ret_r = r;
        if (ret_err)
                *ret_err = err;
        else
                free(err);
        return t;
}

static char *file_spec(const char *path)
{
        char *s = NULL;
        if (asprintf(&s, "file:%s", path) < 0)
                exit(1);
        return s;
}

/* Signs a SHA-256 hash of msg the way GnuTLS would ask and verifies it with
 * the public key read from the token. */
static int sign_and_verify(hsm_key *k, gnutls_sign_algorithm_t algo)
{
        gnutls_privkey_t priv = NULL;
        gnutls_pubkey_t pub = NULL;
        gnutls_datum_t msg = { (unsigned char *)"hsmtls test message", 19 }, sig = { NULL, 0 };
        int r = hsm_privkey_import(k, &priv);
        if (r < 0)
                return r;
        r = hsm_pubkey_import(k, &pub);
        if (r >= 0)
                r = gnutls_privkey_sign_data2(priv, algo, 0, &msg, &sig);
        if (r >= 0)
                r = gnutls_pubkey_verify_data2(pub, algo, 0, &msg, &sig);
        gnutls_free(sig.data);
        if (pub)
                gnutls_pubkey_deinit(pub);
        gnutls_privkey_deinit(priv);
        return r;
}

struct thread_arg {
        hsm_key *key;
        int n;
        int failures;
};

static void *sign_thread(void *p)
{
        struct thread_arg *a = p;
        uint8_t hash[32] = { 1, 2, 3 }, sig[128];
        for (int i = 0; i < a->n; i++) {
                size_t len = sizeof(sig);
                if (hsm_key_sign(a->key, HSM_MECH_ECDSA, HSM_HASH_NONE, hash, sizeof(hash), sig, &len) < 0 || len != 64)
                        a->failures++;
        }
        return NULL;
}

/* ------------------------------------------------------------------
 * Through the fault module tests/slowtoken: PKCS#11 calls counted, faults
 * SoftHSM cannot produce. */

static const char *slow_module;
static char *slow_counts;

static const char *const fault_vars[] = {
        "HSMTLS_SLOWTOKEN_DELAY_MS", "HSMTLS_SLOWTOKEN_MAX_CONCURRENT", "HSMTLS_SLOWTOKEN_FAIL_EVERY",
        "HSMTLS_SLOWTOKEN_CLOSE_SESSIONS_EVERY", "HSMTLS_SLOWTOKEN_INIT_ACTIVE_EVERY", "HSMTLS_SLOWTOKEN_RENUMBER",
        "HSMTLS_SLOWTOKEN_UNAVAILABLE_ATTRS", "HSMTLS_SLOWTOKEN_CONTEXT_LOGIN_RV", NULL,
};

/* Opens the token through the fault module with settings ("VAR=VALUE"...,
 * NULL-terminated; read by its C_Initialize). The counts are in slow_counts
 * once the token is closed (the module is finalized then). */
static hsm_token *open_slow(const char *pin_source, unsigned max_sessions, const char *const *settings, int *r, char **err)
{
        for (int i = 0; fault_vars[i]; i++)
                unsetenv(fault_vars[i]);
        unlink(slow_counts);
        setenv("HSMTLS_SLOWTOKEN_MODULE", tt.module, 1);
        setenv("HSMTLS_SLOWTOKEN_COUNT_FILE", slow_counts, 1);
        for (int i = 0; settings && settings[i]; i++)
                putenv((char *)settings[i]);
        hsm_token *t = open_token(slow_module, pin_source, max_sessions, r, err);
        for (int i = 0; fault_vars[i]; i++)
                unsetenv(fault_vars[i]);
        return t;
}

/* A counter from the count file, by name; -1 if missing. */
static long count_of(const char *name)
{
        char line[2048] = "";
        FILE *f = fopen(slow_counts, "re");
        if (!f)
                return -1;
        if (!fgets(line, sizeof(line), f))
                line[0] = 0;
        fclose(f);
        size_t n = strlen(name);
        for (char *p = strtok(line, " \n"); p; p = strtok(NULL, " \n"))
                if (strncmp(p, name, n) == 0 && p[n] == '=')
                        return atol(p + n + 1);
        return -1;
}

static int sign_p256(hsm_key *k)
{
        uint8_t hash[32] = { 9, 8, 7 }, sig[132];
        size_t len = sizeof(sig);
        return hsm_key_sign(k, HSM_MECH_ECDSA, HSM_HASH_NONE, hash, sizeof(hash), sig, &len);
}

static int sign_with(gnutls_privkey_t priv, gnutls_pubkey_t pub, gnutls_sign_algorithm_t algo)
{
        gnutls_datum_t msg = { (unsigned char *)"hsmtls renumber test", 20 }, sig = { NULL, 0 };
        int r = gnutls_privkey_sign_data2(priv, algo, 0, &msg, &sig);
        if (r >= 0)
                r = gnutls_pubkey_verify_data2(pub, algo, 0, &msg, &sig);
        gnutls_free(sig.data);
        return r;
}

static void faults_through_slowtoken(const char *pin_spec)
{
        int r;
        char *err = NULL;
        hsm_token *t;
        hsm_key *k = NULL;

        /* A wrong PIN: exactly one C_Login, then nothing (SoftHSM never
         * locks, so only the count shows that it was not retried). */
        {
                char *wrong = test_write_file(&tt, "wrong-pin-2", "0000111122223333\n");
                char *spec = file_spec(wrong);
                t = open_slow(spec, 0, NULL, &r, &err);
                CHECK(!t && r == -EACCES, "wrong PIN through the counting module refused (%s)", err ? err : "");
                free(err);
                err = NULL;
                hsm_token_unref(t);
                CHECK(count_of("C_Login") == 1, "wrong PIN: C_Login called exactly once (%ld): not retried", count_of("C_Login"));
                free(spec);
                free(wrong);
        }

        /* The pool bounds what runs on the token at once: 8 threads, a slow
         * token, max_sessions = 2: at most 2 signatures in flight and 2
         * sessions opened. */
        {
                static const char *const set[] = { "HSMTLS_SLOWTOKEN_DELAY_MS=40", NULL };
                t = open_slow(pin_spec, 2, set, &r, &err);
                CHECK(t != NULL, "token opens through the counting module, max_sessions = 2 (%s)", err ? err : "ok");
                free(err);
                err = NULL;
                if (t && hsm_token_find_key(t, tt.key[TK_P256], &k, &err) == 0) {
                        pthread_t th[8];
                        struct thread_arg a[8];
                        for (int i = 0; i < 8; i++) {
                                a[i] = (struct thread_arg){ .key = k, .n = 3 };
                                pthread_create(&th[i], NULL, sign_thread, &a[i]);
                        }
                        int fails = 0;
                        for (int i = 0; i < 8; i++) {
                                pthread_join(th[i], NULL);
                                fails += a[i].failures;
                        }
                        CHECK(fails == 0, "24 signatures from 8 threads through a pool of 2 (%d failed)", fails);
                        hsm_key_unref(k);
                        k = NULL;
                }
                free(err);
                err = NULL;
                hsm_token_unref(t);
                long peak = count_of("max_in_flight"), opened = count_of("C_OpenSession");
                CHECK(peak == 2, "session pool sized as configured: at most 2 signatures on the token at once, and 2 did run together (max_in_flight=%ld)",
                      peak);
                CHECK(opened >= 1 && opened <= 2, "at most 2 sessions opened (C_OpenSession=%ld)", opened);
        }

        /* Every 4th signature fails with CKR_DEVICE_ERROR: that signature
         * fails; the session and the login stay (no new login, no new
         * lookup, no session dropped). */
        {
                static const char *const set[] = { "HSMTLS_SLOWTOKEN_FAIL_EVERY=4", NULL };
                t = open_slow(pin_spec, 2, set, &r, &err);
                free(err);
                err = NULL;
                if (t && hsm_token_find_key(t, tt.key[TK_P256], &k, &err) == 0) {
                        hsm_token_stats s0, s1;
                        hsm_token_get_stats(t, &s0);
                        int ok = 0, eio = 0;
                        for (int i = 0; i < 12; i++) {
                                r = sign_p256(k);
                                ok += r == 0;
                                eio += r == -EIO;
                        }
                        hsm_token_get_stats(t, &s1);
                        CHECK(ok == 9 && eio == 3, "device errors: 3 of 12 signatures fail with EIO, 9 succeed (%d ok, %d EIO)", ok, eio);
                        CHECK(s1.sessions_reopened == s0.sessions_reopened && s1.handles_refreshed == s0.handles_refreshed,
                              "device errors: no session dropped, no handle looked up again (%llu, %llu)",
                              (unsigned long long)(s1.sessions_reopened - s0.sessions_reopened),
                              (unsigned long long)(s1.handles_refreshed - s0.handles_refreshed));
                        hsm_key_unref(k);
                        k = NULL;
                } else
                        CHECK(0, "p256 found through the counting module (%s)", err ? err : "");
                free(err);
                err = NULL;
                hsm_token_unref(t);
                CHECK(count_of("injected_fail") == 3, "device errors: the module injected 3 (%ld)", count_of("injected_fail"));
                /* at find: the private key, and the public key object
                 * whose point the recovery compares later */
                CHECK(count_of("C_Login") == 1 && count_of("C_FindObjectsInit") == 2,
                      "device errors keep the login: C_Login=%ld (want 1), C_FindObjectsInit=%ld (want 2, at find)",
                      count_of("C_Login"), count_of("C_FindObjectsInit"));
        }

        /* A C_SignInit that meets an operation left active in its session
         * (CKR_OPERATION_ACTIVE): that session is closed, not returned to
         * the pool; the signature is made on another one. A pool of 1, so a
         * stuck session put back would fail every later signature. */
        {
                static const char *const set[] = { "HSMTLS_SLOWTOKEN_INIT_ACTIVE_EVERY=3", NULL };
                t = open_slow(pin_spec, 1, set, &r, &err);
                free(err);
                err = NULL;
                if (t && hsm_token_find_key(t, tt.key[TK_P256], &k, &err) == 0) {
                        int ok = 0;
                        for (int i = 0; i < 9; i++)
                                ok += sign_p256(k) == 0;
                        CHECK(ok == 9, "CKR_OPERATION_ACTIVE: the stuck session is closed, all 9 signatures succeed (%d)", ok);
                        CHECK(hsm_token_open_sessions(t) == 1, "the pool of 1 still has its one session (%u)", hsm_token_open_sessions(t));
                        hsm_key_unref(k);
                        k = NULL;
                } else
                        CHECK(0, "p256 found through the counting module (%s)", err ? err : "");
                free(err);
                err = NULL;
                hsm_token_unref(t);
                long inj = count_of("injected_active");
                CHECK(inj >= 3, "the module left an operation active %ld times", inj);
                CHECK(count_of("C_CloseSession") >= inj, "each such session closed (C_CloseSession=%ld)", count_of("C_CloseSession"));
                CHECK(count_of("C_Login") == 1, "and the login kept (C_Login=%ld)", count_of("C_Login"));
        }

        /* A token that renumbers its objects at each login: after a
         * re-login the P-384 key's old handle names the P-256 key. Every
         * cached handle must be looked up again after a login, or the wrong
         * key signs. */
        {
                static const char *const set[] = { "HSMTLS_SLOWTOKEN_RENUMBER=1", NULL };
                hsm_key *a = NULL, *b = NULL;
                gnutls_privkey_t pa = NULL, pb = NULL;
                gnutls_pubkey_t ua = NULL, ub = NULL;
                t = open_slow(pin_spec, 2, set, &r, &err);
                free(err);
                err = NULL;
                if (t && hsm_token_find_key(t, tt.key[TK_P384], &a, NULL) == 0 && hsm_token_find_key(t, tt.key[TK_P256], &b, NULL) == 0 &&
                    hsm_privkey_import(a, &pa) >= 0 && hsm_privkey_import(b, &pb) >= 0 && hsm_pubkey_import(a, &ua) >= 0 &&
                    hsm_pubkey_import(b, &ub) >= 0) {
                        CHECK(sign_with(pa, ua, GNUTLS_SIGN_ECDSA_SECP384R1_SHA384) == 0, "renumbering token: P-384 signs before a re-login");
                        hsm_token_drop_sessions(t); /* logs out; the next login renumbers */
                        CHECK(sign_with(pb, ub, GNUTLS_SIGN_ECDSA_SECP256R1_SHA256) == 0, "P-256 signs after the re-login");
                        r = sign_with(pa, ua, GNUTLS_SIGN_ECDSA_SECP384R1_SHA384);
                        CHECK(r == 0, "P-384 signs after the re-login with its own key, not with what its old handle names now (%d)", r);
                } else
                        CHECK(0, "keys found through the renumbering module");
                if (pa)
                        gnutls_privkey_deinit(pa);
                if (pb)
                        gnutls_privkey_deinit(pb);
                if (ua)
                        gnutls_pubkey_deinit(ua);
                if (ub)
                        gnutls_pubkey_deinit(ub);
                hsm_key_unref(a);
                hsm_key_unref(b);
                hsm_token_unref(t);
                CHECK(count_of("renumbered") == 2 && count_of("C_Login") == 2, "the token renumbered at both logins (renumbered=%ld, C_Login=%ld)",
                      count_of("renumbered"), count_of("C_Login"));
        }

        /* An attribute answered with CKR_OK and the length
         * CK_UNAVAILABLE_INFORMATION is unavailable, not a length. */
        {
                static const char *const set[] = { "HSMTLS_SLOWTOKEN_UNAVAILABLE_ATTRS=0x181", NULL }; /* CKA_EC_POINT */
                t = open_slow(pin_spec, 2, set, &r, &err);
                free(err);
                err = NULL;
                hsm_key *rsa = NULL;
                if (t && hsm_token_find_key(t, tt.key[TK_P256], &k, &err) == 0 && hsm_token_find_key(t, tt.key[TK_RSA2048], &rsa, NULL) == 0) {
                        hsm_key_public pk = { 0 };
                        r = hsm_key_get_public(k, &pk);
                        CHECK(r < 0 && !pk.ec_point, "CKA_EC_POINT unavailable: reading the P-256 public key fails cleanly (%d, length %zu)", r,
                              pk.ec_point_len);
                        if (r == 0)
                                hsm_key_public_done(&pk);
                        r = hsm_key_get_public(rsa, &pk);
                        CHECK(r == 0 && pk.modulus_len == 256, "the RSA public key (no EC point) still reads (%d)", r);
                        if (r == 0)
                                hsm_key_public_done(&pk);
                        CHECK(sign_p256(k) == 0, "and the P-256 key still signs");
                } else
                        CHECK(0, "keys found through the module (%s)", err ? err : "");
                free(err);
                err = NULL;
                hsm_key_unref(k);
                hsm_key_unref(rsa);
                k = NULL;
                hsm_token_unref(t);
                CHECK(count_of("injected_unavailable") >= 1, "the module answered CK_UNAVAILABLE_INFORMATION (%ld)", count_of("injected_unavailable"));
        }

        /* A context-specific login that fails for another reason than a
         * wrong PIN (CKR_DEVICE_ERROR): reported as that, not as
         * CKR_PIN_INCORRECT; not a refused PIN, so the next signature tries
         * again; the user login and the session are kept. */
        if (tt.auth_key) {
                static const char *const set[] = { "HSMTLS_SLOWTOKEN_CONTEXT_LOGIN_RV=0x30", NULL };
                t = open_slow(pin_spec, 2, set, &r, &err);
                free(err);
                err = NULL;
                if (t && hsm_token_find_key(t, tt.auth_key, &k, &err) == 0) {
                        int r1 = sign_p256(k), r2 = sign_p256(k);
                        CHECK(r1 == -EIO && r2 == -EIO, "context login answered CKR_DEVICE_ERROR: both signatures fail with EIO, not EACCES (%d, %d)",
                              r1, r2);
                        hsm_key_unref(k);
                        k = NULL;
                } else
                        CHECK(0, "client-auth key found through the module (%s)", err ? err : "");
                free(err);
                err = NULL;
                hsm_token_unref(t);
                CHECK(count_of("injected_context_login") == 2, "each signature tried its context login (%ld)", count_of("injected_context_login"));
                CHECK(count_of("C_Login") == 3, "C_Login=%ld: one user login (kept) and the two context logins", count_of("C_Login"));
        }
        unsetenv("HSMTLS_SLOWTOKEN_COUNT_FILE");
        unsetenv("HSMTLS_SLOWTOKEN_MODULE");
}

/* NAME=VALUE from the fault module's count file (-1 if not there). */
static long read_count(const char *file, const char *name)
{
        char line[1024] = "", key[64];
        FILE *f = fopen(file, "re");
        if (f) {
                if (!fgets(line, sizeof(line), f))
                        line[0] = 0;
                fclose(f);
        }
        snprintf(key, sizeof(key), "%s=", name);
        for (const char *p = strstr(line, key); p; p = strstr(p + 1, key))
                if (p == line || p[-1] == ' ')
                        return atol(p + strlen(key));
        return -1;
}

/* The VmFlags line of the mapping that holds p, from /proc/self/smaps
 * ("lo": locked in memory, "dd": left out of core dumps); "" if not found. */
static void vmflags_of(const void *p, char *ret, size_t n)
{
        FILE *f = fopen("/proc/self/smaps", "re");
        char line[512];
        bool in = false;
        ret[0] = 0;
        while (f && fgets(line, sizeof(line), f)) {
                unsigned long lo, hi;
                if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') < strchr(line, ' '))
                        in = (unsigned long)p >= lo && (unsigned long)p < hi;
                else if (in && strncmp(line, "VmFlags:", 8) == 0) {
                        line[strcspn(line, "\n")] = 0;
                        snprintf(ret, n, "%.200s", line + 8);
                        break;
                }
        }
        if (f)
                fclose(f);
}

int main(void)
{
        int r;
        char *err = NULL;
        gnutls_global_init();
        hsm_log_set_level(getenv("HSMTLS_DEBUG") ? HSM_LOG_DEBUG : HSM_LOG_WARNING);
        setenv("HSMTLS_TEST_CLIENT_KEYS", "1", 1);
        test_token_make(&tt, false);
        char *pin_spec = file_spec(tt.pin_file);

        /* Module by path, PIN from a file. */
        hsm_token *t = open_token(tt.module, pin_spec, 8, &r, &err);
        CHECK(t != NULL, "token opens by module path with a PIN file (%s)", err ? err : "ok");
        free(err);
        if (!t)
                return test_done();
        CHECK(strcmp(hsm_token_label(t), "hsmtls") == 0, "token label is '%s'", hsm_token_label(t));

        hsm_key *keys[TK__MAX] = { 0 };
        static const enum hsm_key_type types[TK__MAX] = { HSM_KEY_RSA, HSM_KEY_ECDSA, HSM_KEY_ECDSA, HSM_KEY_ED25519 };
        static const unsigned bits[TK__MAX] = { 2048, 256, 384, 256 };
        for (int i = 0; i < TK__MAX; i++) {
                r = hsm_token_find_key(t, tt.key[i], &keys[i], &err);
                CHECK(r == 0, "key %s found (%s)", test_key_names[i], err ? err : "ok");
                free(err);
                err = NULL;
                if (r < 0)
                        return test_done();
                unsigned f = hsm_key_flags(keys[i]);
                CHECK(hsm_key_type(keys[i]) == types[i] && hsm_key_bits(keys[i]) == bits[i], "key %s: type and size (%u bits)",
                      test_key_names[i], hsm_key_bits(keys[i]));
                CHECK((f & HSM_KEY_SENSITIVE) && !(f & HSM_KEY_EXTRACTABLE) && (f & HSM_KEY_NEVER_EXTRACTABLE) &&
                              (f & HSM_KEY_ALWAYS_SENSITIVE),
                      "key %s is CKA_SENSITIVE, not CKA_EXTRACTABLE, never extractable", test_key_names[i]);
        }

        /* Every mechanism, verified with the public key. */
        CHECK(sign_and_verify(keys[TK_RSA2048], GNUTLS_SIGN_RSA_SHA256) == 0, "RSA PKCS#1 v1.5 SHA-256 signature verifies");
        CHECK(sign_and_verify(keys[TK_RSA2048], GNUTLS_SIGN_RSA_PSS_RSAE_SHA256) == 0, "RSA-PSS SHA-256 signature verifies");
        CHECK(sign_and_verify(keys[TK_RSA2048], GNUTLS_SIGN_RSA_PSS_RSAE_SHA384) == 0, "RSA-PSS SHA-384 signature verifies");
        CHECK(sign_and_verify(keys[TK_P256], GNUTLS_SIGN_ECDSA_SECP256R1_SHA256) == 0, "ECDSA P-256 signature verifies");
        CHECK(sign_and_verify(keys[TK_P384], GNUTLS_SIGN_ECDSA_SECP384R1_SHA384) == 0, "ECDSA P-384 signature verifies");
        CHECK(sign_and_verify(keys[TK_ED25519], GNUTLS_SIGN_EDDSA_ED25519) == 0, "Ed25519 signature verifies");
        hsm_usage *u = hsm_key_usage(keys[TK_RSA2048]);
        CHECK(hsm_usage_total(u, HSM_OP_SIGN, HSM_RESULT_OK) == 3, "RSA key counted 3 signatures (%llu)",
              (unsigned long long)hsm_usage_total(u, HSM_OP_SIGN, HSM_RESULT_OK));
        hsm_usage_entry e[8];
        int n = hsm_usage_snapshot(u, e, 8);
        int pkcs = 0, pss = 0;
        for (int i = 0; i < n; i++) {
                if (e[i].mech == HSM_MECH_RSA_PKCS) pkcs += (int)e[i].count;
                if (e[i].mech == HSM_MECH_RSA_PKCS_PSS) pss += (int)e[i].count;
        }
        CHECK(pkcs == 1 && pss == 2, "counted per mechanism: CKM_RSA_PKCS=%d CKM_RSA_PKCS_PSS=%d", pkcs, pss);

        /* RSA decryption on the token. */
        {
                gnutls_pubkey_t pub = NULL;
                gnutls_datum_t pt = { (unsigned char *)"0123456789abcdef0123456789abcdef0123456789abcdef", 48 }, ct = { 0 };
                uint8_t out[256];
                size_t len = sizeof(out);
                hsm_pubkey_import(keys[TK_RSA2048], &pub);
                gnutls_pubkey_encrypt_data(pub, 0, &pt, &ct);
                uint32_t ok = 0;
                r = hsm_key_decrypt(keys[TK_RSA2048], HSM_MECH_RSA_PKCS, ct.data, ct.size, out, &len, &ok);
                CHECK(r == 0 && ok == 0xffffffffu && len == 48 && memcmp(out, pt.data, 48) == 0,
                      "RSA PKCS#1 v1.5 decryption on the token");
                ct.data[10] ^= 0x55;
                uint8_t out2[256];
                size_t len2 = sizeof(out2);
                len = sizeof(out);
                uint32_t ok2 = 1;
                r = hsm_key_decrypt(keys[TK_RSA2048], HSM_MECH_RSA_PKCS, ct.data, ct.size, out, &len, &ok);
                int r2 = hsm_key_decrypt(keys[TK_RSA2048], HSM_MECH_RSA_PKCS, ct.data, ct.size, out2, &len2, &ok2);
                CHECK(r == 0 && ok == 0 && len == 0 && r2 == 0 && ok2 == 0 && len2 == 0,
                      "a corrupted ciphertext is answered, not decrypted (ok mask 0, length 0), the same way twice");
                /* The failed C_Decrypt ended its operation: the next
                 * decryption on that session (the pool hands out the last
                 * one returned) works. */
                ct.data[10] ^= 0x55;
                len = sizeof(out);
                memset(out, 0, sizeof(out));
                r = hsm_key_decrypt(keys[TK_RSA2048], HSM_MECH_RSA_PKCS, ct.data, ct.size, out, &len, &ok);
                CHECK(r == 0 && ok == 0xffffffffu && len == 48 && memcmp(out, pt.data, 48) == 0,
                      "the good ciphertext right after still decrypts (%d)", r);
                CHECK(hsm_usage_total(u, HSM_OP_DECRYPT, HSM_RESULT_OK) == 4 && hsm_usage_total(u, HSM_OP_DECRYPT, HSM_RESULT_ERROR) == 0,
                      "decryptions counted alike, padding failure not told apart");
                gnutls_free(ct.data);
                gnutls_pubkey_deinit(pub);
        }

        /* Unsupported: ECDSA mechanism on an RSA key. */
        {
                uint8_t h[32] = { 0 }, sig[512];
                size_t len = sizeof(sig);
                CHECK(!hsm_key_supports(keys[TK_RSA2048], HSM_MECH_ECDSA), "RSA key does not offer CKM_ECDSA");
                CHECK(hsm_key_supports(keys[TK_ED25519], HSM_MECH_EDDSA), "SoftHSM offers CKM_EDDSA for the Ed25519 key");
                r = hsm_key_sign(keys[TK_RSA2048], HSM_MECH_ECDSA, HSM_HASH_NONE, h, sizeof(h), sig, &len);
                CHECK(r < 0, "ECDSA with an RSA key fails cleanly (%d)", r);
        }

        /* Concurrency through the pool: 8 threads, pool of 8 sessions. */
        {
                pthread_t th[8];
                struct thread_arg a[8];
                uint64_t before = hsm_usage_total(hsm_key_usage(keys[TK_P256]), HSM_OP_SIGN, HSM_RESULT_OK);
                for (int i = 0; i < 8; i++) {
                        a[i] = (struct thread_arg){ .key = keys[TK_P256], .n = 50 };
                        pthread_create(&th[i], NULL, sign_thread, &a[i]);
                }
                int fails = 0;
                for (int i = 0; i < 8; i++) {
                        pthread_join(th[i], NULL);
                        fails += a[i].failures;
                }
                uint64_t after = hsm_usage_total(hsm_key_usage(keys[TK_P256]), HSM_OP_SIGN, HSM_RESULT_OK);
                CHECK(fails == 0 && after - before == 400, "400 concurrent signatures from 8 threads, all counted (%llu)",
                      (unsigned long long)(after - before));
        }

        /* Recovery: every session closed under us (which also logs out). */
        {
                hsm_token_stats s0, s1;
                hsm_token_get_stats(t, &s0);
                CHECK(hsm_token_drop_sessions(t) == 0, "all sessions closed behind the pool's back");
                CHECK(sign_and_verify(keys[TK_P256], GNUTLS_SIGN_ECDSA_SECP256R1_SHA256) == 0, "signature after losing every session");
                hsm_token_get_stats(t, &s1);
                CHECK(s1.sessions_reopened > s0.sessions_reopened, "a broken session was reopened (%llu)",
                      (unsigned long long)(s1.sessions_reopened - s0.sessions_reopened));
                CHECK(s1.logins == s0.logins + 1, "the lost login was redone exactly once (%llu)",
                      (unsigned long long)(s1.logins - s0.logins));
        }

        for (int i = 0; i < TK__MAX; i++)
                hsm_key_unref(keys[i]);
        hsm_token_unref(t);

        /* The pool's bound as the token sees it (no other token open: the fault
         * module's C_Finalize finalizes SoftHSM too): through the fault module
         * (which counts sessions and signatures in flight at once), a pool
         * of 2 and 6 threads signing, each signature 20 ms on the token. */
        const char *slowmod = getenv("SLOWTOKEN");
        if (slowmod && *slowmod) {
                char *counts = NULL;
                if (asprintf(&counts, "%s/pool-counts", tt.dir) < 0)
                        return 1;
                setenv("HSMTLS_SLOWTOKEN_MODULE", tt.module, 1);
                setenv("HSMTLS_SLOWTOKEN_COUNT_FILE", counts, 1);
                setenv("HSMTLS_SLOWTOKEN_DELAY_MS", "20", 1);
                hsm_token *pt = open_token(slowmod, pin_spec, 2, &r, &err);
                CHECK(pt != NULL, "token opens through the fault module with a pool of 2 (%s)", err ? err : "ok");
                free(err);
                err = NULL;
                hsm_key *pk = NULL;
                if (pt && hsm_token_find_key(pt, tt.key[TK_P256], &pk, &err) == 0) {
                        pthread_t th[6];
                        struct thread_arg a[6];
                        for (int i = 0; i < 6; i++) {
                                a[i] = (struct thread_arg){ .key = pk, .n = 5 };
                                pthread_create(&th[i], NULL, sign_thread, &a[i]);
                        }
                        int fails = 0;
                        for (int i = 0; i < 6; i++) {
                                pthread_join(th[i], NULL);
                                fails += a[i].failures;
                        }
                        CHECK(fails == 0, "30 signatures from 6 threads through a pool of 2 (%d failed)", fails);
                        hsm_key_unref(pk);
                } else
                        CHECK(0, "p256 key found through the fault module (%s)", err ? err : "");
                free(err);
                err = NULL;
                hsm_token_unref(pt); /* C_Finalize: the module writes its counts */
                long in_flight = read_count(counts, "max_in_flight"), opened = read_count(counts, "C_OpenSession"),
                     signs = read_count(counts, "C_Sign");
                CHECK(in_flight == 2 && opened >= 1 && opened <= 2 && signs >= 30,
                      "the token saw at most 2 sessions and 2 signatures at once, and 2 did run at once "
                      "(max_in_flight=%ld C_OpenSession=%ld C_Sign=%ld)", in_flight, opened, signs);
                unsetenv("HSMTLS_SLOWTOKEN_DELAY_MS");
                unsetenv("HSMTLS_SLOWTOKEN_COUNT_FILE");
                free(counts);
        }

        /* Registered p11-kit module by name, and all registered modules. */
        t = open_token("softhsm2", pin_spec, 0, &r, &err);
        CHECK(t != NULL, "token opens through the p11-kit registered module 'softhsm2' (%s)", err ? err : "ok");
        free(err);
        hsm_token_unref(t);
        t = open_token(NULL, pin_spec, 0, &r, &err);
        CHECK(t != NULL, "token opens searching all registered modules (%s)", err ? err : "ok");
        free(err);
        if (t) {
                hsm_key *k = NULL;
                r = hsm_token_find_key(t, "pkcs11:token=othertoken;object=p256;type=private", &k, &err);
                CHECK(r == -ENODEV, "a key URI naming another token is refused (%s)", err ? err : "");
                free(err);
                r = hsm_token_find_key(t, "pkcs11:token=hsmtls;object=nosuchkey;type=private", &k, &err);
                CHECK(r == -ENOENT && err && strstr(err, "no private key"), "a missing key is reported (%s)", err ? err : "");
                free(err);
                r = hsm_token_find_key(t, "pkcs11:token=hsmtls;object=p256;type=cert", &k, &err);
                CHECK(r == -EINVAL, "a URI with type=cert is not taken for a key (%s)", err ? err : "");
                free(err);
                hsm_token_unref(t);
        }
        t = open_token("nosuchmodule", pin_spec, 0, &r, &err);
        CHECK(!t && err && strstr(err, "nosuchmodule"), "unknown module name: %s", err ? err : "");
        free(err);

        /* Missing token. */
        {
                hsm_token_config cfg = { .name = "missing", .uri = "pkcs11:token=doesnotexist", .module = tt.module, .pin_source = pin_spec };
                r = hsm_token_open(&cfg, &t, &err);
                CHECK(r == -ENODEV && err && strstr(err, "no token matches"), "missing token: %s", err ? err : "");
                free(err);
        }

        /* PIN sources. */
        {
                FILE *f = fopen(tt.pin_file, "re");
                char pin[64] = "";
                if (!f || !fgets(pin, sizeof(pin), f))
                        exit(1);
                fclose(f);
                pin[strcspn(pin, "\n")] = 0;
                setenv("HSMTLS_TEST_PIN", pin, 1);
                t = open_token(tt.module, "env:HSMTLS_TEST_PIN", 0, &r, &err);
                CHECK(t != NULL, "PIN from an environment variable (%s)", err ? err : "ok");
                free(err);
                err = NULL;
                CHECK(getenv("HSMTLS_TEST_PIN") == NULL, "the PIN variable is taken out of the environment");
                /* A second token naming the same variable, and a re-login
                 * after the variable is gone, use the PIN kept aside. */
                hsm_token *t2 = open_token(tt.module, "env:HSMTLS_TEST_PIN", 0, &r, &err);
                CHECK(t2 != NULL, "a second token with the same pin_env opens (%s)", err ? err : "ok");
                free(err);
                err = NULL;
                hsm_key *ek = NULL;
                if (t && hsm_token_find_key(t, tt.key[TK_P256], &ek, NULL) == 0) {
                        hsm_token_stats e0, e1;
                        hsm_token_get_stats(t, &e0);
                        hsm_token_drop_sessions(t);
                        r = sign_p256(ek);
                        hsm_token_get_stats(t, &e1);
                        CHECK(r == 0 && e1.logins == e0.logins + 1, "a re-login after that still has the PIN (%d)", r);
                        hsm_key_unref(ek);
                }
                hsm_token_unref(t2);
                hsm_token_unref(t);
                unsetenv("HSMTLS_TEST_PIN");

                char *cred = test_write_file(&tt, "hsmtls-pin", pin);
                (void)cred;
                setenv("CREDENTIALS_DIRECTORY", tt.dir, 1);
                t = open_token(tt.module, "credential:hsmtls-pin", 0, &r, &err);
                CHECK(t != NULL, "PIN from a systemd credential (%s)", err ? err : "ok");
                free(err);
                hsm_token_unref(t);
                unsetenv("CREDENTIALS_DIRECTORY");
                free(cred);

                t = open_token(tt.module, "env:HSMTLS_NOT_SET", 0, &r, &err);
                CHECK(!t && err && strstr(err, "not set"), "unset PIN variable: %s", err ? err : "");
                free(err);

                /* A wrong PIN: clear error, never the PIN itself. */
                char *wrong = test_write_file(&tt, "wrong-pin", "0000111122223333\n");
                char *spec = file_spec(wrong);
                t = open_token(tt.module, spec, 0, &r, &err);
                CHECK(!t && r == -EACCES && err && strstr(err, "CKR_PIN_INCORRECT") && strstr(err, "not retried"),
                      "wrong PIN refused: %s", err ? err : "");
                CHECK(err && !strstr(err, "0000111122223333") && !strstr(err, pin), "the error does not contain a PIN");
                free(err);
                free(spec);
                free(wrong);
                /* The good PIN still works: the wrong one was tried once, not until lock. */
                t = open_token(tt.module, pin_spec, 0, &r, &err);
                CHECK(t != NULL, "token not locked after one wrong PIN (%s)", err ? err : "ok");
                free(err);
                hsm_token_unref(t);
                explicit_bzero(pin, sizeof(pin));
        }

        /* The buffer a PIN is read into is locked in memory and left out
         * of core dumps. */
        {
                hsm_pin_source *src = NULL;
                char *pin = NULL, flags[256];
                size_t len = 0;
                r = hsm_pin_source_new(pin_spec, &src);
                if (r >= 0)
                        r = hsm_pin_source_read(src, &pin, &len, NULL);
                CHECK(r == 0 && pin && len > 0, "the PIN is read from its file (%d)", r);
                if (pin) {
                        vmflags_of(pin, flags, sizeof(flags));
                        CHECK(strstr(flags, " dd") != NULL, "the PIN buffer is left out of core dumps (VmFlags:%s)", flags);
#ifdef __SANITIZE_ADDRESS__
                        printf("# not checked under ASan, which makes mlock() a no-op: the PIN buffer is locked\n");
#else
                        CHECK(strstr(flags, " lo") != NULL, "the PIN buffer is locked in memory (VmFlags:%s)", flags);
#endif
                }
                hsm_pin_free(pin, len);
                hsm_pin_source_free(src);
        }

        /* pin-value= in the URI is refused. */
        {
                hsm_token_config cfg = { .name = "pv", .uri = "pkcs11:token=hsmtls?pin-value=1234", .module = tt.module };
                r = hsm_token_open(&cfg, &t, &err);
                CHECK(r == -EINVAL && err && strstr(err, "pin-value") && !strstr(err, "1234"), "pin-value refused: %s", err ? err : "");
                free(err);
        }
        /* ... in a key URI too, without showing the PIN (wherever it is in the URI). */
        if ((t = open_token(tt.module, pin_spec, 2, NULL, NULL))) {
                static const char *const uris[] = { "pkcs11:token=hsmtls;object=p256;type=private?pin-value=98765",
                                                    "pkcs11:token=hsmtls;pin-value=98765;object=p256;type=private" };
                for (unsigned i = 0; i < 2; i++) {
                        hsm_key *k = NULL;
                        char *e = NULL;
                        r = hsm_token_find_key(t, uris[i], &k, &e);
                        CHECK(r < 0 && !k && e && !strstr(e, "98765"), "a key URI with a PIN is refused and the PIN not shown: %s",
                              e ? e : "");
                        hsm_key_unref(k);
                        free(e);
                }
                hsm_token_unref(t);
                t = NULL;
        }
        err = NULL;

        /* A key that demands a login per signature (CKA_ALWAYS_AUTHENTICATE):
         * it signs after a context-specific login; once the token refuses
         * the PIN, no further login is tried (the token would lock). The
         * PKCS#11 calls are counted by the fault module. */
        const char *slow = getenv("SLOWTOKEN");
        if (slow && *slow && tt.auth_key) {
                char *counts = NULL, *pinfile = NULL, *spec = NULL;
                if (asprintf(&counts, "%s/calls", tt.dir) < 0 || asprintf(&pinfile, "%s/auth-pin", tt.dir) < 0)
                        return 1;
                FILE *in = fopen(tt.pin_file, "re"), *out = fopen(pinfile, "we");
                char pinbuf[64] = "";
                if (!in || !out || !fgets(pinbuf, sizeof(pinbuf), in))
                        return 1;
                fputs(pinbuf, out);
                fclose(in);
                fclose(out);
                chmod(pinfile, 0600);
                explicit_bzero(pinbuf, sizeof(pinbuf));
                spec = file_spec(pinfile);
                setenv("HSMTLS_SLOWTOKEN_MODULE", tt.module, 1);
                setenv("HSMTLS_SLOWTOKEN_COUNT_FILE", counts, 1);
                t = open_token(slow, spec, 2, &r, &err);
                CHECK(t != NULL, "token opens through the counting module (%s)", err ? err : "ok");
                free(err);
                err = NULL;
                hsm_key *ak = NULL;
                if (t && hsm_token_find_key(t, tt.auth_key, &ak, &err) == 0) {
                        uint8_t h[32] = { 7 }, sig[128];
                        size_t len = sizeof(sig);
                        CHECK(hsm_key_flags(ak) & HSM_KEY_ALWAYS_AUTHENTICATE, "client-auth is CKA_ALWAYS_AUTHENTICATE");
                        r = hsm_key_sign(ak, HSM_MECH_ECDSA, HSM_HASH_NONE, h, sizeof(h), sig, &len);
                        CHECK(r == 0 && len == 64, "it signs after a context-specific login (%d)", r);
                        FILE *w = fopen(pinfile, "we");
                        fputs("9999888877776666\n", w);
                        fclose(w);
                        len = sizeof(sig);
                        int r1 = hsm_key_sign(ak, HSM_MECH_ECDSA, HSM_HASH_NONE, h, sizeof(h), sig, &len);
                        len = sizeof(sig);
                        int r2 = hsm_key_sign(ak, HSM_MECH_ECDSA, HSM_HASH_NONE, h, sizeof(h), sig, &len);
                        CHECK(r1 < 0 && r2 < 0, "with the PIN changed under it both signatures fail (%d, %d)", r1, r2);
                        hsm_key_unref(ak);
                } else
                        CHECK(0, "client-auth key found (%s)", err ? err : "");
                free(err);
                err = NULL;
                hsm_token_unref(t);
                FILE *cf = fopen(counts, "re");
                char line[1024] = "";
                if (cf) {
                        if (!fgets(line, sizeof(line), cf))
                                line[0] = 0;
                        fclose(cf);
                }
                const char *lg = strstr(line, "C_Login=");
                int logins = lg ? atoi(lg + 8) : -1;
                /* 1 user login + 1 context login that worked + 1 refused; the
                 * second failing signature makes no C_Login at all. */
                CHECK(logins == 3, "C_Login calls: %d (user, good context login, one refused; none after)", logins);
                unsetenv("HSMTLS_SLOWTOKEN_COUNT_FILE");
                free(spec);
                free(pinfile);
                free(counts);
        }

        if (slow && *slow) {
                slow_module = slow;
                if (asprintf(&slow_counts, "%s/fault-calls", tt.dir) < 0)
                        return 1;
                faults_through_slowtoken(pin_spec);
                free(slow_counts);
        }

        /* Two public keys under the private key's CKA_ID with different
         * points: the key's point is unknown, reading it fails (it must not
         * take the first one: a certificate for the other key would match). */
        {
                char *cmd = NULL, *uri = NULL;
                if (asprintf(&cmd,
                             "set -e; m='%s'; p=\"$(cat '%s')\"; d='%s';"
                             "pkcs11-tool --module \"$m\" --login --pin \"$p\" --keypairgen --key-type EC:prime256v1 --id 91 --label dup-a;"
                             "pkcs11-tool --module \"$m\" --login --pin \"$p\" --keypairgen --key-type EC:prime256v1 --id 92 --label dup-b;"
                             "pkcs11-tool --module \"$m\" --read-object --type pubkey --id 92 -o \"$d/dup-b.der\";"
                             "pkcs11-tool --module \"$m\" --login --pin \"$p\" --write-object \"$d/dup-b.der\" --type pubkey --id 91 --label dup-a2",
                             tt.module, tt.pin_file, tt.dir) < 0 ||
                    asprintf(&uri, "%s;id=%%91;type=private", tt.token_uri) < 0)
                        return 1;
                char *quiet = NULL;
                hsm_key *k = NULL;
                if (asprintf(&quiet, "(%s) >/dev/null 2>&1", cmd) < 0)
                        return 1;
                t = open_token(tt.module, pin_spec, 2, NULL, NULL);
                if (system(quiet) != 0 || !t) {
                        CHECK(0, "pkcs11-tool writes a second public key under a key's id");
                } else if (hsm_token_find_key(t, uri, &k, &err) < 0) {
                        CHECK(0, "the key with two public keys is found (%s)", err ? err : "");
                } else {
                        hsm_key_public pk = { 0 };
                        r = hsm_key_get_public(k, &pk);
                        CHECK(r < 0 && !pk.ec_point, "two public keys with different points under one id: no point is taken (%d)", r);
                        if (r == 0)
                                hsm_key_public_done(&pk);
                        hsm_key_unref(k);
                }
                free(err);
                err = NULL;
                hsm_token_unref(t);
                free(quiet);
                free(cmd);
                free(uri);
        }

        free(pin_spec);
        test_token_cleanup(&tt);
        gnutls_global_deinit();
        return test_done();
}
