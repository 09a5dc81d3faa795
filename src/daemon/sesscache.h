/* A listener's TLS 1.2 session-ID cache: bounded (least recently used
 * entries go first), entries expire after the listener's session_lifetime,
 * shared by the handshake threads (one mutex). One per listener: a session
 * made on one listener is never found by another. */
#pragma once

#include <stdint.h>
#include <gnutls/gnutls.h>

typedef struct hsm_sesscache hsm_sesscache;

/* name: the listener's, for hsm_sesscache_foreach. max_entries > 0;
 * lifetime_s: entries older than that are not returned. */
int hsm_sesscache_new(const char *name, unsigned max_entries, unsigned lifetime_s, hsm_sesscache **ret);
void hsm_sesscache_free(hsm_sesscache *sc);
/* Makes session store, find and remove its sessions in sc. */
void hsm_sesscache_attach(hsm_sesscache *sc, gnutls_session_t session);
/* Entries now (tests, stats). */
unsigned hsm_sesscache_count(hsm_sesscache *sc);

/* Counters since the cache was made. Lookups are GnuTLS asking for a
 * session ID a client offered (TLS 1.2, no valid ticket): a hit resumes,
 * a miss (unknown or expired) is a full handshake. */
typedef struct hsm_sesscache_stats {
        uint64_t hits, misses;
        uint64_t stores;  /* sessions stored */
        uint64_t evicted; /* pushed out by newer ones (the cache was full) */
        uint64_t expired; /* older than session_lifetime, dropped */
        unsigned entries, max_entries;
} hsm_sesscache_stats;

void hsm_sesscache_stats_get(hsm_sesscache *sc, hsm_sesscache_stats *ret);
/* Calls fn for every cache there is (in the order they were made), under
 * a lock that hsm_sesscache_new / _free take: fn must not call them. For
 * the admin API's /metrics (hsmtls_session_cache_*). */
void hsm_sesscache_foreach(void (*fn)(const char *name, const hsm_sesscache_stats *st, void *ud), void *ud);
