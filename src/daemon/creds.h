/* Certificates bound to keys: the keystore opens the configured tokens and
 * resolves key names (pkcs11: URIs or PEM files); a listener's credentials
 * hold one or more chains, each checked against its key. */
#pragma once

#include <gnutls/gnutls.h>

#include "conf.h"
#include "token.h"

typedef struct hsm_keystore hsm_keystore;

int hsm_keystore_open(const hsm_conf *c, hsm_keystore **ret, char **errmsg);
void hsm_keystore_free(hsm_keystore *ks);
/* Token keys in use, for usage reports. */
unsigned hsm_keystore_n_keys(const hsm_keystore *ks);
hsm_key *hsm_keystore_key(const hsm_keystore *ks, unsigned i);
const char *hsm_keystore_token_name(const hsm_keystore *ks, unsigned i); /* config name of key i's token */
/* The configured tokens (admin API). */
unsigned hsm_keystore_n_tokens(const hsm_keystore *ks);
hsm_token *hsm_keystore_token(const hsm_keystore *ks, unsigned i);
/* Sum of the session pools of all tokens. */
unsigned hsm_keystore_total_sessions(const hsm_keystore *ks);
/* A listener's session ticket master key derived on the token that uri
 * names (hsm_token_derive_ticket_key, context: the listener name);
 * *token_name: that token's config name. */
int hsm_keystore_derive_ticket_key(hsm_keystore *ks, const char *uri, const char *context, uint8_t *out, size_t len,
                                   const char **token_name, char **errmsg);

typedef struct hsm_chain_info {
        char *description; /* "rsa2048-chain.pem with pkcs11:...": for logs */
        char *key_name;    /* token key label or file name */
        gnutls_datum_t leaf; /* DER, for telling which chain a handshake used */
        hsm_key *key;      /* NULL for a file key */
        struct hsm_ocsp_file *ocsp; /* ocsp_response, or NULL */
} hsm_chain_info;

typedef struct hsm_creds {
        gnutls_certificate_credentials_t cred;
        hsm_chain_info *chains;
        unsigned n_chains;
} hsm_creds;

/* Loads every chain of the listener. verbose: log one line per chain (check mode). */
int hsm_creds_load(hsm_keystore *ks, const hsm_conf *c, const hsm_conf_listener *l, bool verbose, hsm_creds **ret,
                   char **errmsg);
void hsm_creds_free(hsm_creds *cr);
/* Which chain the session presented (index), or -1. */
int hsm_creds_chain_of(const hsm_creds *cr, gnutls_session_t s);
