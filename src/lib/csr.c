/* PKCS#10 requests signed on the token (keyadmin.h): GnuTLS builds the
 * request, the key's gnutls_privkey_t (hsm_privkey_import) signs it. */
#include "keyadmin.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

static int add_sans(gnutls_x509_crq_t crq, const char *const *list, gnutls_x509_subject_alt_name_t type,
                    const char *field, const char **ret_field, char **errmsg)
{
        for (size_t i = 0; list && list[i]; i++) {
                const char *v = list[i];
                unsigned char ip[16];
                const void *data = v;
                size_t len = strlen(v);
                if (len == 0) {
                        *ret_field = field;
                        hsm_set_error(errmsg, "an empty %s name", field);
                        return -EINVAL;
                }
                if (type == GNUTLS_SAN_IPADDRESS) {
                        if (inet_pton(AF_INET, v, ip) == 1)
                                len = 4;
                        else if (inet_pton(AF_INET6, v, ip) == 1)
                                len = 16;
                        else {
                                *ret_field = field;
                                hsm_set_error(errmsg, "'%s' is not an IPv4 or IPv6 address", v);
                                return -EINVAL;
                        }
                        data = ip;
                } else if (type == GNUTLS_SAN_RFC822NAME && !strchr(v, '@')) {
                        *ret_field = field;
                        hsm_set_error(errmsg, "'%s' is not an email address", v);
                        return -EINVAL;
                } else if (type == GNUTLS_SAN_URI && !strchr(v, ':')) {
                        *ret_field = field;
                        hsm_set_error(errmsg, "'%s' is not a URI (no scheme)", v);
                        return -EINVAL;
                } else if (type == GNUTLS_SAN_DNSNAME) {
                        for (const char *p = v; *p; p++)
                                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                                      *p == '-' || *p == '.' || *p == '*')) {
                                        *ret_field = field;
                                        hsm_set_error(errmsg, "'%s' is not a DNS name", v);
                                        return -EINVAL;
                                }
                }
                int g = gnutls_x509_crq_set_subject_alt_name(crq, type, data, (unsigned)len, GNUTLS_FSAN_APPEND);
                if (g < 0) {
                        *ret_field = field;
                        hsm_set_error(errmsg, "'%s': %s", v, gnutls_strerror(g));
                        return -EINVAL;
                }
        }
        return 0;
}

int hsm_key_make_csr(hsm_key *k, const hsm_csr_request *req, char **ret_pem, const char **ret_field, char **errmsg)
{
        gnutls_x509_crq_t crq = NULL;
        gnutls_pubkey_t pub = NULL;
        gnutls_privkey_t priv = NULL;
        gnutls_datum_t pem = { NULL, 0 };
        const char *field = NULL, *bad = NULL;
        int r = -EIO, g;

        if (errmsg)
                *errmsg = NULL;
        if ((g = gnutls_x509_crq_init(&crq)) < 0)
                goto gfail;
        if (!req->subject || !*req->subject) {
                field = "subject";
                hsm_set_error(errmsg, "the subject is empty");
                r = -EINVAL;
                goto out;
        }
        if ((g = gnutls_x509_crq_set_dn(crq, req->subject, &bad)) < 0) {
                field = "subject";
                hsm_set_error(errmsg, "'%s' is not a distinguished name (%s%s%s)", req->subject, gnutls_strerror(g),
                              bad ? " at: " : "", bad ? bad : "");
                r = -EINVAL;
                goto out;
        }
        if ((r = add_sans(crq, req->dns, GNUTLS_SAN_DNSNAME, "dns", &field, errmsg)) < 0 ||
            (r = add_sans(crq, req->ip, GNUTLS_SAN_IPADDRESS, "ip", &field, errmsg)) < 0 ||
            (r = add_sans(crq, req->email, GNUTLS_SAN_RFC822NAME, "email", &field, errmsg)) < 0 ||
            (r = add_sans(crq, req->uri, GNUTLS_SAN_URI, "uri", &field, errmsg)) < 0)
                goto out;
        r = -EIO;
        if ((g = gnutls_x509_crq_set_version(crq, 1)) < 0)
                goto gfail;
        if ((r = hsm_pubkey_import(k, &pub)) < 0) {
                hsm_set_error(errmsg, "cannot read the key's public key: %s", strerror(-r));
                goto out;
        }
        r = -EIO;
        if ((g = gnutls_x509_crq_set_pubkey(crq, pub)) < 0)
                goto gfail;
        if ((r = hsm_privkey_import(k, &priv)) < 0) {
                hsm_set_error(errmsg, "cannot use the key: %s", strerror(-r));
                goto out;
        }
        r = -EIO;
        gnutls_digest_algorithm_t dig = GNUTLS_DIG_SHA256;
        unsigned mand = 0;
        if (hsm_key_type(k) == HSM_KEY_ED25519)
                dig = GNUTLS_DIG_SHA512; /* what GnuTLS pairs with Ed25519 (the message is signed whole) */
        else if (gnutls_pubkey_get_preferred_hash_algorithm(pub, &dig, &mand) < 0 || dig == GNUTLS_DIG_UNKNOWN)
                dig = GNUTLS_DIG_SHA256;
        if ((g = gnutls_x509_crq_privkey_sign(crq, priv, dig, 0)) < 0) {
                hsm_set_error(errmsg, "signing the request on the token failed: %s", gnutls_strerror(g));
                r = -EIO;
                goto out;
        }
        if ((g = gnutls_x509_crq_export2(crq, GNUTLS_X509_FMT_PEM, &pem)) < 0)
                goto gfail;
        char *s = malloc(pem.size + 1);
        if (!s) {
                r = -ENOMEM;
                goto out;
        }
        memcpy(s, pem.data, pem.size);
        s[pem.size] = 0;
        *ret_pem = s;
        r = 0;
        goto out;
gfail:
        hsm_set_error(errmsg, "building the request failed: %s", gnutls_strerror(g));
        r = -EIO;
out:
        if (ret_field)
                *ret_field = field;
        gnutls_free(pem.data);
        gnutls_privkey_deinit(priv);
        gnutls_pubkey_deinit(pub);
        gnutls_x509_crq_deinit(crq);
        return r;
}
