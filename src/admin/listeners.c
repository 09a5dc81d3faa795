/* GET /v1/listeners, /v1/listeners/{listener}: listeners and connectors with
 * the bindings they serve now (their live credentials) and the ETag of the
 * bindings. Changes: bindings.c. */
#include "internal.h"

#include <stdio.h>
#include <string.h>

#include <gnutls/crypto.h>

/* A strong ETag: the first 16 bytes of the SHA-256 of the bindings' JSON
 * (in the order the chains are served, which is the order that selects them). */
void admin_etag_of(json_t *bindings, char out[40])
{
        char *s = json_dumps(bindings, JSON_COMPACT | JSON_SORT_KEYS);
        uint8_t d[32];
        char hex[65];
        if (!s || gnutls_hash_fast(GNUTLS_DIG_SHA256, s, strlen(s), d) < 0)
                memset(d, 0, sizeof(d));
        free(s);
        hex_encode(d, 16, hex);
        snprintf(out, 40, "\"%.32s\"", hex);
}

json_t *admin_listener_json(hsm_admin *a, const hsm_conf_listener *l, char etag[40])
{
        json_t *b = admin_listener_bindings(a, l);
        admin_etag_of(b, etag);
        const char *addr = l->listen.text;
        for (unsigned i = 0; i < hsm_server_n_listeners(a->srv); i++) {
                hsm_listener_info li;
                if (hsm_server_listener_info(a->srv, i, &li) == 0 && strcmp(li.name, l->name) == 0)
                        addr = li.address;
        }
        return json_pack("{s:s,s:s,s:s,s:s,s:o}", "name", l->name, "kind",
                         l->kind == HSM_CONNECTOR ? "connector" : "listener", "address", addr, "etag", etag, "bindings",
                         b);
}

int route_listeners(struct req *r)
{
        json_t *list = json_array();
        for (unsigned i = 0; i < r->a->conf->n_listeners; i++) {
                char etag[40];
                json_array_append_new(list, admin_listener_json(r->a, &r->a->conf->listeners[i], etag));
        }
        return req_reply(r, 200, json_pack("{s:o}", "listeners", list));
}

int route_listener(struct req *r)
{
        for (unsigned i = 0; i < r->a->conf->n_listeners; i++)
                if (strcmp(r->a->conf->listeners[i].name, r->seg[2]) == 0) {
                        req_reply(r, 200, admin_listener_json(r->a, &r->a->conf->listeners[i], r->etag));
                        return 0;
                }
        return req_error(r, 404, "not_found", "listener", "no listener or connector named '%.100s'", r->seg[2]);
}
