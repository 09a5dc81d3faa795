#include "conf.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/un.h>
#include <arpa/inet.h>

#include <ini.h>

#include "log.h"

struct parse_state {
        FILE *f;
        int line;           /* line the reader last returned */
        int header_line;    /* line of the last [section] header read */
        unsigned headers;   /* [section] headers read so far */
        unsigned section_no; /* header count when the current section began */
        hsm_conf *conf;
        char *section;      /* current section as written */
        int section_line;
        enum { SEC_NONE, SEC_GLOBAL, SEC_TOKEN, SEC_LISTENER, SEC_ADMIN } kind;
        void *cur;          /* current token or listener */
        int error_line;
        char *error;
        int too_long;       /* first line longer than CONF_MAX_LINE */
        bool at_line_start;
        size_t cur_len;
        char seen[64][32];  /* settings given in the current section */
        unsigned n_seen;
};

#define CONF_MAX_LINE 4096

/* inih reads long lines in pieces (growing its buffer): count a line when
 * a piece ends it, and look for [section] headers at line starts only. A
 * line longer than CONF_MAX_LINE is refused. */
static char *reader(char *str, int num, void *stream)
{
        struct parse_state *st = stream;
        char *r = fgets(str, num, st->f);
        if (!r)
                return NULL;
        size_t len = strlen(r);
        bool ends = len > 0 && r[len - 1] == '\n';
        if (st->at_line_start) {
                st->cur_len = 0;
                const char *p = r;
                while (*p == ' ' || *p == '\t')
                        p++;
                if (*p == '[') {
                        st->header_line = st->line + 1;
                        st->headers++;
                }
        }
        st->cur_len += len;
        if (st->at_line_start)
                st->line++;
        if (st->cur_len >= CONF_MAX_LINE - 1 && !ends && !st->too_long)
                st->too_long = st->line;
        st->at_line_start = ends;
        return r;
}

static int fail(struct parse_state *st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(struct parse_state *st, const char *fmt, ...)
{
        if (st->error)
                return 0;
        va_list ap;
        va_start(ap, fmt);
        if (vasprintf(&st->error, fmt, ap) < 0)
                st->error = NULL;
        va_end(ap);
        st->error_line = st->line;
        return 0;
}

/* A PIN never belongs in the configuration: pin-value= in any URI is
 * refused (it would also be echoed by every error that names the URI). */
static bool has_pin_value(struct parse_state *st, const char *value, const char *instead)
{
        if (!strstr(value, "pin-value="))
                return false;
        fail(st, "pin-value= in a URI is refused; %s", instead);
        return true;
}

static int parse_uint(const char *v, unsigned long max, unsigned *ret)
{
        char *end;
        errno = 0;
        if (!*v || *v == '-')
                return -EINVAL;
        unsigned long n = strtoul(v, &end, 10);
        if (errno || *end || n > max)
                return -ERANGE;
        *ret = (unsigned)n;
        return 0;
}

/* Durations: "10" (seconds), "250ms", "10s", "5m". */
static int parse_duration_ms(const char *v, unsigned *ret)
{
        char *end;
        errno = 0;
        if (!*v || *v == '-')
                return -EINVAL;
        double n = strtod(v, &end);
        if (errno || !isfinite(n) || n < 0 || end == v || !((*v >= '0' && *v <= '9') || *v == '.'))
                return -EINVAL;
        double mult = 1000;
        if (strcmp(end, "ms") == 0)
                mult = 1;
        else if (strcmp(end, "s") == 0 || *end == 0)
                mult = 1000;
        else if (strcmp(end, "m") == 0 || strcmp(end, "min") == 0)
                mult = 60000;
        else if (strcmp(end, "h") == 0)
                mult = 3600000;
        else
                return -EINVAL;
        double ms = n * mult;
        if (ms > 86400000.0 * 7)
                return -ERANGE;
        *ret = (unsigned)ms;
        return 0;
}

static int parse_bool(const char *v, bool *ret)
{
        static const char *const yes[] = { "yes", "true", "on", "1" }, *const no[] = { "no", "false", "off", "0" };
        for (size_t i = 0; i < 4; i++) {
                if (strcasecmp(v, yes[i]) == 0)
                        return *ret = true, 0;
                if (strcasecmp(v, no[i]) == 0)
                        return *ret = false, 0;
        }
        return -EINVAL;
}

void hsm_addr_done(hsm_addr *a)
{
        free(a->text);
        a->text = NULL;
}

int hsm_addr_parse(const char *s, bool passive, hsm_addr *ret, const char **reason)
{
        memset(ret, 0, sizeof(*ret));
        if (strncmp(s, "unix:", 5) == 0) {
                struct sockaddr_un *un = (struct sockaddr_un *)&ret->ss;
                const char *p = s + 5;
                if (!*p || strlen(p) >= sizeof(un->sun_path)) {
                        *reason = "unix socket path is empty or too long";
                        return -EINVAL;
                }
                un->sun_family = AF_UNIX;
                strcpy(un->sun_path, p);
                ret->len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(p) + 1);
                ret->text = strdup(s);
                return 0;
        }
        char host[256];
        const char *port;
        if (s[0] == '[') {
                const char *e = strchr(s, ']');
                if (!e || e[1] != ':' || (size_t)(e - s - 1) >= sizeof(host)) {
                        *reason = "expected [IPv6]:PORT";
                        return -EINVAL;
                }
                memcpy(host, s + 1, (size_t)(e - s - 1));
                host[e - s - 1] = 0;
                port = e + 2;
        } else {
                const char *c = strrchr(s, ':');
                if (!c || (size_t)(c - s) >= sizeof(host) || c == s) {
                        *reason = "expected HOST:PORT, [IPv6]:PORT or unix:/PATH";
                        return -EINVAL;
                }
                memcpy(host, s, (size_t)(c - s));
                host[c - s] = 0;
                port = c + 1;
        }
        unsigned p;
        if (parse_uint(port, 65535, &p) < 0 || (p == 0 && !passive)) {
                *reason = passive ? "port must be a number from 0 to 65535" : "port must be a number from 1 to 65535";
                return -EINVAL;
        }
        struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                                  .ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0) | AI_ADDRCONFIG };
        struct addrinfo *res = NULL;
        int g = getaddrinfo(host, port, &hints, &res);
        if (g != 0 || !res) {
                *reason = g == EAI_NONAME ? "host name does not resolve" : "cannot resolve address";
                return -EINVAL;
        }
        memcpy(&ret->ss, res->ai_addr, res->ai_addrlen);
        ret->len = res->ai_addrlen;
        freeaddrinfo(res);
        ret->text = strdup(s);
        return 0;
}

void hsm_sockaddr_format(const struct sockaddr *sa, socklen_t len, char *buf, size_t size)
{
        char h[INET6_ADDRSTRLEN] = "?";
        if (sa->sa_family == AF_INET) {
                const struct sockaddr_in *in = (const void *)sa;
                inet_ntop(AF_INET, &in->sin_addr, h, sizeof(h));
                snprintf(buf, size, "%s:%u", h, ntohs(in->sin_port));
        } else if (sa->sa_family == AF_INET6) {
                const struct sockaddr_in6 *in6 = (const void *)sa;
                inet_ntop(AF_INET6, &in6->sin6_addr, h, sizeof(h));
                snprintf(buf, size, "[%s]:%u", h, ntohs(in6->sin6_port));
        } else if (sa->sa_family == AF_UNIX) {
                const struct sockaddr_un *un = (const void *)sa;
                snprintf(buf, size, "unix:%s", len > offsetof(struct sockaddr_un, sun_path) ? un->sun_path : "");
        } else
                snprintf(buf, size, "?");
}

static int set_string(struct parse_state *st, char **dst, const char *name, const char *value)
{
        if (*dst)
                return fail(st, "'%s' given twice in [%s]", name, st->section);
        if (!*value)
                return fail(st, "'%s' is empty", name);
        *dst = strdup(value);
        return 1;
}

static int set_pin(struct parse_state *st, hsm_conf_token *t, const char *prefix, const char *name, const char *value)
{
        if (t->pin_source)
                return fail(st, "[%s] has more than one PIN source (pin_file, pin_env, pin_credential, pin_source)", st->section);
        if (!*value)
                return fail(st, "'%s' is empty", name);
        if (asprintf(&t->pin_source, "%s%s", prefix, value) < 0)
                t->pin_source = NULL;
        return 1;
}

static int token_setting(struct parse_state *st, hsm_conf_token *t, const char *name, const char *value)
{
        if (strcmp(name, "uri") == 0) {
                if (strncmp(value, "pkcs11:", 7) != 0)
                        return fail(st, "uri must be a pkcs11: URI (RFC 7512)");
                if (has_pin_value(st, value, "use pin_file, pin_env or pin_credential"))
                        return 0;
                return set_string(st, &t->uri, name, value);
        }
        if (strcmp(name, "module") == 0)
                return set_string(st, &t->module, name, value);
        if (strcmp(name, "pin_file") == 0)
                return set_pin(st, t, "file:", name, value);
        if (strcmp(name, "pin_env") == 0)
                return set_pin(st, t, "env:", name, value);
        if (strcmp(name, "pin_credential") == 0)
                return set_pin(st, t, "credential:", name, value);
        if (strcmp(name, "pin_source") == 0)
                return set_pin(st, t, "", name, value);
        if (strcmp(name, "pin") == 0 || strcmp(name, "pin_value") == 0)
                return fail(st, "PINs are not written in the configuration; use pin_file, pin_env or pin_credential");
        if (strcmp(name, "max_sessions") == 0) {
                if (parse_uint(value, 1024, &t->max_sessions) < 0)
                        return fail(st, "max_sessions must be a number from 0 (from the token) to 1024");
                return 1;
        }
        if (strcmp(name, "concurrency_min") == 0) {
                if (parse_uint(value, 1024, &t->concurrency_min) < 0)
                        return fail(st, "concurrency_min must be a number from 0 (1) to 1024");
                return 1;
        }
        if (strcmp(name, "concurrency_max") == 0) {
                if (parse_uint(value, 1024, &t->concurrency_max) < 0)
                        return fail(st, "concurrency_max must be a number from 0 (max_sessions) to 1024");
                return 1;
        }
        if (strcmp(name, "queue_limit") == 0) {
                if (parse_uint(value, 1000000, &t->queue_limit) < 0)
                        return fail(st, "queue_limit must be a number from 0 (4 x max_sessions) to 1000000");
                return 1;
        }
        if (strcmp(name, "key_ops_per_second") == 0) {
                if (parse_uint(value, 1000000, &t->key_ops_per_second) < 0)
                        return fail(st, "key_ops_per_second must be a number from 0 (no limit) to 1000000");
                return 1;
        }
        return fail(st, "unknown setting '%s' in [%s] (known: uri, module, pin_file, pin_env, pin_credential, pin_source, max_sessions, concurrency_min, concurrency_max, queue_limit, key_ops_per_second)",
                    name, st->section);
}

static int listener_setting(struct parse_state *st, hsm_conf_listener *l, const char *name, const char *value)
{
        const char *reason = NULL;
        bool conn = l->kind == HSM_CONNECTOR;
        if (strcmp(name, "listen") == 0 || strcmp(name, conn ? "connect" : "backend") == 0) {
                hsm_addr *a = name[0] == 'l' ? &l->listen : &l->backend;
                if (a->text)
                        return fail(st, "'%s' given twice in [%s]", name, st->section);
                if (hsm_addr_parse(value, name[0] == 'l', a, &reason) < 0)
                        return fail(st, "%s '%s': %s", name, value, reason);
                return 1;
        }
        if (!conn && strcmp(name, "client_auth") == 0) {
                if (strcmp(value, "none") == 0)
                        l->client_auth = HSM_CLIENT_AUTH_NONE;
                else if (strcmp(value, "optional") == 0)
                        l->client_auth = HSM_CLIENT_AUTH_OPTIONAL;
                else if (strcmp(value, "require") == 0)
                        l->client_auth = HSM_CLIENT_AUTH_REQUIRE;
                else
                        return fail(st, "client_auth must be none, optional or require");
                return 1;
        }
        if (!conn && strcmp(name, "client_ca") == 0) {
                l->client_ca_line = st->line;
                return set_string(st, &l->client_ca, name, value);
        }
        if (!conn && strcmp(name, "proxy_protocol") == 0) {
                if (strcmp(value, "v2") == 0)
                        l->proxy_protocol = true;
                else if (parse_bool(value, &l->proxy_protocol) < 0 || l->proxy_protocol)
                        return fail(st, "proxy_protocol must be v2 or no");
                return 1;
        }
        if (conn && strcmp(name, "server_name") == 0)
                return set_string(st, &l->server_name, name, value);
        if (conn && strcmp(name, "ca_file") == 0) {
                l->ca_file_line = st->line;
                return set_string(st, &l->ca_file, name, value);
        }
        if (strcmp(name, "cert") == 0) {
                hsm_conf_chain *c = realloc(l->chains, (l->n_chains + 1) * sizeof(*c));
                if (!c)
                        return fail(st, "out of memory");
                l->chains = c;
                c[l->n_chains] = (hsm_conf_chain){ .cert = strdup(value), .cert_line = st->line };
                l->n_chains++;
                return 1;
        }
        if (strcmp(name, "key") == 0) {
                if (l->n_chains == 0 || l->chains[l->n_chains - 1].key)
                        return fail(st, "'key' must follow the 'cert' it belongs to");
                if (has_pin_value(st, value, "set the PIN source in the [token] section"))
                        return 0;
                l->chains[l->n_chains - 1].key = strdup(value);
                l->chains[l->n_chains - 1].key_line = st->line;
                return 1;
        }
        if (!conn && strcmp(name, "ocsp_response") == 0) {
                if (l->n_chains == 0 || !l->chains[l->n_chains - 1].key)
                        return fail(st, "'ocsp_response' must follow the 'cert' and 'key' it belongs to");
                l->chains[l->n_chains - 1].ocsp_line = st->line;
                return set_string(st, &l->chains[l->n_chains - 1].ocsp, name, value);
        }
        if (strcmp(name, "priority") == 0) {
                l->priority_line = st->line;
                return set_string(st, &l->priority, name, value);
        }
        if (!conn && strcmp(name, "rsa_key_exchange") == 0) {
                if (parse_bool(value, &l->rsa_key_exchange) < 0)
                        return fail(st, "rsa_key_exchange must be yes or no");
                return 1;
        }
        if (strcmp(name, "max_connections") == 0) {
                if (parse_uint(value, 1000000, &l->max_connections) < 0 || l->max_connections == 0)
                        return fail(st, "max_connections must be a number from 1 to 1000000");
                return 1;
        }
        unsigned *ms = strcmp(name, "handshake_timeout") == 0 ? &l->handshake_timeout_ms
                       : strcmp(name, "idle_timeout") == 0    ? &l->idle_timeout_ms
                       : strcmp(name, "connect_timeout") == 0 ? &l->connect_timeout_ms
                                                              : NULL;
        if (ms) {
                if (parse_duration_ms(value, ms) < 0 || *ms == 0)
                        return fail(st, "%s must be a duration above zero such as 10, 10s, 500ms or 5m", name);
                return 1;
        }
        if (!conn && strcmp(name, "session_tickets") == 0) {
                if (parse_bool(value, &l->session_tickets) < 0)
                        return fail(st, "session_tickets must be yes or no");
                return 1;
        }
        if (!conn && strcmp(name, "session_cache") == 0) {
                if (parse_uint(value, 10000000, &l->session_cache) < 0)
                        return fail(st, "session_cache must be a number of sessions from 0 (no cache) to 10000000");
                return 1;
        }
        if (!conn && strcmp(name, "session_lifetime") == 0) {
                if (parse_duration_ms(value, &l->session_lifetime_ms) < 0 || l->session_lifetime_ms < 1000)
                        return fail(st, "session_lifetime must be a duration of at least 1s such as 2h, 30m or 600s");
                return 1;
        }
        if (!conn && strcmp(name, "ticket_key") == 0) {
                if (strncmp(value, "pkcs11:", 7) != 0)
                        return fail(st, "ticket_key must be a pkcs11: URI of a secret key on a token");
                if (has_pin_value(st, value, "set the PIN source in the [token] section"))
                        return 0;
                l->ticket_key_line = st->line;
                return set_string(st, &l->ticket_key, name, value);
        }
        if (!conn && strcmp(name, "alpn") == 0) {
                if (set_string(st, &l->alpn, name, value) <= 0)
                        return 0;
                /* "h2, http/1.1": comma-separated, each 1 to 255 bytes of
                 * printable ASCII without spaces, at most 16. */
                const char *p = value;
                while (*p) {
                        while (*p == ' ' || *p == '\t')
                                p++;
                        const char *e = p;
                        while (*e && *e != ',')
                                e++;
                        const char *end = e;
                        while (end > p && (end[-1] == ' ' || end[-1] == '\t'))
                                end--;
                        size_t n = (size_t)(end - p);
                        bool printable = n > 0 && n <= 255;
                        for (size_t i = 0; printable && i < n; i++)
                                printable = p[i] > 0x20 && p[i] < 0x7f;
                        if (!printable || l->n_alpn == 16)
                                return fail(st, "alpn must be a comma-separated list of up to 16 protocol names such as h2, http/1.1");
                        char **v = realloc(l->alpn_protos, (l->n_alpn + 1) * sizeof(*v));
                        if (!v)
                                return fail(st, "out of memory");
                        l->alpn_protos = v;
                        v[l->n_alpn++] = strndup(p, n);
                        p = *e ? e + 1 : e;
                        if (*e && !*p)
                                return fail(st, "alpn must be a comma-separated list of up to 16 protocol names such as h2, http/1.1");
                }
                return 1;
        }
        if (conn)
                return fail(st, "unknown setting '%s' in [%s] (known: listen, connect, server_name, ca_file, cert, key, priority, max_connections, handshake_timeout, idle_timeout, connect_timeout)",
                            name, st->section);
        return fail(st, "unknown setting '%s' in [%s] (known: listen, backend, cert, key, priority, rsa_key_exchange, client_auth, client_ca, proxy_protocol, max_connections, handshake_timeout, idle_timeout, connect_timeout, session_tickets, session_cache, session_lifetime, ticket_key, alpn, ocsp_response)",
                    name, st->section);
}

static int global_setting(struct parse_state *st, hsm_conf *c, const char *name, const char *value)
{
        if (strcmp(name, "log_level") == 0) {
                int l = hsm_log_level_from_string(value);
                if (l < 0)
                        return fail(st, "log_level must be one of error, warning, notice, info, debug");
                c->log_level = l;
                return 1;
        }
        if (strcmp(name, "handshake_threads") == 0) {
                if (parse_uint(value, 4096, &c->handshake_threads) < 0)
                        return fail(st, "handshake_threads must be a number from 0 (automatic) to 4096");
                return 1;
        }
        if (strcmp(name, "handshake_nice") == 0) {
                unsigned n;
                if (parse_uint(value, 19, &n) < 0)
                        return fail(st, "handshake_nice must be a number from 0 to 19");
                c->handshake_nice = (int)n;
                return 1;
        }
        if (strcmp(name, "handshake_cpus") == 0) {
                if (parse_uint(value, 1024, &c->handshake_cpus) < 0)
                        return fail(st, "handshake_cpus must be a number from 0 (one per core) to 1024");
                return 1;
        }
        if (strcmp(name, "io_threads") == 0) {
                if (parse_uint(value, 256, &c->io_threads) < 0)
                        return fail(st, "io_threads must be a number from 0 (one per core) to 256");
                return 1;
        }
        if (strcmp(name, "max_connections") == 0) {
                if (parse_uint(value, 10000000, &c->max_connections) < 0 || c->max_connections == 0)
                        return fail(st, "max_connections must be a number from 1 to 10000000");
                return 1;
        }
        if (strcmp(name, "max_waiting_handshakes") == 0) {
                if (parse_uint(value, 10000000, &c->max_waiting_handshakes) < 0)
                        return fail(st, "max_waiting_handshakes must be a number from 0 (half of max_connections) to 10000000");
                return 1;
        }
        if (strcmp(name, "drain_timeout") == 0) {
                if (parse_duration_ms(value, &c->drain_timeout_ms) < 0)
                        return fail(st, "drain_timeout must be a duration such as 30, 30s or 2m");
                return 1;
        }
        if (strcmp(name, "ticket_key") == 0) {
                if (strncmp(value, "pkcs11:", 7) != 0)
                        return fail(st, "ticket_key must be a pkcs11: URI of a secret key on a token");
                if (has_pin_value(st, value, "set the PIN source in the [token] section"))
                        return 0;
                c->ticket_key_line = st->line;
                return set_string(st, &c->ticket_key, name, value);
        }
        if (strcmp(name, "state_dir") == 0) {
                if (value[0] != '/')
                        return fail(st, "state_dir must be an absolute path");
                return set_string(st, &c->state_dir, name, value);
        }
        if (strcmp(name, "user") == 0 || strcmp(name, "group") == 0) {
                /* Looked up (and refused if unknown) by hsmtlsd at start. */
                if (!value[0] || strchr(value, ':') || strchr(value, '/'))
                        return fail(st, "%s must be a %s name or number", name, name);
                bool u = name[0] == 'u';
                *(u ? &c->user_line : &c->group_line) = st->line;
                return set_string(st, u ? &c->user : &c->group, name, value);
        }
        return fail(st, "unknown setting '%s' in [global] (known: log_level, handshake_threads, handshake_nice, handshake_cpus, io_threads, max_connections, max_waiting_handshakes, drain_timeout, ticket_key, state_dir, user, group)",
                    name);
}

static int parse_role(const char *v, size_t n, enum hsm_admin_role *ret)
{
        if (n == 4 && strncmp(v, "read", 4) == 0)
                return *ret = HSM_ROLE_READ, 0;
        if (n == 5 && strncmp(v, "admin", 5) == 0)
                return *ret = HSM_ROLE_ADMIN, 0;
        return -EINVAL;
}

static int hexval(char c)
{
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        if (c >= 'A' && c <= 'F')
                return c - 'A' + 10;
        return -1;
}

static int admin_setting(struct parse_state *st, hsm_conf_admin *a, const char *name, const char *value)
{
        if (strcmp(name, "listen") == 0) {
                const char *reason = NULL;
                if (a->listen.text)
                        return fail(st, "'listen' given twice in [admin]");
                if (hsm_addr_parse(value, true, &a->listen, &reason) < 0)
                        return fail(st, "listen: %s", reason ? reason : "bad address");
                return 1;
        }
        if (strcmp(name, "tls_cert") == 0 || strcmp(name, "tls_key") == 0 || strcmp(name, "client_ca") == 0) {
                if (strcmp(name, "tls_key") == 0 && has_pin_value(st, value, "set the PIN source in the [token] section"))
                        return 0;
                a->tls_line = st->line;
                return set_string(st, name[4] == 'c' ? &a->tls_cert : name[4] == 'k' ? &a->tls_key : &a->client_ca,
                                  name, value);
        }
        if (strcmp(name, "token") == 0) {
                /* ROLE:NAME:SHA256HEX */
                const char *c1 = strchr(value, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
                hsm_conf_admin_token t = { .line = st->line };
                if (!c1 || !c2 || parse_role(value, (size_t)(c1 - value), &t.role) < 0 || c2 == c1 + 1 ||
                    strlen(c2 + 1) != 64)
                        return fail(st, "token must be ROLE:NAME:SHA256 (ROLE read or admin; SHA256: 64 hex digits, "
                                        "e.g. from: printf %%s TOKEN | sha256sum)");
                for (int i = 0; i < 32; i++) {
                        int h = hexval(c2[1 + 2 * i]), l = hexval(c2[2 + 2 * i]);
                        if (h < 0 || l < 0)
                                return fail(st, "token: the SHA-256 must be 64 hex digits");
                        t.sha256[i] = (unsigned char)(h << 4 | l);
                }
                t.name = strndup(c1 + 1, (size_t)(c2 - c1 - 1));
                for (unsigned i = 0; i < a->n_tokens; i++)
                        if (strcmp(a->tokens[i].name, t.name) == 0) {
                                free(t.name);
                                return fail(st, "token name given twice in [admin] (first on line %d)", a->tokens[i].line);
                        }
                hsm_conf_admin_token *n = realloc(a->tokens, (a->n_tokens + 1) * sizeof(*n));
                if (!n) {
                        free(t.name);
                        return fail(st, "out of memory");
                }
                a->tokens = n;
                a->tokens[a->n_tokens++] = t;
                return 1;
        }
        if (strcmp(name, "identity") == 0) {
                /* ROLE:SUBJECT */
                const char *c1 = strchr(value, ':');
                hsm_conf_admin_identity id = { .line = st->line };
                if (!c1 || parse_role(value, (size_t)(c1 - value), &id.role) < 0 || !c1[1])
                        return fail(st, "identity must be ROLE:SUBJECT (ROLE read or admin; SUBJECT the client "
                                        "certificate's subject, e.g. admin:CN=ops,O=Example)");
                hsm_conf_admin_identity *n = realloc(a->identities, (a->n_identities + 1) * sizeof(*n));
                if (!n)
                        return fail(st, "out of memory");
                a->identities = n;
                id.subject = strdup(c1 + 1);
                a->identities[a->n_identities++] = id;
                return 1;
        }
        if (strcmp(name, "max_connections") == 0) {
                if (parse_uint(value, 100000, &a->max_connections) < 0 || !a->max_connections)
                        return fail(st, "max_connections must be a number from 1 to 100000");
                return 1;
        }
        if (strcmp(name, "max_connections_per_ip") == 0) {
                if (parse_uint(value, 100000, &a->max_connections_per_ip) < 0 || !a->max_connections_per_ip)
                        return fail(st, "max_connections_per_ip must be a number from 1 to 100000");
                return 1;
        }
        if (strcmp(name, "max_body") == 0) {
                if (parse_uint(value, 64u << 20, &a->max_body) < 0 || a->max_body < 1024)
                        return fail(st, "max_body must be a number of bytes from 1024 to 67108864");
                return 1;
        }
        if (strcmp(name, "timeout") == 0) {
                if (parse_duration_ms(value, &a->timeout_ms) < 0 || a->timeout_ms < 1000)
                        return fail(st, "timeout must be a duration of at least 1s, such as 10, 10s or 1m");
                return 1;
        }
        if (strcmp(name, "threads") == 0) {
                if (parse_uint(value, 64, &a->threads) < 0 || !a->threads)
                        return fail(st, "threads must be a number from 1 to 64");
                return 1;
        }
        unsigned *count = strcmp(name, "audit_refusals_burst") == 0                    ? &a->audit_refusals_burst
                          : strcmp(name, "audit_refusals_per_minute") == 0             ? &a->audit_refusals_per_minute
                          : strcmp(name, "audit_refusals_burst_per_address") == 0      ? &a->audit_refusals_burst_per_address
                          : strcmp(name, "audit_refusals_per_minute_per_address") == 0 ? &a->audit_refusals_per_minute_per_address
                                                                                        : NULL;
        if (count) {
                if (parse_uint(value, 1000000, count) < 0)
                        return fail(st, "%s must be a number from 0 to 1000000", name);
                return 1;
        }
        if (strcmp(name, "audit_refusals_summary_interval") == 0) {
                if (parse_duration_ms(value, &a->audit_refusals_summary_interval_ms) < 0 ||
                    a->audit_refusals_summary_interval_ms < 1000 || a->audit_refusals_summary_interval_ms > 86400000)
                        return fail(st, "audit_refusals_summary_interval must be a duration from 1s to 24h, such as 60s or 5m");
                return 1;
        }
        return fail(st, "unknown setting '%s' in [admin] (known: listen, tls_cert, tls_key, client_ca, token, identity, "
                        "max_connections, max_connections_per_ip, max_body, timeout, threads, audit_refusals_burst, "
                        "audit_refusals_per_minute, audit_refusals_burst_per_address, "
                        "audit_refusals_per_minute_per_address, audit_refusals_summary_interval)",
                    name);
}

static int valid_name(const char *s)
{
        if (!*s)
                return 0;
        for (; *s; s++)
                if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') || *s == '-' || *s == '_' || *s == '.'))
                        return 0;
        return 1;
}

static int begin_section_at(struct parse_state *st, const char *section);

static int begin_section(struct parse_state *st, const char *section)
{
        int saved = st->line;
        if (!*section) {
                st->kind = SEC_NONE;
                return fail(st, "setting outside of any section (start with [global], [token NAME] or [listener NAME])");
        }
        st->line = st->header_line;
        int r = begin_section_at(st, section);
        st->line = saved;
        return r;
}

static int begin_section_at(struct parse_state *st, const char *section)
{
        hsm_conf *c = st->conf;
        free(st->section);
        st->section = strdup(section);
        st->section_line = st->header_line;
        st->section_no = st->headers;
        st->n_seen = 0;
        st->cur = NULL;

        if (strcmp(section, "global") == 0) {
                /* A second [global] would silently override the first. */
                if (c->global_line)
                        return fail(st, "[global] is defined twice (first on line %d)", c->global_line);
                c->global_line = st->header_line;
                st->kind = SEC_GLOBAL;
                return 1;
        }
        if (strcmp(section, "admin") == 0) {
                if (c->admin.enabled)
                        return fail(st, "[admin] is defined twice (first on line %d)", c->admin.line);
                c->admin.enabled = true;
                c->admin.line = st->header_line;
                /* The audit limits of refused requests (0 is a value). */
                c->admin.audit_refusals_burst = 50;
                c->admin.audit_refusals_per_minute = 120;
                c->admin.audit_refusals_burst_per_address = 10;
                c->admin.audit_refusals_per_minute_per_address = 30;
                c->admin.audit_refusals_summary_interval_ms = 60000;
                st->kind = SEC_ADMIN;
                return 1;
        }
        const char *sp = strchr(section, ' ');
        if (!sp)
                return fail(st, "unknown section [%s] (expected [global], [token NAME], [listener NAME], [connector NAME] or [admin])", section);
        size_t tl = (size_t)(sp - section);
        const char *name = sp + 1;
        while (*name == ' ')
                name++;
        if (!valid_name(name))
                return fail(st, "section name '%s' may contain only letters, digits, '-', '_' and '.'", name);
        if (tl == 5 && strncmp(section, "token", 5) == 0) {
                for (unsigned i = 0; i < c->n_tokens; i++)
                        if (strcmp(c->tokens[i].name, name) == 0)
                                return fail(st, "[token %s] is defined twice (first on line %d)", name, c->tokens[i].line);
                hsm_conf_token *t = realloc(c->tokens, (c->n_tokens + 1) * sizeof(*t));
                if (!t)
                        return fail(st, "out of memory");
                c->tokens = t;
                t[c->n_tokens] = (hsm_conf_token){ .name = strdup(name), .line = st->header_line };
                st->cur = &t[c->n_tokens++];
                st->kind = SEC_TOKEN;
                return 1;
        }
        if ((tl == 8 && strncmp(section, "listener", 8) == 0) || (tl == 9 && strncmp(section, "connector", 9) == 0)) {
                enum hsm_endpoint_kind kind = tl == 9 ? HSM_CONNECTOR : HSM_LISTENER;
                for (unsigned i = 0; i < c->n_listeners; i++)
                        if (strcmp(c->listeners[i].name, name) == 0)
                                return fail(st, "a listener or connector named '%s' is defined twice (first on line %d)", name,
                                            c->listeners[i].line);
                hsm_conf_listener *l = realloc(c->listeners, (c->n_listeners + 1) * sizeof(*l));
                if (!l)
                        return fail(st, "out of memory");
                c->listeners = l;
                l[c->n_listeners] = (hsm_conf_listener){ .kind = kind,
                                                          .name = strdup(name),
                                                          .line = st->header_line,
                                                          .session_tickets = true,
                                                          .session_cache = HSM_DEFAULT_SESSION_CACHE,
                                                          .session_lifetime_ms = HSM_DEFAULT_SESSION_LIFETIME_MS };
                st->cur = &l[c->n_listeners++];
                st->kind = SEC_LISTENER;
                return 1;
        }
        return fail(st, "unknown section [%s] (expected [global], [token NAME], [listener NAME], [connector NAME] or [admin])", section);
}

static int handler(void *user, const char *section, const char *name, const char *value)
{
        struct parse_state *st = user;
        if (st->error)
                return 1; /* report only the first error */
        if (!st->section || strcmp(st->section, section) != 0 || st->section_no != st->headers) {
                if (begin_section(st, section) == 0)
                        return 1;
        }
        if (!name)
                return 1; /* section header only (inih with INI_CALL_HANDLER_ON_NEW_SECTION) */
        bool repeatable = strcmp(name, "cert") == 0 || strcmp(name, "key") == 0 ||
                          (st->kind == SEC_ADMIN && (strcmp(name, "token") == 0 || strcmp(name, "identity") == 0));
        if (!repeatable) {
                for (unsigned i = 0; i < st->n_seen; i++)
                        if (strcmp(st->seen[i], name) == 0) {
                                fail(st, "'%s' given twice in [%s]", name, st->section);
                                return 1;
                        }
                if (st->n_seen < 64 && strlen(name) < sizeof(st->seen[0]))
                        strcpy(st->seen[st->n_seen++], name);
        }
        /* The realloc()s above may move sections: look the current one up again. */
        switch (st->kind) {
        case SEC_GLOBAL:
                global_setting(st, st->conf, name, value);
                break;
        case SEC_TOKEN:
                token_setting(st, &st->conf->tokens[st->conf->n_tokens - 1], name, value);
                break;
        case SEC_LISTENER:
                listener_setting(st, &st->conf->listeners[st->conf->n_listeners - 1], name, value);
                break;
        case SEC_ADMIN:
                admin_setting(st, &st->conf->admin, name, value);
                break;
        default:
                fail(st, "setting '%s' outside of any section", name);
        }
        return 1;
}

static int check_admin(hsm_conf *c, char **where_line, int *line)
{
        hsm_conf_admin *a = &c->admin;
        if (!a->enabled)
                return 0;
        *line = a->line;
        if (!c->state_dir)
                return asprintf(where_line, "[admin] needs [global] state_dir (the audit log and the usage totals live there)");
        if (a->n_tokens == 0 && a->n_identities == 0)
                return asprintf(where_line, "[admin] has no identity: add 'token = ROLE:NAME:SHA256' or 'identity = ROLE:SUBJECT'");
        if (!a->tls_cert != !a->tls_key) {
                *line = a->tls_line;
                return asprintf(where_line, "[admin] needs both tls_cert and tls_key for HTTPS");
        }
        if ((a->client_ca || a->n_identities) && !a->tls_cert) {
                *line = a->tls_line ? a->tls_line : a->line;
                return asprintf(where_line, "[admin] client certificates (client_ca, identity) need HTTPS: set tls_cert and tls_key");
        }
        if (a->n_identities && !a->client_ca)
                return asprintf(where_line, "[admin] 'identity' needs 'client_ca' (the admin CA)");
        if (!a->listen.text) {
                char *u = NULL;
                const char *reason = NULL;
                if (asprintf(&u, "unix:%s/admin.sock", c->state_dir) < 0)
                        return -1;
                int r = hsm_addr_parse(u, true, &a->listen, &reason);
                free(u);
                if (r < 0)
                        return asprintf(where_line, "[admin] default listen address %s/admin.sock: %s", c->state_dir,
                                        reason ? reason : "bad");
        }
        const struct sockaddr *sa = (const struct sockaddr *)&a->listen.ss;
        bool loopback = sa->sa_family == AF_UNIX ||
                        (sa->sa_family == AF_INET &&
                         (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127) ||
                        (sa->sa_family == AF_INET6 && IN6_IS_ADDR_LOOPBACK(&((const struct sockaddr_in6 *)sa)->sin6_addr));
        if (!loopback && !a->tls_cert)
                return asprintf(where_line, "[admin] listen %s is not loopback: set tls_cert and tls_key (HTTPS) to serve "
                                "the admin API beyond this machine", a->listen.text);
        if (!a->max_connections)
                a->max_connections = 64;
        if (!a->max_connections_per_ip)
                a->max_connections_per_ip = 8;
        if (!a->max_body)
                a->max_body = 1u << 20;
        if (!a->timeout_ms)
                a->timeout_ms = 10000;
        if (!a->threads)
                a->threads = 2;
        return 0;
}

static int check_complete(hsm_conf *c, char **where_line, int *line)
{
        int ar = check_admin(c, where_line, line);
        if (ar != 0)
                return ar;
        for (unsigned i = 0; i < c->n_tokens; i++) {
                hsm_conf_token *t = &c->tokens[i];
                if (!t->uri) {
                        *line = t->line;
                        return asprintf(where_line, "[token %s] has no 'uri'", t->name);
                }
                if (t->concurrency_min && t->concurrency_max && t->concurrency_min > t->concurrency_max) {
                        *line = t->line;
                        return asprintf(where_line, "[token %s]: concurrency_min is above concurrency_max", t->name);
                }
        }
        if (c->n_listeners == 0) {
                *line = 0;
                return asprintf(where_line, "no [listener] or [connector] section: nothing to do");
        }
        for (unsigned i = 0; i < c->n_listeners; i++) {
                hsm_conf_listener *l = &c->listeners[i];
                const char *kind = l->kind == HSM_CONNECTOR ? "connector" : "listener";
                *line = l->line;
                if (!l->listen.text)
                        return asprintf(where_line, "[%s %s] has no 'listen' address", kind, l->name);
                if (!l->backend.text)
                        return l->kind == HSM_CONNECTOR
                                       ? asprintf(where_line, "[connector %s] has no 'connect' address (the TLS server)", l->name)
                                       : asprintf(where_line, "[listener %s] has no 'backend' address", l->name);
                if (l->n_chains == 0 && l->kind == HSM_LISTENER)
                        return asprintf(where_line, "[listener %s] has no certificate: add 'cert' and 'key'", l->name);
                if (l->client_auth != HSM_CLIENT_AUTH_NONE && !l->client_ca)
                        return asprintf(where_line, "[listener %s] has client_auth but no 'client_ca' to verify clients against", l->name);
                if (l->kind == HSM_CONNECTOR && !l->server_name) {
                        /* The host part of 'connect' names the server. */
                        const char *t = l->backend.text;
                        const char *colon = strrchr(t, ':');
                        if (strncmp(t, "unix:", 5) == 0)
                                return asprintf(where_line, "[connector %s] connects to a unix socket: set 'server_name'", l->name);
                        if (t[0] == '[')
                                l->server_name = strndup(t + 1, (size_t)(strchr(t, ']') - t - 1));
                        else
                                l->server_name = strndup(t, (size_t)(colon - t));
                }
                for (unsigned j = 0; j < l->n_chains; j++)
                        if (!l->chains[j].key) {
                                *line = l->chains[j].cert_line;
                                return asprintf(where_line, "'cert' has no 'key' after it");
                        }
                if (!l->priority)
                        l->priority = strdup(HSM_DEFAULT_PRIORITY);
                if (!l->max_connections)
                        l->max_connections = c->max_connections;
                if (!l->handshake_timeout_ms)
                        l->handshake_timeout_ms = 10000;
                if (!l->idle_timeout_ms)
                        l->idle_timeout_ms = 300000;
                if (!l->connect_timeout_ms)
                        l->connect_timeout_ms = 5000;
                if (l->kind == HSM_LISTENER && !l->ticket_key && c->ticket_key) {
                        l->ticket_key = strdup(c->ticket_key);
                        l->ticket_key_line = c->ticket_key_line;
                }
        }
        return 0;
}

static int conf_load_stream(FILE *f, const char *path, hsm_conf **ret, char **errmsg);

int hsm_conf_load(const char *path, hsm_conf **ret, char **errmsg)
{
        *errmsg = NULL;
        FILE *f = fopen(path, "re");
        if (!f) {
                int e = errno;
                if (asprintf(errmsg, "%s: cannot open: %s", path, strerror(e)) < 0)
                        *errmsg = NULL;
                return -e;
        }
        return conf_load_stream(f, path, ret, errmsg);
}

int hsm_conf_load_buffer(const char *name, const char *text, size_t len, hsm_conf **ret, char **errmsg)
{
        *errmsg = NULL;
        /* fmemopen() refuses an empty buffer: an empty text is one empty line. */
        FILE *f = len ? fmemopen((void *)text, len, "r") : fmemopen((void *)"\n", 1, "r");
        if (!f)
                return -errno;
        return conf_load_stream(f, name, ret, errmsg);
}

/* Parses the configuration from f (closed here); path names it in errors. */
static int conf_load_stream(FILE *f, const char *path, hsm_conf **ret, char **errmsg)
{
        struct parse_state st = { .at_line_start = true };
        st.f = f;
        hsm_conf *c = calloc(1, sizeof(*c));
        if (!c) {
                fclose(st.f);
                return -ENOMEM;
        }
        c->path = strdup(path);
        c->log_level = HSM_LOG_INFO;
        c->max_connections = 10000;
        c->drain_timeout_ms = 30000;
        c->handshake_nice = 5;
        st.conf = c;
        /* Debian's inih sizes its line buffer at run time. */
        ini_use_stack = false;
        ini_allow_realloc = true;
        ini_max_line = CONF_MAX_LINE;
        int r = ini_parse_stream(reader, &st, handler, &st);
        fclose(st.f);
        free(st.section);
        if (st.too_long) {
                free(st.error);
                st.error = NULL;
                if (asprintf(&st.error, "line too long (at most %d characters)", CONF_MAX_LINE - 2) < 0)
                        st.error = NULL;
                st.error_line = st.too_long;
        }
        if (r != 0 && !st.error) {
                /* inih's own syntax errors: r is the line. */
                st.error_line = r > 0 ? r : st.line;
                st.error = strdup(r > 0 ? "syntax error (expected [section], name = value, or a ; comment)" : "cannot read file");
        }
        if (!st.error) {
                char *m = NULL;
                int line = 0;
                if (check_complete(c, &m, &line) > 0) {
                        st.error = m;
                        st.error_line = line;
                }
        }
        if (st.error) {
                int w = st.error_line > 0 ? asprintf(errmsg, "%s:%d: %s", path, st.error_line, st.error)
                                          : asprintf(errmsg, "%s: %s", path, st.error);
                if (w < 0)
                        *errmsg = NULL;
                free(st.error);
                hsm_conf_free(c);
                return -EINVAL;
        }
        *ret = c;
        return 0;
}

void hsm_conf_free(hsm_conf *c)
{
        if (!c)
                return;
        for (unsigned i = 0; i < c->n_tokens; i++) {
                hsm_conf_token *t = &c->tokens[i];
                free(t->name);
                free(t->uri);
                free(t->module);
                free(t->pin_source);
        }
        free(c->tokens);
        free(c->ticket_key);
        for (unsigned i = 0; i < c->n_listeners; i++) {
                hsm_conf_listener *l = &c->listeners[i];
                free(l->name);
                hsm_addr_done(&l->listen);
                hsm_addr_done(&l->backend);
                for (unsigned j = 0; j < l->n_chains; j++) {
                        free(l->chains[j].cert);
                        free(l->chains[j].key);
                        free(l->chains[j].ocsp);
                }
                free(l->chains);
                free(l->priority);
                free(l->client_ca);
                free(l->server_name);
                free(l->ca_file);
                free(l->ticket_key);
                free(l->alpn);
                for (unsigned j = 0; j < l->n_alpn; j++)
                        free(l->alpn_protos[j]);
                free(l->alpn_protos);
        }
        free(c->listeners);
        hsm_addr_done(&c->admin.listen);
        free(c->admin.tls_cert);
        free(c->admin.tls_key);
        free(c->admin.client_ca);
        for (unsigned i = 0; i < c->admin.n_tokens; i++)
                free(c->admin.tokens[i].name);
        free(c->admin.tokens);
        for (unsigned i = 0; i < c->admin.n_identities; i++)
                free(c->admin.identities[i].subject);
        free(c->admin.identities);
        free(c->state_dir);
        free(c->user);
        free(c->group);
        free(c->path);
        free(c);
}
