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
#include <stdarg.h>
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

/* The rows of state.db for one listener's new credentials. */
struct rowbuf {
        hsm_store_binding rows[300];
        char *names[300];
        char fps[64][65];
        unsigned n;
};

/* Every chain of listener l's new credentials cr in order (API bindings
 * with their names, the file's chains as markers of where they are) and a
 * tombstone for each file chain left out, into rb (its names freed by the
 * caller). */
static void rows_of(const hsm_conf_listener *l, const hsm_creds *cr, struct rowbuf *rb)
{
        unsigned n = 0;
        for (unsigned i = 0; i < cr->n_chains && n < 256; i++) {
                const hsm_chain_info *ci = &cr->chains[i];
                bool api = strcmp(ci->spec.source, "api") == 0;
                if (api && ci->spec.n_names) {
                        json_t *arr = json_array();
                        for (unsigned k = 0; k < ci->spec.n_names; k++)
                                json_array_append_new(arr, json_string(ci->spec.names[k]));
                        rb->names[n] = json_dumps(arr, JSON_COMPACT);
                        json_decref(arr);
                }
                rb->rows[n] = (hsm_store_binding){ ci->fingerprint, rb->names[n] ? rb->names[n] : "", api ? "api" : "config" };
                n++;
        }
        /* File chains not served: tombstones. */
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
                                memcpy(rb->fps[nf], m.fp, 65);
                                rb->rows[n++] = (hsm_store_binding){ rb->fps[nf++], "", "tombstone" };
                        }
                }
                free(pem);
        }
        rb->n = n;
}

/* ------------------------------------------------------------ transactions
 *
 * A change is an ordered list of operations (bind, replace, unbind), each
 * on one listener and carrying that listener's ETag. The single routes
 * (POST, PUT, DELETE .../bindings) are a change of one operation; POST
 * /v1/changes carries up to MAX_OPS. All of it runs under the server's
 * change lock: first every operation's listener and ETag are checked (404,
 * 428, 412); then the operations are applied in order to a working copy of
 * each listener's chains (404, 409); then the new credentials of every
 * listener touched are built and checked at once (hsm_server_stage: chain
 * against key, a test signature per key with the deadline, names unique on
 * each listener: 409, 422), written to state.db in one SQLite transaction,
 * and swapped in together (hsm_server_stage_commit). Or nothing changes
 * and the error names the operation (its index) and field. */

/* The most operations one POST /v1/changes may carry (README, api/openapi.yaml). */
#define MAX_OPS 16

enum field { F_NONE, F_OP, F_LISTENER, F_IF_MATCH, F_FINGERPRINT, F_CERTIFICATE, F_NAMES };

struct op {
        enum change kind;
        const char *listener;
        const char *fingerprint; /* replace, unbind: the served chain it is about */
        const char *certificate; /* bind, replace: the chain it binds */
        const char **names;      /* malloc'd (the strings are the request's or the served chain's) */
        unsigned n_names;
        const char *if_match;
        bool batch; /* POST /v1/changes: fields are /operations/INDEX/... */
        unsigned index;
        unsigned work; /* its listener's struct work */
        char *pem;     /* the stored chain it binds */
        char where[96];
};

static const char *const kind_names[] = { "bind", "replace", "unbind" };

static const char *op_field(const struct op *op, enum field f, char *buf, size_t size)
{
        static const char *const single[] = { NULL, NULL, "listener", "If-Match", "fingerprint", "/certificate", "/names" };
        static const char *const member[] = { "", "/op", "/listener", "/if_match", "/fingerprint", "/certificate", "/names" };
        if (!op->batch)
                return single[f];
        snprintf(buf, size, "/operations/%u%s", op->index, member[f]);
        return buf;
}

/* An error reply about operation op (its field f); returns -EINVAL. */
static int op_error(struct req *r, const struct op *op, unsigned status, const char *code, enum field f, const char *fmt, ...)
        __attribute__((format(printf, 6, 7)));
static int op_error(struct req *r, const struct op *op, unsigned status, const char *code, enum field f, const char *fmt, ...)
{
        char reason[400], fb[64];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(reason, sizeof(reason), fmt, ap);
        va_end(ap);
        if (op->batch)
                req_error(r, status, code, op_field(op, f, fb, sizeof(fb)), "operation %u (%s on %.100s): %s", op->index,
                          kind_names[op->kind], op->listener ? op->listener : "?", reason);
        else
                req_error(r, status, code, op_field(op, f, fb, sizeof(fb)), "%s", reason);
        return -EINVAL;
}

static void op_done(struct op *op)
{
        free(op->names);
        free(op->pem);
        op->names = NULL;
        op->pem = NULL;
}

/* certificate and names of a bind or replace: the single routes' body, or
 * one entry of operations. 0, or an error set. */
static int op_parse_body(struct req *r, json_t *o, struct op *op)
{
        json_t *cj = json_object_get(o, "certificate");
        if (cj && !json_is_string(cj))
                return op_error(r, op, 400, "invalid_field", F_CERTIFICATE, "certificate must be a string");
        op->certificate = json_string_value(cj);
        if (!op->certificate)
                return op_error(r, op, 400, "missing_field", F_CERTIFICATE, "certificate is required (a SHA-256 fingerprint)");
        if (!valid_fp(op->certificate))
                return op_error(r, op, 400, "invalid_field", F_CERTIFICATE, "a fingerprint is 64 lowercase hex digits");
        json_t *nj = json_object_get(o, "names");
        if (!nj)
                return 0;
        size_t i, n = json_is_array(nj) ? json_array_size(nj) : 0;
        if (!json_is_array(nj) || n == 0 || n > 64)
                return op_error(r, op, 400, "invalid_field", F_NAMES,
                                "names is a list of 1 to 64 DNS names (leave it out for the leaf's own names)");
        op->names = calloc(n, sizeof(*op->names));
        if (!op->names)
                return op_error(r, op, 500, "internal", F_NONE, "out of memory");
        json_t *v;
        json_array_foreach(nj, i, v) {
                const char *s = json_string_value(v);
                if (!s || !*s || strlen(s) > 253 ||
                    strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-*") != strlen(s))
                        return op_error(r, op, 400, "invalid_field", F_NAMES, "names[%zu] is not a DNS name", i);
                op->names[op->n_names++] = s;
        }
        return 0;
}

/* A string member of operation o: NULL when absent (an error set and *bad
 * when it is not a string). */
static const char *op_string(struct req *r, json_t *o, const char *name, enum field f, struct op *op, bool *bad)
{
        json_t *v = json_object_get(o, name);
        if (v && !json_is_string(v)) {
                op_error(r, op, 400, "invalid_field", f, "%s must be a string", name);
                *bad = true;
        }
        return json_string_value(v);
}

/* One entry of POST /v1/changes' operations. 0, or an error set. */
static int op_parse(struct req *r, json_t *o, struct op *op)
{
        static const char *const allowed[] = { "op", "listener", "fingerprint", "certificate", "names", "if_match", NULL };
        if (!json_is_object(o))
                return op_error(r, op, 400, "invalid_field", F_NONE,
                                "an operation is an object {op, listener, fingerprint, certificate, names, if_match}");
        const char *key;
        json_t *v;
        json_object_foreach(o, key, v) {
                bool known = false;
                for (unsigned k = 0; allowed[k]; k++)
                        known |= strcmp(key, allowed[k]) == 0;
                if (!known) {
                        char f[160];
                        snprintf(f, sizeof(f), "/operations/%u/%.100s", op->index, key);
                        req_error(r, 400, "unknown_field", f, "operation %u: unknown member '%.100s'", op->index, key);
                        return -EINVAL;
                }
        }
        bool bad = false;
        const char *kind = op_string(r, o, "op", F_OP, op, &bad);
        if (bad)
                return -EINVAL;
        if (!kind)
                return op_error(r, op, 400, "missing_field", F_OP, "op is required: bind, replace or unbind");
        unsigned k = 0;
        while (k < 3 && strcmp(kind, kind_names[k]) != 0)
                k++;
        if (k == 3)
                return op_error(r, op, 400, "invalid_field", F_OP, "op is bind, replace or unbind");
        op->kind = (enum change)k;
        op->listener = op_string(r, o, "listener", F_LISTENER, op, &bad);
        op->if_match = op_string(r, o, "if_match", F_IF_MATCH, op, &bad);
        op->fingerprint = op_string(r, o, "fingerprint", F_FINGERPRINT, op, &bad);
        if (bad)
                return -EINVAL;
        if (!op->listener || !*op->listener)
                return op_error(r, op, 400, "missing_field", F_LISTENER, "listener is required (a listener's name)");
        if (op->kind == BIND && op->fingerprint)
                return op_error(r, op, 400, "invalid_field", F_FINGERPRINT,
                                "a bind takes no fingerprint (certificate is the chain it binds)");
        if (op->kind != BIND && !op->fingerprint)
                return op_error(r, op, 400, "missing_field", F_FINGERPRINT,
                                "fingerprint is required: the served chain the %s is about", kind_names[op->kind]);
        if (op->fingerprint && !valid_fp(op->fingerprint))
                return op_error(r, op, 400, "invalid_field", F_FINGERPRINT, "a fingerprint is 64 lowercase hex digits");
        if (op->kind == UNBIND) {
                if (json_object_get(o, "certificate") || json_object_get(o, "names"))
                        return op_error(r, op, 400, "invalid_field", json_object_get(o, "names") ? F_NAMES : F_CERTIFICATE,
                                        "an unbind takes only listener, fingerprint and if_match");
                return 0;
        }
        return op_parse_body(r, o, op);
}

/* One listener a change touches: its served credentials and ETag, and the
 * working copy of its chains that the operations change. */
struct work {
        const hsm_conf_listener *l;
        hsm_creds *cur;
        char etag[40], new_etag[40];
        hsm_chain_spec *specs;
        const char **fps;
        int *origin; /* the operation that put specs[i] there; -1: served before */
        unsigned n;
        int last_op;
        hsm_chain_spec *conf_specs; /* the listener's file chains, when an operation needs them */
        char **conf_strings;
        json_t *json; /* the Listener after the commit */
};

static void work_done(struct work *w)
{
        hsm_creds_unref(w->cur);
        free(w->specs);
        free(w->fps);
        free(w->origin);
        hsm_chain_specs_free(w->conf_specs, w->conf_strings);
        json_decref(w->json);
}

/* Applies op to its listener's working set w (conf: the configuration its
 * file chains come from). 0, or an error set. */
static int op_apply(struct req *r, const hsm_conf *conf, struct work *w, struct op *op)
{
        int at = -1; /* the chain the operation is about */
        if (op->fingerprint) {
                for (unsigned i = 0; i < w->n; i++)
                        if (strcmp(w->fps[i], op->fingerprint) == 0)
                                at = (int)i;
                if (at < 0)
                        return op_error(r, op, 404, "not_found", F_FINGERPRINT, "listener %.100s serves no certificate %.64s",
                                        w->l->name, op->fingerprint);
        }
        if (op->kind == UNBIND) {
                if (w->n == 1)
                        return op_error(r, op, 409, "conflict", F_FINGERPRINT,
                                        "certificate %.64s is the only chain of listener %.100s: bind another one first",
                                        op->fingerprint, w->l->name);
                unsigned tail = w->n - (unsigned)at - 1;
                memmove(&w->specs[at], &w->specs[at + 1], tail * sizeof(*w->specs));
                memmove(&w->fps[at], &w->fps[at + 1], tail * sizeof(*w->fps));
                memmove(&w->origin[at], &w->origin[at + 1], tail * sizeof(*w->origin));
                w->n--;
                return 0;
        }
        for (unsigned i = 0; i < w->n; i++)
                if (strcmp(w->fps[i], op->certificate) == 0 && (op->kind == BIND || (int)i != at))
                        return op_error(r, op, 409, "conflict", F_CERTIFICATE, "listener %.100s serves certificate %.64s already",
                                        w->l->name, op->certificate);
        hsm_chain_spec ns = { .source = "api" };
        op->pem = stored_pem(r->a->store, op->certificate);
        if (op->pem)
                ns.cert_pem = op->pem;
        else {
                /* A chain of this listener's configuration file that the
                 * API unbound: bound again as it is in the file. */
                if (!w->conf_specs && hsm_chain_specs_from_conf(conf, w->l, &w->conf_specs, &w->conf_strings) < 0)
                        w->conf_specs = NULL;
                for (unsigned j = 0; w->conf_specs && j < w->l->n_chains; j++) {
                        size_t len = 0;
                        char *fpem = file_text(w->l->chains[j].cert, &len);
                        struct leaf_meta m;
                        if (fpem && leaf_meta_of(fpem, len, &m) == 0 && strcmp(m.fp, op->certificate) == 0 && !op->n_names)
                                ns = w->conf_specs[j];
                        free(fpem);
                }
                if (!ns.cert_file)
                        return op_error(r, op, 404, "not_found", F_CERTIFICATE,
                                        "no stored certificate %.64s (upload it first: POST /v1/certificates)", op->certificate);
        }
        if (op->kind == REPLACE && !op->names && strcmp(w->specs[at].source, "api") == 0 && w->specs[at].n_names) {
                /* Same names unless given. */
                op->names = calloc(w->specs[at].n_names, sizeof(*op->names));
                for (unsigned k = 0; op->names && k < w->specs[at].n_names; k++)
                        op->names[op->n_names++] = w->specs[at].names[k];
        }
        if (ns.cert_pem) {
                ns.names = op->names;
                ns.n_names = op->n_names;
                snprintf(op->where, sizeof(op->where), "certificate %.64s", op->certificate);
                ns.cert_where = ns.key_where = op->where;
        }
        if (op->kind == BIND)
                at = (int)w->n++;
        w->specs[at] = ns;
        w->fps[at] = op->certificate;
        w->origin[at] = (int)op->index;
        return 0;
}

/* The audit detail of a committed change: each operation, then each
 * listener's new ETag. */
static void describe(struct req *r, const struct op *ops, unsigned n, const struct work *ws, unsigned nw)
{
        char *d = r->detail;
        size_t size = sizeof(r->detail), off = 0;
#define ADD(...) (off += off < size ? (size_t)snprintf(d + off, size - off, __VA_ARGS__) : 0)
        bool batch = ops[0].batch;
        if (batch)
                ADD("operations=%u", n);
        for (unsigned i = 0; i < n; i++) {
                if (batch)
                        ADD("; [%u] %s ", i, kind_names[ops[i].kind]);
                ADD("listener=%.100s", ops[i].listener);
                if (ops[i].fingerprint)
                        ADD(" fingerprint=%.64s", ops[i].fingerprint);
                if (ops[i].certificate)
                        ADD(" certificate=%.64s", ops[i].certificate);
        }
        for (unsigned k = 0; k < nw; k++)
                if (batch)
                        ADD("%s %.100s=%s", k ? "" : "; etags:", ws[k].l->name, ws[k].new_etag);
                else
                        ADD(" etag=%s", ws[k].new_etag);
#undef ADD
}

/* Every touched listener's rows, in one SQLite transaction. */
static int persist(hsm_admin *a, const struct work *ws, unsigned nw, const hsm_server_staged *st)
{
        if (!a->store)
                return -ENODEV;
        struct rowbuf *rb = calloc(nw, sizeof(*rb));
        hsm_store_listener_rows ls[MAX_OPS];
        if (!rb)
                return -ENOMEM;
        for (unsigned k = 0; k < nw; k++) {
                rows_of(ws[k].l, hsm_server_staged_creds(st, k), &rb[k]);
                ls[k] = (hsm_store_listener_rows){ ws[k].l->name, rb[k].rows, rb[k].n };
        }
        int r = hsm_store_bindings_set_many(a->store, ls, nw);
        for (unsigned k = 0; k < nw; k++)
                for (unsigned i = 0; i < 300; i++)
                        free(rb[k].names[i]);
        free(rb);
        return r;
}

/* Runs ops[0..n) (parsed, 1 <= n <= MAX_OPS) as one transaction and sets
 * the reply: a single route's Listener, or POST /v1/changes' listeners. */
static void run_change(struct req *r, struct op *ops, unsigned n)
{
        hsm_admin *a = r->a;
        struct work ws[MAX_OPS];
        hsm_listener_chains set[MAX_OPS];
        unsigned nw = 0;
        hsm_server_staged *st = NULL;
        char *err = NULL;
        memset(ws, 0, sizeof(ws));
        /* From here to the swap: one change at a time. The listeners and
         * the configuration are looked up under the lock: a reload that
         * held it has committed (and set a->conf) by then. */
        if (admin_changes_lock(r) < 0)
                return;
        bool locked = true;
        const hsm_conf *conf = __atomic_load_n(&a->conf, __ATOMIC_ACQUIRE);
        /* Preconditions first: every operation's listener and its ETag. */
        for (unsigned i = 0; i < n; i++) {
                struct op *op = &ops[i];
                const hsm_conf_listener *l = NULL;
                for (unsigned k = 0; k < conf->n_listeners; k++)
                        if (strcmp(conf->listeners[k].name, op->listener) == 0)
                                l = &conf->listeners[k];
                if (!l) {
                        op_error(r, op, 404, "not_found", F_LISTENER, "no listener or connector named '%.100s'", op->listener);
                        goto out;
                }
                if (l->kind != HSM_LISTENER) {
                        op_error(r, op, 409, "conflict", F_LISTENER,
                                 "%.100s is a connector: its client certificate chains are set in the configuration file",
                                 op->listener);
                        goto out;
                }
                if (!op->if_match) {
                        op_error(r, op, 428, "precondition_required", F_IF_MATCH,
                                 "a change needs %s with the listener's ETag (GET /v1/listeners/%.100s)",
                                 op->batch ? "if_match" : "If-Match", op->listener);
                        goto out;
                }
                unsigned k = 0;
                while (k < nw && ws[k].l != l)
                        k++;
                struct work *w = &ws[k];
                if (k == nw) {
                        nw++;
                        w->l = l;
                        w->cur = hsm_server_creds(a->srv, l->name);
                        if (!w->cur) {
                                op_error(r, op, 404, "not_found", F_LISTENER, "no listener named '%.100s'", op->listener);
                                goto out;
                        }
                        json_t *b = bindings_of_creds(w->cur);
                        admin_etag_of(b, w->etag);
                        json_decref(b);
                        unsigned cap = w->cur->n_chains + n + 1;
                        w->specs = calloc(cap, sizeof(*w->specs));
                        w->fps = calloc(cap, sizeof(*w->fps));
                        w->origin = calloc(cap, sizeof(*w->origin));
                        if (!w->specs || !w->fps || !w->origin) {
                                req_error(r, 500, "internal", NULL, "out of memory");
                                goto out;
                        }
                        for (unsigned j = 0; j < w->cur->n_chains; j++) {
                                w->specs[j] = w->cur->chains[j].spec;
                                w->fps[j] = w->cur->chains[j].fingerprint;
                                w->origin[j] = -1;
                        }
                        w->n = w->cur->n_chains;
                }
                if (!if_match(op->if_match, w->etag)) {
                        op_error(r, op, 412, "precondition_failed", F_IF_MATCH,
                                 "the bindings of listener %.100s changed: %s %.80s is not its ETag %s", op->listener,
                                 op->batch ? "if_match" : "If-Match", op->if_match, w->etag);
                        goto out;
                }
                op->work = k;
                w->last_op = (int)i;
        }
        /* The operations, in order, on the working copies. */
        for (unsigned i = 0; i < n; i++)
                if (op_apply(r, conf, &ws[ops[i].work], &ops[i]) < 0)
                        goto out;
        /* Build and check every touched listener's new set at once, off
         * the hot path; nothing served changes unless all of it passes. */
        for (unsigned k = 0; k < nw; k++)
                set[k] = (hsm_listener_chains){ .listener = ws[k].l->name, .chains = ws[k].specs, .n_chains = ws[k].n };
        int bad_l = -1, bad_c = -1;
        int rr = hsm_server_stage(a->srv, set, nw, &st, &bad_l, &bad_c, &err);
        if (rr < 0) {
                const struct work *w = &ws[bad_l >= 0 && (unsigned)bad_l < nw ? (unsigned)bad_l : 0];
                int oi = bad_c >= 0 && (unsigned)bad_c < w->n ? w->origin[bad_c] : -1;
                enum field f = F_NONE;
                if (oi >= 0 && ops[oi].certificate)
                        f = rr == -EEXIST || (rr == -EINVAL && ops[oi].n_names) ? F_NAMES : F_CERTIFICATE;
                op_error(r, &ops[oi >= 0 ? oi : w->last_op], (unsigned)listener_status(rr),
                         rr == -EEXIST ? "conflict" : "unprocessable", f, "%s", err ? err : strerror(-rr));
                goto out;
        }
        /* Staged credentials know their chains: persist from them (all
         * listeners in one SQLite transaction), then swap them all in. */
        if (persist(a, ws, nw, st) < 0) {
                req_error(r, 500, "internal", NULL, "cannot store the bindings in the state database; nothing changed");
                goto out;
        }
        hsm_server_stage_commit(a->srv, st);
        st = NULL;
        for (unsigned k = 0; k < nw; k++)
                ws[k].json = admin_listener_json(a, ws[k].l, ws[k].new_etag);
        hsm_server_changes_unlock(a->srv);
        locked = false;
        describe(r, ops, n, ws, nw);
        if (!ops[0].batch) {
                snprintf(r->etag, sizeof(r->etag), "%s", ws[0].new_etag);
                req_reply(r, ops[0].kind == BIND ? 201 : 200, ws[0].json);
                ws[0].json = NULL;
        } else {
                json_t *list = json_array();
                for (unsigned k = 0; k < nw; k++) {
                        json_array_append_new(list, ws[k].json);
                        ws[k].json = NULL;
                }
                req_reply(r, 200, json_pack("{s:o,s:i}", "listeners", list, "operations", (int)n));
        }
out:
        hsm_server_stage_abort(st);
        if (locked)
                hsm_server_changes_unlock(a->srv);
        for (unsigned k = 0; k < nw; k++)
                work_done(&ws[k]);
        free(err);
}

/* POST, PUT, DELETE /v1/listeners/{listener}/bindings[/{fingerprint}]: a
 * change of one operation (If-Match in its header). */
static int change_bindings(struct req *r, enum change kind)
{
        static const char *const allowed[] = { "certificate", "names", NULL };
        static const char *const actions[] = { "binding.add", "binding.replace", "binding.delete" };
        struct op op = { .kind = kind, .listener = r->seg[2], .fingerprint = kind == BIND ? NULL : r->seg[4] };
        json_t *o = NULL;
        r->action = actions[kind];
        snprintf(r->detail, sizeof(r->detail), "listener=%.100s%s%.64s", op.listener, op.fingerprint ? " fingerprint=" : "",
                 op.fingerprint ? op.fingerprint : "");
        if (kind != UNBIND && (!(o = req_body_object(r, allowed)) || op_parse_body(r, o, &op) < 0))
                goto out;
        op.if_match = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_IF_MATCH);
        run_change(r, &op, 1);
out:
        op_done(&op);
        json_decref(o);
        return 0;
}

int route_binding_add(struct req *r) { return change_bindings(r, BIND); }
int route_binding_replace(struct req *r) { return change_bindings(r, REPLACE); }
int route_binding_delete(struct req *r) { return change_bindings(r, UNBIND); }

/* POST /v1/changes: {"operations": [{op, listener, fingerprint,
 * certificate, names, if_match}, ...]}, all or nothing. */
int route_changes(struct req *r)
{
        static const char *const allowed[] = { "operations", NULL };
        struct op ops[MAX_OPS];
        unsigned n = 0;
        memset(ops, 0, sizeof(ops));
        r->action = "bindings.change";
        json_t *o = req_body_object(r, allowed);
        if (!o)
                goto out;
        json_t *list = json_object_get(o, "operations");
        if (!list) {
                req_error(r, 400, "missing_field", "/operations",
                          "operations is required: a list of 1 to %d bind, replace or unbind operations", MAX_OPS);
                goto out;
        }
        if (!json_is_array(list) || json_array_size(list) == 0 || json_array_size(list) > MAX_OPS) {
                req_error(r, 400, "invalid_field", "/operations",
                          "operations is a list of 1 to %d operations (one change; split a larger one)", MAX_OPS);
                goto out;
        }
        for (unsigned i = 0; i < json_array_size(list); i++) {
                ops[i].batch = true;
                ops[i].index = i;
                n = i + 1;
                if (op_parse(r, json_array_get(list, i), &ops[i]) < 0)
                        goto out;
        }
        run_change(r, ops, n);
out:
        for (unsigned i = 0; i < n; i++)
                op_done(&ops[i]);
        json_decref(o);
        return 0;
}

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
