/* systemd's readiness protocol (sd_notify): READY=1 once the listeners are
 * bound, the threads run and every key answered a test signature;
 * STOPPING=1 when the drain begins; STATUS= lines on the way. Without
 * $NOTIFY_SOCKET every call does nothing (and no test signature is made). */
#pragma once

#include <stdbool.h>

#include "creds.h"

/* $NOTIFY_SOCKET is set: a service manager waits for READY=1. */
bool hsm_notify_enabled(void);
/* One test signature with every configured token key (hsm_key_self_test),
 * before READY=1. Keys that cannot be tried so (context-specific login) are
 * logged and passed over. -errno and *errmsg for the first key whose token
 * did not answer. */
int hsm_notify_self_test(hsm_keystore *ks, char **errmsg);
void hsm_notify_ready(unsigned n_listeners, unsigned n_connectors);
void hsm_notify_stopping(unsigned open_connections);
/* STATUS=draining N connections, at most once a second. */
void hsm_notify_draining(unsigned open_connections);
void hsm_notify_stopped(void);
/* A reload (SIGHUP): RELOADING=1 (with MONOTONIC_USEC=) before it builds,
 * READY=1 with STATUS= after it committed or was refused. */
void hsm_notify_reloading(void);
void hsm_notify_reloaded(bool committed, unsigned n_serving);
