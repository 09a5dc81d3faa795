/* Private to the token layer (token.c, module.c, key.c). */
#pragma once

#include <string.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
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
        HSM_P11_TOKEN_GONE,   /* CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT, CKR_SLOT_ID_INVALID: drop every session,
                               * fail; the token is absent until the recovery finds it again */
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

/* The gate of a module (module.c): held for reading by every operation,
 * for writing by a re-initialisation. hsm_module_gate_for() returns the
 * module's gate (made on first use, kept for the life of the process; NULL
 * without memory). hsm_module_reinit(): C_Finalize and C_Initialize once no
 * thread is inside the module, unless the gate's generation is no longer
 * seen (someone did it meanwhile); 0 or the C_Initialize failure. */
typedef struct hsm_module_gate hsm_module_gate;
hsm_module_gate *hsm_module_gate_for(CK_FUNCTION_LIST *fl);
int hsm_module_gate_tryenter(hsm_module_gate *g);
void hsm_module_gate_enter(hsm_module_gate *g);
void hsm_module_gate_leave(hsm_module_gate *g);
unsigned hsm_module_gate_generation(hsm_module_gate *g);
int hsm_module_reinit(hsm_module_gate *g, unsigned seen, CK_RV *ret_rv);

/* Admission of signatures and decryptions (admit.c): an adaptive limit of
 * operations in flight, a queue in deadline (else arrival) order, bounded,
 * and a per-key rate. Under lock. */
struct hsm_admit_waiter;
struct hsm_admission {
        pthread_mutex_t lock;
        unsigned limit, min, max, queue_max; /* limit: atomic reads */
        unsigned in_flight, queued;
        struct hsm_admit_waiter *head, *tail;
        unsigned key_rate;                   /* ops per second per key; 0: none (atomic reads) */
        /* The gradient: one window of samples at a time. */
        uint64_t win_start_ns, win_sum_ns;
        unsigned win_n;
        bool win_saturated;                  /* an operation had to wait in the window: there was more demand */
        double floor_ns, lat_ewma_ns, prev_tput;
        unsigned prev_limit;
        uint64_t last_log_ns;
        double cpu_ratio;                    /* thread CPU / wall time of an operation (EWMA): 1 = the token is CPU */
        double cpu_ns_ewma;                  /* thread CPU time of an operation (EWMA) */
        unsigned cpu_samples;
        uint64_t admitted, shed_queue_full, shed_deadline, rate_refused, limit_changes;
};
/* A granted turn: hsm_admit_enter() fills it, hsm_admit_leave() ends it. */
typedef struct hsm_admit_ticket {
        uint64_t start_ns, wall0_ns, cpu0_ns;
        bool off_cpu, sample;
} hsm_admit_ticket;
void hsm_admit_init(hsm_token *t, unsigned max_sessions);
void hsm_admit_destroy(hsm_token *t);
/* 0 (a turn: call hsm_admit_leave()), or -EBUSY / -ETIMEDOUT (shed, counted). */
int hsm_admit_enter(hsm_token *t, hsm_admit_ticket *tk);
void hsm_admit_leave(hsm_token *t, hsm_admit_ticket *tk);
/* A key's bucket for key_rate (key.c holds one per key). */
typedef struct hsm_rate_bucket {
        pthread_mutex_t lock;
        double tokens;
        uint64_t last_ns;
} hsm_rate_bucket;
/* 0: within the token's key rate; -EBUSY: over it (counted). */
int hsm_admit_rate(hsm_token *t, hsm_rate_bucket *b);
/* This thread's hsm_token_watch (token.c), or NULL. */
hsm_token_watch *hsm_token_current_watch(void);

struct hsm_token {
        struct hsm_admission adm;
        unsigned refs;
        char *name;
        char *uri;
        struct p11_kit_uri *p11uri; /* the parsed URI, to find the token again */
        char *label;
        hsm_module_set *modules;
        CK_FUNCTION_LIST *fl;
        CK_SLOT_ID slot;
        CK_FLAGS token_flags;
        hsm_pin_source *pin;
        /* The token's identity at the first open (CK_TOKEN_INFO, space
         * padded): a token found again is logged in to only if these are
         * the same (recover_token(), login_locked()). */
        CK_UTF8CHAR serial[16], manufacturer[32], model[16];

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
        int login_checked;    /* a C_Login of its own accepted its PIN (CKR_OK) */
        CK_RV login_failed_rv; /* what the token answered then */
        pthread_mutex_t login_lock;

        hsm_token_stats stats;

        /* State (enum hsm_token_state; atomic, written under lock) and recovery. */
        int state;
        char state_reason[256];    /* under lock */
        uint64_t state_since_ns;   /* under lock: when the state last changed */
        unsigned ok_streak;        /* under lock: operations in a row that succeeded while degraded */
        bool rec_running;          /* under lock: a recovery thread holds a reference and works */
        hsm_module_gate *gate;     /* the gate of fl's module */
        unsigned module_gen;       /* under lock: the gate generation the pool's sessions belong to */
        struct hsm_key **keys;     /* under lock: the token's live keys (no references) */
        unsigned n_keys, cap_keys;
};

/* URI handling (pure: no token needed; for tests and fuzzing).
 * hsm_token_uri_parse(): a token's URI, pin-value= refused.
 * hsm_key_uri_template(): a key's URI (pin-value= refused, type=private
 * only, object= or id= required) and the C_FindObjects template it gives,
 * CKA_CLASS included; free it with hsm_key_template_free(). */
int hsm_token_uri_parse(const char *uri_str, const char *name, struct p11_kit_uri **ret, char **errmsg);
int hsm_key_uri_template(const char *uri_str, struct p11_kit_uri **ret_uri, CK_ATTRIBUTE **ret_match, CK_ULONG *ret_n,
                         char **errmsg);
void hsm_key_template_free(CK_ATTRIBUTE *match, CK_ULONG n);

/* Token state and recovery (token.c). hsm_token_enter() admits an operation:
 * it fails at once (-ENODEV absent, -EIO failed, -EACCES/-EPERM locked)
 * unless the token is ready or degraded, and otherwise holds the module's
 * gate until hsm_token_leave(). hsm_token_note() classifies a failing CK_RV
 * (token gone, module failed, device error) and changes the state, starting
 * the recovery; hsm_token_note_ok() counts a success. */
int hsm_token_enter(hsm_token *t);
void hsm_token_leave(hsm_token *t);
void hsm_token_note(hsm_token *t, CK_RV rv);
/* Whether the token in t's slot now is the one t opened (its serial number,
 * manufacturer and model; one C_GetTokenInfo): 0; or -EKEYREJECTED, t is
 * absent from now (the recovery looks for it) and *errmsg says what
 * differs; or C_GetTokenInfo's failure, as an errno. */
int hsm_token_check_same(hsm_token *t, char **errmsg);
void hsm_token_note_ok(hsm_token *t);
/* Keys register with their token (for the recovery's lookup and test
 * signature); key.c. */
int hsm_token_add_key(hsm_token *t, struct hsm_key *k);
void hsm_token_remove_key(hsm_token *t, struct hsm_key *k);
/* key.c, for the recovery: a reference unless the key is being freed;
 * looking the key up again on s; one signature on s. */
struct hsm_key *hsm_key_tryref(struct hsm_key *k);
int hsm_key_refind(struct hsm_key *k, CK_SESSION_HANDLE s);
int hsm_key_test_sign(struct hsm_key *k, CK_SESSION_HANDLE s);

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

/* How much of a pkcs11: URI an error may show: up to its query or to a
 * "pin-" attribute, wherever one is (a PIN is never echoed). */
static inline int hsm_uri_shown_len(const char *uri)
{
        size_t n = strcspn(uri, "?");
        const char *p = strstr(uri, "pin-");
        if (p && (size_t)(p - uri) < n)
                n = (size_t)(p - uri);
        return (int)n;
}
