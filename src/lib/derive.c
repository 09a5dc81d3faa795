/* Session-ticket master keys derived on the token (hsmtls.h,
 * hsm_token_derive_ticket_key): HKDF-Expand (RFC 5869) with HMAC-SHA256,
 * each HMAC computed by the token (CKM_SHA256_HMAC) under a secret key that
 * never leaves it. Runs at start, so its recovery is simple: a lost
 * session or login is redone once, anything else fails. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/gnutls.h>
#include <p11-kit/uri.h>

#include "log.h"
#include "token-internal.h"

/* The fixed, versioned label: a new derivation gets a new label, so keys
 * of one scheme never equal keys of another. */
#define TICKET_LABEL "hsmtls session ticket master key v1"
#define HMAC_LEN 32

struct derive_ctx {
        CK_ATTRIBUTE *match;
        CK_ULONG n_match;
        const uint8_t *info;
        size_t info_len;
        uint8_t *out;
        size_t out_len;
        int r; /* a refusal that is no CK_RV (no such key, not sensitive, ...) */
        const char *uri;
        char **errmsg;
        int in_op;
};

static CK_RV read_bool(CK_FUNCTION_LIST *fl, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE h, CK_ATTRIBUTE_TYPE type,
                       CK_BBOOL *ret)
{
        CK_ATTRIBUTE a = { type, ret, sizeof(*ret) };
        return P11(fl, C_GetAttributeValue, s, h, &a, 1);
}

static CK_RV derive_work(hsm_token *t, CK_SESSION_HANDLE s, struct derive_ctx *d)
{
        CK_FUNCTION_LIST *fl = t->fl;
        CK_OBJECT_HANDLE found[2];
        CK_ULONG n = 0;
        CK_RV rv = P11(fl, C_FindObjectsInit, s, d->match, d->n_match);
        if (rv != CKR_OK)
                return rv;
        rv = P11(fl, C_FindObjects, s, found, 2, &n);
        CK_RV rf = P11(fl, C_FindObjectsFinal, s);
        if (rv != CKR_OK)
                return rv;
        if (rf != CKR_OK)
                return rf;
        if (n != 1) {
                d->r = n == 0 ? -ENOENT : -ENOTUNIQ;
                hsm_set_error(d->errmsg, n == 0 ? "ticket_key %s: no secret key on token %s matches the URI"
                                                : "ticket_key %s: more than one secret key on token %s matches the URI; add id=",
                              d->uri, t->name);
                return CKR_OK;
        }
        CK_OBJECT_HANDLE h = found[0];
        CK_KEY_TYPE kt = 0;
        CK_ATTRIBUTE a = { CKA_KEY_TYPE, &kt, sizeof(kt) };
        CK_BBOOL sensitive = CK_FALSE, extractable = CK_TRUE, sign = CK_FALSE;
        if ((rv = P11(fl, C_GetAttributeValue, s, h, &a, 1)) != CKR_OK ||
            (rv = read_bool(fl, s, h, CKA_SENSITIVE, &sensitive)) != CKR_OK ||
            (rv = read_bool(fl, s, h, CKA_EXTRACTABLE, &extractable)) != CKR_OK ||
            (rv = read_bool(fl, s, h, CKA_SIGN, &sign)) != CKR_OK)
                return rv;
        const char *why = kt != CKK_GENERIC_SECRET && kt != CKK_SHA256_HMAC ? "is not a generic secret or SHA-256 HMAC key"
                          : !sensitive                                     ? "is not sensitive (CKA_SENSITIVE false)"
                          : extractable                                    ? "is extractable (CKA_EXTRACTABLE true)"
                          : !sign                                          ? "may not sign (CKA_SIGN false)"
                                                                           : NULL;
        if (why) {
                d->r = -EPERM;
                hsm_set_error(d->errmsg, "ticket_key %s: the key %s", d->uri, why);
                return CKR_OK;
        }
        /* T(i) = HMAC(K, T(i-1) || info || i), out = T(1) || T(2) || ... */
        size_t in_cap = HMAC_LEN + d->info_len + 1, done = 0, prev = 0;
        uint8_t *in = malloc(in_cap), t_i[HMAC_LEN];
        if (!in) {
                d->r = -ENOMEM;
                return CKR_OK;
        }
        CK_MECHANISM mech = { CKM_SHA256_HMAC, NULL, 0 };
        for (unsigned i = 1; done < d->out_len; i++) {
                memcpy(in + prev, d->info, d->info_len);
                in[prev + d->info_len] = (uint8_t)i;
                rv = P11(fl, C_SignInit, s, &mech, h);
                if (rv != CKR_OK)
                        break;
                CK_ULONG len = sizeof(t_i);
                rv = P11(fl, C_Sign, s, in, (CK_ULONG)(prev + d->info_len + 1), t_i, &len);
                if (rv == CKR_BUFFER_TOO_SMALL)
                        d->in_op = 1; /* left active: the session is closed */
                if (rv != CKR_OK)
                        break;
                if (len != HMAC_LEN) {
                        rv = CKR_FUNCTION_FAILED;
                        break;
                }
                size_t take = d->out_len - done < HMAC_LEN ? d->out_len - done : HMAC_LEN;
                memcpy(d->out + done, t_i, take);
                done += take;
                memcpy(in, t_i, HMAC_LEN);
                prev = HMAC_LEN;
        }
        gnutls_memset(t_i, 0, sizeof(t_i));
        gnutls_memset(in, 0, in_cap);
        free(in);
        return rv;
}

int hsm_token_derive_ticket_key(hsm_token *t, const char *key_uri, const char *context, uint8_t *out, size_t out_len,
                                char **errmsg)
{
        if (errmsg)
                *errmsg = NULL;
        if (out_len == 0 || out_len > 255 * HMAC_LEN || !context)
                return -EINVAL;
        P11KitUri *uri = p11_kit_uri_new();
        CK_ATTRIBUTE *match = NULL;
        CK_ULONG n_match = 0;
        uint8_t *info = NULL;
        size_t info_len = sizeof(TICKET_LABEL) + strlen(context); /* the label's NUL separates it from context */
        int r;
        if (!uri)
                return -ENOMEM;
        int ur = p11_kit_uri_parse(key_uri, P11_KIT_URI_FOR_OBJECT_ON_TOKEN_AND_MODULE, uri);
        if (ur != P11_KIT_URI_OK) {
                hsm_set_error(errmsg, "ticket_key %.*s: invalid pkcs11: URI: %s", hsm_uri_shown_len(key_uri), key_uri,
                              p11_kit_uri_message(ur)); /* never the query: a PIN may be there */
                r = -EINVAL;
                goto out;
        }
        if (p11_kit_uri_get_pin_value(uri)) {
                hsm_set_error(errmsg, "ticket_key %.*s?...: pin-value= in a URI is refused; use a PIN source", hsm_uri_shown_len(key_uri),
                              key_uri);
                r = -EINVAL;
                goto out;
        }
        CK_TOKEN_INFO tinfo;
        if (P11(t->fl, C_GetTokenInfo, t->slot, &tinfo) != CKR_OK || !p11_kit_uri_match_token_info(uri, &tinfo)) {
                hsm_set_error(errmsg, "ticket_key %s: the URI names another token than %s", key_uri, t->name);
                r = -ENODEV;
                goto out;
        }
        CK_ULONG n_attrs = 0;
        CK_ATTRIBUTE *attrs = p11_kit_uri_get_attributes(uri, &n_attrs);
        static CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
        int has_selector = 0;
        match = calloc(n_attrs + 1, sizeof(*match));
        if (!match) {
                r = -ENOMEM;
                goto out;
        }
        for (CK_ULONG i = 0; i < n_attrs; i++) {
                if (attrs[i].type == CKA_CLASS) {
                        if (attrs[i].ulValueLen != sizeof(CK_OBJECT_CLASS) || *(CK_OBJECT_CLASS *)attrs[i].pValue != CKO_SECRET_KEY) {
                                hsm_set_error(errmsg, "ticket_key %s: the URI names an object of another type than type=secret-key", key_uri);
                                r = -EINVAL;
                                goto out;
                        }
                        continue;
                }
                if (attrs[i].type == CKA_LABEL || attrs[i].type == CKA_ID)
                        has_selector = 1;
                match[n_match++] = attrs[i]; /* points into uri, alive until the end */
        }
        match[n_match++] = (CK_ATTRIBUTE){ CKA_CLASS, &secret, sizeof(secret) };
        if (!has_selector) {
                hsm_set_error(errmsg, "ticket_key %s: the URI must name the key with object= or id=", key_uri);
                r = -EINVAL;
                goto out;
        }
        if (!hsm_token_has_mech(t, CKM_SHA256_HMAC, CKF_SIGN)) {
                hsm_set_error(errmsg, "ticket_key %s: token %s does not offer CKM_SHA256_HMAC", key_uri, t->name);
                r = -EOPNOTSUPP;
                goto out;
        }
        info = malloc(info_len);
        if (!info) {
                r = -ENOMEM;
                goto out;
        }
        memcpy(info, TICKET_LABEL, sizeof(TICKET_LABEL));
        memcpy(info + sizeof(TICKET_LABEL), context, strlen(context));

        struct derive_ctx d = { match, n_match, info, info_len, out, out_len, 0, key_uri, errmsg, 0 };
        for (int attempt = 0;; attempt++) {
                CK_SESSION_HANDLE s;
                r = hsm_session_get(t, &s);
                if (r < 0) {
                        hsm_set_error(errmsg, "ticket_key %s: no session on token %s: %s", key_uri, t->name, strerror(-r));
                        goto out;
                }
                d.r = 0;
                d.in_op = 0;
                CK_RV rv = derive_work(t, s, &d);
                if (rv == CKR_OK) {
                        hsm_session_put(t, s, HSM_SESSION_KEEP);
                        r = d.r;
                        break;
                }
                enum hsm_p11_action act = hsm_p11_action(rv);
                if (act == HSM_P11_SESSION_LOST || act == HSM_P11_TOKEN_GONE) {
                        hsm_session_put(t, s, HSM_SESSION_DROP_ALL);
                } else if (act == HSM_P11_LOGIN_LOST && attempt == 0) {
                        r = hsm_token_relogin(t, s);
                        hsm_session_put(t, s, HSM_SESSION_KEEP);
                        if (r < 0)
                                act = HSM_P11_FAIL;
                } else
                        hsm_session_put(t, s, d.in_op || act == HSM_P11_SESSION_BUSY ? HSM_SESSION_CLOSE : HSM_SESSION_KEEP);
                if (attempt == 0 && (act == HSM_P11_SESSION_LOST || act == HSM_P11_LOGIN_LOST))
                        continue;
                r = hsm_p11_errno(rv);
                hsm_set_error(errmsg, "ticket_key %s: deriving on token %s failed: %s", key_uri, t->name, hsm_p11_rv_name(rv));
                break;
        }
out:
        if (r < 0)
                gnutls_memset(out, 0, out_len);
        if (info) {
                gnutls_memset(info, 0, info_len);
                free(info);
        }
        free(match);
        p11_kit_uri_free(uri);
        return r;
}
