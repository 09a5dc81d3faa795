/* The keystore: the configured tokens and every token key in use, for
 * lookups (credentials) and usage reports (SIGUSR1, the admin API, the
 * state database).
 *
 * Both lists only grow: their entries are allocated once and never move
 * or go away before hsm_keystore_free, and each count is published with a
 * release store after its entry is complete, so that other threads read
 * them with an acquire load and no lock (the admin API, the usage logs).
 * Writers (a lookup that adds a key, a reload's token phase) hold ks->lock.
 *
 * A reload changes tokens in three steps (reload.c, under the server's
 * change lock, so no other lookup runs meanwhile): hsm_keystore_tokens_stage
 * opens the new and changed [token]s beside the serving ones; while staged,
 * lookups see the new configuration's tokens (staged ones in place of the
 * ones they replace, removed ones gone) and keep the keys they find on a
 * staged token aside; then hsm_keystore_tokens_try_commit publishes all of
 * it (from the main loop: it never waits for the lock) or
 * hsm_keystore_tokens_abort closes what was opened. On a reload's build
 * thread every lookup is a step with a deadline (hsm_build_step), and so
 * is the wait for the lock (ks_lock).
 *
 * A token replaced or removed is retired: lookups and the admin API no
 * longer see it, the keys on it stay (usage reports, handshakes in flight
 * hold references), and once no credentials use any of its keys any more
 * (hsm_keystore_reap, from the main loop) its sessions are closed. Its
 * memory is kept until exit: readers without a lock may still hold a
 * pointer to it. */
#include "creds.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "keyadmin.h"
#include "log.h"

#define KS_MAX_TOKENS 256
#define KS_MAX_KEYS 4096
#define KS_MAX_PENDING 256

enum { SLOT_LIVE, SLOT_RETIRED };
enum { STAGE_NONE, STAGE_NEW, STAGE_REPLACE, STAGE_REMOVE };

struct ks_token {
        char *name;
        hsm_token *token;  /* atomic: a reload that changes the [token] puts the new one here */
        int state;         /* atomic: SLOT_LIVE, SLOT_RETIRED (removed by a reload) */
        /* A reload being built (under ks->lock): */
        int stage;
        hsm_token *staged; /* STAGE_NEW, STAGE_REPLACE: opened by it */
        int limits;        /* STAGE_NONE: concurrency_*, queue_limit or key_ops_per_second changed */
};

struct ks_key {
        char *uri;
        hsm_key *key;   /* atomic: a key looked up again on a token that replaced its own */
        unsigned token; /* index into tokens */
        int stale;      /* atomic: its key is on the token that a reload replaced; lookups pass it over */
};

/* A token (or key) out of service, kept until exit; closed: its sessions
 * were closed once nothing used it. */
struct ks_retired {
        hsm_token *token;
        char *why;
        int closed;
        int in_slot; /* removed: the slot's reference (the slot still points at it) */
};

struct hsm_keystore {
        pthread_mutex_t lock; /* writers */
        struct ks_token *tokens[KS_MAX_TOKENS];
        unsigned n_tokens; /* atomic (release after the entry is written) */
        struct ks_key *keys[KS_MAX_KEYS];
        unsigned n_keys; /* atomic */
        /* Called under lock for every key added (the state database tracks it). */
        void (*on_key)(void *arg, const char *token, hsm_key *k);
        void *on_key_arg;
        /* A reload being built: new slots (not published yet), keys found on staged tokens. */
        int staging;
        unsigned n_tokens_staged;
        struct ks_key pending[KS_MAX_PENDING];
        unsigned n_pending;
        /* Retired tokens and the keys that lost their entry to a new one. */
        struct ks_retired retired[KS_MAX_TOKENS];
        unsigned n_retired, n_open_retired; /* n_open_retired: atomic */
        hsm_key *old_keys[KS_MAX_KEYS];
        unsigned n_old_keys;
};

static unsigned load_acq(const unsigned *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

/* The writers' lock. A reload's build thread waits for it until its
 * step's deadline at most (a lookup of an admin API change may hold it
 * inside a token that does not answer): -ETIMEDOUT then. */
static int ks_lock(hsm_keystore *ks)
{
        uint64_t dl = hsm_build_deadline();
        if (!dl) {
                pthread_mutex_lock(&ks->lock);
                return 0;
        }
        struct timespec ts = { (time_t)(dl / 1000000000u), (long)(dl % 1000000000u) };
        return -pthread_mutex_clocklock(&ks->lock, CLOCK_MONOTONIC, &ts);
}

/* KS_MAX_KEYS, KS_MAX_PENDING */
const char hsm_keystore_full_msg[] = "the keystore is full (it keeps every key found since the start, 4096 at most, and "
                                     "256 found by one reload): a restart empties it";

static const char busy_msg[] = "the keystore stayed busy: a lookup of an admin API change holds it (its token may not answer)";

static hsm_token *slot_token(const struct ks_token *t) { return __atomic_load_n(&t->token, __ATOMIC_ACQUIRE); }

/* Sets the admission bounds of a [token] (reload: applied live). */
static void apply_admission(hsm_token *tok, const hsm_conf_token *t)
{
        /* At least one operation per core by default: the handshake threads'
         * CPU gate keeps an in-process token within the cores anyway. */
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        unsigned cap = hsm_token_max_sessions(tok);
        unsigned cmin = t->concurrency_min ? t->concurrency_min : (unsigned)(cores > 0 ? cores : 1);
        unsigned cmax = t->concurrency_max ? t->concurrency_max : cap;
        if (cmin > cmax)
                cmin = cmax;
        hsm_token_set_concurrency(tok, cmin, cmax, t->queue_limit ? t->queue_limit : 4 * cap, (int)t->key_ops_per_second);
}

/* same: the token a reload opens again on the same URI and module (the
 * token found must be that one), or NULL. */
static int open_token(const hsm_conf *c, const hsm_conf_token *t, const hsm_token *same, hsm_token **ret, char **errmsg)
{
        hsm_token_config tc = { .name = t->name, .uri = t->uri, .module = t->module, .pin_source = t->pin_source,
                                .max_sessions = t->max_sessions };
        char *e = NULL;
        hsm_build_step("token %s (%s:%d): opening it (module, slot, login)", t->name, c->path, t->line);
        int r = hsm_token_open_same(&tc, same, ret, &e);
        hsm_build_step_end();
        if (r < 0) {
                hsm_set_error(errmsg, "%s:%d: [token %s]: %s", c->path, t->line, t->name, e ? e : strerror(-r));
                free(e);
                return r;
        }
        apply_admission(*ret, t);
        return 0;
}

int hsm_keystore_open(const hsm_conf *c, hsm_keystore **ret, char **errmsg)
{
        if (c->n_tokens > KS_MAX_TOKENS) {
                hsm_set_error(errmsg, "%s: more than %u [token] sections", c->path, KS_MAX_TOKENS);
                return -E2BIG;
        }
        hsm_keystore *ks = calloc(1, sizeof(*ks));
        if (!ks)
                return -ENOMEM;
        pthread_mutex_init(&ks->lock, NULL);
        for (unsigned i = 0; i < c->n_tokens; i++) {
                struct ks_token *t = calloc(1, sizeof(*t));
                if (!t || !(t->name = strdup(c->tokens[i].name))) {
                        free(t);
                        hsm_keystore_free(ks);
                        return -ENOMEM;
                }
                int r = open_token(c, &c->tokens[i], NULL, &t->token, errmsg);
                if (r < 0) {
                        free(t->name);
                        free(t);
                        hsm_keystore_free(ks);
                        return r;
                }
                ks->tokens[ks->n_tokens++] = t;
        }
        *ret = ks;
        return 0;
}

void hsm_keystore_free(hsm_keystore *ks)
{
        if (!ks)
                return;
        hsm_keystore_tokens_abort(ks);
        for (unsigned i = 0; i < ks->n_keys; i++) {
                hsm_key_unref(ks->keys[i]->key);
                free(ks->keys[i]->uri);
                free(ks->keys[i]);
        }
        for (unsigned i = 0; i < ks->n_old_keys; i++)
                hsm_key_unref(ks->old_keys[i]);
        for (unsigned i = 0; i < ks->n_tokens; i++) {
                hsm_token_unref(ks->tokens[i]->token);
                free(ks->tokens[i]->name);
                free(ks->tokens[i]);
        }
        for (unsigned i = 0; i < ks->n_retired; i++) {
                if (!ks->retired[i].in_slot)
                        hsm_token_unref(ks->retired[i].token);
                free(ks->retired[i].why);
        }
        pthread_mutex_destroy(&ks->lock);
        free(ks);
}

unsigned hsm_keystore_n_keys(const hsm_keystore *ks) { return load_acq(&ks->n_keys); }
hsm_key *hsm_keystore_key(const hsm_keystore *ks, unsigned i)
{
        return __atomic_load_n(&ks->keys[i]->key, __ATOMIC_ACQUIRE);
}
const char *hsm_keystore_token_name(const hsm_keystore *ks, unsigned i)
{
        return ks->tokens[__atomic_load_n(&ks->keys[i]->token, __ATOMIC_ACQUIRE)]->name;
}

/* The configured tokens (admin API): retired ones are left out. */
unsigned hsm_keystore_n_tokens(const hsm_keystore *ks)
{
        if (!ks)
                return 0;
        unsigned n = load_acq(&ks->n_tokens), live = 0;
        for (unsigned i = 0; i < n; i++)
                live += __atomic_load_n(&ks->tokens[i]->state, __ATOMIC_ACQUIRE) == SLOT_LIVE;
        return live;
}

hsm_token *hsm_keystore_token(const hsm_keystore *ks, unsigned i)
{
        unsigned n = load_acq(&ks->n_tokens);
        for (unsigned j = 0; j < n; j++)
                if (__atomic_load_n(&ks->tokens[j]->state, __ATOMIC_ACQUIRE) == SLOT_LIVE && i-- == 0)
                        return slot_token(ks->tokens[j]);
        return NULL; /* a reload retired one meanwhile */
}

unsigned hsm_keystore_total_sessions(const hsm_keystore *ks)
{
        unsigned n = 0;
        for (unsigned i = 0; i < hsm_keystore_n_tokens(ks); i++) {
                hsm_token *t = hsm_keystore_token(ks, i);
                n += t ? hsm_token_max_sessions(t) : 0;
        }
        return n;
}

/* ------------------------------------------------------------ lookups (under lock) */

/* The token of slot i as lookups see it (NULL: not there for them). */
static hsm_token *lookup_token(const hsm_keystore *ks, unsigned i)
{
        const struct ks_token *t = ks->tokens[i];
        /* Retired (removed or replaced by an earlier reload): never found
         * again, also while a later reload stages (new slots are live). */
        if (t->state != SLOT_LIVE)
                return NULL;
        if (ks->staging) {
                if (t->stage == STAGE_REMOVE)
                        return NULL;
                if (t->staged)
                        return t->staged;
        }
        return t->token;
}

static unsigned lookup_n_tokens(const hsm_keystore *ks) { return ks->staging ? ks->n_tokens_staged : ks->n_tokens; }

/* Whether key entry e is one that lookups may hand out (not on a token
 * that is being replaced or removed, or retired). */
static bool entry_current(const hsm_keystore *ks, const struct ks_key *e)
{
        const struct ks_token *t = ks->tokens[e->token];
        if (ks->staging && t->stage != STAGE_NONE)
                return false;
        return t->state == SLOT_LIVE && !e->stale;
}

/* Adds key k (a reference, taken over) found on slot i under uri:
 * published at once, or kept aside while a reload is staged on a token it
 * opened. */
static int add_key(hsm_keystore *ks, unsigned slot, const char *uri, hsm_key *k)
{
        if (ks->staging && ks->tokens[slot]->staged) {
                char *u = ks->n_pending < KS_MAX_PENDING ? strdup(uri) : NULL;
                if (!u) {
                        hsm_key_unref(k);
                        return ks->n_pending < KS_MAX_PENDING ? -ENOMEM : -ENOSPC;
                }
                ks->pending[ks->n_pending++] = (struct ks_key){ .uri = u, .key = k, .token = slot };
                return 0;
        }
        /* An entry of this token name and URI whose key was on a token
         * that a reload replaced (or removed, and a later one added again):
         * the new key takes its place (one entry per token name and URI in
         * the reports). */
        for (unsigned i = 0; i < ks->n_keys; i++) {
                struct ks_key *e = ks->keys[i];
                const struct ks_token *o = ks->tokens[e->token];
                bool same = e->token == slot ? e->stale : o->state == SLOT_RETIRED && strcmp(o->name, ks->tokens[slot]->name) == 0;
                if (same && strcmp(e->uri, uri) == 0) {
                        if (ks->n_old_keys >= KS_MAX_KEYS) {
                                hsm_key_unref(k);
                                return -ENOSPC;
                        }
                        ks->old_keys[ks->n_old_keys++] = e->key;
                        __atomic_store_n(&e->key, k, __ATOMIC_RELEASE);
                        __atomic_store_n(&e->token, slot, __ATOMIC_RELEASE); /* a token removed and added again */
                        __atomic_store_n(&e->stale, 0, __ATOMIC_RELEASE);
                        if (ks->on_key)
                                ks->on_key(ks->on_key_arg, ks->tokens[slot]->name, k);
                        return 0;
                }
        }
        if (ks->n_keys >= KS_MAX_KEYS) {
                hsm_warn("keystore: more than %u keys: key %s is not in the usage reports", KS_MAX_KEYS, uri);
                hsm_key_unref(k);
                return 0;
        }
        struct ks_key *e = calloc(1, sizeof(*e));
        if (!e || !(e->uri = strdup(uri))) {
                free(e);
                hsm_key_unref(k);
                return -ENOMEM;
        }
        e->key = k;
        e->token = slot;
        ks->keys[ks->n_keys] = e;
        __atomic_store_n(&ks->n_keys, ks->n_keys + 1, __ATOMIC_RELEASE);
        if (ks->on_key)
                ks->on_key(ks->on_key_arg, ks->tokens[slot]->name, k);
        return 0;
}

static int find_locked(hsm_keystore *ks, const char *uri, hsm_key **ret, char **errmsg)
{
        unsigned nk = ks->n_keys;
        for (unsigned i = 0; i < nk; i++)
                if (entry_current(ks, ks->keys[i]) && strcmp(ks->keys[i]->uri, uri) == 0) {
                        *ret = hsm_key_ref(ks->keys[i]->key);
                        return 0;
                }
        for (unsigned i = 0; ks->staging && i < ks->n_pending; i++)
                if (strcmp(ks->pending[i].uri, uri) == 0) {
                        *ret = hsm_key_ref(ks->pending[i].key);
                        return 0;
                }
        unsigned nt = lookup_n_tokens(ks), usable = 0;
        char *last = NULL;
        int r = -ENODEV;
        for (unsigned i = 0; i < nt; i++) {
                hsm_token *tok = lookup_token(ks, i);
                if (!tok)
                        continue;
                usable++;
                hsm_key *k = NULL;
                char *e = NULL;
                hsm_build_step("key %s on token %s: looking it up", uri, ks->tokens[i]->name);
                r = hsm_token_find_key(tok, uri, &k, &e);
                if (r == -ENODEV) { /* names another token */
                        free(e);
                        continue;
                }
                free(last);
                last = NULL;
                if (r < 0) {
                        last = e;
                        break;
                }
                free(e);
                r = add_key(ks, i, uri, hsm_key_ref(k));
                if (r < 0) {
                        hsm_key_unref(k);
                        if (r == -ENOSPC)
                                hsm_set_error(errmsg, "key %s on token %s was found, but %s", uri, ks->tokens[i]->name,
                                              hsm_keystore_full_msg);
                        return r;
                }
                *ret = k;
                return 0;
        }
        if (last) {
                *errmsg = last;
                return r;
        }
        /* A token that the reload being built removes: say so. */
        for (unsigned i = 0; ks->staging && i < nt; i++) {
                const struct ks_token *t = ks->tokens[i];
                hsm_key *k = NULL;
                char *e = NULL;
                if (t->stage == STAGE_REMOVE)
                        hsm_build_step("key %s on token %s (removed by the new configuration): looking it up", uri, t->name);
                if (t->stage == STAGE_REMOVE && hsm_token_find_key(t->token, uri, &k, &e) == 0) {
                        hsm_key_unref(k);
                        hsm_set_error(errmsg, "key %s is on token %s, which the new configuration removes", uri, t->name);
                        return -ENODEV;
                }
                free(e);
        }
        if (usable == 0)
                hsm_set_error(errmsg, "key %s is on a token, but no [token] section is configured", uri);
        else
                hsm_set_error(errmsg, "key %s: the URI matches none of the configured tokens", uri);
        return -ENODEV;
}

int hsm_keystore_find(hsm_keystore *ks, const char *uri, hsm_key **ret, char **errmsg)
{
        hsm_build_step("key %s: waiting for the keystore", uri);
        int r = ks_lock(ks);
        if (r < 0) {
                hsm_build_step_end();
                hsm_set_error(errmsg, "key %s: %s", uri, busy_msg);
                return r;
        }
        r = find_locked(ks, uri, ret, errmsg);
        pthread_mutex_unlock(&ks->lock);
        hsm_build_step_end();
        return r;
}

/* Whether key k (on slot i's token) is the one of crt: a step of a build. */
static bool matches(const hsm_keystore *ks, unsigned i, hsm_key *k, gnutls_x509_crt_t crt)
{
        hsm_build_step("key %s on token %s: reading its public key", hsm_key_label(k), ks->tokens[i]->name);
        return hsm_key_matches_certificate(k, crt) == 0;
}

int hsm_keystore_find_for_cert(hsm_keystore *ks, gnutls_x509_crt_t crt, hsm_key **ret)
{
        hsm_build_step("the key of a leaf certificate: waiting for the keystore");
        int r = ks_lock(ks);
        if (r < 0) {
                hsm_build_step_end();
                return r;
        }
        r = -ENOKEY;
        for (unsigned i = 0; i < ks->n_keys; i++)
                if (entry_current(ks, ks->keys[i]) && matches(ks, ks->keys[i]->token, ks->keys[i]->key, crt)) {
                        *ret = hsm_key_ref(ks->keys[i]->key);
                        r = 0;
                        goto out;
                }
        for (unsigned i = 0; ks->staging && i < ks->n_pending; i++)
                if (matches(ks, ks->pending[i].token, ks->pending[i].key, crt)) {
                        *ret = hsm_key_ref(ks->pending[i].key);
                        r = 0;
                        goto out;
                }
        unsigned nt = lookup_n_tokens(ks);
        for (unsigned i = 0; i < nt; i++) {
                hsm_token *tok = lookup_token(ks, i);
                hsm_key_entry *e = NULL;
                size_t n = 0;
                if (tok)
                        hsm_build_step("token %s: listing its keys", ks->tokens[i]->name);
                if (!tok || hsm_token_list_keys(tok, &e, &n) < 0)
                        continue;
                hsm_key *found = NULL;
                for (size_t j = 0; j < n && !found; j++)
                        if (matches(ks, i, e[j].key, crt))
                                found = hsm_key_ref(e[j].key);
                hsm_key_entries_free(e, n);
                if (found) {
                        /* In the usage reports under the token's own URI for it. */
                        r = add_key(ks, i, hsm_key_uri(found), hsm_key_ref(found));
                        if (r < 0) {
                                hsm_key_unref(found);
                                goto out;
                        }
                        *ret = found;
                        r = 0;
                        goto out;
                }
        }
out:
        pthread_mutex_unlock(&ks->lock);
        hsm_build_step_end();
        return r;
}

int hsm_keystore_derive_ticket_key(hsm_keystore *ks, const char *uri, const char *context, uint8_t *out, size_t len,
                                   const char **token_name, char **errmsg)
{
        hsm_build_step("ticket_key %s: waiting for the keystore", uri);
        int r = ks_lock(ks);
        if (r < 0) {
                hsm_build_step_end();
                hsm_set_error(errmsg, "ticket_key %s: %s", uri, busy_msg);
                return r;
        }
        r = -ENODEV;
        unsigned nt = lookup_n_tokens(ks);
        for (unsigned i = 0; i < nt; i++) {
                hsm_token *tok = lookup_token(ks, i);
                if (!tok)
                        continue;
                char *e = NULL;
                hsm_build_step("ticket_key %s on token %s: deriving the session ticket key", uri, ks->tokens[i]->name);
                r = hsm_token_derive_ticket_key(tok, uri, context, out, len, &e);
                if (r == -ENODEV) { /* names another token */
                        free(e);
                        continue;
                }
                if (r < 0)
                        hsm_set_error(errmsg, "%s", e ? e : strerror(-r));
                else
                        *token_name = ks->tokens[i]->name;
                free(e);
                pthread_mutex_unlock(&ks->lock);
                hsm_build_step_end();
                return r;
        }
        pthread_mutex_unlock(&ks->lock);
        hsm_build_step_end();
        hsm_set_error(errmsg, "ticket_key %s: no configured [token] matches the URI", uri);
        return r;
}

void hsm_keystore_on_key(hsm_keystore *ks, void (*cb)(void *arg, const char *token, hsm_key *k), void *arg)
{
        pthread_mutex_lock(&ks->lock);
        for (unsigned i = 0; cb && i < ks->n_keys; i++)
                cb(arg, ks->tokens[ks->keys[i]->token]->name, ks->keys[i]->key);
        ks->on_key = cb;
        ks->on_key_arg = arg;
        pthread_mutex_unlock(&ks->lock);
}

/* ------------------------------------------------------------ reload: the tokens */

static bool streq(const char *a, const char *b) { return a == b || (a && b && strcmp(a, b) == 0); }

static const hsm_conf_token *conf_token(const hsm_conf *c, const char *name)
{
        for (unsigned i = 0; i < c->n_tokens; i++)
                if (strcmp(c->tokens[i].name, name) == 0)
                        return &c->tokens[i];
        return NULL;
}

/* The first setting of a [token] that needs the token opened again, or NULL. */
static const char *token_change(const hsm_conf_token *a, const hsm_conf_token *b)
{
        if (!streq(a->uri, b->uri)) return "uri";
        if (!streq(a->module, b->module)) return "module";
        if (!streq(a->pin_source, b->pin_source)) return "pin_source";
        if (a->max_sessions != b->max_sessions) return "max_sessions";
        return NULL;
}

static void list_add(char *buf, size_t len, const char *item)
{
        size_t off = strlen(buf);
        if (off + 8 < len)
                snprintf(buf + off, len - off, "%s%s", off ? ", " : "", item);
}

int hsm_keystore_tokens_stage(hsm_keystore *ks, const hsm_conf *oc, const hsm_conf *nc, char *summary, size_t len,
                              char **errmsg)
{
        char added[512] = "", reopened[512] = "", removed[512] = "", limits[512] = "";
        hsm_build_step("the tokens of the new configuration: waiting for the keystore");
        int r = ks_lock(ks);
        hsm_build_step_end();
        if (r < 0) {
                hsm_set_error(errmsg, "%s", busy_msg);
                return r;
        }
        ks->staging = 1;
        ks->n_pending = 0;
        ks->n_tokens_staged = ks->n_tokens;
        for (unsigned i = 0; i < ks->n_tokens; i++) {
                struct ks_token *t = ks->tokens[i];
                t->stage = t->state == SLOT_LIVE && !conf_token(nc, t->name) ? STAGE_REMOVE : STAGE_NONE;
                t->staged = NULL;
                if (t->stage == STAGE_REMOVE)
                        list_add(removed, sizeof(removed), t->name);
        }
        for (unsigned j = 0; j < nc->n_tokens; j++) {
                const hsm_conf_token *n = &nc->tokens[j], *o = conf_token(oc, n->name);
                struct ks_token *slot = NULL;
                for (unsigned i = 0; i < ks->n_tokens && !slot; i++)
                        if (ks->tokens[i]->state == SLOT_LIVE && strcmp(ks->tokens[i]->name, n->name) == 0)
                                slot = ks->tokens[i];
                const char *why = slot && o ? token_change(o, n) : NULL;
                if (slot && o && !why) { /* kept: its sessions and login stay */
                        slot->limits = o->concurrency_min != n->concurrency_min || o->concurrency_max != n->concurrency_max ||
                                       o->queue_limit != n->queue_limit || o->key_ops_per_second != n->key_ops_per_second;
                        if (slot->limits)
                                list_add(limits, sizeof(limits), n->name);
                        continue;
                }
                if (!slot && ks->n_tokens_staged >= KS_MAX_TOKENS) {
                        hsm_set_error(errmsg, "%s:%d: [token %s]: no room for another token (%u, retired ones included)",
                                      nc->path, n->line, n->name, KS_MAX_TOKENS);
                        r = -ENOSPC;
                        goto fail;
                }
                hsm_token *tok = NULL;
                const hsm_token *same = slot && o && streq(o->uri, n->uri) && streq(o->module, n->module)
                                                ? __atomic_load_n(&slot->token, __ATOMIC_ACQUIRE) : NULL;
                r = open_token(nc, n, same, &tok, errmsg);
                if (r < 0)
                        goto fail;
                if (slot) {
                        slot->stage = STAGE_REPLACE;
                        slot->staged = tok;
                        char item[300];
                        snprintf(item, sizeof(item), "%s (%s)", n->name, why ? why : "settings");
                        list_add(reopened, sizeof(reopened), item);
                        continue;
                }
                struct ks_token *t = calloc(1, sizeof(*t));
                if (!t || !(t->name = strdup(n->name))) {
                        free(t);
                        hsm_token_unref(tok);
                        r = -ENOMEM;
                        goto fail;
                }
                t->stage = STAGE_NEW;
                t->staged = tok;
                ks->tokens[ks->n_tokens_staged++] = t;
                list_add(added, sizeof(added), n->name);
        }
        if (added[0] || reopened[0] || removed[0] || limits[0])
                snprintf(summary, len, "tokens added: %s; tokens opened again: %s; tokens removed: %s; token limits changed: %s",
                         added[0] ? added : "none", reopened[0] ? reopened : "none", removed[0] ? removed : "none",
                         limits[0] ? limits : "none");
        else
                snprintf(summary, len, "tokens unchanged");
        pthread_mutex_unlock(&ks->lock);
        return 0;
fail:
        pthread_mutex_unlock(&ks->lock);
        hsm_keystore_tokens_abort(ks);
        return r;
}

void hsm_keystore_tokens_abort(hsm_keystore *ks)
{
        pthread_mutex_lock(&ks->lock);
        if (!ks->staging) {
                pthread_mutex_unlock(&ks->lock);
                return;
        }
        for (unsigned i = 0; i < ks->n_pending; i++) {
                hsm_key_unref(ks->pending[i].key);
                free(ks->pending[i].uri);
        }
        ks->n_pending = 0;
        for (unsigned i = 0; i < ks->n_tokens_staged; i++) {
                struct ks_token *t = ks->tokens[i];
                if (t->staged)
                        hsm_notice("token %s: closed again (the reload that opened it was refused)", t->name);
                hsm_token_unref(t->staged); /* the last reference: the credentials built with it are gone */
                t->staged = NULL;
                t->stage = STAGE_NONE;
                t->limits = 0;
                if (i >= ks->n_tokens) {
                        free(t->name);
                        free(t);
                        ks->tokens[i] = NULL;
                }
        }
        ks->staging = 0;
        pthread_mutex_unlock(&ks->lock);
}

/* t: a reference, taken over (in_slot: the slot's, which stays there). */
static void retire(hsm_keystore *ks, hsm_token *t, const char *why, bool in_slot)
{
        if (ks->n_retired >= KS_MAX_TOKENS) { /* kept open to the end */
                hsm_warn("token %s: %s; too many retired tokens: it stays open until exit", hsm_token_name(t), why);
                if (!in_slot)
                        hsm_token_unref(t); /* the keys on it hold it */
                return;
        }
        ks->retired[ks->n_retired++] = (struct ks_retired){ .token = t, .why = strdup(why), .in_slot = in_slot };
        __atomic_add_fetch(&ks->n_open_retired, 1, __ATOMIC_RELEASE);
}

int hsm_keystore_tokens_try_commit(hsm_keystore *ks, const hsm_conf *nc)
{
        if (pthread_mutex_trylock(&ks->lock) != 0)
                return -EBUSY;
        for (unsigned i = 0; i < ks->n_tokens_staged; i++) {
                struct ks_token *t = ks->tokens[i];
                switch (t->stage) {
                case STAGE_REPLACE: {
                        hsm_token *old = t->token;
                        __atomic_store_n(&t->token, t->staged, __ATOMIC_RELEASE);
                        /* Its keys are looked up again on the new token. */
                        for (unsigned k = 0; k < ks->n_keys; k++)
                                if (ks->keys[k]->token == i)
                                        __atomic_store_n(&ks->keys[k]->stale, 1, __ATOMIC_RELEASE);
                        retire(ks, old, "replaced by a reload", false);
                        break;
                }
                case STAGE_NEW:
                        __atomic_store_n(&t->token, t->staged, __ATOMIC_RELEASE);
                        break;
                case STAGE_REMOVE:
                        /* The slot keeps pointing at it (the keys on it name it). */
                        __atomic_store_n(&t->state, SLOT_RETIRED, __ATOMIC_RELEASE);
                        retire(ks, t->token, "removed by a reload", true);
                        break;
                }
                t->staged = NULL;
                t->stage = STAGE_NONE;
        }
        __atomic_store_n(&ks->n_tokens, ks->n_tokens_staged, __ATOMIC_RELEASE);
        ks->staging = 0;
        /* The keys found on the new tokens: in place of their old entries, or added. */
        unsigned np = ks->n_pending;
        ks->n_pending = 0;
        for (unsigned i = 0; i < np; i++) {
                add_key(ks, ks->pending[i].token, ks->pending[i].uri, ks->pending[i].key);
                free(ks->pending[i].uri);
        }
        /* New admission bounds of kept tokens, live (opened ones have theirs). */
        for (unsigned i = 0; i < ks->n_tokens; i++) {
                const hsm_conf_token *c = conf_token(nc, ks->tokens[i]->name);
                if (c && ks->tokens[i]->limits && ks->tokens[i]->state == SLOT_LIVE)
                        apply_admission(ks->tokens[i]->token, c);
                ks->tokens[i]->limits = 0;
        }
        pthread_mutex_unlock(&ks->lock);
        return 0;
}

/* Whether nothing but the keystore holds retired token t or a key on it. */
static bool unused(const hsm_keystore *ks, hsm_token *t)
{
        unsigned ours = 1; /* the retired entry's reference */
        for (unsigned i = 0; i < ks->n_keys + ks->n_old_keys; i++) {
                hsm_key *k = i < ks->n_keys ? ks->keys[i]->key : ks->old_keys[i - ks->n_keys];
                if (hsm_key_token(k) != t)
                        continue;
                if (hsm_key_refs(k) != 1)
                        return false; /* credentials (handshakes, connections) use it */
                ours++;
        }
        /* A slot of a removed token points at it without a reference. */
        return hsm_token_refs(t) == ours;
}

void hsm_keystore_reap(hsm_keystore *ks)
{
        /* The main loop: never waits on a lookup (which may wait on a token). */
        if (!__atomic_load_n(&ks->n_open_retired, __ATOMIC_ACQUIRE) || pthread_mutex_trylock(&ks->lock) != 0)
                return;
        for (unsigned i = 0; i < ks->n_retired; i++) {
                struct ks_retired *r = &ks->retired[i];
                if (r->closed || !unused(ks, r->token))
                        continue;
                unsigned n = hsm_token_close_sessions(r->token);
                hsm_notice("token %s (%s): no handshake or connection uses its keys any more: closed (%u session%s)",
                           hsm_token_name(r->token), r->why ? r->why : "retired", n, n == 1 ? "" : "s");
                r->closed = 1;
                __atomic_sub_fetch(&ks->n_open_retired, 1, __ATOMIC_RELEASE);
        }
        pthread_mutex_unlock(&ks->lock);
}
