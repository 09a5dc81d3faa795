/* GET /v1/tokens, /v1/tokens/{token}. */
#include "internal.h"

#include <string.h>

#include "keyadmin.h"

hsm_token *admin_find_token(hsm_admin *a, const char *name)
{
        for (unsigned i = 0; i < hsm_keystore_n_tokens(a->ks); i++) {
                hsm_token *t = hsm_keystore_token(a->ks, i);
                if (t && strcmp(hsm_token_name(t), name) == 0)
                        return t;
        }
        return NULL;
}

static json_t *names_json(const char **names, unsigned n)
{
        json_t *a = json_array();
        for (unsigned i = 0; i < n; i++)
                json_array_append_new(a, json_string(names[i]));
        return a;
}

static json_t *token_json(hsm_admin *a, hsm_token *t)
{
        hsm_token_info ti;
        hsm_token_get_info(t, &ti);
        const char *names[32];
        unsigned nn = hsm_token_flag_names(ti.flags, names, 32);
        json_t *mechs = json_array();
        hsm_mech_desc *md = NULL;
        int n = hsm_token_mechanisms(t, &md);
        for (int i = 0; i < n; i++) {
                const char *mn[32];
                unsigned k = hsm_mech_flag_names(md[i].flags, mn, 32);
                json_array_append_new(mechs, json_pack("{s:s,s:I,s:I,s:o}", "name", md[i].name, "min_key_size",
                                                       (json_int_t)md[i].min_key_size, "max_key_size",
                                                       (json_int_t)md[i].max_key_size, "flags", names_json(mn, k)));
        }
        free(md);
        const char *uri = "";
        for (unsigned i = 0; i < a->conf->n_tokens; i++)
                if (strcmp(a->conf->tokens[i].name, hsm_token_name(t)) == 0)
                        uri = a->conf->tokens[i].uri;
        return json_pack("{s:s,s:s,s:I,s:s,s:s,s:s,s:s,s:o,s:o}", "name", hsm_token_name(t), "uri", uri, "slot_id",
                         (json_int_t)ti.slot_id, "label", ti.present ? ti.label : hsm_token_label(t), "manufacturer",
                         ti.manufacturer, "model", ti.model, "serial", ti.serial, "flags", names_json(names, nn),
                         "mechanisms", mechs);
}

int route_tokens(struct req *r)
{
        json_t *list = json_array();
        for (unsigned i = 0; i < hsm_keystore_n_tokens(r->a->ks); i++) {
                hsm_token *t = hsm_keystore_token(r->a->ks, i);
                if (t) /* NULL: a reload retired one meanwhile */
                        json_array_append_new(list, token_json(r->a, t));
        }
        return req_reply(r, 200, json_pack("{s:o}", "tokens", list));
}

int route_token(struct req *r)
{
        hsm_token *t = admin_find_token(r->a, r->seg[2]);
        if (!t)
                return req_error(r, 404, "not_found", "token", "no token named '%.100s'", r->seg[2]);
        return req_reply(r, 200, token_json(r->a, t));
}
