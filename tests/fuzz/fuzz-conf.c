/* libFuzzer target: the configuration parser (hsm_conf_load_buffer(), the
 * same code as hsm_conf_load()). Host names are never resolved here
 * (getaddrinfo() is made numeric-only), so that a run does no DNS. Checks:
 * a refused text always says why, with the file name and a line number
 * where there is one; an accepted one has at least one listener or
 * connector, every listener a certificate and key, and every string set. */
#include <dlfcn.h>
#include <errno.h>
#include <netdb.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "log.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res)
{
        static int (*real)(const char *, const char *, const struct addrinfo *, struct addrinfo **);
        if (!real)
                real = (int (*)(const char *, const char *, const struct addrinfo *, struct addrinfo **))dlsym(RTLD_NEXT,
                                                                                                                "getaddrinfo");
        struct addrinfo h = hints ? *hints : (struct addrinfo){ 0 };
        h.ai_flags |= AI_NUMERICHOST;
        h.ai_flags &= ~AI_ADDRCONFIG;
        return real(node, service, &h, res);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        hsm_conf *c = NULL;
        char *err = NULL;
        hsm_log_set_level(HSM_LOG_ERR - 1);
        int r = hsm_conf_load_buffer("fuzz.conf", (const char *)data, size, &c, &err);
        if (r < 0) {
                if (r != -ENOMEM && (!err || strncmp(err, "fuzz.conf", 9) != 0))
                        abort(); /* a refusal without a reason */
                free(err);
                return 0;
        }
        if (!c || c->n_listeners == 0)
                abort();
        for (unsigned i = 0; i < c->n_listeners; i++) {
                const hsm_conf_listener *l = &c->listeners[i];
                /* a connector may go without a client certificate */
                if (!l->name || !l->listen.text || !l->backend.text || (l->kind == HSM_LISTENER && l->n_chains == 0))
                        abort();
                for (unsigned j = 0; j < l->n_chains; j++)
                        if (!l->chains[j].cert || !l->chains[j].key)
                                abort();
        }
        for (unsigned i = 0; i < c->n_tokens; i++)
                if (!c->tokens[i].name || !c->tokens[i].uri)
                        abort();
        hsm_conf_free(c);
        return 0;
}
