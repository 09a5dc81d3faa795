/* Private to the token layer (token.c, module.c, key.c). */
#pragma once

#include <pthread.h>
#include <p11-kit/pkcs11.h>

#include "pin.h"
#include "token.h"

/* Every C_* call goes through P11(): the function name and CK_RV are logged
 * at debug level when the call fails. */
CK_RV hsm_p11_trace(const char *fn, CK_RV rv);
#define P11(fl, fn, ...) hsm_p11_trace(#fn, (fl)->fn(__VA_ARGS__))
/* The one exception: a call whose CK_RV is itself a secret (C_Decrypt's
 * answer tells a good RSA padding from a bad one) is never traced. */
#define P11_SECRET(fl, fn, ...) ((fl)->fn(__VA_ARGS__))
const char *hsm_p11_rv_name(CK_RV rv);
/* CK_RV -> negative errno-style code. */
int hsm_p11_errno(CK_RV rv);

/* What a failed call means for the session pool: the one classification
 * of CK_RV that every operation uses (key.c's with_session()). Only a lost
 * session or login, or a token that is gone, acts on the pool; any other
 * failure fails that operation and keeps the session and the login. */
enum hsm_p11_action {
        HSM_P11_FAIL = 0,     /* fail the operation; keep the session (closed alone if an operation is left active) */
        HSM_P11_SESSION_LOST, /* CKR_SESSION_HANDLE_INVALID, _CLOSED: drop every session, reopen and log in, retry once */
        HSM_P11_LOGIN_LOST,   /* CKR_USER_NOT_LOGGED_IN: log in again, retry once */
        HSM_P11_TOKEN_GONE,   /* CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT: drop every session, fail */
        HSM_P11_STALE_HANDLE, /* CKR_KEY_HANDLE_INVALID, CKR_OBJECT_HANDLE_INVALID: look the object up again, retry once */
        HSM_P11_SESSION_BUSY, /* CKR_OPERATION_ACTIVE: the session has an operation we did not start or finish:
                               * close that session alone, retry once on another */
};
enum hsm_p11_action hsm_p11_action(CK_RV rv);

/* module.c: modules loaded through p11-kit, shared by all tokens. */
typedef struct hsm_module_set hsm_module_set;
int hsm_modules_get(const char *module, hsm_module_set **ret, char **errmsg);
void hsm_modules_put(hsm_module_set *set);
/* NULL-terminated list of initialized modules in the set. */
CK_FUNCTION_LIST **hsm_modules_list(hsm_module_set *set);

struct hsm_token {
        unsigned refs;
        char *name;
        char *uri;
        char *label;
        hsm_module_set *modules;
        CK_FUNCTION_LIST *fl;
        CK_SLOT_ID slot;
        CK_FLAGS token_flags;
        hsm_pin_source *pin;

        CK_MECHANISM_TYPE *mechs;
        CK_MECHANISM_INFO *mech_info;
        CK_ULONG n_mechs;

        pthread_mutex_t lock; /* guards the pool and the login state */
        pthread_cond_t cond;
        CK_SESSION_HANDLE *idle;
        unsigned n_idle, n_open, max_sessions;
        unsigned login_epoch; /* bumped by every successful login (atomic; written under lock):
                               * object handles found before it may name other objects now */
        int login_failed;     /* a PIN was refused: never retried */
        CK_RV login_failed_rv; /* what the token answered then */
        pthread_mutex_t login_lock;

        hsm_token_stats stats;
};

/* Session pool. hsm_session_get() returns a logged-in session (when the
 * token needs a login); hsm_session_put() returns it to the pool
 * (HSM_SESSION_KEEP), closes it alone (HSM_SESSION_CLOSE: an operation may
 * be left active in it; if it is the pool's last session a successor is
 * opened first, since closing the last session would end the login), or
 * closes it and every idle session (HSM_SESSION_DROP_ALL: the session, the
 * login or the device is gone, and what broke one broke them all). */
enum { HSM_SESSION_KEEP = 0, HSM_SESSION_CLOSE = 1, HSM_SESSION_DROP_ALL = 2 };
int hsm_session_get(hsm_token *t, CK_SESSION_HANDLE *ret);
void hsm_session_put(hsm_token *t, CK_SESSION_HANDLE s, int broken);
/* After CKR_USER_NOT_LOGGED_IN on session s: log in again (once). */
int hsm_token_relogin(hsm_token *t, CK_SESSION_HANDLE s);
/* Context-specific login for keys with CKA_ALWAYS_AUTHENTICATE: returns
 * what the token answered (CKR_OK, or the failing C_Login's CK_RV; after a
 * refused PIN, the CK_RV of that refusal without calling C_Login again;
 * CKR_FUNCTION_FAILED when the PIN cannot be read). */
CK_RV hsm_token_context_login(hsm_token *t, CK_SESSION_HANDLE s);
/* The current login epoch (see struct hsm_token). */
unsigned hsm_token_login_epoch(hsm_token *t);
bool hsm_token_has_mech(const hsm_token *t, CK_MECHANISM_TYPE m, CK_FLAGS need);
