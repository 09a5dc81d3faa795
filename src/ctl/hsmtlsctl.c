/* hsmtlsctl: a client of hsmtlsd's admin API (api/openapi.yaml), over the
 * unix socket or HTTPS with a client certificate. One subcommand per
 * operation of the contract; the answer is printed (JSON indented, metrics
 * and CSRs as text); an error answer becomes one line on stderr from its
 * JSON error body. The bearer token comes from a file or the environment,
 * never from the command line (which others can read in /proc).
 *
 * Exit codes: 0 done; 1 the daemon refused or failed the request (HTTP
 * 4xx/5xx); 2 bad command line; 3 no answer (cannot connect, TLS, not the
 * admin API); 4 the answer says "not OK" (health: not ready; audit verify:
 * the chain is broken). */
#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <arpa/inet.h>
#include <netinet/in.h>

#include <curl/curl.h>
#include <jansson.h>

#include "hsmtls-build.h"

enum { EXIT_OK = 0, EXIT_REFUSED = 1, EXIT_USAGE = 2, EXIT_TRANSPORT = 3, EXIT_NOT_OK = 4 };

#define DEFAULT_SOCKET "/var/lib/hsmtls/admin.sock"

struct opts {
        const char *socket, *url, *cacert, *cert, *key, *token_file;
        bool json, verbose;
        char *token; /* the bearer token (from a file or the environment) */
};

struct buf {
        char *data;
        size_t len;
};

static size_t on_data(char *p, size_t size, size_t n, void *ud)
{
        struct buf *b = ud;
        size_t add = size * n;
        char *d = realloc(b->data, b->len + add + 1);
        if (!d)
                return 0;
        memcpy(d + b->len, p, add);
        b->data = d;
        b->len += add;
        b->data[b->len] = 0;
        return add;
}

struct answer {
        long status;
        struct buf body;
        char etag[128];
        char content_type[128];
};

static size_t on_header(char *p, size_t size, size_t n, void *ud)
{
        struct answer *a = ud;
        size_t len = size * n;
        const char *names[] = { "etag:", "content-type:" };
        char *dst[] = { a->etag, a->content_type };
        for (int i = 0; i < 2; i++) {
                size_t nl = strlen(names[i]);
                if (len > nl && strncasecmp(p, names[i], nl) == 0) {
                        const char *v = p + nl;
                        size_t vl = len - nl;
                        while (vl && (*v == ' ' || *v == '\t'))
                                v++, vl--;
                        while (vl && (v[vl - 1] == '\r' || v[vl - 1] == '\n' || v[vl - 1] == ' '))
                                vl--;
                        snprintf(dst[i], 128, "%.*s", (int)vl, v);
                }
        }
        return len;
}

static void die_usage(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die_usage(const char *fmt, ...)
{
        va_list ap;
        va_start(ap, fmt);
        fputs("hsmtlsctl: ", stderr);
        vfprintf(stderr, fmt, ap);
        fputs(" (hsmtlsctl --help)\n", stderr);
        va_end(ap);
        exit(EXIT_USAGE);
}

static char *read_file(const char *path, size_t max)
{
        FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "re");
        if (!f)
                return NULL;
        struct buf b = { 0 };
        char chunk[4096];
        size_t n;
        bool bad = false;
        while (!bad && (n = fread(chunk, 1, sizeof(chunk), f)) > 0)
                bad = b.len + n > max || !on_data(chunk, 1, n, &b);
        bad = bad || ferror(f);
        if (f != stdin)
                fclose(f);
        if (bad) {
                free(b.data);
                errno = errno ? errno : EFBIG;
                return NULL;
        }
        return b.data ? b.data : strdup("");
}

/* The token: --token-file, $HSMTLSCTL_TOKEN_FILE or $HSMTLSCTL_TOKEN (its
 * first line, without the newline). NULL: no token (a client certificate,
 * or /v1/live). */
static int load_token(struct opts *o)
{
        const char *file = o->token_file ? o->token_file : getenv("HSMTLSCTL_TOKEN_FILE");
        const char *env = getenv("HSMTLSCTL_TOKEN");
        if (file) {
                char *t = read_file(file, 4096);
                if (!t) {
                        fprintf(stderr, "hsmtlsctl: cannot read the token file %s: %s\n", file, strerror(errno));
                        return -1;
                }
                t[strcspn(t, "\r\n")] = 0;
                o->token = t;
        } else if (env && *env)
                o->token = strdup(env);
        return 0;
}

/* Whether an http:// or https:// URL names a loopback host (localhost,
 * 127.0.0.0/8, [::1]). */
static bool url_is_loopback(const char *url)
{
        const char *h = strstr(url, "://");
        if (!h)
                return false;
        h += 3;
        size_t n = strcspn(h, "/?#");
        const char *at = memchr(h, '@', n); /* user:password@host */
        if (at) {
                n -= (size_t)(at + 1 - h);
                h = at + 1;
        }
        char host[256];
        if (h[0] == '[') {
                size_t e = strcspn(h, "]");
                if (e >= n || e - 1 >= sizeof(host))
                        return false;
                memcpy(host, h + 1, e - 1);
                host[e - 1] = 0;
        } else {
                size_t e = strcspn(h, ":/?#");
                if (e > n)
                        e = n;
                if (e >= sizeof(host))
                        return false;
                memcpy(host, h, e);
                host[e] = 0;
        }
        if (strcasecmp(host, "localhost") == 0 || strcmp(host, "::1") == 0)
                return true;
        struct in_addr a;
        return inet_pton(AF_INET, host, &a) == 1 && (ntohl(a.s_addr) >> 24) == 127;
}

/* --verbose: libcurl's trace, with the Authorization header masked (the
 * bearer token never reaches a terminal or a log) and no bodies. */
static int on_debug(CURL *c, curl_infotype type, char *data, size_t size, void *userdata)
{
        (void)c;
        (void)userdata;
        const char *mark = type == CURLINFO_TEXT ? "* " : type == CURLINFO_HEADER_IN ? "< " : type == CURLINFO_HEADER_OUT ? "> " : NULL;
        if (!mark)
                return 0;
        const char *p = data, *end = data + size;
        while (p < end) {
                const char *nl = memchr(p, '\n', (size_t)(end - p));
                size_t len = nl ? (size_t)(nl - p) : (size_t)(end - p);
                if (len && p[len - 1] == '\r')
                        len--;
                if (type == CURLINFO_HEADER_OUT && len >= 14 && strncasecmp(p, "Authorization:", 14) == 0)
                        fprintf(stderr, "%sAuthorization: (hidden)\n", mark);
                else if (len)
                        fprintf(stderr, "%s%.*s\n", mark, (int)len, p);
                p = nl ? nl + 1 : end;
        }
        return 0;
}

static char *esc(CURL *c, const char *s)
{
        char *e = curl_easy_escape(c, s, 0);
        if (!e) {
                fputs("hsmtlsctl: out of memory\n", stderr);
                exit(EXIT_TRANSPORT);
        }
        return e;
}

/* One request. body (may be NULL): JSON. if_match: the If-Match header (may
 * be NULL). Returns 0 with the answer, or EXIT_TRANSPORT after a message. */
static int request(struct opts *o, const char *method, const char *path, const char *body, const char *if_match,
                   struct answer *ans)
{
        CURL *c = curl_easy_init();
        if (!c) {
                fputs("hsmtlsctl: cannot start libcurl\n", stderr);
                return EXIT_TRANSPORT;
        }
        memset(ans, 0, sizeof(*ans));
        char url[4096], err[CURL_ERROR_SIZE] = "";
        if (o->url)
                snprintf(url, sizeof(url), "%s%s", o->url, path);
        else {
                snprintf(url, sizeof(url), "http://hsmtlsd%s", path);
                curl_easy_setopt(c, CURLOPT_UNIX_SOCKET_PATH, o->socket);
        }
        curl_easy_setopt(c, CURLOPT_URL, url);
        curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
        curl_easy_setopt(c, CURLOPT_ERRORBUFFER, err);
        curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
        curl_easy_setopt(c, CURLOPT_WRITEDATA, &ans->body);
        curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
        curl_easy_setopt(c, CURLOPT_HEADERDATA, ans);
        curl_easy_setopt(c, CURLOPT_TIMEOUT, 120L);
        curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, 10L);
        curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
        /* Never through a proxy (http_proxy, ALL_PROXY): the admin API is
         * reached directly, and the bearer token goes nowhere else. */
        curl_easy_setopt(c, CURLOPT_NOPROXY, "*");
        if (o->verbose) {
                curl_easy_setopt(c, CURLOPT_DEBUGFUNCTION, on_debug);
                curl_easy_setopt(c, CURLOPT_VERBOSE, 1L);
        }
        if (strcmp(method, "HEAD") == 0)
                curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
        if (o->cacert)
                curl_easy_setopt(c, CURLOPT_CAINFO, o->cacert);
        if (o->cert)
                curl_easy_setopt(c, CURLOPT_SSLCERT, o->cert);
        if (o->key)
                curl_easy_setopt(c, CURLOPT_SSLKEY, o->key);
        struct curl_slist *h = NULL;
        char *auth = NULL;
        if (o->token) {
                if (asprintf(&auth, "Authorization: Bearer %s", o->token) < 0)
                        auth = NULL;
                h = curl_slist_append(h, auth);
        }
        char im[256];
        if (if_match) {
                snprintf(im, sizeof(im), "If-Match: %s", if_match);
                h = curl_slist_append(h, im);
        }
        if (body) {
                h = curl_slist_append(h, "Content-Type: application/json");
                curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
                curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
        }
        h = curl_slist_append(h, "Expect:");
        curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
        CURLcode rc = curl_easy_perform(c);
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &ans->status);
        curl_slist_free_all(h);
        if (auth) {
                explicit_bzero(auth, strlen(auth));
                free(auth);
        }
        curl_easy_cleanup(c);
        if (rc != CURLE_OK) {
                fprintf(stderr, "hsmtlsctl: %s %s: %s\n", method, o->url ? o->url : o->socket,
                        err[0] ? err : curl_easy_strerror(rc));
                free(ans->body.data);
                ans->body.data = NULL;
                return EXIT_TRANSPORT;
        }
        return 0;
}

/* An error answer: one line from {"error": {code, field, reason}}. */
static int refused(const char *method, const char *path, struct answer *a)
{
        json_t *j = a->body.data ? json_loads(a->body.data, 0, NULL) : NULL;
        json_t *e = json_object_get(j, "error");
        const char *code = json_string_value(json_object_get(e, "code"));
        const char *field = json_string_value(json_object_get(e, "field"));
        const char *reason = json_string_value(json_object_get(e, "reason"));
        if (code)
                fprintf(stderr, "hsmtlsctl: %s %s: %ld %s: %s%s%s%s\n", method, path, a->status, code,
                        reason ? reason : "", field ? " (field " : "", field ? field : "", field ? ")" : "");
        else
                fprintf(stderr, "hsmtlsctl: %s %s: HTTP %ld%s%.200s\n", method, path, a->status,
                        a->body.len ? ": " : "", a->body.len ? a->body.data : "");
        json_decref(j);
        return a->status >= 400 ? EXIT_REFUSED : EXIT_TRANSPORT;
}

static void print_json(const struct opts *o, json_t *j)
{
        char *s = json_dumps(j, (o->json ? JSON_COMPACT : JSON_INDENT(2)) | JSON_ENCODE_ANY);
        if (s)
                printf("%s\n", s);
        free(s);
}

/* Runs the request and prints the answer: JSON indented (--json: as the
 * daemon sent it), text as is. want_field: print that string member of the
 * answer only (a CSR's PEM), unless --json. */
static int run(struct opts *o, const char *method, const char *path, json_t *body, const char *if_match,
               const char *want_field, json_t **ret)
{
        char *b = body ? json_dumps(body, JSON_COMPACT) : NULL;
        json_decref(body);
        struct answer a;
        int r = request(o, method, path, b, if_match, &a);
        free(b);
        if (r)
                return r;
        bool is_json = strncmp(a.content_type, "application/json", 16) == 0;
        json_t *j = is_json && a.body.data ? json_loads(a.body.data, 0, NULL) : NULL;
        bool health_503 = a.status == 503 && strcmp(path, "/v1/health") == 0 && json_object_get(j, "ready");
        if (a.status >= 400 && !health_503) {
                r = refused(method, path, &a);
                json_decref(j);
                free(a.body.data);
                return r;
        }
        if (a.etag[0] && o->verbose)
                fprintf(stderr, "ETag: %s\n", a.etag);
        if (j && want_field && !o->json && json_is_string(json_object_get(j, want_field)))
                fputs(json_string_value(json_object_get(j, want_field)), stdout);
        else if (j)
                print_json(o, j);
        else if (a.body.len)
                fwrite(a.body.data, 1, a.body.len, stdout);
        if (a.etag[0] && !o->json && strncmp(path, "/v1/listeners", 13) == 0)
                fprintf(stderr, "ETag: %s\n", a.etag);
        free(a.body.data);
        if (ret)
                *ret = j;
        else
                json_decref(j);
        return health_503 ? EXIT_NOT_OK : EXIT_OK;
}

static const char usage_text[] =
        "usage: hsmtlsctl [OPTIONS] COMMAND [ARGS]\n"
        "\n"
        "Options (before the command):\n"
        "  -s, --socket PATH      the admin unix socket (default " DEFAULT_SOCKET ", or $HSMTLSCTL_SOCKET)\n"
        "  -u, --url URL          HTTPS instead, e.g. https://127.0.0.1:8443 (or $HSMTLSCTL_URL)\n"
        "      --cacert FILE      the CA of the admin server's certificate\n"
        "      --cert FILE, --key FILE   a client certificate and its key (an admin CA identity)\n"
        "  -t, --token-file FILE  the bearer token's file (or $HSMTLSCTL_TOKEN_FILE, or the token in $HSMTLSCTL_TOKEN)\n"
        "  -j, --json             print JSON answers as the daemon sent them (compact; CSRs as JSON)\n"
        "  -v, --verbose          libcurl's trace on stderr\n"
        "\n"
        "Commands:\n"
        "  live | whoami | health\n"
        "  tokens [TOKEN]\n"
        "  keys list [--token TOKEN] | keys show TOKEN ID\n"
        "  keys generate --token TOKEN --label LABEL --type rsa|ecdsa|ed25519 [--bits N] [--curve P-256|P-384] [--id HEX]\n"
        "  keys csr TOKEN ID --subject DN [--dns NAME]... [--ip ADDR]... [--email ADDR]... [--uri URI]...\n"
        "  keys delete TOKEN ID --spki-sha256 HEX\n"
        "  certificates list | certificates show FINGERPRINT\n"
        "  certificates upload FILE|- [--store state|token|both] | certificates delete FINGERPRINT\n"
        "  listeners [LISTENER]\n"
        "  bind LISTENER FINGERPRINT [--name NAME]... --if-match ETAG\n"
        "  replace LISTENER OLD-FINGERPRINT NEW-FINGERPRINT [--name NAME]... --if-match ETAG\n"
        "  unbind LISTENER FINGERPRINT --if-match ETAG\n"
        "  change FILE|-          one transaction: POST /v1/changes with the JSON body in FILE ({\"operations\": [...]})\n"
        "  rotate OLD-FINGERPRINT NEW-FINGERPRINT [--listener LISTENER]...   replace OLD by NEW on every listener\n"
        "                         serving it (or those named), in one transaction with their current ETags\n"
        "  usage [--token TOKEN]\n"
        "  metrics\n"
        "  audit [--after SEQ] [--limit N] | audit verify\n"
        "\n"
        "Exit status: 0 done; 1 refused by the daemon (the reason on stderr); 2 bad command line;\n"
        "3 no answer (connection, TLS); 4 not OK (health: not ready; audit verify: chain broken).\n";

/* Subcommand options: --name VALUE pairs and positional words. */
struct args {
        int n;
        char **v;
};

/* The value of --NAME (the last one), or NULL. */
static const char *opt(struct args *a, const char *name)
{
        const char *r = NULL;
        for (int i = 0; i < a->n; i++)
                if (strncmp(a->v[i], "--", 2) == 0 && strcmp(a->v[i] + 2, name) == 0) {
                        if (i + 1 >= a->n)
                                die_usage("--%s needs a value", name);
                        r = a->v[i + 1];
                }
        return r;
}

/* Every --NAME value, as a JSON array (NULL when there is none). */
static json_t *opt_list(struct args *a, const char *name)
{
        json_t *l = NULL;
        for (int i = 0; i < a->n; i++)
                if (strncmp(a->v[i], "--", 2) == 0 && strcmp(a->v[i] + 2, name) == 0) {
                        if (i + 1 >= a->n)
                                die_usage("--%s needs a value", name);
                        if (!l)
                                l = json_array();
                        json_array_append_new(l, json_string(a->v[i + 1]));
                }
        return l;
}

/* Positional word k (after the subcommand words), or NULL; refuses options
 * not in known (NULL-terminated). */
static const char *pos(struct args *a, int k, const char *const *known)
{
        int seen = 0;
        for (int i = 0; i < a->n; i++) {
                if (strncmp(a->v[i], "--", 2) == 0) {
                        bool ok = false;
                        for (int j = 0; known && known[j]; j++)
                                if (strcmp(a->v[i] + 2, known[j]) == 0)
                                        ok = true;
                        if (!ok)
                                die_usage("unknown option %s here", a->v[i]);
                        i++;
                        continue;
                }
                if (seen++ == k)
                        return a->v[i];
        }
        return NULL;
}

static int n_pos(struct args *a, const char *const *known)
{
        int n = 0;
        while (pos(a, n, known))
                n++;
        return n;
}

static const char *need(struct args *a, int k, const char *const *known, const char *what)
{
        const char *v = pos(a, k, known);
        if (!v)
                die_usage("%s is missing", what);
        return v;
}

static void exact(struct args *a, int n, const char *const *known, const char *cmd)
{
        if (n_pos(a, known) != n)
                die_usage("%s takes %d argument%s", cmd, n, n == 1 ? "" : "s");
}

static int cmd_keys(struct opts *o, CURL *c, struct args *a)
{
        const char *sub = a->n ? a->v[0] : "list";
        struct args r = { a->n ? a->n - 1 : 0, a->n ? a->v + 1 : a->v };
        char path[2048];
        if (strcmp(sub, "list") == 0) {
                static const char *const k[] = { "token", NULL };
                exact(&r, 0, k, "keys list");
                const char *t = opt(&r, "token");
                char *e = t ? esc(c, t) : NULL;
                snprintf(path, sizeof(path), "/v1/keys%s%s", e ? "?token=" : "", e ? e : "");
                curl_free(e);
                return run(o, "GET", path, NULL, NULL, NULL, NULL);
        }
        if (strcmp(sub, "show") == 0 || strcmp(sub, "delete") == 0 || strcmp(sub, "csr") == 0) {
                static const char *const kd[] = { "spki-sha256", NULL };
                static const char *const kc[] = { "subject", "dns", "ip", "email", "uri", NULL };
                const char *const *k = strcmp(sub, "delete") == 0 ? kd : strcmp(sub, "csr") == 0 ? kc : NULL;
                exact(&r, 2, k, sub);
                char *t = esc(c, need(&r, 0, k, "TOKEN")), *id = esc(c, need(&r, 1, k, "ID"));
                int rc;
                if (strcmp(sub, "show") == 0) {
                        snprintf(path, sizeof(path), "/v1/keys/%s/%s", t, id);
                        rc = run(o, "GET", path, NULL, NULL, NULL, NULL);
                } else if (strcmp(sub, "delete") == 0) {
                        const char *spki = opt(&r, "spki-sha256");
                        if (!spki)
                                die_usage("keys delete needs --spki-sha256 (the key's, from keys show)");
                        char *s = esc(c, spki);
                        snprintf(path, sizeof(path), "/v1/keys/%s/%s?spki_sha256=%s", t, id, s);
                        curl_free(s);
                        rc = run(o, "DELETE", path, NULL, NULL, NULL, NULL);
                } else {
                        const char *subject = opt(&r, "subject");
                        if (!subject)
                                die_usage("keys csr needs --subject");
                        json_t *b = json_pack("{s:s}", "subject", subject);
                        const char *lists[] = { "dns", "ip", "email", "uri" };
                        for (int i = 0; i < 4; i++) {
                                json_t *l = opt_list(&r, lists[i]);
                                if (l)
                                        json_object_set_new(b, lists[i], l);
                        }
                        snprintf(path, sizeof(path), "/v1/keys/%s/%s/csr", t, id);
                        rc = run(o, "POST", path, b, NULL, "csr", NULL);
                }
                curl_free(t);
                curl_free(id);
                return rc;
        }
        if (strcmp(sub, "generate") == 0) {
                static const char *const k[] = { "token", "label", "type", "bits", "curve", "id", NULL };
                exact(&r, 0, k, "keys generate");
                const char *t = opt(&r, "token"), *l = opt(&r, "label"), *ty = opt(&r, "type");
                if (!t || !l || !ty)
                        die_usage("keys generate needs --token, --label and --type");
                json_t *b = json_pack("{s:s,s:s,s:s}", "token", t, "label", l, "type", ty);
                const char *bits = opt(&r, "bits"), *curve = opt(&r, "curve"), *id = opt(&r, "id");
                if (bits) {
                        char *end;
                        long v = strtol(bits, &end, 10);
                        if (!*bits || *end)
                                die_usage("--bits must be a number");
                        json_object_set_new(b, "bits", json_integer(v));
                }
                if (curve)
                        json_object_set_new(b, "curve", json_string(curve));
                if (id)
                        json_object_set_new(b, "id", json_string(id));
                return run(o, "POST", "/v1/keys", b, NULL, NULL, NULL);
        }
        die_usage("unknown keys command '%s'", sub);
}

static int cmd_certificates(struct opts *o, CURL *c, struct args *a)
{
        const char *sub = a->n ? a->v[0] : "list";
        struct args r = { a->n ? a->n - 1 : 0, a->n ? a->v + 1 : a->v };
        char path[2048];
        if (strcmp(sub, "list") == 0) {
                exact(&r, 0, NULL, "certificates list");
                return run(o, "GET", "/v1/certificates", NULL, NULL, NULL, NULL);
        }
        if (strcmp(sub, "show") == 0 || strcmp(sub, "delete") == 0) {
                exact(&r, 1, NULL, sub);
                char *fp = esc(c, need(&r, 0, NULL, "FINGERPRINT"));
                snprintf(path, sizeof(path), "/v1/certificates/%s", fp);
                curl_free(fp);
                return run(o, strcmp(sub, "show") == 0 ? "GET" : "DELETE", path, NULL, NULL, NULL, NULL);
        }
        if (strcmp(sub, "upload") == 0) {
                static const char *const k[] = { "store", NULL };
                exact(&r, 1, k, "certificates upload");
                const char *file = need(&r, 0, k, "FILE");
                char *pem = read_file(file, 1 << 20);
                if (!pem) {
                        fprintf(stderr, "hsmtlsctl: cannot read %s: %s\n", file, errno ? strerror(errno) : "larger than 1 MiB");
                        return EXIT_USAGE;
                }
                json_t *b = json_pack("{s:s}", "pem", pem);
                free(pem);
                if (!b) {
                        fprintf(stderr, "hsmtlsctl: %s is not text (UTF-8)\n", file);
                        return EXIT_USAGE;
                }
                const char *store = opt(&r, "store");
                if (store)
                        json_object_set_new(b, "store", json_string(store));
                return run(o, "POST", "/v1/certificates", b, NULL, NULL, NULL);
        }
        die_usage("unknown certificates command '%s'", sub);
}

/* bind, replace, unbind: the requests of the contract, with If-Match. */
static int cmd_binding(struct opts *o, CURL *c, const char *cmd, struct args *a)
{
        static const char *const k[] = { "name", "if-match", NULL };
        static const char *const ku[] = { "if-match", NULL };
        bool unbind = strcmp(cmd, "unbind") == 0, replace = strcmp(cmd, "replace") == 0;
        exact(a, replace ? 3 : 2, unbind ? ku : k, cmd);
        const char *im = opt(a, "if-match");
        char *l = esc(c, need(a, 0, k, "LISTENER")), *fp = esc(c, need(a, 1, k, "FINGERPRINT"));
        char path[2048];
        json_t *b = NULL;
        if (!unbind) {
                b = json_pack("{s:s}", "certificate", replace ? need(a, 2, k, "NEW-FINGERPRINT") : need(a, 1, k, "FINGERPRINT"));
                json_t *names = opt_list(a, "name");
                if (names)
                        json_object_set_new(b, "names", names);
        }
        if (strcmp(cmd, "bind") == 0)
                snprintf(path, sizeof(path), "/v1/listeners/%s/bindings", l);
        else
                snprintf(path, sizeof(path), "/v1/listeners/%s/bindings/%s", l, fp);
        curl_free(l);
        curl_free(fp);
        return run(o, strcmp(cmd, "bind") == 0 ? "POST" : replace ? "PUT" : "DELETE", path, b, im, NULL, NULL);
}

/* change FILE|-: POST /v1/changes with the body in FILE (stdin: -), as is. */
static int cmd_change(struct opts *o, struct args *a)
{
        exact(a, 1, NULL, "change");
        const char *file = need(a, 0, NULL, "FILE");
        char *text = read_file(file, 1 << 20);
        if (!text) {
                fprintf(stderr, "hsmtlsctl: cannot read %s: %s\n", file, errno ? strerror(errno) : "larger than 1 MiB");
                return EXIT_USAGE;
        }
        json_error_t je;
        json_t *b = json_loads(text, 0, &je);
        free(text);
        if (!json_is_object(b)) {
                fprintf(stderr, "hsmtlsctl: %s: not a JSON object (%s, line %d)\n", file, b ? "not an object" : je.text, je.line);
                json_decref(b);
                return EXIT_USAGE;
        }
        return run(o, "POST", "/v1/changes", b, NULL, NULL, NULL);
}

/* rotate OLD NEW [--listener L]...: one transaction replacing certificate
 * OLD by NEW on every listener that serves OLD (or on the ones named), each
 * with the ETag it has now. */
static int cmd_rotate(struct opts *o, struct args *a)
{
        static const char *const k[] = { "listener", NULL };
        exact(a, 2, k, "rotate");
        const char *old = need(a, 0, k, "OLD-FINGERPRINT"), *new = need(a, 1, k, "NEW-FINGERPRINT");
        json_t *only = opt_list(a, "listener");
        struct answer ans;
        int r = request(o, "GET", "/v1/listeners", NULL, NULL, &ans);
        if (r) {
                json_decref(only);
                return r;
        }
        if (ans.status != 200) {
                r = refused("GET", "/v1/listeners", &ans);
                free(ans.body.data);
                json_decref(only);
                return r;
        }
        json_t *j = ans.body.data ? json_loads(ans.body.data, 0, NULL) : NULL;
        free(ans.body.data);
        json_t *ops = json_array(), *l;
        size_t i;
        json_array_foreach(json_object_get(j, "listeners"), i, l) {
                const char *name = json_string_value(json_object_get(l, "name"));
                bool wanted = !only, serves = false;
                json_t *v;
                size_t x;
                json_array_foreach(only, x, v) wanted |= name && strcmp(name, json_string_value(v)) == 0;
                json_array_foreach(json_object_get(l, "bindings"), x, v) serves |=
                        strcmp(json_string_value(json_object_get(v, "certificate")) ?: "", old) == 0;
                if (name && wanted && serves)
                        json_array_append_new(ops, json_pack("{s:s,s:s,s:s,s:s,s:O}", "op", "replace", "listener", name, "fingerprint",
                                                             old, "certificate", new, "if_match", json_object_get(l, "etag")));
        }
        json_decref(j);
        json_decref(only);
        if (json_array_size(ops) == 0) {
                fprintf(stderr, "hsmtlsctl: rotate: no listener%s serves certificate %s\n", only ? " named" : "", old);
                json_decref(ops);
                return EXIT_REFUSED;
        }
        return run(o, "POST", "/v1/changes", json_pack("{s:o}", "operations", ops), NULL, NULL, NULL);
}

static int cmd_audit(struct opts *o, struct args *a)
{
        if (a->n && strcmp(a->v[0], "verify") == 0) {
                struct args r = { a->n - 1, a->v + 1 };
                exact(&r, 0, NULL, "audit verify");
                json_t *j = NULL;
                int rc = run(o, "GET", "/v1/audit/verify", NULL, NULL, NULL, &j);
                if (rc == 0 && !json_is_true(json_object_get(j, "ok"))) {
                        fprintf(stderr, "hsmtlsctl: the audit chain is broken at record %lld: %s\n",
                                (long long)json_integer_value(json_object_get(j, "first_bad_seq")),
                                json_string_value(json_object_get(j, "reason")) ?: "?");
                        rc = EXIT_NOT_OK;
                }
                json_decref(j);
                return rc;
        }
        static const char *const k[] = { "after", "limit", NULL };
        exact(a, 0, k, "audit");
        const char *after = opt(a, "after"), *limit = opt(a, "limit");
        char path[256];
        snprintf(path, sizeof(path), "/v1/audit?after=%lld&limit=%lld", after ? atoll(after) : 0LL,
                 limit ? atoll(limit) : 100LL);
        return run(o, "GET", path, NULL, NULL, NULL, NULL);
}

static int dispatch(struct opts *o, const char *cmd, struct args *a)
{
        CURL *c = curl_easy_init(); /* for escaping */
        if (!c) {
                fputs("hsmtlsctl: cannot start libcurl\n", stderr);
                return EXIT_TRANSPORT;
        }
        int rc;
        char path[2048];
        if (strcmp(cmd, "live") == 0 || strcmp(cmd, "whoami") == 0 || strcmp(cmd, "health") == 0 ||
            strcmp(cmd, "metrics") == 0) {
                exact(a, 0, NULL, cmd);
                snprintf(path, sizeof(path), "%s%s", strcmp(cmd, "metrics") == 0 ? "/" : "/v1/", cmd);
                rc = run(o, "GET", path, NULL, NULL, NULL, NULL);
        } else if (strcmp(cmd, "tokens") == 0 || strcmp(cmd, "listeners") == 0) {
                if (n_pos(a, NULL) > 1)
                        die_usage("%s takes at most one name", cmd);
                const char *n = pos(a, 0, NULL);
                char *e = n ? esc(c, n) : NULL;
                snprintf(path, sizeof(path), "/v1/%s%s%s", cmd, e ? "/" : "", e ? e : "");
                curl_free(e);
                rc = run(o, "GET", path, NULL, NULL, NULL, NULL);
        } else if (strcmp(cmd, "keys") == 0)
                rc = cmd_keys(o, c, a);
        else if (strcmp(cmd, "certificates") == 0 || strcmp(cmd, "certs") == 0)
                rc = cmd_certificates(o, c, a);
        else if (strcmp(cmd, "bind") == 0 || strcmp(cmd, "replace") == 0 || strcmp(cmd, "unbind") == 0)
                rc = cmd_binding(o, c, cmd, a);
        else if (strcmp(cmd, "change") == 0)
                rc = cmd_change(o, a);
        else if (strcmp(cmd, "rotate") == 0)
                rc = cmd_rotate(o, a);
        else if (strcmp(cmd, "usage") == 0) {
                static const char *const k[] = { "token", NULL };
                exact(a, 0, k, "usage");
                const char *t = opt(a, "token");
                char *e = t ? esc(c, t) : NULL;
                snprintf(path, sizeof(path), "/v1/usage%s%s", e ? "?token=" : "", e ? e : "");
                curl_free(e);
                rc = run(o, "GET", path, NULL, NULL, NULL, NULL);
        } else if (strcmp(cmd, "audit") == 0)
                rc = cmd_audit(o, a);
        else
                die_usage("unknown command '%s'", cmd);
        curl_easy_cleanup(c);
        return rc;
}

int main(int argc, char **argv)
{
        static const struct option lo[] = {
                { "socket", required_argument, NULL, 's' }, { "url", required_argument, NULL, 'u' },
                { "cacert", required_argument, NULL, 'C' }, { "cert", required_argument, NULL, 'E' },
                { "key", required_argument, NULL, 'K' },    { "token-file", required_argument, NULL, 't' },
                { "json", no_argument, NULL, 'j' },         { "verbose", no_argument, NULL, 'v' },
                { "help", no_argument, NULL, 'h' },         { "version", no_argument, NULL, 'V' },
                { NULL, 0, NULL, 0 },
        };
        struct opts o = { .socket = getenv("HSMTLSCTL_SOCKET"), .url = getenv("HSMTLSCTL_URL") };
        int ch;
        /* "+": options end at the command (its own options follow it). */
        while ((ch = getopt_long(argc, argv, "+s:u:t:jvhV", lo, NULL)) != -1) {
                switch (ch) {
                case 's': o.socket = optarg; o.url = NULL; break;
                case 'u': o.url = optarg; break;
                case 'C': o.cacert = optarg; break;
                case 'E': o.cert = optarg; break;
                case 'K': o.key = optarg; break;
                case 't': o.token_file = optarg; break;
                case 'j': o.json = true; break;
                case 'v': o.verbose = true; break;
                case 'h': fputs(usage_text, stdout); return EXIT_OK;
                case 'V': printf("hsmtlsctl %s\n", HSMTLS_VERSION); return EXIT_OK;
                default: fputs(usage_text, stderr); return EXIT_USAGE;
                }
        }
        if (optind >= argc) {
                fputs(usage_text, stderr);
                return EXIT_USAGE;
        }
        if (o.url && o.url[0] && strncmp(o.url, "https://", 8) != 0 && strncmp(o.url, "http://", 7) != 0)
                die_usage("--url must start with https:// (or http://)");
        if (o.url && !o.url[0])
                o.url = NULL;
        if (!o.socket || !o.socket[0])
                o.socket = DEFAULT_SOCKET;
        if (load_token(&o) < 0)
                return EXIT_USAGE;
        /* The bearer token in clear text, to another host: never. */
        if (o.token && o.url && strncmp(o.url, "http://", 7) == 0 && !url_is_loopback(o.url)) {
                explicit_bzero(o.token, strlen(o.token));
                die_usage("--url %s: a bearer token is sent over http:// only to a loopback address; use https://", o.url);
        }
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
                fputs("hsmtlsctl: cannot start libcurl\n", stderr);
                return EXIT_TRANSPORT;
        }
        struct args a = { argc - optind - 1, argv + optind + 1 };
        int rc = dispatch(&o, argv[optind], &a);
        if (o.token) {
                explicit_bzero(o.token, strlen(o.token));
                free(o.token);
        }
        curl_global_cleanup();
        return rc;
}
