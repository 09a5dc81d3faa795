/* The ClientHello peek, as a pure parser: bytes in, what the first record
 * says out; no I/O, no allocation, no state (fuzzed: tests/fuzz/fuzz-clienthello.c).
 *
 * Two record formats start a handshake:
 *   - a TLS record (type 22 handshake, version 3.x, length 1 to
 *     HSM_HELLO_RECORD_MAX) holding a ClientHello (type 1);
 *   - an SSLv2-format ClientHello (RFC 5246 E.2, RFC 6101 E.1): a 2-byte
 *     header with the top bit set, msg_type 1, the highest version the
 *     client offers (3.0 to 3.3), cipher specs of 3 bytes each, and no
 *     extensions (so no SNI, no ALPN, no TLS 1.3). Some old clients still
 *     send it; GnuTLS (built with its SSLv2 hello support, as Debian's is)
 *     reads it and answers with a TLS ServerHello, so the daemon hands it
 *     on like any other.
 * The peek reads exactly the first record (hsm_clienthello_record_size)
 * and then parses it (hsm_clienthello_parse). A ClientHello larger than
 * its first record (one split over several records) is parsed as far as
 * the record goes: fields past it are reported missing, not as an error. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define HSM_HELLO_RECORD_MAX (16384 + 2048) /* the largest first record taken */

typedef struct hsm_clienthello {
        bool sslv2;              /* an SSLv2-format ClientHello */
        bool truncated;          /* the message goes on past the first record */
        uint16_t record_version; /* TLS record header version (0x0200 for SSLv2) */
        uint16_t client_version; /* legacy_version: 0x0303 is TLS 1.2 */
        uint16_t max_version;    /* highest in supported_versions (GREASE skipped), else client_version */
        bool has_sni;
        char sni[256];           /* host_name, NUL-terminated (when has_sni) */
        const uint8_t *alpn;     /* ALPN ProtocolNameList body, in the input buffer; NULL: none */
        size_t alpn_len;
        unsigned n_alpn;         /* protocol names in it */
        unsigned n_suites;       /* cipher suites (SSLv2: cipher specs) offered */
} hsm_clienthello;

/* From the first bytes of a connection (len may be 0): 0 and *need, the
 * size of the whole first record (or of its header, while that is not all
 * in): read until len == *need. -EPROTO when these bytes start no TLS
 * handshake record and no SSLv2-format ClientHello, -EMSGSIZE when the
 * record is empty or larger than HSM_HELLO_RECORD_MAX; *why says so. */
int hsm_clienthello_record_size(const uint8_t *buf, size_t len, size_t *need, const char **why);

/* Parses the whole first record (len == the *need above). 0 and *ret;
 * -EBADMSG when it is malformed (*why says where: GnuTLS will answer such a
 * hello with an alert). -EPROTO / -EMSGSIZE as above. */
int hsm_clienthello_parse(const uint8_t *buf, size_t len, hsm_clienthello *ret, const char **why);

/* "TLS 1.2" and so on (0x0300 is "SSL 3.0"); buf holds at least 16 bytes. */
const char *hsm_clienthello_version_name(uint16_t v, char *buf, size_t size);
