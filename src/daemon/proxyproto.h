/* PROXY protocol v2 (HAProxy's specification): the client's address and its
 * verified TLS identity, sent to the backend before any data. */
#pragma once

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

/* Custom TLV types (0xE0-0xEF is the range the specification leaves to
 * applications), sent only when the client presented a certificate. */
#define HSM_PP2_TYPE_CLIENT_SUBJECT 0xE0     /* RFC 4514 subject DN, UTF-8 */
#define HSM_PP2_TYPE_CLIENT_SHA256 0xE1      /* SHA-256 of the certificate's DER, 32 bytes */

/* Builds the header for a finished server-side handshake. src: the client,
 * dst: the address it connected to. Returns 0 and a malloc'd buffer. */
int hsm_proxy_v2_build(gnutls_session_t s, const struct sockaddr *src, const struct sockaddr *dst, uint8_t **ret,
                       size_t *ret_len);

/* The same from what the header says of the TLS session (no session
 * needed: for tests and fuzzing). Strings may be NULL (left out); peer is
 * the client certificate, or NULL. */
typedef struct hsm_pp2_tls {
        const char *version; /* GnuTLS's name, "TLS1.3" */
        const char *cipher;
        const char *sni;
        gnutls_x509_crt_t peer;
        bool resumed;
        const unsigned char *alpn; /* the negotiated ALPN protocol, or NULL */
        size_t alpn_len;
} hsm_pp2_tls;
int hsm_proxy_v2_build_tls(const hsm_pp2_tls *t, const struct sockaddr *src, const struct sockaddr *dst, uint8_t **ret,
                           size_t *ret_len);

/* The peer certificate's identity (for logs): subject DN and SHA-256 hex. */
int hsm_peer_identity(gnutls_session_t s, char *subject, size_t subject_size, char *sha256_hex, size_t hex_size);
