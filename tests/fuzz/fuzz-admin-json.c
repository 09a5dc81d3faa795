/* libFuzzer target: the admin API's request bodies (src/admin/parse.c, the
 * code the server runs before anything is changed). The first byte picks
 * the route (POST /v1/keys, .../csr, /v1/certificates, or only the object
 * check); the rest is the body. Checks: a refusal is a 4xx (or a 500 for
 * memory) with an error code, a reason and a field that is a JSON pointer
 * or empty; an accepted key request is one the token could be asked for
 * (label 1-64 bytes, a known type with its bits or curve, an id of 1-32
 * bytes); an accepted CSR has a subject and string lists; an accepted
 * upload has a PEM and somewhere to keep it. json_text() of every reason
 * is valid UTF-8 (jansson accepts it). */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "parse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_err(const struct admin_perr *e)
{
        if (!e->code || !e->code[0] || !e->reason[0] || e->status < 400 || e->status > 500 ||
            (e->status == 500 && strcmp(e->code, "internal") != 0))
                abort();
        if (e->field[0] && e->field[0] != '/')
                abort();
        json_t *t = json_text(e->reason);
        if (!t || !json_is_string(t))
                abort(); /* the reason (bytes of the body in it) must become a JSON string */
        json_decref(t);
}

static void check_list(const char **l)
{
        for (size_t i = 0; l && l[i]; i++)
                if (i >= 100)
                        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        if (size < 1)
                return 0;
        static const char *const keygen[] = { "token", "label", "id", "type", "bits", "curve", NULL };
        static const char *const csr[] = { "subject", "dns", "ip", "email", "uri", NULL };
        static const char *const upload[] = { "pem", "store", NULL };
        static const char *const *const allowed[] = { keygen, csr, upload };
        unsigned route = data[0] % 4;
        const char *body = (const char *)data + 1;
        size -= 1;
        struct admin_perr e;
        json_t *o = NULL;
        if (admin_parse_object(body, size, allowed[route % 3], &o, &e) < 0) {
                if (o)
                        abort();
                check_err(&e);
                return 0;
        }
        if (!json_is_object(o))
                abort();
        if (route == 0) {
                struct admin_keygen k;
                if (admin_parse_keygen(o, &k, &e) < 0)
                        check_err(&e);
                else {
                        size_t ll = strlen(k.label);
                        if (!k.token || ll < 1 || ll > 64 || k.id_len < 1 || k.id_len > 32)
                                abort();
                        if (k.g.type == HSM_KEY_RSA && k.g.bits != 2048 && k.g.bits != 3072 && k.g.bits != 4096)
                                abort();
                        if (k.g.type == HSM_KEY_ECDSA && k.g.curve != HSM_CURVE_P256 && k.g.curve != HSM_CURVE_P384)
                                abort();
                        if (k.g.type == HSM_KEY_ED25519 && k.g.curve != HSM_CURVE_ED25519)
                                abort();
                        if (strcmp(k.type, "rsa") != 0 && strcmp(k.type, "ecdsa") != 0 && strcmp(k.type, "ed25519") != 0)
                                abort();
                }
        } else if (route == 1) {
                struct admin_csr c;
                if (admin_parse_csr(o, &c, &e) < 0)
                        check_err(&e);
                else {
                        if (!c.subject)
                                abort();
                        check_list(c.dns);
                        check_list(c.ip);
                        check_list(c.email);
                        check_list(c.uri);
                        admin_csr_done(&c);
                }
        } else if (route == 2) {
                const char *pem;
                bool on_token, in_state;
                if (admin_parse_upload(o, &pem, &on_token, &in_state, &e) < 0)
                        check_err(&e);
                else if (!pem || (!on_token && !in_state))
                        abort();
        }
        json_decref(o);
        return 0;
}
