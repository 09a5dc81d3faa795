/* hsm_token_derive_ticket_key (src/lib/derive.c) against SoftHSM: a
 * known-answer check (a secret key of known value made on the token with
 * C_CreateObject, the expected HKDF-Expand computed here with GnuTLS's
 * HMAC: label, NUL, context, counter), the same key and context give the
 * same bytes, another context or key other bytes, and keys that are
 * extractable, not sensitive, not allowed to sign or of another class are
 * refused. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#include "testlib.h"
#include "token-internal.h"

static test_token tt;

/* A CKK_GENERIC_SECRET of value v on the token, named label. */
static int make_secret(hsm_token *t, const char *label, const uint8_t *v, size_t len, CK_BBOOL sensitive,
                       CK_BBOOL extractable, CK_BBOOL sign)
{
        CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
        CK_KEY_TYPE kt = CKK_GENERIC_SECRET;
        CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
        /* A session object (the pool's sessions are read-only); it lives
         * while that session stays in the pool, and every session of this
         * process sees it. */
        CK_ATTRIBUTE a[] = {
                { CKA_CLASS, &cls, sizeof(cls) },
                { CKA_KEY_TYPE, &kt, sizeof(kt) },
                { CKA_TOKEN, &no, sizeof(no) },
                { CKA_PRIVATE, &yes, sizeof(yes) },
                { CKA_LABEL, (void *)label, strlen(label) },
                { CKA_VALUE, (void *)v, len },
                { CKA_SENSITIVE, &sensitive, sizeof(sensitive) },
                { CKA_EXTRACTABLE, &extractable, sizeof(extractable) },
                { CKA_SIGN, &sign, sizeof(sign) },
        };
        CK_SESSION_HANDLE s;
        int r = hsm_session_get(t, &s);
        if (r < 0)
                return r;
        CK_OBJECT_HANDLE h;
        CK_RV rv = t->fl->C_CreateObject(s, a, sizeof(a) / sizeof(a[0]), &h);
        hsm_session_put(t, s, HSM_SESSION_KEEP);
        if (rv != CKR_OK)
                printf("# C_CreateObject(%s): %s\n", label, hsm_p11_rv_name(rv));
        return rv == CKR_OK ? 0 : -EIO;
}

/* HKDF-Expand(K, info, len) with HMAC-SHA256, info = label NUL context. */
static void expected(const uint8_t *k, size_t klen, const char *context, uint8_t *out, size_t len)
{
        static const char label[] = "hsmtls session ticket master key v1";
        uint8_t in[32 + sizeof(label) + 64 + 1], t[32];
        size_t info_len = sizeof(label) + strlen(context), prev = 0, done = 0;
        for (unsigned i = 1; done < len; i++) {
                memcpy(in + prev, label, sizeof(label));
                memcpy(in + prev + sizeof(label), context, strlen(context));
                in[prev + info_len] = (uint8_t)i;
                gnutls_hmac_fast(GNUTLS_MAC_SHA256, k, klen, in, prev + info_len + 1, t);
                size_t take = len - done < 32 ? len - done : 32;
                memcpy(out + done, t, take);
                done += take;
                memcpy(in, t, 32);
                prev = 32;
        }
}

static char *uri_of(const char *object)
{
        char *u = NULL;
        if (asprintf(&u, "%s;object=%s;type=secret-key", tt.token_uri, object) < 0)
                exit(1);
        return u;
}

static int derive(hsm_token *t, const char *object, const char *context, uint8_t out[64], char **err)
{
        char *u = uri_of(object);
        free(*err);
        *err = NULL;
        int r = hsm_token_derive_ticket_key(t, u, context, out, 64, err);
        free(u);
        return r;
}

int main(void)
{
        gnutls_global_init();
        hsm_log_set_level(getenv("HSMTLS_DEBUG") ? HSM_LOG_DEBUG : HSM_LOG_ERR);
        test_token_make(&tt, false);
        char *pin_spec = NULL;
        if (asprintf(&pin_spec, "file:%s", tt.pin_file) < 0)
                return 1;
        hsm_token_config cfg = { .name = "test", .uri = tt.token_uri, .module = tt.module, .pin_source = pin_spec, .max_sessions = 2 };
        hsm_token *t = NULL;
        char *err = NULL;
        int r = hsm_token_open(&cfg, &t, &err);
        CHECK(r == 0, "token opens (%s)", err ? err : "ok");
        if (r < 0)
                return test_done();

        uint8_t kv[32];
        for (size_t i = 0; i < sizeof(kv); i++)
                kv[i] = (uint8_t)(0xa0 + i);
        CHECK(make_secret(t, "kat", kv, sizeof(kv), CK_TRUE, CK_FALSE, CK_TRUE) == 0 &&
                      make_secret(t, "extractable", kv, sizeof(kv), CK_TRUE, CK_TRUE, CK_TRUE) == 0 &&
                      make_secret(t, "plain", kv, sizeof(kv), CK_FALSE, CK_FALSE, CK_TRUE) == 0 &&
                      make_secret(t, "nosign", kv, sizeof(kv), CK_TRUE, CK_FALSE, CK_FALSE) == 0,
              "secret keys of a known value made on the token");

        uint8_t a[64], b[64], want[64];
        r = derive(t, "kat", "web", a, &err);
        expected(kv, sizeof(kv), "web", want, sizeof(want));
        CHECK(r == 0 && memcmp(a, want, 64) == 0,
              "known answer: HKDF-Expand(HMAC-SHA256 on the token, label NUL 'web') (%s)", err ? err : "ok");
        r = derive(t, "kat", "web", b, &err);
        CHECK(r == 0 && memcmp(a, b, 64) == 0, "the same key and context: the same 64 bytes");
        r = derive(t, "kat", "web2", b, &err);
        expected(kv, sizeof(kv), "web2", want, sizeof(want));
        CHECK(r == 0 && memcmp(a, b, 64) != 0 && memcmp(b, want, 64) == 0, "another context (listener name): other bytes, as expected");
        r = derive(t, "ticket-a", "web", a, &err);
        int r2 = derive(t, "ticket-b", "web", b, &err);
        CHECK(r == 0 && r2 == 0 && memcmp(a, b, 64) != 0, "provision's ticket-a and ticket-b: both derive, other bytes (%s)",
              err ? err : "ok");

        r = derive(t, "extractable", "web", a, &err);
        CHECK(r == -EPERM && err && strstr(err, "extractable"), "an extractable key is refused (%d: %s)", r, err ? err : "");
        CHECK(memcmp(a, (uint8_t[64]){ 0 }, 64) == 0, "and the output is wiped");
        r = derive(t, "plain", "web", a, &err);
        CHECK(r == -EPERM && err && strstr(err, "not sensitive"), "a key that is not sensitive is refused (%d: %s)", r, err ? err : "");
        r = derive(t, "nosign", "web", a, &err);
        CHECK(r == -EPERM && err && strstr(err, "may not sign"), "a key that may not sign is refused (%d: %s)", r, err ? err : "");
        r = derive(t, "nosuch", "web", a, &err);
        CHECK(r == -ENOENT, "no such key: -ENOENT (%s)", err ? err : "");
        free(err);
        err = NULL;
        r = hsm_token_derive_ticket_key(t, tt.key[TK_P256], "web", a, 64, &err);
        CHECK(r == -EINVAL && err && strstr(err, "secret-key"), "a private key URI is refused (%s)", err ? err : "");
        free(err);

        hsm_token_unref(t);
        free(pin_spec);
        test_token_cleanup(&tt);
        return test_done();
}
