/* [token NAME]: the token's URI and module, where its PIN comes from (never
 * the PIN itself), its session pool and admission limits. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "confparse.h"

static int set_pin(struct parse_state *st, hsm_conf_token *t, const char *prefix, const char *name, const char *value)
{
        if (t->pin_source)
                return hsm_conf_fail(st, "[%s] has more than one PIN source (pin_file, pin_env, pin_credential, pin_source)", st->section);
        if (!*value)
                return hsm_conf_fail(st, "'%s' is empty", name);
        if (asprintf(&t->pin_source, "%s%s", prefix, value) < 0)
                t->pin_source = NULL;
        return 1;
}

int hsm_conf_token_setting(struct parse_state *st, hsm_conf_token *t, const char *name, const char *value)
{
        if (strcmp(name, "uri") == 0) {
                if (strncmp(value, "pkcs11:", 7) != 0)
                        return hsm_conf_fail(st, "uri must be a pkcs11: URI (RFC 7512)");
                if (hsm_conf_has_pin_value(st, value, "use pin_file, pin_env or pin_credential"))
                        return 0;
                return hsm_conf_set_string(st, &t->uri, name, value);
        }
        if (strcmp(name, "module") == 0)
                return hsm_conf_set_string(st, &t->module, name, value);
        if (strcmp(name, "pin_file") == 0)
                return set_pin(st, t, "file:", name, value);
        if (strcmp(name, "pin_env") == 0)
                return set_pin(st, t, "env:", name, value);
        if (strcmp(name, "pin_credential") == 0)
                return set_pin(st, t, "credential:", name, value);
        if (strcmp(name, "pin_source") == 0)
                return set_pin(st, t, "", name, value);
        if (strcmp(name, "pin") == 0 || strcmp(name, "pin_value") == 0)
                return hsm_conf_fail(st, "PINs are not written in the configuration; use pin_file, pin_env or pin_credential");
        if (strcmp(name, "max_sessions") == 0) {
                if (hsm_conf_parse_uint(value, 1024, &t->max_sessions) < 0)
                        return hsm_conf_fail(st, "max_sessions must be a number from 0 (from the token) to 1024");
                return 1;
        }
        if (strcmp(name, "concurrency_min") == 0) {
                if (hsm_conf_parse_uint(value, 1024, &t->concurrency_min) < 0)
                        return hsm_conf_fail(st, "concurrency_min must be a number from 0 (1) to 1024");
                return 1;
        }
        if (strcmp(name, "concurrency_max") == 0) {
                if (hsm_conf_parse_uint(value, 1024, &t->concurrency_max) < 0)
                        return hsm_conf_fail(st, "concurrency_max must be a number from 0 (max_sessions) to 1024");
                return 1;
        }
        if (strcmp(name, "queue_limit") == 0) {
                if (hsm_conf_parse_uint(value, 1000000, &t->queue_limit) < 0)
                        return hsm_conf_fail(st, "queue_limit must be a number from 0 (4 x max_sessions) to 1000000");
                return 1;
        }
        if (strcmp(name, "key_ops_per_second") == 0) {
                if (hsm_conf_parse_uint(value, 1000000, &t->key_ops_per_second) < 0)
                        return hsm_conf_fail(st, "key_ops_per_second must be a number from 0 (no limit) to 1000000");
                return 1;
        }
        return hsm_conf_fail(st, "unknown setting '%s' in [%s] (known: uri, module, pin_file, pin_env, pin_credential, pin_source, max_sessions, concurrency_min, concurrency_max, queue_limit, key_ops_per_second)",
                    name, st->section);
}
