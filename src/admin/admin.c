/* The admin HTTP server: libmicrohttpd on an internal thread pool, the
 * request life cycle (limits, body, identity, route, reply, audit). */
#include "internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "usage.h"

/* ------------------------------------------------------------ helpers */

void fmt_time(int64_t t, char *buf, size_t size)
{
        time_t tt = (time_t)t;
        struct tm tm;
        gmtime_r(&tt, &tm);
        strftime(buf, size, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

int req_reply(struct req *r, unsigned status, json_t *json)
{
        json_decref(r->json);
        r->status = status;
        r->json = json;
        return 0;
}

int req_error(struct req *r, unsigned status, const char *code, const char *field, const char *fmt, ...)
{
        char reason[700];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(reason, sizeof(reason), fmt, ap);
        va_end(ap);
        json_t *e = json_pack("{s:{s:s,s:o,s:o}}", "error", "code", code, "field", json_text(field), "reason",
                              json_text(reason));
        snprintf(r->detail, sizeof(r->detail), "%s%s%s: %s", code, field ? " " : "", field ? field : "", reason);
        return req_reply(r, status, e);
}

int admin_changes_lock(struct req *r)
{
        char what[300], why[500];
        /* Half the idle timeout: a request queued behind this one on the
         * same admin thread is still answered (not closed as idle). */
        unsigned ms = r->a->conf->admin.timeout_ms / 2;
        snprintf(what, sizeof(what), "%s %.200s by %.60s", r->method, r->url, r->who);
        uint64_t t0 = hsm_now_ns();
        if (hsm_server_changes_lock_wait(r->a->srv, ms, what, why, sizeof(why)) == 0)
                return 0;
        double waited = (double)(hsm_now_ns() - t0) / 1e9;
        hsm_warn("admin: %s %s by %s refused after waiting %.1f s for the change lock: %s", r->method, r->url, r->who,
                 waited, why);
        req_error(r, 503, "busy", NULL,
                  "the change lock is held: %s (waited %.1f s; its holder is not waited for once stuck %.1f s in one step "
                  "or token call, half the [admin] timeout); nothing was changed",
                  why, waited, ms / 1000.0);
        return -ETIMEDOUT;
}

const char *req_query(struct req *r, const char *name)
{
        return MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, name);
}

json_t *req_body_object(struct req *r, const char *const *allowed)
{
        const char *ct = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_TYPE);
        if (!ct || strncasecmp(ct, "application/json", 16) != 0 || (ct[16] && ct[16] != ';' && ct[16] != ' ')) {
                req_error(r, 415, "unsupported_media_type", "Content-Type", "the body must be application/json");
                return NULL;
        }
        json_t *o = NULL;
        struct admin_perr e;
        if (admin_parse_object(r->body ? r->body : "", r->body_len, allowed, &o, &e) < 0) {
                req_perr(r, &e);
                return NULL;
        }
        return o;
}

int req_perr(struct req *r, const struct admin_perr *e)
{
        return req_error(r, e->status, e->code, e->field[0] ? e->field : NULL, "%s", e->reason);
}

const char *req_string(struct req *r, json_t *o, const char *name, bool *bad)
{
        json_t *v = json_object_get(o, name);
        if (!v)
                return NULL;
        if (!json_is_string(v)) {
                char f[100];
                snprintf(f, sizeof(f), "/%s", name);
                req_error(r, 400, "invalid_field", f, "%s must be a string", name);
                *bad = true;
                return NULL;
        }
        return json_string_value(v);
}

/* ------------------------------------------------------------ routing */

typedef int (*route_fn)(struct req *r);

struct route {
        const char *method; /* NULL: any; the handler checks */
        const char *pattern; /* segments; "*" matches one */
        route_fn fn;
        enum hsm_admin_role role; /* NONE: unauthenticated */
};

static const struct route routes[] = {
        { "GET", "v1/live", route_live, HSM_ROLE_NONE },
        { "GET", "v1/whoami", route_whoami, HSM_ROLE_READ },
        { "GET", "v1/health", route_health, HSM_ROLE_READ },
        { "GET", "v1/tokens", route_tokens, HSM_ROLE_READ },
        { "GET", "v1/tokens/*", route_token, HSM_ROLE_READ },
        { "GET", "v1/keys", route_keys, HSM_ROLE_READ },
        { "POST", "v1/keys", route_key_generate, HSM_ROLE_ADMIN },
        { "GET", "v1/keys/*/*", route_key, HSM_ROLE_READ },
        { "DELETE", "v1/keys/*/*", route_key_delete, HSM_ROLE_ADMIN },
        { "POST", "v1/keys/*/*/csr", route_key_csr, HSM_ROLE_ADMIN },
        { "GET", "v1/certificates", route_certificates, HSM_ROLE_READ },
        { "POST", "v1/certificates", route_certificate_upload, HSM_ROLE_ADMIN },
        { "GET", "v1/certificates/*", route_certificate, HSM_ROLE_READ },
        { "DELETE", "v1/certificates/*", route_certificate_delete, HSM_ROLE_ADMIN },
        { "GET", "v1/listeners", route_listeners, HSM_ROLE_READ },
        { "GET", "v1/listeners/*", route_listener, HSM_ROLE_READ },
        { "POST", "v1/listeners/*/bindings", route_binding_add, HSM_ROLE_ADMIN },
        { "PUT", "v1/listeners/*/bindings/*", route_binding_replace, HSM_ROLE_ADMIN },
        { "DELETE", "v1/listeners/*/bindings/*", route_binding_delete, HSM_ROLE_ADMIN },
        { "POST", "v1/changes", route_changes, HSM_ROLE_ADMIN },
        { "GET", "v1/usage", route_usage, HSM_ROLE_READ },
        { "GET", "metrics", route_metrics, HSM_ROLE_READ },
        { "GET", "v1/audit", route_audit, HSM_ROLE_READ },
        { "GET", "v1/audit/verify", route_audit_verify, HSM_ROLE_READ },
};

static bool match(const char *pattern, struct req *r)
{
        char buf[128];
        snprintf(buf, sizeof(buf), "%s", pattern);
        unsigned n = 0;
        char *save = NULL;
        for (char *p = strtok_r(buf, "/", &save); p; p = strtok_r(NULL, "/", &save), n++) {
                if (n >= r->n_seg)
                        return false;
                if (strcmp(p, "*") != 0 && strcmp(p, r->seg[n]) != 0)
                        return false;
        }
        return n == r->n_seg;
}

static void split_path(struct req *r)
{
        r->path_copy = strdup(r->url);
        r->n_seg = 0;
        if (!r->path_copy)
                return;
        char *save = NULL;
        for (char *p = strtok_r(r->path_copy, "/", &save); p && r->n_seg < 8; p = strtok_r(NULL, "/", &save))
                r->seg[r->n_seg++] = p;
}

static void dispatch(struct req *r)
{
        split_path(r);
        const struct route *found = NULL;
        bool path_known = false;
        for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++) {
                if (!match(routes[i].pattern, r))
                        continue;
                path_known = true;
                if (strcmp(routes[i].method, r->method) == 0 ||
                    (strcmp(r->method, "HEAD") == 0 && strcmp(routes[i].method, "GET") == 0)) {
                        found = &routes[i];
                        break;
                }
        }
        bool change = strcmp(r->method, "GET") != 0 && strcmp(r->method, "HEAD") != 0;
        r->action = change ? "change" : "read";
        if (!found || found->role != HSM_ROLE_NONE) {
                /* Who, before anything else is said (even "no such route"). */
                if (admin_authenticate(r) < 0)
                        return;
        }
        if (!found) {
                if (path_known)
                        req_error(r, 405, "method_not_allowed", NULL, "%s is not allowed on %s", r->method, r->url);
                else
                        req_error(r, 404, "not_found", NULL, "no route %s", r->url);
                return;
        }
        if (found->role == HSM_ROLE_ADMIN && r->role != HSM_ROLE_ADMIN) {
                r->action = "auth.forbidden";
                req_error(r, 403, "forbidden", NULL, "role read may not change anything");
                return;
        }
        if (r->too_large) {
                req_error(r, 413, "payload_too_large", NULL, "the body is larger than %u bytes (max_body)",
                          r->a->conf->admin.max_body);
                return;
        }
        if (change && r->a->store) {
                /* No change without its audit record: the record that it
                 * is about to be made is in the chain before it runs (the
                 * outcome follows in audit()), or nothing is done. */
                char why[200];
                if (hsm_store_audit_begin(r->a->store, 2000, r->who, r->peer, r->method, r->url, &r->begin_seq, why,
                                          sizeof(why)) < 0) {
                        r->audit_down = true;
                        req_error(r, 503, "audit_unavailable", NULL,
                                  "the audit log cannot be written (%s); nothing was changed", why);
                        return;
                }
        }
        found->fn(r);
}

/* ------------------------------------------------------------ MHD glue */

static enum MHD_Result send_reply(struct req *r)
{
        char *data = NULL;
        size_t len = 0;
        const char *ct = "application/json";
        if (r->text) {
                data = r->text;
                r->text = NULL;
                len = strlen(data);
                ct = "text/plain; version=0.0.4; charset=utf-8";
        } else if (r->json) {
                data = json_dumps(r->json, JSON_COMPACT);
                if (data) {
                        len = strlen(data);
                        /* a trailing newline, for curl users */
                        char *d2 = realloc(data, len + 2);
                        if (d2) {
                                data = d2;
                                data[len++] = '\n';
                                data[len] = 0;
                        }
                }
        }
        struct MHD_Response *resp = data ? MHD_create_response_from_buffer(len, data, MHD_RESPMEM_MUST_FREE)
                                         : MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
        if (!resp) {
                free(data);
                return MHD_NO;
        }
        if (data)
                MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ct);
        if (r->location[0])
                MHD_add_response_header(resp, MHD_HTTP_HEADER_LOCATION, r->location);
        if (r->etag[0])
                MHD_add_response_header(resp, MHD_HTTP_HEADER_ETAG, r->etag);
        if (r->status == 401)
                MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer realm=\"hsmtls\"");
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
        enum MHD_Result ret = MHD_queue_response(r->conn, r->status, resp);
        MHD_destroy_response(resp);
        return ret;
}

static void audit(struct req *r)
{
        if (!r->a->store)
                return;
        admin_audit_flush_summaries(r->a, false);
        bool change = strcmp(r->method, "GET") != 0 && strcmp(r->method, "HEAD") != 0;
        if (!change && r->status < 400)
                return; /* reads that succeed are not audited */
        if (r->audit_down)
                return; /* logged by hsm_store_audit_begin */
        /* Requests refused before anyone was identified (no credential, a
         * wrong one): rate-limited per client address (audit.c). Those of
         * an identity are always written: it is accountable, and can be
         * revoked. */
        if (r->status >= 400 && r->role == HSM_ROLE_NONE && !admin_audit_admit(r->a, r->peer, (int)r->status))
                return;
        /* A refused request keeps the name of what it asked for; its status
         * says it was refused. */
        const char *action = r->action ? r->action : "?";
        char path[256], detail[sizeof(r->detail) + 40];
        snprintf(path, sizeof(path), "%s", r->url);
        if (r->begin_seq)
                snprintf(detail, sizeof(detail), "%s%sbegun at seq %lld", r->detail, r->detail[0] ? "; " : "",
                         (long long)r->begin_seq);
        else
                snprintf(detail, sizeof(detail), "%s", r->detail);
        if (hsm_store_audit(r->a->store, r->who[0] ? r->who : "-", r->peer, r->method, path, action, (int)r->status,
                            detail, NULL) < 0 &&
            change && r->status < 400)
                /* Its change.begin record is in the chain (see dispatch);
                 * the outcome is not: said once, here. */
                hsm_err("audit: %s %s by %s was made (status %u) but its outcome record could not be written (its "
                        "change.begin record is seq %lld)",
                        r->method, path, r->who, r->status, (long long)r->begin_seq);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_data_size, void **req_cls)
{
        hsm_admin *a = cls;
        struct req *r = *req_cls;
        if (!r) {
                r = calloc(1, sizeof(*r));
                if (!r)
                        return MHD_NO;
                r->a = a;
                r->conn = conn;
                r->method = method;
                r->url = url;
                const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
                if (ci && ci->client_addr && ci->client_addr->sa_family != AF_UNIX)
                        hsm_sockaddr_format(ci->client_addr,
                                            ci->client_addr->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                                                   : sizeof(struct sockaddr_in),
                                            r->peer, sizeof(r->peer));
                else
                        snprintf(r->peer, sizeof(r->peer), "unix");
                *req_cls = r;
                /* A declared body past the limit: refused before it is read. */
                const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
                if (cl && strtoull(cl, NULL, 10) > a->conf->admin.max_body) {
                        /* Answered now, before the body is read: the
                         * connection is closed after the reply. */
                        r->too_large = true;
                        r->first_done = true;
                        dispatch(r);
                        audit(r);
                        return send_reply(r);
                }
                return MHD_YES;
        }
        if (*upload_data_size > 0) {
                if (!r->too_large && r->body_len + *upload_data_size <= a->conf->admin.max_body) {
                        char *n = realloc(r->body, r->body_len + *upload_data_size + 1);
                        if (!n)
                                return MHD_NO;
                        r->body = n;
                        memcpy(r->body + r->body_len, upload_data, *upload_data_size);
                        r->body_len += *upload_data_size;
                        r->body[r->body_len] = 0;
                } else
                        r->too_large = true;
                *upload_data_size = 0;
                return MHD_YES;
        }
        if (r->first_done)
                return MHD_YES;
        r->first_done = true;
        dispatch(r);
        audit(r);
        return send_reply(r);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **req_cls, enum MHD_RequestTerminationCode toe)
{
        struct req *r = *req_cls;
        if (!r)
                return;
        json_decref(r->json);
        free(r->text);
        free(r->body);
        free(r->path_copy);
        free(r);
        *req_cls = NULL;
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
        char buf[512];
        vsnprintf(buf, sizeof(buf), fmt, ap);
        size_t n = strlen(buf);
        while (n && buf[n - 1] == '\n')
                buf[--n] = 0;
        hsm_debug("admin: %s", buf);
}

static int bind_socket(hsm_admin *a, char **errmsg)
{
        const hsm_addr *ad = &a->conf->admin.listen;
        int fam = ad->ss.ss_family;
        int fd = socket(fam, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0) {
                hsm_set_error(errmsg, "[admin] listen %s: socket: %s", ad->text, strerror(errno));
                return -errno;
        }
        int one = 1;
        if (fam == AF_UNIX) {
                const struct sockaddr_un *un = (const void *)&ad->ss;
                a->unix_path = strdup(un->sun_path);
                struct stat sb;
                /* A stale socket from an earlier run; never remove anything else. */
                if (lstat(un->sun_path, &sb) == 0 && S_ISSOCK(sb.st_mode))
                        unlink(un->sun_path);
        } else
                setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, (const struct sockaddr *)&ad->ss, ad->len) < 0) {
                int e = errno;
                hsm_set_error(errmsg, "[admin] listen %s: bind: %s", ad->text, strerror(e));
                close(fd);
                free(a->unix_path);
                a->unix_path = NULL;
                return -e;
        }
        /* Mode 0600 before listen(): nobody can connect in between. */
        if (fam == AF_UNIX && chmod(a->unix_path, 0600) < 0) {
                int e = errno;
                hsm_set_error(errmsg, "[admin] listen %s: chmod 0600: %s", ad->text, strerror(e));
                close(fd);
                return -e;
        }
        if (listen(fd, 64) < 0) {
                int e = errno;
                hsm_set_error(errmsg, "[admin] listen %s: listen: %s", ad->text, strerror(e));
                close(fd);
                return -e;
        }
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        if (getsockname(fd, (struct sockaddr *)&ss, &len) == 0)
                hsm_sockaddr_format((struct sockaddr *)&ss, len, a->address, sizeof(a->address));
        a->fd = fd;
        return 0;
}

static char *read_file(const char *path)
{
        FILE *f = fopen(path, "re");
        if (!f)
                return NULL;
        char *buf = NULL;
        size_t len = 0;
        FILE *m = open_memstream(&buf, &len);
        char chunk[4096];
        size_t n;
        while (m && (n = fread(chunk, 1, sizeof(chunk), f)) > 0)
                fwrite(chunk, 1, n, m);
        fclose(f);
        if (m)
                fclose(m);
        return buf;
}

/* HTTPS with the admin key on a token: libmicrohttpd asks for the
 * certificate through a callback without a user pointer, so the one admin
 * server of the process keeps its credentials here. */
static hsm_admin *tls_admin;

static int tls_retrieve(gnutls_session_t s, const gnutls_datum_t *req_ca_dn, int nreqs,
                        const gnutls_pk_algorithm_t *pk_algos, int pk_algos_length, gnutls_pcert_st **pcert,
                        unsigned int *pcert_length, gnutls_privkey_t *pkey)
{
        hsm_admin *a = __atomic_load_n(&tls_admin, __ATOMIC_ACQUIRE);
        if (!a || !a->tls_privkey)
                return -1;
        *pcert = a->tls_pcerts;
        *pcert_length = a->n_tls_pcerts;
        *pkey = a->tls_privkey; /* stays ours: GnuTLS does not free it */
        return 0;
}

static int tls_token_credentials(hsm_admin *a, char **errmsg)
{
        const hsm_conf_admin *ac = &a->conf->admin;
        int r = -ENOENT;
        char *err = NULL;
        for (unsigned i = 0; i < hsm_keystore_n_tokens(a->ks) && !a->tls_token_key; i++) {
                free(err);
                err = NULL;
                r = hsm_token_find_key(hsm_keystore_token(a->ks, i), ac->tls_key, &a->tls_token_key, &err);
                if (r == -ENODEV)
                        continue;
                if (r < 0)
                        break;
        }
        if (!a->tls_token_key) {
                hsm_set_error(errmsg, "%s:%d: [admin] tls_key %s: %s", a->conf->path, ac->tls_line, ac->tls_key,
                              err ? err : "on no configured token");
                free(err);
                return r < 0 ? r : -ENOENT;
        }
        free(err);
        unsigned max = 16;
        a->tls_pcerts = calloc(max, sizeof(*a->tls_pcerts));
        gnutls_datum_t d = { (unsigned char *)a->tls_cert_pem, (unsigned)strlen(a->tls_cert_pem) };
        if (!a->tls_pcerts ||
            gnutls_pcert_list_import_x509_raw(a->tls_pcerts, &max, &d, GNUTLS_X509_FMT_PEM, 0) < 0 || max == 0) {
                hsm_set_error(errmsg, "%s:%d: [admin] tls_cert %s does not parse", a->conf->path, ac->tls_line,
                              ac->tls_cert);
                return -EINVAL;
        }
        a->n_tls_pcerts = max;
        gnutls_x509_crt_t leaf;
        if (gnutls_x509_crt_init(&leaf) < 0)
                return -ENOMEM;
        r = gnutls_x509_crt_import(leaf, &a->tls_pcerts[0].cert, GNUTLS_X509_FMT_DER) < 0
                    ? -EINVAL
                    : hsm_key_matches_certificate(a->tls_token_key, leaf);
        gnutls_x509_crt_deinit(leaf);
        if (r < 0) {
                hsm_set_error(errmsg, "%s:%d: [admin] tls_cert %s does not match key %s", a->conf->path, ac->tls_line,
                              ac->tls_cert, ac->tls_key);
                return r;
        }
        r = hsm_privkey_import(a->tls_token_key, &a->tls_privkey);
        if (r < 0) {
                hsm_set_error(errmsg, "%s:%d: [admin] tls_key %s: %s", a->conf->path, ac->tls_line, ac->tls_key,
                              strerror(-r));
                return r;
        }
        return 0;
}

int hsm_admin_start(const hsm_conf *conf, hsm_keystore *ks, hsm_server *srv, hsm_store *store, hsm_admin **ret,
                    char **errmsg)
{
        const hsm_conf_admin *ac = &conf->admin;
        hsm_admin *a = calloc(1, sizeof(*a));
        if (!a)
                return -ENOMEM;
        a->conf = conf;
        a->ks = ks;
        a->srv = srv;
        a->store = store;
        a->fd = -1;
        a->started_ns = hsm_now_ns();
        a->started_unix = (int64_t)time(NULL);
        /* Lifetime handshake counts per listener, with the key totals. */
        for (unsigned i = 0; store && srv && i < hsm_server_n_listeners(srv); i++) {
                hsm_listener_info li;
                if (hsm_server_listener_info(srv, i, &li) == 0)
                        hsm_store_track_listener(store, li.name, hsm_server_listener_handshakes(srv, i));
        }
        int r = admin_audit_limit_new(a);
        if (r == 0)
                r = bind_socket(a, errmsg);
        if (r < 0) {
                hsm_admin_stop(a);
                return r;
        }
        unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_USE_ERROR_LOG;
        struct MHD_OptionItem opts[16];
        unsigned n = 0;
        opts[n++] = (struct MHD_OptionItem){ MHD_OPTION_LISTEN_SOCKET, a->fd, NULL };
        opts[n++] = (struct MHD_OptionItem){ MHD_OPTION_THREAD_POOL_SIZE, ac->threads, NULL };
        opts[n++] = (struct MHD_OptionItem){ MHD_OPTION_CONNECTION_LIMIT, ac->max_connections, NULL };
        opts[n++] = (struct MHD_OptionItem){ MHD_OPTION_CONNECTION_TIMEOUT, (ac->timeout_ms + 999) / 1000, NULL };
        opts[n++] = (struct MHD_OptionItem){ MHD_OPTION_NOTIFY_COMPLETED, (intptr_t)on_completed, NULL };
        opts[n++] = (struct MHD_OptionItem){ MHD_OPTION_EXTERNAL_LOGGER, (intptr_t)mhd_log, NULL };
        if (ac->listen.ss.ss_family != AF_UNIX)
                opts[n++] = (struct MHD_OptionItem){ MHD_OPTION_PER_IP_CONNECTION_LIMIT, ac->max_connections_per_ip, NULL };
        if (ac->tls_cert) {
                bool on_token = strncmp(ac->tls_key, "pkcs11:", 7) == 0;
                a->tls_cert_pem = read_file(ac->tls_cert);
                if (!on_token)
                        a->tls_key_pem = read_file(ac->tls_key);
                if (!a->tls_cert_pem || (!on_token && !a->tls_key_pem)) {
                        hsm_set_error(errmsg, "%s:%d: [admin]: cannot read tls_cert %s or tls_key %s", conf->path,
                                      ac->tls_line, ac->tls_cert, ac->tls_key);
                        hsm_admin_stop(a);
                        return -ENOENT;
                }
                flags |= MHD_USE_TLS;
                if (on_token) {
                        if ((r = tls_token_credentials(a, errmsg)) < 0) {
                                hsm_admin_stop(a);
                                return r;
                        }
                        __atomic_store_n(&tls_admin, a, __ATOMIC_RELEASE);
                        opts[n++] = (struct MHD_OptionItem){ MHD_OPTION_HTTPS_CERT_CALLBACK, 0, (void *)tls_retrieve };
                } else {
                        opts[n++] = (struct MHD_OptionItem){ MHD_OPTION_HTTPS_MEM_CERT, 0, a->tls_cert_pem };
                        opts[n++] = (struct MHD_OptionItem){ MHD_OPTION_HTTPS_MEM_KEY, 0, a->tls_key_pem };
                }
                if (ac->client_ca) {
                        a->client_ca_pem = read_file(ac->client_ca);
                        if (!a->client_ca_pem) {
                                hsm_set_error(errmsg, "%s:%d: [admin]: cannot read client_ca %s", conf->path,
                                              ac->tls_line, ac->client_ca);
                                hsm_admin_stop(a);
                                return -ENOENT;
                        }
                        opts[n++] = (struct MHD_OptionItem){ MHD_OPTION_HTTPS_MEM_TRUST, 0, a->client_ca_pem };
                }
        }
        opts[n++] = (struct MHD_OptionItem){ MHD_OPTION_END, 0, NULL };
        a->mhd = MHD_start_daemon(flags, 0, NULL, NULL, on_request, a, MHD_OPTION_ARRAY, opts, MHD_OPTION_END);
        if (!a->mhd) {
                hsm_set_error(errmsg, "%s:%d: [admin]: the HTTP server did not start on %s", conf->path, ac->line,
                              ac->listen.text);
                hsm_admin_stop(a);
                return -EIO;
        }
        a->fd = -1; /* MHD owns it now */
        hsm_notice("admin: listening on %s (%s)", a->address,
                   !ac->tls_cert ? "HTTP" : a->tls_privkey ? "HTTPS, key on the token" : "HTTPS");
        *ret = a;
        return 0;
}

void hsm_admin_set_conf(hsm_admin *a, const hsm_conf *conf)
{
        if (a)
                __atomic_store_n(&a->conf, conf, __ATOMIC_RELEASE);
}

int hsm_admin_check(const hsm_conf *conf, hsm_keystore *ks, char **errmsg)
{
        const hsm_conf_admin *ac = &conf->admin;
        if (!ac->enabled)
                return 0;
        if (ac->tls_cert) {
                hsm_admin a = { .conf = conf, .ks = ks, .fd = -1 };
                int r = 0;
                a.tls_cert_pem = read_file(ac->tls_cert);
                if (!a.tls_cert_pem) {
                        hsm_set_error(errmsg, "%s:%d: [admin] cannot read tls_cert %s", conf->path, ac->tls_line,
                                      ac->tls_cert);
                        return -ENOENT;
                }
                if (strncmp(ac->tls_key, "pkcs11:", 7) == 0)
                        r = tls_token_credentials(&a, errmsg);
                else {
                        gnutls_certificate_credentials_t cred;
                        int g = gnutls_certificate_allocate_credentials(&cred);
                        if (g >= 0)
                                g = gnutls_certificate_set_x509_key_file(cred, ac->tls_cert, ac->tls_key,
                                                                         GNUTLS_X509_FMT_PEM);
                        if (g < 0) {
                                hsm_set_error(errmsg, "%s:%d: [admin] tls_cert %s with tls_key %s: %s", conf->path,
                                              ac->tls_line, ac->tls_cert, ac->tls_key, gnutls_strerror(g));
                                r = -EINVAL;
                        }
                        gnutls_certificate_free_credentials(cred);
                }
                if (r == 0 && ac->client_ca) {
                        gnutls_certificate_credentials_t cred;
                        int g = gnutls_certificate_allocate_credentials(&cred);
                        if (g >= 0)
                                g = gnutls_certificate_set_x509_trust_file(cred, ac->client_ca, GNUTLS_X509_FMT_PEM);
                        if (g <= 0) {
                                hsm_set_error(errmsg, "%s:%d: [admin] client_ca %s holds no CA certificate", conf->path,
                                              ac->tls_line, ac->client_ca);
                                r = -EINVAL;
                        }
                        gnutls_certificate_free_credentials(cred);
                }
                if (a.tls_privkey)
                        gnutls_privkey_deinit(a.tls_privkey);
                for (unsigned i = 0; i < a.n_tls_pcerts; i++)
                        gnutls_pcert_deinit(&a.tls_pcerts[i]);
                free(a.tls_pcerts);
                hsm_key_unref(a.tls_token_key);
                free(a.tls_cert_pem);
                if (r < 0)
                        return r;
        }
        hsm_notice("[admin]: %s on %s, %u bearer token(s), %u certificate identit%s", ac->tls_cert ? "HTTPS" : "HTTP",
                   ac->listen.text, ac->n_tokens, ac->n_identities, ac->n_identities == 1 ? "y" : "ies");
        return 0;
}

const char *hsm_admin_address(const hsm_admin *a) { return a->address; }

void hsm_admin_stop(hsm_admin *a)
{
        if (!a)
                return;
        if (a->mhd)
                MHD_stop_daemon(a->mhd);
        admin_audit_limit_free(a); /* the summaries still due */
        if (a->fd >= 0)
                close(a->fd);
        if (a->unix_path) {
                unlink(a->unix_path);
                free(a->unix_path);
        }
        if (__atomic_load_n(&tls_admin, __ATOMIC_ACQUIRE) == a)
                __atomic_store_n(&tls_admin, NULL, __ATOMIC_RELEASE);
        if (a->tls_privkey)
                gnutls_privkey_deinit(a->tls_privkey);
        for (unsigned i = 0; i < a->n_tls_pcerts; i++)
                gnutls_pcert_deinit(&a->tls_pcerts[i]);
        free(a->tls_pcerts);
        hsm_key_unref(a->tls_token_key);
        free(a->tls_cert_pem);
        if (a->tls_key_pem) {
                explicit_bzero(a->tls_key_pem, strlen(a->tls_key_pem));
                free(a->tls_key_pem);
        }
        free(a->client_ca_pem);
        free(a);
}
