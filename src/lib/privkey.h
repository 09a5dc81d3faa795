/* Key bridge: a token key as a gnutls_privkey_t (gnutls_privkey_import_ext4).
 * Signatures and RSA decryption run on the token through our session pool;
 * GnuTLS is told only the signature algorithms the token supports. */
#pragma once

#include <gnutls/abstract.h>

#include "token.h"

/* The privkey holds a reference on the key; gnutls_privkey_deinit() drops it. */
int hsm_privkey_import(hsm_key *key, gnutls_privkey_t *ret);
/* The public key of a token key, built from the token's attributes. */
int hsm_pubkey_import(hsm_key *key, gnutls_pubkey_t *ret);
/* 0 if the certificate's public key is the key's; -EKEYREJECTED if not. */
int hsm_key_matches_certificate(hsm_key *key, gnutls_x509_crt_t crt);
