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
/* After a reload (src/daemon/reload.c): the configuration the routes read
 * from now on (listeners, their file chains). The old one stays valid
 * (the server keeps every configuration it loaded). Any thread. */
void hsm_admin_set_conf(hsm_admin *a, const hsm_conf *conf);
/* Stops serving (requests in progress finish) and frees. NULL is accepted. */
void hsm_admin_stop(hsm_admin *a);
/* The address it listens on ("unix:/path" or "127.0.0.1:PORT"). */
const char *hsm_admin_address(const hsm_admin *a);

/* Bindings (bindings.c): the desired chains of every listener of conf: its
 * configuration file chains with the bindings kept in state.db applied
 * over them (README, Admin API: rows in order; an API binding for the
 * same names and key type replaces a file chain; a tombstone leaves one
 * out). store NULL: the file alone. set[i] is conf->listeners[i]'s, for
 * hsm_server_stage / hsm_server_commit. */
typedef struct hsm_bindings_plan hsm_bindings_plan;
int hsm_bindings_plan_new(const hsm_conf *conf, hsm_store *store, hsm_bindings_plan **ret, char **errmsg);
const hsm_listener_chains *hsm_bindings_plan_set(const hsm_bindings_plan *p, unsigned *ret_n);
/* Whether state.db has rows for conf->listeners[i]. */
bool hsm_bindings_plan_bound(const hsm_bindings_plan *p, unsigned i);
void hsm_bindings_plan_free(hsm_bindings_plan *p);
/* At start, before serving: commits the plan of every listener that has
 * rows in state.db, one listener at a time (one that cannot be built keeps
 * the configuration file's chains, with an error logged). */
int hsm_admin_apply_bindings(const hsm_conf *conf, hsm_server *srv, hsm_store *store);
