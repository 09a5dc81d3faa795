/* Who is asking: a bearer token (only its SHA-256 is configured; compared
 * in constant time against every configured hash) or a client certificate
 * from the admin CA whose subject is a configured identity (401 for no
 * credential or one that does not verify, 403 for a verified certificate
 * whose subject has no role). */
#include "internal.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <gnutls/crypto.h>
#include <gnutls/x509.h>

#include "log.h"

int admin_digest_differs(const uint8_t a[32], const uint8_t b[32])
{
        volatile uint8_t d = 0;
        for (int i = 0; i < 32; i++)
                d |= a[i] ^ b[i];
        return d != 0;
}

static int refuse(struct req *r, const char *field, const char *reason)
{
        r->action = "auth.refused";
        return req_error(r, 401, "unauthorized", field, "%s", reason), -1;
}

static int from_bearer(struct req *r, const char *value)
{
        if (strncasecmp(value, "Bearer ", 7) != 0)
                return refuse(r, "Authorization", "only Bearer tokens are accepted");
        const char *tok = value + 7;
        while (*tok == ' ')
                tok++;
        if (!*tok)
                return refuse(r, "Authorization", "empty bearer token");
        uint8_t h[32];
        if (gnutls_hash_fast(GNUTLS_DIG_SHA256, tok, strlen(tok), h) < 0)
                return refuse(r, "Authorization", "cannot hash the token");
        const hsm_conf_admin *ac = &r->a->conf->admin;
        int found = -1;
        /* Every hash is compared, whichever matches: the time does not say
         * which one (or whether one) did. */
        for (unsigned i = 0; i < ac->n_tokens; i++) {
                int differs = admin_digest_differs(h, ac->tokens[i].sha256);
                found = differs ? found : (int)i;
        }
        gnutls_memset(h, 0, sizeof(h));
        if (found < 0)
                return refuse(r, "Authorization", "the bearer token is not accepted");
        snprintf(r->who, sizeof(r->who), "token:%s", ac->tokens[found].name);
        r->role = ac->tokens[found].role;
        r->auth = "bearer";
        return 0;
}

/* The verified client certificate's subject, when the connection is TLS and
 * the admin CA is configured. 1: an identity was found; 0: no certificate;
 * -1: refused (error set). */
static int from_certificate(struct req *r)
{
        const hsm_conf_admin *ac = &r->a->conf->admin;
        if (!ac->client_ca)
                return 0;
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_GNUTLS_SESSION);
        if (!ci || !ci->tls_session)
                return 0;
        gnutls_session_t s = ci->tls_session;
        unsigned n = 0;
        const gnutls_datum_t *certs = gnutls_certificate_get_peers(s, &n);
        if (!certs || n == 0)
                return 0;
        unsigned status = 0;
        /* Issued by the admin CA, valid now, and meant for TLS clients (an
         * extended key usage without clientAuth is refused, as listeners do). */
        gnutls_typed_vdata_st purpose = { .type = GNUTLS_DT_KEY_PURPOSE_OID, .data = (unsigned char *)GNUTLS_KP_TLS_WWW_CLIENT };
        if (gnutls_certificate_verify_peers(s, &purpose, 1, &status) < 0 || status != 0) {
                snprintf(r->who, sizeof(r->who), "cert:(not verified)");
                return refuse(r, NULL, "the client certificate is not issued by the admin CA, not valid now, or not for TLS clients");
        }
        gnutls_x509_crt_t crt;
        gnutls_datum_t dn = { NULL, 0 };
        if (gnutls_x509_crt_init(&crt) < 0)
                return refuse(r, NULL, "cannot read the client certificate");
        int g = gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER);
        if (g >= 0)
                g = gnutls_x509_crt_get_dn3(crt, &dn, 0);
        gnutls_x509_crt_deinit(crt);
        if (g < 0)
                return refuse(r, NULL, "cannot read the client certificate's subject");
        snprintf(r->who, sizeof(r->who), "cert:%.*s", (int)dn.size, (const char *)dn.data);
        for (unsigned i = 0; i < ac->n_identities; i++)
                if (strlen(ac->identities[i].subject) == dn.size &&
                    memcmp(ac->identities[i].subject, dn.data, dn.size) == 0) {
                        r->role = ac->identities[i].role;
                        r->auth = "certificate";
                        gnutls_free(dn.data);
                        return 1;
                }
        /* Verified, so the daemon knows who this is, but no identity
         * line gives the subject a role: 403, not 401 (another credential
         * would not help; the certificate is the identity). */
        r->action = "auth.refused";
        req_error(r, 403, "forbidden", NULL,
                  "the client certificate's subject %.*s is no configured identity ([admin] identity = ROLE:SUBJECT)",
                  (int)(dn.size > 200 ? 200 : dn.size), (const char *)dn.data);
        gnutls_free(dn.data);
        return -1;
}

int admin_authenticate(struct req *r)
{
        int c = from_certificate(r);
        if (c < 0)
                return -1;
        if (c > 0)
                return 0;
        const char *h = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
        if (!h)
                return refuse(r, "Authorization", "no credential (a bearer token or a client certificate)");
        return from_bearer(r, h);
}
