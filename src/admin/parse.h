/* The admin API's pure parsing and validation: request bodies (JSON) and
 * uploaded PEM chains, with no request, connection, token or database, so
 * that the fuzz targets (tests/fuzz/fuzz-admin-json.c, fuzz-admin-pem.c)
 * run the very code the server runs. Each function returns 0, or -EINVAL
 * with *e saying what to answer. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <gnutls/x509.h>
#include <jansson.h>

#include "keyadmin.h"

/* What a refused body is answered: status, error code, field (a JSON
 * pointer, "" for none) and reason. */
struct admin_perr {
        unsigned status;
        const char *code;
        char field[128];
        char reason[400];
};

void hex_encode(const uint8_t *p, size_t n, char *out);
int hex_decode(const char *s, uint8_t *out, size_t max, size_t *ret_len);
/* A JSON string of s (null for NULL) that is always valid UTF-8: bytes
 * that are not are written as the text \xNN (jansson refuses them). */
json_t *json_text(const char *s);

/* The body as a JSON object whose members are all in allowed
 * (NULL-terminated): 400 invalid_json, 400 unknown_field. */
int admin_parse_object(const char *body, size_t len, const char *const *allowed, json_t **ret, struct admin_perr *e);

/* POST /v1/keys: token, label (1-64 bytes), type, bits or curve, id (hex;
 * has_id false: the caller picks 8 random bytes). Strings point into o. */
struct admin_keygen {
        const char *token, *label, *type;
        hsm_keygen g; /* type, bits, curve (label and id set by the caller) */
        uint8_t id[32];
        size_t id_len;
        bool has_id;
};
int admin_parse_keygen(json_t *o, struct admin_keygen *ret, struct admin_perr *e);

/* POST /v1/keys/{token}/{id}/csr: subject, and the SAN lists (NULL-
 * terminated arrays pointing into o; free them with admin_csr_done). */
struct admin_csr {
        const char *subject;
        const char **dns, **ip, **email, **uri;
};
int admin_parse_csr(json_t *o, struct admin_csr *ret, struct admin_perr *e);
void admin_csr_done(struct admin_csr *c);

/* POST /v1/certificates: pem (into o) and where to keep it. */
int admin_parse_upload(json_t *o, const char **pem, bool *on_token, bool *in_state, struct admin_perr *e);

/* An uploaded chain: parses (400), in order (422: leaf first, each
 * certificate issued and signed by the next), and the leaf's SHA-256
 * fingerprint (hex) and SPKI SHA-256. The certificates are the caller's
 * (admin_chain_done). */
struct admin_chain {
        gnutls_x509_crt_t *crts;
        unsigned n;
};
int admin_parse_chain(const char *pem, size_t len, struct admin_chain *c, char fp[65], uint8_t spki[32],
                      struct admin_perr *e);
void admin_chain_done(struct admin_chain *c);
int admin_crt_spki(gnutls_x509_crt_t crt, uint8_t out[32]);
int admin_crt_fingerprint(gnutls_x509_crt_t crt, char hex[65]);
