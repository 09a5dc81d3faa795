/* Key bridge: a token key as a gnutls_privkey_t (gnutls_privkey_import_ext4).
 * Signatures and RSA decryption run on the token through our session pool;
 * GnuTLS is told only the signature algorithms the token supports. */
#pragma once

#include <gnutls/abstract.h>

#include "token.h"

/* hsm_privkey_import(), hsm_pubkey_import() and
 * hsm_key_matches_certificate() are declared and documented in hsmtls.h. */

/* A GnuTLS public key from the public parts a token gave (hsm_key_get_public()):
 * 0, -ENOMEM, or -EINVAL for parts that make no key of that type. */
int hsm_pubkey_from_public(enum hsm_key_type type, const hsm_key_public *p, gnutls_pubkey_t *ret);
