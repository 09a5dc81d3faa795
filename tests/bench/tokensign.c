/* tokensign: the token's own cost of one signature, measured in-process.
 *
 * Loads a PKCS#11 module with p11-kit, logs in to the token whose label is
 * --token with the PIN from --pin-file, finds the private key labelled --key
 * and makes --count signatures on each of --threads threads (one session
 * per thread, C_SignInit + C_Sign per signature, a 32-byte input as a TLS
 * 1.3 CertificateVerify has):
 *   --mech rsa-pss  CKM_RSA_PKCS_PSS, SHA-256, MGF1-SHA-256, salt 32
 *   --mech ecdsa    CKM_ECDSA on a SHA-256-sized digest
 * and prints one line:
 *   tokensign: mech=rsa-pss threads=1 ops=2000 wall_s=0.95 ops_per_s=2105.3 cpu_us_per_op=474.1
 * cpu_us_per_op is the process's user+system CPU (getrusage) over the timed
 * loop divided by the signatures made: what the token burns per signature,
 * with no TLS around it.  The PIN never appears on the command line.
 *
 * Build: cc -O2 -pthread -o tokensign tokensign.c $(pkg-config --cflags --libs p11-kit-1)
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include <p11-kit/p11-kit.h>
#include <p11-kit/pkcs11.h>

static CK_FUNCTION_LIST *f;
static CK_SLOT_ID slot;
static const char *key_label;
static CK_MECHANISM mech;
static CK_RSA_PKCS_PSS_PARAMS pss = { CKM_SHA256, CKG_MGF1_SHA256, 32 };
static unsigned long count = 1000;
static pthread_barrier_t barrier;

struct worker {
        pthread_t t;
        CK_SESSION_HANDLE s;
        CK_OBJECT_HANDLE key;
        unsigned long done;
        CK_RV rv;
        const char *what;
};

static double now_s(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_s(void)
{
        struct rusage ru;

        getrusage(RUSAGE_SELF, &ru);
        return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
               (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static int die(const char *what, CK_RV rv)
{
        fprintf(stderr, "tokensign: %s failed: %s (0x%lx)\n", what,
                p11_kit_strerror(rv), (unsigned long)rv);
        return 1;
}

static CK_RV find_key(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE *key)
{
        CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
        CK_ATTRIBUTE tmpl[] = {
                { CKA_CLASS, &cls, sizeof(cls) },
                { CKA_LABEL, (void *)key_label, strlen(key_label) },
        };
        CK_ULONG n = 0;
        CK_RV rv;

        rv = f->C_FindObjectsInit(s, tmpl, 2);
        if (rv != CKR_OK)
                return rv;
        rv = f->C_FindObjects(s, key, 1, &n);
        f->C_FindObjectsFinal(s);
        if (rv == CKR_OK && n != 1)
                rv = CKR_KEY_HANDLE_INVALID;
        return rv;
}

static void *work(void *arg)
{
        struct worker *w = arg;
        unsigned char in[32], sig[1024];

        memset(in, 0x5a, sizeof(in));
        pthread_barrier_wait(&barrier);    /* all sessions are open */
        pthread_barrier_wait(&barrier);    /* the clock runs */
        for (unsigned long i = 0; i < count; i++) {
                CK_ULONG len = sizeof(sig);
                in[0] = (unsigned char)i;
                w->rv = f->C_SignInit(w->s, &mech, w->key);
                if (w->rv != CKR_OK) {
                        w->what = "C_SignInit";
                        break;
                }
                w->rv = f->C_Sign(w->s, in, sizeof(in), sig, &len);
                if (w->rv != CKR_OK) {
                        w->what = "C_Sign";
                        break;
                }
                w->done++;
        }
        return NULL;
}

int main(int argc, char **argv)
{
        const char *module = NULL, *token = NULL, *pin_file = NULL, *mech_name = "rsa-pss";
        unsigned threads = 1;
        char pin[256];
        CK_SLOT_ID slots[64];
        CK_ULONG nslots = 64;
        CK_SESSION_HANDLE login_s;
        CK_RV rv;

        for (int i = 1; i < argc; i++) {
                const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
                if (!v)
                        goto usage;
                if (!strcmp(a, "--module"))
                        module = v;
                else if (!strcmp(a, "--token"))
                        token = v;
                else if (!strcmp(a, "--key"))
                        key_label = v;
                else if (!strcmp(a, "--pin-file"))
                        pin_file = v;
                else if (!strcmp(a, "--mech"))
                        mech_name = v;
                else if (!strcmp(a, "--count"))
                        count = strtoul(v, NULL, 10);
                else if (!strcmp(a, "--threads"))
                        threads = (unsigned)strtoul(v, NULL, 10);
                else
                        goto usage;
                i++;
        }
        if (!module || !token || !key_label || !pin_file || !count || !threads || threads > 256)
                goto usage;
        if (!strcmp(mech_name, "rsa-pss")) {
                mech.mechanism = CKM_RSA_PKCS_PSS;
                mech.pParameter = &pss;
                mech.ulParameterLen = sizeof(pss);
        } else if (!strcmp(mech_name, "ecdsa")) {
                mech.mechanism = CKM_ECDSA;
        } else {
                goto usage;
        }

        FILE *pf = fopen(pin_file, "r");
        if (!pf || !fgets(pin, sizeof(pin), pf)) {
                fprintf(stderr, "tokensign: cannot read the PIN from %s: %s\n", pin_file, strerror(errno));
                return 1;
        }
        fclose(pf);
        pin[strcspn(pin, "\r\n")] = '\0';

        f = p11_kit_module_load(module, 0);
        if (!f) {
                fprintf(stderr, "tokensign: cannot load %s: %s\n", module, p11_kit_message());
                return 1;
        }
        if ((rv = p11_kit_module_initialize(f)) != CKR_OK)
                return die("C_Initialize", rv);
        if ((rv = f->C_GetSlotList(CK_TRUE, slots, &nslots)) != CKR_OK)
                return die("C_GetSlotList", rv);
        CK_ULONG k;
        for (k = 0; k < nslots; k++) {
                CK_TOKEN_INFO ti;
                char label[33];
                if (f->C_GetTokenInfo(slots[k], &ti) != CKR_OK)
                        continue;
                memcpy(label, ti.label, 32);
                label[32] = '\0';
                for (int j = 31; j >= 0 && label[j] == ' '; j--)
                        label[j] = '\0';
                if (!strcmp(label, token))
                        break;
        }
        if (k == nslots) {
                fprintf(stderr, "tokensign: no token labelled '%s' in %s\n", token, module);
                return 1;
        }
        slot = slots[k];
        if ((rv = f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &login_s)) != CKR_OK)
                return die("C_OpenSession", rv);
        rv = f->C_Login(login_s, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin));
        memset(pin, 0, sizeof(pin));
        if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN)
                return die("C_Login", rv);

        struct worker *w = calloc(threads, sizeof(*w));
        if (!w)
                return 1;
        pthread_barrier_init(&barrier, NULL, threads + 1);
        for (unsigned i = 0; i < threads; i++) {
                if ((rv = f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &w[i].s)) != CKR_OK)
                        return die("C_OpenSession", rv);
                if ((rv = find_key(w[i].s, &w[i].key)) != CKR_OK) {
                        fprintf(stderr, "tokensign: private key '%s' not found\n", key_label);
                        return die("C_FindObjects", rv);
                }
                /* one untimed signature: warm caches and lazily built state */
                unsigned char in[32] = { 0 }, sig[1024];
                CK_ULONG len = sizeof(sig);
                if ((rv = f->C_SignInit(w[i].s, &mech, w[i].key)) != CKR_OK)
                        return die("C_SignInit", rv);
                if ((rv = f->C_Sign(w[i].s, in, sizeof(in), sig, &len)) != CKR_OK)
                        return die("C_Sign", rv);
                if (pthread_create(&w[i].t, NULL, work, &w[i]) != 0)
                        return 1;
        }
        pthread_barrier_wait(&barrier);
        double t0 = now_s(), c0 = cpu_s();
        pthread_barrier_wait(&barrier);
        unsigned long done = 0;
        int bad = 0;
        for (unsigned i = 0; i < threads; i++) {
                pthread_join(w[i].t, NULL);
                done += w[i].done;
                if (w[i].rv != CKR_OK)
                        bad = die(w[i].what, w[i].rv);
        }
        double wall = now_s() - t0, cpu = cpu_s() - c0;
        for (unsigned i = 0; i < threads; i++)
                f->C_CloseSession(w[i].s);
        f->C_Logout(login_s);
        f->C_CloseSession(login_s);
        p11_kit_module_finalize(f);
        p11_kit_module_release(f);
        if (bad || !done)
                return 1;
        printf("tokensign: mech=%s threads=%u ops=%lu wall_s=%.3f ops_per_s=%.1f cpu_us_per_op=%.1f\n",
               mech_name, threads, done, wall, (double)done / wall, cpu * 1e6 / (double)done);
        free(w);
        return 0;

usage:
        fprintf(stderr, "usage: tokensign --module SO --token LABEL --key LABEL --pin-file FILE "
                        "[--mech rsa-pss|ecdsa] [--count N] [--threads T]\n");
        return 2;
}
