/* Private to the handshake's parts: the steps (handshake.c), the pool that
 * runs them (hspool.c: the queue, the CPU gate, the threads, the watchdog)
 * and the parked handshakes (hspark.c). What the rest of the daemon calls
 * is in internal.h. */
#pragma once

#include "internal.h"

/* Runs c from where it is until it is done, fails, or would wait on its
 * peer (then it is parked and the thread is free). */
void hsm_handshake_advance(struct hs_slot *slot, struct conn *c);
/* After a fatal alert or close_notify: shuts our side, and an I/O loop
 * reads what the client still sends until it closes (bounded). */
void hsm_handshake_refuse(hsm_server *s, struct conn *c);
/* A failed handshake: one line. r < 0: a GnuTLS error (the peer gets the
 * matching alert), r > 0: a timeout or a socket error (closed, no alert). */
void hsm_handshake_failed(hsm_server *s, struct conn *c, int r, const char *why);
/* The connect to the backend or to the TLS server failed (err: -errno). */
void hsm_handshake_connect_failed(hsm_server *s, struct conn *c, int err);
