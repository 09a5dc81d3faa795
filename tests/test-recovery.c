/* Token recovery without a restart, through tests/slowtoken's control file:
 * a token that is removed and comes back in another slot with new handles,
 * a module that fails until it is finalized and initialized again (with
 * signers running), a PIN refused when the token comes back (locked, never
 * retried); all the while a second token (SoftHSM through another instance
 * of the module) keeps signing. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/abstract.h>
#include <gnutls/gnutls.h>

#include "testlib.h"
#include "token.h"

static test_token tt;
static char *control_path, *counts_path;

static double now_ms(void)
{
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void control(const char *s)
{
        char tmp[600];
        snprintf(tmp, sizeof(tmp), "%s.tmp", control_path);
        FILE *f = fopen(tmp, "we");
        if (!f || fputs(s, f) < 0 || fclose(f) != 0 || rename(tmp, control_path) < 0) {
                perror(control_path);
                exit(1);
        }
}

/* A counter from the slowtoken count file (-1 if missing). */
static long count_of(const char *name)
{
        char buf[4096];
        FILE *f = fopen(counts_path, "re");
        if (!f)
                return -1;
        size_t n = fread(buf, 1, sizeof(buf) - 1, f);
        fclose(f);
        buf[n] = 0;
        size_t len = strlen(name);
        for (char *p = buf; (p = strstr(p, name)); p += len)
                if ((p == buf || p[-1] == ' ') && p[len] == '=')
                        return strtol(p + len + 1, NULL, 10);
        return -1;
}

static hsm_token *open_token(const char *module, const char *name)
{
        char *pin = NULL;
        if (asprintf(&pin, "file:%s", tt.pin_file) < 0)
                exit(1);
        hsm_token_config cfg = { .name = name, .uri = tt.token_uri, .module = module, .pin_source = pin, .max_sessions = 4 };
        hsm_token *t = NULL;
        char *err = NULL;
        int r = hsm_token_open(&cfg, &t, &err);
        CHECK(r == 0, "token %s opens (%s)", name, err ? err : "ok");
        free(err);
        free(pin);
        return t;
}

static hsm_key *find_key(hsm_token *t)
{
        hsm_key *k = NULL;
        char *err = NULL;
        int r = hsm_token_find_key(t, tt.key[TK_P256], &k, &err);
        CHECK(r == 0, "key p256 found on %s (%s)", hsm_token_name(t), err ? err : "ok");
        free(err);
        return k;
}

static int sign(hsm_key *k)
{
        uint8_t hash[32] = { 7 }, sig[128];
        size_t len = sizeof(sig);
        return hsm_key_sign(k, HSM_MECH_ECDSA, HSM_HASH_NONE, hash, sizeof(hash), sig, &len);
}

/* A signature through GnuTLS, verified with the public key from the token. */
static int sign_and_verify(hsm_key *k)
{
        gnutls_privkey_t priv = NULL;
        gnutls_pubkey_t pub = NULL;
        gnutls_datum_t msg = { (unsigned char *)"after recovery", 14 }, sig = { NULL, 0 };
        int r = hsm_privkey_import(k, &priv);
        if (r < 0)
                return r;
        r = hsm_pubkey_import(k, &pub);
        if (r >= 0)
                r = gnutls_privkey_sign_data2(priv, GNUTLS_SIGN_ECDSA_SHA256, 0, &msg, &sig);
        if (r >= 0)
                r = gnutls_pubkey_verify_data2(pub, GNUTLS_SIGN_ECDSA_SHA256, 0, &msg, &sig);
        gnutls_free(sig.data);
        if (pub)
                gnutls_pubkey_deinit(pub);
        gnutls_privkey_deinit(priv);
        return r;
}

/* Polls for the state for up to secs seconds; returns the ms it took or -1. */
static double wait_state(hsm_token *t, enum hsm_token_state want, double secs)
{
        double t0 = now_ms();
        while (now_ms() - t0 < secs * 1000) {
                if (hsm_token_state(t, NULL) == want)
                        return now_ms() - t0;
                usleep(5000);
        }
        return -1;
}

static void check_state(hsm_token *t, enum hsm_token_state want, const char *why_has)
{
        char *why = NULL;
        enum hsm_token_state st = hsm_token_state(t, &why);
        CHECK(st == want && (!why_has || (why && strstr(why, why_has))), "token %s is %s (%s: %s)", hsm_token_name(t),
              hsm_token_state_name(want), hsm_token_state_name(st), why ? why : "");
        free(why);
}

struct signer {
        hsm_key *key;
        pthread_t th;
        int stop;
        unsigned ok, failed;
        double max_ms;
};

static void *signer_main(void *p)
{
        struct signer *s = p;
        while (!__atomic_load_n(&s->stop, __ATOMIC_ACQUIRE)) {
                double t0 = now_ms();
                int r = sign(s->key);
                double dt = now_ms() - t0;
                if (dt > s->max_ms)
                        s->max_ms = dt;
                if (r == 0)
                        s->ok++;
                else {
                        s->failed++;
                        usleep(2000);
                }
        }
        return NULL;
}

static void signer_start(struct signer *s, hsm_key *k)
{
        memset(s, 0, sizeof(*s));
        s->key = k;
        pthread_create(&s->th, NULL, signer_main, s);
}

static void signer_stop(struct signer *s)
{
        __atomic_store_n(&s->stop, 1, __ATOMIC_RELEASE);
        pthread_join(s->th, NULL);
}

int main(void)
{
        test_token_make(&tt, false);
        const char *slowtoken = getenv("SLOWTOKEN");
        if (!slowtoken || access(slowtoken, R_OK) != 0) {
                printf("# SLOWTOKEN not built\n");
                return 77;
        }
        /* The faulty token goes through its own instance of SoftHSM (a copy
         * of the library), so that its C_Finalize and closed sessions do not
         * touch the other token's. */
        char cmd[1200], copy[600];
        snprintf(copy, sizeof(copy), "%s/softhsm-copy.so", tt.dir);
        snprintf(cmd, sizeof(cmd), "cp '%s' '%s'", tt.module, copy);
        if (system(cmd) != 0)
                return 1;
        if (asprintf(&control_path, "%s/control", tt.dir) < 0 || asprintf(&counts_path, "%s/counts", tt.dir) < 0)
                return 1;
        control("present");
        setenv("HSMTLS_SLOWTOKEN_MODULE", copy, 1);
        setenv("HSMTLS_SLOWTOKEN_CONTROL_FILE", control_path, 1);
        setenv("HSMTLS_SLOWTOKEN_COUNT_FILE", counts_path, 1);
        setenv("HSMTLS_SLOWTOKEN_RENUMBER", "1", 1);
        setenv("HSMTLS_SLOWTOKEN_DELAY_MS", "5", 1);

        hsm_token *a = open_token(tt.module, "steady");
        hsm_token *b = open_token(slowtoken, "faulty");
        if (!a || !b)
                return test_done();
        hsm_key *ka = find_key(a), *kb = find_key(b);
        if (!ka || !kb)
                return test_done();
        check_state(a, HSM_TOKEN_READY, "opened");
        check_state(b, HSM_TOKEN_READY, "opened");
        CHECK(sign(kb) == 0, "the faulty token signs while present");

        /* The other token signs all along. */
        struct signer steady;
        signer_start(&steady, ka);

        /* 0. Device errors: degraded, served, ready again after 16 successes. */
        control("device-error");
        int r = sign(kb);
        CHECK(r == -EIO, "a device error fails that signature (%d)", r);
        check_state(b, HSM_TOKEN_DEGRADED, "CKR_DEVICE_ERROR");
        r = sign(kb);
        CHECK(r == -EIO, "a degraded token is still tried (%d)", r);
        control("present");
        for (int i = 0; i < 15; i++)
                sign(kb);
        check_state(b, HSM_TOKEN_DEGRADED, NULL);
        CHECK(sign(kb) == 0, "the 16th success in a row");
        check_state(b, HSM_TOKEN_READY, "16 operations in a row");

        /* 1. Removed: fail fast, absent, probed; back in another slot with
         * new handles: found again, served again. */
        control("removed");
        double t0 = now_ms();
        r = sign(kb);
        double dt = now_ms() - t0;
        CHECK(r == -ENODEV, "a signature on the removed token fails with -ENODEV (%d)", r);
        CHECK(dt < 2000, "and fails fast (%.1f ms)", dt);
        check_state(b, HSM_TOKEN_ABSENT, "CKR_");
        t0 = now_ms();
        r = sign(kb);
        dt = now_ms() - t0;
        hsm_token_stats st;
        hsm_token_get_stats(b, &st);
        CHECK(r == -ENODEV && dt < 50, "the next one fails at once, without the token (%d, %.2f ms)", r, dt);
        CHECK(st.fast_failures >= 1, "counted as a fast failure (%llu)", (unsigned long long)st.fast_failures);
        double t1 = now_ms();
        while (now_ms() - t1 < 10000) {
                hsm_token_get_stats(b, &st);
                if (st.recovery_attempts >= 3)
                        break;
                usleep(10000);
        }
        CHECK(st.recovery_attempts >= 3, "the slot list is probed while it is absent (%llu probes)",
              (unsigned long long)st.recovery_attempts);
        check_state(b, HSM_TOKEN_ABSENT, NULL);
        control("slot-shift=7");
        double rec = wait_state(b, HSM_TOKEN_READY, 20);
        CHECK(rec >= 0, "the token is ready again after it came back (%.0f ms)", rec);
        printf("# recovery: removed token back in another slot -> ready in %.0f ms\n", rec);
        check_state(b, HSM_TOKEN_READY, "test signature made");
        CHECK(sign_and_verify(kb) == 0, "it signs again, with a signature that verifies (new slot, new handles)");
        hsm_token_get_stats(b, &st);
        CHECK(st.recoveries == 1, "one recovery (%llu)", (unsigned long long)st.recoveries);
        CHECK(count_of("removals") == 1, "the module saw one removal (%ld)", count_of("removals"));

        /* 2. Module failure, with 3 signers on the failed token: C_Finalize
         * and C_Initialize once no thread is inside the module. */
        /* Signatures of 600 ms, started 200 ms apart: when one signer meets
         * the failure, the others are still inside the module. */
        /* Three operations in flight at once: the adaptive limit (one per
         * core to begin with) would otherwise queue the signers outside the
         * module, and nothing would be inside it at the failure. */
        CHECK(hsm_token_set_concurrency(b, 4, 4, 0, -1) == 0, "concurrency fixed at 4 (max_sessions)");
        control("slot-shift=7 delay-ms=600");
        struct signer busy[3];
        for (int i = 0; i < 3; i++) {
                signer_start(&busy[i], kb);
                usleep(200000);
        }
        usleep(100000);
        long inits = count_of("initializations");
        control("slot-shift=7 delay-ms=600 fail=1");
        t0 = now_ms();
        while (now_ms() - t0 < 20000) {
                hsm_token_get_stats(b, &st);
                if (st.module_reinits >= 1 && hsm_token_state(b, NULL) == HSM_TOKEN_READY)
                        break;
                usleep(5000);
        }
        rec = now_ms() - t0;
        hsm_token_get_stats(b, &st);
        CHECK(st.module_reinits == 1 && hsm_token_state(b, NULL) == HSM_TOKEN_READY,
              "the failed module was initialized again once, and the token is ready (%llu, %.0f ms)",
              (unsigned long long)st.module_reinits, rec);
        printf("# recovery: module failure -> ready in %.0f ms\n", rec);
        CHECK(count_of("initializations") == inits + 1, "one more C_Initialize (%ld -> %ld)", inits,
              count_of("initializations"));
        CHECK(count_of("finalize_busy") == 0, "C_Finalize came while no thread was inside the module (finalize_busy=%ld)",
              count_of("finalize_busy"));
        CHECK(count_of("injected_module") > 0, "the module did fail calls (%ld)", count_of("injected_module"));
        control("slot-shift=7");
        usleep(200000);
        unsigned before[3];
        for (int i = 0; i < 3; i++)
                before[i] = busy[i].ok;
        usleep(200000);
        for (int i = 0; i < 3; i++) {
                signer_stop(&busy[i]);
                CHECK(busy[i].ok > before[i], "signer %d signs again after the re-initialisation (%u ok, %u failed)", i,
                      busy[i].ok, busy[i].failed);
        }
        CHECK(sign_and_verify(kb) == 0, "a signature after the re-initialisation verifies");

        /* 3. Back with a PIN the token refuses: locked, never retried. */
        control("removed slot-shift=7");
        r = sign(kb);
        CHECK(r == -ENODEV, "removed again: -ENODEV (%d)", r);
        long logins_before = count_of("injected_login");
        control("slot-shift=3 login-rv=0xa4");
        rec = wait_state(b, HSM_TOKEN_LOCKED, 20);
        CHECK(rec >= 0, "back with a refused PIN: locked (%.0f ms)", rec);
        check_state(b, HSM_TOKEN_LOCKED, "CKR_PIN_LOCKED");
        CHECK(count_of("injected_login") == logins_before + 1, "one C_Login was tried (%ld -> %ld)", logins_before,
              count_of("injected_login"));
        t0 = now_ms();
        r = sign(kb);
        dt = now_ms() - t0;
        CHECK(r == -EPERM && dt < 50, "a signature on the locked token fails at once with -EPERM (%d, %.2f ms)", r, dt);
        /* Longer than the recovery's longest backoff, twice. */
        usleep(4500000);
        CHECK(count_of("injected_login") == logins_before + 1, "the PIN is never tried again (%ld C_Login refused)",
              count_of("injected_login") - logins_before);
        check_state(b, HSM_TOKEN_LOCKED, NULL);

        /* 4. The last reference dropped while the token is absent and its
         * recovery runs: the recovery thread lets it go (no crash, no hang). */
        control("present");
        hsm_token *c = open_token(slowtoken, "dropped");
        hsm_key *kc = c ? find_key(c) : NULL;
        if (kc) {
                control("removed");
                CHECK(sign(kc) == -ENODEV, "the third token is absent");
                hsm_key_unref(kc);
                hsm_token_unref(c);
                /* The thread sees it holds the last reference at its next
                 * probe (within 100 ms) and ends: the probes stop. */
                usleep(500000);
                long probes = count_of("C_GetSlotList");
                usleep(2500000);
                CHECK(probes > 0 && count_of("C_GetSlotList") == probes,
                      "dropped while absent: the recovery stops probing (C_GetSlotList %ld, then %ld)", probes,
                      count_of("C_GetSlotList"));
        }

        signer_stop(&steady);
        CHECK(steady.failed == 0 && steady.ok > 10, "the other token signed all along: %u ok, %u failed", steady.ok,
              steady.failed);
        CHECK(steady.max_ms < 5000, "and never waited for the faulty one (slowest signature %.0f ms)", steady.max_ms);
        check_state(a, HSM_TOKEN_READY, NULL);

        hsm_key_unref(ka);
        hsm_key_unref(kb);
        hsm_token_unref(a);
        hsm_token_unref(b);
        free(control_path);
        free(counts_path);
        test_token_cleanup(&tt);
        return test_done();
}
