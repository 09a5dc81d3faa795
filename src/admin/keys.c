/* /v1/keys: list, one, generate on the token, delete, CSR. Keys are named
 * by their token's configuration name and their CKA_ID in hex. */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/crypto.h>

#include "keyadmin.h"

/* RFC 7512 percent-encoding: every byte (ids), or all but unreserved
 * characters (labels). */
static void pct_all(const uint8_t *p, size_t n, char *out, size_t size)
{
        size_t o = 0;
        for (size_t i = 0; i < n && o + 4 < size; i++)
                o += (size_t)snprintf(out + o, size - o, "%%%02x", p[i]);
        out[o] = 0;
}

static void pct(const uint8_t *p, size_t n, char *out, size_t size)
{
        size_t o = 0;
        for (size_t i = 0; i < n && o + 4 < size; i++) {
                uint8_t c = p[i];
                if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
                    c == '_' || c == '~')
                        out[o++] = (char)c;
                else
                        o += (size_t)snprintf(out + o, size - o, "%%%02x", c);
        }
        out[o] = 0;
}

/* What is served now: the public key (SPKI SHA-256) of every chain's leaf
 * in every listener's and connector's live credentials (the file's
 * chains and the API's bindings alike), read once per request. A chain is
 * served only with the key whose public key its leaf carries
 * (hsm_creds_build checks it), so the leaf names the key. */
struct used {
        json_t *served; /* [{listener, spki}] */
};

static void used_load(hsm_admin *a, struct used *u)
{
        u->served = admin_served_keys(a);
}

static void used_done(struct used *u)
{
        json_decref(u->served);
}

/* Names of the listeners and connectors whose live chains use the key with this SPKI. */
static json_t *listeners_using(const struct used *u, const uint8_t spki[32])
{
        char hex[65];
        hex_encode(spki, 32, hex);
        json_t *arr = json_array();
        size_t i;
        json_t *v;
        json_array_foreach(u->served, i, v) {
                const char *l = json_string_value(json_object_get(v, "listener"));
                if (strcmp(json_string_value(json_object_get(v, "spki")), hex) != 0)
                        continue;
                bool seen = false;
                for (size_t k = 0; k < json_array_size(arr) && !seen; k++)
                        seen = strcmp(json_string_value(json_array_get(arr, k)), l) == 0;
                if (!seen)
                        json_array_append_new(arr, json_string(l));
        }
        return arr;
}

/* Names of the listeners and connectors whose configuration file names the
 * key with this SPKI on token t for a chain (a start loads every one of
 * them, served or not: deleting it would stop the next start). Looks each
 * pkcs11: URI of the file up on the token (DELETE only). */
static json_t *listeners_configuring(hsm_admin *a, hsm_token *t, const uint8_t spki[32])
{
        json_t *arr = json_array();
        for (unsigned l = 0; l < a->conf->n_listeners; l++) {
                const hsm_conf_listener *cl = &a->conf->listeners[l];
                bool named = false;
                for (unsigned c = 0; c < cl->n_chains && !named; c++) {
                        hsm_key *k = NULL;
                        char *err = NULL;
                        uint8_t ks[32];
                        if (cl->chains[c].key && strncmp(cl->chains[c].key, "pkcs11:", 7) == 0 &&
                            hsm_token_find_key(t, cl->chains[c].key, &k, &err) == 0 && hsm_key_spki_sha256(k, ks) == 0)
                                named = memcmp(ks, spki, 32) == 0;
                        hsm_key_unref(k);
                        free(err);
                }
                if (named)
                        json_array_append_new(arr, json_string(cl->name));
        }
        return arr;
}

static const char *curve_name(enum hsm_curve c)
{
        switch (c) {
        case HSM_CURVE_P256: return "P-256";
        case HSM_CURVE_P384: return "P-384";
        case HSM_CURVE_P521: return "P-521";
        case HSM_CURVE_ED25519: return "Ed25519";
        default: return NULL;
        }
}

struct certs_of {
        const char *token, *id;
        json_t *list;
};

static int cert_of_key(const char *fp, const char *token, const char *key_id, const char *stored, const char *pem,
                       void *ud)
{
        struct certs_of *c = ud;
        if (strcmp(token, c->token) == 0 && strcmp(key_id, c->id) == 0)
                json_array_append_new(c->list, json_string(fp));
        return 0;
}

/* Fingerprints of the chains stored through the API for this key. */
static json_t *stored_certificates(hsm_admin *a, const char *token, const char *id_hex)
{
        struct certs_of c = { token, id_hex, json_array() };
        if (a->store)
                hsm_store_cert_list(a->store, NULL, cert_of_key, &c);
        return c.list;
}

static json_t *key_json(hsm_admin *a, struct used *u, hsm_token *t, const hsm_key_entry *e)
{
        uint8_t spki[32] = { 0 };
        char spki_hex[65], id_hex[129], pid[3 * 64 + 1], plabel[3 * 256 + 1], ptok[3 * 33 + 1], uri[1200];
        hsm_key_spki_sha256(e->key, spki);
        hex_encode(spki, 32, spki_hex);
        hex_encode(e->id, e->id_len, id_hex);
        pct_all(e->id, e->id_len, pid, sizeof(pid));
        pct((const uint8_t *)e->label, strlen(e->label), plabel, sizeof(plabel));
        pct((const uint8_t *)hsm_token_label(t), strlen(hsm_token_label(t)), ptok, sizeof(ptok));
        snprintf(uri, sizeof(uri), "pkcs11:token=%s;id=%s;object=%s;type=private", ptok, pid, plabel);
        unsigned f = hsm_key_flags(e->key);
        enum hsm_key_type kt = hsm_key_type(e->key);
        const char *cn = curve_name(hsm_key_curve(e->key));
        json_t *o = json_pack("{s:s,s:s,s:s,s:s,s:s,s:I,s:s,s:b,s:b,s:b,s:b,s:b,s:o,s:o}", "token", hsm_token_name(t),
                              "id", id_hex, "label", e->label, "uri", uri, "type",
                              kt == HSM_KEY_RSA ? "rsa" : kt == HSM_KEY_ECDSA ? "ecdsa" : "ed25519", "bits",
                              (json_int_t)hsm_key_bits(e->key), "spki_sha256", spki_hex, "sensitive",
                              (f & HSM_KEY_SENSITIVE) != 0, "extractable", (f & HSM_KEY_EXTRACTABLE) != 0,
                              "always_sensitive", (f & HSM_KEY_ALWAYS_SENSITIVE) != 0, "never_extractable",
                              (f & HSM_KEY_NEVER_EXTRACTABLE) != 0, "always_authenticate",
                              (f & HSM_KEY_ALWAYS_AUTHENTICATE) != 0, "certificates",
                              stored_certificates(a, hsm_token_name(t), id_hex), "listeners",
                              listeners_using(u, spki));
        json_object_set_new(o, "curve", cn ? json_string(cn) : json_null());
        return o;
}

int route_keys(struct req *r)
{
        hsm_admin *a = r->a;
        const char *only = req_query(r, "token");
        if (only && !admin_find_token(a, only))
                return req_error(r, 404, "not_found", "token", "no token named '%.100s'", only);
        struct used u;
        used_load(a, &u);
        json_t *list = json_array();
        for (unsigned i = 0; i < hsm_keystore_n_tokens(a->ks); i++) {
                hsm_token *t = hsm_keystore_token(a->ks, i);
                if (!t || (only && strcmp(only, hsm_token_name(t)) != 0))
                        continue;
                hsm_key_entry *e = NULL;
                size_t n = 0;
                if (hsm_token_list_keys(t, &e, &n) < 0)
                        continue;
                for (size_t k = 0; k < n; k++)
                        json_array_append_new(list, key_json(a, &u, t, &e[k]));
                hsm_key_entries_free(e, n);
        }
        used_done(&u);
        return req_reply(r, 200, json_pack("{s:o}", "keys", list));
}

/* The key {token}/{id} of the path (segments 2 and 3): 0 and *ret_e (free
 * with hsm_key_entries_free(*all, n)), or an error set. */
static int find_key(struct req *r, hsm_token **ret_t, hsm_key_entry **all, size_t *n, hsm_key_entry **ret_e)
{
        hsm_token *t = admin_find_token(r->a, r->seg[2]);
        if (!t)
                return req_error(r, 404, "not_found", "token", "no token named '%.100s'", r->seg[2]), -ENOENT;
        uint8_t id[64];
        size_t id_len;
        if (hex_decode(r->seg[3], id, sizeof(id), &id_len) < 0)
                return req_error(r, 400, "invalid_field", "id", "the key id must be hex (2 to 128 digits)"), -EINVAL;
        int rr = hsm_token_list_keys(t, all, n);
        if (rr < 0)
                return req_error(r, 502, "token_failed", NULL, "cannot list the keys of token %s", hsm_token_name(t)),
                       rr;
        for (size_t i = 0; i < *n; i++)
                if ((*all)[i].id_len == id_len && memcmp((*all)[i].id, id, id_len) == 0) {
                        *ret_t = t;
                        *ret_e = &(*all)[i];
                        return 0;
                }
        hsm_key_entries_free(*all, *n);
        *all = NULL;
        return req_error(r, 404, "not_found", "id", "no private key with id %.128s on token %s", r->seg[3],
                         hsm_token_name(t)),
               -ENOENT;
}

int route_key(struct req *r)
{
        hsm_token *t;
        hsm_key_entry *all = NULL, *e;
        size_t n = 0;
        if (find_key(r, &t, &all, &n, &e) < 0)
                return 0;
        struct used u;
        used_load(r->a, &u);
        req_reply(r, 200, key_json(r->a, &u, t, e));
        used_done(&u);
        hsm_key_entries_free(all, n);
        return 0;
}

int route_key_generate(struct req *r)
{
        static const char *const allowed[] = { "token", "label", "id", "type", "bits", "curve", NULL };
        r->action = "key.generate";
        json_t *o = req_body_object(r, allowed);
        if (!o)
                return 0;
        hsm_token *t = NULL;
        struct admin_keygen kg;
        struct admin_perr pe;
        if (admin_parse_keygen(o, &kg, &pe) < 0) {
                req_perr(r, &pe);
                goto out;
        }
        const char *token = kg.token, *label = kg.label, *type = kg.type;
        hsm_keygen g = kg.g;
        uint8_t *id = kg.id;
        size_t id_len = kg.id_len;
        if (!kg.has_id && gnutls_rnd(GNUTLS_RND_NONCE, id, id_len) < 0) {
                req_error(r, 500, "internal", NULL, "no random id");
                goto out;
        }
        t = admin_find_token(r->a, token);
        if (!t) {
                req_error(r, 404, "not_found", "/token", "no token named '%.100s'", token);
                goto out;
        }
        char id_hex[65];
        hex_encode(id, id_len, id_hex);
        g.label = label;
        g.id = id;
        g.id_len = id_len;
        char *err = NULL;
        int rr = hsm_token_generate_key(t, &g, &err);
        snprintf(r->detail, sizeof(r->detail), "token=%s label=%s id=%s type=%s bits=%u", token, label, id_hex, type,
                 g.type == HSM_KEY_RSA ? g.bits : 0);
        if (rr == -EEXIST)
                req_error(r, 409, "conflict", strstr(err ? err : "", "labelled") ? "/label" : "/id", "%s", err ? err : "duplicate");
        else if (rr == -EOPNOTSUPP)
                req_error(r, 422, "unprocessable", "/type", "%s", err ? err : "unsupported");
        else if (rr < 0)
                req_error(r, 502, "token_failed", NULL, "%s", err ? err : "the token failed");
        free(err);
        if (rr < 0)
                goto out;
        /* Answer with the key as the token now describes it. */
        hsm_key_entry *all = NULL;
        size_t n = 0;
        char detail[sizeof(r->detail)];
        memcpy(detail, r->detail, sizeof(detail));
        if (hsm_token_list_keys(t, &all, &n) == 0) {
                for (size_t i = 0; i < n; i++)
                        if (all[i].id_len == id_len && memcmp(all[i].id, id, id_len) == 0) {
                                struct used u;
                                used_load(r->a, &u);
                                req_reply(r, 201, key_json(r->a, &u, t, &all[i]));
                                used_done(&u);
                        }
                hsm_key_entries_free(all, n);
        }
        if (r->status != 201)
                req_error(r, 502, "token_failed", NULL, "the key was generated but cannot be found again");
        memcpy(r->detail, detail, sizeof(detail));
        snprintf(r->location, sizeof(r->location), "/v1/keys/%s/%s", token, id_hex);
out:
        json_decref(o);
        return 0;
}

int route_key_csr(struct req *r)
{
        static const char *const allowed[] = { "subject", "dns", "ip", "email", "uri", NULL };
        r->action = "key.csr";
        hsm_token *t;
        hsm_key_entry *all = NULL, *e;
        size_t n = 0;
        struct admin_csr cs = { 0 };
        json_t *o = req_body_object(r, allowed);
        if (!o)
                return 0;
        struct admin_perr pe;
        if (admin_parse_csr(o, &cs, &pe) < 0) {
                req_perr(r, &pe);
                goto out;
        }
        const char *subject = cs.subject;
        if (find_key(r, &t, &all, &n, &e) < 0)
                goto out;
        hsm_csr_request cr = { .subject = subject, .dns = cs.dns, .ip = cs.ip, .email = cs.email, .uri = cs.uri };
        char *pem = NULL, *err = NULL;
        const char *field = NULL;
        int rr = hsm_key_make_csr(e->key, &cr, &pem, &field, &err);
        snprintf(r->detail, sizeof(r->detail), "token=%s id=%s subject=%.200s", r->seg[2], r->seg[3], subject);
        if (rr == -EINVAL) {
                char f[64];
                snprintf(f, sizeof(f), "/%s", field ? field : "subject");
                req_error(r, 400, "invalid_field", f, "%s", err ? err : "invalid");
        } else if (rr < 0)
                req_error(r, 502, "token_failed", NULL, "%s", err ? err : "the token failed");
        else {
                uint8_t spki[32];
                char hex[65];
                hsm_key_spki_sha256(e->key, spki);
                hex_encode(spki, 32, hex);
                char detail[sizeof(r->detail)];
                memcpy(detail, r->detail, sizeof(detail));
                req_reply(r, 200, json_pack("{s:s,s:s}", "csr", pem, "spki_sha256", hex));
                memcpy(r->detail, detail, sizeof(detail));
        }
        free(pem);
        free(err);
        hsm_key_entries_free(all, n);
out:
        admin_csr_done(&cs);
        json_decref(o);
        return 0;
}

int route_key_delete(struct req *r)
{
        r->action = "key.delete";
        hsm_token *t;
        hsm_key_entry *all = NULL, *e;
        size_t n = 0;
        const char *want = req_query(r, "spki_sha256");
        snprintf(r->detail, sizeof(r->detail), "token=%.60s id=%.128s", r->seg[2], r->seg[3]);
        if (!want)
                return req_error(r, 400, "missing_field", "spki_sha256",
                                 "name the key's SPKI SHA-256 (spki_sha256=...) to delete it");
        uint8_t w[32];
        size_t wl;
        if (strlen(want) != 64 || hex_decode(want, w, sizeof(w), &wl) < 0)
                return req_error(r, 400, "invalid_field", "spki_sha256", "spki_sha256 must be 64 hex digits");
        if (find_key(r, &t, &all, &n, &e) < 0)
                return 0;
        /* Under the change lock: no binding or reload can start serving
         * the key between the check and the deletion. */
        if (admin_changes_lock(r) < 0) {
                hsm_key_entries_free(all, n);
                return 0;
        }
        uint8_t spki[32];
        struct used u;
        used_load(r->a, &u);
        if (hsm_key_spki_sha256(e->key, spki) < 0)
                req_error(r, 502, "token_failed", NULL, "cannot read the key's public key");
        else if (memcmp(spki, w, 32) != 0)
                req_error(r, 412, "precondition_failed", "spki_sha256", "spki_sha256 is not this key's");
        else {
                json_t *l = listeners_using(&u, spki);
                json_t *cfg = listeners_configuring(r->a, t, spki);
                char id_hex[129];
                hex_encode(e->id, e->id_len, id_hex);
                json_t *certs = stored_certificates(r->a, hsm_token_name(t), id_hex);
                if (json_array_size(certs) > 0)
                        req_error(r, 409, "conflict", NULL, "certificate %s is stored for this key: delete it first",
                                  json_string_value(json_array_get(certs, 0)));
                else if (json_array_size(l) > 0)
                        req_error(r, 409, "conflict", NULL, "the key is in use by %zu listener(s), e.g. %s",
                                  json_array_size(l), json_string_value(json_array_get(l, 0)));
                else if (json_array_size(cfg) > 0)
                        req_error(r, 409, "conflict", NULL,
                                  "the configuration file names the key for listener %s (a start loads it): change the file first",
                                  json_string_value(json_array_get(cfg, 0)));
                else {
                        char *err = NULL;
                        int rr = hsm_token_delete_key(t, e->id, e->id_len, &err);
                        if (rr == -ENOTUNIQ)
                                req_error(r, 409, "conflict", "id", "%s", err ? err : "more than one key has this id");
                        else if (rr < 0)
                                req_error(r, 502, "token_failed", NULL, "%s", err ? err : "the token failed");
                        else {
                                r->status = 204;
                                json_decref(r->json);
                                r->json = NULL;
                        }
                        free(err);
                }
                json_decref(l);
                json_decref(cfg);
                json_decref(certs);
        }
        used_done(&u);
        hsm_server_changes_unlock(r->a->srv);
        hsm_key_entries_free(all, n);
        return 0;
}
