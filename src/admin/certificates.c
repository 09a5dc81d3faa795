/* /v1/certificates: the chains of the configuration file and those uploaded
 * through the API (kept in the state database and, if asked, on the token
 * next to their key). An upload is accepted only when it parses, is in
 * order (each certificate issued by the next) and its leaf holds the public
 * key of a key on a configured token. Binding them to listeners:
 * bindings.c. */
#include "internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <gnutls/crypto.h>
#include <gnutls/x509.h>

#include "keyadmin.h"

/* Every key on the configured tokens, with its SPKI SHA-256. */
struct keyref {
        char token[64], id[129], label[256];
        uint8_t spki[32];
};
struct keymap {
        struct keyref *k;
        size_t n;
};

static void keymap_load(hsm_admin *a, struct keymap *m)
{
        m->k = NULL;
        m->n = 0;
        for (unsigned i = 0; i < hsm_keystore_n_tokens(a->ks); i++) {
                hsm_token *t = hsm_keystore_token(a->ks, i);
                hsm_key_entry *e = NULL;
                size_t n = 0;
                if (!t || hsm_token_list_keys(t, &e, &n) < 0)
                        continue;
                struct keyref *nk = realloc(m->k, (m->n + n + 1) * sizeof(*nk));
                if (nk) {
                        m->k = nk;
                        for (size_t j = 0; j < n; j++) {
                                struct keyref *k = &m->k[m->n];
                                if (hsm_key_spki_sha256(e[j].key, k->spki) < 0)
                                        continue;
                                snprintf(k->token, sizeof(k->token), "%s", hsm_token_name(t));
                                hex_encode(e[j].id, e[j].id_len, k->id);
                                snprintf(k->label, sizeof(k->label), "%s", e[j].label);
                                m->n++;
                        }
                }
                hsm_key_entries_free(e, n);
        }
}

static const struct keyref *keymap_find(const struct keymap *m, const uint8_t spki[32])
{
        for (size_t i = 0; i < m->n; i++)
                if (memcmp(m->k[i].spki, spki, 32) == 0)
                        return &m->k[i];
        return NULL;
}

#define crt_spki admin_crt_spki
#define crt_fingerprint admin_crt_fingerprint

struct chain {
        gnutls_x509_crt_t *crts;
        unsigned n;
};

static void chain_done(struct chain *c)
{
        for (unsigned i = 0; i < c->n; i++)
                gnutls_x509_crt_deinit(c->crts[i]);
        gnutls_free(c->crts);
        c->crts = NULL;
        c->n = 0;
}

static int chain_parse(const char *pem, size_t len, unsigned flags, struct chain *c)
{
        gnutls_datum_t d = { (unsigned char *)pem, (unsigned)len };
        c->crts = NULL;
        c->n = 0;
        int g = gnutls_x509_crt_list_import2(&c->crts, &c->n, &d, GNUTLS_X509_FMT_PEM, flags);
        if (g < 0) {
                c->crts = NULL;
                c->n = 0;
        }
        return g;
}

static char *read_file(const char *path, size_t *len)
{
        FILE *f = fopen(path, "re");
        if (!f)
                return NULL;
        char *buf = NULL;
        size_t n = 0;
        FILE *m = open_memstream(&buf, &n);
        char chunk[4096];
        size_t k;
        while (m && (k = fread(chunk, 1, sizeof(chunk), f)) > 0)
                fwrite(chunk, 1, k, m);
        fclose(f);
        if (m)
                fclose(m);
        *len = n;
        return buf;
}

static json_t *sans_json(gnutls_x509_crt_t crt, json_t *dns_only)
{
        json_t *arr = json_array();
        for (unsigned i = 0;; i++) {
                char buf[1024];
                size_t size = sizeof(buf) - 1;
                unsigned critical = 0;
                int type = gnutls_x509_crt_get_subject_alt_name(crt, i, buf, &size, &critical);
                if (type == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE)
                        break;
                if (type < 0)
                        continue;
                char out[1100], ip[INET6_ADDRSTRLEN];
                switch (type) {
                case GNUTLS_SAN_DNSNAME:
                        buf[size] = 0;
                        snprintf(out, sizeof(out), "DNS:%s", buf);
                        if (dns_only)
                                json_array_append_new(dns_only, json_string(buf));
                        break;
                case GNUTLS_SAN_RFC822NAME:
                        buf[size] = 0;
                        snprintf(out, sizeof(out), "email:%s", buf);
                        break;
                case GNUTLS_SAN_URI:
                        buf[size] = 0;
                        snprintf(out, sizeof(out), "URI:%s", buf);
                        break;
                case GNUTLS_SAN_IPADDRESS:
                        if (!inet_ntop(size == 16 ? AF_INET6 : AF_INET, buf, ip, sizeof(ip)))
                                continue;
                        snprintf(out, sizeof(out), "IP:%s", ip);
                        break;
                default:
                        continue;
                }
                json_array_append_new(arr, json_string(out));
        }
        return arr;
}

static json_t *dn_json(gnutls_x509_crt_t crt, bool issuer)
{
        gnutls_datum_t d = { NULL, 0 };
        int g = issuer ? gnutls_x509_crt_get_issuer_dn3(crt, &d, 0) : gnutls_x509_crt_get_dn3(crt, &d, 0);
        json_t *s = json_stringn(g >= 0 ? (const char *)d.data : "", g >= 0 ? d.size : 0);
        gnutls_free(d.data);
        return s;
}

/* The Certificate object of a chain (contract: #/components/schemas/Certificate). */
static json_t *cert_json(hsm_admin *a, struct chain *c, const struct keymap *km, json_t *stored)
{
        gnutls_x509_crt_t leaf = c->crts[0];
        char fp[65], serial_hex[129], nb[40], na[40];
        uint8_t serial[64], spki[32] = { 0 };
        size_t sl = sizeof(serial);
        crt_fingerprint(leaf, fp);
        if (gnutls_x509_crt_get_serial(leaf, serial, &sl) < 0)
                sl = 0;
        hex_encode(serial, sl, serial_hex);
        time_t b = gnutls_x509_crt_get_activation_time(leaf), e = gnutls_x509_crt_get_expiration_time(leaf);
        fmt_time(b, nb, sizeof(nb));
        fmt_time(e, na, sizeof(na));
        long long days = ((long long)e - (long long)time(NULL)) / 86400;
        crt_spki(leaf, spki);
        const struct keyref *k = keymap_find(km, spki);
        json_t *dns = json_array();
        json_t *sans = sans_json(leaf, dns);
        /* Listeners that serve this leaf now (their live bindings). */
        json_t *listeners = admin_bound_listeners(a, fp);
        json_decref(dns);
        return json_pack("{s:s,s:o,s:o,s:o,s:s,s:s,s:s,s:I,s:{s:s,s:s,s:s},s:I,s:o,s:o}", "fingerprint", fp,
                         "subject", dn_json(leaf, false), "sans", sans, "issuer", dn_json(leaf, true), "serial",
                         serial_hex, "not_before", nb, "not_after", na, "days_left", (json_int_t)days, "key", "token",
                         k ? k->token : "", "id", k ? k->id : "", "label", k ? k->label : "", "chain_length",
                         (json_int_t)c->n, "listeners", listeners, "stored", stored);
}

static json_t *stored_json(const char *csv)
{
        json_t *arr = json_array();
        char buf[64];
        snprintf(buf, sizeof(buf), "%s", csv);
        char *save = NULL;
        for (char *p = strtok_r(buf, ",", &save); p; p = strtok_r(NULL, ",", &save))
                json_array_append_new(arr, json_string(p));
        return arr;
}

struct listing {
        hsm_admin *a;
        const struct keymap *km;
        json_t *list;
        json_t *seen; /* fingerprint -> true */
};

static int add_stored(const char *fp, const char *token, const char *key_id, const char *stored, const char *pem,
                      void *ud)
{
        struct listing *l = ud;
        struct chain c;
        if (chain_parse(pem, strlen(pem), 0, &c) < 0 || c.n == 0)
                return 0;
        json_array_append_new(l->list, cert_json(l->a, &c, l->km, stored_json(stored)));
        json_object_set_new(l->seen, fp, json_true());
        chain_done(&c);
        return 0;
}

/* Every chain: stored ones, then the configuration file's (once each). */
static json_t *all_certificates(hsm_admin *a, const struct keymap *km)
{
        struct listing l = { a, km, json_array(), json_object() };
        hsm_store_cert_list(a->store, NULL, add_stored, &l);
        for (unsigned i = 0; i < a->conf->n_listeners; i++) {
                const hsm_conf_listener *cl = &a->conf->listeners[i];
                for (unsigned j = 0; j < cl->n_chains; j++) {
                        size_t len = 0;
                        char *pem = read_file(cl->chains[j].cert, &len);
                        struct chain c;
                        char fp[65];
                        if (pem && chain_parse(pem, len, 0, &c) >= 0 && c.n > 0) {
                                if (crt_fingerprint(c.crts[0], fp) == 0 && !json_object_get(l.seen, fp)) {
                                        json_array_append_new(l.list, cert_json(a, &c, km, stored_json("config")));
                                        json_object_set_new(l.seen, fp, json_true());
                                }
                                chain_done(&c);
                        }
                        free(pem);
                }
        }
        json_decref(l.seen);
        return l.list;
}

int route_certificates(struct req *r)
{
        struct keymap km;
        keymap_load(r->a, &km);
        json_t *list = all_certificates(r->a, &km);
        free(km.k);
        return req_reply(r, 200, json_pack("{s:o}", "certificates", list));
}

static bool valid_fp(const char *s)
{
        if (strlen(s) != 64)
                return false;
        for (; *s; s++)
                if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'f')))
                        return false;
        return true;
}

int route_certificate(struct req *r)
{
        const char *fp = r->seg[2];
        if (!valid_fp(fp))
                return req_error(r, 400, "invalid_field", "fingerprint", "a fingerprint is 64 lowercase hex digits");
        struct keymap km;
        keymap_load(r->a, &km);
        json_t *list = all_certificates(r->a, &km);
        free(km.k);
        size_t i;
        json_t *c;
        json_array_foreach(list, i, c) {
                if (strcmp(json_string_value(json_object_get(c, "fingerprint")), fp) == 0) {
                        req_reply(r, 200, json_incref(c));
                        json_decref(list);
                        return 0;
                }
        }
        json_decref(list);
        return req_error(r, 404, "not_found", "fingerprint", "no certificate %s", fp);
}

int route_certificate_upload(struct req *r)
{
        static const char *const allowed[] = { "pem", "store", NULL };
        r->action = "certificate.upload";
        json_t *o = req_body_object(r, allowed);
        if (!o)
                return 0;
        struct chain c = { NULL, 0 };
        struct keymap km = { NULL, 0 };
        bool on_token, in_state;
        const char *pem;
        struct admin_perr pe;
        char fp[65];
        uint8_t spki[32];
        struct admin_chain ac = { NULL, 0 };
        if (admin_parse_upload(o, &pem, &on_token, &in_state, &pe) < 0 ||
            admin_parse_chain(pem, strlen(pem), &ac, fp, spki, &pe) < 0) {
                req_perr(r, &pe);
                goto out;
        }
        c.crts = ac.crts; /* freed with chain_done() below */
        c.n = ac.n;
        keymap_load(r->a, &km);
        const struct keyref *k = keymap_find(&km, spki);
        snprintf(r->detail, sizeof(r->detail), "fingerprint=%s", fp);
        if (!k) {
                req_error(r, 422, "unprocessable", "/pem", "the leaf's public key is the key of no configured token");
                goto out;
        }
        hsm_token *t = admin_find_token(r->a, k->token);
        uint8_t id[64];
        size_t id_len = 0;
        if (!t || hex_decode(k->id, id, sizeof(id), &id_len) < 0) {
                req_error(r, 422, "unprocessable", "/pem", "the leaf's key has no usable CKA_ID on token %s", k->token);
                goto out;
        }
        /* The state database first: a duplicate is refused before the
         * token is touched. */
        const char *where = on_token && in_state ? "token,state" : on_token ? "token" : "state";
        int rr = hsm_store_cert_add(r->a->store, fp, k->token, k->id, where, pem);
        if (rr == -EEXIST) {
                req_error(r, 409, "conflict", "/pem", "certificate %s is already stored", fp);
                goto out;
        }
        if (rr < 0) {
                req_error(r, 500, "internal", NULL, "cannot store the certificate in the state database");
                goto out;
        }
        if (on_token) {
                gnutls_datum_t der = { NULL, 0 };
                char *err = NULL;
                rr = gnutls_x509_crt_export2(c.crts[0], GNUTLS_X509_FMT_DER, &der) < 0
                             ? -EIO
                             : hsm_token_store_certificate(t, id, id_len, k->label, &der, &err);
                gnutls_free(der.data);
                if (rr < 0) {
                        hsm_store_cert_delete(r->a->store, fp); /* all or nothing */
                        req_error(r, 502, "token_failed", NULL, "%s", err ? err : "storing on the token failed");
                        free(err);
                        goto out;
                }
        }
        char detail[sizeof(r->detail)];
        snprintf(detail, sizeof(detail), "fingerprint=%s key=%s/%s stored=%s", fp, k->token, k->id, where);
        req_reply(r, 201, cert_json(r->a, &c, &km, stored_json(where)));
        memcpy(r->detail, detail, sizeof(detail));
        snprintf(r->location, sizeof(r->location), "/v1/certificates/%s", fp);
out:
        free(km.k);
        chain_done(&c);
        json_decref(o);
        return 0;
}

struct found {
        char token[64], stored[64];
        char *pem;
};

static int get_one(const char *fp, const char *token, const char *key_id, const char *stored, const char *pem, void *ud)
{
        struct found *f = ud;
        snprintf(f->token, sizeof(f->token), "%s", token);
        snprintf(f->stored, sizeof(f->stored), "%s", stored);
        f->pem = strdup(pem);
        return 1;
}

static int certificate_delete(struct req *r)
{
        const char *fp = r->seg[2];
        r->action = "certificate.delete";
        snprintf(r->detail, sizeof(r->detail), "fingerprint=%.64s", fp);
        if (!valid_fp(fp))
                return req_error(r, 400, "invalid_field", "fingerprint", "a fingerprint is 64 lowercase hex digits");
        json_t *bound = admin_bound_listeners(r->a, fp);
        size_t n_bound = json_array_size(bound);
        json_decref(bound);
        if (n_bound)
                return req_error(r, 409, "conflict", "fingerprint",
                                 "certificate %s is bound to a listener: unbind or replace it first", fp);
        struct found f = { .pem = NULL };
        hsm_store_cert_list(r->a->store, fp, get_one, &f);
        if (!f.pem) {
                /* A configured chain, or nothing. */
                struct keymap km;
                keymap_load(r->a, &km);
                json_t *list = all_certificates(r->a, &km);
                free(km.k);
                size_t i;
                json_t *c;
                bool configured = false;
                json_array_foreach(list, i, c)
                        if (strcmp(json_string_value(json_object_get(c, "fingerprint")), fp) == 0)
                                configured = true;
                json_decref(list);
                if (configured)
                        return req_error(r, 409, "conflict", "fingerprint",
                                         "certificate %s comes from the configuration file and is served: change it there", fp);
                return req_error(r, 404, "not_found", "fingerprint", "no stored certificate %s", fp);
        }
        if (strstr(f.stored, "token")) {
                struct chain c;
                hsm_token *t = admin_find_token(r->a, f.token);
                if (t && chain_parse(f.pem, strlen(f.pem), 0, &c) >= 0 && c.n > 0) {
                        gnutls_datum_t der = { NULL, 0 };
                        char *err = NULL;
                        int rr = gnutls_x509_crt_export2(c.crts[0], GNUTLS_X509_FMT_DER, &der) < 0
                                         ? -EIO
                                         : hsm_token_delete_certificate(t, &der, &err);
                        gnutls_free(der.data);
                        chain_done(&c);
                        if (rr < 0 && rr != -ENOENT) {
                                req_error(r, 502, "token_failed", NULL, "%s", err ? err : "the token failed");
                                free(err);
                                free(f.pem);
                                return 0;
                        }
                        free(err);
                }
        }
        free(f.pem);
        if (hsm_store_cert_delete(r->a->store, fp) < 0)
                return req_error(r, 500, "internal", NULL, "cannot delete certificate %s from the state database", fp);
        r->status = 204;
        json_decref(r->json);
        r->json = NULL;
        return 0;
}

/* Under the change lock: no binding can take the chain between the check
 * that it is not bound and its deletion. */
int route_certificate_delete(struct req *r)
{
        if (admin_changes_lock(r) < 0)
                return 0;
        int rr = certificate_delete(r);
        hsm_server_changes_unlock(r->a->srv);
        return rr;
}

struct expiry_ctx {
        void (*cb)(const char *fp, const char *source, int64_t not_after, void *ud);
        void *ud;
        json_t *seen;
};

static void expiry_of(struct expiry_ctx *x, const char *pem, size_t len, const char *source)
{
        struct chain c;
        char fp[65];
        if (chain_parse(pem, len, 0, &c) < 0 || c.n == 0)
                return;
        if (crt_fingerprint(c.crts[0], fp) == 0 && !json_object_get(x->seen, fp)) {
                json_object_set_new(x->seen, fp, json_true());
                x->cb(fp, source, (int64_t)gnutls_x509_crt_get_expiration_time(c.crts[0]), x->ud);
        }
        chain_done(&c);
}

static int expiry_stored(const char *fp, const char *token, const char *key_id, const char *stored, const char *pem,
                         void *ud)
{
        expiry_of(ud, pem, strlen(pem), "api");
        return 0;
}

void admin_for_each_expiry(hsm_admin *a, void (*cb)(const char *fp, const char *source, int64_t not_after, void *ud),
                           void *ud)
{
        struct expiry_ctx x = { cb, ud, json_object() };
        for (unsigned i = 0; i < a->conf->n_listeners; i++)
                for (unsigned j = 0; j < a->conf->listeners[i].n_chains; j++) {
                        size_t len = 0;
                        char *pem = read_file(a->conf->listeners[i].chains[j].cert, &len);
                        if (pem)
                                expiry_of(&x, pem, len, "config");
                        free(pem);
                }
        if (a->store)
                hsm_store_cert_list(a->store, NULL, expiry_stored, &x);
        json_decref(x.seen);
}
