/* OCSP stapling from files (see ocsp.h). */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <gnutls/ocsp.h>
#include <gnutls/x509.h>

#include "log.h"
#include "ocsp.h"

struct hsm_ocsp_file {
        pthread_mutex_t lock;
        char *where, *path;
        gnutls_x509_crt_t leaf;
        /* what was read last: the file's identity and its verdict */
        dev_t dev;
        ino_t ino;
        off_t size;
        struct timespec mtime;
        time_t checked; /* last stat() */
        gnutls_datum_t der; /* a response that passed the checks, or empty */
        time_t next_update;
};

/* Checks a DER response against the leaf; *why says what is wrong. */
static int check_response(hsm_ocsp_file *f, const gnutls_datum_t *der, time_t now, time_t *next_update, const char **why)
{
        gnutls_ocsp_resp_t resp;
        int r = -EINVAL;
        *why = NULL;
        if (gnutls_ocsp_resp_init(&resp) < 0)
                return -ENOMEM;
        time_t this_update = 0, nu = -1;
        unsigned status = 0;
        if (gnutls_ocsp_resp_import(resp, der) < 0)
                *why = "not a DER OCSP response";
        else if (gnutls_ocsp_resp_get_status(resp) != GNUTLS_OCSP_RESP_SUCCESSFUL)
                *why = "the responder did not answer successfully";
        else if (gnutls_ocsp_resp_check_crt(resp, 0, f->leaf) < 0)
                *why = "it is about another certificate";
        else if (gnutls_ocsp_resp_get_single(resp, 0, NULL, NULL, NULL, NULL, &status, &this_update, &nu, NULL, NULL) < 0)
                *why = "it has no single response";
        else if (nu == (time_t)-1)
                *why = "it has no nextUpdate";
        else if (nu <= now)
                *why = "it is out of date (past its nextUpdate)";
        else if (this_update > now + 300)
                *why = "its thisUpdate is in the future";
        else {
                *next_update = nu;
                r = 0;
        }
        gnutls_ocsp_resp_deinit(resp);
        return r;
}

/* Reads the file again if it changed (under lock). Returns -errno when it
 * cannot be read, -EINVAL when it is about another certificate. */
static int reload(hsm_ocsp_file *f, time_t now, bool at_start)
{
        struct stat st;
        if (stat(f->path, &st) < 0) {
                int e = errno;
                if (!at_start && f->ino)
                        hsm_warn("%s: OCSP response %s: %s; not stapling", f->where, f->path, strerror(e));
                gnutls_free(f->der.data);
                f->der = (gnutls_datum_t){ NULL, 0 };
                f->ino = 0;
                return -e;
        }
        if (f->ino == st.st_ino && f->dev == st.st_dev && f->size == st.st_size && f->mtime.tv_sec == st.st_mtim.tv_sec &&
            f->mtime.tv_nsec == st.st_mtim.tv_nsec)
                return 0;
        gnutls_datum_t d = { NULL, 0 };
        int r = gnutls_load_file(f->path, &d);
        if (r < 0) {
                hsm_warn("%s: OCSP response %s: cannot read it: %s", f->where, f->path, gnutls_strerror(r));
                return -EIO;
        }
        f->dev = st.st_dev;
        f->ino = st.st_ino;
        f->size = st.st_size;
        f->mtime = st.st_mtim;
        gnutls_free(f->der.data);
        f->der = (gnutls_datum_t){ NULL, 0 };
        const char *why;
        time_t nu = 0;
        r = check_response(f, &d, now, &nu, &why);
        if (r < 0) {
                gnutls_free(d.data);
                if (at_start && strcmp(why, "it is out of date (past its nextUpdate)") != 0)
                        return -EINVAL;
                hsm_warn("%s: OCSP response %s not stapled: %s", f->where, f->path, why);
                return 0;
        }
        f->der = d;
        f->next_update = nu;
        char when[32];
        struct tm tm;
        strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&nu, &tm));
        hsm_info("%s: OCSP response %s loaded (%u bytes, next update %s)", f->where, f->path, d.size, when);
        return 0;
}

static int staple(gnutls_session_t session, void *ptr, gnutls_datum_t *out)
{
        hsm_ocsp_file *f = ptr;
        time_t now = time(NULL);
        int r = GNUTLS_E_NO_CERTIFICATE_STATUS;
        pthread_mutex_lock(&f->lock);
        if (now != f->checked) {
                f->checked = now;
                reload(f, now, false);
        }
        if (f->der.size && f->next_update <= now) {
                hsm_warn("%s: OCSP response %s went out of date; not stapling it", f->where, f->path);
                gnutls_free(f->der.data);
                f->der = (gnutls_datum_t){ NULL, 0 };
        }
        if (f->der.size && (out->data = gnutls_malloc(f->der.size))) {
                memcpy(out->data, f->der.data, f->der.size);
                out->size = f->der.size;
                r = 0;
        }
        pthread_mutex_unlock(&f->lock);
        return r;
}

int hsm_ocsp_file_new(const char *where, const char *path, const gnutls_datum_t *leaf_der, hsm_ocsp_file **ret,
                      char **errmsg)
{
        hsm_ocsp_file *f = calloc(1, sizeof(*f));
        if (!f)
                return -ENOMEM;
        pthread_mutex_init(&f->lock, NULL);
        f->where = strdup(where);
        f->path = strdup(path);
        if (!f->where || !f->path || gnutls_x509_crt_init(&f->leaf) < 0) {
                hsm_ocsp_file_free(f);
                return -ENOMEM;
        }
        if (gnutls_x509_crt_import(f->leaf, leaf_der, GNUTLS_X509_FMT_DER) < 0) {
                hsm_ocsp_file_free(f);
                return -EINVAL;
        }
        time_t now = time(NULL);
        f->checked = now;
        int r = reload(f, now, true);
        if (r < 0) {
                if (r == -EINVAL) {
                        /* say why once more, for the error */
                        gnutls_datum_t d = { NULL, 0 };
                        const char *why = "unreadable";
                        time_t nu;
                        if (gnutls_load_file(path, &d) >= 0)
                                check_response(f, &d, now, &nu, &why);
                        gnutls_free(d.data);
                        hsm_set_error(errmsg, "OCSP response %s: %s", path, why ? why : "refused");
                } else
                        hsm_set_error(errmsg, "OCSP response %s: %s", path, strerror(-r));
                hsm_ocsp_file_free(f);
                return r;
        }
        *ret = f;
        return 0;
}

int hsm_ocsp_file_attach(hsm_ocsp_file *f, gnutls_certificate_credentials_t cred, unsigned idx)
{
        int r = gnutls_certificate_set_ocsp_status_request_function2(cred, idx, staple, f);
        return r < 0 ? -EINVAL : 0;
}

void hsm_ocsp_file_free(hsm_ocsp_file *f)
{
        if (!f)
                return;
        if (f->leaf)
                gnutls_x509_crt_deinit(f->leaf);
        gnutls_free(f->der.data);
        free(f->where);
        free(f->path);
        pthread_mutex_destroy(&f->lock);
        free(f);
}
