/* hsmtlsd server mode: listeners, the handshake pool and the I/O loops. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include <gnutls/gnutls.h>

#include "conf.h"
#include "creds.h"

typedef struct hsm_server hsm_server;

/* Loads every listener's credentials and binds its socket. */
int hsm_server_new(hsm_conf *conf, hsm_keystore *ks, hsm_server **ret, char **errmsg);
/* Runs until SIGTERM or SIGINT, then drains: no new connections, in-flight
 * handshakes finish, established connections get drain_timeout to end. */
int hsm_server_run(hsm_server *s);
void hsm_server_free(hsm_server *s);
/* The listener's GnuTLS priority (with +RSA when rsa_key_exchange is on). */
int hsm_listener_priority(const hsm_conf *c, const hsm_conf_listener *l, gnutls_priority_t *ret, char **errmsg);
/* One log line per key, operation, mechanism and result. */
void hsm_server_log_usage(hsm_server *s);

/* Read-only views for the admin API (any thread). */
typedef struct hsm_listener_info {
        const char *name, *kind, *address; /* owned by the server */
        bool serving;                      /* accepting (not draining) */
        unsigned connections;              /* from accept to close */
} hsm_listener_info;
unsigned hsm_server_n_listeners(const hsm_server *s);
int hsm_server_listener_info(const hsm_server *s, unsigned i, hsm_listener_info *ret);
void hsm_server_handshakes(const hsm_server *s, uint64_t *ok, uint64_t *failed);
