#include "creds.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <gnutls/abstract.h>
#include <gnutls/x509.h>

#include "log.h"
#include "ocsp.h"
#include "keyadmin.h"
#include "privkey.h"

/* Leaves errno set on failure. */
static int read_file(const char *path, gnutls_datum_t *d)
{
        FILE *f = fopen(path, "re");
        if (!f)
                return -errno;
        fclose(f);
        int r = gnutls_load_file(path, d);
        if (r < 0)
                errno = EIO;
        return r < 0 ? -EIO : 0;
}

static const char *key_type_name(hsm_key *k)
{
        switch (hsm_key_type(k)) {
        case HSM_KEY_RSA: return "RSA";
        case HSM_KEY_ECDSA: return hsm_key_curve(k) == HSM_CURVE_P256 ? "ECDSA P-256" : hsm_key_curve(k) == HSM_CURVE_P384 ? "ECDSA P-384" : "ECDSA P-521";
        case HSM_KEY_ED25519: return "Ed25519";
        }
        return "?";
}

static char *dupn(const char *s) { return s ? strdup(s) : NULL; }

static void spec_done(hsm_chain_spec *s)
{
        free((char *)s->source);
        free((char *)s->cert_file);
        free((char *)s->cert_pem);
        free((char *)s->key);
        free((char *)s->ocsp);
        for (unsigned i = 0; i < s->n_names; i++)
                free((char *)s->names[i]);
        free((void *)s->names);
        free((char *)s->cert_where);
        free((char *)s->key_where);
        free((char *)s->ocsp_where);
        memset(s, 0, sizeof(*s));
}

static int spec_copy(const hsm_chain_spec *in, hsm_chain_spec *out)
{
        *out = (hsm_chain_spec){
                .source = dupn(in->source ? in->source : "config"), .cert_file = dupn(in->cert_file),
                .cert_pem = dupn(in->cert_pem), .key = dupn(in->key), .ocsp = dupn(in->ocsp),
                .cert_where = dupn(in->cert_where), .key_where = dupn(in->key_where), .ocsp_where = dupn(in->ocsp_where),
        };
        if (in->n_names) {
                const char **n = calloc(in->n_names, sizeof(*n));
                if (!n)
                        return -ENOMEM;
                out->names = n;
                for (unsigned i = 0; i < in->n_names; i++)
                        if ((n[i] = strdup(in->names[i])))
                                out->n_names++;
        }
        return out->source && out->n_names == in->n_names ? 0 : -ENOMEM;
}

static const char *where_of(const char *w) { return w ? w : "chain"; }

/* The names a leaf serves without names given: its DNS SANs, else its CN. */
static int leaf_names(gnutls_x509_crt_t crt, char ***ret, unsigned *ret_n)
{
        char **v = NULL;
        unsigned n = 0;
        for (unsigned i = 0;; i++) {
                char buf[256];
                size_t size = sizeof(buf) - 1;
                int type = gnutls_x509_crt_get_subject_alt_name(crt, i, buf, &size, NULL);
                if (type == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE)
                        break;
                if (type != GNUTLS_SAN_DNSNAME)
                        continue;
                buf[size] = 0;
                char **nv = realloc(v, (n + 1) * sizeof(*v));
                if (!nv)
                        break;
                v = nv;
                if ((v[n] = strdup(buf)))
                        n++;
        }
        if (n == 0) {
                char cn[256];
                size_t size = sizeof(cn);
                if (gnutls_x509_crt_get_dn_by_oid(crt, GNUTLS_OID_X520_COMMON_NAME, 0, 0, cn, &size) >= 0 &&
                    (v = malloc(sizeof(*v))) && (v[0] = strdup(cn)))
                        n = 1;
        }
        *ret = v;
        *ret_n = n;
        return 0;
}

/* One signature with the key over fixed data, verified with the public
 * key pub (the leaf's): the key is usable, and is the leaf's. */
static int test_signature(gnutls_privkey_t pkey, gnutls_pubkey_t pub)
{
        static const char msg[] = "hsmtls credential check";
        gnutls_datum_t data = { (unsigned char *)msg, sizeof(msg) - 1 }, sig = { NULL, 0 };
        gnutls_sign_algorithm_t algos[2] = { GNUTLS_SIGN_UNKNOWN, GNUTLS_SIGN_UNKNOWN };
        switch (gnutls_privkey_get_pk_algorithm(pkey, NULL)) {
        case GNUTLS_PK_RSA: algos[0] = GNUTLS_SIGN_RSA_SHA256; algos[1] = GNUTLS_SIGN_RSA_PSS_RSAE_SHA256; break;
        case GNUTLS_PK_RSA_PSS: algos[0] = GNUTLS_SIGN_RSA_PSS_SHA256; break;
        case GNUTLS_PK_ECDSA: algos[0] = GNUTLS_SIGN_ECDSA_SHA256; break;
        case GNUTLS_PK_EDDSA_ED25519: algos[0] = GNUTLS_SIGN_EDDSA_ED25519; break;
        default: return -EIO;
        }
        int r = -EIO;
        for (int i = 0; i < 2 && algos[i] != GNUTLS_SIGN_UNKNOWN; i++) {
                if (gnutls_privkey_sign_data2(pkey, algos[i], 0, &data, &sig) >= 0 &&
                    gnutls_pubkey_verify_data2(pub, algos[i], 0, &data, &sig) >= 0) {
                        r = 0;
                        break;
                }
                gnutls_free(sig.data);
                sig.data = NULL;
        }
        gnutls_free(sig.data);
        return r;
}

/* A test signature while serving (HSM_CREDS_LIVE: a reload, an admin API
 * change) runs on a thread of its own, and its caller (the main loop, or
 * an admin thread holding the change lock) waits for it until a deadline,
 * the listener's handshake_timeout: a PKCS#11 call cannot be interrupted,
 * so a token that hangs keeps only that thread. The thread has its own
 * privkey and public key (the caller may be gone when the call returns)
 * and a token watch with the deadline, so that its wait for a session or
 * for its turn at the token ends there too, as a handshake's does. One
 * such thread per key at most: while a key's test signature has not
 * returned, a new one with that key is refused at once. "That key" is its
 * token's name and its URI, not the hsm_key object: a reload that opens
 * the token again looks the key up again (a new object), and the bound
 * must hold across such reloads too. */
struct sign_test {
        pthread_mutex_t lock;
        pthread_cond_t cond; /* CLOCK_MONOTONIC */
        unsigned refs;       /* under lock: the caller's and the thread's */
        int done, r;
        gnutls_privkey_t pkey;
        gnutls_pubkey_t pub;
        char *ident; /* the key's token name and URI: see above (the key may be gone before the thread leaves sign_tests) */
        char *label;
        hsm_token_watch watch;
        uint64_t started_ns;
        int abandoned; /* under lock: the caller gave up at the deadline */
        struct sign_test *next; /* sign_tests (tests_lock) */
};

static pthread_mutex_t tests_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sign_test *sign_tests; /* test signatures whose thread is running */

unsigned hsm_creds_tests_running(void)
{
        unsigned n = 0;
        pthread_mutex_lock(&tests_lock);
        for (struct sign_test *t = sign_tests; t; t = t->next)
                n++;
        pthread_mutex_unlock(&tests_lock);
        return n;
}

static void sign_test_unref(struct sign_test *t)
{
        pthread_mutex_lock(&t->lock);
        bool last = --t->refs == 0;
        pthread_mutex_unlock(&t->lock);
        if (!last)
                return;
        if (t->pkey)
                gnutls_privkey_deinit(t->pkey); /* drops its reference to the key */
        gnutls_pubkey_deinit(t->pub);
        pthread_cond_destroy(&t->cond);
        pthread_mutex_destroy(&t->lock);
        free(t->label);
        free(t->ident);
        free(t);
}

static void tests_unlink(struct sign_test *t)
{
        pthread_mutex_lock(&tests_lock);
        for (struct sign_test **pp = &sign_tests; *pp; pp = &(*pp)->next)
                if (*pp == t) {
                        *pp = t->next;
                        break;
                }
        pthread_mutex_unlock(&tests_lock);
}

static void *sign_test_thread(void *arg)
{
        struct sign_test *t = arg;
        hsm_token_watch_thread(&t->watch);
        int r = test_signature(t->pkey, t->pub);
        hsm_token_watch_thread(NULL);
        /* Its key reference goes before the thread leaves sign_tests (once
         * none is left, the process may unload the tokens), and it leaves
         * before its caller hears of the result (which may make another
         * test signature with the key at once). */
        gnutls_privkey_deinit(t->pkey);
        t->pkey = NULL;
        tests_unlink(t);
        pthread_mutex_lock(&t->lock);
        t->r = r;
        t->done = 1;
        bool abandoned = t->abandoned;
        pthread_cond_signal(&t->cond);
        pthread_mutex_unlock(&t->lock);
        if (abandoned)
                hsm_notice("key %s: the test signature that overran its deadline returned after %.1f s (%s)", t->label,
                           (double)(hsm_now_ns() - t->started_ns) / 1e9, r == 0 ? "signed" : "failed");
        sign_test_unref(t);
        return NULL;
}

/* The test signature of key k (its leaf's public key pub, taken over) on
 * a thread, waited for until timeout_ms from now. -ETIMEDOUT: no answer by
 * then; -EBUSY: an earlier one with k has not returned. */
static int test_signature_bounded(hsm_key *k, gnutls_pubkey_t pub, unsigned timeout_ms)
{
        struct sign_test *t = calloc(1, sizeof(*t));
        if (!t) {
                gnutls_pubkey_deinit(pub);
                return -ENOMEM;
        }
        t->pub = pub;
        t->refs = 2;
        t->started_ns = hsm_now_ns();
        uint64_t deadline = t->started_ns + (uint64_t)timeout_ms * 1000000u;
        t->watch.deadline_ns = deadline;
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&t->cond, &ca);
        pthread_condattr_destroy(&ca);
        pthread_mutex_init(&t->lock, NULL);
        if (asprintf(&t->ident, "%s\n%s", hsm_token_name(hsm_key_token(k)), hsm_key_uri(k)) < 0)
                t->ident = NULL;
        if (!t->ident || !(t->label = strdup(hsm_key_label(k))) || hsm_privkey_import(k, &t->pkey) < 0) {
                free(t->ident);
                free(t->label);
                gnutls_pubkey_deinit(pub);
                pthread_cond_destroy(&t->cond);
                pthread_mutex_destroy(&t->lock);
                free(t);
                return -ENOMEM;
        }
        pthread_mutex_lock(&tests_lock);
        bool busy = false;
        for (struct sign_test *o = sign_tests; o; o = o->next)
                busy |= strcmp(o->ident, t->ident) == 0;
        if (!busy) {
                t->next = sign_tests;
                sign_tests = t;
        }
        pthread_mutex_unlock(&tests_lock);
        if (busy) {
                t->refs = 1;
                sign_test_unref(t);
                return -EBUSY;
        }
        pthread_t th;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        int e = pthread_create(&th, &at, sign_test_thread, t);
        pthread_attr_destroy(&at);
        if (e != 0) {
                tests_unlink(t);
                t->refs = 1;
                sign_test_unref(t);
                return -e;
        }
        struct timespec ts = { (time_t)(deadline / 1000000000u), (long)(deadline % 1000000000u) };
        pthread_mutex_lock(&t->lock);
        while (!t->done && pthread_cond_timedwait(&t->cond, &t->lock, &ts) != ETIMEDOUT)
                ;
        int r = t->done ? t->r : -ETIMEDOUT;
        if (!t->done)
                t->abandoned = 1;
        pthread_mutex_unlock(&t->lock);
        sign_test_unref(t);
        return r;
}

/* Keys already test-signed during one build. */
struct signed_keys {
        hsm_key *k[64];
        unsigned n;
};

static int load_chain(hsm_keystore *ks, const hsm_chain_spec *ch, unsigned flags, unsigned test_timeout_ms,
                      struct signed_keys *sk, gnutls_certificate_credentials_t cred, hsm_chain_info *info, char **errmsg)
{
        gnutls_datum_t pem = { NULL, 0 };
        gnutls_x509_crt_t *crts = NULL;
        unsigned n_crts = 0;
        gnutls_pcert_st *pcerts = NULL;
        gnutls_privkey_t pkey = NULL;
        bool verbose = flags & HSM_CREDS_VERBOSE;
        const char *cw = where_of(ch->cert_where), *kw = where_of(ch->key_where);
        const char *cname = ch->cert_file ? ch->cert_file : "the uploaded chain";
        int r;

        if (spec_copy(ch, &info->spec) < 0)
                return -ENOMEM;
        if (ch->cert_file) {
                if (read_file(ch->cert_file, &pem) < 0) {
                        hsm_set_error(errmsg, "%s: cannot read certificate file %s: %s", cw, ch->cert_file, strerror(errno));
                        return -ENOENT;
                }
        } else if (ch->cert_pem) {
                pem.data = gnutls_malloc(strlen(ch->cert_pem) + 1);
                if (!pem.data)
                        return -ENOMEM;
                memcpy(pem.data, ch->cert_pem, strlen(ch->cert_pem) + 1);
                pem.size = (unsigned)strlen(ch->cert_pem);
        } else
                return -EINVAL;
        r = gnutls_x509_crt_list_import2(&crts, &n_crts, &pem, GNUTLS_X509_FMT_PEM, GNUTLS_X509_CRT_LIST_FAIL_IF_UNSORTED);
        if (r < 0 || n_crts == 0) {
                hsm_set_error(errmsg, "%s: %s holds no valid PEM certificate chain (leaf first): %s", cw, cname,
                        r < 0 ? gnutls_strerror(r) : "empty");
                crts = NULL;
                n_crts = 0;
                r = -EINVAL;
                goto out;
        }
        {
                uint8_t fp[32];
                size_t fl = sizeof(fp);
                static const char hex[] = "0123456789abcdef";
                if (gnutls_x509_crt_get_fingerprint(crts[0], GNUTLS_DIG_SHA256, fp, &fl) < 0 || fl != 32) {
                        r = -EINVAL;
                        goto out;
                }
                for (unsigned i = 0; i < 32; i++) {
                        info->fingerprint[2 * i] = hex[fp[i] >> 4];
                        info->fingerprint[2 * i + 1] = hex[fp[i] & 15];
                }
                info->fingerprint[64] = 0;
        }
        info->pk = gnutls_x509_crt_get_pk_algorithm(crts[0], NULL);
        if (info->pk == GNUTLS_PK_RSA_PSS)
                info->pk = GNUTLS_PK_RSA;
        if (ch->n_names) {
                info->names = calloc(ch->n_names, sizeof(*info->names));
                if (!info->names) {
                        r = -ENOMEM;
                        goto out;
                }
                for (unsigned i = 0; i < ch->n_names; i++) {
                        if (!gnutls_x509_crt_check_hostname2(crts[0], ch->names[i], 0)) {
                                hsm_set_error(errmsg, "%s: certificate %s is not valid for name '%s'", cw, info->fingerprint,
                                              ch->names[i]);
                                r = -EINVAL;
                                goto out;
                        }
                        if ((info->names[info->n_names] = strdup(ch->names[i])))
                                info->n_names++;
                }
        } else
                leaf_names(crts[0], &info->names, &info->n_names);

        if (!ch->key || strncmp(ch->key, "pkcs11:", 7) == 0) {
                hsm_key *k = NULL;
                char *e = NULL;
                if (ch->key)
                        r = hsm_keystore_find(ks, ch->key, &k, &e);
                else {
                        r = hsm_keystore_find_for_cert(ks, crts[0], &k);
                        if (r == -ENOSPC)
                                hsm_set_error(&e, "the key of the leaf's public key was found, but %s", hsm_keystore_full_msg);
                        else if (r == -ETIMEDOUT)
                                hsm_set_error(&e, "the key of the leaf's public key: the keystore stayed busy (a lookup of an "
                                              "admin API change holds it)");
                        else if (r < 0)
                                hsm_set_error(&e, "the leaf's public key is the key of no configured token");
                }
                if (r < 0) {
                        hsm_set_error(errmsg, "%s: %s", kw, e ? e : strerror(-r));
                        free(e);
                        goto out;
                }
                info->key = k;
                hsm_build_step("key %s on token %s: reading its public key", hsm_key_label(k), hsm_token_name(hsm_key_token(k)));
                r = hsm_key_matches_certificate(k, crts[0]);
                hsm_build_step_end();
                if (r < 0) {
                        hsm_set_error(errmsg, "%s: certificate %s does not match key %s (%s)", kw, cname,
                                ch->key ? ch->key : hsm_key_uri(k),
                                r == -EKEYREJECTED ? "different public key" : "cannot read the key's public part");
                        r = -EKEYREJECTED;
                        goto out;
                }
                r = hsm_privkey_import(k, &pkey);
                if (r < 0) {
                        hsm_set_error(errmsg, "%s: cannot use key %s with GnuTLS", kw, ch->key ? ch->key : hsm_key_uri(k));
                        goto out;
                }
                info->key_name = strdup(hsm_key_label(k));
                if (verbose) {
                        unsigned f = hsm_key_flags(k);
                        hsm_notice("key %s: %s %u bits on token %s, %ssensitive, %sextractable%s", ch->key, key_type_name(k),
                                   hsm_key_bits(k), hsm_token_name(hsm_key_token(k)), f & HSM_KEY_SENSITIVE ? "" : "NOT ",
                                   f & HSM_KEY_EXTRACTABLE ? "" : "not ",
                                   f & HSM_KEY_ALWAYS_AUTHENTICATE ? ", login per signature" : "");
                }
        } else {
                gnutls_datum_t kd = { NULL, 0 };
                gnutls_x509_privkey_t xk = NULL;
                unsigned char id1[64], id2[64];
                size_t l1 = sizeof(id1), l2 = sizeof(id2);
                if (read_file(ch->key, &kd) < 0) {
                        hsm_set_error(errmsg, "%s: cannot read key file %s: %s", kw, ch->key, strerror(errno));
                        r = -ENOENT;
                        goto out;
                }
                r = gnutls_x509_privkey_init(&xk);
                if (r >= 0)
                        r = gnutls_x509_privkey_import2(xk, &kd, GNUTLS_X509_FMT_PEM, NULL, GNUTLS_PKCS_PLAIN);
                gnutls_memset(kd.data, 0, kd.size);
                gnutls_free(kd.data);
                if (r < 0) {
                        hsm_set_error(errmsg, "%s: %s is not an unencrypted PEM private key: %s", kw, ch->key,
                                gnutls_strerror(r));
                        gnutls_x509_privkey_deinit(xk);
                        r = -EINVAL;
                        goto out;
                }
                if (gnutls_x509_privkey_get_key_id(xk, GNUTLS_KEYID_USE_SHA256, id1, &l1) < 0 ||
                    gnutls_x509_crt_get_key_id(crts[0], GNUTLS_KEYID_USE_SHA256, id2, &l2) < 0 || l1 != l2 ||
                    memcmp(id1, id2, l1) != 0) {
                        hsm_set_error(errmsg, "%s: certificate %s does not match key %s (different public key)", kw, cname,
                                ch->key);
                        gnutls_x509_privkey_deinit(xk);
                        r = -EKEYREJECTED;
                        goto out;
                }
                gnutls_privkey_init(&pkey);
                r = gnutls_privkey_import_x509(pkey, xk, GNUTLS_PRIVKEY_IMPORT_AUTO_RELEASE);
                if (r < 0) {
                        gnutls_x509_privkey_deinit(xk);
                        hsm_set_error(errmsg, "%s: cannot use key %s", kw, ch->key);
                        r = -EINVAL;
                        goto out;
                }
                const char *base = strrchr(ch->key, '/');
                info->key_name = strdup(base ? base + 1 : ch->key);
                if (verbose)
                        hsm_notice("key %s: file key (not on a token)", ch->key);
        }

        if (flags & HSM_CREDS_TEST_SIGN) {
                bool done = false;
                for (unsigned i = 0; info->key && i < sk->n; i++)
                        done |= sk->k[i] == info->key;
                if (!done) {
                        gnutls_pubkey_t pub = NULL;
                        if (gnutls_pubkey_init(&pub) < 0 || gnutls_pubkey_import_x509(pub, crts[0], 0) < 0)
                                r = -EIO;
                        else if (info->key && (flags & HSM_CREDS_LIVE)) {
                                hsm_build_step_bounded("key %s on token %s: its test signature", info->key_name,
                                                       hsm_token_name(hsm_key_token(info->key)));
                                r = test_signature_bounded(info->key, pub, test_timeout_ms);
                                hsm_build_step_end();
                                pub = NULL; /* the test's now */
                        } else
                                r = test_signature(pkey, pub);
                        gnutls_pubkey_deinit(pub);
                        if (r == -ETIMEDOUT)
                                hsm_set_error(errmsg, "%s: the test signature with key %s did not return within %.1f s (the "
                                              "listener's handshake_timeout): the token does not answer", kw, info->key_name,
                                              test_timeout_ms / 1000.0);
                        else if (r == -EBUSY)
                                hsm_set_error(errmsg, "%s: the test signature of an earlier change with key %s has not "
                                              "returned yet: the token does not answer", kw, info->key_name);
                        else if (r < 0)
                                hsm_set_error(errmsg, "%s: the test signature with key %s failed", kw, info->key_name);
                        if (r < 0) {
                                r = r == -ETIMEDOUT || r == -EBUSY ? -ETIMEDOUT : -EIO;
                                goto out;
                        }
                        if (info->key && sk->n < sizeof(sk->k) / sizeof(sk->k[0]))
                                sk->k[sk->n++] = info->key;
                }
        }

        pcerts = calloc(n_crts, sizeof(*pcerts));
        if (!pcerts) {
                r = -ENOMEM;
                goto out;
        }
        unsigned np = n_crts;
        r = gnutls_pcert_import_x509_list(pcerts, crts, &np, 0);
        if (r < 0) {
                hsm_set_error(errmsg, "%s: cannot use certificate chain %s: %s", cw, cname, gnutls_strerror(r));
                free(pcerts);
                pcerts = NULL;
                r = -EINVAL;
                goto out;
        }
        r = gnutls_x509_crt_export2(crts[0], GNUTLS_X509_FMT_DER, &info->leaf);
        if (r < 0) {
                for (unsigned i = 0; i < np; i++)
                        gnutls_pcert_deinit(&pcerts[i]);
                r = -EINVAL;
                goto out;
        }
        /* Names given: GnuTLS selects this chain for them (SNI) instead of
         * the names in the certificate. */
        r = gnutls_certificate_set_key(cred, ch->n_names ? (const char **)ch->names : NULL, (int)ch->n_names, pcerts, (int)np,
                                       pkey);
        if (r < 0) {
                hsm_set_error(errmsg, "%s: GnuTLS refused certificate %s with key %s: %s", cw, cname,
                        info->key_name ? info->key_name : "?", gnutls_strerror(r));
                for (unsigned i = 0; i < np; i++)
                        gnutls_pcert_deinit(&pcerts[i]);
                r = -EINVAL;
                goto out;
        }
        pkey = NULL; /* owned by the credentials now, and so are the pcerts' contents */
        if (verbose) {
                gnutls_datum_t dn = { NULL, 0 };
                gnutls_x509_crt_get_dn3(crts[0], &dn, 0);
                time_t exp = gnutls_x509_crt_get_expiration_time(crts[0]);
                char when[32];
                struct tm tm;
                strftime(when, sizeof(when), "%Y-%m-%d", gmtime_r(&exp, &tm));
                hsm_notice("certificate %s: %s, %u in chain, expires %s, matches its key", cname, dn.data ? (char *)dn.data : "?",
                           n_crts, when);
                gnutls_free(dn.data);
        }
        if (asprintf(&info->description, "%s with %s", ch->cert_file ? ch->cert_file : info->fingerprint,
                     ch->key ? ch->key : info->key_name ? info->key_name : "?") < 0)
                info->description = NULL;
        r = 0;
out:
        free(pcerts);
        if (pkey)
                gnutls_privkey_deinit(pkey);
        for (unsigned i = 0; i < n_crts; i++)
                gnutls_x509_crt_deinit(crts[i]);
        gnutls_free(crts);
        gnutls_free(pem.data);
        return r;
}

static void chain_info_done(hsm_chain_info *ci)
{
        free(ci->description);
        free(ci->key_name);
        hsm_ocsp_file_free(ci->ocsp);
        gnutls_free(ci->leaf.data);
        hsm_key_unref(ci->key);
        for (unsigned j = 0; j < ci->n_names; j++)
                free(ci->names[j]);
        free(ci->names);
        spec_done(&ci->spec);
}

static void creds_destroy(hsm_creds *cr)
{
        if (!cr)
                return;
        if (__atomic_load_n(&cr->retired, __ATOMIC_ACQUIRE))
                hsm_info("listener %s: credentials generation %u released (replaced; no handshake or connection uses them "
                         "any more)", cr->name ? cr->name : "?", cr->generation);
        if (cr->cred)
                gnutls_certificate_free_credentials(cr->cred);
        /* Every chain that load_chain touched (also the one that failed). */
        for (unsigned i = 0; cr->chains && i <= cr->n_chains; i++)
                chain_info_done(&cr->chains[i]);
        free(cr->chains);
        free(cr->name);
        free(cr);
}

/* Two chains with keys of one type may not serve the same name (a client
 * would get either); chains of the configuration file are taken as they
 * are. */
static int check_names(const hsm_creds *cr, int *ret_bad, char **errmsg)
{
        for (unsigned i = 0; i < cr->n_chains; i++)
                for (unsigned j = i + 1; j < cr->n_chains; j++) {
                        const hsm_chain_info *a = &cr->chains[i], *b = &cr->chains[j];
                        if (a->pk != b->pk || (strcmp(a->spec.source, "config") == 0 && strcmp(b->spec.source, "config") == 0))
                                continue;
                        for (unsigned x = 0; x < a->n_names; x++)
                                for (unsigned y = 0; y < b->n_names; y++)
                                        if (strcasecmp(a->names[x], b->names[y]) == 0) {
                                                bool b_new = strcmp(b->spec.source, "config") != 0;
                                                const hsm_chain_info *n = b_new ? b : a, *o = b_new ? a : b;
                                                hsm_set_error(errmsg, "%s: name '%s' is served by certificate %s already (a key of the same type)",
                                                              where_of(n->spec.cert_where), a->names[x], o->fingerprint);
                                                if (ret_bad)
                                                        *ret_bad = (int)(b_new ? j : i);
                                                return -EEXIST;
                                        }
                }
        return 0;
}

int hsm_creds_build(hsm_keystore *ks, const hsm_conf_listener *l, const hsm_chain_spec *chains, unsigned n_chains,
                    unsigned flags, hsm_creds **ret, int *ret_bad, char **errmsg)
{
        int r;
        if (ret_bad)
                *ret_bad = -1;
        hsm_creds *cr = calloc(1, sizeof(*cr));
        if (!cr)
                return -ENOMEM;
        cr->refs = 1;
        cr->generation = 1;
        cr->name = strdup(l->name);
        /* One more, zeroed: creds_destroy frees the chain that failed too. */
        cr->chains = calloc(n_chains + 1, sizeof(*cr->chains));
        if (!cr->name || !cr->chains || gnutls_certificate_allocate_credentials(&cr->cred) < 0) {
                creds_destroy(cr);
                return -ENOMEM;
        }
        /* load_chain() compares public keys itself; GnuTLS's own check would
         * make a test signature on the token for every chain. */
        gnutls_certificate_set_flags(cr->cred, GNUTLS_CERTIFICATE_SKIP_KEY_CERT_MATCH);
        /* TLS 1.2 DHE (a priority with +DHE-RSA): RFC 7919 group parameters
         * (ffdhe2048 and up, as GNUTLS_SEC_PARAM_MEDIUM picks) for clients
         * that do not name an FFDHE group; without them such a client gets
         * handshake_failure. Unused unless the priority allows DHE. */
        if (l->kind == HSM_LISTENER && gnutls_certificate_set_known_dh_params(cr->cred, GNUTLS_SEC_PARAM_MEDIUM) < 0) {
                creds_destroy(cr);
                return -ENOMEM;
        }
        struct signed_keys sk = { .n = 0 };
        hsm_build_listener(l);
        for (unsigned i = 0; i < n_chains; i++) {
                r = load_chain(ks, &chains[i], flags, l->handshake_timeout_ms, &sk, cr->cred, &cr->chains[i], errmsg);
                if (r < 0) {
                        if (ret_bad)
                                *ret_bad = (int)i;
                        creds_destroy(cr);
                        return r;
                }
                cr->n_chains++;
                if (chains[i].ocsp) {
                        /* Chain i is the credentials' certificate i. */
                        char where[300], *e = NULL;
                        snprintf(where, sizeof(where), "listener %s", l->name);
                        r = hsm_ocsp_file_new(where, chains[i].ocsp, chains[i].cert_file, &cr->chains[i].leaf, &cr->chains[i].ocsp, &e);
                        if (r == 0)
                                r = hsm_ocsp_file_attach(cr->chains[i].ocsp, cr->cred, i);
                        if (r < 0) {
                                hsm_set_error(errmsg, "%s: %s", where_of(chains[i].ocsp_where), e ? e : strerror(-r));
                                free(e);
                                if (ret_bad)
                                        *ret_bad = (int)i;
                                creds_destroy(cr);
                                return r;
                        }
                }
        }
        r = check_names(cr, ret_bad, errmsg);
        if (r < 0) {
                creds_destroy(cr);
                return r;
        }
        *ret = cr;
        return 0;
}

int hsm_chain_specs_from_conf(const hsm_conf *c, const hsm_conf_listener *l, hsm_chain_spec **ret, char ***ret_strings)
{
        hsm_chain_spec *v = calloc(l->n_chains + 1, sizeof(*v));
        char **s = calloc(3 * l->n_chains + 1, sizeof(*s));
        if (!v || !s) {
                free(v);
                free(s);
                return -ENOMEM;
        }
        for (unsigned i = 0; i < l->n_chains; i++) {
                const hsm_conf_chain *ch = &l->chains[i];
                if (asprintf(&s[3 * i], "%s:%d", c->path, ch->cert_line) < 0 ||
                    asprintf(&s[3 * i + 1], "%s:%d", c->path, ch->key_line) < 0 ||
                    asprintf(&s[3 * i + 2], "%s:%d", c->path, ch->ocsp_line) < 0) {
                        hsm_chain_specs_free(v, s);
                        return -ENOMEM;
                }
                v[i] = (hsm_chain_spec){ .source = "config", .cert_file = ch->cert, .key = ch->key, .ocsp = ch->ocsp,
                                         .cert_where = s[3 * i], .key_where = s[3 * i + 1], .ocsp_where = s[3 * i + 2] };
        }
        *ret = v;
        *ret_strings = s;
        return 0;
}

void hsm_chain_specs_free(hsm_chain_spec *specs, char **strings)
{
        for (unsigned i = 0; strings && strings[i]; i++)
                free(strings[i]);
        free(strings);
        free(specs);
}

int hsm_creds_load(hsm_keystore *ks, const hsm_conf *c, const hsm_conf_listener *l, bool verbose, hsm_creds **ret,
                   char **errmsg)
{
        hsm_chain_spec *specs = NULL;
        char **strings = NULL;
        hsm_creds *cr = NULL;
        int r = hsm_chain_specs_from_conf(c, l, &specs, &strings);
        if (r < 0)
                return r;
        r = hsm_creds_build(ks, l, specs, l->n_chains, verbose ? HSM_CREDS_VERBOSE : 0, &cr, NULL, errmsg);
        hsm_chain_specs_free(specs, strings);
        if (r < 0)
                return r;
        r = hsm_creds_set_trust(cr, c, l, verbose, errmsg);
        if (r < 0) {
                hsm_creds_unref(cr);
                return r;
        }
        *ret = cr;
        return 0;
}

int hsm_creds_set_trust(hsm_creds *cr, const hsm_conf *c, const hsm_conf_listener *l, bool verbose, char **errmsg)
{
        /* Whom to trust: client certificates (listener), the server (connector). */
        const char *ca = l->kind == HSM_CONNECTOR ? l->ca_file : l->client_auth != HSM_CLIENT_AUTH_NONE ? l->client_ca : NULL;
        int ca_line = l->kind == HSM_CONNECTOR ? l->ca_file_line : l->client_ca_line;
        int n = 0;
        if (ca)
                n = gnutls_certificate_set_x509_trust_file(cr->cred, ca, GNUTLS_X509_FMT_PEM);
        else if (l->kind == HSM_CONNECTOR)
                n = gnutls_certificate_set_x509_system_trust(cr->cred);
        if ((ca || l->kind == HSM_CONNECTOR) && n <= 0) {
                if (ca)
                        hsm_set_error(errmsg, "%s:%d: %s holds no CA certificate (PEM)%s%s", c->path, ca_line, ca, n < 0 ? ": " : "",
                                n < 0 ? gnutls_strerror(n) : "");
                else
                        hsm_set_error(errmsg, "%s:%d: [connector %s]: the system trust store is empty; set 'ca_file'", c->path, l->line,
                                l->name);
                return -EINVAL;
        }
        if (verbose && ca)
                hsm_notice("%s %s: %d CA certificate%s from %s", l->kind == HSM_CONNECTOR ? "connector" : "listener", l->name, n,
                           n == 1 ? "" : "s", ca);
        return 0;
}

hsm_creds *hsm_creds_ref(hsm_creds *cr)
{
        if (cr)
                __atomic_add_fetch(&cr->refs, 1, __ATOMIC_RELAXED);
        return cr;
}

void hsm_creds_unref(hsm_creds *cr)
{
        if (cr && __atomic_sub_fetch(&cr->refs, 1, __ATOMIC_ACQ_REL) == 0)
                creds_destroy(cr);
}

void hsm_creds_free(hsm_creds *cr)
{
        hsm_creds_unref(cr);
}

int hsm_creds_chain_of(const hsm_creds *cr, gnutls_session_t s)
{
        const gnutls_datum_t *ours = gnutls_certificate_get_ours(s);
        if (!ours)
                return -1;
        for (unsigned i = 0; i < cr->n_chains; i++)
                if (cr->chains[i].leaf.size == ours->size && memcmp(cr->chains[i].leaf.data, ours->data, ours->size) == 0)
                        return (int)i;
        return -1;
}
