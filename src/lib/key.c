/* Keys on a token: lookup by URI, cached handles, sign and decrypt with
 * recovery (a broken session is reopened, a lost login redone, a stale
 * handle looked up again: once, before the operation fails). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/crypto.h>
#include <p11-kit/uri.h>

#include "log.h"
#include "privkey.h"
#include "token-internal.h"

struct hsm_key {
        unsigned refs;
        hsm_token *token;
        char *label;
        char *uri;
        CK_ATTRIBUTE *match; /* the URI's attributes plus CKA_CLASS, to look the key up again */
        CK_ULONG n_match;
        pthread_mutex_t find_lock; /* guards handle, handle_epoch, found, stale */
        CK_OBJECT_HANDLE handle;
        unsigned handle_epoch; /* the token's login epoch when handle was found */
        bool found, stale;
        bool registered; /* in its token's list of keys (for the recovery) */
        CK_BYTE *id;
        CK_ULONG id_len;
        enum hsm_key_type type;
        enum hsm_curve curve;
        unsigned bits;
        unsigned flags;
        size_t sig_size;
        hsm_usage *usage;
        CK_MECHANISM_TYPE *allowed; /* CKA_ALLOWED_MECHANISMS, NULL when the key has none (all allowed) */
        CK_ULONG n_allowed;
        uint8_t rejection_secret[32]; /* random, per key: the synthetic premasters of implicit rejection */
        hsm_rate_bucket rate;         /* the token's key_ops_per_second, for this key */
        hsm_key_public opened_pub;    /* the public value when the key was found: the recovery requires it again */
        bool opened_pub_known;
};

/* Attribute reads. C_GetAttributeValue answers per attribute: a length of
 * CK_UNAVAILABLE_INFORMATION means the value cannot be had (sensitive,
 * not on this object), whatever the CK_RV says; such an answer is never
 * used as a length. */

/* Reads a variable-length attribute into a new buffer. An unavailable
 * value is CKR_ATTRIBUTE_TYPE_INVALID (or the CK_RV the token gave). */
static CK_RV read_attr(hsm_token *t, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_TYPE type, CK_BYTE **ret,
                       CK_ULONG *ret_len)
{
        CK_ATTRIBUTE a = { type, NULL, 0 };
        CK_RV rv = P11(t->fl, C_GetAttributeValue, s, o, &a, 1);
        if (rv != CKR_OK)
                return rv;
        if (a.ulValueLen == CK_UNAVAILABLE_INFORMATION)
                return CKR_ATTRIBUTE_TYPE_INVALID;
        CK_ULONG cap = a.ulValueLen;
        a.pValue = malloc(cap ? cap : 1);
        if (!a.pValue)
                return CKR_HOST_MEMORY;
        rv = P11(t->fl, C_GetAttributeValue, s, o, &a, 1);
        if (rv == CKR_OK && (a.ulValueLen == CK_UNAVAILABLE_INFORMATION || a.ulValueLen > cap))
                rv = CKR_ATTRIBUTE_TYPE_INVALID;
        if (rv != CKR_OK) {
                free(a.pValue);
                return rv;
        }
        *ret = a.pValue;
        *ret_len = a.ulValueLen;
        return CKR_OK;
}

/* Reads a fixed-size attribute; anything but exactly size bytes is
 * CKR_ATTRIBUTE_TYPE_INVALID. */
static CK_RV read_fixed(hsm_token *t, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_TYPE type, void *buf,
                        CK_ULONG size)
{
        CK_ATTRIBUTE a = { type, buf, size };
        CK_RV rv = P11(t->fl, C_GetAttributeValue, s, o, &a, 1);
        if (rv == CKR_OK && a.ulValueLen != size)
                rv = CKR_ATTRIBUTE_TYPE_INVALID;
        return rv;
}

static int get_bool(hsm_token *t, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_TYPE type)
{
        CK_BBOOL v = CK_FALSE;
        if (read_fixed(t, s, o, type, &v, sizeof(v)) != CKR_OK)
                return 0;
        return v == CK_TRUE;
}

/* Finds the key's object. Returns 0, -ENOENT (none), -ENOTUNIQ (more than
 * one), or a failing call's errno code with *ret_rv set to its CK_RV
 * (*ret_rv is CKR_OK otherwise). */
static int lookup_handle(hsm_key *k, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE *ret, CK_RV *ret_rv)
{
        hsm_token *t = k->token;
        CK_OBJECT_HANDLE found[2];
        CK_ULONG count = 0;
        CK_RV rv = P11(t->fl, C_FindObjectsInit, s, k->match, k->n_match);
        if (rv == CKR_OK) {
                rv = P11(t->fl, C_FindObjects, s, found, 2, &count);
                P11(t->fl, C_FindObjectsFinal, s);
        }
        *ret_rv = rv;
        if (rv != CKR_OK)
                return hsm_p11_errno(rv);
        if (count == 0)
                return -ENOENT;
        if (count > 1)
                return -ENOTUNIQ;
        *ret = found[0];
        return 0;
}

static const CK_BYTE oid_p256[] = { 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07 };
static const CK_BYTE oid_p384[] = { 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22 };
static const CK_BYTE oid_p521[] = { 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23 };
static const CK_BYTE oid_ed25519[] = { 0x06, 0x03, 0x2b, 0x65, 0x70 };
static const CK_BYTE str_ed25519[] = { 0x13, 0x0c, 'e', 'd', 'w', 'a', 'r', 'd', 's', '2', '5', '5', '1', '9' };

static enum hsm_curve curve_from_params(const CK_BYTE *p, CK_ULONG n)
{
#define IS(x) (n == sizeof(x) && memcmp(p, x, n) == 0)
        if (IS(oid_p256)) return HSM_CURVE_P256;
        if (IS(oid_p384)) return HSM_CURVE_P384;
        if (IS(oid_p521)) return HSM_CURVE_P521;
        if (IS(oid_ed25519) || IS(str_ed25519)) return HSM_CURVE_ED25519;
#undef IS
        return HSM_CURVE_NONE;
}

/* Reads what the key is. Returns CKR_OK, or the CK_RV of a failing call
 * (*r is then its errno code), or CKR_GENERAL_ERROR with *r set for a key
 * that cannot be used; *errmsg says why. */
static CK_RV describe_key(hsm_key *k, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE h, int *r, char **errmsg)
{
        hsm_token *t = k->token;
        CK_KEY_TYPE kt = (CK_KEY_TYPE)-1;
        CK_BYTE *buf = NULL;
        CK_ULONG len = 0;
        CK_RV rv = read_fixed(t, s, h, CKA_KEY_TYPE, &kt, sizeof(kt));
        if (rv != CKR_OK) {
                hsm_set_error(errmsg, "key %s: cannot read its type: %s", k->uri, hsm_p11_rv_name(rv));
                goto fail;
        }
        if (kt == CKK_RSA) {
                k->type = HSM_KEY_RSA;
                rv = read_attr(t, s, h, CKA_MODULUS, &buf, &len);
                if (rv != CKR_OK) {
                        hsm_set_error(errmsg, "key %s: cannot read the RSA modulus: %s", k->uri, hsm_p11_rv_name(rv));
                        goto fail;
                }
                CK_ULONG i = 0;
                while (i < len && buf[i] == 0)
                        i++;
                k->sig_size = len - i;
                k->bits = (unsigned)(len - i) * 8;
                if (i < len)
                        for (CK_BYTE b = buf[i]; !(b & 0x80); b <<= 1)
                                k->bits--;
                free(buf);
                /* The premaster and padding code needs at least 64 bytes,
                 * and nothing under 2048 bits is a key to serve with. */
                if (k->bits < 2048) {
                        hsm_set_error(errmsg, "key %s: RSA key of %u bits (at least 2048 are needed)", k->uri, k->bits);
                        *r = -EOPNOTSUPP;
                        return CKR_GENERAL_ERROR;
                }
        } else if (kt == CKK_EC || kt == CKK_EC_EDWARDS) {
                rv = read_attr(t, s, h, CKA_EC_PARAMS, &buf, &len);
                if (rv != CKR_OK) {
                        hsm_set_error(errmsg, "key %s: cannot read its EC parameters: %s", k->uri, hsm_p11_rv_name(rv));
                        goto fail;
                }
                k->curve = curve_from_params(buf, len);
                free(buf);
                switch (k->curve) {
                case HSM_CURVE_P256: k->bits = 256; k->sig_size = 64; break;
                case HSM_CURVE_P384: k->bits = 384; k->sig_size = 96; break;
                case HSM_CURVE_P521: k->bits = 521; k->sig_size = 132; break;
                case HSM_CURVE_ED25519: k->bits = 256; k->sig_size = 64; break;
                default:
                        hsm_set_error(errmsg, "key %s: unsupported elliptic curve", k->uri);
                        *r = -EOPNOTSUPP;
                        return CKR_GENERAL_ERROR;
                }
                k->type = k->curve == HSM_CURVE_ED25519 ? HSM_KEY_ED25519 : HSM_KEY_ECDSA;
                if ((kt == CKK_EC_EDWARDS) != (k->type == HSM_KEY_ED25519)) {
                        hsm_set_error(errmsg, "key %s: key type and curve disagree", k->uri);
                        *r = -EINVAL;
                        return CKR_GENERAL_ERROR;
                }
        } else {
                hsm_set_error(errmsg, "key %s: unsupported key type 0x%lx (RSA, EC and EC_EDWARDS keys are supported)", k->uri,
                        (unsigned long)kt);
                *r = -EOPNOTSUPP;
                return CKR_GENERAL_ERROR;
        }

        static const struct { CK_ATTRIBUTE_TYPE a; unsigned flag; } bools[] = {
                { CKA_SENSITIVE, HSM_KEY_SENSITIVE },
                { CKA_EXTRACTABLE, HSM_KEY_EXTRACTABLE },
                { CKA_ALWAYS_SENSITIVE, HSM_KEY_ALWAYS_SENSITIVE },
                { CKA_NEVER_EXTRACTABLE, HSM_KEY_NEVER_EXTRACTABLE },
                { CKA_ALWAYS_AUTHENTICATE, HSM_KEY_ALWAYS_AUTHENTICATE },
                { CKA_SIGN, HSM_KEY_CAN_SIGN },
                { CKA_DECRYPT, HSM_KEY_CAN_DECRYPT },
        };
        for (size_t i = 0; i < sizeof(bools) / sizeof(bools[0]); i++)
                if (get_bool(t, s, h, bools[i].a))
                        k->flags |= bools[i].flag;

        if (read_attr(t, s, h, CKA_LABEL, &buf, &len) == CKR_OK) {
                k->label = strndup((char *)buf, len);
                free(buf);
        }
        if (read_attr(t, s, h, CKA_ID, &k->id, &k->id_len) != CKR_OK) {
                k->id = NULL;
                k->id_len = 0;
        }
        if (read_attr(t, s, h, CKA_ALLOWED_MECHANISMS, &buf, &len) == CKR_OK) {
                if (len >= sizeof(CK_MECHANISM_TYPE)) {
                        k->allowed = (CK_MECHANISM_TYPE *)buf;
                        k->n_allowed = len / sizeof(CK_MECHANISM_TYPE);
                } else
                        free(buf);
        }
        if (!k->label)
                k->label = strdup("");
        return CKR_OK;
fail:
        *r = hsm_p11_errno(rv);
        return rv;
}

struct describe_ctx {
        int r;
        char **errmsg;
};

static CK_RV describe_work(hsm_key *k, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE h, void *p, int *in_op)
{
        struct describe_ctx *c = p;
        (void)in_op;
        /* A retry (after a lost session) starts from nothing. */
        free(k->label);
        free(k->id);
        k->label = NULL;
        k->id = NULL;
        k->id_len = 0;
        k->flags = 0;
        if (c->errmsg) {
                free(*c->errmsg);
                *c->errmsg = NULL;
        }
        c->r = 0;
        CK_RV rv = describe_key(k, s, h, &c->r, c->errmsg);
        /* A key this code cannot use (its type, curve or size) is no
         * failure of the token: CKR_OK, with c->r saying why, so that the
         * token's state and health are not touched. */
        if (rv == CKR_GENERAL_ERROR && c->r < 0 && c->r != -EIO)
                return CKR_OK;
        return rv;
}

typedef CK_RV (*token_work)(hsm_key *k, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE h, void *ctx, int *in_op);
static int with_session(hsm_key *k, token_work work, void *ctx, int *reached, enum hsm_reason *why);
static CK_RV public_work(hsm_key *k, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE h, void *p, int *in_op);

void hsm_key_template_free(CK_ATTRIBUTE *match, CK_ULONG n)
{
        for (CK_ULONG i = 0; match && i < n; i++)
                free(match[i].pValue);
        free(match);
}

int hsm_key_uri_template(const char *uri_str, struct p11_kit_uri **ret_uri, CK_ATTRIBUTE **ret_match, CK_ULONG *ret_n,
                         char **errmsg)
{
        P11KitUri *uri = p11_kit_uri_new();
        CK_ATTRIBUTE *match = NULL;
        CK_ULONG n_match = 0;
        int r;

        if (!uri)
                return -ENOMEM;
        int ur = p11_kit_uri_parse(uri_str, P11_KIT_URI_FOR_OBJECT_ON_TOKEN_AND_MODULE, uri);
        if (ur != P11_KIT_URI_OK) {
                hsm_set_error(errmsg, "key %.*s: invalid pkcs11: URI: %s", hsm_uri_shown_len(uri_str), uri_str,
                              p11_kit_uri_message(ur)); /* never the query: a PIN may be there */
                r = -EINVAL;
                goto fail;
        }
        if (p11_kit_uri_get_pin_value(uri)) {
                hsm_set_error(errmsg, "key %.*s?...: pin-value= in a URI is refused; use a PIN source", hsm_uri_shown_len(uri_str),
                              uri_str);
                r = -EINVAL;
                goto fail;
        }
        CK_ULONG n_attrs = 0;
        CK_ATTRIBUTE *attrs = p11_kit_uri_get_attributes(uri, &n_attrs);
        int has_class = 0, has_selector = 0;
        for (CK_ULONG i = 0; i < n_attrs; i++) {
                if (attrs[i].type == CKA_CLASS) {
                        has_class = 1;
                        if (attrs[i].ulValueLen != sizeof(CK_OBJECT_CLASS) ||
                            *(CK_OBJECT_CLASS *)attrs[i].pValue != CKO_PRIVATE_KEY) {
                                hsm_set_error(errmsg, "key %s: the URI names an object of another type than type=private", uri_str);
                                r = -EINVAL;
                                goto fail;
                        }
                } else if (attrs[i].type == CKA_LABEL || attrs[i].type == CKA_ID)
                        has_selector = 1;
        }
        if (!has_selector) {
                hsm_set_error(errmsg, "key %s: the URI must name the key with object= or id=", uri_str);
                r = -EINVAL;
                goto fail;
        }
        match = calloc(n_attrs + 1, sizeof(CK_ATTRIBUTE));
        if (!match) {
                r = -ENOMEM;
                goto fail;
        }
        for (CK_ULONG i = 0; i < n_attrs; i++) {
                match[i].type = attrs[i].type;
                match[i].ulValueLen = attrs[i].ulValueLen;
                match[i].pValue = malloc(attrs[i].ulValueLen ? attrs[i].ulValueLen : 1);
                if (!match[i].pValue) {
                        r = -ENOMEM;
                        goto fail;
                }
                n_match = i + 1;
                if (attrs[i].ulValueLen)
                        memcpy(match[i].pValue, attrs[i].pValue, attrs[i].ulValueLen);
        }
        if (!has_class) {
                CK_OBJECT_CLASS *c = malloc(sizeof(*c));
                if (!c) {
                        r = -ENOMEM;
                        goto fail;
                }
                *c = CKO_PRIVATE_KEY;
                match[n_match++] = (CK_ATTRIBUTE){ CKA_CLASS, c, sizeof(*c) };
        }
        *ret_uri = uri;
        *ret_match = match;
        *ret_n = n_match;
        return 0;
fail:
        hsm_key_template_free(match, n_match);
        p11_kit_uri_free(uri);
        return r;
}

int hsm_token_find_key(hsm_token *t, const char *uri_str, hsm_key **ret, char **errmsg)
{
        P11KitUri *uri = NULL;
        hsm_key *k = NULL;
        CK_ATTRIBUTE *match = NULL;
        CK_ULONG n_match = 0;
        int r;

        if (errmsg)
                *errmsg = NULL;
        r = hsm_key_uri_template(uri_str, &uri, &match, &n_match, errmsg);
        if (r < 0)
                return r;
        CK_TOKEN_INFO tinfo;
        if ((r = hsm_token_enter(t)) < 0) {
                char *why = NULL;
                hsm_token_state(t, &why);
                hsm_set_error(errmsg, "key %s: token %s is %s (%s)", uri_str, t->name, hsm_token_state_name(hsm_token_state(t, NULL)),
                              why ? why : "");
                free(why);
                goto out;
        }
        CK_RV trv = P11(t->fl, C_GetTokenInfo, t->slot, &tinfo);
        hsm_token_leave(t);
        if (trv != CKR_OK || !p11_kit_uri_match_token_info(uri, &tinfo)) {
                hsm_set_error(errmsg, "key %s: the URI names another token than %s ('%s')", uri_str, t->name, hsm_token_label(t));
                r = -ENODEV;
                goto out;
        }

        k = calloc(1, sizeof(*k));
        if (!k) {
                r = -ENOMEM;
                goto out;
        }
        k->refs = 1;
        k->token = hsm_token_ref(t);
        pthread_mutex_init(&k->find_lock, NULL);
        pthread_mutex_init(&k->rate.lock, NULL);
        k->uri = strdup(uri_str);
        k->usage = hsm_usage_new();
        k->match = match;
        k->n_match = n_match;
        match = NULL;
        if (!k->uri || !k->usage) {
                r = -ENOMEM;
                goto out;
        }

        /* The lookup and the description go through with_session(): the
         * same recovery and the same CK_RV classification as every
         * operation. */
        struct describe_ctx dc = { 0, errmsg };
        r = with_session(k, describe_work, &dc, NULL, NULL);
        if (dc.r < 0)
                r = dc.r;
        if (r == -ENOENT && !(errmsg && *errmsg)) {
                hsm_set_error(errmsg, "key %s: no private key on token %s matches the URI", uri_str, t->name);
                goto out;
        }
        if (r == -ENOTUNIQ) {
                hsm_set_error(errmsg, "key %s: more than one private key on token %s matches the URI; add id=", uri_str, t->name);
                goto out;
        }
        if (r < 0) {
                if (!(errmsg && *errmsg))
                        hsm_set_error(errmsg, "key %s: search on token %s failed: %s", uri_str, t->name, strerror(-r));
                goto out;
        }
        if (gnutls_rnd(GNUTLS_RND_KEY, k->rejection_secret, sizeof(k->rejection_secret)) < 0) {
                hsm_set_error(errmsg, "key %s: no random bytes for its RSA implicit rejection secret", uri_str);
                r = -EIO;
                goto out;
        }
        if (!(k->flags & HSM_KEY_CAN_SIGN)) {
                hsm_set_error(errmsg, "key %s: the key may not sign (CKA_SIGN is false)", uri_str);
                r = -EPERM;
                goto out;
        }
        /* What the recovery compares a key found again with. A key without
         * a readable public value is refused by the recovery; one whose read
         * failed here gets it from the next successful read
         * (hsm_key_get_public(): the certificate check that follows). */
        k->opened_pub_known = with_session(k, public_work, &k->opened_pub, NULL, NULL) >= 0;
        if (!k->opened_pub_known)
                hsm_key_public_done(&k->opened_pub);
        r = hsm_token_add_key(t, k);
        if (r < 0)
                goto out;
        k->registered = true;
        *ret = k;
        k = NULL;
        r = 0;
out:
        hsm_key_unref(k);
        hsm_key_template_free(match, n_match);
        p11_kit_uri_free(uri);
        return r;
}

hsm_key *hsm_key_ref(hsm_key *k)
{
        if (k)
                __atomic_add_fetch(&k->refs, 1, __ATOMIC_RELAXED);
        return k;
}

void hsm_key_unref(hsm_key *k)
{
        if (!k || __atomic_sub_fetch(&k->refs, 1, __ATOMIC_ACQ_REL) > 0)
                return;
        if (k->registered)
                hsm_token_remove_key(k->token, k);
        hsm_key_template_free(k->match, k->n_match);
        pthread_mutex_destroy(&k->find_lock);
        pthread_mutex_destroy(&k->rate.lock);
        hsm_usage_free(k->usage);
        hsm_token_unref(k->token);
        free(k->label);
        free(k->uri);
        free(k->id);
        free(k->allowed);
        hsm_key_public_done(&k->opened_pub);
        gnutls_memset(k->rejection_secret, 0, sizeof(k->rejection_secret));
        free(k);
}

hsm_token *hsm_key_token(const hsm_key *k) { return k->token; }
const char *hsm_key_label(const hsm_key *k) { return k->label; }
const char *hsm_key_uri(const hsm_key *k) { return k->uri; }
enum hsm_key_type hsm_key_type(const hsm_key *k) { return k->type; }
enum hsm_curve hsm_key_curve(const hsm_key *k) { return k->curve; }
unsigned hsm_key_bits(const hsm_key *k) { return k->bits; }
unsigned hsm_key_flags(const hsm_key *k) { return k->flags; }
size_t hsm_key_signature_size(const hsm_key *k) { return k->sig_size; }
hsm_usage *hsm_key_usage(hsm_key *k) { return k->usage; }

static CK_MECHANISM_TYPE mech_type(enum hsm_mech m)
{
        switch (m) {
        case HSM_MECH_RSA_PKCS: return CKM_RSA_PKCS;
        case HSM_MECH_RSA_PKCS_PSS: return CKM_RSA_PKCS_PSS;
        case HSM_MECH_ECDSA: return CKM_ECDSA;
        case HSM_MECH_EDDSA: return CKM_EDDSA;
        case HSM_MECH_RSA_X_509: return CKM_RSA_X_509;
        default: return CKM_VENDOR_DEFINED;
        }
}

/* The token offers mechanism m to decrypt, and the key allows it. */
static bool decrypt_allowed(const hsm_key *k, CK_MECHANISM_TYPE m)
{
        if (k->type != HSM_KEY_RSA || !(k->flags & HSM_KEY_CAN_DECRYPT) || !hsm_token_has_mech(k->token, m, CKF_DECRYPT))
                return false;
        if (!k->allowed)
                return true;
        for (CK_ULONG i = 0; i < k->n_allowed; i++)
                if (k->allowed[i] == m)
                        return true;
        return false;
}

bool hsm_key_can_decrypt_raw(const hsm_key *k) { return decrypt_allowed(k, CKM_RSA_X_509); }

bool hsm_key_can_decrypt(const hsm_key *k)
{
        return decrypt_allowed(k, CKM_RSA_X_509) || decrypt_allowed(k, CKM_RSA_PKCS);
}

bool hsm_key_supports(const hsm_key *k, enum hsm_mech m)
{
        switch (m) {
        case HSM_MECH_RSA_PKCS:
        case HSM_MECH_RSA_PKCS_PSS:
                if (k->type != HSM_KEY_RSA)
                        return false;
                break;
        case HSM_MECH_ECDSA:
                if (k->type != HSM_KEY_ECDSA)
                        return false;
                break;
        case HSM_MECH_EDDSA:
                if (k->type != HSM_KEY_ED25519)
                        return false;
                break;
        case HSM_MECH_RSA_X_509: /* decryption only */
        default:
                return false;
        }
        return hsm_token_has_mech(k->token, mech_type(m), CKF_SIGN);
}

/* The key's handle for the current login. A handle found before the last
 * login may name another object now (a token may renumber its objects at
 * login; SoftHSM does), so then, or when it was found stale, the key is
 * looked up again on s first. Returns lookup_handle()'s answer; *ret_epoch
 * is the login epoch the handle belongs to. */
static int key_handle(hsm_key *k, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE *ret, unsigned *ret_epoch, CK_RV *ret_rv)
{
        hsm_token *t = k->token;
        int r = 0;
        *ret_rv = CKR_OK;
        pthread_mutex_lock(&k->find_lock);
        unsigned epoch = hsm_token_login_epoch(t);
        if (!k->found || k->stale || k->handle_epoch != epoch) {
                CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
                r = lookup_handle(k, s, &h, ret_rv);
                if (r >= 0) {
                        if (k->found) {
                                pthread_mutex_lock(&t->lock);
                                t->stats.handles_refreshed++;
                                pthread_mutex_unlock(&t->lock);
                        }
                        k->handle = h;
                        k->handle_epoch = epoch;
                        k->found = true;
                        k->stale = false;
                }
        }
        *ret = k->handle;
        *ret_epoch = k->handle_epoch;
        pthread_mutex_unlock(&k->find_lock);
        return r;
}

static void mark_stale(hsm_key *k, CK_OBJECT_HANDLE h)
{
        pthread_mutex_lock(&k->find_lock);
        if (k->handle == h)
                k->stale = true;
        pthread_mutex_unlock(&k->find_lock);
}

/* One unit of work on a session: returns the CK_RV of the failing call.
 * *in_op is OP_ENDED when the failure came from the final C_Sign/C_Decrypt
 * (which per PKCS#11 ends the operation and leaves the session usable), and
 * OP_LEFT_ACTIVE when an operation was started and not finished (that
 * session is closed then, alone). A failed C_*Init leaves nothing active. */
enum { OP_NONE = 0, OP_ENDED = 1, OP_LEFT_ACTIVE = 2 };

/* Runs work with recovery, each kind at most once, as hsm_p11_action()
 * classifies the failure: a lost session drops the pool's sessions and is
 * reopened (the login redone), a lost login is redone, a stale handle is
 * looked up again, a session with an unknown operation active is closed
 * and another one tried. Every other failure fails the operation and keeps
 * the session and the login. */
static int with_session_gated(hsm_key *k, token_work work, void *ctx, int *reached, enum hsm_reason *why);

/* The failure r (< 0), and why it happened for the usage counters (*why,
 * when why is not NULL). The reasons are listed in hsmtls.h. */
static int failed(enum hsm_reason *why, enum hsm_reason reason, int r)
{
        if (why)
                *why = reason;
        return r;
}

/* The reason of a failure the token answered with rv, once the recovery
 * (a new session, login or lookup) did not help or did not apply. */
static enum hsm_reason reason_of_rv(CK_RV rv)
{
        switch (rv) {
        case CKR_DEVICE_REMOVED: case CKR_TOKEN_NOT_PRESENT: case CKR_TOKEN_NOT_RECOGNIZED: case CKR_SLOT_ID_INVALID:
                return HSM_REASON_ABSENT;
        case CKR_CRYPTOKI_NOT_INITIALIZED:
                return HSM_REASON_FAILED;
        case CKR_USER_NOT_LOGGED_IN: case CKR_PIN_INCORRECT: case CKR_PIN_INVALID: case CKR_PIN_LEN_RANGE:
        case CKR_PIN_EXPIRED: case CKR_PIN_LOCKED: case CKR_USER_PIN_NOT_INITIALIZED:
                return HSM_REASON_LOGIN;
        case CKR_SESSION_HANDLE_INVALID: case CKR_SESSION_CLOSED: case CKR_SESSION_COUNT: case CKR_OPERATION_ACTIVE:
                return HSM_REASON_SESSION;
        case CKR_KEY_HANDLE_INVALID: case CKR_OBJECT_HANDLE_INVALID:
                return HSM_REASON_KEY;
        case CKR_MECHANISM_INVALID: case CKR_MECHANISM_PARAM_INVALID: case CKR_KEY_TYPE_INCONSISTENT:
        case CKR_KEY_FUNCTION_NOT_PERMITTED: case CKR_FUNCTION_NOT_SUPPORTED:
                return HSM_REASON_MECHANISM;
        default:
                return HSM_REASON_TOKEN_ERROR;
        }
}

/* An absent, failed or locked token fails the operation at once; otherwise
 * the operation runs with the module's gate held (see hsm_token_enter()). */
static int with_session(hsm_key *k, token_work work, void *ctx, int *reached, enum hsm_reason *why)
{
        int r = hsm_token_enter(k->token);
        if (r < 0)
                return failed(why, r == -ENODEV ? HSM_REASON_ABSENT : r == -EACCES || r == -EPERM ? HSM_REASON_LOGIN
                                                                                                     : HSM_REASON_FAILED,
                              r);
        r = with_session_gated(k, work, ctx, reached, why);
        hsm_token_leave(k->token);
        return r;
}

/* A signature or decryption: within the key's rate, then a turn of the
 * token's admission (shed at once past its queue or deadline). *why says
 * why it failed, or HSM_REASON_NONE: it succeeded. */
static int with_turn(hsm_key *k, token_work work, void *ctx, enum hsm_reason *why)
{
        *why = HSM_REASON_NONE;
        int r = hsm_admit_rate(k->token, &k->rate);
        if (r < 0)
                return failed(why, HSM_REASON_RATE, r);
        hsm_admit_ticket tk;
        if ((r = hsm_admit_enter(k->token, &tk)) < 0)
                return failed(why, r == -ETIMEDOUT ? HSM_REASON_DEADLINE : HSM_REASON_QUEUE, r);
        r = with_session(k, work, ctx, NULL, why);
        hsm_admit_leave(k->token, &tk);
        if (r < 0 && *why == HSM_REASON_NONE)
                *why = HSM_REASON_TOKEN_ERROR; /* every failure has a reason */
        if (r >= 0) {
                /* Past the caller's deadline (a hung or slow token), the
                 * answer comes too late: its handshake has been failed. */
                hsm_token_watch *w = hsm_token_current_watch();
                uint64_t dl = w ? __atomic_load_n(&w->deadline_ns, __ATOMIC_RELAXED) : 0;
                if (dl && hsm_now_ns() > dl)
                        *why = HSM_REASON_LATE;
        }
        return r;
}

static int with_session_gated(hsm_key *k, token_work work, void *ctx, int *reached, enum hsm_reason *why)
{
        hsm_token *t = k->token;
        int r = -EIO;
        unsigned done = 0; /* recovery kinds already used */
        enum { REOPENED = 1, RELOGGED = 2, REFOUND = 4, REPLACED = 8 };

        for (;;) {
                CK_SESSION_HANDLE s;
                uint64_t w0 = hsm_now_ns();
                r = hsm_session_get(t, &s);
                hsm_usage_wait(k->usage, hsm_now_ns() - w0); /* usage: time waiting for a session */
                if (r < 0)
                        return failed(why,
                                      r == -ETIMEDOUT                ? HSM_REASON_DEADLINE
                                      : r == -ENODEV || r == -EKEYREJECTED ? HSM_REASON_ABSENT /* or another token in its place */
                                      : r == -EACCES || r == -EPERM ? HSM_REASON_LOGIN
                                                                     : HSM_REASON_SESSION,
                                      r);
                CK_OBJECT_HANDLE h;
                unsigned epoch;
                CK_RV rv;
                int in_op = OP_NONE;
                r = key_handle(k, s, &h, &epoch, &rv);
                if (r < 0 && rv == CKR_OK) {
                        /* no such key, or more than one */
                        hsm_session_put(t, s, HSM_SESSION_KEEP);
                        return failed(why, HSM_REASON_KEY, r);
                }
                if (r >= 0) {
                        rv = work(k, s, h, ctx, &in_op);
                        if (reached)
                                *reached = in_op == OP_ENDED || rv == CKR_OK;
                        /* A login while it ran may have renumbered the
                         * objects: then h may have named another object. */
                        if (rv == CKR_OK && hsm_token_login_epoch(t) != epoch)
                                rv = CKR_OBJECT_HANDLE_INVALID;
                }
                if (rv == CKR_OK) {
                        hsm_session_put(t, s, HSM_SESSION_KEEP);
                        hsm_token_note_ok(t);
                        return 0;
                }
                r = hsm_p11_errno(rv);
                /* The token's state: gone, a failed module, a device error. */
                hsm_token_note(t, rv);
                /* A failed C_Sign/C_Decrypt ended its operation; a started
                 * one that was not finished (or CKR_BUFFER_TOO_SMALL, which
                 * leaves it active) closes this session, alone. */
                int put = in_op == OP_LEFT_ACTIVE || rv == CKR_BUFFER_TOO_SMALL ? HSM_SESSION_CLOSE : HSM_SESSION_KEEP;
                switch (hsm_p11_action(rv)) {
                case HSM_P11_SESSION_LOST:
                        hsm_session_put(t, s, HSM_SESSION_DROP_ALL);
                        if (done & REOPENED)
                                return failed(why, HSM_REASON_SESSION, r);
                        done |= REOPENED;
                        hsm_info("token %s: session lost (%s), reopening", t->name, hsm_p11_rv_name(rv));
                        continue;
                case HSM_P11_TOKEN_GONE:
                        /* logged once, by the change of state */
                        hsm_debug("token %s: %s; dropping its sessions", t->name, hsm_p11_rv_name(rv));
                        hsm_session_put(t, s, HSM_SESSION_DROP_ALL);
                        return failed(why, HSM_REASON_ABSENT, r);
                case HSM_P11_LOGIN_LOST:
                        if (done & RELOGGED) {
                                hsm_session_put(t, s, put);
                                return failed(why, HSM_REASON_LOGIN, r);
                        }
                        done |= RELOGGED;
                        hsm_info("token %s: login lost, logging in again", t->name);
                        r = hsm_token_relogin(t, s);
                        hsm_session_put(t, s, put);
                        if (r < 0) /* -EKEYREJECTED: another token in its place, now absent */
                                return failed(why, r == -EKEYREJECTED ? HSM_REASON_ABSENT : HSM_REASON_LOGIN, r);
                        continue;
                case HSM_P11_STALE_HANDLE:
                        hsm_session_put(t, s, put);
                        if (done & REFOUND)
                                return failed(why, HSM_REASON_KEY, r);
                        done |= REFOUND;
                        hsm_info("token %s: handle of key '%s' went stale, looking it up again", t->name,
                                 k->label ? k->label : k->uri);
                        mark_stale(k, h);
                        continue;
                case HSM_P11_SESSION_BUSY:
                        hsm_session_put(t, s, HSM_SESSION_CLOSE);
                        if (done & REPLACED)
                                return failed(why, HSM_REASON_SESSION, r);
                        done |= REPLACED;
                        hsm_info("token %s: a session had an operation active (%s); closed it, trying another", t->name,
                                 hsm_p11_rv_name(rv));
                        continue;
                case HSM_P11_FAIL:
                default:
                        hsm_session_put(t, s, put);
                        return failed(why, reason_of_rv(rv), r);
                }
        }
}

struct op_ctx {
        enum hsm_op op;
        CK_MECHANISM *mech;
        const uint8_t *in;
        size_t in_len;
        uint8_t *out;
        size_t *out_len;
};

/* After C_SignInit/C_DecryptInit: the context-specific login of a key
 * marked CKA_ALWAYS_AUTHENTICATE. On failure the operation stays active,
 * and with_session() closes this session. */
static CK_RV context_login(hsm_key *k, CK_SESSION_HANDLE s, int *in_op)
{
        if (!(k->flags & HSM_KEY_ALWAYS_AUTHENTICATE))
                return CKR_OK;
        CK_RV rv = hsm_token_context_login(k->token, s);
        if (rv != CKR_OK)
                *in_op = OP_LEFT_ACTIVE;
        return rv;
}

static CK_RV op_work(hsm_key *k, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE h, void *p, int *in_op)
{
        struct op_ctx *c = p;
        CK_FUNCTION_LIST *fl = k->token->fl;
        CK_RV rv = c->op == HSM_OP_SIGN ? P11(fl, C_SignInit, s, c->mech, h) : P11(fl, C_DecryptInit, s, c->mech, h);
        if (rv != CKR_OK)
                return rv;
        if ((rv = context_login(k, s, in_op)) != CKR_OK)
                return rv;
        CK_ULONG len = (CK_ULONG)*c->out_len;
        rv = c->op == HSM_OP_SIGN ? P11(fl, C_Sign, s, (CK_BYTE_PTR)c->in, (CK_ULONG)c->in_len, c->out, &len)
                                  : P11(fl, C_Decrypt, s, (CK_BYTE_PTR)c->in, (CK_ULONG)c->in_len, c->out, &len);
        *in_op = OP_ENDED;
        /* The length is the token's word: anything but the key's signature
         * size (RSA: the modulus; ECDSA: r || s; Ed25519: 64) is a broken
         * answer, never a length to read the buffer by. */
        if (rv == CKR_OK && len != k->sig_size) {
                hsm_err("token %s: C_Sign with key '%s' answered a signature of %lu bytes, not %zu; the signature is refused",
                        k->token->name, k->label ? k->label : k->uri, (unsigned long)len, k->sig_size);
                rv = CKR_FUNCTION_FAILED;
        }
        if (rv == CKR_OK)
                *c->out_len = len;
        return rv;
}

static CK_MECHANISM_TYPE hash_mech(enum hsm_hash h, CK_ULONG *mgf, CK_ULONG *len)
{
        switch (h) {
        case HSM_HASH_SHA384: *mgf = CKG_MGF1_SHA384; *len = 48; return CKM_SHA384;
        case HSM_HASH_SHA512: *mgf = CKG_MGF1_SHA512; *len = 64; return CKM_SHA512;
        default: *mgf = CKG_MGF1_SHA256; *len = 32; return CKM_SHA256;
        }
}

int hsm_key_sign(hsm_key *k, enum hsm_mech m, enum hsm_hash h, const uint8_t *in, size_t in_len, uint8_t *out,
                 size_t *out_len)
{
        CK_RSA_PKCS_PSS_PARAMS pss;
        CK_MECHANISM mech = { mech_type(m), NULL, 0 };
        if (m == HSM_MECH_RSA_PKCS_PSS) {
                pss.hashAlg = hash_mech(h, &pss.mgf, &pss.sLen);
                mech.pParameter = &pss;
                mech.ulParameterLen = sizeof(pss);
        }
        if (*out_len < k->sig_size)
                return -ENOBUFS;
        if (!hsm_key_supports(k, m))
                return -EOPNOTSUPP;
        struct op_ctx ctx = { HSM_OP_SIGN, &mech, in, in_len, out, out_len };
        uint64_t t0 = hsm_now_ns();
        enum hsm_reason why;
        int r = with_turn(k, op_work, &ctx, &why);
        hsm_usage_record(k->usage, HSM_OP_SIGN, m, why, hsm_now_ns() - t0);
        return r;
}

/* Decryption. The answer of C_Decrypt depends on the ciphertext, which the
 * peer chose: it is kept as data (ctx->answer) and never reaches the
 * recovery logic of with_session() (no reopen, no new login, no dropped
 * pool, no retry, no trace line, whatever CK_RV the token uses for a bad
 * padding). Only C_DecryptInit, which does not see the ciphertext, can fail
 * the unit of work. */
struct decrypt_ctx {
        CK_MECHANISM *mech;
        const uint8_t *in;
        size_t in_len;
        uint8_t *out;
        size_t out_cap;
        CK_ULONG out_len;
        CK_RV answer;
};

static CK_RV decrypt_work(hsm_key *k, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE h, void *p, int *in_op)
{
        struct decrypt_ctx *c = p;
        CK_FUNCTION_LIST *fl = k->token->fl;
        CK_RV rv = P11(fl, C_DecryptInit, s, c->mech, h);
        if (rv != CKR_OK)
                return rv;
        if ((rv = context_login(k, s, in_op)) != CKR_OK)
                return rv;
        CK_ULONG len = (CK_ULONG)c->out_cap;
        c->answer = P11_SECRET(fl, C_Decrypt, s, (CK_BYTE_PTR)c->in, (CK_ULONG)c->in_len, c->out, &len);
        c->out_len = len;
        *in_op = OP_ENDED;
        return CKR_OK;
}

/* All ones if x is 0, else 0; no branch. */
static uint64_t mask_is_zero64(uint64_t x)
{
        uint64_t m = (x | (0 - x)) >> 63; /* 1 if x != 0 */
        __asm__("" : "+r"(m));
        return m - 1;
}

int hsm_key_decrypt(hsm_key *k, enum hsm_mech m, const uint8_t *in, size_t in_len, uint8_t *out, size_t *out_len,
                    uint32_t *ret_ok)
{
        if (k->type != HSM_KEY_RSA || (m != HSM_MECH_RSA_PKCS && m != HSM_MECH_RSA_X_509))
                return -EOPNOTSUPP;
        if (*out_len < k->sig_size)
                return -ENOBUFS;
        CK_MECHANISM mech = { mech_type(m), NULL, 0 };
        struct decrypt_ctx ctx = { &mech, in, in_len, out, *out_len, 0, CKR_GENERAL_ERROR };
        uint64_t t0 = hsm_now_ns();
        enum hsm_reason why;
        int r = with_turn(k, decrypt_work, &ctx, &why);
        /* Whatever C_Decrypt answered counts as ok: the counters are no
         * padding oracle. Only failing to reach C_Decrypt (or an answer
         * past the deadline, whatever it was) is an error. */
        hsm_usage_record(k->usage, HSM_OP_DECRYPT, m, why, hsm_now_ns() - t0);
        if (r < 0)
                return r;
        uint64_t ok = mask_is_zero64((uint64_t)ctx.answer);
        /* a length beyond the buffer is a broken token: treat it as a failed answer */
        ok &= mask_is_zero64((uint64_t)(ctx.out_len > *out_len));
        *out_len = (size_t)(ctx.out_len & ok);
        *ret_ok = (uint32_t)ok;
        return 0;
}

void hsm_key_synthetic_premaster(const hsm_key *k, const uint8_t *in, size_t in_len, uint8_t out[48])
{
        /* HMAC-SHA384 gives the 48 bytes at once. It does not fail for a
         * built-in MAC; if it ever did, random bytes are as unguessable
         * (only no longer the same for the same ciphertext). */
        if (gnutls_hmac_fast(GNUTLS_MAC_SHA384, k->rejection_secret, sizeof(k->rejection_secret), in, in_len, out) < 0)
                gnutls_rnd(GNUTLS_RND_NONCE, out, 48);
}

static CK_RV public_work(hsm_key *k, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE h, void *p, int *in_op)
{
        hsm_token *t = k->token;
        hsm_key_public *pk = p;
        CK_ULONG n;
        CK_RV rv;
        hsm_key_public_done(pk);
#define GET(o, a, field)                                                               \
        do {                                                                           \
                CK_BYTE *v_ = NULL;                                                    \
                if ((rv = read_attr(t, s, o, a, &v_, &n)) != CKR_OK)                   \
                        return rv;                                                     \
                pk->field = v_;                                                        \
                pk->field##_len = n;                                                   \
        } while (0)
        if (k->type == HSM_KEY_RSA) {
                GET(h, CKA_MODULUS, modulus);
                GET(h, CKA_PUBLIC_EXPONENT, exponent);
                return CKR_OK;
        }
        GET(h, CKA_EC_PARAMS, ec_params);
        /* The point lives on the public key object with the same CKA_ID. */
        CK_OBJECT_CLASS cls = CKO_PUBLIC_KEY;
        CK_ATTRIBUTE tmpl[2] = { { CKA_CLASS, &cls, sizeof(cls) }, { CKA_ID, k->id, k->id_len } };
        if (!k->id)
                tmpl[1] = (CK_ATTRIBUTE){ CKA_LABEL, k->label, strlen(k->label) };
        CK_OBJECT_HANDLE pub[2];
        CK_ULONG count = 0;
        if ((rv = P11(t->fl, C_FindObjectsInit, s, tmpl, 2)) != CKR_OK)
                return rv;
        rv = P11(t->fl, C_FindObjects, s, pub, 2, &count);
        P11(t->fl, C_FindObjectsFinal, s);
        if (rv != CKR_OK)
                return rv;
        if (count == 0)
                return CKR_ATTRIBUTE_TYPE_INVALID;
        GET(pub[0], CKA_EC_POINT, ec_point);
        if (count > 1) {
                /* Two public keys under that id: the key's point is known
                 * only if they agree (else a certificate could be matched
                 * against another key's point). */
                CK_BYTE *other = NULL;
                CK_ULONG other_len = 0;
                if ((rv = read_attr(t, s, pub[1], CKA_EC_POINT, &other, &other_len)) != CKR_OK)
                        return rv;
                bool same = other_len == pk->ec_point_len && memcmp(other, pk->ec_point, other_len) == 0;
                free(other);
                if (!same)
                        return CKR_ATTRIBUTE_TYPE_INVALID;
        }
#undef GET
        return CKR_OK;
}

static int copy_public(hsm_key_public *to, const hsm_key_public *from)
{
        hsm_key_public c = { 0 };
#define DUP(field)                                                                               \
        do {                                                                                     \
                if (from->field && !(c.field = malloc(from->field##_len ? from->field##_len : 1))) { \
                        hsm_key_public_done(&c);                                                 \
                        return -ENOMEM;                                                          \
                }                                                                                \
                if (from->field)                                                                 \
                        memcpy(c.field, from->field, from->field##_len);                         \
                c.field##_len = from->field##_len;                                               \
        } while (0)
        DUP(modulus);
        DUP(exponent);
        DUP(ec_params);
        DUP(ec_point);
#undef DUP
        *to = c;
        return 0;
}

int hsm_key_get_public(hsm_key *k, hsm_key_public *ret)
{
        hsm_key_public p = { 0 };
        int r = with_session(k, public_work, &p, NULL, NULL);
        if (r < 0) {
                hsm_key_public_done(&p);
                return r;
        }
        /* A one-off failure of the read at the find: this value is the one
         * the recovery requires from now (the pool's sessions are on the
         * token that was opened: each checks it when it is opened). */
        pthread_mutex_lock(&k->find_lock);
        if (!k->opened_pub_known && copy_public(&k->opened_pub, &p) == 0)
                k->opened_pub_known = true;
        pthread_mutex_unlock(&k->find_lock);
        *ret = p;
        return 0;
}

void hsm_key_public_done(hsm_key_public *p)
{
        free(p->modulus);
        free(p->exponent);
        free(p->ec_params);
        free(p->ec_point);
        memset(p, 0, sizeof(*p));
}

/* ------------------------------------------------------------ recovery */

unsigned hsm_key_refs(const hsm_key *k) { return __atomic_load_n(&k->refs, __ATOMIC_ACQUIRE); }

hsm_key *hsm_key_tryref(hsm_key *k)
{
        unsigned n = __atomic_load_n(&k->refs, __ATOMIC_RELAXED);
        do {
                if (n == 0)
                        return NULL; /* being freed */
        } while (!__atomic_compare_exchange_n(&k->refs, &n, n + 1, true, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED));
        return k;
}

static bool same_bytes(const uint8_t *a, size_t na, const uint8_t *b, size_t nb)
{
        return na == nb && (na == 0 || memcmp(a, b, na) == 0);
}

/* The public value of the key's object h on s is the one it had when the key
 * was found: 0, -EKEYREJECTED (another key, or none known then), or the
 * failing read's errno code. */
static int same_public(hsm_key *k, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE h)
{
        hsm_key_public now = { 0 };
        int in_op = OP_NONE;
        if (!k->opened_pub_known)
                return -EKEYREJECTED;
        CK_RV rv = public_work(k, s, h, &now, &in_op);
        int r = hsm_p11_errno(rv);
        if (rv == CKR_OK) {
                const hsm_key_public *o = &k->opened_pub;
                bool same = same_bytes(now.modulus, now.modulus_len, o->modulus, o->modulus_len) &&
                            same_bytes(now.exponent, now.exponent_len, o->exponent, o->exponent_len) &&
                            same_bytes(now.ec_params, now.ec_params_len, o->ec_params, o->ec_params_len) &&
                            same_bytes(now.ec_point, now.ec_point_len, o->ec_point, o->ec_point_len);
                r = same ? 0 : -EKEYREJECTED;
        }
        hsm_key_public_done(&now);
        return r;
}

int hsm_key_refind(hsm_key *k, CK_SESSION_HANDLE s)
{
        hsm_token *t = k->token;
        CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
        CK_RV rv;
        pthread_mutex_lock(&k->find_lock);
        unsigned epoch = hsm_token_login_epoch(t);
        int r = lookup_handle(k, s, &h, &rv);
        if (r >= 0)
                r = same_public(k, s, h);
        if (r >= 0) {
                k->handle = h;
                k->handle_epoch = epoch;
                k->found = true;
                k->stale = false;
        }
        pthread_mutex_unlock(&k->find_lock);
        if (r >= 0) {
                pthread_mutex_lock(&t->lock);
                t->stats.handles_refreshed++;
                pthread_mutex_unlock(&t->lock);
        }
        return r;
}

/* One signature on session s with the handle that hsm_key_refind() found,
 * verified with the public key the key had when it was found: 0, -EBADMSG
 * (no signature of that key), -EOPNOTSUPP for a key that cannot be tried so
 * (it needs a context-specific login, or may not sign). RSA: PKCS#1 v1.5 of
 * a SHA-256 DigestInfo; ECDSA: the hash of the curve's size; Ed25519: the
 * text itself. */
int hsm_key_test_sign(hsm_key *k, CK_SESSION_HANDLE s)
{
        static const char text[] = "hsmtls recovery test signature";
        static const uint8_t sha256_info[19] = { 0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01,
                                                 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20 };
        hsm_token *t = k->token;
        uint8_t in[19 + 64], sig[1024];
        size_t in_len;
        CK_ULONG len = sizeof(sig);
        CK_MECHANISM mech = { CKM_ECDSA, NULL, 0 };
        gnutls_digest_algorithm_t dig = GNUTLS_DIG_SHA256;
        gnutls_sign_algorithm_t algo = GNUTLS_SIGN_ECDSA_SHA256;

        if ((k->flags & HSM_KEY_ALWAYS_AUTHENTICATE) || !(k->flags & HSM_KEY_CAN_SIGN) || k->sig_size > sizeof(sig))
                return -EOPNOTSUPP;
        if (k->type == HSM_KEY_RSA) {
                mech.mechanism = CKM_RSA_PKCS;
                algo = GNUTLS_SIGN_RSA_SHA256;
        } else if (k->type == HSM_KEY_ED25519) {
                mech.mechanism = CKM_EDDSA;
                algo = GNUTLS_SIGN_EDDSA_ED25519;
        } else if (k->curve == HSM_CURVE_P384) {
                dig = GNUTLS_DIG_SHA384;
                algo = GNUTLS_SIGN_ECDSA_SHA384;
        } else if (k->curve == HSM_CURVE_P521) {
                dig = GNUTLS_DIG_SHA512;
                algo = GNUTLS_SIGN_ECDSA_SHA512;
        }
        if (!hsm_token_has_mech(t, mech.mechanism, CKF_SIGN))
                return -EOPNOTSUPP;
        /* what the token signs: the DigestInfo, the hash, or the text */
        gnutls_datum_t hash = { in, gnutls_hash_get_len(dig) };
        if (k->type == HSM_KEY_RSA) {
                memcpy(in, sha256_info, sizeof(sha256_info));
                hash.data = in + sizeof(sha256_info);
                in_len = sizeof(sha256_info) + hash.size;
        } else
                in_len = hash.size;
        if (k->type == HSM_KEY_ED25519) {
                memcpy(in, text, sizeof(text) - 1);
                in_len = sizeof(text) - 1;
        } else if (gnutls_hash_fast(dig, text, sizeof(text) - 1, hash.data) < 0)
                return -EIO;

        pthread_mutex_lock(&k->find_lock);
        CK_OBJECT_HANDLE h = k->handle;
        pthread_mutex_unlock(&k->find_lock);
        CK_RV rv = P11(t->fl, C_SignInit, s, &mech, h);
        if (rv == CKR_OK)
                rv = P11(t->fl, C_Sign, s, (CK_BYTE_PTR)in, (CK_ULONG)in_len, sig, &len);
        if (rv != CKR_OK)
                return hsm_p11_errno(rv);
        if (len != k->sig_size)
                return -EBADMSG;

        gnutls_pubkey_t pub = NULL;
        int r = hsm_pubkey_from_public(k->type, &k->opened_pub, &pub);
        if (r < 0)
                return r == -ENOMEM ? r : -EBADMSG;
        gnutls_datum_t raw = { sig, (unsigned)len }, der = { NULL, 0 };
        if (k->type == HSM_KEY_ED25519) {
                gnutls_datum_t msg = { in, (unsigned)in_len };
                r = gnutls_pubkey_verify_data2(pub, algo, 0, &msg, &raw);
        } else if (k->type == HSM_KEY_RSA)
                r = gnutls_pubkey_verify_hash2(pub, algo, 0, &hash, &raw);
        else {
                gnutls_datum_t rr = { sig, (unsigned)len / 2 }, ss = { sig + len / 2, (unsigned)len / 2 };
                r = gnutls_encode_rs_value(&der, &rr, &ss);
                if (r >= 0)
                        r = gnutls_pubkey_verify_hash2(pub, algo, 0, &hash, &der);
                gnutls_free(der.data);
        }
        gnutls_pubkey_deinit(pub);
        return r < 0 ? -EBADMSG : 0;
}

/* The start-up test signature: the same fixed-message signature as the
 * recovery's, through the session pool and its recovery (with_session()),
 * not counted in the key's usage. */
static CK_RV self_test_work(hsm_key *k, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE h, void *p, int *in_op)
{
        static const uint8_t msg[32] = "hsmtls start-up test signature";
        uint8_t sig[1024];
        CK_ULONG len = sizeof(sig);
        CK_RV rv = P11(k->token->fl, C_SignInit, s, (CK_MECHANISM *)p, h);
        if (rv != CKR_OK)
                return rv;
        rv = P11(k->token->fl, C_Sign, s, (CK_BYTE_PTR)msg, sizeof(msg), sig, &len);
        *in_op = OP_ENDED;
        return rv;
}

int hsm_key_self_test(hsm_key *k)
{
        CK_MECHANISM mech = { CKM_ECDSA, NULL, 0 };
        if ((k->flags & HSM_KEY_ALWAYS_AUTHENTICATE) || !(k->flags & HSM_KEY_CAN_SIGN) || k->sig_size > 1024)
                return -EOPNOTSUPP;
        if (k->type == HSM_KEY_RSA)
                mech.mechanism = CKM_RSA_PKCS;
        else if (k->type == HSM_KEY_ED25519)
                mech.mechanism = CKM_EDDSA;
        if (!hsm_token_has_mech(k->token, mech.mechanism, CKF_SIGN))
                return -EOPNOTSUPP;
        return with_session(k, self_test_work, &mech, NULL, NULL);
}
