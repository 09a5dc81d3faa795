/* slowtoken-test: checks libhsmtls-slowtoken against a fresh SoftHSM token.
 *
 * Usage: slowtoken-test PATH-TO-libhsmtls-slowtoken.so
 * Environment: SRCDIR (the source root, for hsm-config/provision).
 *
 * Makes a token with hsm-config/provision in a temporary folder, loads the
 * module through p11-kit, and checks, each time after a new C_Initialize:
 *   1. 8 threads sign with CKM_ECDSA at once, DELAY_MS=50 and
 *      MAX_CONCURRENT=8: the 8 signatures take well under 8 x 50 ms, every
 *      signature verifies, and the count file says C_Sign=8;
 *   2. the same with MAX_CONCURRENT=2: at most 2 in flight, >= 4 x 50 ms;
 *   2b. COUNT_EVERY=1 with COUNT_FILE=.../counts-%p: the file named with
 *      this pid says operations=N after each of 3 signatures;
 *   3. FAIL_EVERY=3: C_Sign 3 and 6 return CKR_DEVICE_ERROR and the session
 *      can sign again right after;
 *   4. CLOSE_SESSIONS_EVERY=2: C_Sign 2 returns CKR_SESSION_HANDLE_INVALID,
 *      the session is gone and the login too; a new session and login work.
 * Exits 77 if SoftHSM or a tool that provision needs is missing.  On failure
 * the token folder is kept, with a uris.env to source.
 */
#include <errno.h>
#include <ftw.h>
#include <pthread.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/abstract.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <p11-kit/p11-kit.h>
#include <p11-kit/pkcs11.h>

extern char **environ;

#define THREADS 8
#define DELAY_MS 50

static const char *const softhsm_paths[] = {
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
};

static char tokdir[4096];
static CK_FUNCTION_LIST *mod;
static CK_SLOT_ID slot;
static CK_OBJECT_HANDLE key;
static char pin[64];
static gnutls_pubkey_t pubkey;
static int failures;

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...)
{
        va_list ap;

        va_start(ap, fmt);
        fputs("FAIL: ", stdout);
        vprintf(fmt, ap);
        fputc('\n', stdout);
        va_end(ap);
        fflush(stdout);
        failures++;
}

static double now_ms(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static bool in_path(const char *tool)
{
        const char *path = getenv("PATH");
        char buf[4096];

        if (!path)
                path = "/usr/bin:/bin";
        while (*path) {
                size_t n = strcspn(path, ":");
                if (n > 0 && snprintf(buf, sizeof(buf), "%.*s/%s", (int)n, path, tool) < (int)sizeof(buf) &&
                    access(buf, X_OK) == 0)
                        return true;
                path += n;
                if (*path == ':')
                        path++;
        }
        return false;
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
        remove(path);
        return 0;
}

/* Runs hsm-config/provision DIR --quiet; 0 on success. */
static int provision(const char *srcdir, const char *dir)
{
        char script[4096];
        char *argv[4];
        pid_t pid;
        int status, r;

        snprintf(script, sizeof(script), "%s/hsm-config/provision", srcdir);
        argv[0] = script;
        argv[1] = (char *)dir;
        argv[2] = (char *)"--quiet";
        argv[3] = NULL;
        r = posix_spawn(&pid, script, NULL, NULL, argv, environ);
        if (r != 0) {
                fail("cannot run %s: %s", script, strerror(r));
                return -1;
        }
        while (waitpid(pid, &status, 0) < 0)
                if (errno != EINTR) {
                        fail("waitpid: %s", strerror(errno));
                        return -1;
                }
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
                fail("%s %s failed (status 0x%x)", script, dir, status);
                return -1;
        }
        return 0;
}

/* Reads counter NAME from the count file FILE (in the token folder); -1 if missing. */
static long count_in(const char *file, const char *name)
{
        char path[4200], line[1024], *tok, *save = NULL;
        size_t n = strlen(name);
        FILE *f;

        snprintf(path, sizeof(path), "%s/%s", tokdir, file);
        f = fopen(path, "r");
        if (!f)
                return -1;
        if (!fgets(line, sizeof(line), f)) {
                fclose(f);
                return -1;
        }
        fclose(f);
        for (tok = strtok_r(line, " \n", &save); tok; tok = strtok_r(NULL, " \n", &save))
                if (strncmp(tok, name, n) == 0 && tok[n] == '=')
                        return strtol(tok + n + 1, NULL, 10);
        return -1;
}

static long count_of(const char *name)
{
        return count_in("counts", name);
}

static void expect_count(const char *name, long want)
{
        long got = count_of(name);

        if (got != want)
                fail("count file: %s=%ld, expected %ld", name, got, want);
}

static void setenv_ulong(const char *name, unsigned long v)
{
        char buf[32];

        snprintf(buf, sizeof(buf), "%lu", v);
        setenv(name, buf, 1);
}

/* Looks up the private key "p256" into KEY. */
static int find_key(CK_SESSION_HANDLE s)
{
        CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
        CK_ATTRIBUTE tmpl[] = {
                { CKA_CLASS, &cls, sizeof(cls) },
                { CKA_LABEL, (void *)"p256", 4 },
        };
        CK_ULONG found = 0;
        CK_RV rv;

        if ((rv = mod->C_FindObjectsInit(s, tmpl, 2)) != CKR_OK ||
            (rv = mod->C_FindObjects(s, &key, 1, &found)) != CKR_OK ||
            (rv = mod->C_FindObjectsFinal(s)) != CKR_OK || found != 1) {
                fail("finding the p256 key: 0x%lx, found %lu", rv, found);
                return -1;
        }
        return 0;
}

/* C_Initialize with these settings, find the token and the p256 key, log in
 * on a first session.  Returns that session, or 0. */
static CK_SESSION_HANDLE phase_start(unsigned long delay, unsigned long maxc,
                                     unsigned long fail_every, unsigned long close_every)
{
        CK_SLOT_ID slots[16];
        CK_ULONG nslots = 16;
        CK_SESSION_HANDLE s;
        CK_TOKEN_INFO info;
        CK_RV rv;

        setenv_ulong("HSMTLS_SLOWTOKEN_DELAY_MS", delay);
        setenv_ulong("HSMTLS_SLOWTOKEN_MAX_CONCURRENT", maxc);
        setenv_ulong("HSMTLS_SLOWTOKEN_FAIL_EVERY", fail_every);
        setenv_ulong("HSMTLS_SLOWTOKEN_CLOSE_SESSIONS_EVERY", close_every);

        rv = p11_kit_module_initialize(mod);
        if (rv != CKR_OK) {
                fail("C_Initialize: 0x%lx", rv);
                return 0;
        }
        rv = mod->C_GetSlotList(CK_TRUE, slots, &nslots);
        if (rv != CKR_OK || nslots == 0) {
                fail("C_GetSlotList: 0x%lx, %lu slots", rv, nslots);
                return 0;
        }
        slot = (CK_SLOT_ID)-1;
        for (CK_ULONG i = 0; i < nslots; i++)
                if (mod->C_GetTokenInfo(slots[i], &info) == CKR_OK &&
                    memcmp(info.label, "hsmtls ", 7) == 0)
                        slot = slots[i];
        if (slot == (CK_SLOT_ID)-1) {
                fail("token 'hsmtls' not found");
                return 0;
        }
        rv = mod->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s);
        if (rv != CKR_OK) {
                fail("C_OpenSession: 0x%lx", rv);
                return 0;
        }
        rv = mod->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
        if (rv != CKR_OK) {
                fail("C_Login: 0x%lx", rv);
                return 0;
        }
        if (find_key(s) < 0)
                return 0;
        return s;
}

static void phase_end(void)
{
        CK_RV rv = p11_kit_module_finalize(mod);

        if (rv != CKR_OK)
                fail("C_Finalize: 0x%lx", rv);
}

static void make_hash(unsigned char hash[32], unsigned n)
{
        char msg[64];

        snprintf(msg, sizeof(msg), "hsmtls slowtoken test %u", n);
        gnutls_hash_fast(GNUTLS_DIG_SHA256, msg, strlen(msg), hash);
}

static bool verify(const unsigned char hash[32], const unsigned char *sig, unsigned long len)
{
        gnutls_datum_t h = { (unsigned char *)hash, 32 };
        gnutls_datum_t r = { (unsigned char *)sig, len / 2 };
        gnutls_datum_t s = { (unsigned char *)sig + len / 2, len / 2 };
        gnutls_datum_t der = { NULL, 0 };
        int ret;

        if (len != 64 || gnutls_encode_rs_value(&der, &r, &s) < 0)
                return false;
        ret = gnutls_pubkey_verify_hash2(pubkey, GNUTLS_SIGN_ECDSA_SHA256, 0, &h, &der);
        gnutls_free(der.data);
        return ret >= 0;
}

/* Signs hash N once on session S; returns the C_Sign result. */
static CK_RV sign_once(CK_SESSION_HANDLE s, unsigned n, bool check)
{
        CK_MECHANISM mech = { CKM_ECDSA, NULL, 0 };
        unsigned char hash[32], sig[256];
        CK_ULONG len = sizeof(sig);
        CK_RV rv;

        make_hash(hash, n);
        rv = mod->C_SignInit(s, &mech, key);
        if (rv != CKR_OK) {
                fail("C_SignInit %u: 0x%lx", n, rv);
                return rv;
        }
        rv = mod->C_Sign(s, hash, 32, sig, &len);
        if (rv == CKR_OK && check && !verify(hash, sig, len))
                fail("signature %u does not verify", n);
        return rv;
}

/* ------------------------------------------------ phases 1, 2: concurrency */

struct worker {
        pthread_t thread;
        pthread_barrier_t *start;
        unsigned n;
        CK_SESSION_HANDLE s;
        unsigned char hash[32];
        unsigned char sig[256];
        CK_ULONG len;
        CK_RV rv;
};

static void *worker_main(void *arg)
{
        struct worker *w = arg;

        pthread_barrier_wait(w->start);   /* sessions open, C_SignInit done */
        w->len = sizeof(w->sig);
        w->rv = mod->C_Sign(w->s, w->hash, 32, w->sig, &w->len);
        return NULL;
}

static void concurrent_phase(unsigned long maxc, double min_ms, double max_ms)
{
        CK_MECHANISM mech = { CKM_ECDSA, NULL, 0 };
        struct worker w[THREADS];
        pthread_barrier_t start;
        double t0, elapsed;
        CK_SESSION_HANDLE s0;
        int started = 0;
        CK_RV rv;

        printf("# %d threads sign at once, DELAY_MS=%d MAX_CONCURRENT=%lu\n", THREADS, DELAY_MS, maxc);
        s0 = phase_start(DELAY_MS, maxc, 0, 0);
        if (!s0)
                goto out;
        pthread_barrier_init(&start, NULL, THREADS + 1);
        for (int i = 0; i < THREADS; i++) {
                w[i].start = &start;
                w[i].n = (unsigned)i;
                make_hash(w[i].hash, w[i].n);
                rv = mod->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &w[i].s);
                if (rv == CKR_OK)
                        rv = mod->C_SignInit(w[i].s, &mech, key);
                if (rv != CKR_OK) {
                        fail("thread %d: session/C_SignInit: 0x%lx", i, rv);
                        abort();   /* the barrier would wait for ever */
                }
        }
        for (int i = 0; i < THREADS; i++) {
                if (pthread_create(&w[i].thread, NULL, worker_main, &w[i]) != 0) {
                        fail("pthread_create");
                        abort();
                }
                started++;
        }
        pthread_barrier_wait(&start);
        t0 = now_ms();
        for (int i = 0; i < started; i++)
                pthread_join(w[i].thread, NULL);
        elapsed = now_ms() - t0;
        pthread_barrier_destroy(&start);

        for (int i = 0; i < THREADS; i++) {
                if (w[i].rv != CKR_OK)
                        fail("thread %d: C_Sign: 0x%lx", i, w[i].rv);
                else if (!verify(w[i].hash, w[i].sig, w[i].len))
                        fail("thread %d: signature does not verify", i);
                mod->C_CloseSession(w[i].s);
        }
        printf("# %d signatures in %.1f ms (sequential would be %d ms)\n", THREADS, elapsed, THREADS * DELAY_MS);
        if (elapsed < min_ms || elapsed >= max_ms)
                fail("%d signatures took %.1f ms, expected %.0f <= t < %.0f ms", THREADS, elapsed, min_ms, max_ms);
        phase_end();
        expect_count("C_Sign", THREADS);
        expect_count("C_Login", 1);
        expect_count("C_OpenSession", THREADS + 1);
        expect_count("C_FindObjectsInit", 1);
        expect_count("C_Decrypt", 0);
        if (count_of("max_in_flight") > (long)(maxc ? maxc : THREADS) || count_of("max_in_flight") < 2)
                fail("max_in_flight=%ld with MAX_CONCURRENT=%lu", count_of("max_in_flight"), maxc);
        printf("# max_in_flight=%ld\n", count_of("max_in_flight"));
out:
        return;
}

/* COUNT_EVERY=1 and a %p in COUNT_FILE: the file of this process is
 * current after every operation, before C_Finalize. */
static void count_every_phase(void)
{
        char path[4200], file[64];
        CK_SESSION_HANDLE s;

        printf("# COUNT_EVERY=1, COUNT_FILE=.../counts-%%p\n");
        snprintf(path, sizeof(path), "%s/counts-%%p", tokdir);
        setenv("HSMTLS_SLOWTOKEN_COUNT_FILE", path, 1);
        setenv("HSMTLS_SLOWTOKEN_COUNT_EVERY", "1", 1);
        snprintf(file, sizeof(file), "counts-%ld", (long)getpid());
        s = phase_start(0, 0, 0, 0);
        if (s) {
                for (unsigned n = 1; n <= 3; n++) {
                        if (sign_once(s, n, true) != CKR_OK)
                                fail("COUNT_EVERY=1: C_Sign %u failed", n);
                        if (count_in(file, "operations") != (long)n)
                                fail("COUNT_EVERY=1: after %u operations %s says operations=%ld", n, file,
                                     count_in(file, "operations"));
                }
                phase_end();
        }
        snprintf(path, sizeof(path), "%s/counts", tokdir);
        setenv("HSMTLS_SLOWTOKEN_COUNT_FILE", path, 1);
        unsetenv("HSMTLS_SLOWTOKEN_COUNT_EVERY");
}

/* --------------------------------------------------- phases 3, 4: faults */

static void fail_every_phase(void)
{
        CK_SESSION_HANDLE s;
        CK_RV rv;

        printf("# FAIL_EVERY=3\n");
        s = phase_start(0, 0, 3, 0);
        if (!s)
                return;
        for (unsigned n = 1; n <= 7; n++) {
                CK_RV want = n % 3 == 0 ? CKR_DEVICE_ERROR : CKR_OK;
                rv = sign_once(s, n, true);
                if (rv != want)
                        fail("FAIL_EVERY=3: C_Sign %u returned 0x%lx, expected 0x%lx", n, rv, want);
        }
        phase_end();
        expect_count("C_Sign", 7);
        expect_count("injected_fail", 2);
        expect_count("C_SignInit", 7);
}

static void close_every_phase(void)
{
        CK_SESSION_INFO info;
        CK_SESSION_HANDLE s;
        CK_RV rv;

        printf("# CLOSE_SESSIONS_EVERY=2\n");
        s = phase_start(0, 0, 0, 2);
        if (!s)
                return;
        if ((rv = sign_once(s, 1, true)) != CKR_OK)
                fail("CLOSE_SESSIONS_EVERY=2: C_Sign 1 returned 0x%lx", rv);
        if ((rv = sign_once(s, 2, true)) != CKR_SESSION_HANDLE_INVALID)
                fail("CLOSE_SESSIONS_EVERY=2: C_Sign 2 returned 0x%lx, expected CKR_SESSION_HANDLE_INVALID", rv);
        if ((rv = mod->C_GetSessionInfo(s, &info)) != CKR_SESSION_HANDLE_INVALID)
                fail("the session survived the injected close: C_GetSessionInfo 0x%lx", rv);

        rv = mod->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s);
        if (rv != CKR_OK) {
                fail("C_OpenSession after the injected close: 0x%lx", rv);
                goto out;
        }
        if ((rv = mod->C_GetSessionInfo(s, &info)) != CKR_OK || info.state != CKS_RO_PUBLIC_SESSION)
                fail("after the injected close the login should be gone: 0x%lx state %lu", rv, info.state);
        rv = mod->C_Login(s, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
        if (rv != CKR_OK)
                fail("C_Login after the injected close: 0x%lx", rv);
        /* SoftHSM invalidates the handles of private objects at logout
         * (CKR_OBJECT_HANDLE_INVALID): the key must be looked up again. */
        {
                CK_MECHANISM mech = { CKM_ECDSA, NULL, 0 };
                if ((rv = mod->C_SignInit(s, &mech, key)) != CKR_OBJECT_HANDLE_INVALID)
                        fail("C_SignInit with the old key handle after a new login: 0x%lx", rv);
        }
        if (find_key(s) < 0)
                goto out;
        if ((rv = sign_once(s, 3, true)) != CKR_OK)
                fail("C_Sign 3 after a new login: 0x%lx", rv);
        if ((rv = sign_once(s, 4, true)) != CKR_SESSION_HANDLE_INVALID)
                fail("C_Sign 4 returned 0x%lx, expected CKR_SESSION_HANDLE_INVALID", rv);
out:
        phase_end();
        expect_count("C_Sign", 4);
        expect_count("injected_close", 2);
        expect_count("C_Login", 2);
        expect_count("C_FindObjectsInit", 2);
}

/* ------------------------------------------------------ phase 5: more faults */

static const char *const more_vars[] = {
        "HSMTLS_SLOWTOKEN_INIT_ACTIVE_EVERY", "HSMTLS_SLOWTOKEN_RENUMBER",
        "HSMTLS_SLOWTOKEN_UNAVAILABLE_ATTRS", "HSMTLS_SLOWTOKEN_CONTEXT_LOGIN_RV", NULL,
};

static void more_faults_phase(void)
{
        CK_MECHANISM mech = { CKM_ECDSA, NULL, 0 };
        CK_SESSION_HANDLE s, s2;
        CK_KEY_TYPE kt;
        CK_RV rv;

        printf("# INIT_ACTIVE_EVERY=2 RENUMBER=1 UNAVAILABLE_ATTRS=0x181 CONTEXT_LOGIN_RV=0x30\n");
        setenv("HSMTLS_SLOWTOKEN_INIT_ACTIVE_EVERY", "2", 1);
        setenv("HSMTLS_SLOWTOKEN_RENUMBER", "1", 1);
        setenv("HSMTLS_SLOWTOKEN_UNAVAILABLE_ATTRS", "0x181", 1);
        setenv("HSMTLS_SLOWTOKEN_CONTEXT_LOGIN_RV", "0x30", 1);
        s = phase_start(0, 0, 0, 0);
        for (int i = 0; more_vars[i]; i++)
                unsetenv(more_vars[i]);
        if (!s)
                return;
        if (key != 1)
                fail("RENUMBER: the first object found got handle %lu, expected 1", key);

        /* The 2nd successful C_SignInit is left active and answered
         * CKR_OPERATION_ACTIVE; the session stays stuck. */
        if ((rv = sign_once(s, 1, true)) != CKR_OK)
                fail("INIT_ACTIVE_EVERY=2: signature 1: 0x%lx", rv);
        if ((rv = mod->C_SignInit(s, &mech, key)) != CKR_OPERATION_ACTIVE)
                fail("INIT_ACTIVE_EVERY=2: C_SignInit 2 returned 0x%lx, expected CKR_OPERATION_ACTIVE", rv);
        if ((rv = mod->C_SignInit(s, &mech, key)) != CKR_OPERATION_ACTIVE)
                fail("INIT_ACTIVE_EVERY=2: the session should stay stuck: C_SignInit 3 returned 0x%lx", rv);
        rv = mod->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s2);
        if (rv != CKR_OK) {
                fail("C_OpenSession: 0x%lx", rv);
                goto out;
        }
        mod->C_CloseSession(s);

        /* CKA_EC_POINT unavailable with CKR_OK; CKA_KEY_TYPE forwarded. */
        {
                CK_ATTRIBUTE a[2] = { { CKA_EC_POINT, NULL, 0 }, { CKA_KEY_TYPE, &kt, sizeof(kt) } };
                rv = mod->C_GetAttributeValue(s2, key, a, 2);
                if (rv != CKR_OK || a[0].ulValueLen != CK_UNAVAILABLE_INFORMATION || a[1].ulValueLen != sizeof(kt) || kt != CKK_EC)
                        fail("UNAVAILABLE_ATTRS: 0x%lx, lengths %lu %lu", rv, a[0].ulValueLen, a[1].ulValueLen);
        }

        if ((rv = mod->C_Login(s2, CKU_CONTEXT_SPECIFIC, (CK_UTF8CHAR_PTR)pin, strlen(pin))) != CKR_DEVICE_ERROR)
                fail("CONTEXT_LOGIN_RV=0x30: context login returned 0x%lx", rv);

        /* After a new login, handle 1 names nothing until an object is
         * found again. */
        mod->C_Logout(s2);
        if ((rv = mod->C_Login(s2, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin))) != CKR_OK)
                fail("C_Login again: 0x%lx", rv);
        if ((rv = mod->C_SignInit(s2, &mech, key)) != CKR_KEY_HANDLE_INVALID)
                fail("RENUMBER: C_SignInit with a handle from before the login: 0x%lx", rv);
        if (find_key(s2) < 0)
                goto out;
        if (key != 1)
                fail("RENUMBER: after the login the key got handle %lu, expected 1", key);
        if ((rv = sign_once(s2, 3, true)) != CKR_OK)
                fail("signature after the new login: 0x%lx", rv);
out:
        phase_end();
        expect_count("injected_active", 1);
        expect_count("injected_unavailable", 1);
        expect_count("injected_context_login", 1);
        expect_count("renumbered", 2);
}

/* ------------------------------------------------ phase 6: the control file */

static void write_control(const char *path, const char *text)
{
        char tmp[4300];
        FILE *f;

        snprintf(tmp, sizeof(tmp), "%s.tmp", path);
        f = fopen(tmp, "w");
        if (!f || fputs(text, f) < 0 || fclose(f) != 0 || rename(tmp, path) < 0)
                fail("cannot write the control file %s", path);
}

static void control_phase(void)
{
        char path[4200];
        CK_SLOT_ID slots[16];
        CK_ULONG n = 16;
        CK_SLOT_INFO si;
        CK_SESSION_INFO sinfo;
        CK_SESSION_HANDLE s, s2;
        CK_INFO info;
        CK_RV rv;
        bool listed = false;

        snprintf(path, sizeof(path), "%s/control", tokdir);
        write_control(path, "present");
        setenv("HSMTLS_SLOWTOKEN_CONTROL_FILE", path, 1);
        s = phase_start(0, 0, 0, 0);
        if (!s)
                return;
        if (sign_once(s, 1, true) != CKR_OK)
                fail("control: a signature while present failed");

        /* Removed: no slot listed, not present, sessions gone. */
        write_control(path, "removed");
        CK_MECHANISM mech = { CKM_ECDSA, NULL, 0 };
        rv = mod->C_SignInit(s, &mech, key);
        if (rv != CKR_DEVICE_REMOVED)
                fail("control: removed: C_SignInit answered 0x%lx, not CKR_DEVICE_REMOVED", rv);
        rv = mod->C_GetSlotList(CK_TRUE, slots, &n);
        if (rv != CKR_OK || n != 0)
                fail("control: removed: C_GetSlotList(CK_TRUE) answered 0x%lx with %lu slots", rv, n);
        rv = mod->C_GetSlotInfo(slot, &si);
        if (rv != CKR_OK || (si.flags & CKF_TOKEN_PRESENT))
                fail("control: removed: C_GetSlotInfo answered 0x%lx, flags 0x%lx", rv, si.flags);
        rv = mod->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s2);
        if (rv != CKR_TOKEN_NOT_PRESENT)
                fail("control: removed: C_OpenSession answered 0x%lx, not CKR_TOKEN_NOT_PRESENT", rv);

        /* Back in another slot: the old session is gone, the old slot ID
         * names nothing, the new one works. */
        write_control(path, "slot-shift=7");
        rv = mod->C_GetSessionInfo(s, &sinfo);
        if (rv != CKR_SESSION_HANDLE_INVALID)
                fail("control: back: the old session answered 0x%lx, not CKR_SESSION_HANDLE_INVALID", rv);
        n = 16;
        rv = mod->C_GetSlotList(CK_TRUE, slots, &n);
        for (CK_ULONG i = 0; rv == CKR_OK && i < n; i++)
                if (slots[i] == slot + 7)
                        listed = true;
        if (!listed)
                fail("control: back: slot %lu + 7 is not listed (0x%lx)", (unsigned long)slot, rv);
        rv = mod->C_OpenSession(slot + 7, CKF_SERIAL_SESSION, NULL, NULL, &s2);
        if (rv != CKR_OK)
                fail("control: back: C_OpenSession in the new slot answered 0x%lx", rv);
        else if (mod->C_GetSessionInfo(s2, &sinfo) != CKR_OK || sinfo.slotID != slot + 7)
                fail("control: back: the session's slot is not the new one");

        /* A refused login, not forwarded. */
        write_control(path, "slot-shift=7 login-rv=0xa4");
        rv = mod->C_Login(s2, CKU_USER, (CK_UTF8CHAR_PTR)pin, strlen(pin));
        if (rv != CKR_PIN_LOCKED)
                fail("control: login-rv: C_Login answered 0x%lx, not CKR_PIN_LOCKED", rv);
        expect_count("injected_login", 1);

        /* Module failure: every call until C_Finalize, then it works again. */
        long inits = count_of("initializations");
        write_control(path, "slot-shift=7 fail=1");
        rv = mod->C_GetInfo(&info);
        if (rv != CKR_GENERAL_ERROR)
                fail("control: fail: C_GetInfo answered 0x%lx, not CKR_GENERAL_ERROR", rv);
        n = 16;
        rv = mod->C_GetSlotList(CK_TRUE, slots, &n);
        if (rv != CKR_GENERAL_ERROR)
                fail("control: fail: C_GetSlotList answered 0x%lx, not CKR_GENERAL_ERROR", rv);
        rv = p11_kit_module_finalize(mod);
        if (rv != CKR_OK)
                fail("control: fail: C_Finalize answered 0x%lx", rv);
        rv = p11_kit_module_initialize(mod);
        if (rv != CKR_OK)
                fail("control: fail: C_Initialize after C_Finalize answered 0x%lx", rv);
        rv = mod->C_GetInfo(&info);
        if (rv != CKR_OK)
                fail("control: fail: after C_Finalize and C_Initialize, C_GetInfo answered 0x%lx", rv);
        expect_count("removals", 1);
        expect_count("initializations", inits + 1);
        expect_count("finalize_busy", 0);
        write_control(path, "present");
        phase_end();
        unsetenv("HSMTLS_SLOWTOKEN_CONTROL_FILE");
}

int main(int argc, char **argv)
{
        const char *srcdir = getenv("SRCDIR");
        const char *tmp = getenv("TMPDIR");
        const char *softhsm = NULL;
        gnutls_datum_t pem = { NULL, 0 };
        char path[4200];
        FILE *f;

        setvbuf(stdout, NULL, _IOLBF, 0);
        if (argc != 2) {
                fprintf(stderr, "usage: %s PATH-TO-libhsmtls-slowtoken.so (with SRCDIR set)\n", argv[0]);
                return 2;
        }
        for (size_t i = 0; i < sizeof(softhsm_paths) / sizeof(softhsm_paths[0]); i++)
                if (access(softhsm_paths[i], R_OK) == 0) {
                        softhsm = softhsm_paths[i];
                        break;
                }
        if (!softhsm) {
                printf("SKIP: SoftHSM is not installed (Debian package softhsm2)\n");
                return 77;
        }
        {
                static const char *const tools[][2] = {
                        { "p11tool", "gnutls-bin" }, { "certtool", "gnutls-bin" },
                        { "pkcs11-tool", "opensc" }, { "script", "bsdutils" },
                };
                for (size_t i = 0; i < sizeof(tools) / sizeof(tools[0]); i++)
                        if (!in_path(tools[i][0])) {
                                printf("SKIP: %s is missing (Debian package %s)\n", tools[i][0], tools[i][1]);
                                return 77;
                        }
        }
        if (!srcdir) {
                fprintf(stderr, "SRCDIR is not set (the source root, where hsm-config/ is)\n");
                return 2;
        }

        snprintf(tokdir, sizeof(tokdir), "%s/hsmtls-slowtoken-XXXXXX", tmp && *tmp ? tmp : "/tmp");
        if (!mkdtemp(tokdir)) {
                fail("mkdtemp %s: %s", tokdir, strerror(errno));
                return 1;
        }
        setenv("HSMTLS_MODULE", softhsm, 1);
        if (provision(srcdir, tokdir) < 0)
                goto out;

        snprintf(path, sizeof(path), "%s/pin", tokdir);
        if (!(f = fopen(path, "r")) || !fgets(pin, sizeof(pin), f)) {
                fail("cannot read %s", path);
                if (f)
                        fclose(f);
                goto out;
        }
        fclose(f);
        pin[strcspn(pin, "\r\n")] = '\0';

        snprintf(path, sizeof(path), "%s/p256-pub.pem", tokdir);
        if (gnutls_load_file(path, &pem) < 0 || gnutls_pubkey_init(&pubkey) < 0 ||
            gnutls_pubkey_import(pubkey, &pem, GNUTLS_X509_FMT_PEM) < 0) {
                fail("cannot load the public key %s", path);
                goto out;
        }

        snprintf(path, sizeof(path), "%s/softhsm2.conf", tokdir);
        setenv("SOFTHSM2_CONF", path, 1);
        setenv("HSMTLS_SLOWTOKEN_MODULE", softhsm, 1);
        snprintf(path, sizeof(path), "%s/counts", tokdir);
        setenv("HSMTLS_SLOWTOKEN_COUNT_FILE", path, 1);

        mod = p11_kit_module_load(argv[1], 0);
        if (!mod) {
                fail("p11_kit_module_load %s: %s", argv[1], p11_kit_message());
                goto out;
        }

        concurrent_phase(THREADS, DELAY_MS, 300);
        concurrent_phase(2, THREADS / 2 * DELAY_MS, 1000);
        count_every_phase();
        fail_every_phase();
        close_every_phase();
        more_faults_phase();
        control_phase();

        p11_kit_module_release(mod);
out:
        gnutls_free(pem.data);
        if (pubkey)
                gnutls_pubkey_deinit(pubkey);
        explicit_bzero(pin, sizeof(pin));
        if (failures) {
                printf("%d check(s) failed; the token is kept in %s (source %s/uris.env)\n",
                       failures, tokdir, tokdir);
                return 1;
        }
        nftw(tokdir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
        printf("ok: slowtoken delays, limits, counts and injects faults as configured\n");
        return 0;
}
