/* Key administration on a token (keyadmin.h): token description, listing,
 * generation and deletion of keys. The pool's sessions are read-only, so
 * changes run on an RW session of their own, opened while a pool session is
 * held (which keeps the token logged in). */
#include "keyadmin.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/crypto.h>

#include "log.h"
#include "token-internal.h"

static void copy_field(char *dst, size_t size, const CK_UTF8CHAR *src, size_t n)
{
        while (n > 0 && (src[n - 1] == ' ' || src[n - 1] == 0))
                n--;
        if (n >= size)
                n = size - 1;
        memcpy(dst, src, n);
        dst[n] = 0;
}

/* Objects are made, destroyed and listed on tokens one at a time: SoftHSM
 * answered CKR_GENERAL_ERROR or CKR_TEMPLATE_INCONSISTENT to one of 12
 * admin key generations made at once, each followed by a key listing
 * (its object store is re-read by a listing while another session writes
 * an object); an administrative change has no need to run beside another. */
static pthread_mutex_t objects_lock = PTHREAD_MUTEX_INITIALIZER;

static int get_info_gated(hsm_token *t, hsm_token_info *ret)
{
        memset(ret, 0, sizeof(*ret));
        ret->slot_id = t->slot;
        pthread_mutex_lock(&t->lock);
        ret->sessions_open = t->n_open;
        ret->sessions_idle = t->n_idle;
        ret->sessions_max = t->max_sessions;
        pthread_mutex_unlock(&t->lock);
        CK_TOKEN_INFO ti;
        if (P11(t->fl, C_GetTokenInfo, t->slot, &ti) != CKR_OK)
                return 0;
        ret->present = true;
        copy_field(ret->label, sizeof(ret->label), ti.label, sizeof(ti.label));
        copy_field(ret->manufacturer, sizeof(ret->manufacturer), ti.manufacturerID, sizeof(ti.manufacturerID));
        copy_field(ret->model, sizeof(ret->model), ti.model, sizeof(ti.model));
        copy_field(ret->serial, sizeof(ret->serial), ti.serialNumber, sizeof(ti.serialNumber));
        ret->flags = ti.flags;
        ret->login_required = ti.flags & CKF_LOGIN_REQUIRED;
        if (!ret->login_required || !t->pin) {
                ret->logged_in = !ret->login_required;
                return 0;
        }
        CK_SESSION_HANDLE s;
        if (hsm_session_get(t, &s) == 0) {
                CK_SESSION_INFO si;
                if (P11(t->fl, C_GetSessionInfo, s, &si) == CKR_OK)
                        ret->logged_in = si.state == CKS_RO_USER_FUNCTIONS || si.state == CKS_RW_USER_FUNCTIONS;
                hsm_session_put(t, s, HSM_SESSION_KEEP);
        }
        return 0;
}

struct flag_name {
        unsigned long flag;
        const char *name;
};

static unsigned names_of(const struct flag_name *tab, size_t n, unsigned long flags, const char **names, unsigned max)
{
        unsigned k = 0;
        for (size_t i = 0; i < n && k < max; i++)
                if (flags & tab[i].flag)
                        names[k++] = tab[i].name;
        return k;
}

unsigned hsm_token_flag_names(unsigned long flags, const char **names, unsigned max)
{
        static const struct flag_name tab[] = {
                { CKF_RNG, "rng" },
                { CKF_WRITE_PROTECTED, "write_protected" },
                { CKF_LOGIN_REQUIRED, "login_required" },
                { CKF_USER_PIN_INITIALIZED, "user_pin_initialized" },
                { CKF_RESTORE_KEY_NOT_NEEDED, "restore_key_not_needed" },
                { CKF_CLOCK_ON_TOKEN, "clock_on_token" },
                { CKF_PROTECTED_AUTHENTICATION_PATH, "protected_authentication_path" },
                { CKF_DUAL_CRYPTO_OPERATIONS, "dual_crypto_operations" },
                { CKF_TOKEN_INITIALIZED, "token_initialized" },
                { CKF_SECONDARY_AUTHENTICATION, "secondary_authentication" },
                { CKF_USER_PIN_COUNT_LOW, "user_pin_count_low" },
                { CKF_USER_PIN_FINAL_TRY, "user_pin_final_try" },
                { CKF_USER_PIN_LOCKED, "user_pin_locked" },
                { CKF_USER_PIN_TO_BE_CHANGED, "user_pin_to_be_changed" },
                { CKF_SO_PIN_COUNT_LOW, "so_pin_count_low" },
                { CKF_SO_PIN_FINAL_TRY, "so_pin_final_try" },
                { CKF_SO_PIN_LOCKED, "so_pin_locked" },
                { CKF_SO_PIN_TO_BE_CHANGED, "so_pin_to_be_changed" },
        };
        return names_of(tab, sizeof(tab) / sizeof(tab[0]), flags, names, max);
}

unsigned hsm_mech_flag_names(unsigned long flags, const char **names, unsigned max)
{
        static const struct flag_name tab[] = {
                { CKF_HW, "hw" },
                { CKF_ENCRYPT, "encrypt" },
                { CKF_DECRYPT, "decrypt" },
                { CKF_DIGEST, "digest" },
                { CKF_SIGN, "sign" },
                { CKF_SIGN_RECOVER, "sign_recover" },
                { CKF_VERIFY, "verify" },
                { CKF_VERIFY_RECOVER, "verify_recover" },
                { CKF_GENERATE, "generate" },
                { CKF_GENERATE_KEY_PAIR, "generate_key_pair" },
                { CKF_WRAP, "wrap" },
                { CKF_UNWRAP, "unwrap" },
                { CKF_DERIVE, "derive" },
                { CKF_EC_F_P, "ec_f_p" },
                { CKF_EC_NAMEDCURVE, "ec_namedcurve" },
                { CKF_EC_UNCOMPRESS, "ec_uncompress" },
                { CKF_EC_COMPRESS, "ec_compress" },
        };
        return names_of(tab, sizeof(tab) / sizeof(tab[0]), flags, names, max);
}

static const char *mech_name(CK_MECHANISM_TYPE m)
{
        static const struct { CK_MECHANISM_TYPE m; const char *n; } tab[] = {
                { CKM_RSA_PKCS_KEY_PAIR_GEN, "CKM_RSA_PKCS_KEY_PAIR_GEN" },
                { CKM_RSA_PKCS, "CKM_RSA_PKCS" },
                { CKM_RSA_X_509, "CKM_RSA_X_509" },
                { CKM_RSA_PKCS_OAEP, "CKM_RSA_PKCS_OAEP" },
                { CKM_RSA_PKCS_PSS, "CKM_RSA_PKCS_PSS" },
                { CKM_SHA1_RSA_PKCS, "CKM_SHA1_RSA_PKCS" },
                { CKM_SHA256_RSA_PKCS, "CKM_SHA256_RSA_PKCS" },
                { CKM_SHA384_RSA_PKCS, "CKM_SHA384_RSA_PKCS" },
                { CKM_SHA512_RSA_PKCS, "CKM_SHA512_RSA_PKCS" },
                { CKM_SHA256_RSA_PKCS_PSS, "CKM_SHA256_RSA_PKCS_PSS" },
                { CKM_SHA384_RSA_PKCS_PSS, "CKM_SHA384_RSA_PKCS_PSS" },
                { CKM_SHA512_RSA_PKCS_PSS, "CKM_SHA512_RSA_PKCS_PSS" },
                { CKM_EC_KEY_PAIR_GEN, "CKM_EC_KEY_PAIR_GEN" },
                { CKM_ECDSA, "CKM_ECDSA" },
                { CKM_ECDSA_SHA256, "CKM_ECDSA_SHA256" },
                { CKM_ECDSA_SHA384, "CKM_ECDSA_SHA384" },
                { CKM_ECDSA_SHA512, "CKM_ECDSA_SHA512" },
                { CKM_ECDH1_DERIVE, "CKM_ECDH1_DERIVE" },
                { CKM_EC_EDWARDS_KEY_PAIR_GEN, "CKM_EC_EDWARDS_KEY_PAIR_GEN" },
                { CKM_EDDSA, "CKM_EDDSA" },
                { CKM_SHA256, "CKM_SHA256" },
                { CKM_SHA384, "CKM_SHA384" },
                { CKM_SHA512, "CKM_SHA512" },
                { CKM_AES_KEY_GEN, "CKM_AES_KEY_GEN" },
                { CKM_AES_GCM, "CKM_AES_GCM" },
        };
        for (size_t i = 0; i < sizeof(tab) / sizeof(tab[0]); i++)
                if (tab[i].m == m)
                        return tab[i].n;
        return NULL;
}

static int mechanisms_gated(hsm_token *t, hsm_mech_desc **ret)
{
        hsm_mech_desc *d = calloc(t->n_mechs ? t->n_mechs : 1, sizeof(*d));
        if (!d)
                return -ENOMEM;
        for (CK_ULONG i = 0; i < t->n_mechs; i++) {
                const char *n = mech_name(t->mechs[i]);
                if (n)
                        snprintf(d[i].name, sizeof(d[i].name), "%s", n);
                else
                        snprintf(d[i].name, sizeof(d[i].name), "0x%08lx", (unsigned long)t->mechs[i]);
                d[i].min_key_size = t->mech_info[i].ulMinKeySize;
                d[i].max_key_size = t->mech_info[i].ulMaxKeySize;
                d[i].flags = t->mech_info[i].flags;
        }
        *ret = d;
        return (int)t->n_mechs;
}

/* Handles of objects matching tmpl (at most max). */
static int find_all(hsm_token *t, CK_SESSION_HANDLE s, CK_ATTRIBUTE *tmpl, CK_ULONG n, CK_OBJECT_HANDLE *found,
                    CK_ULONG max, CK_ULONG *count)
{
        *count = 0;
        CK_RV rv = P11(t->fl, C_FindObjectsInit, s, tmpl, n);
        if (rv != CKR_OK)
                return hsm_p11_errno(rv);
        rv = P11(t->fl, C_FindObjects, s, found, max, count);
        P11(t->fl, C_FindObjectsFinal, s);
        return hsm_p11_errno(rv);
}

#define MAX_KEYS 1024

static void pct_encode(char *dst, size_t size, const uint8_t *p, size_t n)
{
        size_t o = 0;
        for (size_t i = 0; i < n && o + 4 < size; i++)
                o += (size_t)snprintf(dst + o, size - o, "%%%02x", p[i]);
        dst[o] = 0;
}

static int list_keys_gated(hsm_token *t, hsm_key_entry **ret, size_t *ret_n)
{
        CK_SESSION_HANDLE s;
        int r = hsm_session_get(t, &s);
        if (r < 0)
                return r;
        CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
        CK_ATTRIBUTE tmpl[] = { { CKA_CLASS, &cls, sizeof(cls) } };
        CK_OBJECT_HANDLE *found = calloc(MAX_KEYS, sizeof(*found));
        hsm_key_entry *e = calloc(MAX_KEYS, sizeof(*e));
        CK_ULONG count = 0;
        size_t n = 0;
        if (!found || !e) {
                r = -ENOMEM;
                goto out;
        }
        r = find_all(t, s, tmpl, 1, found, MAX_KEYS, &count);
        if (r < 0)
                goto out;
        for (CK_ULONG i = 0; i < count; i++) {
                uint8_t id[64];
                char label[256];
                CK_ATTRIBUTE a[] = { { CKA_ID, id, sizeof(id) }, { CKA_LABEL, label, sizeof(label) - 1 } };
                if (P11(t->fl, C_GetAttributeValue, s, found[i], a, 2) != CKR_OK)
                        continue;
                label[a[1].ulValueLen] = 0;
                char uri[64 + 3 * 64 + 3 * 255];
                if (a[0].ulValueLen > 0) {
                        char pid[3 * 64 + 1];
                        pct_encode(pid, sizeof(pid), id, a[0].ulValueLen);
                        snprintf(uri, sizeof(uri), "pkcs11:id=%s;type=private", pid);
                } else {
                        char pl[3 * 255 + 1];
                        pct_encode(pl, sizeof(pl), (const uint8_t *)label, a[1].ulValueLen);
                        snprintf(uri, sizeof(uri), "pkcs11:object=%s;type=private", pl);
                }
                hsm_key *k = NULL;
                char *err = NULL;
                if (hsm_token_find_key(t, uri, &k, &err) < 0) {
                        hsm_debug("token %s: key %s left out of the list: %s", t->name, uri, err ? err : "?");
                        free(err);
                        continue;
                }
                e[n].key = k;
                memcpy(e[n].id, id, a[0].ulValueLen);
                e[n].id_len = a[0].ulValueLen;
                e[n].label = strdup(label);
                n++;
        }
        *ret = e;
        *ret_n = n;
        e = NULL;
out:
        hsm_session_put(t, s, HSM_SESSION_KEEP);
        free(found);
        free(e);
        return r;
}

void hsm_key_entries_free(hsm_key_entry *e, size_t n)
{
        if (!e)
                return;
        for (size_t i = 0; i < n; i++) {
                hsm_key_unref(e[i].key);
                free(e[i].label);
        }
        free(e);
}

int hsm_key_spki_sha256(hsm_key *k, uint8_t out[32])
{
        gnutls_pubkey_t pub = NULL;
        gnutls_datum_t der = { NULL, 0 };
        int r = hsm_pubkey_import(k, &pub);
        if (r < 0)
                return r;
        r = gnutls_pubkey_export2(pub, GNUTLS_X509_FMT_DER, &der) < 0 ? -EIO : 0;
        if (r == 0 && gnutls_hash_fast(GNUTLS_DIG_SHA256, der.data, der.size, out) < 0)
                r = -EIO;
        gnutls_free(der.data);
        gnutls_pubkey_deinit(pub);
        return r;
}

/* Changes are serialised: the duplicate check and the generation are one step. */
static pthread_mutex_t change_lock = PTHREAD_MUTEX_INITIALIZER;

/* An RW session, opened while a pool session is held so that the token is
 * logged in. */
static int rw_session(hsm_token *t, CK_SESSION_HANDLE *pool, CK_SESSION_HANDLE *ret, char **errmsg)
{
        int r = hsm_session_get(t, pool);
        if (r < 0) {
                hsm_set_error(errmsg, "token %s: no session: %s", t->name, strerror(-r));
                return r;
        }
        CK_RV rv = P11(t->fl, C_OpenSession, t->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, ret);
        if (rv != CKR_OK) {
                hsm_session_put(t, *pool, HSM_SESSION_KEEP);
                hsm_set_error(errmsg, "token %s: cannot open a read-write session: %s", t->name, hsm_p11_rv_name(rv));
                return hsm_p11_errno(rv);
        }
        /* Keys are made only on the token that was opened (the pool
         * session may be older than a swap). */
        r = hsm_token_check_same(t, errmsg);
        if (r < 0) {
                P11(t->fl, C_CloseSession, *ret);
                hsm_session_put(t, *pool, r == -EKEYREJECTED ? HSM_SESSION_DROP_ALL : HSM_SESSION_KEEP);
                return r;
        }
        return 0;
}

static void rw_done(hsm_token *t, CK_SESSION_HANDLE pool, CK_SESSION_HANDLE s)
{
        P11(t->fl, C_CloseSession, s);
        hsm_session_put(t, pool, HSM_SESSION_KEEP);
}

static const CK_BYTE oid_p256[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
static const CK_BYTE oid_p384[] = { 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22 };
static const CK_BYTE oid_ed25519[] = { 0x06, 0x03, 0x2b, 0x65, 0x70 };

static int generate_key_gated(hsm_token *t, const hsm_keygen *g, char **errmsg)
{
        CK_MECHANISM mech = { 0, NULL, 0 };
        CK_KEY_TYPE kt;
        const CK_BYTE *params = NULL;
        size_t params_len = 0;
        CK_ULONG bits = g->bits;
        static const CK_BYTE e65537[] = { 0x01, 0x00, 0x01 };

        if (errmsg)
                *errmsg = NULL;
        if (!g->label || !*g->label || strlen(g->label) > 255 || !g->id || g->id_len == 0 || g->id_len > 64) {
                hsm_set_error(errmsg, "a key needs a label (1 to 255 bytes) and an id (1 to 64 bytes)");
                return -EINVAL;
        }
        switch (g->type) {
        case HSM_KEY_RSA:
                if (bits != 2048 && bits != 3072 && bits != 4096) {
                        hsm_set_error(errmsg, "RSA keys are 2048, 3072 or 4096 bits");
                        return -EINVAL;
                }
                mech.mechanism = CKM_RSA_PKCS_KEY_PAIR_GEN;
                kt = CKK_RSA;
                break;
        case HSM_KEY_ECDSA:
                if (g->curve == HSM_CURVE_P256)
                        params = oid_p256, params_len = sizeof(oid_p256);
                else if (g->curve == HSM_CURVE_P384)
                        params = oid_p384, params_len = sizeof(oid_p384);
                else {
                        hsm_set_error(errmsg, "ECDSA keys are on P-256 or P-384");
                        return -EINVAL;
                }
                mech.mechanism = CKM_EC_KEY_PAIR_GEN;
                kt = CKK_EC;
                break;
        case HSM_KEY_ED25519:
                params = oid_ed25519, params_len = sizeof(oid_ed25519);
                mech.mechanism = CKM_EC_EDWARDS_KEY_PAIR_GEN;
                kt = CKK_EC_EDWARDS;
                break;
        default:
                hsm_set_error(errmsg, "unsupported key type");
                return -EINVAL;
        }
        if (!hsm_token_has_mech(t, mech.mechanism, CKF_GENERATE_KEY_PAIR)) {
                hsm_set_error(errmsg, "token %s cannot generate this key (no %s)", t->name, mech_name(mech.mechanism));
                return -EOPNOTSUPP;
        }

        CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
        CK_OBJECT_CLASS priv_cls = CKO_PRIVATE_KEY, pub_cls = CKO_PUBLIC_KEY;
        CK_ULONG label_len = strlen(g->label);
        CK_ATTRIBUTE pub[] = {
                { CKA_CLASS, &pub_cls, sizeof(pub_cls) },
                { CKA_KEY_TYPE, &kt, sizeof(kt) },
                { CKA_TOKEN, &yes, sizeof(yes) },
                { CKA_PRIVATE, &no, sizeof(no) },
                { CKA_VERIFY, &yes, sizeof(yes) },
                { CKA_LABEL, (void *)g->label, label_len },
                { CKA_ID, (void *)g->id, g->id_len },
                /* type-specific, last: */
                { CKA_ENCRYPT, &yes, sizeof(yes) },
                { CKA_MODULUS_BITS, &bits, sizeof(bits) },
                { CKA_PUBLIC_EXPONENT, (void *)e65537, sizeof(e65537) },
        };
        CK_ULONG n_pub = 7;
        if (kt == CKK_RSA)
                n_pub = 10;
        else {
                pub[7] = (CK_ATTRIBUTE){ CKA_EC_PARAMS, (void *)params, params_len };
                n_pub = 8;
        }
        CK_ATTRIBUTE priv[] = {
                { CKA_CLASS, &priv_cls, sizeof(priv_cls) },
                { CKA_KEY_TYPE, &kt, sizeof(kt) },
                { CKA_TOKEN, &yes, sizeof(yes) },
                { CKA_PRIVATE, &yes, sizeof(yes) },
                { CKA_SENSITIVE, &yes, sizeof(yes) },
                { CKA_EXTRACTABLE, &no, sizeof(no) },
                { CKA_SIGN, &yes, sizeof(yes) },
                { CKA_LABEL, (void *)g->label, label_len },
                { CKA_ID, (void *)g->id, g->id_len },
                { CKA_DECRYPT, &yes, sizeof(yes) }, /* RSA only: TLS 1.2 RSA key exchange */
        };
        CK_ULONG n_priv = kt == CKK_RSA ? 10 : 9;

        CK_SESSION_HANDLE pool, s;
        pthread_mutex_lock(&change_lock);
        int r = rw_session(t, &pool, &s, errmsg);
        if (r < 0)
                goto out_unlock;
        /* Refuse duplicates: a private key with this label, or this id. */
        CK_OBJECT_HANDLE h[1];
        CK_ULONG count = 0;
        CK_ATTRIBUTE by_label[] = { { CKA_CLASS, &priv_cls, sizeof(priv_cls) }, { CKA_LABEL, (void *)g->label, label_len } };
        CK_ATTRIBUTE by_id[] = { { CKA_CLASS, &priv_cls, sizeof(priv_cls) }, { CKA_ID, (void *)g->id, g->id_len } };
        if ((r = find_all(t, s, by_label, 2, h, 1, &count)) < 0)
                goto out;
        if (count) {
                hsm_set_error(errmsg, "a private key labelled '%s' is already on token %s", g->label, t->name);
                r = -EEXIST;
                goto out;
        }
        if ((r = find_all(t, s, by_id, 2, h, 1, &count)) < 0)
                goto out;
        if (count) {
                hsm_set_error(errmsg, "a private key with this id is already on token %s", t->name);
                r = -EEXIST;
                goto out;
        }
        CK_OBJECT_HANDLE hpub, hpriv;
        CK_RV rv = P11(t->fl, C_GenerateKeyPair, s, &mech, pub, n_pub, priv, n_priv, &hpub, &hpriv);
        if (rv != CKR_OK) {
                hsm_set_error(errmsg, "token %s: C_GenerateKeyPair failed: %s", t->name, hsm_p11_rv_name(rv));
                r = hsm_p11_errno(rv);
                goto out;
        }
        r = 0;
out:
        rw_done(t, pool, s);
out_unlock:
        pthread_mutex_unlock(&change_lock);
        return r;
}

static int delete_key_gated(hsm_token *t, const uint8_t *id, size_t id_len, char **errmsg)
{
        CK_SESSION_HANDLE pool, s;
        if (errmsg)
                *errmsg = NULL;
        pthread_mutex_lock(&change_lock);
        int r = rw_session(t, &pool, &s, errmsg);
        if (r < 0)
                goto out_unlock;
        /* The key pair is named by its CKA_ID: that id must name one
         * private key and at most one public key, or nothing is destroyed
         * (another pair provisioned with the same id may be in use). */
        CK_OBJECT_CLASS cls[] = { CKO_PRIVATE_KEY, CKO_PUBLIC_KEY };
        CK_OBJECT_HANDLE h[2][4];
        CK_ULONG count[2] = { 0, 0 };
        for (int c = 0; c < 2; c++) {
                CK_ATTRIBUTE tmpl[] = { { CKA_CLASS, &cls[c], sizeof(cls[c]) }, { CKA_ID, (void *)id, id_len } };
                if ((r = find_all(t, s, tmpl, 2, h[c], 4, &count[c])) < 0)
                        goto out;
        }
        if (count[0] == 0) {
                hsm_set_error(errmsg, "no private key with this id on token %s", t->name);
                r = -ENOENT;
                goto out;
        }
        if (count[0] > 1 || count[1] > 1) {
                hsm_set_error(errmsg, "token %s: more than one key has this id; nothing deleted", t->name);
                r = -ENOTUNIQ;
                goto out;
        }
        for (int c = 0; c < 2; c++)
                for (CK_ULONG i = 0; i < count[c]; i++) {
                        CK_RV rv = P11(t->fl, C_DestroyObject, s, h[c][i]);
                        if (rv != CKR_OK) {
                                hsm_set_error(errmsg, "token %s: C_DestroyObject failed: %s", t->name, hsm_p11_rv_name(rv));
                                r = hsm_p11_errno(rv);
                                goto out;
                        }
                }
        r = 0;
out:
        rw_done(t, pool, s);
out_unlock:
        pthread_mutex_unlock(&change_lock);
        return r;
}

static int store_certificate_gated(hsm_token *t, const uint8_t *id, size_t id_len, const char *label,
                              const gnutls_datum_t *der, char **errmsg)
{
        gnutls_x509_crt_t crt = NULL;
        gnutls_datum_t subject = { NULL, 0 }, issuer = { NULL, 0 };
        if (errmsg)
                *errmsg = NULL;
        if (gnutls_x509_crt_init(&crt) < 0 || gnutls_x509_crt_import(crt, der, GNUTLS_X509_FMT_DER) < 0 ||
            gnutls_x509_crt_get_raw_dn(crt, &subject) < 0 || gnutls_x509_crt_get_raw_issuer_dn(crt, &issuer) < 0) {
                gnutls_x509_crt_deinit(crt);
                hsm_set_error(errmsg, "the certificate does not parse");
                return -EINVAL;
        }
        CK_OBJECT_CLASS cls = CKO_CERTIFICATE;
        CK_CERTIFICATE_TYPE ct = CKC_X_509;
        CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
        CK_ATTRIBUTE tmpl[] = {
                { CKA_CLASS, &cls, sizeof(cls) },
                { CKA_CERTIFICATE_TYPE, &ct, sizeof(ct) },
                { CKA_TOKEN, &yes, sizeof(yes) },
                { CKA_PRIVATE, &no, sizeof(no) },
                { CKA_ID, (void *)id, id_len },
                { CKA_LABEL, (void *)label, strlen(label) },
                { CKA_SUBJECT, subject.data, subject.size },
                { CKA_ISSUER, issuer.data, issuer.size },
                { CKA_VALUE, der->data, der->size },
        };
        CK_SESSION_HANDLE pool, s;
        pthread_mutex_lock(&change_lock);
        int r = rw_session(t, &pool, &s, errmsg);
        if (r == 0) {
                CK_OBJECT_HANDLE h;
                CK_RV rv = P11(t->fl, C_CreateObject, s, tmpl, sizeof(tmpl) / sizeof(tmpl[0]), &h);
                if (rv != CKR_OK) {
                        hsm_set_error(errmsg, "token %s: C_CreateObject (certificate) failed: %s", t->name,
                                      hsm_p11_rv_name(rv));
                        r = hsm_p11_errno(rv);
                }
                rw_done(t, pool, s);
        }
        pthread_mutex_unlock(&change_lock);
        gnutls_free(subject.data);
        gnutls_free(issuer.data);
        gnutls_x509_crt_deinit(crt);
        return r;
}

static int delete_certificate_gated(hsm_token *t, const gnutls_datum_t *der, char **errmsg)
{
        CK_OBJECT_CLASS cls = CKO_CERTIFICATE;
        CK_ATTRIBUTE tmpl[] = { { CKA_CLASS, &cls, sizeof(cls) }, { CKA_VALUE, der->data, der->size } };
        CK_SESSION_HANDLE pool, s;
        if (errmsg)
                *errmsg = NULL;
        pthread_mutex_lock(&change_lock);
        int r = rw_session(t, &pool, &s, errmsg);
        if (r == 0) {
                CK_OBJECT_HANDLE h[8];
                CK_ULONG count = 0;
                r = find_all(t, s, tmpl, 2, h, 8, &count);
                if (r == 0 && count == 0)
                        r = -ENOENT;
                for (CK_ULONG i = 0; r == 0 && i < count; i++) {
                        CK_RV rv = P11(t->fl, C_DestroyObject, s, h[i]);
                        if (rv != CKR_OK) {
                                hsm_set_error(errmsg, "token %s: C_DestroyObject (certificate) failed: %s", t->name,
                                              hsm_p11_rv_name(rv));
                                r = hsm_p11_errno(rv);
                        }
                }
                rw_done(t, pool, s);
        }
        pthread_mutex_unlock(&change_lock);
        return r;
}

/* The entry points above run with the module's gate held, like every token
 * operation (hsm_token_enter()): a module re-initialisation waits for them,
 * and a token that is absent, failed or locked is refused at once. */

int hsm_token_get_info(hsm_token *t, hsm_token_info *ret)
{
        int r = hsm_token_enter(t);
        if (r < 0) {
                /* Absent, failed or locked: reported as not present, from
                 * what is known without asking the module. */
                memset(ret, 0, sizeof(*ret));
                ret->slot_id = t->slot;
                pthread_mutex_lock(&t->lock);
                ret->sessions_open = t->n_open;
                ret->sessions_idle = t->n_idle;
                ret->sessions_max = t->max_sessions;
                pthread_mutex_unlock(&t->lock);
                return 0;
        }
        r = get_info_gated(t, ret);
        hsm_token_leave(t);
        return r;
}

int hsm_token_mechanisms(hsm_token *t, hsm_mech_desc **ret)
{
        int r = hsm_token_enter(t);
        if (r < 0)
                return r;
        r = mechanisms_gated(t, ret);
        hsm_token_leave(t);
        return r;
}

int hsm_token_list_keys(hsm_token *t, hsm_key_entry **ret, size_t *ret_n)
{
        int r = hsm_token_enter(t);
        if (r < 0)
                return r;
        pthread_mutex_lock(&objects_lock);
        r = list_keys_gated(t, ret, ret_n);
        pthread_mutex_unlock(&objects_lock);
        hsm_token_leave(t);
        return r;
}

/* hsm_token_enter, with the reason in *errmsg when the token cannot be used. */
static int enter_or_say(hsm_token *t, char **errmsg)
{
        int r = hsm_token_enter(t);
        if (r < 0)
                hsm_set_error(errmsg, "token %s: not available (%s)", hsm_token_name(t), strerror(-r));
        return r;
}

int hsm_token_generate_key(hsm_token *t, const hsm_keygen *g, char **errmsg)
{
        int r = enter_or_say(t, errmsg);
        if (r < 0)
                return r;
        pthread_mutex_lock(&objects_lock);
        r = generate_key_gated(t, g, errmsg);
        pthread_mutex_unlock(&objects_lock);
        hsm_token_leave(t);
        return r;
}

int hsm_token_delete_key(hsm_token *t, const uint8_t *id, size_t id_len, char **errmsg)
{
        int r = enter_or_say(t, errmsg);
        if (r < 0)
                return r;
        pthread_mutex_lock(&objects_lock);
        r = delete_key_gated(t, id, id_len, errmsg);
        pthread_mutex_unlock(&objects_lock);
        hsm_token_leave(t);
        return r;
}

int hsm_token_store_certificate(hsm_token *t, const uint8_t *id, size_t id_len, const char *label, const gnutls_datum_t *der, char **errmsg)
{
        int r = enter_or_say(t, errmsg);
        if (r < 0)
                return r;
        pthread_mutex_lock(&objects_lock);
        r = store_certificate_gated(t, id, id_len, label, der, errmsg);
        pthread_mutex_unlock(&objects_lock);
        hsm_token_leave(t);
        return r;
}

int hsm_token_delete_certificate(hsm_token *t, const gnutls_datum_t *der, char **errmsg)
{
        int r = enter_or_say(t, errmsg);
        if (r < 0)
                return r;
        pthread_mutex_lock(&objects_lock);
        r = delete_certificate_gated(t, der, errmsg);
        pthread_mutex_unlock(&objects_lock);
        hsm_token_leave(t);
        return r;
}
