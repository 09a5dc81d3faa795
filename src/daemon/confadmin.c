/* [admin]: the admin API's address, HTTPS, identities (bearer tokens by
 * their SHA-256, client certificate subjects), limits, and the checks of
 * the section as a whole. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>

#include "confparse.h"
#include "parse.h"

static int parse_role(const char *v, size_t n, enum hsm_admin_role *ret)
{
        if (n == 4 && strncmp(v, "read", 4) == 0)
                return *ret = HSM_ROLE_READ, 0;
        if (n == 5 && strncmp(v, "admin", 5) == 0)
                return *ret = HSM_ROLE_ADMIN, 0;
        return -EINVAL;
}

int hsm_conf_admin_setting(struct parse_state *st, hsm_conf_admin *a, const char *name, const char *value)
{
        if (strcmp(name, "listen") == 0) {
                const char *reason = NULL;
                if (a->listen.text)
                        return hsm_conf_fail(st, "'listen' given twice in [admin]");
                if (hsm_addr_parse(value, true, &a->listen, &reason) < 0)
                        return hsm_conf_fail(st, "listen: %s", reason ? reason : "bad address");
                return 1;
        }
        if (strcmp(name, "tls_cert") == 0 || strcmp(name, "tls_key") == 0 || strcmp(name, "client_ca") == 0) {
                if (strcmp(name, "tls_key") == 0 && hsm_conf_has_pin_value(st, value, "set the PIN source in the [token] section"))
                        return 0;
                a->tls_line = st->line;
                return hsm_conf_set_string(st, name[4] == 'c' ? &a->tls_cert : name[4] == 'k' ? &a->tls_key : &a->client_ca,
                                  name, value);
        }
        if (strcmp(name, "token") == 0) {
                /* ROLE:NAME:SHA256HEX */
                const char *c1 = strchr(value, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
                hsm_conf_admin_token t = { .line = st->line };
                if (!c1 || !c2 || parse_role(value, (size_t)(c1 - value), &t.role) < 0 || c2 == c1 + 1 ||
                    strlen(c2 + 1) != 64)
                        return hsm_conf_fail(st, "token must be ROLE:NAME:SHA256 (ROLE read or admin; SHA256: 64 hex digits, "
                                        "e.g. from: printf %%s TOKEN | sha256sum)");
                size_t len;
                if (hex_decode(c2 + 1, t.sha256, sizeof(t.sha256), &len) < 0 || len != sizeof(t.sha256))
                        return hsm_conf_fail(st, "token: the SHA-256 must be 64 hex digits");
                t.name = strndup(c1 + 1, (size_t)(c2 - c1 - 1));
                for (unsigned i = 0; i < a->n_tokens; i++)
                        if (strcmp(a->tokens[i].name, t.name) == 0) {
                                free(t.name);
                                return hsm_conf_fail(st, "token name given twice in [admin] (first on line %d)", a->tokens[i].line);
                        }
                hsm_conf_admin_token *n = realloc(a->tokens, (a->n_tokens + 1) * sizeof(*n));
                if (!n) {
                        free(t.name);
                        return hsm_conf_fail(st, "out of memory");
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
                        return hsm_conf_fail(st, "identity must be ROLE:SUBJECT (ROLE read or admin; SUBJECT the client "
                                        "certificate's subject, e.g. admin:CN=ops,O=Example)");
                hsm_conf_admin_identity *n = realloc(a->identities, (a->n_identities + 1) * sizeof(*n));
                if (!n)
                        return hsm_conf_fail(st, "out of memory");
                a->identities = n;
                id.subject = strdup(c1 + 1);
                a->identities[a->n_identities++] = id;
                return 1;
        }
        if (strcmp(name, "max_connections") == 0) {
                if (hsm_conf_parse_uint(value, 100000, &a->max_connections) < 0 || !a->max_connections)
                        return hsm_conf_fail(st, "max_connections must be a number from 1 to 100000");
                return 1;
        }
        if (strcmp(name, "max_connections_per_ip") == 0) {
                if (hsm_conf_parse_uint(value, 100000, &a->max_connections_per_ip) < 0 || !a->max_connections_per_ip)
                        return hsm_conf_fail(st, "max_connections_per_ip must be a number from 1 to 100000");
                return 1;
        }
        if (strcmp(name, "max_body") == 0) {
                if (hsm_conf_parse_uint(value, 64u << 20, &a->max_body) < 0 || a->max_body < 1024)
                        return hsm_conf_fail(st, "max_body must be a number of bytes from 1024 to 67108864");
                return 1;
        }
        if (strcmp(name, "timeout") == 0) {
                if (hsm_conf_parse_duration_ms(value, &a->timeout_ms) < 0 || a->timeout_ms < 1000)
                        return hsm_conf_fail(st, "timeout must be a duration of at least 1s, such as 10, 10s or 1m");
                return 1;
        }
        if (strcmp(name, "threads") == 0) {
                if (hsm_conf_parse_uint(value, 64, &a->threads) < 0 || !a->threads)
                        return hsm_conf_fail(st, "threads must be a number from 1 to 64");
                return 1;
        }
        unsigned *count = strcmp(name, "audit_refusals_burst") == 0                    ? &a->audit_refusals_burst
                          : strcmp(name, "audit_refusals_per_minute") == 0             ? &a->audit_refusals_per_minute
                          : strcmp(name, "audit_refusals_burst_per_address") == 0      ? &a->audit_refusals_burst_per_address
                          : strcmp(name, "audit_refusals_per_minute_per_address") == 0 ? &a->audit_refusals_per_minute_per_address
                                                                                        : NULL;
        if (count) {
                if (hsm_conf_parse_uint(value, 1000000, count) < 0)
                        return hsm_conf_fail(st, "%s must be a number from 0 to 1000000", name);
                return 1;
        }
        if (strcmp(name, "audit_refusals_summary_interval") == 0) {
                if (hsm_conf_parse_duration_ms(value, &a->audit_refusals_summary_interval_ms) < 0 ||
                    a->audit_refusals_summary_interval_ms < 1000 || a->audit_refusals_summary_interval_ms > 86400000)
                        return hsm_conf_fail(st, "audit_refusals_summary_interval must be a duration from 1s to 24h, such as 60s or 5m");
                return 1;
        }
        return hsm_conf_fail(st, "unknown setting '%s' in [admin] (known: listen, tls_cert, tls_key, client_ca, token, identity, "
                        "max_connections, max_connections_per_ip, max_body, timeout, threads, audit_refusals_burst, "
                        "audit_refusals_per_minute, audit_refusals_burst_per_address, "
                        "audit_refusals_per_minute_per_address, audit_refusals_summary_interval)",
                    name);
}

int hsm_conf_check_admin(hsm_conf *c, char **where_line, int *line)
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
