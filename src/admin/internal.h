/* Private to src/admin: the request, replies, JSON helpers, and the route
 * handlers (one file per resource). */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include <gnutls/abstract.h>
#include <jansson.h>
#include <microhttpd.h>

#include "admin.h"
#include "parse.h"

struct hsm_admin {
        const hsm_conf *conf;
        hsm_keystore *ks;
        hsm_server *srv;
        hsm_store *store;
        struct MHD_Daemon *mhd;
        int fd;
        char *unix_path;
        char address[128];
        uint64_t started_ns;  /* monotonic */
        int64_t started_unix; /* wall clock, seconds */
        char *tls_cert_pem, *tls_key_pem, *client_ca_pem;
        /* HTTPS with the key on a token (tls_key = pkcs11:...) */
        hsm_key *tls_token_key;
        gnutls_privkey_t tls_privkey;
        gnutls_pcert_st *tls_pcerts;
        unsigned n_tls_pcerts;
        struct audit_limit *alimit; /* audit.c */
};

struct req {
        hsm_admin *a;
        struct MHD_Connection *conn;
        const char *method, *url;
        char peer[96];
        /* body */
        char *body;
        size_t body_len;
        bool too_large, first_done;
        /* who */
        char who[512];
        enum hsm_admin_role role;
        const char *auth; /* "bearer", "certificate" */
        /* path segments after the leading '/' */
        char *path_copy;
        const char *seg[8];
        unsigned n_seg;
        /* the reply */
        unsigned status;
        json_t *json;
        char *text; /* text/plain reply (metrics) */
        char location[256];
        char etag[80];
        const char *action; /* for the audit log */
        bool audit_down;    /* the audit log cannot be written: not tried again for this request */
        int64_t begin_seq;  /* the change.begin record of a change (0: none) */
        char detail[2048];
};

/* Sets an error reply: {"error": {"code", "field", "reason"}}. field may be
 * NULL. Returns 0 so handlers can `return req_error(...)`. */
int req_error(struct req *r, unsigned status, const char *code, const char *field, const char *fmt, ...)
        __attribute__((format(printf, 5, 6)));
/* req_error() from what a parse function says (parse.h). */
int req_perr(struct req *r, const struct admin_perr *e);
/* Sets a JSON reply (steals json). */
int req_reply(struct req *r, unsigned status, json_t *json);
/* The body as a JSON object: 415 unless Content-Type is application/json,
 * 400 invalid_json unless it parses to an object, 400 unknown_field for a
 * member not in allowed (NULL-terminated). NULL when an error was set. */
json_t *req_body_object(struct req *r, const char *const *allowed);
/* A member of o: NULL if absent. Sets a 400 invalid_field error and *bad
 * when present with the wrong type. */
const char *req_string(struct req *r, json_t *o, const char *name, bool *bad);
/* Takes the server's change lock for this request (hsm_server_changes_lock_wait,
 * at most [admin] timeout): 0, or a 503 busy error set (saying what holds
 * it; nothing may be changed) and a negative errno code. */
int admin_changes_lock(struct req *r);
/* A query parameter (NULL if absent). */
const char *req_query(struct req *r, const char *name);
/* RFC 3339 UTC time of a Unix time. */
void fmt_time(int64_t t, char *buf, size_t size);

/* auth.c: who is asking (r->who, r->role, r->auth); 0, or an error set. */
int admin_authenticate(struct req *r);
/* The constant-time comparison of two SHA-256 digests (0 when equal). */
int admin_digest_differs(const uint8_t a[32], const uint8_t b[32]);

/* Route handlers: each sets the reply (and r->action/r->detail for changes). */
int route_live(struct req *r);
int route_whoami(struct req *r);
int route_health(struct req *r);
int route_tokens(struct req *r);
int route_token(struct req *r);
int route_keys(struct req *r);
int route_key(struct req *r);
int route_key_generate(struct req *r);
int route_key_delete(struct req *r);
int route_key_csr(struct req *r);
int route_certificates(struct req *r);
int route_certificate(struct req *r);
int route_certificate_upload(struct req *r);
int route_certificate_delete(struct req *r);
int route_listeners(struct req *r);
int route_listener(struct req *r);
int route_binding_add(struct req *r);
int route_binding_replace(struct req *r);
int route_binding_delete(struct req *r);
int route_changes(struct req *r);
int route_usage(struct req *r);
int route_metrics(struct req *r);
int route_audit(struct req *r);
int route_audit_verify(struct req *r);

/* certificates.c: the leaf expiry of every chain (configured: source
 * "config"; uploaded: "api"), once per fingerprint. No token access. */
void admin_for_each_expiry(hsm_admin *a, void (*cb)(const char *fp, const char *source, int64_t not_after, void *ud),
                           void *ud);

/* bindings.c: the bindings listener l serves now ([{certificate, names,
 * source}], from its live credentials). */
json_t *admin_listener_bindings(hsm_admin *a, const hsm_conf_listener *l);
/* bindings.c: [{listener, names}] of the live bindings of certificate fp. */
json_t *admin_bound_listeners(hsm_admin *a, const char *fp);
/* bindings.c: [{listener, spki}] of every chain served now (live
 * credentials): the SPKI SHA-256 (hex) of its leaf, which is its key's. */
json_t *admin_served_keys(hsm_admin *a);
/* listeners.c: the ETag of a bindings array ("\"32 hex\""), and the
 * Listener object (its ETag in etag). */
void admin_etag_of(json_t *bindings, char out[40]);
json_t *admin_listener_json(hsm_admin *a, const hsm_conf_listener *l, char etag[40]);

/* audit.c: the rate limit of refused requests' audit records. admit:
 * whether the refused request from peer is written (true) or counted into
 * its address's summary record; flush: writes the summaries that are due
 * (all: every one, at shutdown). */
int admin_audit_limit_new(hsm_admin *a);
void admin_audit_limit_free(hsm_admin *a);
bool admin_audit_admit(hsm_admin *a, const char *peer, int status);
void admin_audit_flush_summaries(hsm_admin *a, bool all);

/* usage.c: the listeners' handshake counters ([{name, kind, ...}], the
 * Usage schema's listeners). */
json_t *admin_usage_listeners(hsm_admin *a);
/* usage.c: the configuration name of the token of the configured key with
 * this URI (and its label in *label), or NULL. */
const char *admin_key_token(hsm_admin *a, const char *uri, const char **label);

/* tokens.c: the configured token named name, or NULL. */
hsm_token *admin_find_token(hsm_admin *a, const char *name);
