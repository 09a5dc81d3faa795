/* OCSP stapling per certificate chain.
 *
 * From a file (ocsp_response = FILE): the DER response is checked
 * (successful, about this chain's leaf, not past its nextUpdate) when
 * loaded and before each staple. The file is looked at once a second on a
 * thread of its own and re-read when it changed (inode, size or mtime),
 * never on a handshake thread; one that is not a regular file (never
 * opened) or is over 64 KiB is not read (logged once) and the last good
 * response stays. A response that does not pass is not stapled.
 *
 * Automatic (ocsp_response = auto): the responder named in the leaf's
 * Authority Information Access (http:// only) is asked with a request
 * GnuTLS builds (leaf and issuer, the certificate after the leaf in the
 * 'cert' file), POSTed by libcurl on a thread of its own; the answer must
 * pass the same checks and be signed by the issuer (or a responder it
 * delegated to). Refreshed at half the response's validity (from
 * thisUpdate to nextUpdate, at most a day); a failed or refused fetch is
 * retried after 1 s, 2 s, 4 s, ... up to 10 minutes, while the previous
 * response is stapled until its nextUpdate and never after. Each fetch is
 * logged. Each request carries a new random nonce; a response with a
 * nonce must echo it (one without is accepted: pre-signed responses); one
 * older (thisUpdate) than the one taken last is refused, and a REVOKED is
 * replaced only by a newer answer. The
 * state is kept per leaf certificate: chains (and credentials rebuilt at
 * run time) with the same leaf share it. */
#pragma once

#include <gnutls/gnutls.h>

typedef struct hsm_ocsp_file hsm_ocsp_file;

#define HSM_OCSP_AUTO "auto" /* ocsp_response = auto */

/* where: "listener NAME" for log lines. path: the DER file, or
 * HSM_OCSP_AUTO. cert_path: the chain's PEM file (automatic mode reads the
 * issuer from it). leaf_der: the chain's leaf. At start a file that cannot
 * be read or is about another certificate is an error (errmsg); one that is
 * only out of date is loaded, with a warning, and not stapled. Automatic
 * mode: a leaf with no http:// OCSP responder, or a chain without its
 * issuer, is an error; the first fetch starts at once, in the background. */
int hsm_ocsp_file_new(const char *where, const char *path, const char *cert_path, const gnutls_datum_t *leaf_der,
                      hsm_ocsp_file **ret, char **errmsg);
void hsm_ocsp_file_free(hsm_ocsp_file *f);
/* Staples f for chain idx of cred (gnutls_certificate_set_ocsp_status_request_function2). */
int hsm_ocsp_file_attach(hsm_ocsp_file *f, gnutls_certificate_credentials_t cred, unsigned idx);
/* Stops the automatic mode's fetch thread and the file thread and waits
 * for them: a fetch in progress is given up within about a second (its
 * curl timeout at worst); a file read stuck in the kernel is waited for 5 s
 * at most.
 * For the end of main(), when nothing makes credentials any more; the
 * states still held are freed by their owners as before. */
void hsm_ocsp_shutdown(void);
