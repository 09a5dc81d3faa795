/* A listener's TLS 1.2 session-ID cache: bounded (least recently used
 * entries go first), entries expire after the listener's session_lifetime,
 * shared by the handshake threads (one mutex). One per listener: a session
 * made on one listener is never found by another. */
#pragma once

#include <stdint.h>
#include <gnutls/gnutls.h>

typedef struct hsm_sesscache hsm_sesscache;

/* max_entries > 0; lifetime_s: entries older than that are not returned. */
int hsm_sesscache_new(unsigned max_entries, unsigned lifetime_s, hsm_sesscache **ret);
void hsm_sesscache_free(hsm_sesscache *sc);
/* Makes session store, find and remove its sessions in sc. */
void hsm_sesscache_attach(hsm_sesscache *sc, gnutls_session_t session);
/* Entries now (tests, stats). */
unsigned hsm_sesscache_count(hsm_sesscache *sc);
