/* The configuration file's parser: inih reads it line by line (reader),
 * handler() sees each [section] header and name = value, and hands the
 * setting to its section's parser (conflisten.c: [global], [listener],
 * [connector]; conftoken.c: [token]; confadmin.c: [admin]); then the
 * checks of a whole file, defaults, loading and freeing. Here also the
 * value parsers those share (numbers, durations, booleans, addresses). */
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

#include "confparse.h"
#include "log.h"

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

int hsm_conf_fail(struct parse_state *st, const char *fmt, ...)
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
bool hsm_conf_has_pin_value(struct parse_state *st, const char *value, const char *instead)
{
        if (!strstr(value, "pin-value="))
                return false;
        hsm_conf_fail(st, "pin-value= in a URI is refused; %s", instead);
        return true;
}

int hsm_conf_parse_uint(const char *v, unsigned long max, unsigned *ret)
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
int hsm_conf_parse_duration_ms(const char *v, unsigned *ret)
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

int hsm_conf_parse_bool(const char *v, bool *ret)
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
        if (hsm_conf_parse_uint(port, 65535, &p) < 0 || (p == 0 && !passive)) {
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

int hsm_conf_set_string(struct parse_state *st, char **dst, const char *name, const char *value)
{
        if (*dst)
                return hsm_conf_fail(st, "'%s' given twice in [%s]", name, st->section);
        if (!*value)
                return hsm_conf_fail(st, "'%s' is empty", name);
        *dst = strdup(value);
        return 1;
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
                return hsm_conf_fail(st, "setting outside of any section (start with [global], [token NAME] or [listener NAME])");
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
                        return hsm_conf_fail(st, "[global] is defined twice (first on line %d)", c->global_line);
                c->global_line = st->header_line;
                st->kind = SEC_GLOBAL;
                return 1;
        }
        if (strcmp(section, "admin") == 0) {
                if (c->admin.enabled)
                        return hsm_conf_fail(st, "[admin] is defined twice (first on line %d)", c->admin.line);
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
                return hsm_conf_fail(st, "unknown section [%s] (expected [global], [token NAME], [listener NAME], [connector NAME] or [admin])", section);
        size_t tl = (size_t)(sp - section);
        const char *name = sp + 1;
        while (*name == ' ')
                name++;
        if (!valid_name(name))
                return hsm_conf_fail(st, "section name '%s' may contain only letters, digits, '-', '_' and '.'", name);
        if (tl == 5 && strncmp(section, "token", 5) == 0) {
                for (unsigned i = 0; i < c->n_tokens; i++)
                        if (strcmp(c->tokens[i].name, name) == 0)
                                return hsm_conf_fail(st, "[token %s] is defined twice (first on line %d)", name, c->tokens[i].line);
                hsm_conf_token *t = realloc(c->tokens, (c->n_tokens + 1) * sizeof(*t));
                if (!t)
                        return hsm_conf_fail(st, "out of memory");
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
                                return hsm_conf_fail(st, "a listener or connector named '%s' is defined twice (first on line %d)", name,
                                            c->listeners[i].line);
                hsm_conf_listener *l = realloc(c->listeners, (c->n_listeners + 1) * sizeof(*l));
                if (!l)
                        return hsm_conf_fail(st, "out of memory");
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
        return hsm_conf_fail(st, "unknown section [%s] (expected [global], [token NAME], [listener NAME], [connector NAME] or [admin])", section);
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
                                hsm_conf_fail(st, "'%s' given twice in [%s]", name, st->section);
                                return 1;
                        }
                if (st->n_seen < 64 && strlen(name) < sizeof(st->seen[0]))
                        strcpy(st->seen[st->n_seen++], name);
        }
        /* The realloc()s above may move sections: look the current one up again. */
        switch (st->kind) {
        case SEC_GLOBAL:
                hsm_conf_global_setting(st, st->conf, name, value);
                break;
        case SEC_TOKEN:
                hsm_conf_token_setting(st, &st->conf->tokens[st->conf->n_tokens - 1], name, value);
                break;
        case SEC_LISTENER:
                hsm_conf_listener_setting(st, &st->conf->listeners[st->conf->n_listeners - 1], name, value);
                break;
        case SEC_ADMIN:
                hsm_conf_admin_setting(st, &st->conf->admin, name, value);
                break;
        default:
                hsm_conf_fail(st, "setting '%s' outside of any section", name);
        }
        return 1;
}

static int check_complete(hsm_conf *c, char **where_line, int *line)
{
        int ar = hsm_conf_check_admin(c, where_line, line);
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
