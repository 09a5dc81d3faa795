/* PKCS#11 modules, loaded through p11-kit once per process and shared. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <p11-kit/p11-kit.h>

#include "log.h"
#include "token-internal.h"

struct hsm_module_set {
        struct hsm_module_set *next;
        char *key;       /* "" = every registered module, a name, or a path */
        unsigned refs;
        CK_FUNCTION_LIST **all;  /* registered modules (p11_kit_modules_*) */
        CK_FUNCTION_LIST *single;  /* a module loaded by path */
        CK_FUNCTION_LIST *list[2]; /* for a single module */
        CK_FUNCTION_LIST **view;
};

static pthread_mutex_t modules_lock = PTHREAD_MUTEX_INITIALIZER;
static struct hsm_module_set *modules_head;
/* The registered modules are loaded once and shared by every set that needs them. */
static CK_FUNCTION_LIST **registered;
static unsigned registered_refs;

static CK_FUNCTION_LIST **registered_get(void)
{
        if (!registered) {
                registered = p11_kit_modules_load_and_initialize(0);
                if (!registered)
                        return NULL;
        }
        registered_refs++;
        return registered;
}

static void registered_put(void)
{
        if (registered && --registered_refs == 0) {
                p11_kit_modules_finalize_and_release(registered);
                registered = NULL;
        }
}

int hsm_modules_get(const char *module, hsm_module_set **ret, char **errmsg)
{
        const char *key = module ? module : "";
        int r = 0;

        pthread_mutex_lock(&modules_lock);
        for (hsm_module_set *s = modules_head; s; s = s->next)
                if (strcmp(s->key, key) == 0) {
                        s->refs++;
                        *ret = s;
                        goto out;
                }

        hsm_module_set *s = calloc(1, sizeof(*s));
        if (!s || !(s->key = strdup(key))) {
                free(s);
                r = -ENOMEM;
                goto out;
        }
        if (strchr(key, '/')) {
                s->single = p11_kit_module_load(key, 0);
                if (!s->single) {
                        if (errmsg && asprintf(errmsg, "cannot load PKCS#11 module %s: %s", key, p11_kit_message() ? p11_kit_message() : "unknown error") < 0)
                                *errmsg = NULL;
                        r = -ENOENT;
                        goto fail;
                }
                CK_RV rv = p11_kit_module_initialize(s->single);
                if (rv != CKR_OK) {
                        if (errmsg && asprintf(errmsg, "cannot initialize PKCS#11 module %s: %s", key, hsm_p11_rv_name(rv)) < 0)
                                *errmsg = NULL;
                        p11_kit_module_release(s->single);
                        r = -EIO;
                        goto fail;
                }
                s->list[0] = s->single;
                s->view = s->list;
        } else {
                s->all = registered_get();
                if (!s->all) {
                        if (errmsg && asprintf(errmsg, "cannot load the PKCS#11 modules registered with p11-kit: %s",
                                     p11_kit_message() ? p11_kit_message() : "unknown error") < 0)
                                *errmsg = NULL;
                        r = -EIO;
                        goto fail;
                }
                if (*key) {
                        CK_FUNCTION_LIST *m = p11_kit_module_for_name(s->all, key);
                        if (!m) {
                                if (errmsg && asprintf(errmsg, "no PKCS#11 module named '%s' is registered with p11-kit (see p11-kit list-modules)", key) < 0)
                                        *errmsg = NULL;
                                registered_put();
                                r = -ENOENT;
                                goto fail;
                        }
                        s->list[0] = m;
                        s->view = s->list;
                } else
                        s->view = s->all;
        }
        s->refs = 1;
        s->next = modules_head;
        modules_head = s;
        *ret = s;
        goto out;
fail:
        free(s->key);
        free(s);
out:
        pthread_mutex_unlock(&modules_lock);
        return r;
}

void hsm_modules_put(hsm_module_set *set)
{
        if (!set)
                return;
        pthread_mutex_lock(&modules_lock);
        if (--set->refs == 0) {
                for (hsm_module_set **p = &modules_head; *p; p = &(*p)->next)
                        if (*p == set) {
                                *p = set->next;
                                break;
                        }
                if (set->single) {
                        p11_kit_module_finalize(set->single);
                        p11_kit_module_release(set->single);
                }
                if (set->all)
                        registered_put();
                free(set->key);
                free(set);
        }
        pthread_mutex_unlock(&modules_lock);
}

CK_FUNCTION_LIST **hsm_modules_list(hsm_module_set *set)
{
        return set->view;
}

/* Gates: a reader/writer lock per module. Every operation on a token holds
 * its module's gate for reading (hsm_token_enter()); re-initialising a
 * failed module (C_Finalize, C_Initialize) holds it for writing, so that no
 * thread is inside the module then. A gate lives as long as the process
 * (there are as many as modules, a handful). */
struct hsm_module_gate {
        struct hsm_module_gate *next;
        CK_FUNCTION_LIST *fl;
        pthread_rwlock_t lock;
        unsigned generation; /* bumped by every re-initialisation (atomic) */
        uint64_t last_reinit_ns;
};

static pthread_mutex_t gates_lock = PTHREAD_MUTEX_INITIALIZER;
static struct hsm_module_gate *gates_head;

hsm_module_gate *hsm_module_gate_for(CK_FUNCTION_LIST *fl)
{
        struct hsm_module_gate *g;
        pthread_mutex_lock(&gates_lock);
        for (g = gates_head; g; g = g->next)
                if (g->fl == fl)
                        goto out;
        g = calloc(1, sizeof(*g));
        if (!g)
                goto out;
        pthread_rwlockattr_t attr;
        pthread_rwlockattr_init(&attr);
        /* A waiting re-initialisation must not starve behind new operations. */
        pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
        pthread_rwlock_init(&g->lock, &attr);
        pthread_rwlockattr_destroy(&attr);
        g->fl = fl;
        g->next = gates_head;
        gates_head = g;
out:
        pthread_mutex_unlock(&gates_lock);
        return g;
}

int hsm_module_gate_tryenter(hsm_module_gate *g)
{
        return pthread_rwlock_tryrdlock(&g->lock) == 0 ? 0 : -EBUSY;
}

void hsm_module_gate_enter(hsm_module_gate *g)
{
        pthread_rwlock_rdlock(&g->lock);
}

void hsm_module_gate_leave(hsm_module_gate *g)
{
        pthread_rwlock_unlock(&g->lock);
}

unsigned hsm_module_gate_generation(hsm_module_gate *g)
{
        return __atomic_load_n(&g->generation, __ATOMIC_ACQUIRE);
}

int hsm_module_reinit(hsm_module_gate *g, unsigned seen, CK_RV *ret_rv)
{
        int r = 0;
        *ret_rv = CKR_OK;
        pthread_rwlock_wrlock(&g->lock);
        if (__atomic_load_n(&g->generation, __ATOMIC_ACQUIRE) != seen)
                goto out; /* another token of this module did it meanwhile */
        CK_RV frv = p11_kit_module_finalize(g->fl);
        if (frv != CKR_OK)
                hsm_debug("PKCS#11 C_Finalize: %s", hsm_p11_rv_name(frv));
        CK_RV rv = p11_kit_module_initialize(g->fl);
        *ret_rv = rv;
        if (rv != CKR_OK) {
                hsm_debug("PKCS#11 C_Initialize: %s", hsm_p11_rv_name(rv));
                r = hsm_p11_errno(rv);
                goto out;
        }
        /* Every session of the module is gone, with its handles: tokens
         * see the new generation and drop their pools without closing. */
        __atomic_add_fetch(&g->generation, 1, __ATOMIC_RELEASE);
out:
        pthread_rwlock_unlock(&g->lock);
        return r;
}
