/* Listener bindings: which certificate chains a listener serves, for which
 * names. GET shows the live credentials (hsm_server_creds); POST, PUT and
 * DELETE .../bindings are transactions: the listener's complete new set of
 * chains is built and checked off the hot path (hsm_server_stage: chain
 * against key, a test signature per key, names unique), written to
 * state.db, and only then swapped in (hsm_server_stage_commit), all under
 * the server's change lock so that the If-Match check, the build and the
 * swap of two changes never interleave. At start the rows of state.db are
 * applied over the configuration file (hsm_admin_apply_bindings). */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <gnutls/crypto.h>
#include <gnutls/x509.h>

#include "log.h"

/* ------------------------------------------------------------ helpers */

/* Strings a plan owns. */
struct strs {
        char **v;
        size_t n, cap;
};

static char *keep(struct strs *s, char *p)
{
        if (!p)
                return NULL;
        if (s->n == s->cap) {
                size_t cap = s->cap ? 2 * s->cap : 16;
                char **v = realloc(s->v, cap * sizeof(*v));
                if (!v) {
                        free(p);
                        return NULL;
                }
                s->v = v;
                s->cap = cap;
        }
        return s->v[s->n++] = p;
}

static void strs_done(struct strs *s)
{
        for (size_t i = 0; i < s->n; i++)
                free(s->v[i]);
        free(s->v);
        memset(s, 0, sizeof(*s));
}

/* What a PEM chain's leaf is: fingerprint, key type, names (DNS SANs,
 * else the CN). */
struct leaf_meta {
        char fp[65];
        int pk;
        char names[16][256];
        unsigned n_names;
};

static int leaf_meta_of(const char *pem, size_t len, struct leaf_meta *m)
{
        gnutls_x509_crt_t *crts = NULL;
        unsigned n = 0;
        gnutls_datum_t d = { (unsigned char *)pem, (unsigned)len };
        memset(m, 0, sizeof(*m));
        if (gnutls_x509_crt_list_import2(&crts, &n, &d, GNUTLS_X509_FMT_PEM, 0) < 0 || n == 0)
                return -EINVAL;
        uint8_t fp[32];
        size_t fl = sizeof(fp);
        int r = gnutls_x509_crt_get_fingerprint(crts[0], GNUTLS_DIG_SHA256, fp, &fl) < 0 || fl != 32 ? -EINVAL : 0;
        if (r == 0)
                hex_encode(fp, 32, m->fp);
        m->pk = gnutls_x509_crt_get_pk_algorithm(crts[0], NULL);
        if (m->pk == GNUTLS_PK_RSA_PSS)
                m->pk = GNUTLS_PK_RSA;
        for (unsigned i = 0; m->n_names < 16; i++) {
                size_t size = sizeof(m->names[0]) - 1;
                int type = gnutls_x509_crt_get_subject_alt_name(crts[0], i, m->names[m->n_names], &size, NULL);
                if (type == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE)
                        break;
                if (type == GNUTLS_SAN_DNSNAME) {
                        m->names[m->n_names][size] = 0;
                        m->n_names++;
                }
        }
        size_t size = sizeof(m->names[0]);
        if (m->n_names == 0 &&
            gnutls_x509_crt_get_dn_by_oid(crts[0], GNUTLS_OID_X520_COMMON_NAME, 0, 0, m->names[0], &size) >= 0)
                m->n_names = 1;
        for (unsigned i = 0; i < n; i++)
                gnutls_x509_crt_deinit(crts[i]);
        gnutls_free(crts);
        return r;
}

static char *file_text(const char *path, size_t *len)
{
        gnutls_datum_t d = { NULL, 0 };
        if (gnutls_load_file(path, &d) < 0)
                return NULL;
        char *s = malloc(d.size + 1);
        if (s) {
                memcpy(s, d.data, d.size);
                s[d.size] = 0;
                *len = d.size;
        }
        gnutls_free(d.data);
        return s;
}

struct stored_chain {
        char *pem;
};

static int get_pem(const char *fp, const char *token, const char *key_id, const char *stored, const char *pem, void *ud)
{
        struct stored_chain *c = ud;
        c->pem = strdup(pem);
        return 1;
}

/* The PEM of an uploaded chain (malloc'd), or NULL. */
static char *stored_pem(hsm_store *st, const char *fp)
{
        struct stored_chain c = { NULL };
        if (st)
                hsm_store_cert_list(st, fp, get_pem, &c);
        return c.pem;
}

/* names: a JSON array text ("" or NULL: none) into a specs' names. */
static int names_from_json(struct strs *keepers, const char *text, const char ***ret, unsigned *ret_n)
{
        *ret = NULL;
        *ret_n = 0;
        if (!text || !*text)
                return 0;
        json_t *a = json_loads(text, 0, NULL);
        if (!json_is_array(a) || json_array_size(a) == 0) {
                json_decref(a);
                return -EINVAL;
        }
        size_t n = json_array_size(a);
        const char **v = (const char **)keep(keepers, calloc(n, sizeof(*v)));
        if (!v) {
                json_decref(a);
                return -ENOMEM;
        }
        for (size_t i = 0; i < n; i++)
                v[i] = keep(keepers, strdup(json_string_value(json_array_get(a, i)) ? json_string_value(json_array_get(a, i)) : ""));
        json_decref(a);
        *ret = v;
        *ret_n = (unsigned)n;
        return 0;
}

/* ------------------------------------------------------------ the plan at start */

struct plan_listener {
        hsm_chain_spec *specs;
        unsigned n, cap;
        bool bound; /* state.db has rows for it */
};

struct hsm_bindings_plan {
        const hsm_conf *conf;
        struct plan_listener *ls;
        hsm_listener_chains *set;
        unsigned n;
        struct strs strs;
        char **conf_strings;  /* hsm_chain_specs_from_conf's */
        hsm_chain_spec **conf_specs;
};

static int plan_add(struct plan_listener *pl, const hsm_chain_spec *s)
{
        if (pl->n == pl->cap) {
                unsigned cap = pl->cap ? 2 * pl->cap : 8;
                hsm_chain_spec *v = realloc(pl->specs, cap * sizeof(*v));
                if (!v)
                        return -ENOMEM;
                pl->specs = v;
                pl->cap = cap;
        }
        pl->specs[pl->n++] = *s;
        return 0;
}

struct row_list {
        struct strs *strs;
        struct {
                char *fp, *names, *kind;
        } r[256];
        unsigned n;
};

static int collect_row(const char *listener, const hsm_store_binding *b, void *ud)
{
        struct row_list *rl = ud;
        if (rl->n >= sizeof(rl->r) / sizeof(rl->r[0]))
                return 1;
        rl->r[rl->n].fp = keep(rl->strs, strdup(b->certificate));
        rl->r[rl->n].names = keep(rl->strs, strdup(b->names ? b->names : ""));
        rl->r[rl->n].kind = keep(rl->strs, strdup(b->kind));
        rl->n++;
        return 0;
}

static bool metas_clash(const struct leaf_meta *a, const char *const *names, unsigned n_names, const struct leaf_meta *b)
{
        if (a->pk != b->pk)
                return false;
        for (unsigned i = 0; i < a->n_names; i++) {
                if (n_names == 0) {
                        for (unsigned j = 0; j < b->n_names; j++)
                                if (strcasecmp(a->names[i], b->names[j]) == 0)
                                        return true;
                } else
                        for (unsigned j = 0; j < n_names; j++)
                                if (strcasecmp(a->names[i], names[j]) == 0)
                                        return true;
        }
        return false;
}

int hsm_bindings_plan_new(const hsm_conf *conf, hsm_store *store, hsm_bindings_plan **ret, char **errmsg)
{
        hsm_bindings_plan *p = calloc(1, sizeof(*p));
        if (!p)
                return -ENOMEM;
        p->conf = conf;
        p->n = conf->n_listeners;
        p->ls = calloc(p->n + 1, sizeof(*p->ls));
        p->set = calloc(p->n + 1, sizeof(*p->set));
        p->conf_specs = calloc(p->n + 1, sizeof(*p->conf_specs));
        p->conf_strings = NULL;
        char ***cstr = calloc(p->n + 1, sizeof(*cstr));
        struct row_list *rl = malloc(sizeof(*rl));
        int r = 0;
        if (!p->ls || !p->set || !p->conf_specs || !cstr || !rl) {
                r = -ENOMEM;
                goto out;
        }
        for (unsigned i = 0; i < p->n; i++) {
                const hsm_conf_listener *l = &conf->listeners[i];
                struct plan_listener *pl = &p->ls[i];
                hsm_chain_spec *cs = NULL;
                r = hsm_chain_specs_from_conf(conf, l, &cs, &cstr[i]);
                if (r < 0)
                        goto out;
                p->conf_specs[i] = cs;
                rl->strs = &p->strs;
                rl->n = 0;
                if (store && l->kind == HSM_LISTENER && hsm_store_bindings_list(store, l->name, collect_row, rl) < 0) {
                        hsm_set_error(errmsg, "state database: cannot read the bindings of listener %s", l->name);
                        r = -EIO;
                        goto out;
                }
                pl->bound = rl->n > 0;
                /* The file's chains: fingerprint and names of each. */
                struct leaf_meta *cm = calloc(l->n_chains + 1, sizeof(*cm));
                bool *used = calloc(l->n_chains + 1, sizeof(*used));
                if (!cm || !used) {
                        free(cm);
                        free(used);
                        r = -ENOMEM;
                        goto out;
                }
                for (unsigned j = 0; j < l->n_chains; j++) {
                        size_t len = 0;
                        char *pem = file_text(l->chains[j].cert, &len);
                        if (pem)
                                leaf_meta_of(pem, len, &cm[j]);
                        free(pem);
                }
                /* Rows in order: API chains, the file's chains where they
                 * were, tombstones. */
                struct leaf_meta am;
                for (unsigned k = 0; k < rl->n; k++) {
                        const char *fp = rl->r[k].fp, *kind = rl->r[k].kind;
                        if (strcmp(kind, "config") == 0 || strcmp(kind, "tombstone") == 0) {
                                for (unsigned j = 0; j < l->n_chains; j++)
                                        if (!used[j] && strcmp(cm[j].fp, fp) == 0) {
                                                used[j] = true;
                                                if (strcmp(kind, "config") == 0 && (r = plan_add(pl, &cs[j])) < 0)
                                                        break;
                                        }
                                if (r < 0)
                                        break;
                                continue;
                        }
                        char *pem = keep(&p->strs, stored_pem(store, fp));
                        if (!pem) {
                                hsm_err("listener %s: state.db binds certificate %s, which is no longer stored: left out", l->name,
                                        fp);
                                continue;
                        }
                        hsm_chain_spec s = { .source = "api", .cert_pem = pem };
                        if (names_from_json(&p->strs, rl->r[k].names, (const char ***)&s.names, &s.n_names) < 0) {
                                hsm_err("listener %s: state.db binding of %s has bad names: left out", l->name, fp);
                                continue;
                        }
                        char where[120];
                        snprintf(where, sizeof(where), "listener %s: binding of certificate %.64s (state.db)", l->name, fp);
                        s.cert_where = s.key_where = keep(&p->strs, strdup(where));
                        if ((r = plan_add(pl, &s)) < 0)
                                break;
                }
                /* File chains no row names (new in the file) come last. */
                for (unsigned j = 0; r == 0 && j < l->n_chains; j++)
                        if (!used[j])
                                r = plan_add(pl, &cs[j]);
                /* An API binding for the same names (and key type) replaces
                 * a file chain. */
                for (unsigned a = 0; r == 0 && a < pl->n; a++) {
                        if (strcmp(pl->specs[a].source, "api") != 0 ||
                            leaf_meta_of(pl->specs[a].cert_pem, strlen(pl->specs[a].cert_pem), &am) < 0)
                                continue;
                        for (unsigned b = 0; b < pl->n; b++) {
                                if (strcmp(pl->specs[b].source, "config") != 0)
                                        continue;
                                struct leaf_meta bm;
                                size_t len = 0;
                                char *pem = file_text(pl->specs[b].cert_file, &len);
                                int ok = pem ? leaf_meta_of(pem, len, &bm) : -ENOENT;
                                free(pem);
                                if (ok == 0 && metas_clash(&bm, pl->specs[a].names, pl->specs[a].n_names, &am)) {
                                        hsm_notice("listener %s: the API binding of certificate %.16s replaces %s of the "
                                                   "configuration file (the same names)",
                                                   l->name, am.fp, pl->specs[b].cert_file);
                                        memmove(&pl->specs[b], &pl->specs[b + 1], (pl->n - b - 1) * sizeof(pl->specs[0]));
                                        pl->n--;
                                        if (b < a)
                                                a--;
                                        b--;
                                }
                        }
                }
                free(cm);
                free(used);
                if (r < 0)
                        goto out;
                p->set[i] = (hsm_listener_chains){ .listener = l->name, .chains = pl->specs, .n_chains = pl->n, .conf = conf,
                                                   .settings = l };
        }
        p->conf_strings = (char **)cstr;
        cstr = NULL;
        *ret = p;
        p = NULL;
out:
        if (p) {
                p->conf_strings = (char **)cstr;
                cstr = NULL;
                hsm_bindings_plan_free(p);
        }
        free(cstr);
        free(rl);
        return r;
}

const hsm_listener_chains *hsm_bindings_plan_set(const hsm_bindings_plan *p, unsigned *ret_n)
{
        *ret_n = p->n;
        return p->set;
}

bool hsm_bindings_plan_bound(const hsm_bindings_plan *p, unsigned i)
{
        return i < p->n && p->ls[i].bound;
}

void hsm_bindings_plan_free(hsm_bindings_plan *p)
{
        if (!p)
                return;
        char ***cstr = (char ***)p->conf_strings;
        for (unsigned i = 0; i < p->n; i++) {
                if (p->ls)
                        free(p->ls[i].specs);
                if (p->conf_specs)
                        hsm_chain_specs_free(p->conf_specs[i], cstr ? cstr[i] : NULL);
        }
        free(cstr);
        free(p->conf_specs);
        free(p->ls);
        free(p->set);
        strs_done(&p->strs);
        free(p);
}

int hsm_admin_apply_bindings(const hsm_conf *conf, hsm_server *srv, hsm_store *store)
{
        hsm_bindings_plan *p = NULL;
        char *err = NULL;
        int r = hsm_bindings_plan_new(conf, store, &p, &err);
        if (r < 0) {
                hsm_err("%s", err ? err : strerror(-r));
                free(err);
                return r;
        }
        unsigned n = 0;
        const hsm_listener_chains *set = hsm_bindings_plan_set(p, &n);
        for (unsigned i = 0; i < n; i++) {
                if (!hsm_bindings_plan_bound(p, i))
                        continue;
                /* One listener at a time: one whose bindings cannot be
                 * built keeps the configuration file's chains. */
                r = hsm_server_commit(srv, &set[i], 1, NULL, NULL, &err);
                if (r < 0) {
                        hsm_err("listener %s: the bindings in state.db cannot be applied (%s): serving the configuration "
                                "file's chains", set[i].listener, err ? err : strerror(-r));
                        free(err);
                        err = NULL;
                } else
                        hsm_notice("listener %s: bindings from state.db applied over the configuration file", set[i].listener);
        }
        hsm_bindings_plan_free(p);
        return 0;
}

/* ------------------------------------------------------------ reading */

static json_t *bindings_of_creds(const hsm_creds *cr)
{
        json_t *arr = json_array();
        for (unsigned j = 0; cr && j < cr->n_chains; j++) {
                const hsm_chain_info *ci = &cr->chains[j];
                json_t *names = json_array();
                for (unsigned k = 0; k < ci->n_names; k++)
                        json_array_append_new(names, json_text(ci->names[k]));
                json_array_append_new(arr, json_pack("{s:s,s:o,s:s}", "certificate", ci->fingerprint, "names", names, "source",
                                                     ci->spec.source ? ci->spec.source : "config"));
        }
        return arr;
}

json_t *admin_listener_bindings(hsm_admin *a, const hsm_conf_listener *l)
{
        hsm_creds *cr = hsm_server_creds(a->srv, l->name);
        json_t *b = bindings_of_creds(cr);
        hsm_creds_unref(cr);
        return b;
}

/* ------------------------------------------------------------ changes */

enum change { BIND, REPLACE, UNBIND };

static bool valid_fp(const char *s)
{
        if (!s || strlen(s) != 64)
                return false;
        for (; *s; s++)
                if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'f')))
                        return false;
        return true;
}

/* If-Match: one of its (comma-separated) entity tags is etag. */
static bool if_match(const char *header, const char *etag)
{
        size_t el = strlen(etag);
        for (const char *p = header; *p;) {
                while (*p == ' ' || *p == '\t' || *p == ',')
                        p++;
                const char *e = p;
                while (*e && *e != ',')
                        e++;
                const char *t = e;
                while (t > p && (t[-1] == ' ' || t[-1] == '\t'))
                        t--;
                if ((size_t)(t - p) == el && memcmp(p, etag, el) == 0)
                        return true;
                p = e;
        }
        return false;
}

static int listener_status(int r)
{
        return r == -EEXIST ? 409 : 422;
}

/* The rows of state.db for listener l's new credentials: every chain in
 * order (API bindings with their names, the file's chains as markers of
 * where they are) and a tombstone for each file chain left out. */
static int persist(hsm_admin *a, const hsm_conf_listener *l, const hsm_creds *cr)
{
        hsm_store_binding rows[300];
        char *names[300] = { NULL };
        unsigned n = 0;
        for (unsigned i = 0; i < cr->n_chains && n < 256; i++) {
                const hsm_chain_info *ci = &cr->chains[i];
                bool api = strcmp(ci->spec.source, "api") == 0;
                if (api && ci->spec.n_names) {
                        json_t *arr = json_array();
                        for (unsigned k = 0; k < ci->spec.n_names; k++)
                                json_array_append_new(arr, json_string(ci->spec.names[k]));
                        names[n] = json_dumps(arr, JSON_COMPACT);
                        json_decref(arr);
                }
                rows[n] = (hsm_store_binding){ ci->fingerprint, names[n] ? names[n] : "", api ? "api" : "config" };
                n++;
        }
        /* File chains not served: tombstones. */
        char fps[64][65];
        unsigned nf = 0;
        for (unsigned j = 0; j < l->n_chains && nf < 64; j++) {
                size_t len = 0;
                char *pem = file_text(l->chains[j].cert, &len);
                struct leaf_meta m;
                if (pem && leaf_meta_of(pem, len, &m) == 0) {
                        bool served = false;
                        for (unsigned i = 0; i < cr->n_chains; i++)
                                served |= strcmp(cr->chains[i].fingerprint, m.fp) == 0;
                        if (!served && n < 300) {
                                memcpy(fps[nf], m.fp, 65);
                                rows[n++] = (hsm_store_binding){ fps[nf++], "", "tombstone" };
                        }
                }
                free(pem);
        }
        int r = a->store ? hsm_store_bindings_set(a->store, l->name, rows, n) : -ENODEV;
        for (unsigned i = 0; i < 300; i++)
                free(names[i]);
        return r;
}

static int change_bindings(struct req *r, enum change op)
{
        static const char *const allowed[] = { "certificate", "names", NULL };
        static const char *const actions[] = { "binding.add", "binding.replace", "binding.delete" };
        hsm_admin *a = r->a;
        const char *lname = r->seg[2];
        const char *path_fp = op == BIND ? NULL : r->seg[4];
        json_t *o = NULL;
        const char *cert = NULL;
        const char **names = NULL;
        unsigned n_names = 0;
        bool locked = false;
        hsm_creds *cur = NULL;
        hsm_chain_spec *specs = NULL;
        hsm_server_staged *st = NULL;
        char *pem = NULL, *err = NULL;
        char **conf_strings = NULL;
        hsm_chain_spec *conf_specs = NULL;
        char cwhere[96];

        r->action = actions[op];
        snprintf(r->detail, sizeof(r->detail), "listener=%.100s%s%.64s", lname, path_fp ? " fingerprint=" : "",
                 path_fp ? path_fp : "");
        /* From here to the swap: one change at a time. The listener and
         * the configuration are looked up under the lock: a reload that
         * held it has committed (and set a->conf) by then. */
        hsm_server_changes_lock(a->srv);
        locked = true;
        const hsm_conf *conf = __atomic_load_n(&a->conf, __ATOMIC_ACQUIRE);
        const hsm_conf_listener *l = NULL;
        for (unsigned i = 0; i < conf->n_listeners; i++)
                if (strcmp(conf->listeners[i].name, lname) == 0)
                        l = &conf->listeners[i];
        if (!l) {
                req_error(r, 404, "not_found", "listener", "no listener or connector named '%.100s'", lname);
                goto out;
        }
        if (l->kind != HSM_LISTENER) {
                req_error(r, 409, "conflict", "listener",
                          "%.100s is a connector: its client certificate chains are set in the configuration file", lname);
                goto out;
        }
        if (op != UNBIND) {
                o = req_body_object(r, allowed);
                if (!o)
                        goto out;
                bool bad = false;
                cert = req_string(r, o, "certificate", &bad);
                if (bad)
                        goto out;
                if (!cert) {
                        req_error(r, 400, "missing_field", "/certificate", "certificate is required (a SHA-256 fingerprint)");
                        goto out;
                }
                if (!valid_fp(cert)) {
                        req_error(r, 400, "invalid_field", "/certificate", "a fingerprint is 64 lowercase hex digits");
                        goto out;
                }
                json_t *nj = json_object_get(o, "names");
                if (nj) {
                        size_t i, n = json_is_array(nj) ? json_array_size(nj) : 0;
                        if (!json_is_array(nj) || n == 0 || n > 64) {
                                req_error(r, 400, "invalid_field", "/names",
                                          "names is a list of 1 to 64 DNS names (leave it out for the leaf's own names)");
                                goto out;
                        }
                        names = calloc(n, sizeof(*names));
                        json_t *v;
                        json_array_foreach(nj, i, v) {
                                const char *s = json_string_value(v);
                                if (!s || !*s || strlen(s) > 253 || strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-*") != strlen(s)) {
                                        req_error(r, 400, "invalid_field", "/names", "names[%zu] is not a DNS name", i);
                                        goto out;
                                }
                                names[n_names++] = s;
                        }
                }
                snprintf(r->detail, sizeof(r->detail), "listener=%.100s%s%.64s certificate=%.64s", lname,
                         path_fp ? " fingerprint=" : "", path_fp ? path_fp : "", cert);
        }
        const char *im = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_IF_MATCH);
        if (!im) {
                req_error(r, 428, "precondition_required", "If-Match",
                          "a change needs If-Match with the listener's ETag (GET /v1/listeners/%.100s)", lname);
                goto out;
        }
        cur = hsm_server_creds(a->srv, lname);
        if (!cur) {
                req_error(r, 404, "not_found", "listener", "no listener named '%.100s'", lname);
                goto out;
        }
        char etag[40];
        json_t *b = bindings_of_creds(cur);
        admin_etag_of(b, etag);
        json_decref(b);
        if (!if_match(im, etag)) {
                req_error(r, 412, "precondition_failed", "If-Match",
                          "the bindings of listener %.100s changed: If-Match %.80s is not its ETag %s", lname, im, etag);
                goto out;
        }
        /* The current set, then the change. */
        specs = calloc(cur->n_chains + 2, sizeof(*specs));
        if (!specs) {
                req_error(r, 500, "internal", NULL, "out of memory");
                goto out;
        }
        unsigned n = 0;
        int at = -1; /* the chain the change is about */
        for (unsigned i = 0; i < cur->n_chains; i++)
                specs[n++] = cur->chains[i].spec;
        if (path_fp) {
                for (unsigned i = 0; i < cur->n_chains; i++)
                        if (strcmp(cur->chains[i].fingerprint, path_fp) == 0)
                                at = (int)i;
                if (at < 0) {
                        req_error(r, 404, "not_found", "fingerprint", "listener %.100s serves no certificate %.64s", lname, path_fp);
                        goto out;
                }
        }
        if (cert) {
                for (unsigned i = 0; i < cur->n_chains; i++)
                        if (strcmp(cur->chains[i].fingerprint, cert) == 0 && (op == BIND || (int)i != at)) {
                                req_error(r, 409, "conflict", "/certificate", "listener %.100s serves certificate %.64s already",
                                          lname, cert);
                                goto out;
                        }
                hsm_chain_spec ns = { .source = "api" };
                pem = stored_pem(a->store, cert);
                if (pem)
                        ns.cert_pem = pem;
                else {
                        /* A chain of this listener's configuration file that
                         * the API unbound: bound again as it is in the file. */
                        if (hsm_chain_specs_from_conf(conf, l, &conf_specs, &conf_strings) == 0)
                                for (unsigned j = 0; j < l->n_chains; j++) {
                                        size_t len = 0;
                                        char *fpem = file_text(l->chains[j].cert, &len);
                                        struct leaf_meta m;
                                        if (fpem && leaf_meta_of(fpem, len, &m) == 0 && strcmp(m.fp, cert) == 0 && !n_names)
                                                ns = conf_specs[j];
                                        free(fpem);
                                }
                        if (!ns.cert_file) {
                                req_error(r, 404, "not_found", "/certificate",
                                          "no stored certificate %.64s (upload it first: POST /v1/certificates)", cert);
                                goto out;
                        }
                }
                if (op == REPLACE && !names && strcmp(specs[at].source, "api") == 0 && specs[at].n_names) {
                        /* Same names unless given. */
                        names = calloc(specs[at].n_names, sizeof(*names));
                        for (unsigned k = 0; names && k < specs[at].n_names; k++)
                                names[n_names++] = specs[at].names[k];
                }
                if (ns.cert_pem) {
                        ns.names = names;
                        ns.n_names = n_names;
                        snprintf(cwhere, sizeof(cwhere), "certificate %.64s", cert);
                        ns.cert_where = ns.key_where = cwhere;
                }
                if (op == BIND)
                        at = (int)n++;
                specs[at] = ns;
        } else { /* UNBIND */
                if (cur->n_chains == 1) {
                        req_error(r, 409, "conflict", "fingerprint",
                                  "certificate %.64s is the only chain of listener %.100s: bind another one first", path_fp, lname);
                        goto out;
                }
                memmove(&specs[at], &specs[at + 1], (n - (unsigned)at - 1) * sizeof(*specs));
                n--;
        }
        /* Build and check everything, off the hot path; nothing served
         * changes unless all of it passes. */
        hsm_listener_chains set = { .listener = lname, .chains = specs, .n_chains = n };
        int bad_chain = -1;
        int rr = hsm_server_stage(a->srv, &set, 1, &st, NULL, &bad_chain, &err);
        if (rr < 0) {
                const char *field = bad_chain == at && cert ? (rr == -EEXIST || (rr == -EINVAL && n_names) ? "/names" : "/certificate")
                                                            : NULL;
                req_error(r, (unsigned)listener_status(rr), rr == -EEXIST ? "conflict" : "unprocessable", field, "%s",
                          err ? err : strerror(-rr));
                goto out;
        }
        /* Staged creds know their chains: persist from them, then swap. */
        const hsm_creds *staged = hsm_server_staged_creds(st, 0);
        if (persist(a, l, staged) < 0) {
                req_error(r, 500, "internal", NULL, "cannot store the bindings in the state database; nothing changed");
                goto out;
        }
        hsm_server_stage_commit(a->srv, st);
        st = NULL;
        hsm_server_changes_unlock(a->srv);
        locked = false;
        json_t *lj = admin_listener_json(a, l, r->etag);
        char detail[sizeof(r->detail)];
        snprintf(detail, sizeof(detail), "%.300s etag=%s", r->detail, r->etag);
        memcpy(r->detail, detail, sizeof(detail));
        req_reply(r, op == BIND ? 201 : 200, lj);
out:
        if (st)
                hsm_server_stage_abort(st);
        if (locked)
                hsm_server_changes_unlock(a->srv);
        hsm_creds_unref(cur);
        free(specs);
        free(names);
        free(pem);
        free(err);
        hsm_chain_specs_free(conf_specs, conf_strings);
        json_decref(o);
        return 0;
}

int route_binding_add(struct req *r) { return change_bindings(r, BIND); }
int route_binding_replace(struct req *r) { return change_bindings(r, REPLACE); }
int route_binding_delete(struct req *r) { return change_bindings(r, UNBIND); }

/* Listeners (and names) whose live bindings serve certificate fp. */
json_t *admin_bound_listeners(hsm_admin *a, const char *fp)
{
        json_t *out = json_array();
        for (unsigned i = 0; i < a->conf->n_listeners; i++) {
                hsm_creds *cr = hsm_server_creds(a->srv, a->conf->listeners[i].name);
                for (unsigned j = 0; cr && j < cr->n_chains; j++)
                        if (strcmp(cr->chains[j].fingerprint, fp) == 0) {
                                json_t *names = json_array();
                                for (unsigned k = 0; k < cr->chains[j].n_names; k++)
                                        json_array_append_new(names, json_text(cr->chains[j].names[k]));
                                json_array_append_new(out, json_pack("{s:s,s:o}", "listener", a->conf->listeners[i].name, "names",
                                                                     names));
                        }
                hsm_creds_unref(cr);
        }
        return out;
}

/* [{listener, spki}]: the public key (SPKI SHA-256, hex) of every chain's
 * leaf that listeners and connectors serve now (their live credentials). */
json_t *admin_served_keys(hsm_admin *a)
{
        json_t *out = json_array();
        const hsm_conf *conf = a->conf;
        for (unsigned i = 0; i < conf->n_listeners; i++) {
                hsm_creds *cr = hsm_server_creds(a->srv, conf->listeners[i].name);
                for (unsigned j = 0; cr && j < cr->n_chains; j++) {
                        gnutls_x509_crt_t crt = NULL;
                        uint8_t spki[32];
                        char hex[65];
                        if (gnutls_x509_crt_init(&crt) >= 0 &&
                            gnutls_x509_crt_import(crt, &cr->chains[j].leaf, GNUTLS_X509_FMT_DER) >= 0 &&
                            admin_crt_spki(crt, spki) == 0) {
                                hex_encode(spki, 32, hex);
                                json_array_append_new(out, json_pack("{s:s,s:s}", "listener", conf->listeners[i].name, "spki", hex));
                        }
                        gnutls_x509_crt_deinit(crt);
                }
                hsm_creds_unref(cr);
        }
        return out;
}
