/* hsmtlsd server mode: listeners, the handshake pool and the I/O loops. */
#pragma once

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
