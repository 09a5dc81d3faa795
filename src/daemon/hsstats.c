/* Handshake counters per listener or connector (usage and /metrics): where
 * a handshake ends, handshake.c calls hsm_hs_count() once. Lock-free, no
 * I/O: relaxed atomic adds in the listener's own table. */
#include "internal.h"

void hsm_hs_count(struct conn *c, int how)
{
        bool ok = how == HSM_HS_OK;
        enum hsm_tls_version v = HSM_TLSV_UNKNOWN;
        bool resumed = false;
        hsm_key *key = NULL;
        if (how != HSM_HS_NOTLS && c->tls) {
                /* A version is agreed once our ServerHello went out
                 * (before it, GnuTLS reports its own highest). */
                int last_out = gnutls_handshake_get_last_out(c->tls);
                if (ok || (last_out > GNUTLS_HANDSHAKE_HELLO_REQUEST && last_out != GNUTLS_HANDSHAKE_CLIENT_HELLO))
                        v = hsm_tls_version_of(gnutls_protocol_get_version(c->tls));
                resumed = ok && gnutls_session_is_resumed(c->tls);
                /* The key of the chain a full handshake used (a token key;
                 * NULL for a file key), in the credentials this handshake
                 * holds (the listener's may have been swapped since). */
                int ch = c->chain; /* set by handshake.c before the call */
                if (!resumed && c->creds && ch >= 0 && (unsigned)ch < c->creds->n_chains)
                        key = c->creds->chains[ch].key;
        }
        hsm_hs_record(__atomic_load_n(&c->l->hs, __ATOMIC_ACQUIRE), v, ok, resumed, key);
}

const struct hsm_hs_counters *hsm_server_listener_handshakes(const hsm_server *s, unsigned i)
{
        /* The counters of the slot's name (internal.h): two slots of one
         * name (a listener replaced while the old one drains) share them. */
        return i < __atomic_load_n(&s->n_listeners, __ATOMIC_ACQUIRE) ? __atomic_load_n(&s->listeners[i].hs, __ATOMIC_ACQUIRE)
                                                                      : NULL;
}
