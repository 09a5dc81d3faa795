/* libhsmtls-slowtoken: a forwarding PKCS#11 module for tests.
 *
 * It loads a real PKCS#11 module (SoftHSM by default) and forwards every
 * function of CK_FUNCTION_LIST to it, so that a test can make the token
 * slow, limit how many private-key operations run at once, count the calls
 * it receives, and inject faults.  Everything is set by environment
 * variables that are read when C_Initialize succeeds:
 *
 *   HSMTLS_SLOWTOKEN_MODULE          the real module (default: SoftHSM in
 *                                    the usual Debian places); read when
 *                                    the module is first used
 *   HSMTLS_SLOWTOKEN_DELAY_MS        sleep before each C_Sign, C_SignFinal,
 *                                    C_Decrypt, C_DecryptFinal (default 0)
 *   HSMTLS_SLOWTOKEN_MAX_CONCURRENT  at most this many of those in flight
 *                                    (default 0: no limit)
 *   HSMTLS_SLOWTOKEN_COUNT_FILE      write the call counters here on
 *                                    C_Finalize, at exit, and every 100
 *                                    operations (a %p in it: the pid)
 *   HSMTLS_SLOWTOKEN_COUNT_EVERY     ... every N operations instead
 *                                    (default 100)
 *   HSMTLS_SLOWTOKEN_FAIL_EVERY      every Nth C_Sign returns
 *                                    CKR_DEVICE_ERROR
 *   HSMTLS_SLOWTOKEN_CLOSE_SESSIONS_EVERY
 *                                    every Nth C_Sign closes all sessions of
 *                                    the slot, then returns
 *                                    CKR_SESSION_HANDLE_INVALID
 *   HSMTLS_SLOWTOKEN_HIDE_MECHS      mechanisms the token pretends not to
 *                                    have (numbers, comma-separated)
 *   HSMTLS_SLOWTOKEN_INIT_ACTIVE_EVERY
 *                                    every Nth C_SignInit/C_DecryptInit
 *                                    starts the operation, then answers
 *                                    CKR_OPERATION_ACTIVE (the session is
 *                                    left with an operation active)
 *   HSMTLS_SLOWTOKEN_RENUMBER        1: the module numbers object handles
 *                                    itself, anew after each C_Login
 *   HSMTLS_SLOWTOKEN_UNAVAILABLE_ATTRS
 *                                    attribute types C_GetAttributeValue
 *                                    answers CKR_OK for with the length
 *                                    CK_UNAVAILABLE_INFORMATION
 *   HSMTLS_SLOWTOKEN_CONTEXT_LOGIN_RV
 *                                    every context-specific C_Login answers
 *                                    this CK_RV (a number, e.g. 0x30)
 *   HSMTLS_SLOWTOKEN_SIGN_LEN_ADD    a successful C_Sign with an output
 *                                    buffer adds this to *pulSignatureLen
 *                                    (a token that claims more than it wrote)
 *   HSMTLS_SLOWTOKEN_DECRYPT_FAIL_RV a C_Decrypt that the real module fails
 *                                    returns this CK_RV instead
 *   HSMTLS_SLOWTOKEN_SIGN_LOG        append a line per C_SignInit (the key's
 *                                    label, the thread) to this file
 *
 * A length query (C_Sign etc. with a NULL output buffer) is forwarded at
 * once: it is neither delayed, limited nor counted as an operation.  See
 * README.md next to this file.
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#define ST_EXPORT __attribute__((visibility("default")))
#define ST_PREFIX "hsmtls-slowtoken: "

/* Every function of CK_FUNCTION_LIST, in the order of the structure. */
#define ST_FUNCTIONS(X) \
        X(C_Initialize) X(C_Finalize) X(C_GetInfo) X(C_GetFunctionList) \
        X(C_GetSlotList) X(C_GetSlotInfo) X(C_GetTokenInfo) \
        X(C_GetMechanismList) X(C_GetMechanismInfo) X(C_InitToken) \
        X(C_InitPIN) X(C_SetPIN) X(C_OpenSession) X(C_CloseSession) \
        X(C_CloseAllSessions) X(C_GetSessionInfo) X(C_GetOperationState) \
        X(C_SetOperationState) X(C_Login) X(C_Logout) X(C_CreateObject) \
        X(C_CopyObject) X(C_DestroyObject) X(C_GetObjectSize) \
        X(C_GetAttributeValue) X(C_SetAttributeValue) X(C_FindObjectsInit) \
        X(C_FindObjects) X(C_FindObjectsFinal) X(C_EncryptInit) X(C_Encrypt) \
        X(C_EncryptUpdate) X(C_EncryptFinal) X(C_DecryptInit) X(C_Decrypt) \
        X(C_DecryptUpdate) X(C_DecryptFinal) X(C_DigestInit) X(C_Digest) \
        X(C_DigestUpdate) X(C_DigestKey) X(C_DigestFinal) X(C_SignInit) \
        X(C_Sign) X(C_SignUpdate) X(C_SignFinal) X(C_SignRecoverInit) \
        X(C_SignRecover) X(C_VerifyInit) X(C_Verify) X(C_VerifyUpdate) \
        X(C_VerifyFinal) X(C_VerifyRecoverInit) X(C_VerifyRecover) \
        X(C_DigestEncryptUpdate) X(C_DecryptDigestUpdate) \
        X(C_SignEncryptUpdate) X(C_DecryptVerifyUpdate) X(C_GenerateKey) \
        X(C_GenerateKeyPair) X(C_WrapKey) X(C_UnwrapKey) X(C_DeriveKey) \
        X(C_SeedRandom) X(C_GenerateRandom) X(C_GetFunctionStatus) \
        X(C_CancelFunction) X(C_WaitForSlotEvent)

enum {
#define ST_ENUM(name) FN_##name,
        ST_FUNCTIONS(ST_ENUM)
#undef ST_ENUM
        FN_COUNT
};

/* ------------------------------------------------------------------ state */

/* The real module, loaded once by the first C_GetFunctionList and kept. */
static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static CK_FUNCTION_LIST *real;
static CK_RV load_rv = CKR_GENERAL_ERROR;

/* Settings, written by C_Initialize before any operation can run. */
static atomic_ulong delay_ms;       /* HSMTLS_SLOWTOKEN_DELAY_MS, or the control file's delay-ms= */
static atomic_ulong keygen_delay_ms; /* the control file's keygen-delay-ms= */
static unsigned long delay_ms_env;
static unsigned long max_concurrent;
static unsigned long burn_us;       /* HSMTLS_SLOWTOKEN_BURN_US: CPU burnt per operation (an in-process token) */
static unsigned long count_every = 100; /* HSMTLS_SLOWTOKEN_COUNT_EVERY */
static unsigned long fail_every;
static unsigned long close_every;
static unsigned long init_active_every;
static bool renumber;
static CK_RV context_login_rv;
static unsigned long decrypt_fail_rv; /* 0: the real module's own CK_RV */
static unsigned long sign_len_add;    /* HSMTLS_SLOWTOKEN_SIGN_LEN_ADD */
static atomic_bool guard_on;

/* Counters since the last successful C_Initialize. */
static atomic_ulong calls[FN_COUNT];
static atomic_ulong ops;            /* delayed operations started */
static atomic_ulong sign_seq;       /* C_Sign operations, for fault injection */
static atomic_ulong injected_fail;
static atomic_ulong injected_close;
static atomic_ulong init_seq;       /* C_SignInit/C_DecryptInit, for INIT_ACTIVE_EVERY */
static atomic_ulong injected_active;
static atomic_ulong injected_unavailable;
static atomic_ulong injected_context_login;
static atomic_ulong renumbered;     /* logins that restarted the numbering */
static atomic_bool initialized;

/* HSMTLS_SLOWTOKEN_CONTROL_FILE (see control_refresh()). */
static char *control_file;          /* set by C_Initialize, kept by C_Finalize */
static pthread_mutex_t control_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_bool cond_removed;
static atomic_ulong cond_shift;
static atomic_bool module_failed;
static atomic_ulong module_fail_rv = CKR_GENERAL_ERROR;
static atomic_ulong cond_login_rv;
static atomic_ulong cond_objects_rv; /* objects-rv=: C_GenerateKeyPair, C_CreateObject, C_DestroyObject */
static atomic_ulong module_fail_delay; /* ms */
static atomic_bool cond_device_error;  /* device-error: every C_Sign answers CKR_DEVICE_ERROR */
static atomic_ulong cond_sign_rv;      /* sign-rv=: every C_Sign answers this CK_RV (0: off) */
static atomic_ulong injected_sign_rv;  /* C_Sign answered sign-rv (never reset) */
static atomic_bool cond_hold;          /* hold: operations wait until it is gone */
static atomic_ulong held_total;        /* operations that waited on hold (never reset) */
static atomic_ulong holding;           /* operations waiting on hold now */
static int sign_log_fd = -1;           /* HSMTLS_SLOWTOKEN_SIGN_LOG, opened by C_Initialize */
static atomic_bool cond_hang;          /* hang: private-key operations wait while it is written */
static atomic_bool cond_hang_all;      /* hang-all: every call waits while it is written */
static bool cond_swapped;              /* swapped=S (under control_lock): C_GetTokenInfo reports serial S */
static bool point_word;                /* point-rv-once=RV written (under control_lock) */
static unsigned long point_rv;         /* its RV, for the next read of CKA_EC_POINT (0: none armed) */
static atomic_ulong injected_point;    /* reads of CKA_EC_POINT answered point-rv-once */
static char swapped_serial[16];        /* under control_lock, space-padded */
static atomic_bool cond_hang_destroy;  /* hang-destroy: C_DestroyObject waits while it is written */
static void control_refresh(void);
static unsigned long fail_gen_seen; /* under control_lock */
static atomic_ulong injected_removed;  /* calls answered as for a removed token */
static atomic_ulong injected_module;   /* calls answered with the module failure */
static atomic_ulong injected_login;    /* C_Login answered login-rv */
static atomic_ulong injected_hang;     /* calls held by hang-all (never reset) */
static atomic_ulong removals;          /* present -> removed transitions */
static atomic_ulong inits_total;       /* successful C_Initialize calls, never reset */
static atomic_ulong user_logins;       /* user/SO C_Login calls forwarded to the real module, never reset */

/* HSMTLS_SLOWTOKEN_RENUMBER: the handles the caller sees are 1, 2, 3... in
 * the order the objects were first found since the last C_Login; a handle
 * from before a login may so name another object after it. */
static pthread_mutex_t renum_lock = PTHREAD_MUTEX_INITIALIZER;
static CK_OBJECT_HANDLE *renum_tab; /* virtual handle i + 1 -> real handle */
static size_t renum_n, renum_cap;

/* Capacity of the simulated HSM. */
static pthread_mutex_t cap_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cap_cond = PTHREAD_COND_INITIALIZER;
static unsigned long in_flight;
static unsigned long peak_in_flight;

/* While CLOSE_SESSIONS_EVERY is set, every forwarded call holds this lock
 * for reading and the injected C_CloseAllSessions holds it for writing:
 * SoftHSM frees a session in C_CloseAllSessions while another thread may
 * still be using it, and the injection must not crash the token. */
static pthread_rwlock_t guard;
static pthread_once_t guard_once = PTHREAD_ONCE_INIT;

/* The count file. */
static pthread_mutex_t file_lock = PTHREAD_MUTEX_INITIALIZER;
static char *count_file;
static bool count_file_warned;

/* ---------------------------------------------------------------- helpers */

static void guard_setup(void)
{
        pthread_rwlockattr_t attr;

        pthread_rwlockattr_init(&attr);
        /* The injector must not starve behind a steady stream of readers. */
        pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
        pthread_rwlock_init(&guard, &attr);
        pthread_rwlockattr_destroy(&attr);
}

/* Calls inside the real module now (forwarded calls and delayed
 * operations), and how often C_Finalize came while one was: a caller must
 * finalize only once no thread is inside the module. */
static atomic_long inside;
static atomic_ulong finalize_busy;

static bool guard_enter(void)
{
        atomic_fetch_add(&inside, 1);
        if (!atomic_load_explicit(&guard_on, memory_order_acquire))
                return false;
        pthread_rwlock_rdlock(&guard);
        return true;
}

static void guard_leave(bool held)
{
        if (held)
                pthread_rwlock_unlock(&guard);
        atomic_fetch_sub(&inside, 1);
}

static void count_call(int fn)
{
        atomic_fetch_add_explicit(&calls[fn], 1, memory_order_relaxed);
}

static unsigned long counter(int fn)
{
        return atomic_load_explicit(&calls[fn], memory_order_relaxed);
}

static void sleep_ms(unsigned long ms)
{
        struct timespec until;

        if (ms == 0)
                return;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += ms / 1000;
        until.tv_nsec += (long)(ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
                until.tv_sec++;
                until.tv_nsec -= 1000000000L;
        }
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL) == EINTR)
                ;
}

/* The count file's name for this process: every "%p" is the pid (a
 * server that forks, like nginx, has a file per process). */
static int count_path(char *buf, size_t size)
{
        size_t n = 0;
        buf[0] = 0;
        for (const char *p = count_file; *p; p++) {
                int w;
                if (p[0] == '%' && p[1] == 'p') {
                        w = snprintf(buf + n, size - n, "%ld", (long)getpid());
                        p++;
                } else
                        w = snprintf(buf + n, size - n, "%c", *p);
                if (w < 0 || (size_t)w >= size - n)
                        return -1;
                n += (size_t)w;
        }
        return 0;
}

/* Writes the counters to the count file: a temporary file renamed over it,
 * so that a reader never sees half a line. */
static void counts_write(void)
{
        char tmp[PATH_MAX], path[PATH_MAX];
        unsigned long peak;
        FILE *f;

        pthread_mutex_lock(&cap_lock);
        peak = peak_in_flight;
        pthread_mutex_unlock(&cap_lock);

        pthread_mutex_lock(&file_lock);
        if (!count_file)
                goto out;
        if (count_path(path, sizeof(path)) < 0 ||
            snprintf(tmp, sizeof(tmp), "%s.%ld.tmp", path, (long)getpid()) >= (int)sizeof(tmp))
                goto fail;
        f = fopen(tmp, "we");
        if (!f)
                goto fail;
        fprintf(f, "C_Sign=%lu C_Decrypt=%lu C_Login=%lu C_OpenSession=%lu C_FindObjectsInit=%lu"
                " C_SignFinal=%lu C_DecryptFinal=%lu C_SignInit=%lu C_DecryptInit=%lu"
                " C_CloseSession=%lu C_CloseAllSessions=%lu C_Logout=%lu"
                " injected_fail=%lu injected_close=%lu max_in_flight=%lu"
                " C_GetAttributeValue=%lu C_FindObjects=%lu injected_active=%lu injected_unavailable=%lu"
                " injected_context_login=%lu renumbered=%lu injected_removed=%lu injected_module=%lu"
                " injected_login=%lu removals=%lu initializations=%lu C_Finalize=%lu C_GetSlotList=%lu finalize_busy=%lu"
                " held=%lu holding=%lu operations=%lu hung=%lu user_logins=%lu injected_sign_rv=%lu C_GenerateKeyPair=%lu"
                " injected_point=%lu\n",
                counter(FN_C_Sign), counter(FN_C_Decrypt), counter(FN_C_Login),
                counter(FN_C_OpenSession), counter(FN_C_FindObjectsInit),
                counter(FN_C_SignFinal), counter(FN_C_DecryptFinal),
                counter(FN_C_SignInit), counter(FN_C_DecryptInit),
                counter(FN_C_CloseSession), counter(FN_C_CloseAllSessions),
                counter(FN_C_Logout),
                atomic_load(&injected_fail), atomic_load(&injected_close), peak,
                counter(FN_C_GetAttributeValue), counter(FN_C_FindObjects), atomic_load(&injected_active),
                atomic_load(&injected_unavailable), atomic_load(&injected_context_login), atomic_load(&renumbered),
                atomic_load(&injected_removed), atomic_load(&injected_module), atomic_load(&injected_login),
                atomic_load(&removals), atomic_load(&inits_total), counter(FN_C_Finalize), counter(FN_C_GetSlotList),
                atomic_load(&finalize_busy), atomic_load(&held_total), atomic_load(&holding), atomic_load(&ops),
                atomic_load(&injected_hang), atomic_load(&user_logins), atomic_load(&injected_sign_rv),
                counter(FN_C_GenerateKeyPair), atomic_load(&injected_point));
        if (fclose(f) != 0) {
                unlink(tmp);
                goto fail;
        }
        if (rename(tmp, path) < 0) {
                unlink(tmp);
                goto fail;
        }
        goto out;
fail:
        if (!count_file_warned) {
                fprintf(stderr, ST_PREFIX "cannot write count file %s: %s\n", count_file, strerror(errno));
                count_file_warned = true;
        }
out:
        pthread_mutex_unlock(&file_lock);
}

static void control_refresh(void);

/* A private-key operation starts: wait for a free place in the simulated
 * HSM, then take the simulated time. */
static void op_begin(void)
{
        atomic_fetch_add(&inside, 1);
        pthread_mutex_lock(&cap_lock);
        while (max_concurrent > 0 && in_flight >= max_concurrent)
                pthread_cond_wait(&cap_cond, &cap_lock);
        in_flight++;
        if (in_flight > peak_in_flight)
                peak_in_flight = in_flight;
        pthread_mutex_unlock(&cap_lock);

        if (control_file && atomic_load(&cond_hold)) {
                atomic_fetch_add(&held_total, 1);
                atomic_fetch_add(&holding, 1);
                counts_write();
                while (atomic_load(&cond_hold)) {
                        sleep_ms(2);
                        control_refresh();
                }
                atomic_fetch_sub(&holding, 1);
                counts_write();
        }
        sleep_ms(delay_ms);
        /* A token that hangs: no answer while the control file says so. */
        while (atomic_load(&cond_hang)) {
                sleep_ms(20);
                control_refresh();
        }
        if (burn_us) {
                /* An in-process token whose work is CPU: spin on this
                 * thread's CPU clock, so that time sharing the cores counts. */
                struct timespec ts;
                clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
                uint64_t end = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec + (uint64_t)burn_us * 1000u;
                volatile unsigned long x = 0;
                for (;;) {
                        for (int i = 0; i < 1000; i++)
                                x = x * 31 + (unsigned long)i;
                        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
                        if ((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec >= end)
                                break;
                }
        }
}

static void op_end(void)
{
        atomic_fetch_sub(&inside, 1);
        pthread_mutex_lock(&cap_lock);
        in_flight--;
        pthread_cond_signal(&cap_cond);
        pthread_mutex_unlock(&cap_lock);

        if ((atomic_fetch_add(&ops, 1) + 1) % count_every == 0)
                counts_write();
}

/* Parses a non-negative decimal environment variable; 0 if unset or empty. */
static int env_ulong(const char *name, unsigned long *ret)
{
        const char *s = getenv(name);
        unsigned long v;
        char *end;

        *ret = 0;
        if (!s || !*s)
                return 0;
        errno = 0;
        v = strtoul(s, &end, 10);
        if (errno != 0 || *end != '\0' || *s == '-' || v > 86400000UL) {
                fprintf(stderr, ST_PREFIX "%s='%s' is not a number from 0 to 86400000\n", name, s);
                return -1;
        }
        *ret = v;
        return 0;
}

/* Parses a CK_RV (decimal or 0x hex) from the environment; 0 (CKR_OK) if unset. */
static int env_rv(const char *name, unsigned long *ret)
{
        const char *s = getenv(name);
        char *end;

        *ret = 0;
        if (!s || !*s)
                return 0;
        errno = 0;
        *ret = strtoul(s, &end, 0);
        if (errno != 0 || *end != '\0' || *s == '-') {
                fprintf(stderr, ST_PREFIX "%s='%s' is not a CK_RV number (e.g. 0x30)\n", name, s);
                return -1;
        }
        return 0;
}

/* ---------------------------------------------------------------- loading */

static CK_FUNCTION_LIST st_list;

static const char *const default_modules[] = {
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib64/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
};

static void load_real(void)
{
        const char *path = getenv("HSMTLS_SLOWTOKEN_MODULE");
        CK_C_GetFunctionList get;
        CK_FUNCTION_LIST *list = NULL;
        void *dl;
        CK_RV rv;

        if (!path || !*path) {
                path = NULL;
                for (size_t i = 0; i < sizeof(default_modules) / sizeof(default_modules[0]); i++)
                        if (access(default_modules[i], R_OK) == 0) {
                                path = default_modules[i];
                                break;
                        }
                if (!path) {
                        fprintf(stderr, ST_PREFIX "no real PKCS#11 module: set HSMTLS_SLOWTOKEN_MODULE "
                                "or install the Debian package softhsm2\n");
                        load_rv = CKR_GENERAL_ERROR;
                        return;
                }
        }

        dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (!dl) {
                fprintf(stderr, ST_PREFIX "cannot load %s: %s\n", path, dlerror());
                load_rv = CKR_GENERAL_ERROR;
                return;
        }
        get = (CK_C_GetFunctionList)dlsym(dl, "C_GetFunctionList");
        if (!get) {
                fprintf(stderr, ST_PREFIX "%s has no C_GetFunctionList\n", path);
                load_rv = CKR_GENERAL_ERROR;
                return;   /* dl stays open: dlclose of a half-used module is not worth the risk */
        }
        rv = get(&list);
        if (rv != CKR_OK || !list) {
                fprintf(stderr, ST_PREFIX "C_GetFunctionList of %s failed: 0x%lx\n", path, (unsigned long)rv);
                load_rv = rv != CKR_OK ? rv : CKR_GENERAL_ERROR;
                return;
        }
        if (list == &st_list) {
                fprintf(stderr, ST_PREFIX "HSMTLS_SLOWTOKEN_MODULE names the slowtoken module itself\n");
                load_rv = CKR_GENERAL_ERROR;
                return;
        }
        st_list.version = list->version;
        real = list;
        load_rv = CKR_OK;
}

/* ------------------------------------------------------- renumbering */

static void renum_reset(void)
{
        pthread_mutex_lock(&renum_lock);
        renum_n = 0;
        pthread_mutex_unlock(&renum_lock);
        atomic_fetch_add(&renumbered, 1);
}

/* The caller's handle for a real one (numbered on first sight); 0 if out of memory. */
static CK_OBJECT_HANDLE renum_out(CK_OBJECT_HANDLE real_h)
{
        CK_OBJECT_HANDLE v = 0;
        pthread_mutex_lock(&renum_lock);
        for (size_t i = 0; i < renum_n; i++)
                if (renum_tab[i] == real_h) {
                        v = i + 1;
                        goto out;
                }
        if (renum_n == renum_cap) {
                size_t cap = renum_cap ? renum_cap * 2 : 16;
                CK_OBJECT_HANDLE *tab = realloc(renum_tab, cap * sizeof(*tab));
                if (!tab)
                        goto out;
                renum_tab = tab;
                renum_cap = cap;
        }
        renum_tab[renum_n++] = real_h;
        v = renum_n;
out:
        pthread_mutex_unlock(&renum_lock);
        return v;
}

/* The real handle for the caller's; false if it names nothing (now). */
static bool renum_in(CK_OBJECT_HANDLE v, CK_OBJECT_HANDLE *real_h)
{
        bool ok = false;
        pthread_mutex_lock(&renum_lock);
        if (v >= 1 && v <= renum_n) {
                *real_h = renum_tab[v - 1];
                ok = true;
        }
        pthread_mutex_unlock(&renum_lock);
        return ok;
}

/* -------------------------------------------------------- control file */

/* HSMTLS_SLOWTOKEN_CONTROL_FILE: the token's condition, which a test flips
 * at run time by rewriting the file (one line of words; read at every call;
 * a missing or empty file is "present"):
 *   present        the token is there (default)
 *   removed        the token is gone: every session is closed in the real
 *                  module at once (which also ends the login); while removed,
 *                  C_GetSlotList(CK_TRUE) lists no slot, C_GetSlotInfo clears
 *                  CKF_TOKEN_PRESENT, slot functions answer
 *                  CKR_TOKEN_NOT_PRESENT and session functions
 *                  CKR_DEVICE_REMOVED
 *   device-error   every C_Sign answers CKR_DEVICE_ERROR (as FAIL_EVERY=1)
 *   sign-rv=RV     every C_Sign with an output buffer answers RV (e.g. 0xb3,
 *                  CKR_SESSION_HANDLE_INVALID), its real operation ended
 *   slot-shift=N   the caller sees slot IDs moved by N (a token that comes
 *                  back in another slot); the old IDs answer CKR_SLOT_ID_INVALID
 *   fail=G         module failure: from the first call that sees a new
 *                  generation G (a number), every call but C_Finalize and
 *                  C_Initialize answers CKR_GENERAL_ERROR (or fail-rv=) until
 *                  C_Finalize; then C_Initialize works again
 *   fail-rv=RV     the CK_RV of a module failure (e.g. 0x190,
 *                  CKR_CRYPTOKI_NOT_INITIALIZED)
 *   delay-ms=N     overrides HSMTLS_SLOWTOKEN_DELAY_MS while it is there
 *   keygen-delay-ms=N C_GenerateKeyPair sleeps N ms before it is forwarded
 *   hang           private-key operations (after their delay) do not return
 *                  while the word is there (read again every 20 ms)
 *   hang-all       no call but C_Initialize and C_Finalize returns while the
 *                  word is there (read again every 20 ms): a token that
 *                  stops answering altogether
 *   fail-delay-ms=N each call answered with the module failure takes N ms
 *                  first (a network HSM client that lost its server)
 *   login-rv=RV    every user C_Login answers RV without being forwarded
 *                  (e.g. 0xa4, CKR_PIN_LOCKED)
 *   objects-rv=RV  every C_GenerateKeyPair, C_CreateObject and
 *                  C_DestroyObject answers RV without being forwarded
 *                  (e.g. 0x6, CKR_FUNCTION_FAILED): nothing is made or
 *                  destroyed
 *   swapped=S      another token in the slot at once (a card swapped
 *                  between two calls): at the first call that sees it,
 *                  every session of the real module is closed (the login
 *                  too); C_GetTokenInfo reports serial number S (at most 16
 *                  characters) while it is there
 *   point-rv-once=RV the next C_GetAttributeValue that reads CKA_EC_POINT
 *                  after the word appears answers RV, once (a one-off
 *                  failure of a key's public value)
 *   hold           operations (those DELAY_MS delays) wait, inside the
 *                  concurrency limit and without using the CPU, until the
 *                  word is gone; the count file is written when one starts
 *                  and when one ends waiting (held=, holding=) */

/* Closes every session of the real module (the token was pulled): with the
 * guard held for writing, so that no forwarded call is inside SoftHSM. */
static void close_all_real_sessions(void)
{
        CK_SLOT_ID slots[64];
        CK_ULONG n = 64;

        pthread_rwlock_wrlock(&guard);
        if (real->C_GetSlotList(CK_FALSE, slots, &n) == CKR_OK)
                for (CK_ULONG i = 0; i < n; i++)
                        real->C_CloseAllSessions(slots[i]);
        pthread_rwlock_unlock(&guard);
}

static void control_refresh(void)
{
        char buf[256];
        bool removed = false, fail = false, device_error = false, hold = false, hang = false, hang_all = false,
             hang_destroy = false;
        unsigned long shift = 0, gen = 0, frv = CKR_GENERAL_ERROR, lrv = 0, fdelay = 0, odelay = 0, kdelay = 0, orv = 0, srv = 0;
        bool has_delay = false, swapped = false, point = false;
        unsigned long prv = 0;
        char serial[16];
        ssize_t n = 0;
        FILE *f;

        pthread_mutex_lock(&control_lock);
        if (!control_file)
                goto out;
        f = fopen(control_file, "re");
        if (f) {
                n = (ssize_t)fread(buf, 1, sizeof(buf) - 1, f);
                fclose(f);
        }
        buf[n > 0 ? n : 0] = 0;
        for (char *save = NULL, *w = strtok_r(buf, " \t\r\n", &save); w; w = strtok_r(NULL, " \t\r\n", &save)) {
                if (strcmp(w, "removed") == 0)
                        removed = true;
                else if (strcmp(w, "device-error") == 0)
                        device_error = true;
                else if (strcmp(w, "hold") == 0)
                        hold = true;
                else if (strcmp(w, "hang") == 0)
                        hang = true;
                else if (strcmp(w, "hang-all") == 0)
                        hang_all = true;
                else if (strcmp(w, "hang-destroy") == 0)
                        hang_destroy = true;
                else if (strncmp(w, "slot-shift=", 11) == 0)
                        shift = strtoul(w + 11, NULL, 0);
                else if (strncmp(w, "fail=", 5) == 0) {
                        gen = strtoul(w + 5, NULL, 0);
                        fail = true;
                } else if (strncmp(w, "fail-rv=", 8) == 0)
                        frv = strtoul(w + 8, NULL, 0);
                else if (strncmp(w, "login-rv=", 9) == 0)
                        lrv = strtoul(w + 9, NULL, 0);
                else if (strncmp(w, "objects-rv=", 11) == 0)
                        orv = strtoul(w + 11, NULL, 0);
                else if (strncmp(w, "sign-rv=", 8) == 0)
                        srv = strtoul(w + 8, NULL, 0);
                else if (strncmp(w, "fail-delay-ms=", 14) == 0)
                        fdelay = strtoul(w + 14, NULL, 0);
                else if (strncmp(w, "keygen-delay-ms=", 16) == 0)
                        kdelay = strtoul(w + 16, NULL, 0);
                else if (strncmp(w, "point-rv-once=", 14) == 0) {
                        prv = strtoul(w + 14, NULL, 0);
                        point = true;
                } else if (strncmp(w, "swapped=", 8) == 0) {
                        size_t l = strlen(w + 8);
                        memset(serial, ' ', sizeof(serial));
                        memcpy(serial, w + 8, l > sizeof(serial) ? sizeof(serial) : l);
                        swapped = true;
                } else if (strncmp(w, "delay-ms=", 9) == 0) {
                        odelay = strtoul(w + 9, NULL, 0);
                        has_delay = true;
                }
        }
        atomic_store(&cond_shift, shift);
        atomic_store(&cond_device_error, device_error);
        atomic_store(&cond_hold, hold);
        atomic_store(&cond_hang, hang);
        atomic_store(&cond_hang_all, hang_all);
        atomic_store(&cond_hang_destroy, hang_destroy);
        atomic_store(&cond_login_rv, lrv);
        atomic_store(&cond_objects_rv, orv);
        atomic_store(&cond_sign_rv, srv);
        atomic_store(&module_fail_rv, frv);
        atomic_store(&module_fail_delay, fdelay > 10000 ? 10000 : fdelay);
        atomic_store(&keygen_delay_ms, kdelay > 10000 ? 10000 : kdelay);
        atomic_store(&delay_ms, has_delay ? (odelay > 10000 ? 10000 : odelay) : delay_ms_env);
        if (fail && gen != fail_gen_seen) {
                fail_gen_seen = gen;
                atomic_store(&module_failed, true);
        }
        if (swapped && (!cond_swapped || memcmp(serial, swapped_serial, sizeof(serial)) != 0)) {
                memcpy(swapped_serial, serial, sizeof(serial));
                if (atomic_load(&initialized))
                        close_all_real_sessions();
        }
        cond_swapped = swapped;
        if (point && !point_word)
                point_rv = prv;
        point_word = point;
        if (removed && !atomic_load(&cond_removed)) {
                atomic_store(&cond_removed, true);
                atomic_fetch_add(&removals, 1);
                if (atomic_load(&initialized))
                        close_all_real_sessions();
        } else if (!removed)
                atomic_store(&cond_removed, false);
out:
        pthread_mutex_unlock(&control_lock);
}

/* The injected answer for function fn in the current condition, or CKR_OK
 * to go on. C_GetSlotList and C_GetSlotInfo handle removal themselves. */
static CK_RV control_gate(int fn)
{
        if (!control_file)
                return CKR_OK;
        control_refresh();
        switch (fn) {
        case FN_C_Initialize: case FN_C_Finalize: case FN_C_GetFunctionList:
                return CKR_OK;
        default:
                break;
        }
        if (atomic_load(&cond_hang_all)) {
                atomic_fetch_add(&injected_hang, 1);
                atomic_fetch_add(&inside, 1);
                counts_write();
                while (atomic_load(&cond_hang_all)) {
                        sleep_ms(20);
                        control_refresh();
                }
                atomic_fetch_sub(&inside, 1);
        }
        if (atomic_load(&module_failed)) {
                atomic_fetch_add(&injected_module, 1);
                /* a network HSM client that lost its server answers late */
                atomic_fetch_add(&inside, 1);
                sleep_ms(atomic_load(&module_fail_delay));
                atomic_fetch_sub(&inside, 1);
                return atomic_load(&module_fail_rv);
        }
        if (!atomic_load(&cond_removed))
                return CKR_OK;
        switch (fn) {
        case FN_C_GetInfo: case FN_C_GetSlotList: case FN_C_GetSlotInfo: case FN_C_WaitForSlotEvent:
                return CKR_OK;
        case FN_C_GetTokenInfo: case FN_C_GetMechanismList: case FN_C_GetMechanismInfo: case FN_C_InitToken:
        case FN_C_OpenSession: case FN_C_CloseAllSessions:
                atomic_fetch_add(&injected_removed, 1);
                return CKR_TOKEN_NOT_PRESENT;
        default:
                atomic_fetch_add(&injected_removed, 1);
                return CKR_DEVICE_REMOVED;
        }
}

#define GATE(fn)                                                \
        do {                                                    \
                CK_RV grv_ = control_gate(fn);                  \
                if (grv_ != CKR_OK)                             \
                        return grv_;                            \
        } while (0)

/* Slot IDs as the caller sees them (slot-shift=). */
static CK_SLOT_ID slot_out(CK_SLOT_ID real_slot)
{
        return real_slot + atomic_load(&cond_shift);
}

static bool slot_in(CK_SLOT_ID *slot)
{
        unsigned long shift = atomic_load(&cond_shift);
        if (*slot < shift)
                return false;
        *slot -= shift;
        return true;
}

#define SLOT_IN(slot)                                           \
        do {                                                    \
                if (!slot_in(&(slot)))                          \
                        return CKR_SLOT_ID_INVALID;             \
        } while (0)

/* ------------------------------------------------------- plain forwarders */

#define FORWARD(name, params, args)                             \
        static CK_RV st_##name params                           \
        {                                                       \
                CK_RV rv;                                       \
                bool held;                                      \
                count_call(FN_##name);                               \
                GATE(FN_##name);                                \
                if (!real->name)                                \
                        return CKR_FUNCTION_NOT_SUPPORTED;      \
                held = guard_enter();                           \
                rv = real->name args;                           \
                guard_leave(held);                              \
                return rv;                                      \
        }

/* hang-destroy: C_DestroyObject waits (counted in hung=) while the word is
 * written, re-reading the file every 20 ms. */
static void hang_destroy_wait(void)
{
        if (!atomic_load(&cond_hang_destroy))
                return;
        atomic_fetch_add(&injected_hang, 1);
        atomic_fetch_add(&inside, 1);
        counts_write();
        while (atomic_load(&cond_hang_destroy)) {
                sleep_ms(20);
                control_refresh();
        }
        atomic_fetch_sub(&inside, 1);
}

/* A function that takes or makes object handles but is not translated:
 * with HSMTLS_SLOWTOKEN_RENUMBER it answers CKR_FUNCTION_NOT_SUPPORTED. */
#define FORWARD_OBJ(name, params, args)                         \
        static CK_RV st_##name params                           \
        {                                                       \
                CK_RV rv;                                       \
                bool held;                                      \
                count_call(FN_##name);                          \
                GATE(FN_##name);                                \
                if (!real->name || renumber)                    \
                        return CKR_FUNCTION_NOT_SUPPORTED;      \
                if (FN_##name == FN_C_GenerateKeyPair) {        \
                        if (control_file) /* seen at once */    \
                                counts_write();                 \
                        sleep_ms(atomic_load(&keygen_delay_ms)); \
                }                                               \
                if (FN_##name == FN_C_DestroyObject)            \
                        hang_destroy_wait();                    \
                if ((FN_##name == FN_C_GenerateKeyPair || FN_##name == FN_C_CreateObject || \
                     FN_##name == FN_C_DestroyObject) && atomic_load(&cond_objects_rv)) \
                        return (CK_RV)atomic_load(&cond_objects_rv); \
                held = guard_enter();                           \
                rv = real->name args;                           \
                guard_leave(held);                              \
                return rv;                                      \
        }

/* HSMTLS_SLOWTOKEN_SIGN_LOG: one line per successful C_SignInit, in the
 * order they came, "C_SignInit label=LABEL tid=TID" (the key's CKA_LABEL,
 * the calling thread), appended with one write(2). Inside the guard. */
static void sign_log(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key)
{
        char label[128] = "", line[256];
        if (sign_log_fd < 0)
                return;
        CK_ATTRIBUTE a = { CKA_LABEL, label, sizeof(label) - 1 };
        if (real->C_GetAttributeValue(s, key, &a, 1) == CKR_OK && a.ulValueLen < sizeof(label))
                label[a.ulValueLen] = 0;
        else
                strcpy(label, "?");
        int n = snprintf(line, sizeof(line), "C_SignInit label=%s tid=%ld\n", label, (long)syscall(SYS_gettid));
        if (n > 0 && write(sign_log_fd, line, (size_t)n) < 0)
                fprintf(stderr, ST_PREFIX "cannot write the sign log: %s\n", strerror(errno));
}

/* C_SignInit / C_DecryptInit: forwarded, except for a hidden mechanism;
 * the key handle translated (RENUMBER); every Nth (INIT_ACTIVE_EVERY) is
 * forwarded twice: the first starts the operation, the second meets it,
 * and the caller gets CKR_OPERATION_ACTIVE with the operation left active. */
#define FORWARD_INIT(name)                                                                    \
        static CK_RV st_##name(CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE key) \
        {                                                                                     \
                CK_RV rv;                                                                     \
                bool held;                                                                    \
                count_call(FN_##name);                                                        \
                GATE(FN_##name);                                                              \
                if (mech && is_hidden(mech->mechanism))                                       \
                        return CKR_MECHANISM_INVALID;                                         \
                if (!real->name)                                                              \
                        return CKR_FUNCTION_NOT_SUPPORTED;                                    \
                if (renumber && !renum_in(key, &key))                                         \
                        return CKR_KEY_HANDLE_INVALID;                                        \
                held = guard_enter();                                                         \
                rv = real->name(s, mech, key);                                                \
                if (rv == CKR_OK && init_active_every > 0 &&                                  \
                    (atomic_fetch_add(&init_seq, 1) + 1) % init_active_every == 0) {          \
                        (void)real->name(s, mech, key);                                       \
                        atomic_fetch_add(&injected_active, 1);                                \
                        rv = CKR_OPERATION_ACTIVE;                                            \
                }                                                                             \
                if (rv == CKR_OK && FN_##name == FN_C_SignInit)                               \
                        sign_log(s, key);                                                     \
                guard_leave(held);                                                            \
                return rv;                                                                    \
        }

FORWARD(C_GetInfo, (CK_INFO_PTR info), (info))
/* Slot functions: slot IDs moved by slot-shift=, a removed token hidden. */
static CK_RV st_C_GetSlotList(CK_BBOOL present, CK_SLOT_ID_PTR list, CK_ULONG_PTR count)
{
        CK_RV rv;
        bool held;

        count_call(FN_C_GetSlotList);
        GATE(FN_C_GetSlotList);
        if (present && atomic_load(&cond_removed)) {
                *count = 0;
                counts_write();
                return CKR_OK;
        }
        held = guard_enter();
        rv = real->C_GetSlotList(present, list, count);
        guard_leave(held);
        if (rv == CKR_OK && list)
                for (CK_ULONG i = 0; i < *count; i++)
                        list[i] = slot_out(list[i]);
        if (control_file)
                counts_write(); /* so that a test sees the probes of a caller as they come */
        return rv;
}

static CK_RV st_C_GetSlotInfo(CK_SLOT_ID slot, CK_SLOT_INFO_PTR info)
{
        CK_RV rv;
        bool held;

        count_call(FN_C_GetSlotInfo);
        GATE(FN_C_GetSlotInfo);
        SLOT_IN(slot);
        held = guard_enter();
        rv = real->C_GetSlotInfo(slot, info);
        guard_leave(held);
        if (rv == CKR_OK && atomic_load(&cond_removed))
                info->flags &= ~(CK_FLAGS)CKF_TOKEN_PRESENT;
        return rv;
}

static CK_RV st_C_GetTokenInfo(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info)
{
        CK_RV rv;
        bool held;

        count_call(FN_C_GetTokenInfo);
        GATE(FN_C_GetTokenInfo);
        SLOT_IN(slot);
        held = guard_enter();
        rv = real->C_GetTokenInfo(slot, info);
        guard_leave(held);
        if (rv == CKR_OK && control_file) {
                pthread_mutex_lock(&control_lock);
                if (cond_swapped)
                        memcpy(info->serialNumber, swapped_serial, sizeof(info->serialNumber));
                pthread_mutex_unlock(&control_lock);
        }
        return rv;
}
/* HSMTLS_SLOWTOKEN_HIDE_MECHS: mechanisms (numbers, e.g. 0xd for
 * CKM_RSA_PKCS_PSS, comma-separated) the token pretends not to have: left
 * out of C_GetMechanismList, CKR_MECHANISM_INVALID from C_GetMechanismInfo
 * and from C_SignInit/C_DecryptInit. Read at C_Initialize. */
#define MAX_LIST 16
static CK_MECHANISM_TYPE hidden[MAX_LIST];
static unsigned n_hidden;
static CK_ATTRIBUTE_TYPE unavailable[MAX_LIST]; /* HSMTLS_SLOWTOKEN_UNAVAILABLE_ATTRS */
static unsigned n_unavailable;

static bool is_hidden(CK_MECHANISM_TYPE m)
{
        for (unsigned i = 0; i < n_hidden; i++)
                if (hidden[i] == m)
                        return true;
        return false;
}

static bool is_unavailable(CK_ATTRIBUTE_TYPE a)
{
        for (unsigned i = 0; i < n_unavailable; i++)
                if (unavailable[i] == a)
                        return true;
        return false;
}

/* A comma-separated list of numbers (decimal, 0x hex) from the environment. */
static int parse_list(const char *name, unsigned long *list, unsigned *n)
{
        const char *s = getenv(name);
        *n = 0;
        while (s && *s) {
                char *end;
                errno = 0;
                unsigned long v = strtoul(s, &end, 0);
                if (errno || end == s || *n == MAX_LIST || (*end && *end != ',')) {
                        fprintf(stderr, ST_PREFIX "%s: expected numbers separated by commas\n", name);
                        return -1;
                }
                list[(*n)++] = v;
                s = *end ? end + 1 : end;
        }
        return 0;
}

static int parse_hidden(void)
{
        return parse_list("HSMTLS_SLOWTOKEN_HIDE_MECHS", hidden, &n_hidden) < 0 ||
                               parse_list("HSMTLS_SLOWTOKEN_UNAVAILABLE_ATTRS", unavailable, &n_unavailable) < 0
                       ? -1
                       : 0;
}

static CK_RV st_C_GetMechanismList(CK_SLOT_ID slot, CK_MECHANISM_TYPE_PTR list, CK_ULONG_PTR count)
{
        count_call(FN_C_GetMechanismList);
        GATE(FN_C_GetMechanismList);
        if (!real->C_GetMechanismList)
                return CKR_FUNCTION_NOT_SUPPORTED;
        SLOT_IN(slot);
        CK_ULONG n = 0;
        CK_RV rv = real->C_GetMechanismList(slot, NULL, &n);
        if (rv != CKR_OK)
                return rv;
        CK_MECHANISM_TYPE *all = calloc(n ? n : 1, sizeof(*all));
        if (!all)
                return CKR_HOST_MEMORY;
        rv = real->C_GetMechanismList(slot, all, &n);
        CK_ULONG kept = 0;
        for (CK_ULONG i = 0; rv == CKR_OK && i < n; i++)
                if (!is_hidden(all[i]))
                        all[kept++] = all[i];
        if (rv == CKR_OK) {
                if (list && *count < kept)
                        rv = CKR_BUFFER_TOO_SMALL;
                else if (list)
                        memcpy(list, all, kept * sizeof(*all));
                *count = kept;
        }
        free(all);
        return rv;
}

static CK_RV st_C_GetMechanismInfo(CK_SLOT_ID slot, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR info)
{
        count_call(FN_C_GetMechanismInfo);
        GATE(FN_C_GetMechanismInfo);
        if (is_hidden(type))
                return CKR_MECHANISM_INVALID;
        if (!real->C_GetMechanismInfo)
                return CKR_FUNCTION_NOT_SUPPORTED;
        SLOT_IN(slot);
        return real->C_GetMechanismInfo(slot, type, info);
}
static CK_RV st_C_InitToken(CK_SLOT_ID slot, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len, CK_UTF8CHAR_PTR label)
{
        CK_RV rv;
        bool held;

        count_call(FN_C_InitToken);
        GATE(FN_C_InitToken);
        SLOT_IN(slot);
        held = guard_enter();
        rv = real->C_InitToken(slot, pin, pin_len, label);
        guard_leave(held);
        return rv;
}
FORWARD(C_InitPIN, (CK_SESSION_HANDLE s, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len), (s, pin, pin_len))
FORWARD(C_SetPIN, (CK_SESSION_HANDLE s, CK_UTF8CHAR_PTR old_pin, CK_ULONG old_len,
                   CK_UTF8CHAR_PTR new_pin, CK_ULONG new_len),
        (s, old_pin, old_len, new_pin, new_len))
static CK_RV st_C_OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app, CK_NOTIFY notify,
                              CK_SESSION_HANDLE_PTR session)
{
        CK_RV rv;
        bool held;

        count_call(FN_C_OpenSession);
        GATE(FN_C_OpenSession);
        SLOT_IN(slot);
        held = guard_enter();
        rv = real->C_OpenSession(slot, flags, app, notify, session);
        guard_leave(held);
        return rv;
}
FORWARD(C_CloseSession, (CK_SESSION_HANDLE s), (s))
static CK_RV st_C_CloseAllSessions(CK_SLOT_ID slot)
{
        CK_RV rv;
        bool held;

        count_call(FN_C_CloseAllSessions);
        GATE(FN_C_CloseAllSessions);
        SLOT_IN(slot);
        held = guard_enter();
        rv = real->C_CloseAllSessions(slot);
        guard_leave(held);
        return rv;
}
static CK_RV st_C_GetSessionInfo(CK_SESSION_HANDLE s, CK_SESSION_INFO_PTR info)
{
        CK_RV rv;
        bool held;

        count_call(FN_C_GetSessionInfo);
        GATE(FN_C_GetSessionInfo);
        held = guard_enter();
        rv = real->C_GetSessionInfo(s, info);
        guard_leave(held);
        if (rv == CKR_OK)
                info->slotID = slot_out(info->slotID);
        return rv;
}
FORWARD(C_GetOperationState, (CK_SESSION_HANDLE s, CK_BYTE_PTR state, CK_ULONG_PTR state_len),
        (s, state, state_len))
FORWARD(C_SetOperationState, (CK_SESSION_HANDLE s, CK_BYTE_PTR state, CK_ULONG state_len,
                              CK_OBJECT_HANDLE enc_key, CK_OBJECT_HANDLE auth_key),
        (s, state, state_len, enc_key, auth_key))
/* C_Login: a context-specific login answers CONTEXT_LOGIN_RV when set; a
 * user or SO login restarts the numbering (RENUMBER). */
static CK_RV st_C_Login(CK_SESSION_HANDLE s, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len)
{
        CK_RV rv;
        bool held;

        count_call(FN_C_Login);
        GATE(FN_C_Login);
        if (!real->C_Login)
                return CKR_FUNCTION_NOT_SUPPORTED;
        if (user != CKU_CONTEXT_SPECIFIC && atomic_load(&cond_login_rv) != CKR_OK) {
                atomic_fetch_add(&injected_login, 1);
                counts_write();
                return atomic_load(&cond_login_rv);
        }
        if (user == CKU_CONTEXT_SPECIFIC && context_login_rv != CKR_OK) {
                atomic_fetch_add(&injected_context_login, 1);
                return context_login_rv;
        }
        if (user != CKU_CONTEXT_SPECIFIC)
                atomic_fetch_add(&user_logins, 1);
        held = guard_enter();
        rv = real->C_Login(s, user, pin, pin_len);
        guard_leave(held);
        if (rv == CKR_OK && renumber && user != CKU_CONTEXT_SPECIFIC)
                renum_reset();
        counts_write();
        return rv;
}
FORWARD(C_Logout, (CK_SESSION_HANDLE s), (s))
FORWARD_OBJ(C_CreateObject, (CK_SESSION_HANDLE s, CK_ATTRIBUTE_PTR tmpl, CK_ULONG n, CK_OBJECT_HANDLE_PTR obj),
        (s, tmpl, n, obj))
FORWARD_OBJ(C_CopyObject, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_PTR tmpl, CK_ULONG n,
                       CK_OBJECT_HANDLE_PTR new_obj),
        (s, obj, tmpl, n, new_obj))
FORWARD_OBJ(C_DestroyObject, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE obj), (s, obj))
FORWARD_OBJ(C_GetObjectSize, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE obj, CK_ULONG_PTR size), (s, obj, size))
/* C_GetAttributeValue: the object handle translated (RENUMBER); the
 * attributes named in UNAVAILABLE_ATTRS are not forwarded and get the
 * length CK_UNAVAILABLE_INFORMATION, the others are forwarded, and the
 * answer is the real module's (CKR_OK when only such attributes were asked). */
static CK_RV st_C_GetAttributeValue(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_PTR tmpl, CK_ULONG n)
{
        CK_ATTRIBUTE stackbuf[16], *fwd = stackbuf;
        CK_ULONG n_fwd = 0;
        CK_RV rv = CKR_OK;
        bool held;

        count_call(FN_C_GetAttributeValue);
        GATE(FN_C_GetAttributeValue);
        if (!real->C_GetAttributeValue)
                return CKR_FUNCTION_NOT_SUPPORTED;
        if (renumber && !renum_in(obj, &obj))
                return CKR_OBJECT_HANDLE_INVALID;
        if (control_file && tmpl) {
                CK_RV prv = CKR_OK;
                pthread_mutex_lock(&control_lock);
                for (CK_ULONG i = 0; point_rv && i < n; i++)
                        if (tmpl[i].type == CKA_EC_POINT) {
                                prv = point_rv;
                                point_rv = 0;
                        }
                pthread_mutex_unlock(&control_lock);
                if (prv != CKR_OK) {
                        atomic_fetch_add(&injected_point, 1);
                        counts_write();
                        return prv;
                }
        }
        if (n_unavailable == 0 || !tmpl) {
                held = guard_enter();
                rv = real->C_GetAttributeValue(s, obj, tmpl, n);
                guard_leave(held);
                return rv;
        }
        if (n > sizeof(stackbuf) / sizeof(stackbuf[0]) && !(fwd = calloc(n, sizeof(*fwd))))
                return CKR_HOST_MEMORY;
        for (CK_ULONG i = 0; i < n; i++)
                if (!is_unavailable(tmpl[i].type))
                        fwd[n_fwd++] = tmpl[i];
        if (n_fwd > 0) {
                held = guard_enter();
                rv = real->C_GetAttributeValue(s, obj, fwd, n_fwd);
                guard_leave(held);
        }
        for (CK_ULONG i = 0, j = 0; i < n; i++)
                if (is_unavailable(tmpl[i].type)) {
                        tmpl[i].ulValueLen = CK_UNAVAILABLE_INFORMATION;
                        atomic_fetch_add(&injected_unavailable, 1);
                } else
                        tmpl[i].ulValueLen = fwd[j++].ulValueLen;
        if (fwd != stackbuf)
                free(fwd);
        return rv;
}
FORWARD_OBJ(C_SetAttributeValue, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_PTR tmpl, CK_ULONG n),
        (s, obj, tmpl, n))
FORWARD(C_FindObjectsInit, (CK_SESSION_HANDLE s, CK_ATTRIBUTE_PTR tmpl, CK_ULONG n), (s, tmpl, n))
/* C_FindObjects: the handles found are translated (RENUMBER). */
static CK_RV st_C_FindObjects(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE_PTR obj, CK_ULONG max, CK_ULONG_PTR n)
{
        CK_RV rv;
        bool held;

        count_call(FN_C_FindObjects);
        GATE(FN_C_FindObjects);
        if (!real->C_FindObjects)
                return CKR_FUNCTION_NOT_SUPPORTED;
        held = guard_enter();
        rv = real->C_FindObjects(s, obj, max, n);
        guard_leave(held);
        if (rv == CKR_OK && renumber && obj && n)
                for (CK_ULONG i = 0; i < *n; i++)
                        if (!(obj[i] = renum_out(obj[i])))
                                return CKR_HOST_MEMORY;
        return rv;
}
FORWARD(C_FindObjectsFinal, (CK_SESSION_HANDLE s), (s))
FORWARD_OBJ(C_EncryptInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE key), (s, mech, key))
FORWARD(C_Encrypt, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out, CK_ULONG_PTR out_len),
        (s, in, in_len, out, out_len))
FORWARD(C_EncryptUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,
                          CK_ULONG_PTR out_len),
        (s, in, in_len, out, out_len))
FORWARD(C_EncryptFinal, (CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG_PTR out_len), (s, out, out_len))
FORWARD_INIT(C_DecryptInit)
FORWARD(C_DecryptUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,
                          CK_ULONG_PTR out_len),
        (s, in, in_len, out, out_len))
FORWARD(C_DigestInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech), (s, mech))
FORWARD(C_Digest, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out, CK_ULONG_PTR out_len),
        (s, in, in_len, out, out_len))
FORWARD(C_DigestUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len), (s, in, in_len))
FORWARD_OBJ(C_DigestKey, (CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key), (s, key))
FORWARD(C_DigestFinal, (CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG_PTR out_len), (s, out, out_len))
FORWARD_INIT(C_SignInit)
FORWARD(C_SignUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len), (s, in, in_len))
FORWARD_OBJ(C_SignRecoverInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE key), (s, mech, key))
FORWARD(C_SignRecover, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,
                        CK_ULONG_PTR out_len),
        (s, in, in_len, out, out_len))
FORWARD_OBJ(C_VerifyInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE key), (s, mech, key))
FORWARD(C_Verify, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR sig, CK_ULONG sig_len),
        (s, in, in_len, sig, sig_len))
FORWARD(C_VerifyUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len), (s, in, in_len))
FORWARD(C_VerifyFinal, (CK_SESSION_HANDLE s, CK_BYTE_PTR sig, CK_ULONG sig_len), (s, sig, sig_len))
FORWARD_OBJ(C_VerifyRecoverInit, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE key), (s, mech, key))
FORWARD(C_VerifyRecover, (CK_SESSION_HANDLE s, CK_BYTE_PTR sig, CK_ULONG sig_len, CK_BYTE_PTR out,
                          CK_ULONG_PTR out_len),
        (s, sig, sig_len, out, out_len))
FORWARD(C_DigestEncryptUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,
                                CK_ULONG_PTR out_len),
        (s, in, in_len, out, out_len))
FORWARD(C_DecryptDigestUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,
                                CK_ULONG_PTR out_len),
        (s, in, in_len, out, out_len))
FORWARD(C_SignEncryptUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,
                              CK_ULONG_PTR out_len),
        (s, in, in_len, out, out_len))
FORWARD(C_DecryptVerifyUpdate, (CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out,
                                CK_ULONG_PTR out_len),
        (s, in, in_len, out, out_len))
FORWARD_OBJ(C_GenerateKey, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_ATTRIBUTE_PTR tmpl, CK_ULONG n,
                        CK_OBJECT_HANDLE_PTR key),
        (s, mech, tmpl, n, key))
FORWARD_OBJ(C_GenerateKeyPair, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_ATTRIBUTE_PTR pub_tmpl,
                            CK_ULONG pub_n, CK_ATTRIBUTE_PTR priv_tmpl, CK_ULONG priv_n,
                            CK_OBJECT_HANDLE_PTR pub, CK_OBJECT_HANDLE_PTR priv),
        (s, mech, pub_tmpl, pub_n, priv_tmpl, priv_n, pub, priv))
FORWARD_OBJ(C_WrapKey, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE wrapping,
                    CK_OBJECT_HANDLE key, CK_BYTE_PTR out, CK_ULONG_PTR out_len),
        (s, mech, wrapping, key, out, out_len))
FORWARD_OBJ(C_UnwrapKey, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE unwrapping,
                      CK_BYTE_PTR in, CK_ULONG in_len, CK_ATTRIBUTE_PTR tmpl, CK_ULONG n,
                      CK_OBJECT_HANDLE_PTR key),
        (s, mech, unwrapping, in, in_len, tmpl, n, key))
FORWARD_OBJ(C_DeriveKey, (CK_SESSION_HANDLE s, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE base,
                      CK_ATTRIBUTE_PTR tmpl, CK_ULONG n, CK_OBJECT_HANDLE_PTR key),
        (s, mech, base, tmpl, n, key))
FORWARD(C_SeedRandom, (CK_SESSION_HANDLE s, CK_BYTE_PTR seed, CK_ULONG seed_len), (s, seed, seed_len))
FORWARD(C_GenerateRandom, (CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG out_len), (s, out, out_len))
FORWARD(C_GetFunctionStatus, (CK_SESSION_HANDLE s), (s))
FORWARD(C_CancelFunction, (CK_SESSION_HANDLE s), (s))

/* ----------------------------------------------------- special functions */

static CK_RV st_C_Initialize(CK_VOID_PTR init_args)
{
        unsigned long d, m, f, c, ia, rn, crv, dr, bu, ce, sla;
        char *file = NULL;
        const char *s;
        CK_RV rv;

        count_call(FN_C_Initialize);
        if (env_ulong("HSMTLS_SLOWTOKEN_DELAY_MS", &d) < 0 ||
            env_ulong("HSMTLS_SLOWTOKEN_MAX_CONCURRENT", &m) < 0 || env_ulong("HSMTLS_SLOWTOKEN_BURN_US", &bu) < 0 ||
            env_ulong("HSMTLS_SLOWTOKEN_FAIL_EVERY", &f) < 0 ||
            env_ulong("HSMTLS_SLOWTOKEN_CLOSE_SESSIONS_EVERY", &c) < 0 ||
            env_ulong("HSMTLS_SLOWTOKEN_INIT_ACTIVE_EVERY", &ia) < 0 || env_ulong("HSMTLS_SLOWTOKEN_RENUMBER", &rn) < 0 ||
            env_ulong("HSMTLS_SLOWTOKEN_COUNT_EVERY", &ce) < 0 || env_ulong("HSMTLS_SLOWTOKEN_SIGN_LEN_ADD", &sla) < 0 ||
            env_rv("HSMTLS_SLOWTOKEN_CONTEXT_LOGIN_RV", &crv) < 0 || env_rv("HSMTLS_SLOWTOKEN_DECRYPT_FAIL_RV", &dr) < 0 ||
            parse_hidden() < 0)
                return CKR_GENERAL_ERROR;
        s = getenv("HSMTLS_SLOWTOKEN_COUNT_FILE");
        if (s && *s && !(file = strdup(s)))
                return CKR_HOST_MEMORY;
        s = getenv("HSMTLS_SLOWTOKEN_SIGN_LOG");
        if (s && *s && sign_log_fd < 0)
                sign_log_fd = open(s, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        s = getenv("HSMTLS_SLOWTOKEN_CONTROL_FILE");
        if (s && *s) {
                pthread_mutex_lock(&control_lock);
                if (!control_file)
                        control_file = strdup(s);
                pthread_mutex_unlock(&control_lock);
        }
        pthread_once(&guard_once, guard_setup);
        if (control_file)
                atomic_store_explicit(&guard_on, true, memory_order_release);
        /* A module failure lasts until C_Finalize; a removed token stays
         * removed across C_Initialize. */
        if (control_file) {
                control_refresh();
                if (atomic_load(&module_failed))
                        return atomic_load(&module_fail_rv);
        }

        rv = real->C_Initialize(init_args);
        if (rv != CKR_OK) {
                free(file);
                return rv;
        }

        /* No session exists yet, so no operation can see these change. */
        delay_ms = d;
        delay_ms_env = d;
        max_concurrent = m;
        burn_us = bu > 1000000 ? 1000000 : bu;
        count_every = ce ? ce : 100;
        fail_every = f;
        close_every = c;
        init_active_every = ia;
        renumber = rn != 0;
        context_login_rv = crv;
        pthread_mutex_lock(&renum_lock);
        renum_n = 0;
        pthread_mutex_unlock(&renum_lock);
        decrypt_fail_rv = dr;
        sign_len_add = sla;
        pthread_once(&guard_once, guard_setup);
        atomic_store_explicit(&guard_on, c > 0 || control_file, memory_order_release);

        for (int i = 0; i < FN_COUNT; i++)
                atomic_store(&calls[i], 0);
        count_call(FN_C_Initialize);
        atomic_store(&ops, 0);
        atomic_store(&sign_seq, 0);
        atomic_store(&injected_fail, 0);
        atomic_store(&injected_close, 0);
        atomic_store(&init_seq, 0);
        atomic_store(&injected_active, 0);
        atomic_store(&injected_unavailable, 0);
        atomic_store(&injected_context_login, 0);
        atomic_store(&renumbered, 0);
        pthread_mutex_lock(&cap_lock);
        peak_in_flight = in_flight;
        pthread_mutex_unlock(&cap_lock);

        pthread_mutex_lock(&file_lock);
        free(count_file);
        count_file = file;
        count_file_warned = false;
        pthread_mutex_unlock(&file_lock);

        atomic_fetch_add(&inits_total, 1);
        atomic_store(&initialized, true);
        counts_write();
        return CKR_OK;
}

static CK_RV st_C_Finalize(CK_VOID_PTR reserved)
{
        CK_RV rv;

        count_call(FN_C_Finalize);
        if (atomic_load(&inside) > 0)
                atomic_fetch_add(&finalize_busy, 1);
        rv = real->C_Finalize(reserved);
        if (rv == CKR_OK || atomic_load(&module_failed))
                atomic_store(&module_failed, false);
        if (rv == CKR_OK && atomic_exchange(&initialized, false))
                counts_write();
        return rv;
}

static CK_RV st_C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ret)
{
        pthread_once(&load_once, load_real);
        if (load_rv != CKR_OK)
                return load_rv;
        if (!ret)
                return CKR_ARGUMENTS_BAD;
        count_call(FN_C_GetFunctionList);
        *ret = &st_list;
        return CKR_OK;
}

/* Waits for a token event: may block for ever, so it never holds the guard. */
static CK_RV st_C_WaitForSlotEvent(CK_FLAGS flags, CK_SLOT_ID_PTR slot, CK_VOID_PTR reserved)
{
        count_call(FN_C_WaitForSlotEvent);
        if (!real->C_WaitForSlotEvent)
                return CKR_FUNCTION_NOT_SUPPORTED;
        CK_RV rv = real->C_WaitForSlotEvent(flags, slot, reserved);
        if (rv == CKR_OK && slot)
                *slot = slot_out(*slot);
        return rv;
}

/* Ends the signing operation of the session in the real module, as a
 * failing C_Sign must (PKCS#11 2.40, 5.12), without touching the caller's
 * buffers. */
static void sign_discard(CK_SESSION_HANDLE s, CK_BYTE_PTR data, CK_ULONG data_len)
{
        CK_BYTE stackbuf[2048], *buf = stackbuf;
        CK_ULONG len = 0;

        if (real->C_Sign(s, data, data_len, NULL, &len) != CKR_OK)
                return;
        if (len > sizeof(stackbuf) && !(buf = malloc(len)))
                return;
        real->C_Sign(s, data, data_len, buf, &len);
        if (buf != stackbuf)
                free(buf);
}

/* The injected session loss: every session of the slot is closed in the real
 * module (which also ends the login) while no other call is inside it. */
static void close_slot_sessions(CK_SESSION_HANDLE s)
{
        CK_SESSION_INFO info;

        pthread_rwlock_wrlock(&guard);
        if (real->C_GetSessionInfo(s, &info) == CKR_OK)
                real->C_CloseAllSessions(info.slotID);
        pthread_rwlock_unlock(&guard);
}

static CK_RV st_C_Sign(CK_SESSION_HANDLE s, CK_BYTE_PTR data, CK_ULONG data_len,
                       CK_BYTE_PTR sig, CK_ULONG_PTR sig_len)
{
        unsigned long seq;
        CK_RV rv;
        bool held;

        count_call(FN_C_Sign);
        GATE(FN_C_Sign);
        if (!sig) {   /* length query */
                held = guard_enter();
                rv = real->C_Sign(s, data, data_len, sig, sig_len);
                guard_leave(held);
                return rv;
        }

        op_begin();
        seq = atomic_fetch_add(&sign_seq, 1) + 1;
        if (close_every > 0 && seq % close_every == 0) {
                close_slot_sessions(s);
                atomic_fetch_add(&injected_close, 1);
                rv = CKR_SESSION_HANDLE_INVALID;
        } else if ((fail_every > 0 && seq % fail_every == 0) || atomic_load(&cond_device_error)) {
                held = guard_enter();
                sign_discard(s, data, data_len);
                guard_leave(held);
                atomic_fetch_add(&injected_fail, 1);
                rv = CKR_DEVICE_ERROR;
        } else if (atomic_load(&cond_sign_rv)) {
                /* the answer the test asked for; the real operation is
                 * ended, as for a failed C_Sign */
                held = guard_enter();
                sign_discard(s, data, data_len);
                guard_leave(held);
                atomic_fetch_add(&injected_sign_rv, 1);
                rv = (CK_RV)atomic_load(&cond_sign_rv);
        } else {
                held = guard_enter();
                rv = real->C_Sign(s, data, data_len, sig, sig_len);
                guard_leave(held);
                if (rv == CKR_OK)
                        *sig_len += sign_len_add;
        }
        op_end();
        return rv;
}

/* C_SignFinal, C_Decrypt and C_DecryptFinal: delayed and limited like
 * C_Sign, without fault injection. */
#define SLOW(name, params, args, out)                           \
        static CK_RV st_##name params                           \
        {                                                       \
                CK_RV rv;                                       \
                bool held;                                      \
                count_call(FN_##name);                               \
                GATE(FN_##name);                                \
                if (!real->name)                                \
                        return CKR_FUNCTION_NOT_SUPPORTED;      \
                if (out)                                        \
                        op_begin();                             \
                held = guard_enter();                           \
                rv = real->name args;                           \
                guard_leave(held);                              \
                if (out)                                        \
                        op_end();                               \
                return rv;                                      \
        }

SLOW(C_SignFinal, (CK_SESSION_HANDLE s, CK_BYTE_PTR sig, CK_ULONG_PTR sig_len), (s, sig, sig_len), sig)
/* C_Decrypt: as above; with DECRYPT_FAIL_RV a failure of the real module
 * (a bad padding, say) is reported with that CK_RV instead. */
static CK_RV st_C_Decrypt(CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len, CK_BYTE_PTR out, CK_ULONG_PTR out_len)
{
        CK_RV rv;
        bool held;
        count_call(FN_C_Decrypt);
        GATE(FN_C_Decrypt);
        if (out)
                op_begin();
        held = guard_enter();
        rv = real->C_Decrypt(s, in, in_len, out, out_len);
        guard_leave(held);
        if (out)
                op_end();
        if (rv != CKR_OK && rv != CKR_BUFFER_TOO_SMALL && out && decrypt_fail_rv)
                rv = decrypt_fail_rv;
        return rv;
}
SLOW(C_DecryptFinal, (CK_SESSION_HANDLE s, CK_BYTE_PTR out, CK_ULONG_PTR out_len), (s, out, out_len), out)

/* --------------------------------------------------------- the exported list */

static CK_FUNCTION_LIST st_list = {
        .version = { 2, 40 },
#define ST_ENTRY(name) .name = st_##name,
        ST_FUNCTIONS(ST_ENTRY)
#undef ST_ENTRY
};

ST_EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ret)
{
        return st_C_GetFunctionList(ret);
}

/* A process that exits without C_Finalize still leaves its counts. */
__attribute__((destructor)) static void st_at_exit(void)
{
        if (atomic_load(&initialized))
                counts_write();
}
