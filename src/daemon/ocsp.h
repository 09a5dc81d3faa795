/* OCSP stapling from a file per certificate chain (ocsp_response = FILE):
 * the DER response is checked (successful, about this chain's leaf, not
 * past its nextUpdate) when loaded and before each staple, and the file is
 * looked at again at most once a second and re-read when it changed
 * (inode, size or mtime). A response that does not pass is not stapled. */
#pragma once

#include <gnutls/gnutls.h>

typedef struct hsm_ocsp_file hsm_ocsp_file;

/* where: "listener NAME" for log lines. leaf_der: the chain's leaf. At
 * start a file that cannot be read or is about another certificate is an
 * error (errmsg); one that is only out of date is loaded, with a warning,
 * and not stapled. */
int hsm_ocsp_file_new(const char *where, const char *path, const gnutls_datum_t *leaf_der, hsm_ocsp_file **ret,
                      char **errmsg);
void hsm_ocsp_file_free(hsm_ocsp_file *f);
/* Staples f for chain idx of cred (gnutls_certificate_set_ocsp_status_request_function2). */
int hsm_ocsp_file_attach(hsm_ocsp_file *f, gnutls_certificate_credentials_t cred, unsigned idx);
