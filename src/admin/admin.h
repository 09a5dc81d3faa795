/* The admin API of hsmtlsd (api/openapi.yaml is its contract): an HTTP
 * server (libmicrohttpd) on threads of its own, on a unix socket (0600) or
 * loopback, with bearer tokens or client certificates and roles, that reads
 * the daemon's state and changes keys on the tokens through libhsmtls. */
#pragma once

#include "conf.h"
#include "creds.h"
#include "server.h"
#include "store.h"

typedef struct hsm_admin hsm_admin;

/* Binds [admin] listen and starts serving. store: the state database (the
 * audit log, lifetime usage). The other objects must outlive the server. */
int hsm_admin_start(const hsm_conf *conf, hsm_keystore *ks, hsm_server *srv, hsm_store *store, hsm_admin **ret,
                    char **errmsg);
/* For hsmtlsd --check: the HTTPS chain matches its key (on the token or in
 * a file), the admin CA file holds a CA. Binds nothing, creates nothing. */
int hsm_admin_check(const hsm_conf *conf, hsm_keystore *ks, char **errmsg);
/* Stops serving (requests in progress finish) and frees. NULL is accepted. */
void hsm_admin_stop(hsm_admin *a);
/* The address it listens on ("unix:/path" or "127.0.0.1:PORT"). */
const char *hsm_admin_address(const hsm_admin *a);
