#include "creds.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <string.h>

#include <gnutls/abstract.h>
#include <gnutls/x509.h>

#include "log.h"
#include "ocsp.h"
#include "privkey.h"

struct ks_key {
        char *uri;
        hsm_key *key;
        unsigned token;
};

struct hsm_keystore {
        hsm_token **tokens;
        char **token_names;
        unsigned n_tokens;
        struct ks_key *keys;
        unsigned n_keys;
};

int hsm_keystore_open(const hsm_conf *c, hsm_keystore **ret, char **errmsg)
{
        hsm_keystore *ks = calloc(1, sizeof(*ks));
        if (!ks)
                return -ENOMEM;
        ks->tokens = calloc(c->n_tokens + 1, sizeof(*ks->tokens));
        ks->token_names = calloc(c->n_tokens + 1, sizeof(*ks->token_names));
        if (!ks->tokens || !ks->token_names) {
                hsm_keystore_free(ks);
                return -ENOMEM;
        }
        for (unsigned i = 0; i < c->n_tokens; i++) {
                const hsm_conf_token *t = &c->tokens[i];
                hsm_token_config tc = { .name = t->name, .uri = t->uri, .module = t->module, .pin_source = t->pin_source,
                                        .max_sessions = t->max_sessions };
                char *e = NULL;
                int r = hsm_token_open(&tc, &ks->tokens[i], &e);
                if (r < 0) {
                        hsm_set_error(errmsg, "%s:%d: [token %s]: %s", c->path, t->line, t->name, e ? e : strerror(-r));
                        free(e);
                        hsm_keystore_free(ks);
                        return r;
                }
                /* Admission: the adaptive limit's bounds (at least one
                 * operation per core by default: the handshake threads'
                 * CPU gate keeps an in-process token within the cores
                 * anyway), the queue, the key rate. */
                long cores = sysconf(_SC_NPROCESSORS_ONLN);
                unsigned cmin = t->concurrency_min ? t->concurrency_min : (unsigned)(cores > 0 ? cores : 1);
                if (t->concurrency_max && cmin > t->concurrency_max)
                        cmin = t->concurrency_max;
                hsm_token_set_concurrency(ks->tokens[i], cmin, t->concurrency_max, t->queue_limit,
                                          (int)t->key_ops_per_second);
                ks->token_names[i] = strdup(t->name);
                ks->n_tokens++;
        }
        *ret = ks;
        return 0;
}

void hsm_keystore_free(hsm_keystore *ks)
{
        if (!ks)
                return;
        for (unsigned i = 0; i < ks->n_keys; i++) {
                hsm_key_unref(ks->keys[i].key);
                free(ks->keys[i].uri);
        }
        free(ks->keys);
        for (unsigned i = 0; i < ks->n_tokens; i++) {
                hsm_token_unref(ks->tokens[i]);
                free(ks->token_names[i]);
        }
        free(ks->tokens);
        free(ks->token_names);
        free(ks);
}

unsigned hsm_keystore_n_keys(const hsm_keystore *ks) { return ks->n_keys; }
hsm_key *hsm_keystore_key(const hsm_keystore *ks, unsigned i) { return ks->keys[i].key; }
const char *hsm_keystore_token_name(const hsm_keystore *ks, unsigned i) { return ks->token_names[ks->keys[i].token]; }

unsigned hsm_keystore_total_sessions(const hsm_keystore *ks)
{
        unsigned n = 0;
        for (unsigned i = 0; i < ks->n_tokens; i++)
                n += hsm_token_max_sessions(ks->tokens[i]);
        return n;
}

int hsm_keystore_derive_ticket_key(hsm_keystore *ks, const char *uri, const char *context, uint8_t *out, size_t len,
                                   const char **token_name, char **errmsg)
{
        int r = -ENODEV;
        for (unsigned i = 0; i < ks->n_tokens; i++) {
                char *e = NULL;
                r = hsm_token_derive_ticket_key(ks->tokens[i], uri, context, out, len, &e);
                if (r == -ENODEV) { /* names another token */
                        free(e);
                        continue;
                }
                if (r < 0) {
                        hsm_set_error(errmsg, "%s", e ? e : strerror(-r));
                        free(e);
                        return r;
                }
                free(e);
                *token_name = ks->token_names[i];
                return 0;
        }
        hsm_set_error(errmsg, "ticket_key %s: no configured [token] matches the URI", uri);
        return r;
}

/* Finds the token key named by a URI, once per URI. */
static int keystore_find(hsm_keystore *ks, const char *uri, hsm_key **ret, char **errmsg)
{
        for (unsigned i = 0; i < ks->n_keys; i++)
                if (strcmp(ks->keys[i].uri, uri) == 0) {
                        *ret = ks->keys[i].key;
                        return 0;
                }
        if (ks->n_tokens == 0) {
                hsm_set_error(errmsg, "key %s is on a token, but no [token] section is configured", uri);
                return -ENODEV;
        }
        char *last = NULL;
        int r = -ENODEV;
        for (unsigned i = 0; i < ks->n_tokens; i++) {
                hsm_key *k = NULL;
                char *e = NULL;
                r = hsm_token_find_key(ks->tokens[i], uri, &k, &e);
                if (r == -ENODEV) { /* names another token */
                        free(e);
                        continue;
                }
                if (r < 0) {
                        free(last);
                        last = e;
                        break;
                }
                free(e);
                struct ks_key *n = realloc(ks->keys, (ks->n_keys + 1) * sizeof(*n));
                if (!n) {
                        hsm_key_unref(k);
                        free(last);
                        return -ENOMEM;
                }
                ks->keys = n;
                n[ks->n_keys++] = (struct ks_key){ .uri = strdup(uri), .key = k, .token = i };
                *ret = k;
                free(last);
                return 0;
        }
        if (last)
                *errmsg = last;
        else
                hsm_set_error(errmsg, "key %s: the URI matches none of the configured tokens", uri);
        return r;
}

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

static int load_chain(hsm_keystore *ks, const hsm_conf *c, const hsm_conf_chain *ch, bool verbose,
                      gnutls_certificate_credentials_t cred, hsm_chain_info *info, char **errmsg)
{
        gnutls_datum_t pem = { NULL, 0 };
        gnutls_x509_crt_t *crts = NULL;
        unsigned n_crts = 0;
        gnutls_pcert_st *pcerts = NULL;
        gnutls_privkey_t pkey = NULL;
        int r;

        if (read_file(ch->cert, &pem) < 0) {
                hsm_set_error(errmsg, "%s:%d: cannot read certificate file %s: %s", c->path, ch->cert_line, ch->cert, strerror(errno));
                return -ENOENT;
        }
        r = gnutls_x509_crt_list_import2(&crts, &n_crts, &pem, GNUTLS_X509_FMT_PEM, GNUTLS_X509_CRT_LIST_FAIL_IF_UNSORTED);
        if (r < 0 || n_crts == 0) {
                hsm_set_error(errmsg, "%s:%d: %s holds no valid PEM certificate chain (leaf first): %s", c->path, ch->cert_line,
                        ch->cert, r < 0 ? gnutls_strerror(r) : "empty");
                r = -EINVAL;
                goto out;
        }

        if (strncmp(ch->key, "pkcs11:", 7) == 0) {
                hsm_key *k = NULL;
                char *e = NULL;
                r = keystore_find(ks, ch->key, &k, &e);
                if (r < 0) {
                        hsm_set_error(errmsg, "%s:%d: %s", c->path, ch->key_line, e ? e : strerror(-r));
                        free(e);
                        goto out;
                }
                r = hsm_key_matches_certificate(k, crts[0]);
                if (r < 0) {
                        hsm_set_error(errmsg, "%s:%d: certificate %s does not match key %s (%s)", c->path, ch->key_line, ch->cert,
                                ch->key, r == -EKEYREJECTED ? "different public key" : "cannot read the key's public part");
                        r = -EKEYREJECTED;
                        goto out;
                }
                r = hsm_privkey_import(k, &pkey);
                if (r < 0) {
                        hsm_set_error(errmsg, "%s:%d: cannot use key %s with GnuTLS", c->path, ch->key_line, ch->key);
                        goto out;
                }
                info->key = k;
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
                        hsm_set_error(errmsg, "%s:%d: cannot read key file %s: %s", c->path, ch->key_line, ch->key, strerror(errno));
                        r = -ENOENT;
                        goto out;
                }
                r = gnutls_x509_privkey_init(&xk);
                if (r >= 0)
                        r = gnutls_x509_privkey_import2(xk, &kd, GNUTLS_X509_FMT_PEM, NULL, GNUTLS_PKCS_PLAIN);
                gnutls_memset(kd.data, 0, kd.size);
                gnutls_free(kd.data);
                if (r < 0) {
                        hsm_set_error(errmsg, "%s:%d: %s is not an unencrypted PEM private key: %s", c->path, ch->key_line, ch->key,
                                gnutls_strerror(r));
                        gnutls_x509_privkey_deinit(xk);
                        r = -EINVAL;
                        goto out;
                }
                if (gnutls_x509_privkey_get_key_id(xk, GNUTLS_KEYID_USE_SHA256, id1, &l1) < 0 ||
                    gnutls_x509_crt_get_key_id(crts[0], GNUTLS_KEYID_USE_SHA256, id2, &l2) < 0 || l1 != l2 ||
                    memcmp(id1, id2, l1) != 0) {
                        hsm_set_error(errmsg, "%s:%d: certificate %s does not match key %s (different public key)", c->path,
                                ch->key_line, ch->cert, ch->key);
                        gnutls_x509_privkey_deinit(xk);
                        r = -EKEYREJECTED;
                        goto out;
                }
                gnutls_privkey_init(&pkey);
                r = gnutls_privkey_import_x509(pkey, xk, GNUTLS_PRIVKEY_IMPORT_AUTO_RELEASE);
                if (r < 0) {
                        gnutls_x509_privkey_deinit(xk);
                        hsm_set_error(errmsg, "%s:%d: cannot use key %s", c->path, ch->key_line, ch->key);
                        r = -EINVAL;
                        goto out;
                }
                const char *base = strrchr(ch->key, '/');
                info->key_name = strdup(base ? base + 1 : ch->key);
                if (verbose)
                        hsm_notice("key %s: file key (not on a token)", ch->key);
        }

        pcerts = calloc(n_crts, sizeof(*pcerts));
        if (!pcerts) {
                r = -ENOMEM;
                goto out;
        }
        unsigned np = n_crts;
        r = gnutls_pcert_import_x509_list(pcerts, crts, &np, 0);
        if (r < 0) {
                hsm_set_error(errmsg, "%s:%d: cannot use certificate chain %s: %s", c->path, ch->cert_line, ch->cert, gnutls_strerror(r));
                free(pcerts);
                pcerts = NULL;
                r = -EINVAL;
                goto out;
        }
        r = gnutls_x509_crt_export2(crts[0], GNUTLS_X509_FMT_DER, &info->leaf);
        if (r < 0) {
                r = -EINVAL;
                goto out;
        }
        r = gnutls_certificate_set_key(cred, NULL, 0, pcerts, (int)np, pkey);
        if (r < 0) {
                hsm_set_error(errmsg, "%s:%d: GnuTLS refused certificate %s with key %s: %s", c->path, ch->cert_line, ch->cert,
                        ch->key, gnutls_strerror(r));
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
                strftime(when, sizeof(when), "%Y-%m-%d", gmtime(&exp));
                hsm_notice("certificate %s: %s, %u in chain, expires %s, matches its key", ch->cert, dn.data ? (char *)dn.data : "?",
                           n_crts, when);
                gnutls_free(dn.data);
        }
        if (asprintf(&info->description, "%s with %s", ch->cert, ch->key) < 0)
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

int hsm_creds_load(hsm_keystore *ks, const hsm_conf *c, const hsm_conf_listener *l, bool verbose, hsm_creds **ret,
                   char **errmsg)
{
        hsm_creds *cr = calloc(1, sizeof(*cr));
        if (!cr)
                return -ENOMEM;
        cr->chains = calloc(l->n_chains, sizeof(*cr->chains));
        if (!cr->chains || gnutls_certificate_allocate_credentials(&cr->cred) < 0) {
                hsm_creds_free(cr);
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
                hsm_creds_free(cr);
                return -ENOMEM;
        }
        for (unsigned i = 0; i < l->n_chains; i++) {
                int r = load_chain(ks, c, &l->chains[i], verbose, cr->cred, &cr->chains[i], errmsg);
                if (r < 0) {
                        hsm_creds_free(cr);
                        return r;
                }
                cr->n_chains++;
                if (l->chains[i].ocsp) {
                        /* Chain i is the credentials' certificate i. */
                        char where[300], *e = NULL;
                        snprintf(where, sizeof(where), "listener %s", l->name);
                        r = hsm_ocsp_file_new(where, l->chains[i].ocsp, &cr->chains[i].leaf, &cr->chains[i].ocsp, &e);
                        if (r == 0)
                                r = hsm_ocsp_file_attach(cr->chains[i].ocsp, cr->cred, i);
                        if (r < 0) {
                                hsm_set_error(errmsg, "%s:%d: %s", c->path, l->chains[i].ocsp_line, e ? e : strerror(-r));
                                free(e);
                                hsm_creds_free(cr);
                                return r;
                        }
                }
        }
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
                hsm_creds_free(cr);
                return -EINVAL;
        }
        if (verbose && ca)
                hsm_notice("%s %s: %d CA certificate%s from %s", l->kind == HSM_CONNECTOR ? "connector" : "listener", l->name, n,
                           n == 1 ? "" : "s", ca);
        *ret = cr;
        return 0;
}

void hsm_creds_free(hsm_creds *cr)
{
        if (!cr)
                return;
        if (cr->cred)
                gnutls_certificate_free_credentials(cr->cred);
        for (unsigned i = 0; i < cr->n_chains; i++) {
                free(cr->chains[i].description);
                free(cr->chains[i].key_name);
                hsm_ocsp_file_free(cr->chains[i].ocsp);
                gnutls_free(cr->chains[i].leaf.data);
        }
        free(cr->chains);
        free(cr);
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

/* The configured tokens, for the admin API (hsm_token_name() is the
 * [token NAME]). */
unsigned hsm_keystore_n_tokens(const hsm_keystore *ks) { return ks ? ks->n_tokens : 0; }
hsm_token *hsm_keystore_token(const hsm_keystore *ks, unsigned i) { return i < ks->n_tokens ? ks->tokens[i] : NULL; }
