/* [global], [listener NAME] and [connector NAME]: one setting each call. */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "confparse.h"
#include "log.h"

int hsm_conf_listener_setting(struct parse_state *st, hsm_conf_listener *l, const char *name, const char *value)
{
        const char *reason = NULL;
        bool conn = l->kind == HSM_CONNECTOR;
        if (strcmp(name, "listen") == 0 || strcmp(name, conn ? "connect" : "backend") == 0) {
                hsm_addr *a = name[0] == 'l' ? &l->listen : &l->backend;
                if (a->text)
                        return hsm_conf_fail(st, "'%s' given twice in [%s]", name, st->section);
                if (hsm_addr_parse(value, name[0] == 'l', a, &reason) < 0)
                        return hsm_conf_fail(st, "%s '%s': %s", name, value, reason);
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
                        return hsm_conf_fail(st, "client_auth must be none, optional or require");
                return 1;
        }
        if (!conn && strcmp(name, "client_ca") == 0) {
                l->client_ca_line = st->line;
                return hsm_conf_set_string(st, &l->client_ca, name, value);
        }
        if (!conn && strcmp(name, "proxy_protocol") == 0) {
                if (strcmp(value, "v2") == 0)
                        l->proxy_protocol = true;
                else if (hsm_conf_parse_bool(value, &l->proxy_protocol) < 0 || l->proxy_protocol)
                        return hsm_conf_fail(st, "proxy_protocol must be v2 or no");
                return 1;
        }
        if (conn && strcmp(name, "server_name") == 0)
                return hsm_conf_set_string(st, &l->server_name, name, value);
        if (conn && strcmp(name, "ca_file") == 0) {
                l->ca_file_line = st->line;
                return hsm_conf_set_string(st, &l->ca_file, name, value);
        }
        if (strcmp(name, "cert") == 0) {
                hsm_conf_chain *c = realloc(l->chains, (l->n_chains + 1) * sizeof(*c));
                if (!c)
                        return hsm_conf_fail(st, "out of memory");
                l->chains = c;
                c[l->n_chains] = (hsm_conf_chain){ .cert = strdup(value), .cert_line = st->line };
                l->n_chains++;
                return 1;
        }
        if (strcmp(name, "key") == 0) {
                if (l->n_chains == 0 || l->chains[l->n_chains - 1].key)
                        return hsm_conf_fail(st, "'key' must follow the 'cert' it belongs to");
                if (hsm_conf_has_pin_value(st, value, "set the PIN source in the [token] section"))
                        return 0;
                l->chains[l->n_chains - 1].key = strdup(value);
                l->chains[l->n_chains - 1].key_line = st->line;
                return 1;
        }
        if (!conn && strcmp(name, "ocsp_response") == 0) {
                if (l->n_chains == 0 || !l->chains[l->n_chains - 1].key)
                        return hsm_conf_fail(st, "'ocsp_response' must follow the 'cert' and 'key' it belongs to");
                l->chains[l->n_chains - 1].ocsp_line = st->line;
                return hsm_conf_set_string(st, &l->chains[l->n_chains - 1].ocsp, name, value);
        }
        if (strcmp(name, "priority") == 0) {
                l->priority_line = st->line;
                return hsm_conf_set_string(st, &l->priority, name, value);
        }
        if (!conn && strcmp(name, "rsa_key_exchange") == 0) {
                if (hsm_conf_parse_bool(value, &l->rsa_key_exchange) < 0)
                        return hsm_conf_fail(st, "rsa_key_exchange must be yes or no");
                return 1;
        }
        if (strcmp(name, "max_connections") == 0) {
                if (hsm_conf_parse_uint(value, 1000000, &l->max_connections) < 0 || l->max_connections == 0)
                        return hsm_conf_fail(st, "max_connections must be a number from 1 to 1000000");
                return 1;
        }
        unsigned *ms = strcmp(name, "handshake_timeout") == 0 ? &l->handshake_timeout_ms
                       : strcmp(name, "idle_timeout") == 0    ? &l->idle_timeout_ms
                       : strcmp(name, "connect_timeout") == 0 ? &l->connect_timeout_ms
                                                              : NULL;
        if (ms) {
                if (hsm_conf_parse_duration_ms(value, ms) < 0 || *ms == 0)
                        return hsm_conf_fail(st, "%s must be a duration above zero such as 10, 10s, 500ms or 5m", name);
                return 1;
        }
        if (!conn && strcmp(name, "session_tickets") == 0) {
                if (hsm_conf_parse_bool(value, &l->session_tickets) < 0)
                        return hsm_conf_fail(st, "session_tickets must be yes or no");
                return 1;
        }
        if (!conn && strcmp(name, "session_cache") == 0) {
                if (hsm_conf_parse_uint(value, 10000000, &l->session_cache) < 0)
                        return hsm_conf_fail(st, "session_cache must be a number of sessions from 0 (no cache) to 10000000");
                return 1;
        }
        if (!conn && strcmp(name, "session_lifetime") == 0) {
                if (hsm_conf_parse_duration_ms(value, &l->session_lifetime_ms) < 0 || l->session_lifetime_ms < 1000)
                        return hsm_conf_fail(st, "session_lifetime must be a duration of at least 1s such as 2h, 30m or 600s");
                return 1;
        }
        if (!conn && strcmp(name, "ticket_key") == 0) {
                if (strncmp(value, "pkcs11:", 7) != 0)
                        return hsm_conf_fail(st, "ticket_key must be a pkcs11: URI of a secret key on a token");
                if (hsm_conf_has_pin_value(st, value, "set the PIN source in the [token] section"))
                        return 0;
                l->ticket_key_line = st->line;
                return hsm_conf_set_string(st, &l->ticket_key, name, value);
        }
        if (!conn && strcmp(name, "alpn") == 0) {
                if (hsm_conf_set_string(st, &l->alpn, name, value) <= 0)
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
                                return hsm_conf_fail(st, "alpn must be a comma-separated list of up to 16 protocol names such as h2, http/1.1");
                        char **v = realloc(l->alpn_protos, (l->n_alpn + 1) * sizeof(*v));
                        if (!v)
                                return hsm_conf_fail(st, "out of memory");
                        l->alpn_protos = v;
                        v[l->n_alpn++] = strndup(p, n);
                        p = *e ? e + 1 : e;
                        if (*e && !*p)
                                return hsm_conf_fail(st, "alpn must be a comma-separated list of up to 16 protocol names such as h2, http/1.1");
                }
                return 1;
        }
        if (conn)
                return hsm_conf_fail(st, "unknown setting '%s' in [%s] (known: listen, connect, server_name, ca_file, cert, key, priority, max_connections, handshake_timeout, idle_timeout, connect_timeout)",
                            name, st->section);
        return hsm_conf_fail(st, "unknown setting '%s' in [%s] (known: listen, backend, cert, key, priority, rsa_key_exchange, client_auth, client_ca, proxy_protocol, max_connections, handshake_timeout, idle_timeout, connect_timeout, session_tickets, session_cache, session_lifetime, ticket_key, alpn, ocsp_response)",
                    name, st->section);
}

int hsm_conf_global_setting(struct parse_state *st, hsm_conf *c, const char *name, const char *value)
{
        if (strcmp(name, "log_level") == 0) {
                int l = hsm_log_level_from_string(value);
                if (l < 0)
                        return hsm_conf_fail(st, "log_level must be one of error, warning, notice, info, debug");
                c->log_level = l;
                return 1;
        }
        if (strcmp(name, "handshake_threads") == 0) {
                if (hsm_conf_parse_uint(value, 4096, &c->handshake_threads) < 0)
                        return hsm_conf_fail(st, "handshake_threads must be a number from 0 (automatic) to 4096");
                return 1;
        }
        if (strcmp(name, "handshake_nice") == 0) {
                unsigned n;
                if (hsm_conf_parse_uint(value, 19, &n) < 0)
                        return hsm_conf_fail(st, "handshake_nice must be a number from 0 to 19");
                c->handshake_nice = (int)n;
                return 1;
        }
        if (strcmp(name, "handshake_cpus") == 0) {
                if (hsm_conf_parse_uint(value, 1024, &c->handshake_cpus) < 0)
                        return hsm_conf_fail(st, "handshake_cpus must be a number from 0 (one per core) to 1024");
                return 1;
        }
        if (strcmp(name, "io_threads") == 0) {
                if (hsm_conf_parse_uint(value, 256, &c->io_threads) < 0)
                        return hsm_conf_fail(st, "io_threads must be a number from 0 (one per core) to 256");
                return 1;
        }
        if (strcmp(name, "max_connections") == 0) {
                if (hsm_conf_parse_uint(value, 10000000, &c->max_connections) < 0 || c->max_connections == 0)
                        return hsm_conf_fail(st, "max_connections must be a number from 1 to 10000000");
                return 1;
        }
        if (strcmp(name, "max_waiting_handshakes") == 0) {
                if (hsm_conf_parse_uint(value, 10000000, &c->max_waiting_handshakes) < 0)
                        return hsm_conf_fail(st, "max_waiting_handshakes must be a number from 0 (half of max_connections) to 10000000");
                return 1;
        }
        if (strcmp(name, "drain_timeout") == 0) {
                if (hsm_conf_parse_duration_ms(value, &c->drain_timeout_ms) < 0)
                        return hsm_conf_fail(st, "drain_timeout must be a duration such as 30, 30s or 2m");
                return 1;
        }
        if (strcmp(name, "ticket_key") == 0) {
                if (strncmp(value, "pkcs11:", 7) != 0)
                        return hsm_conf_fail(st, "ticket_key must be a pkcs11: URI of a secret key on a token");
                if (hsm_conf_has_pin_value(st, value, "set the PIN source in the [token] section"))
                        return 0;
                c->ticket_key_line = st->line;
                return hsm_conf_set_string(st, &c->ticket_key, name, value);
        }
        if (strcmp(name, "state_dir") == 0) {
                if (value[0] != '/')
                        return hsm_conf_fail(st, "state_dir must be an absolute path");
                return hsm_conf_set_string(st, &c->state_dir, name, value);
        }
        if (strcmp(name, "user") == 0 || strcmp(name, "group") == 0) {
                /* Looked up (and refused if unknown) by hsmtlsd at start. */
                if (!value[0] || strchr(value, ':') || strchr(value, '/'))
                        return hsm_conf_fail(st, "%s must be a %s name or number", name, name);
                bool u = name[0] == 'u';
                *(u ? &c->user_line : &c->group_line) = st->line;
                return hsm_conf_set_string(st, u ? &c->user : &c->group, name, value);
        }
        return hsm_conf_fail(st, "unknown setting '%s' in [global] (known: log_level, handshake_threads, handshake_nice, handshake_cpus, io_threads, max_connections, max_waiting_handshakes, drain_timeout, ticket_key, state_dir, user, group)",
                    name);
}
