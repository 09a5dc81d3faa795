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
        unsigned login_epoch; /* bumped by every successful login */
        int login_failed;     /* a PIN was refused: never retried */
        pthread_mutex_t login_lock;

        hsm_token_stats stats;
};

/* Session pool. hsm_session_get() returns a logged-in session (when the
 * token needs a login); hsm_session_put() returns it to the pool
 * (HSM_SESSION_KEEP), closes it (HSM_SESSION_CLOSE: an operation may be
 * left active in it), or closes it and every idle session
 * (HSM_SESSION_DROP_ALL: the session or the device is gone, and what broke
 * one broke them all). */
enum { HSM_SESSION_KEEP = 0, HSM_SESSION_CLOSE = 1, HSM_SESSION_DROP_ALL = 2 };
int hsm_session_get(hsm_token *t, CK_SESSION_HANDLE *ret);
void hsm_session_put(hsm_token *t, CK_SESSION_HANDLE s, int broken);
/* After CKR_USER_NOT_LOGGED_IN on session s: log in again (once). */
int hsm_token_relogin(hsm_token *t, CK_SESSION_HANDLE s);
/* Context-specific login for keys with CKA_ALWAYS_AUTHENTICATE. */
int hsm_token_context_login(hsm_token *t, CK_SESSION_HANDLE s);
bool hsm_token_has_mech(const hsm_token *t, CK_MECHANISM_TYPE m, CK_FLAGS need);
