/* OCSP stapling from files, and from the responder the leaf names (see ocsp.h). */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <gnutls/ocsp.h>
#include <gnutls/x509.h>

#include "log.h"
#include "ocsp.h"

struct ocsp_auto;

/* One chain's stapling: its state, automatic or from a file; handshakes
 * only copy the state's last good response (staple_auto()). */
struct hsm_ocsp_file {
        struct ocsp_auto *a;
        char *where;
};

static const char STALE[] = "it is out of date (past its nextUpdate)";

/* Whether resp answers the request whose nonce this is: it echoes the
 * nonce, or carries none (a responder that serves pre-signed responses;
 * RFC 6960 does not make the echo mandatory, RFC 8954 2.1). */
static bool nonce_matches(gnutls_ocsp_resp_t resp, const gnutls_datum_t *nonce)
{
        gnutls_datum_t got = { NULL, 0 };
        int r = gnutls_ocsp_resp_get_nonce(resp, NULL, &got);
        if (r == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE)
                return true;
        bool same = r >= 0 && got.size == nonce->size && memcmp(got.data, nonce->data, got.size) == 0;
        gnutls_free(got.data);
        return same;
}

/* Checks a DER response against the leaf; *why says what is wrong.
 * issuer: when not NULL, the response must also be signed by it (or by a
 * responder it delegated to): automatic mode, where the response came over
 * plain HTTP. nonce: when not NULL, the request's nonce, which a response
 * that has a nonce must echo. *this_update, when asked for, is the
 * response's thisUpdate; *ret_nonce whether the response had a nonce. */
static int check_response_crt(gnutls_x509_crt_t leaf, gnutls_x509_crt_t issuer, const gnutls_datum_t *nonce,
                              const gnutls_datum_t *der, time_t now, time_t *next_update, time_t *ret_this_update,
                              unsigned *ret_status, bool *ret_nonce, const char **why)
{
        gnutls_ocsp_resp_t resp;
        int r = -EINVAL;
        *why = NULL;
        if (gnutls_ocsp_resp_init(&resp) < 0)
                return -ENOMEM;
        time_t this_update = 0, nu = -1;
        unsigned status = 0, verify = 0;
        if (gnutls_ocsp_resp_import(resp, der) < 0)
                *why = "not a DER OCSP response";
        else if (gnutls_ocsp_resp_get_status(resp) != GNUTLS_OCSP_RESP_SUCCESSFUL)
                *why = "the responder did not answer successfully";
        else if (issuer && (gnutls_ocsp_resp_verify_direct(resp, issuer, &verify, 0) < 0 || verify != 0))
                *why = "its signature does not verify against the issuer";
        else if (nonce && !nonce_matches(resp, nonce))
                *why = "its nonce is not the one of our request (a replayed or misdirected answer)";
        else if (gnutls_ocsp_resp_check_crt(resp, 0, leaf) < 0)
                *why = "it is about another certificate";
        else if (gnutls_ocsp_resp_get_single(resp, 0, NULL, NULL, NULL, NULL, &status, &this_update, &nu, NULL, NULL) < 0)
                *why = "it has no single response";
        else if (nu == (time_t)-1)
                *why = "it has no nextUpdate";
        else if (nu <= now)
                *why = STALE;
        else if (this_update > now + 300)
                *why = "its thisUpdate is in the future";
        else {
                *next_update = nu;
                if (ret_this_update)
                        *ret_this_update = this_update;
                if (ret_status)
                        *ret_status = status;
                if (ret_nonce) {
                        gnutls_datum_t n = { NULL, 0 };
                        *ret_nonce = gnutls_ocsp_resp_get_nonce(resp, NULL, &n) >= 0;
                        gnutls_free(n.data);
                }
                r = 0;
        }
        gnutls_ocsp_resp_deinit(resp);
        return r;
}

/* ------------------------------------------------------------ states
 *
 * Automatic mode: one state per leaf certificate, shared by every chain
 * (and every rebuilt set of credentials) that staples for that leaf; a
 * file: one state per chain. Both kept in a registry here. One thread
 * fetches for every automatic state, so no handshake or I/O thread ever
 * waits on a responder; another looks at every file once a second and
 * re-reads it when it changed, so no handshake ever waits on a file (a
 * FIFO, a file too large, a hung mount). Each publishes what passed the
 * checks under the state's lock, held only to swap the response; a
 * handshake copies it under that lock. hsm_ocsp_shutdown() stops both. */

#define AUTO_TIMEOUT_S 10           /* one request, connect to last byte */
#define AUTO_MAX_BODY (64 * 1024)   /* a larger answer is refused */
#define AUTO_BACKOFF_MIN_S 1u       /* after a failure: 1 s, 2 s, 4 s, ... */
#define AUTO_BACKOFF_MAX_S 600u     /* ... at most 10 minutes */
#define AUTO_REFRESH_MAX_S (24 * 3600) /* half the validity, at most a day */
#define FILE_MAX (64 * 1024)        /* a larger ocsp_response file is not read */
#define FILE_CHECK_S 1u             /* each file is looked at once a second */
#define FILE_JOIN_S 5               /* at shutdown, wait this long for a read stuck in the kernel */

enum { FETCH_THREAD, FILE_THREAD, N_THREADS };

struct ocsp_auto {
        /* registry lock */
        struct ocsp_auto *next;
        unsigned refs;       /* chains using it, plus one while its thread works on it */
        bool busy;           /* its thread works on it */
        time_t next_attempt; /* when to ask the responder (look at the file) next */
        int abandoned;       /* atomic: only the fetch thread holds it; cut a fetch short */
        /* fixed after creation */
        char *where, *url;   /* url: automatic mode */
        char *path;          /* a file (url NULL) */
        gnutls_datum_t leaf_der;
        gnutls_x509_crt_t leaf, issuer;
        /* its thread only (and the creator before the state is registered) */
        unsigned failures;
        time_t newest;          /* automatic: thisUpdate of the newest response taken, 0: none yet */
        unsigned newest_status; /* its certificate status */
        bool seen;              /* file: dev..mtime are those of the file read last */
        dev_t dev;
        ino_t ino;
        off_t size;
        struct timespec mtime;
        char refused[192]; /* file: the reason last logged for not reading it ("": none) */
        /* lock */
        pthread_mutex_t lock;
        gnutls_datum_t der; /* the last response that passed the checks, or empty */
        time_t next_update;
        bool warned_stale;
};

static struct {
        pthread_mutex_t lock;
        pthread_cond_t cond; /* a new state, or a state gone: broadcast (both threads wait on it) */
        struct ocsp_auto *head;
        bool started[N_THREADS];
        int stopping; /* atomic; hsm_ocsp_shutdown(): the threads end, a fetch is cut short */
        pthread_t thread[N_THREADS];
} reg = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, { false, false }, 0, { 0, 0 } };

static int thread_of(const struct ocsp_auto *a)
{
        return a->path ? FILE_THREAD : FETCH_THREAD;
}

static bool stopping(void)
{
        return __atomic_load_n(&reg.stopping, __ATOMIC_RELAXED) != 0;
}

static void format_time(time_t t, char *buf, size_t size)
{
        struct tm tm;
        strftime(buf, size, "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&t, &tm));
}

static void auto_free(struct ocsp_auto *a)
{
        if (!a)
                return;
        if (a->leaf)
                gnutls_x509_crt_deinit(a->leaf);
        if (a->issuer)
                gnutls_x509_crt_deinit(a->issuer);
        gnutls_free(a->leaf_der.data);
        gnutls_free(a->der.data);
        free(a->where);
        free(a->url);
        free(a->path);
        pthread_mutex_destroy(&a->lock);
        free(a);
}

/* Registry lock held. */
static void auto_unlink(struct ocsp_auto *a)
{
        for (struct ocsp_auto **p = &reg.head; *p; p = &(*p)->next)
                if (*p == a) {
                        *p = a->next;
                        break;
                }
}

static void auto_unref(struct ocsp_auto *a)
{
        pthread_mutex_lock(&reg.lock);
        bool last = --a->refs == 0;
        if (last)
                auto_unlink(a);
        else if (a->refs == 1 && a->busy)
                __atomic_store_n(&a->abandoned, 1, __ATOMIC_RELAXED);
        pthread_cond_broadcast(&reg.cond);
        pthread_mutex_unlock(&reg.lock);
        if (last)
                auto_free(a);
}

struct body {
        uint8_t *p;
        size_t n;
        bool too_big;
};

static size_t on_data(char *ptr, size_t size, size_t nmemb, void *ud)
{
        struct body *b = ud;
        size_t n = size * nmemb;
        if (b->n + n > AUTO_MAX_BODY) {
                b->too_big = true;
                return 0;
        }
        uint8_t *p = realloc(b->p, b->n + n);
        if (!p)
                return 0;
        memcpy(p + b->n, ptr, n);
        b->p = p;
        b->n += n;
        return n;
}

static int on_progress(void *ud, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow)
{
        (void)dltotal, (void)dlnow, (void)ultotal, (void)ulnow;
        struct ocsp_auto *a = ud;
        return __atomic_load_n(&a->abandoned, __ATOMIC_RELAXED) || stopping() ? 1 : 0;
}

/* A DER request for a's leaf with a new random nonce (RFC 6960 4.4.1),
 * *ret_nonce its value: each fetch asks with its own. */
static int build_request(const struct ocsp_auto *a, gnutls_datum_t *ret_der, gnutls_datum_t *ret_nonce)
{
        gnutls_ocsp_req_t req;
        if (gnutls_ocsp_req_init(&req) < 0)
                return -ENOMEM;
        gnutls_datum_t der = { NULL, 0 }, nonce = { NULL, 0 };
        int r = -EINVAL;
        if (gnutls_ocsp_req_add_cert(req, GNUTLS_DIG_SHA1, a->issuer, a->leaf) >= 0 && gnutls_ocsp_req_randomize_nonce(req) >= 0 &&
            gnutls_ocsp_req_get_nonce(req, NULL, &nonce) >= 0 && gnutls_ocsp_req_export(req, &der) >= 0) {
                *ret_der = der;
                *ret_nonce = nonce;
                nonce.data = NULL;
                r = 0;
        }
        gnutls_free(nonce.data);
        gnutls_ocsp_req_deinit(req);
        return r;
}

/* POSTs the request to the responder (RFC 6960 A.1). On failure *why says
 * what went wrong (in why_buf). */
static int http_post(struct ocsp_auto *a, const gnutls_datum_t *req, gnutls_datum_t *ret, char *why_buf, size_t why_size)
{
        char err[CURL_ERROR_SIZE] = "";
        struct body b = { NULL, 0, false };
        int r = -EIO;
        CURL *h = curl_easy_init();
        struct curl_slist *hdr = curl_slist_append(NULL, "Content-Type: application/ocsp-request");
        if (!h || !hdr) {
                snprintf(why_buf, why_size, "out of memory");
                goto out;
        }
        curl_easy_setopt(h, CURLOPT_URL, a->url);
#if LIBCURL_VERSION_NUM >= 0x075500
        curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http");
#else
        curl_easy_setopt(h, CURLOPT_PROTOCOLS, (long)CURLPROTO_HTTP);
#endif
        curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(h, CURLOPT_POST, 1L);
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, req->data);
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)req->size);
        curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdr);
        curl_easy_setopt(h, CURLOPT_USERAGENT, "hsmtlsd");
        curl_easy_setopt(h, CURLOPT_TIMEOUT, (long)AUTO_TIMEOUT_S);
        curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, 5L);
        curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_data);
        curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
        curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
        curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_progress);
        curl_easy_setopt(h, CURLOPT_XFERINFODATA, a);
        curl_easy_setopt(h, CURLOPT_ERRORBUFFER, err);
        CURLcode rc = curl_easy_perform(h);
        long code = 0;
        if (rc == CURLE_OK)
                curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
        if (b.too_big)
                snprintf(why_buf, why_size, "the answer is larger than %u bytes", AUTO_MAX_BODY);
        else if (rc != CURLE_OK)
                snprintf(why_buf, why_size, "%s", err[0] ? err : curl_easy_strerror(rc));
        else if (code != 200)
                snprintf(why_buf, why_size, "HTTP status %ld", code);
        else if (b.n == 0)
                snprintf(why_buf, why_size, "an empty answer");
        else if (!(ret->data = gnutls_malloc(b.n)))
                snprintf(why_buf, why_size, "out of memory");
        else {
                memcpy(ret->data, b.p, b.n);
                ret->size = (unsigned)b.n;
                r = 0;
        }
out:
        free(b.p);
        curl_slist_free_all(hdr);
        if (h)
                curl_easy_cleanup(h);
        return r;
}

static const char *cert_status_name(unsigned s)
{
        return s == GNUTLS_OCSP_CERT_GOOD ? "good" : s == GNUTLS_OCSP_CERT_REVOKED ? "REVOKED" : "unknown";
}

/* Hands *der (or nothing, when der is NULL or empty) to the handshakes,
 * in place of what they stapled so far: the lock is held only for the swap. */
static void publish(struct ocsp_auto *a, gnutls_datum_t *der, time_t next_update)
{
        gnutls_datum_t old;
        pthread_mutex_lock(&a->lock);
        old = a->der;
        a->der = der ? *der : (gnutls_datum_t){ NULL, 0 };
        a->next_update = next_update;
        a->warned_stale = false;
        pthread_mutex_unlock(&a->lock);
        gnutls_free(old.data);
        if (der)
                *der = (gnutls_datum_t){ NULL, 0 };
}

/* What the handshakes go on stapling, for a log line. */
static void keeping(struct ocsp_auto *a, time_t now, char *buf, size_t size)
{
        pthread_mutex_lock(&a->lock);
        bool have = a->der.size && a->next_update > now;
        time_t until = a->next_update;
        pthread_mutex_unlock(&a->lock);
        char when[32];
        format_time(until, when, sizeof(when));
        snprintf(buf, size, have ? "still stapling the response valid until %s" : "nothing to staple", when);
}

/* One request (fetch thread). Returns the seconds until the next one:
 * half the new response's validity, or the backoff after a failure. */
static unsigned auto_refresh(struct ocsp_auto *a)
{
        gnutls_datum_t body = { NULL, 0 }, req = { NULL, 0 }, nonce = { NULL, 0 };
        char why_buf[CURL_ERROR_SIZE + 64] = "";
        const char *why = why_buf;
        time_t nu = 0, tu = 0;
        unsigned status = 0;
        bool echoed = false;
        int r = build_request(a, &req, &nonce);
        if (r < 0)
                snprintf(why_buf, sizeof(why_buf), "GnuTLS cannot build the OCSP request");
        else
                r = http_post(a, &req, &body, why_buf, sizeof(why_buf));
        time_t now = time(NULL);
        if (r == 0)
                r = check_response_crt(a->leaf, a->issuer, &nonce, &body, now, &nu, &tu, &status, &echoed, &why);
        gnutls_free(req.data);
        gnutls_free(nonce.data);
        char when[32], ours[32];
        /* never back in time: an answer older than the one taken last (a
         * replayed "good" from before a revocation) is refused, and a
         * REVOKED stays until a newer answer says otherwise */
        if (r == 0 && a->newest &&
            (tu < a->newest || (tu == a->newest && a->newest_status == GNUTLS_OCSP_CERT_REVOKED && status != GNUTLS_OCSP_CERT_REVOKED))) {
                format_time(tu, when, sizeof(when));
                format_time(a->newest, ours, sizeof(ours));
                snprintf(why_buf, sizeof(why_buf), "it (%s, thisUpdate %s) is not newer than the %s response taken last (thisUpdate %s)",
                         cert_status_name(status), when, cert_status_name(a->newest_status), ours);
                why = why_buf;
                r = -EINVAL;
        }
        if (stopping() && r < 0)
                hsm_info("%s: OCSP request to %s given up: hsmtlsd is stopping", a->where, a->url);
        if (stopping() || __atomic_load_n(&a->abandoned, __ATOMIC_RELAXED)) {
                gnutls_free(body.data);
                return AUTO_BACKOFF_MIN_S;
        }
        if (r == 0) {
                a->failures = 0;
                a->newest = tu;
                a->newest_status = status;
                /* half the validity, counted from thisUpdate (from now if that is
                 * ahead of us); a responder that serves a response made long ago
                 * (past its half already): half of what is left, so that a fresh
                 * one is asked for well before nextUpdate without asking every second */
                time_t from = tu > now ? now : tu;
                time_t at = from + (nu - from) / 2;
                if (at <= now)
                        at = now + (nu - now) / 2;
                long delay = (long)(at - now);
                if (delay < 1)
                        delay = 1;
                if (delay > AUTO_REFRESH_MAX_S)
                        delay = AUTO_REFRESH_MAX_S;
                unsigned size = body.size;
                publish(a, &body, nu);
                format_time(nu, when, sizeof(when));
                if (status == GNUTLS_OCSP_CERT_GOOD)
                        hsm_info("%s: OCSP response from %s: %s, %u bytes, %s, next update %s; next refresh in %lds", a->where,
                                 a->url, cert_status_name(status), size, echoed ? "our nonce" : "no nonce", when, delay);
                else
                        hsm_warn("%s: OCSP response from %s: the certificate is %s (stapled as is), next update %s; next refresh in %lds",
                                 a->where, a->url, cert_status_name(status), when, delay);
                return (unsigned)delay;
        }
        gnutls_free(body.data);
        a->failures++;
        unsigned delay = a->failures > 10 ? AUTO_BACKOFF_MAX_S : AUTO_BACKOFF_MIN_S << (a->failures - 1);
        if (delay > AUTO_BACKOFF_MAX_S)
                delay = AUTO_BACKOFF_MAX_S;
        char keep[96];
        keeping(a, now, keep, sizeof(keep));
        hsm_warn("%s: OCSP request to %s failed (attempt %u): %s; %s; retrying in %us", a->where, a->url, a->failures, why, keep,
                 delay);
        return delay;
}

/* ------------------------------------------------------------ files */

static bool same_file(const struct ocsp_auto *a, const struct stat *st)
{
        return a->seen && a->ino == st->st_ino && a->dev == st->st_dev && a->size == st->st_size &&
               a->mtime.tv_sec == st->st_mtim.tv_sec && a->mtime.tv_nsec == st->st_mtim.tv_nsec;
}

static const char *file_type(mode_t m)
{
        return S_ISFIFO(m) ? "a FIFO" : S_ISDIR(m) ? "a directory" : S_ISCHR(m) || S_ISBLK(m) ? "a device" : S_ISSOCK(m) ? "a socket"
                                                                                                           : "not a plain file";
}

/* Reads a's file if it changed since it was read last (inode, size,
 * mtime). Never blocks on what is not a regular file: a FIFO, a device or
 * a socket is not opened, the open does not wait (O_NONBLOCK), and no more
 * than FILE_MAX bytes are read. Symbolic links are followed (operators
 * link the file to where their OCSP tool writes). Returns 1 with *ret (its
 * identity kept in a) when read, 0 when unchanged, -errno with why when it
 * cannot be read: *ret_gone when stat() fails (the file is gone), -EINVAL
 * when it is not a regular file, -EFBIG when too large. */
static int read_file(struct ocsp_auto *a, gnutls_datum_t *ret, bool *ret_gone, char *why, size_t why_size)
{
        struct stat st;
        *ret_gone = false;
        if (stat(a->path, &st) < 0) {
                int e = errno;
                *ret_gone = true;
                snprintf(why, why_size, "%s", strerror(e));
                return -e;
        }
        if (same_file(a, &st))
                return 0;
        int fd = -1, r = -EINVAL;
        uint8_t *buf = NULL;
        size_t n = 0;
        if (!S_ISREG(st.st_mode))
                goto refused;
        if (st.st_size > FILE_MAX)
                goto too_big;
        fd = open(a->path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
        if (fd < 0 || fstat(fd, &st) < 0) {
                r = -errno;
                snprintf(why, why_size, "cannot open it: %s", strerror(errno));
                goto out;
        }
        if (!S_ISREG(st.st_mode)) /* renamed over between the stat() and the open() */
                goto refused;
        if (!(buf = gnutls_malloc(FILE_MAX + 1))) {
                r = -ENOMEM;
                snprintf(why, why_size, "out of memory");
                goto out;
        }
        for (;;) {
                ssize_t got = read(fd, buf + n, FILE_MAX + 1 - n);
                if (got < 0 && errno == EINTR)
                        continue;
                if (got < 0) {
                        r = -errno;
                        snprintf(why, why_size, "cannot read it: %s", strerror(errno));
                        goto out;
                }
                if (got == 0)
                        break;
                n += (size_t)got;
                if (n > FILE_MAX) {
                        st.st_size = (off_t)n;
                        goto too_big;
                }
        }
        a->seen = true;
        a->dev = st.st_dev;
        a->ino = st.st_ino;
        a->size = st.st_size;
        a->mtime = st.st_mtim;
        *ret = (gnutls_datum_t){ buf, (unsigned)n };
        buf = NULL;
        r = 1;
        goto out;
too_big:
        r = -EFBIG;
        snprintf(why, why_size, "it is larger than %u bytes (%lld%s)", FILE_MAX, (long long)st.st_size,
                 n > FILE_MAX ? " or more" : "");
        goto out;
refused:
        snprintf(why, why_size, "it is %s, not a regular file", file_type(st.st_mode));
out:
        if (fd >= 0)
                close(fd);
        gnutls_free(buf);
        return r;
}

/* Looks at the file (file thread; at start, before the state is
 * registered). A response that fails the checks is not stapled; a file
 * that cannot be read leaves the last good response stapled (until its
 * nextUpdate), one that is gone stops the stapling. Each refusal is logged
 * once, with its reason. Returns read_file()'s, or -EINVAL with *ret_why
 * when the response fails the checks. */
static int file_refresh(struct ocsp_auto *a, bool at_start, const char **ret_why)
{
        char why_buf[sizeof(a->refused)] = "";
        const char *why = why_buf;
        gnutls_datum_t d = { NULL, 0 };
        time_t now = time(NULL), nu = 0;
        bool gone;
        int r = read_file(a, &d, &gone, why_buf, sizeof(why_buf));
        if (r == 0) {
                a->refused[0] = 0; /* the file read last is back */
                return 0;
        }
        if (r > 0) {
                a->refused[0] = 0;
                r = check_response_crt(a->leaf, NULL, NULL, &d, now, &nu, NULL, NULL, NULL, &why);
                unsigned size = d.size;
                publish(a, r == 0 ? &d : NULL, nu);
                gnutls_free(d.data);
                if (ret_why)
                        *ret_why = why;
                if (r == 0) {
                        char when[32];
                        format_time(nu, when, sizeof(when));
                        hsm_info("%s: OCSP response %s loaded (%u bytes, next update %s)", a->where, a->path, size, when);
                } else if (!at_start || strcmp(why, STALE) == 0)
                        hsm_warn("%s: OCSP response %s not stapled: %s", a->where, a->path, why);
                return r;
        }
        if (gone) {
                a->seen = false;
                publish(a, NULL, 0);
        }
        if (strcmp(a->refused, why) == 0)
                return r;
        snprintf(a->refused, sizeof(a->refused), "%s", why);
        if (ret_why)
                *ret_why = a->refused;
        if (at_start) /* the caller says why */
                return r;
        char keep[96];
        keeping(a, now, keep, sizeof(keep));
        hsm_warn("%s: OCSP response %s not read: %s; %s", a->where, a->path, why, gone ? "not stapling" : keep);
        return r;
}

/* The fetch thread (arg NULL) works on the automatic states, the file
 * thread (arg not NULL) on the files. */
static void *fetch_thread(void *arg)
{
        int which = arg ? FILE_THREAD : FETCH_THREAD;
        pthread_mutex_lock(&reg.lock);
        while (!stopping()) {
                struct ocsp_auto *due = NULL;
                for (struct ocsp_auto *a = reg.head; a; a = a->next)
                        if (thread_of(a) == which && !a->busy && (!due || a->next_attempt < due->next_attempt))
                                due = a;
                time_t now = time(NULL);
                if (!due) {
                        pthread_cond_wait(&reg.cond, &reg.lock);
                        continue;
                }
                if (due->next_attempt > now) {
                        struct timespec ts = { due->next_attempt, 0 };
                        pthread_cond_timedwait(&reg.cond, &reg.lock, &ts);
                        continue;
                }
                due->refs++;
                due->busy = true;
                pthread_mutex_unlock(&reg.lock);
                unsigned delay = which == FILE_THREAD ? (file_refresh(due, false, NULL), FILE_CHECK_S) : auto_refresh(due);
                pthread_mutex_lock(&reg.lock);
                due->busy = false;
                due->next_attempt = time(NULL) + delay;
                if (--due->refs == 0) {
                        auto_unlink(due);
                        pthread_mutex_unlock(&reg.lock);
                        auto_free(due);
                        pthread_mutex_lock(&reg.lock);
                }
        }
        pthread_mutex_unlock(&reg.lock);
        return NULL;
}

/* Registry lock held. The threads block every signal: they are the main
 * loop's. With no state a thread waits on the condition, until
 * hsm_ocsp_shutdown(). */
static int start_thread(int which)
{
        if (reg.started[which])
                return 0;
        if (which == FETCH_THREAD && curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
                return -ENOMEM;
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        if (!reg.started[FETCH_THREAD] && !reg.started[FILE_THREAD])
                __atomic_store_n(&reg.stopping, 0, __ATOMIC_RELAXED);
        int r = pthread_create(&reg.thread[which], NULL, fetch_thread, which == FILE_THREAD ? &reg : NULL);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (r != 0) {
                if (which == FETCH_THREAD)
                        curl_global_cleanup();
                return -r;
        }
        reg.started[which] = true;
        return 0;
}

void hsm_ocsp_shutdown(void)
{
        pthread_mutex_lock(&reg.lock);
        bool fetch = reg.started[FETCH_THREAD], file = reg.started[FILE_THREAD];
        if (!fetch && !file) {
                pthread_mutex_unlock(&reg.lock);
                return;
        }
        __atomic_store_n(&reg.stopping, 1, __ATOMIC_RELAXED);
        pthread_cond_broadcast(&reg.cond);
        pthread_mutex_unlock(&reg.lock);
        /* A fetch in progress ends at its next progress callback (libcurl
         * calls it about once a second when idle), at worst at its timeout. */
        if (fetch) {
                pthread_join(reg.thread[FETCH_THREAD], NULL);
                curl_global_cleanup();
        }
        /* A file read does not block, but its stat() or read() can wait in
         * the kernel (a hung network mount): not forever. The state it
         * holds is then never freed (the process ends). */
        if (file) {
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                ts.tv_sec += FILE_JOIN_S;
                if (pthread_timedjoin_np(reg.thread[FILE_THREAD], NULL, &ts) != 0) {
                        hsm_warn("the OCSP file thread is stuck reading a file (a hung mount?); not waiting for it");
                        pthread_detach(reg.thread[FILE_THREAD]);
                }
        }
        pthread_mutex_lock(&reg.lock);
        reg.started[FETCH_THREAD] = reg.started[FILE_THREAD] = false;
        pthread_mutex_unlock(&reg.lock);
        hsm_debug("OCSP threads stopped");
}

/* The responder's URL from the leaf's Authority Information Access. */
static int responder_url(gnutls_x509_crt_t leaf, char **ret, const char **why)
{
        for (unsigned seq = 0;; seq++) {
                gnutls_datum_t d = { NULL, 0 };
                int r = gnutls_x509_crt_get_authority_info_access(leaf, seq, GNUTLS_IA_OCSP_URI, &d, NULL);
                if (r == GNUTLS_E_UNKNOWN_ALGORITHM)
                        continue; /* another access method (caIssuers) */
                if (r < 0) {
                        *why = "the certificate names no OCSP responder (Authority Information Access)";
                        return -ENOENT;
                }
                bool http = d.size > 7 && strncasecmp((const char *)d.data, "http://", 7) == 0 &&
                            memchr(d.data, 0, d.size) == NULL;
                if (!http) {
                        gnutls_free(d.data);
                        continue; /* OCSP over HTTP only (RFC 6960 A.1) */
                }
                *ret = strndup((const char *)d.data, d.size);
                gnutls_free(d.data);
                return *ret ? 0 : -ENOMEM;
        }
}

/* The certificate after the leaf in the chain file, which must have issued it. */
static int read_issuer(const char *cert_path, gnutls_x509_crt_t leaf, gnutls_x509_crt_t *ret, const char **why)
{
        gnutls_datum_t pem = { NULL, 0 };
        gnutls_x509_crt_t *crts = NULL;
        unsigned n = 0;
        int r = -EINVAL;
        *why = "cannot read the certificate chain";
        if (gnutls_load_file(cert_path, &pem) < 0)
                return -EIO;
        if (gnutls_x509_crt_list_import2(&crts, &n, &pem, GNUTLS_X509_FMT_PEM, 0) < 0)
                n = 0;
        else if (n < 2)
                *why = "automatic mode needs the issuer's certificate after the leaf in the 'cert' file";
        else if (!gnutls_x509_crt_check_issuer(leaf, crts[1]))
                *why = "the second certificate in the 'cert' file did not issue the leaf";
        else {
                *ret = crts[1];
                crts[1] = NULL;
                r = 0;
        }
        for (unsigned i = 0; i < n; i++)
                if (crts[i])
                        gnutls_x509_crt_deinit(crts[i]);
        gnutls_free(crts);
        gnutls_free(pem.data);
        return r;
}

/* A new state for leaf_der (not registered yet), or NULL with *why. */
static struct ocsp_auto *state_new(const char *where, const gnutls_datum_t *leaf_der, const char **why)
{
        *why = "out of memory";
        struct ocsp_auto *a = calloc(1, sizeof(*a));
        if (!a)
                return NULL;
        pthread_mutex_init(&a->lock, NULL);
        if (!(a->where = strdup(where)) || gnutls_x509_crt_init(&a->leaf) < 0) {
                auto_free(a);
                return NULL;
        }
        if (gnutls_x509_crt_import(a->leaf, leaf_der, GNUTLS_X509_FMT_DER) < 0 ||
            gnutls_x509_crt_export2(a->leaf, GNUTLS_X509_FMT_DER, &a->leaf_der) < 0) {
                *why = "cannot read the leaf certificate";
                auto_free(a);
                return NULL;
        }
        return a;
}

/* Hands a (one reference, its caller's) to its thread, started if need be. */
static int state_register(struct ocsp_auto *a, time_t first, const char **why)
{
        a->refs = 1;
        a->next_attempt = first;
        pthread_mutex_lock(&reg.lock);
        int r = start_thread(thread_of(a));
        if (r < 0) {
                pthread_mutex_unlock(&reg.lock);
                *why = a->path ? "cannot start the OCSP file thread" : "cannot start the OCSP fetch thread";
                return r;
        }
        a->next = reg.head;
        reg.head = a;
        pthread_cond_broadcast(&reg.cond);
        pthread_mutex_unlock(&reg.lock);
        return 0;
}

/* Finds or makes the state for leaf_der. */
static int auto_get(const char *where, const char *cert_path, const gnutls_datum_t *leaf_der, struct ocsp_auto **ret,
                    char **errmsg)
{
        pthread_mutex_lock(&reg.lock);
        for (struct ocsp_auto *a = reg.head; a; a = a->next)
                if (!a->path && a->leaf_der.size == leaf_der->size && memcmp(a->leaf_der.data, leaf_der->data, leaf_der->size) == 0) {
                        a->refs++;
                        __atomic_store_n(&a->abandoned, 0, __ATOMIC_RELAXED);
                        pthread_mutex_unlock(&reg.lock);
                        *ret = a;
                        return 0;
                }
        pthread_mutex_unlock(&reg.lock);

        const char *why;
        gnutls_datum_t req = { NULL, 0 }, nonce = { NULL, 0 };
        int r = -EINVAL;
        struct ocsp_auto *a = state_new(where, leaf_der, &why);
        if (!a)
                goto fail;
        if ((r = responder_url(a->leaf, &a->url, &why)) < 0 || (r = read_issuer(cert_path, a->leaf, &a->issuer, &why)) < 0)
                goto fail;
        /* each fetch builds its own request (a new nonce): try one now */
        r = build_request(a, &req, &nonce);
        gnutls_free(req.data);
        gnutls_free(nonce.data);
        if (r < 0) {
                why = "GnuTLS cannot build the OCSP request";
                goto fail;
        }
        if ((r = state_register(a, 0, &why)) < 0)
                goto fail;
        hsm_info("%s: OCSP responses for %s fetched from %s (ocsp_response = auto)", where, cert_path, a->url);
        *ret = a;
        return 0;
fail:
        hsm_set_error(errmsg, "ocsp_response = auto: %s", why);
        auto_free(a);
        return r < 0 ? r : -EINVAL;
}

/* A state for the file at path, read once now: at start a file that
 * cannot be read, or whose response fails the checks other than by being
 * out of date, is an error. */
static int file_get(const char *where, const char *path, const gnutls_datum_t *leaf_der, struct ocsp_auto **ret, char **errmsg)
{
        const char *why;
        int r = -EINVAL;
        struct ocsp_auto *a = state_new(where, leaf_der, &why);
        if (a && !(a->path = strdup(path))) {
                why = "out of memory";
                r = -ENOMEM;
        } else if (a) {
                r = file_refresh(a, true, &why);
                if (r >= 0 || strcmp(why, STALE) == 0)
                        r = state_register(a, time(NULL) + FILE_CHECK_S, &why);
        }
        if (r >= 0) {
                *ret = a;
                return 0;
        }
        hsm_set_error(errmsg, "OCSP response %s: %s", path, why);
        auto_free(a);
        return r;
}

/* Handshake thread: never waits on the responder nor on a file, only on
 * the state's lock, which the other threads hold only to swap the response. */
static int staple_auto(hsm_ocsp_file *f, gnutls_datum_t *out)
{
        struct ocsp_auto *a = f->a;
        time_t now = time(NULL);
        int r = GNUTLS_E_NO_CERTIFICATE_STATUS;
        pthread_mutex_lock(&a->lock);
        if (a->der.size && a->next_update <= now) {
                if (!a->warned_stale) {
                        a->warned_stale = true;
                        if (a->path)
                                hsm_warn("%s: OCSP response %s went out of date; not stapling it", f->where, a->path);
                        else
                                hsm_warn("%s: OCSP response from %s went out of date and no fresh one came; not stapling it",
                                         f->where, a->url);
                }
        } else if (a->der.size && (out->data = gnutls_malloc(a->der.size))) {
                memcpy(out->data, a->der.data, a->der.size);
                out->size = a->der.size;
                r = 0;
        }
        pthread_mutex_unlock(&a->lock);
        return r;
}

static int staple(gnutls_session_t session, void *ptr, gnutls_datum_t *out)
{
        (void)session;
        return staple_auto(ptr, out);
}

int hsm_ocsp_file_new(const char *where, const char *path, const char *cert_path, const gnutls_datum_t *leaf_der,
                      hsm_ocsp_file **ret, char **errmsg)
{
        hsm_ocsp_file *f = calloc(1, sizeof(*f));
        if (!f || !(f->where = strdup(where))) {
                free(f);
                return -ENOMEM;
        }
        int r = strcmp(path, HSM_OCSP_AUTO) == 0 ? auto_get(where, cert_path, leaf_der, &f->a, errmsg)
                                                 : file_get(where, path, leaf_der, &f->a, errmsg);
        if (r < 0) {
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
        if (f->a)
                auto_unref(f->a);
        free(f->where);
        free(f);
}
