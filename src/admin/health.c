/* GET /v1/live, /v1/whoami, /v1/health. */
#include "internal.h"

#include "keyadmin.h"
#include "usage.h"

#include "hsmtls-build.h"

int route_live(struct req *r)
{
        return req_reply(r, 200, json_pack("{s:s}", "status", "ok"));
}

int route_whoami(struct req *r)
{
        return req_reply(r, 200,
                         json_pack("{s:s,s:s,s:s}", "identity", r->who, "role",
                                   r->role == HSM_ROLE_ADMIN ? "admin" : "read", "auth", r->auth ? r->auth : "bearer"));
}

int route_health(struct req *r)
{
        hsm_admin *a = r->a;
        bool ready = true;
        json_t *tokens = json_array(), *listeners = json_array();
        for (unsigned i = 0; i < hsm_keystore_n_tokens(a->ks); i++) {
                hsm_token *t = hsm_keystore_token(a->ks, i);
                if (!t) /* a reload retired one meanwhile */
                        continue;
                hsm_token_info ti;
                hsm_token_get_info(t, &ti);
                const char *reason = !ti.present ? "the token does not answer (removed?)"
                                     : !ti.logged_in ? "not logged in"
                                                     : NULL;
                if (reason)
                        ready = false;
                json_t *o = json_pack("{s:s,s:s,s:b,s:b,s:I,s:I,s:I}", "name", hsm_token_name(t), "label",
                                      hsm_token_label(t), "present", ti.present, "logged_in", ti.logged_in,
                                      "sessions_in_use", (json_int_t)(ti.sessions_open - ti.sessions_idle),
                                      "sessions_open", (json_int_t)ti.sessions_open, "sessions_max",
                                      (json_int_t)ti.sessions_max);
                json_object_set_new(o, "reason", reason ? json_string(reason) : json_null());
                json_array_append_new(tokens, o);
        }
        for (unsigned i = 0; i < hsm_server_n_listeners(a->srv); i++) {
                hsm_listener_info li;
                if (hsm_server_listener_info(a->srv, i, &li) < 0)
                        continue;
                if (!li.serving)
                        ready = false;
                json_t *o = json_pack("{s:s,s:s,s:s,s:b,s:I}", "name", li.name, "kind", li.kind, "address",
                                      li.address, "serving", li.serving, "connections", (json_int_t)li.connections);
                json_object_set_new(o, "reason", li.serving ? json_null() : json_string("draining: not accepting"));
                json_array_append_new(listeners, o);
        }
        json_t *body = json_pack("{s:b,s:s,s:I,s:o,s:o}", "ready", ready, "version", HSMTLS_VERSION, "uptime_seconds",
                                 (json_int_t)((hsm_now_ns() - a->started_ns) / 1000000000u), "tokens", tokens,
                                 "listeners", listeners);
        return req_reply(r, ready ? 200 : 503, body);
}
