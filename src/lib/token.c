/* Tokens: finding the slot by URI, one login, the session pool, recovery. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <p11-kit/p11-kit.h>
#include <p11-kit/uri.h>

#include "log.h"
#include "token-internal.h"

#define DEFAULT_MAX_SESSIONS 32
#define LIMIT_MAX_SESSIONS 1024
#define SESSION_WAIT_SECONDS 30
/* The recovery probes an absent or failed token after 50 ms, then doubling
 * to at most every 2 s. A degraded token is ready again after this many
 * successes in a row. */
#define RECOVERY_BACKOFF_MIN_MS 50
#define RECOVERY_BACKOFF_MAX_MS 2000
#define DEGRADED_OK_STREAK 16

const char *hsm_p11_rv_name(CK_RV rv)
{
        switch (rv) {
#define RV(x) case x: return #x;
        RV(CKR_OK) RV(CKR_CANCEL) RV(CKR_HOST_MEMORY) RV(CKR_SLOT_ID_INVALID) RV(CKR_GENERAL_ERROR)
        RV(CKR_FUNCTION_FAILED) RV(CKR_ARGUMENTS_BAD) RV(CKR_ATTRIBUTE_SENSITIVE) RV(CKR_ATTRIBUTE_TYPE_INVALID)
        RV(CKR_DATA_INVALID) RV(CKR_DATA_LEN_RANGE) RV(CKR_DEVICE_ERROR) RV(CKR_DEVICE_MEMORY) RV(CKR_DEVICE_REMOVED)
        RV(CKR_ENCRYPTED_DATA_INVALID) RV(CKR_ENCRYPTED_DATA_LEN_RANGE) RV(CKR_FUNCTION_CANCELED)
        RV(CKR_FUNCTION_NOT_SUPPORTED) RV(CKR_KEY_HANDLE_INVALID) RV(CKR_KEY_TYPE_INCONSISTENT)
        RV(CKR_KEY_FUNCTION_NOT_PERMITTED) RV(CKR_MECHANISM_INVALID) RV(CKR_MECHANISM_PARAM_INVALID)
        RV(CKR_OBJECT_HANDLE_INVALID) RV(CKR_OPERATION_ACTIVE) RV(CKR_OPERATION_NOT_INITIALIZED)
        RV(CKR_PIN_INCORRECT) RV(CKR_PIN_INVALID) RV(CKR_PIN_LEN_RANGE) RV(CKR_PIN_EXPIRED) RV(CKR_PIN_LOCKED)
        RV(CKR_SESSION_CLOSED) RV(CKR_SESSION_COUNT) RV(CKR_SESSION_HANDLE_INVALID) RV(CKR_TOKEN_NOT_PRESENT)
        RV(CKR_TOKEN_NOT_RECOGNIZED) RV(CKR_USER_ALREADY_LOGGED_IN) RV(CKR_USER_NOT_LOGGED_IN)
        RV(CKR_USER_PIN_NOT_INITIALIZED) RV(CKR_USER_TYPE_INVALID) RV(CKR_BUFFER_TOO_SMALL)
        RV(CKR_CRYPTOKI_NOT_INITIALIZED) RV(CKR_CRYPTOKI_ALREADY_INITIALIZED) RV(CKR_SIGNATURE_INVALID)
        RV(CKR_SIGNATURE_LEN_RANGE) RV(CKR_TEMPLATE_INCOMPLETE) RV(CKR_TEMPLATE_INCONSISTENT)
#undef RV
        default: {
                static __thread char buf[32];
                snprintf(buf, sizeof(buf), "CKR_0x%08lx", (unsigned long)rv);
                return buf;
        }
        }
}

CK_RV hsm_p11_trace(const char *fn, CK_RV rv)
{
        if (rv != CKR_OK)
                hsm_debug("PKCS#11 %s: %s", fn, hsm_p11_rv_name(rv));
        return rv;
}

int hsm_p11_errno(CK_RV rv)
{
        switch (rv) {
        case CKR_OK: return 0;
        case CKR_HOST_MEMORY: case CKR_DEVICE_MEMORY: return -ENOMEM;
        case CKR_PIN_INCORRECT: case CKR_PIN_INVALID: case CKR_PIN_LEN_RANGE: case CKR_PIN_EXPIRED:
        case CKR_USER_NOT_LOGGED_IN: return -EACCES;
        case CKR_PIN_LOCKED: return -EPERM;
        case CKR_TOKEN_NOT_PRESENT: case CKR_DEVICE_REMOVED: case CKR_TOKEN_NOT_RECOGNIZED: case CKR_SLOT_ID_INVALID:
                return -ENODEV;
        case CKR_SESSION_HANDLE_INVALID: case CKR_SESSION_CLOSED: return -ESTALE;
        case CKR_OBJECT_HANDLE_INVALID: case CKR_KEY_HANDLE_INVALID: return -ESTALE;
        case CKR_ENCRYPTED_DATA_INVALID: case CKR_ENCRYPTED_DATA_LEN_RANGE: return -EBADMSG;
        case CKR_MECHANISM_INVALID: case CKR_MECHANISM_PARAM_INVALID: case CKR_KEY_TYPE_INCONSISTENT:
        case CKR_KEY_FUNCTION_NOT_PERMITTED: case CKR_FUNCTION_NOT_SUPPORTED: return -EOPNOTSUPP;
        case CKR_DATA_LEN_RANGE: case CKR_DATA_INVALID: case CKR_ARGUMENTS_BAD: return -EINVAL;
        case CKR_BUFFER_TOO_SMALL: return -ENOBUFS;
        case CKR_SESSION_COUNT: return -EBUSY;
        default: return -EIO;
        }
}

enum hsm_p11_action hsm_p11_action(CK_RV rv)
{
        switch (rv) {
        case CKR_SESSION_HANDLE_INVALID:
        case CKR_SESSION_CLOSED:
                return HSM_P11_SESSION_LOST;
        case CKR_USER_NOT_LOGGED_IN:
                return HSM_P11_LOGIN_LOST;
        case CKR_DEVICE_REMOVED:
        case CKR_TOKEN_NOT_PRESENT:
        case CKR_SLOT_ID_INVALID:
                return HSM_P11_TOKEN_GONE;
        case CKR_KEY_HANDLE_INVALID:
        case CKR_OBJECT_HANDLE_INVALID:
                return HSM_P11_STALE_HANDLE;
        case CKR_OPERATION_ACTIVE:
                return HSM_P11_SESSION_BUSY;
        default:
                /* CKR_DEVICE_ERROR, CKR_FUNCTION_FAILED, CKR_GENERAL_ERROR,
                 * CKR_DEVICE_MEMORY, a refused PIN...: this operation failed;
                 * the session and the login are still good. */
                return HSM_P11_FAIL;
        }
}

unsigned hsm_token_login_epoch(hsm_token *t)
{
        return __atomic_load_n(&t->login_epoch, __ATOMIC_ACQUIRE);
}

static char *trim_field(const unsigned char *s, size_t n)
{
        while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == 0))
                n--;
        return strndup((const char *)s, n);
}

bool hsm_token_has_mech(const hsm_token *t, CK_MECHANISM_TYPE m, CK_FLAGS need)
{
        for (CK_ULONG i = 0; i < t->n_mechs; i++)
                if (t->mechs[i] == m)
                        return (t->mech_info[i].flags & need) == need;
        return false;
}

static int load_mechanisms(hsm_token *t)
{
        CK_ULONG n = 0;
        CK_RV rv = P11(t->fl, C_GetMechanismList, t->slot, NULL, &n);
        if (rv != CKR_OK)
                return hsm_p11_errno(rv);
        /* One more than asked for: p11-kit-client.so before 0.25 reads one
         * past the list when it leaves out mechanisms it cannot forward
         * (p11-kit PR #456). */
        t->mechs = calloc(n + 1, sizeof(*t->mechs));
        t->mech_info = calloc(n ? n : 1, sizeof(*t->mech_info));
        if (!t->mechs || !t->mech_info)
                return -ENOMEM;
        rv = P11(t->fl, C_GetMechanismList, t->slot, t->mechs, &n);
        if (rv != CKR_OK)
                return hsm_p11_errno(rv);
        t->n_mechs = n;
        for (CK_ULONG i = 0; i < n; i++)
                if (P11(t->fl, C_GetMechanismInfo, t->slot, t->mechs[i], &t->mech_info[i]) != CKR_OK)
                        t->mech_info[i].flags = 0;
        return 0;
}

/* Where a token was found. */
struct slot_match {
        CK_FUNCTION_LIST *fl;
        CK_SLOT_ID slot;
        CK_FLAGS token_flags;
        char *label;
        unsigned max_sessions;
        CK_UTF8CHAR serial[16], manufacturer[32], model[16];
};

/* Whether the token with this identity (CK_TOKEN_INFO's fields) is the one
 * t first opened: the same serial number, manufacturer and model. 0, or
 * -EKEYREJECTED with *why saying what differs (these fields are no secret). */
static int same_token(const hsm_token *t, const CK_UTF8CHAR serial[16], const CK_UTF8CHAR manufacturer[32],
                      const CK_UTF8CHAR model[16], char **why)
{
        const char *what = NULL;
        const CK_UTF8CHAR *was = NULL, *is = NULL;
        size_t n = 0;
        if (memcmp(serial, t->serial, sizeof(t->serial)) != 0)
                what = "serial number", was = t->serial, is = serial, n = sizeof(t->serial);
        else if (memcmp(manufacturer, t->manufacturer, sizeof(t->manufacturer)) != 0)
                what = "manufacturer", was = t->manufacturer, is = manufacturer, n = sizeof(t->manufacturer);
        else if (memcmp(model, t->model, sizeof(t->model)) != 0)
                what = "model", was = t->model, is = model, n = sizeof(t->model);
        if (!what)
                return 0;
        char *a = trim_field(was, n), *b = trim_field(is, n);
        hsm_set_error(why, "a different token has the label '%s': %s '%s', not '%s' as when it was opened; no login to it",
                      t->label ? t->label : "", what, b ? b : "?", a ? a : "?");
        free(a);
        free(b);
        return -EKEYREJECTED;
}

/* Finds the one slot whose token matches the URI, across the modules. */
static int find_slot(hsm_token *t, P11KitUri *uri, struct slot_match *m, char **errmsg)
{
        CK_FUNCTION_LIST **mods = hsm_modules_list(t->modules);
        unsigned matches = 0;
        char *seen = NULL;

        for (size_t i = 0; mods[i]; i++) {
                CK_INFO minfo;
                if (P11(mods[i], C_GetInfo, &minfo) != CKR_OK || !p11_kit_uri_match_module_info(uri, &minfo))
                        continue;
                CK_ULONG n = 0;
                if (P11(mods[i], C_GetSlotList, CK_TRUE, NULL, &n) != CKR_OK || n == 0)
                        continue;
                CK_SLOT_ID *slots = calloc(n, sizeof(*slots));
                if (!slots)
                        return -ENOMEM;
                if (P11(mods[i], C_GetSlotList, CK_TRUE, slots, &n) != CKR_OK)
                        n = 0;
                for (CK_ULONG j = 0; j < n; j++) {
                        CK_SLOT_INFO sinfo;
                        CK_TOKEN_INFO tinfo;
                        if (P11(mods[i], C_GetSlotInfo, slots[j], &sinfo) != CKR_OK ||
                            !p11_kit_uri_match_slot_info(uri, &sinfo))
                                continue;
                        if (P11(mods[i], C_GetTokenInfo, slots[j], &tinfo) != CKR_OK ||
                            !p11_kit_uri_match_token_info(uri, &tinfo))
                                continue;
                        /* Uninitialized tokens are never what a URI means. */
                        if (!(tinfo.flags & CKF_TOKEN_INITIALIZED))
                                continue;
                        char *label = trim_field(tinfo.label, sizeof(tinfo.label));
                        if (matches++ == 0) {
                                m->fl = mods[i];
                                m->slot = slots[j];
                                m->token_flags = tinfo.flags;
                                free(m->label);
                                m->label = label ? strdup(label) : NULL;
                                memcpy(m->serial, tinfo.serialNumber, sizeof(m->serial));
                                memcpy(m->manufacturer, tinfo.manufacturerID, sizeof(m->manufacturer));
                                memcpy(m->model, tinfo.model, sizeof(m->model));
                                m->max_sessions = (unsigned)(tinfo.ulMaxSessionCount == CK_EFFECTIVELY_INFINITE ||
                                                                     tinfo.ulMaxSessionCount == CK_UNAVAILABLE_INFORMATION ||
                                                                     tinfo.ulMaxSessionCount > LIMIT_MAX_SESSIONS
                                                             ? 0 : tinfo.ulMaxSessionCount);
                        }
                        char *s2 = NULL;
                        if (asprintf(&s2, "%s%s'%s'", seen ? seen : "", seen ? ", " : "", label ? label : "") < 0)
                                s2 = NULL;
                        free(seen);
                        seen = s2;
                        free(label);
                }
                free(slots);
        }
        if (matches == 0) {
                hsm_set_error(errmsg, "no token matches %s (token not present, or its module is not loaded)", t->uri ? t->uri : t->name);
                free(seen);
                return -ENODEV;
        }
        if (matches > 1) {
                hsm_set_error(errmsg, "%u tokens match the URI of %s (%s); add token=/serial= to the URI", matches, t->name, seen ? seen : "");
                free(seen);
                return -ENOTUNIQ;
        }
        free(seen);
        return 0;
}

static void token_set_state(hsm_token *t, int state, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* The PIN each slot was last logged in to with by this process, as a keyed
 * hash (the PIN itself is never kept; the key is random, per process). A
 * token opened on a slot that the process is logged in to already (by
 * another [token] on it, or by the token a reload replaces) gets no
 * answer about its PIN from the token: its sessions are logged in at once
 * and C_Login answers CKR_USER_ALREADY_LOGGED_IN to any PIN. Its PIN is
 * compared with that one instead (check_pin_of_login). */
#define LOGINS_MAX 64
static pthread_mutex_t logins_lock = PTHREAD_MUTEX_INITIALIZER;
static struct {
        CK_FUNCTION_LIST *fl;
        CK_SLOT_ID slot;
        uint8_t mac[32];
} logins[LOGINS_MAX];
static unsigned n_logins;
static uint8_t logins_key[32];
static bool logins_keyed;

static int pin_mac(const char *pin, size_t len, uint8_t out[32])
{
        pthread_mutex_lock(&logins_lock);
        if (!logins_keyed && gnutls_rnd(GNUTLS_RND_KEY, logins_key, sizeof(logins_key)) == 0)
                logins_keyed = true;
        bool keyed = logins_keyed;
        pthread_mutex_unlock(&logins_lock);
        if (!keyed || gnutls_hmac_fast(GNUTLS_MAC_SHA256, logins_key, sizeof(logins_key), pin, len, out) < 0)
                return -EIO;
        return 0;
}

/* A C_Login of t with the PIN of mac answered CKR_OK. */
static void login_record(const hsm_token *t, const uint8_t mac[32])
{
        pthread_mutex_lock(&logins_lock);
        unsigned i = 0;
        while (i < n_logins && !(logins[i].fl == t->fl && logins[i].slot == t->slot))
                i++;
        if (i == n_logins && n_logins < LOGINS_MAX)
                n_logins++;
        if (i < n_logins) {
                logins[i].fl = t->fl;
                logins[i].slot = t->slot;
                memcpy(logins[i].mac, mac, 32);
        }
        pthread_mutex_unlock(&logins_lock);
}

/* 1: t's slot was logged in to with the PIN of mac; 0: with another; -1:
 * not known. */
static int login_same(const hsm_token *t, const uint8_t mac[32])
{
        int r = -1;
        pthread_mutex_lock(&logins_lock);
        for (unsigned i = 0; i < n_logins; i++)
                if (logins[i].fl == t->fl && logins[i].slot == t->slot)
                        r = gnutls_memcmp(logins[i].mac, mac, 32) == 0;
        pthread_mutex_unlock(&logins_lock);
        return r;
}

/* A token opened on a slot the process is logged in to already (no
 * C_Login of its own answered CKR_OK): its PIN source must give the PIN
 * of that login, else it would be accepted now and refused at the next
 * start. */
static int check_pin_of_login(hsm_token *t, char **errmsg)
{
        char *pin = NULL;
        size_t len = 0;
        const char *reason = NULL;
        uint8_t mac[32];
        int r = hsm_pin_source_read(t->pin, &pin, &len, &reason);
        if (r < 0) {
                hsm_set_error(errmsg, "cannot read the PIN of token %s from %s: %s", t->name, hsm_pin_source_describe(t->pin),
                        reason ? reason : strerror(-r));
                return r;
        }
        r = pin_mac(pin, len, mac);
        hsm_pin_free(pin, len);
        if (r == 0 && login_same(t, mac) == 0) {
                hsm_set_error(errmsg, "the PIN from %s is not the PIN this process is logged in to token %s with (a logged-in "
                              "token cannot check a PIN: C_Login answers CKR_USER_ALREADY_LOGGED_IN): it would fail at the next start",
                              hsm_pin_source_describe(t->pin), t->name);
                return -EKEYREJECTED;
        }
        return 0;
}

/* One C_Login with the PIN from the token's PIN source. *ret_rv is what the
 * token answered (CKR_FUNCTION_FAILED when no C_Login was made). */
static int do_login(hsm_token *t, CK_SESSION_HANDLE s, CK_USER_TYPE user, bool *refused, CK_RV *ret_rv, char **errmsg)
{
        char *pin = NULL;
        size_t len = 0;
        const char *reason = NULL;

        *ret_rv = CKR_FUNCTION_FAILED;
        if (!t->pin) {
                hsm_set_error(errmsg, "token %s needs a login but no PIN source is configured", t->name);
                return -EACCES;
        }
        int r = hsm_pin_source_read(t->pin, &pin, &len, &reason);
        if (r < 0) {
                hsm_set_error(errmsg, "cannot read the PIN of token %s from %s: %s", t->name, hsm_pin_source_describe(t->pin),
                        reason ? reason : strerror(-r));
                return r;
        }
        uint8_t mac[32];
        bool have_mac = user == CKU_USER && pin_mac(pin, len, mac) == 0;
        CK_RV rv = P11(t->fl, C_Login, s, user, (CK_UTF8CHAR_PTR)pin, (CK_ULONG)len);
        hsm_pin_free(pin, len);
        if (rv == CKR_OK && have_mac) {
                login_record(t, mac);
                t->login_checked = 1;
        }
        *ret_rv = rv;
        if (rv == CKR_USER_ALREADY_LOGGED_IN && user == CKU_USER)
                rv = *ret_rv = CKR_OK;
        if (rv == CKR_PIN_INCORRECT || rv == CKR_PIN_INVALID || rv == CKR_PIN_LEN_RANGE || rv == CKR_PIN_LOCKED ||
            rv == CKR_PIN_EXPIRED)
                *refused = true;
        if (rv != CKR_OK) {
                hsm_set_error(errmsg, "%slogin to token %s with the PIN from %s failed: %s%s",
                        user == CKU_CONTEXT_SPECIFIC ? "context-specific " : "", t->name, hsm_pin_source_describe(t->pin),
                        hsm_p11_rv_name(rv),
                        rv == CKR_PIN_INCORRECT ? " (wrong PIN; not retried, so that the token does not lock)" : "");
                return hsm_p11_errno(rv);
        }
        return 0;
}

int hsm_token_check_same(hsm_token *t, char **errmsg)
{
        CK_TOKEN_INFO ti;
        CK_RV trv = P11(t->fl, C_GetTokenInfo, t->slot, &ti);
        if (trv != CKR_OK) {
                hsm_set_error(errmsg, "token %s: C_GetTokenInfo answered %s; not used", t->name, hsm_p11_rv_name(trv));
                hsm_token_note(t, trv);
                return hsm_p11_errno(trv);
        }
        char *why = NULL;
        int other = same_token(t, ti.serialNumber, ti.manufacturerID, ti.model, &why);
        if (other < 0) {
                token_set_state(t, HSM_TOKEN_ABSENT, "%s", why ? why : "a different token");
                if (errmsg)
                        *errmsg = why;
                else
                        free(why);
        }
        return other;
}

/* Called with t->login_lock held. */
static int login_locked(hsm_token *t, CK_SESSION_HANDLE s, char **errmsg)
{
        if (t->login_failed) {
                hsm_set_error(errmsg, "token %s: an earlier login failed; not retrying", t->name);
                return -EACCES;
        }
        /* The PIN goes only to the token that was opened: a token in its
         * slot now (a swapped card) may be another one with its label. */
        int other = hsm_token_check_same(t, errmsg);
        if (other < 0)
                return other;
        bool refused = false;
        CK_RV rv;
        int r = do_login(t, s, CKU_USER, &refused, &rv, errmsg);
        if (refused) {
                t->login_failed = 1;
                t->login_failed_rv = rv;
                token_set_state(t, HSM_TOKEN_LOCKED, "C_Login answered %s; the PIN is not tried again", hsm_p11_rv_name(rv));
        }
        if (r >= 0) {
                pthread_mutex_lock(&t->lock);
                __atomic_add_fetch(&t->login_epoch, 1, __ATOMIC_RELEASE);
                t->stats.logins++;
                pthread_mutex_unlock(&t->lock);
        }
        return r;
}

static bool session_needs_login(hsm_token *t, CK_SESSION_HANDLE s)
{
        if (!(t->token_flags & CKF_LOGIN_REQUIRED) && !t->pin)
                return false;
        CK_SESSION_INFO info;
        if (P11(t->fl, C_GetSessionInfo, s, &info) != CKR_OK)
                return true;
        return info.state == CKS_RO_PUBLIC_SESSION || info.state == CKS_RW_PUBLIC_SESSION;
}

/* Opens a session and makes sure the token is logged in. */
static int open_session(hsm_token *t, CK_SESSION_HANDLE *ret, char **errmsg)
{
        CK_SESSION_HANDLE s;
        CK_RV rv = P11(t->fl, C_OpenSession, t->slot, CKF_SERIAL_SESSION, NULL, NULL, &s);
        if (rv != CKR_OK) {
                hsm_set_error(errmsg, "cannot open a session on token %s: %s", t->name, hsm_p11_rv_name(rv));
                hsm_token_note(t, rv);
                return hsm_p11_errno(rv);
        }
        /* Every new session is on the token that was opened (sessions are
         * opened at start, on growth and after a loss: rarely), logged in
         * or not: a session on another token could sign with its keys. */
        int r0 = hsm_token_check_same(t, errmsg);
        if (r0 < 0) {
                P11(t->fl, C_CloseSession, s);
                return r0;
        }
        if (session_needs_login(t, s)) {
                pthread_mutex_lock(&t->login_lock);
                int r = 0;
                /* Another thread may have logged in meanwhile. */
                if (session_needs_login(t, s))
                        r = login_locked(t, s, errmsg);
                pthread_mutex_unlock(&t->login_lock);
                if (r < 0) {
                        P11(t->fl, C_CloseSession, s);
                        return r;
                }
        }
        *ret = s;
        return 0;
}

static __thread hsm_token_watch *thread_watch;

void hsm_token_watch_thread(hsm_token_watch *w)
{
        thread_watch = w;
}

hsm_token_watch *hsm_token_current_watch(void)
{
        return thread_watch;
}

/* The thread is on token t from now (t != NULL) or no longer (NULL). */
static void watch_mark(hsm_token *t)
{
        hsm_token_watch *w = thread_watch;
        if (!w)
                return;
        if (t)
                __atomic_store_n(&w->since_ns, hsm_now_ns(), __ATOMIC_RELAXED);
        __atomic_store_n(&w->token, t, __ATOMIC_RELEASE);
}

int hsm_session_get(hsm_token *t, CK_SESSION_HANDLE *ret)
{
        /* The pool's condition variable runs on CLOCK_MONOTONIC, as the
         * caller's deadline does. */
        uint64_t until = thread_watch && thread_watch->deadline_ns
                                 ? thread_watch->deadline_ns
                                 : hsm_now_ns() + (uint64_t)SESSION_WAIT_SECONDS * 1000000000u;
        struct timespec deadline = { (time_t)(until / 1000000000u), (long)(until % 1000000000u) };

        pthread_mutex_lock(&t->lock);
        for (;;) {
                if (t->n_idle > 0) {
                        *ret = t->idle[--t->n_idle];
                        pthread_mutex_unlock(&t->lock);
                        watch_mark(t);
                        return 0;
                }
                if (t->n_open < t->max_sessions)
                        break;
                if (hsm_now_ns() >= until ||
                    pthread_cond_timedwait(&t->cond, &t->lock, &deadline) == ETIMEDOUT) {
                        pthread_mutex_unlock(&t->lock);
                        hsm_debug("token %s: no session free before the deadline", t->name);
                        return -ETIMEDOUT;
                }
        }
        t->n_open++;
        t->stats.sessions_opened++;
        pthread_mutex_unlock(&t->lock);

        watch_mark(t);
        char *err = NULL;
        int r = open_session(t, ret, &err);
        if (r < 0) {
                watch_mark(NULL);
                hsm_debug("%s", err ? err : "cannot open session");
                free(err);
                pthread_mutex_lock(&t->lock);
                t->n_open--;
                pthread_cond_signal(&t->cond);
                pthread_mutex_unlock(&t->lock);
        }
        return r;
}

void hsm_session_put(hsm_token *t, CK_SESSION_HANDLE s, int how)
{
        CK_SESSION_HANDLE *stale = NULL;
        unsigned n_stale = 0;
        bool successor = false;

        watch_mark(NULL);
        pthread_mutex_lock(&t->lock);
        if (how == HSM_SESSION_CLOSE) {
                t->stats.sessions_reopened++;
                /* Closing the application's last session would log the
                 * token out: open its successor first (it keeps s's place
                 * in the count), then close s. */
                if (t->n_open == 1)
                        successor = true;
                else
                        t->n_open--;
        } else if (how == HSM_SESSION_DROP_ALL) {
                /* What breaks one session (a token reset, C_CloseAllSessions,
                 * a removed token) breaks the idle ones too: drop them all, so
                 * that the retry gets a fresh session. */
                stale = malloc((t->n_idle + 1) * sizeof(*stale));
                if (stale) {
                        memcpy(stale, t->idle, t->n_idle * sizeof(*stale));
                        n_stale = t->n_idle;
                        t->n_open -= t->n_idle;
                        t->n_idle = 0;
                }
                t->n_open--;
                t->stats.sessions_reopened++;
        } else
                t->idle[t->n_idle++] = s;
        if (!successor)
                pthread_cond_broadcast(&t->cond);
        pthread_mutex_unlock(&t->lock);
        if (successor) {
                CK_SESSION_HANDLE s2;
                CK_RV rv = P11(t->fl, C_OpenSession, t->slot, CKF_SERIAL_SESSION, NULL, NULL, &s2);
                pthread_mutex_lock(&t->lock);
                if (rv == CKR_OK) {
                        t->idle[t->n_idle++] = s2;
                        t->stats.sessions_opened++;
                } else
                        t->n_open--;
                pthread_cond_broadcast(&t->cond);
                pthread_mutex_unlock(&t->lock);
        }
        if (how != HSM_SESSION_KEEP)
                P11(t->fl, C_CloseSession, s);
        for (unsigned i = 0; i < n_stale; i++)
                P11(t->fl, C_CloseSession, stale[i]);
        free(stale);
}

int hsm_token_relogin(hsm_token *t, CK_SESSION_HANDLE s)
{
        char *err = NULL;
        int r = 0;
        pthread_mutex_lock(&t->login_lock);
        if (session_needs_login(t, s))
                r = login_locked(t, s, &err);
        pthread_mutex_unlock(&t->login_lock);
        if (r < 0) {
                hsm_err("%s", err ? err : "login failed");
                free(err);
        }
        return r;
}

CK_RV hsm_token_context_login(hsm_token *t, CK_SESSION_HANDLE s)
{
        char *err = NULL;
        bool refused = false;
        CK_RV rv;
        int r;
        /* A PIN the token refused is not tried again, here either: each
         * try would count towards locking the token. */
        pthread_mutex_lock(&t->login_lock);
        if (t->login_failed) {
                rv = t->login_failed_rv;
                pthread_mutex_unlock(&t->login_lock);
                return rv;
        }
        r = do_login(t, s, CKU_CONTEXT_SPECIFIC, &refused, &rv, &err);
        if (refused) {
                t->login_failed = 1;
                t->login_failed_rv = rv;
                token_set_state(t, HSM_TOKEN_LOCKED, "context-specific C_Login answered %s; the PIN is not tried again",
                                hsm_p11_rv_name(rv));
        }
        pthread_mutex_unlock(&t->login_lock);
        if (r < 0) {
                hsm_err("%s", err ? err : "context-specific login failed");
                free(err);
                if (rv == CKR_OK)
                        rv = CKR_FUNCTION_FAILED;
        }
        return rv;
}

int hsm_token_uri_parse(const char *uri_str, const char *name, P11KitUri **ret, char **errmsg)
{
        P11KitUri *uri = p11_kit_uri_new();
        if (!uri)
                return -ENOMEM;
        int ur = p11_kit_uri_parse(uri_str, P11_KIT_URI_FOR_ANY, uri);
        if (ur != P11_KIT_URI_OK) {
                hsm_set_error(errmsg, "token %s: invalid pkcs11: URI: %s", name ? name : uri_str, p11_kit_uri_message(ur));
                p11_kit_uri_free(uri);
                return -EINVAL;
        }
        if (p11_kit_uri_get_pin_value(uri)) {
                hsm_set_error(errmsg, "token %s: pin-value= in a URI is refused (PINs do not belong in configuration); use a PIN file, pin-source=, an environment variable or a systemd credential",
                        name ? name : "?");
                p11_kit_uri_free(uri);
                return -EINVAL;
        }
        *ret = uri;
        return 0;
}

int hsm_token_open(const hsm_token_config *cfg, hsm_token **ret, char **errmsg)
{
        return hsm_token_open_same(cfg, NULL, ret, errmsg);
}

int hsm_token_open_same(const hsm_token_config *cfg, const hsm_token *same, hsm_token **ret, char **errmsg)
{
        P11KitUri *uri = NULL;
        hsm_token *t = NULL;
        int r;

        if (errmsg)
                *errmsg = NULL;
        if (!cfg->uri) {
                hsm_set_error(errmsg, "token %s: no URI", cfg->name ? cfg->name : "?");
                return -EINVAL;
        }
        r = hsm_token_uri_parse(cfg->uri, cfg->name, &uri, errmsg);
        if (r < 0)
                return r;

        t = calloc(1, sizeof(*t));
        if (!t) {
                r = -ENOMEM;
                goto out;
        }
        t->refs = 1;
        hsm_admit_init(t, 1);
        t->state = HSM_TOKEN_READY;
        pthread_mutex_init(&t->lock, NULL);
        pthread_mutex_init(&t->login_lock, NULL);
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&t->cond, &ca);
        pthread_condattr_destroy(&ca);
        t->name = strdup(cfg->name ? cfg->name : cfg->uri);
        t->uri = strdup(cfg->uri);

        const char *pin_spec = cfg->pin_source ? cfg->pin_source : p11_kit_uri_get_pin_source(uri);
        if (pin_spec && (r = hsm_pin_source_new(pin_spec, &t->pin)) < 0) {
                hsm_set_error(errmsg, "token %s: invalid PIN source (expected file:PATH, env:NAME or credential:NAME)", t->name);
                goto fail;
        }

        const char *module = cfg->module;
        if (!module)
                module = p11_kit_uri_get_module_path(uri);
        if (!module)
                module = p11_kit_uri_get_module_name(uri);
        r = hsm_modules_get(module, &t->modules, errmsg);
        if (r < 0)
                goto fail;
        struct slot_match m = { 0 };
        r = find_slot(t, uri, &m, errmsg);
        /* Before any session or login: the PIN is not given to another
         * token that has the label now. */
        if (r >= 0 && same)
                r = same_token(same, m.serial, m.manufacturer, m.model, errmsg);
        if (r < 0) {
                free(m.label);
                goto fail;
        }
        t->fl = m.fl;
        t->slot = m.slot;
        t->token_flags = m.token_flags;
        t->label = m.label;
        t->max_sessions = m.max_sessions;
        memcpy(t->serial, m.serial, sizeof(t->serial));
        memcpy(t->manufacturer, m.manufacturer, sizeof(t->manufacturer));
        memcpy(t->model, m.model, sizeof(t->model));
        t->gate = hsm_module_gate_for(t->fl);
        if (!t->gate) {
                r = -ENOMEM;
                goto fail;
        }
        t->module_gen = hsm_module_gate_generation(t->gate);
        if (cfg->max_sessions)
                t->max_sessions = cfg->max_sessions > LIMIT_MAX_SESSIONS ? LIMIT_MAX_SESSIONS : cfg->max_sessions;
        else if (t->max_sessions == 0)
                t->max_sessions = DEFAULT_MAX_SESSIONS;
        /* Operations at once adapt between 1 and the pool's size. */
        t->adm.max = t->max_sessions;
        t->adm.queue_max = 4 * t->max_sessions;
        t->idle = calloc(t->max_sessions, sizeof(*t->idle));
        if (!t->idle) {
                r = -ENOMEM;
                goto fail;
        }
        r = load_mechanisms(t);
        if (r < 0) {
                hsm_set_error(errmsg, "token %s: cannot list mechanisms", t->name);
                goto fail;
        }
        /* The first session does the one login; it stays in the pool. */
        CK_SESSION_HANDLE s;
        r = open_session(t, &s, errmsg);
        if (r < 0)
                goto fail;
        if (t->pin && !t->login_checked && (r = check_pin_of_login(t, errmsg)) < 0) {
                P11(t->fl, C_CloseSession, s);
                goto fail;
        }
        t->n_open = 1;
        t->stats.sessions_opened = 1;
        t->idle[t->n_idle++] = s;
        hsm_info("token %s: label '%s', %u sessions at most", t->name, t->label ? t->label : "", t->max_sessions);
        t->state = HSM_TOKEN_READY;
        snprintf(t->state_reason, sizeof(t->state_reason), "opened");
        t->state_since_ns = hsm_now_ns();
        t->p11uri = uri;
        uri = NULL;
        *ret = t;
        t = NULL;
        r = 0;
        goto out;
fail:
        hsm_token_unref(t);
out:
        p11_kit_uri_free(uri);
        return r;
}

hsm_token *hsm_token_ref(hsm_token *t)
{
        if (t)
                __atomic_add_fetch(&t->refs, 1, __ATOMIC_RELAXED);
        return t;
}

void hsm_token_unref(hsm_token *t)
{
        if (!t || __atomic_sub_fetch(&t->refs, 1, __ATOMIC_ACQ_REL) > 0)
                return;
        for (unsigned i = 0; i < t->n_idle; i++)
                P11(t->fl, C_CloseSession, t->idle[i]);
        hsm_modules_put(t->modules);
        hsm_pin_source_free(t->pin);
        pthread_mutex_destroy(&t->lock);
        pthread_mutex_destroy(&t->login_lock);
        pthread_cond_destroy(&t->cond);
        hsm_admit_destroy(t);
        free(t->idle);
        free(t->keys);
        if (t->p11uri)
                p11_kit_uri_free(t->p11uri);
        free(t->mechs);
        free(t->mech_info);
        free(t->name);
        free(t->uri);
        free(t->label);
        free(t);
}

const char *hsm_token_name(const hsm_token *t) { return t->name; }
const char *hsm_token_label(const hsm_token *t) { return t->label ? t->label : ""; }
unsigned hsm_token_max_sessions(const hsm_token *t) { return t->max_sessions; }

unsigned hsm_token_open_sessions(const hsm_token *t)
{
        hsm_token *m = (hsm_token *)t;
        pthread_mutex_lock(&m->lock);
        unsigned n = m->n_open;
        pthread_mutex_unlock(&m->lock);
        return n;
}

void hsm_token_get_stats(hsm_token *t, hsm_token_stats *ret)
{
        pthread_mutex_lock(&t->lock);
        *ret = t->stats;
        pthread_mutex_unlock(&t->lock);
}

unsigned hsm_token_refs(const hsm_token *t) { return __atomic_load_n(&t->refs, __ATOMIC_ACQUIRE); }

unsigned hsm_token_close_sessions(hsm_token *t)
{
        pthread_mutex_lock(&t->lock);
        unsigned n = t->n_idle;
        CK_SESSION_HANDLE *v = n ? malloc(n * sizeof(*v)) : NULL;
        if (v) {
                memcpy(v, t->idle, n * sizeof(*v));
                t->n_open -= n;
                t->n_idle = 0;
        } else
                n = 0;
        pthread_mutex_unlock(&t->lock);
        for (unsigned i = 0; i < n; i++)
                P11(t->fl, C_CloseSession, v[i]);
        free(v);
        return n;
}

int hsm_token_drop_sessions(hsm_token *t)
{
        CK_RV rv = P11(t->fl, C_CloseAllSessions, t->slot);
        return hsm_p11_errno(rv);
}

/* ------------------------------------------------------------ state */

const char *hsm_token_state_name(enum hsm_token_state s)
{
        switch (s) {
        case HSM_TOKEN_READY: return "ready";
        case HSM_TOKEN_DEGRADED: return "degraded";
        case HSM_TOKEN_ABSENT: return "absent";
        case HSM_TOKEN_LOCKED: return "locked";
        case HSM_TOKEN_FAILED: return "failed";
        default: return "?";
        }
}

static int state_load(hsm_token *t)
{
        return __atomic_load_n(&t->state, __ATOMIC_ACQUIRE);
}

enum hsm_token_state hsm_token_state(hsm_token *t, char **ret_reason)
{
        pthread_mutex_lock(&t->lock);
        int st = t->state;
        if (ret_reason) {
                char *r = strdup(t->state_reason);
                if (r)
                        *ret_reason = r;
        }
        pthread_mutex_unlock(&t->lock);
        return (enum hsm_token_state)st;
}

/* Which changes are allowed: a locked token stays locked (its PIN is not
 * tried again); only the recovery makes an absent or failed token ready,
 * and a device error does not hide that it is absent or failed. */
static bool transition_ok(int from, int to)
{
        if (from == to || from == HSM_TOKEN_LOCKED)
                return false;
        switch (to) {
        case HSM_TOKEN_DEGRADED:
                return from == HSM_TOKEN_READY;
        case HSM_TOKEN_ABSENT:
                return from == HSM_TOKEN_READY || from == HSM_TOKEN_DEGRADED;
        default:
                return true;
        }
}

static void *recovery_main(void *p);

/* Starts the recovery thread unless it runs; t->lock held. It holds a
 * reference on the token while it runs. */
static void recovery_kick_locked(hsm_token *t)
{
        if (t->rec_running)
                return;
        pthread_attr_t attr;
        pthread_t th;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        __atomic_add_fetch(&t->refs, 1, __ATOMIC_RELAXED);
        int e = pthread_create(&th, &attr, recovery_main, t);
        pthread_attr_destroy(&attr);
        if (e == 0) {
                t->rec_running = true;
                return;
        }
        __atomic_sub_fetch(&t->refs, 1, __ATOMIC_RELAXED); /* the caller holds one: never the last */
        hsm_err("token %s: cannot start its recovery thread: %s", t->name, strerror(e));
}

/* Changes the state (if allowed) and logs the change once. Never called
 * with t->lock held. */
static void token_set_state(hsm_token *t, int state, const char *fmt, ...)
{
        char reason[sizeof(t->state_reason)];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(reason, sizeof(reason), fmt, ap);
        va_end(ap);

        pthread_mutex_lock(&t->lock);
        int from = t->state;
        if (!transition_ok(from, state)) {
                pthread_mutex_unlock(&t->lock);
                return;
        }
        uint64_t now = hsm_now_ns();
        __atomic_store_n(&t->state, state, __ATOMIC_RELEASE);
        memcpy(t->state_reason, reason, sizeof(reason));
        if (from == HSM_TOKEN_READY || from == HSM_TOKEN_DEGRADED || state == HSM_TOKEN_READY || state == HSM_TOKEN_DEGRADED)
                t->state_since_ns = now;
        t->ok_streak = 0;
        t->stats.state_changes++;
        if (state == HSM_TOKEN_ABSENT || state == HSM_TOKEN_FAILED)
                recovery_kick_locked(t);
        pthread_mutex_unlock(&t->lock);
        hsm_log(state == HSM_TOKEN_READY ? HSM_LOG_NOTICE : HSM_LOG_WARNING, "token %s: %s -> %s: %s", t->name,
                hsm_token_state_name(from), hsm_token_state_name(state), reason);
}

int hsm_token_enter(hsm_token *t)
{
        int st = state_load(t);
        int r = 0;
        if (st == HSM_TOKEN_ABSENT)
                r = -ENODEV;
        else if (st == HSM_TOKEN_FAILED)
                r = -EIO;
        else if (st == HSM_TOKEN_LOCKED)
                r = t->login_failed_rv == CKR_PIN_LOCKED ? -EPERM : -EACCES;
        else if (hsm_module_gate_tryenter(t->gate) < 0)
                r = -EIO; /* the module is being initialised again */
        if (r < 0) {
                pthread_mutex_lock(&t->lock);
                t->stats.fast_failures++;
                pthread_mutex_unlock(&t->lock);
                return r;
        }
        /* After a re-initialisation of the module (by another token's
         * recovery), the pool's sessions are gone: drop them without
         * closing (their handles may name new sessions now). */
        unsigned gen = hsm_module_gate_generation(t->gate);
        pthread_mutex_lock(&t->lock);
        if (t->module_gen != gen) {
                t->n_open -= t->n_idle;
                t->n_idle = 0;
                t->module_gen = gen;
                __atomic_add_fetch(&t->login_epoch, 1, __ATOMIC_RELEASE);
                pthread_cond_broadcast(&t->cond);
        }
        pthread_mutex_unlock(&t->lock);
        return 0;
}

void hsm_token_leave(hsm_token *t)
{
        hsm_module_gate_leave(t->gate);
}

void hsm_token_note(hsm_token *t, CK_RV rv)
{
        switch (rv) {
        case CKR_DEVICE_REMOVED:
        case CKR_TOKEN_NOT_PRESENT:
        case CKR_SLOT_ID_INVALID:
                token_set_state(t, HSM_TOKEN_ABSENT, "the token answered %s", hsm_p11_rv_name(rv));
                return;
        case CKR_CRYPTOKI_NOT_INITIALIZED:
                token_set_state(t, HSM_TOKEN_FAILED, "the module answered %s", hsm_p11_rv_name(rv));
                return;
        case CKR_GENERAL_ERROR:
        case CKR_DEVICE_ERROR: {
                /* A module that failed answers so to everything: ask it
                 * something harmless before calling it failed. A network
                 * HSM's client that lost its server does the same with
                 * CKR_DEVICE_ERROR (p11-kit-client.so: to every call, until
                 * C_Finalize and C_Initialize connect it again). */
                CK_TOKEN_INFO ti;
                CK_RV rv2 = P11(t->fl, C_GetTokenInfo, t->slot, &ti);
                if (rv2 == CKR_GENERAL_ERROR || rv2 == CKR_DEVICE_ERROR || rv2 == CKR_CRYPTOKI_NOT_INITIALIZED)
                        token_set_state(t, HSM_TOKEN_FAILED, "the module answered %s, and %s to C_GetTokenInfo",
                                        hsm_p11_rv_name(rv), hsm_p11_rv_name(rv2));
                else if (hsm_p11_action(rv2) == HSM_P11_TOKEN_GONE)
                        token_set_state(t, HSM_TOKEN_ABSENT, "the token answered %s, and %s to C_GetTokenInfo",
                                        hsm_p11_rv_name(rv), hsm_p11_rv_name(rv2));
                else
                        token_set_state(t, HSM_TOKEN_DEGRADED, "an operation failed with %s", hsm_p11_rv_name(rv));
                break;
        }
        case CKR_DEVICE_MEMORY:
        case CKR_FUNCTION_FAILED:
        case CKR_FUNCTION_CANCELED:
                token_set_state(t, HSM_TOKEN_DEGRADED, "an operation failed with %s", hsm_p11_rv_name(rv));
                break;
        default:
                return;
        }
        /* A device error while degraded starts the count of successes again. */
        pthread_mutex_lock(&t->lock);
        t->ok_streak = 0;
        pthread_mutex_unlock(&t->lock);
}

void hsm_token_note_ok(hsm_token *t)
{
        if (state_load(t) != HSM_TOKEN_DEGRADED)
                return;
        pthread_mutex_lock(&t->lock);
        bool back = ++t->ok_streak >= DEGRADED_OK_STREAK;
        pthread_mutex_unlock(&t->lock);
        if (back)
                token_set_state(t, HSM_TOKEN_READY, "%d operations in a row succeeded", DEGRADED_OK_STREAK);
}

int hsm_token_add_key(hsm_token *t, struct hsm_key *k)
{
        int r = 0;
        pthread_mutex_lock(&t->lock);
        if (t->n_keys == t->cap_keys) {
                unsigned cap = t->cap_keys ? t->cap_keys * 2 : 8;
                struct hsm_key **keys = realloc(t->keys, cap * sizeof(*keys));
                if (!keys) {
                        r = -ENOMEM;
                        goto out;
                }
                t->keys = keys;
                t->cap_keys = cap;
        }
        t->keys[t->n_keys++] = k;
out:
        pthread_mutex_unlock(&t->lock);
        return r;
}

void hsm_token_remove_key(hsm_token *t, struct hsm_key *k)
{
        pthread_mutex_lock(&t->lock);
        for (unsigned i = 0; i < t->n_keys; i++)
                if (t->keys[i] == k) {
                        t->keys[i] = t->keys[--t->n_keys];
                        break;
                }
        pthread_mutex_unlock(&t->lock);
}

/* ------------------------------------------------------------ recovery */

static void sleep_ms(unsigned ms)
{
        struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
                ;
}

/* Finds the token again by its URI, replaces the pool, logs in, looks the
 * keys up again and makes a test signature; then the token is ready. The
 * old sessions are closed unless the module was initialised again (then
 * they are gone and their handles may name new sessions). */
static int recover_token(hsm_token *t, char **why)
{
        struct slot_match m = { 0 };
        CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
        struct hsm_key **keys = NULL;
        unsigned n_keys = 0;
        int r;

        hsm_module_gate_enter(t->gate);
        r = find_slot(t, t->p11uri, &m, why);
        if (r < 0)
                goto out;
        if (m.fl != t->fl) {
                hsm_set_error(why, "a token matching the URI is back, but in another module");
                r = -ENODEV;
                goto out;
        }
        /* Before any login: the PIN is not given to another token. */
        if ((r = same_token(t, m.serial, m.manufacturer, m.model, why)) < 0)
                goto out;

        CK_SESSION_HANDLE *old = NULL;
        unsigned n_old = 0;
        pthread_mutex_lock(&t->lock);
        unsigned gen = hsm_module_gate_generation(t->gate);
        bool close_old = t->module_gen == gen;
        if (close_old && t->n_idle && (old = malloc(t->n_idle * sizeof(*old)))) {
                memcpy(old, t->idle, t->n_idle * sizeof(*old));
                n_old = t->n_idle;
        }
        t->n_open -= t->n_idle;
        t->n_idle = 0;
        t->module_gen = gen;
        t->slot = m.slot;
        t->token_flags = m.token_flags;
        free(t->label);
        t->label = m.label;
        m.label = NULL;
        /* Object handles from before may name other objects now. */
        __atomic_add_fetch(&t->login_epoch, 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&t->cond);
        pthread_mutex_unlock(&t->lock);
        for (unsigned i = 0; i < n_old; i++)
                P11(t->fl, C_CloseSession, old[i]);
        free(old);

        r = open_session(t, &s, why);
        if (r < 0)
                goto out;

        pthread_mutex_lock(&t->lock);
        keys = calloc(t->n_keys ? t->n_keys : 1, sizeof(*keys));
        for (unsigned i = 0; keys && i < t->n_keys; i++)
                if ((keys[n_keys] = hsm_key_tryref(t->keys[i])))
                        n_keys++;
        pthread_mutex_unlock(&t->lock);
        if (!keys) {
                r = -ENOMEM;
                goto out;
        }
        /* Each key must be the one it was (its public value), and one
         * signature must verify with its public key. */
        for (unsigned i = 0; i < n_keys && r >= 0; i++)
                if ((r = hsm_key_refind(keys[i], s)) == -EKEYREJECTED)
                        hsm_set_error(why, "key %s on the token with label '%s' is another key: its public key is not the one it had when it was opened (or could not be read then)",
                                      hsm_key_uri(keys[i]), t->label ? t->label : "");
                else if (r < 0)
                        hsm_set_error(why, "key %s not found on the token that came back: %s", hsm_key_uri(keys[i]),
                                      strerror(-r));
        /* Every key that can sign makes one test signature: a public key
         * object kept beside another private key verifies for no other key
         * (recoveries are rare). */
        char signed_by[256] = "";
        unsigned n_signed = 0;
        for (unsigned i = 0; i < n_keys && r >= 0; i++) {
                int sr = hsm_key_test_sign(keys[i], s);
                if (sr == -EOPNOTSUPP)
                        continue; /* a key that needs a context-specific login, or cannot sign */
                if (sr == -EBADMSG) {
                        hsm_set_error(why, "the test signature with key %s does not verify with its public key", hsm_key_uri(keys[i]));
                        r = -EKEYREJECTED;
                } else if (sr < 0) {
                        hsm_set_error(why, "the test signature with key %s failed: %s", hsm_key_uri(keys[i]), strerror(-sr));
                        r = sr;
                } else {
                        size_t off = strlen(signed_by);
                        const char *label = hsm_key_label(keys[i]);
                        if (off + 8 < sizeof(signed_by))
                                snprintf(signed_by + off, sizeof(signed_by) - off, "%s'%s'", n_signed ? ", " : "",
                                         label ? label : "");
                        n_signed++;
                }
        }
        if (r < 0)
                goto out;

        pthread_mutex_lock(&t->lock);
        if (t->n_open < t->max_sessions) {
                t->n_open++;
                t->idle[t->n_idle++] = s;
                t->stats.sessions_opened++;
                s = CK_INVALID_HANDLE;
        }
        uint64_t down_ms = (hsm_now_ns() - t->state_since_ns) / 1000000;
        t->stats.recoveries++;
        t->stats.last_recovery_ms = down_ms;
        pthread_cond_broadcast(&t->cond);
        pthread_mutex_unlock(&t->lock);
        token_set_state(t, HSM_TOKEN_READY,
                        "found again (slot %lu), %s, %u key%s looked up, %s%s; serial number and public keys as when opened; %.3f s after it stopped working",
                        (unsigned long)m.slot, t->pin ? "logged in" : "no login", n_keys, n_keys == 1 ? "" : "s",
                        n_signed == 0 ? "no key for a test signature" : n_signed == 1 ? "test signature made and verified with key "
                                                                                        : "test signatures made and verified with keys ",
                        signed_by, (double)down_ms / 1000.0);
        r = 0;
out:
        if (s != CK_INVALID_HANDLE)
                P11(t->fl, C_CloseSession, s);
        for (unsigned i = 0; i < n_keys; i++)
                hsm_key_unref(keys[i]);
        free(keys);
        hsm_module_gate_leave(t->gate);
        free(m.label);
        return r;
}

/* C_Finalize and C_Initialize of the token's module, once no thread is in
 * it; then the token is found again. */
static int recover_module(hsm_token *t, char **why)
{
        pthread_mutex_lock(&t->lock);
        unsigned seen = t->module_gen;
        pthread_mutex_unlock(&t->lock);
        CK_RV rv;
        int r = hsm_module_reinit(t->gate, seen, &rv);
        if (r < 0) {
                hsm_set_error(why, "C_Initialize of the module answered %s", hsm_p11_rv_name(rv));
                return r;
        }
        if (hsm_module_gate_generation(t->gate) != seen) {
                pthread_mutex_lock(&t->lock);
                t->stats.module_reinits++;
                pthread_mutex_unlock(&t->lock);
        }
        r = recover_token(t, why);
        if (r < 0) {
                /* Still failed after C_Initialize: the next attempt
                 * initialises the module again. A network HSM's client
                 * whose server is not back yet may initialise without a
                 * connection and list no slot until it is initialised again
                 * (p11-kit-client.so does). The sessions from before are
                 * gone: dropped without a close, as in hsm_token_enter(). */
                unsigned gen = hsm_module_gate_generation(t->gate);
                pthread_mutex_lock(&t->lock);
                if (t->module_gen != gen) {
                        t->n_open -= t->n_idle;
                        t->n_idle = 0;
                        t->module_gen = gen;
                }
                pthread_mutex_unlock(&t->lock);
        }
        return r;
}

/* The recovery found a token that is not this one (another serial, other
 * keys): it stays down, with that as its reason, logged once per reason. */
static void refused_note(hsm_token *t, const char *why)
{
        pthread_mutex_lock(&t->lock);
        bool changed = strncmp(t->state_reason, why, sizeof(t->state_reason) - 1) != 0;
        if (changed)
                snprintf(t->state_reason, sizeof(t->state_reason), "%s", why);
        pthread_mutex_unlock(&t->lock);
        if (changed)
                hsm_warn("token %s: still %s, refused: %s", t->name, hsm_token_state_name(state_load(t)), why);
}

static void *recovery_main(void *p)
{
        hsm_token *t = p;
        unsigned delay = RECOVERY_BACKOFF_MIN_MS;

        for (;;) {
                sleep_ms(delay);
                pthread_mutex_lock(&t->lock);
                int st = t->state;
                /* Nobody else holds the token: nobody needs it back. */
                bool alone = __atomic_load_n(&t->refs, __ATOMIC_ACQUIRE) == 1;
                if ((st != HSM_TOKEN_ABSENT && st != HSM_TOKEN_FAILED) || alone) {
                        t->rec_running = false;
                        pthread_mutex_unlock(&t->lock);
                        break;
                }
                t->stats.recovery_attempts++;
                pthread_mutex_unlock(&t->lock);

                char *why = NULL;
                int r = st == HSM_TOKEN_FAILED ? recover_module(t, &why) : recover_token(t, &why);
                if (r >= 0)
                        delay = 0;
                else if (r == -EKEYREJECTED && why)
                        refused_note(t, why);
                if (r < 0) {
                        hsm_debug("token %s: still %s: %s", t->name, hsm_token_state_name(st), why ? why : strerror(-r));
                        delay = delay == 0 ? RECOVERY_BACKOFF_MIN_MS
                                           : delay * 2 > RECOVERY_BACKOFF_MAX_MS ? RECOVERY_BACKOFF_MAX_MS : delay * 2;
                }
                free(why);
        }
        hsm_token_unref(t);
        return NULL;
}
