/* Reload (SIGHUP, systemctl reload): re-reads the configuration file,
 * builds everything new beside what serves (credentials with a test
 * signature per key, priorities, sockets bound, ticket keys), and commits
 * all of it or nothing, in one log line. The build runs on a thread of its
 * own, the commit on the main loop (below: "the reload's thread"); handshakes
 * in flight and established connections are never touched.
 *
 *   - a listener whose name, address and settings are unchanged is kept:
 *     new credentials through the swap (hsm_server_stage), the file's
 *     chains with state.db's bindings over them, as at start;
 *   - a listener whose settings changed is replaced: a new slot with the
 *     new settings takes the old socket over (same address: nothing is
 *     rebound, nothing in the backlog is lost; its socket options change
 *     at the commit); the old slot drains (its connections end at
 *     idle_timeout, or at drain_timeout once a later reload removes or
 *     replaces the name again);
 *   - a new listener binds (a bind failure refuses the whole reload);
 *   - a removed listener stops accepting and drains: its connections get
 *     drain_timeout to end (as at SIGTERM), then the I/O loops close them;
 *     its slot is freed when the last one is gone.
 * Tokens come first (hsm_keystore_tokens_stage: new and changed [token]s
 * opened beside the serving ones, committed or closed with the rest).
 * What cannot change without a restart (restart_only()) is refused. Each
 * step of the build that may wait on a token has the listener's
 * handshake_timeout as its deadline (test signatures on a thread of their
 * own, creds.c): a hung token refuses the reload and never holds the main
 * loop. Handshake counters belong to the names (hsm_server_hs_counters). */
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "admin.h"
#include "internal.h"
#include "log.h"
#include "notify.h"

static bool streq(const char *a, const char *b) { return a == b || (a && b && strcmp(a, b) == 0); }

static const char *addr_text(const hsm_addr *a) { return a->text; }

/* The first [global] or [admin] setting that differs, which a reload
 * cannot apply (threads are started, the state database and the admin API
 * are open). Returns false with why set. */
static bool restart_only(const hsm_conf *o, const hsm_conf *n, char *why, size_t len)
{
#define G(field, name)                                                                                                          \
        if (o->field != n->field) {                                                                                             \
                snprintf(why, len, "[global] %s changed: that needs a restart", name);                                         \
                return false;                                                                                           \
        }
        G(handshake_threads, "handshake_threads");
        G(io_threads, "io_threads");
        G(handshake_nice, "handshake_nice");
        G(max_waiting_handshakes, "max_waiting_handshakes");
        G(handshake_cpus, "handshake_cpus");
#undef G
        if (!streq(o->state_dir, n->state_dir)) {
                snprintf(why, len, "[global] state_dir changed: that needs a restart");
                return false;
        }
        /* The process runs as that user already (or as root): applied at start only. */
        if (!streq(o->user, n->user) || !streq(o->group, n->group)) {
                snprintf(why, len, "[global] %s changed: that needs a restart", !streq(o->user, n->user) ? "user" : "group");
                return false;
        }
        /* [token] sections: the token phase (hsm_keystore_tokens_stage). */
        const hsm_conf_admin *a = &o->admin, *b = &n->admin;
        bool same = a->enabled == b->enabled && streq(addr_text(&a->listen), addr_text(&b->listen)) &&
                    streq(a->tls_cert, b->tls_cert) && streq(a->tls_key, b->tls_key) && streq(a->client_ca, b->client_ca) &&
                    a->n_tokens == b->n_tokens && a->n_identities == b->n_identities &&
                    a->max_connections == b->max_connections && a->max_connections_per_ip == b->max_connections_per_ip &&
                    a->max_body == b->max_body && a->timeout_ms == b->timeout_ms && a->threads == b->threads;
        for (unsigned i = 0; same && i < a->n_tokens; i++)
                same = streq(a->tokens[i].name, b->tokens[i].name) && a->tokens[i].role == b->tokens[i].role &&
                       memcmp(a->tokens[i].sha256, b->tokens[i].sha256, 32) == 0;
        for (unsigned i = 0; same && i < a->n_identities; i++)
                same = streq(a->identities[i].subject, b->identities[i].subject) && a->identities[i].role == b->identities[i].role;
        if (!same) {
                snprintf(why, len, "the [admin] section changed: the admin API changes only at a restart");
                return false;
        }
        return true;
}

/* The first setting of a listener, other than its chains (cert, key,
 * ocsp_response), that differs; NULL when none does. */
static const char *listener_change(const hsm_conf_listener *a, const hsm_conf_listener *b)
{
        if (a->kind != b->kind) return "kind";
        if (!streq(a->listen.text, b->listen.text)) return "listen";
        if (!streq(a->backend.text, b->backend.text)) return a->kind == HSM_CONNECTOR ? "connect" : "backend";
        if (a->client_auth != b->client_auth) return "client_auth";
        if (!streq(a->client_ca, b->client_ca)) return "client_ca";
        if (a->proxy_protocol != b->proxy_protocol) return "proxy_protocol";
        if (!streq(a->server_name, b->server_name)) return "server_name";
        if (!streq(a->ca_file, b->ca_file)) return "ca_file";
        if (!streq(a->priority, b->priority)) return "priority";
        if (a->rsa_key_exchange != b->rsa_key_exchange) return "rsa_key_exchange";
        if (a->max_connections != b->max_connections) return "max_connections";
        if (a->handshake_timeout_ms != b->handshake_timeout_ms) return "handshake_timeout";
        if (a->idle_timeout_ms != b->idle_timeout_ms) return "idle_timeout";
        if (a->connect_timeout_ms != b->connect_timeout_ms) return "connect_timeout";
        if (a->session_tickets != b->session_tickets) return "session_tickets";
        if (a->session_cache != b->session_cache) return "session_cache";
        if (a->session_lifetime_ms != b->session_lifetime_ms) return "session_lifetime";
        if (!streq(a->ticket_key, b->ticket_key)) return "ticket_key";
        if (!streq(a->alpn, b->alpn)) return "alpn";
        return NULL;
}

static bool port_zero(const hsm_addr *a)
{
        if (a->ss.ss_family == AF_INET)
                return ((const struct sockaddr_in *)&a->ss)->sin_port == 0;
        if (a->ss.ss_family == AF_INET6)
                return ((const struct sockaddr_in6 *)&a->ss)->sin6_port == 0;
        return false;
}

enum action { KEEP, REPLACE, ADD };

struct step {
        const hsm_conf_listener *lc; /* in the new configuration */
        enum action action;
        struct listener *old;   /* KEEP: itself; REPLACE: the one of that name it replaces */
        struct listener *donor; /* REPLACE/ADD: whose socket it takes over, or NULL: binds */
        struct listener *slot;  /* REPLACE/ADD: the new slot */
        const hsm_conf_listener *slot_prev_conf;
        int slot_was_free;
        const char *why;        /* REPLACE: the setting that changed */
};

/* Appends to a log list ("a, b"). */
static void list_add(char *buf, size_t len, const char *item)
{
        size_t off = strlen(buf);
        if (off + 8 >= len)
                return;
        snprintf(buf + off, len - off, "%s%s", off ? ", " : "", item);
}

static bool all_synced(hsm_server *s, unsigned gen)
{
        for (unsigned i = 0; i < s->n_hs_threads; i++) {
                struct hs_slot *slot = &s->hs_slots[i];
                if (!__atomic_load_n(&slot->exited, __ATOMIC_ACQUIRE) &&
                    (int)(__atomic_load_n(&slot->synced_gen, __ATOMIC_ACQUIRE) - gen) < 0)
                        return false;
        }
        return true;
}

void hsm_reload_retire_tick(evutil_socket_t fd, short what, void *arg)
{
        hsm_server *s = arg;
        unsigned retiring = 0, n = __atomic_load_n(&s->n_listeners, __ATOMIC_ACQUIRE);
        uint64_t now = hsm_now_ns();
        for (unsigned i = 0; i < n; i++) {
                struct listener *l = &s->listeners[i];
                if (__atomic_load_n(&l->state, __ATOMIC_ACQUIRE) != LISTENER_RETIRING)
                        continue;
                /* The socket closes once no handshake thread polls it. */
                if (l->fd >= 0 && all_synced(s, l->retire_gen)) {
                        if (!l->fd_moved)
                                close(l->fd);
                        l->fd = -1;
                        l->fd_moved = 0;
                }
                unsigned active = __atomic_load_n(&l->active, __ATOMIC_ACQUIRE);
                if (l->fd < 0 && active == 0) {
                        hsm_notice("%s %s: removed by the reload: drained, closed", EP_KIND(l), l->conf->name);
                        hsm_listener_done(l);
                        __atomic_store_n(&l->state, LISTENER_FREE, __ATOMIC_RELEASE);
                        continue;
                }
                retiring++;
                if (active && now >= l->retire_deadline_ns) {
                        if (!__atomic_load_n(&l->kill_now, __ATOMIC_ACQUIRE))
                                hsm_notice("%s %s: removed by the reload: drain timeout: closing the %u connection%s still open",
                                           EP_KIND(l), l->conf->name, active, active == 1 ? "" : "s");
                        __atomic_store_n(&l->kill_now, 1, __ATOMIC_RELEASE);
                        /* Again at each tick: a handshake that ends now
                         * is handed to a loop after this look. */
                        for (unsigned j = 0; j < s->n_loops; j++)
                                hsm_ioloop_wake(&s->loops[j]);
                }
        }
        if (!retiring)
                event_del(s->ev_retire);
}

static void refuse(hsm_server *s, const char *path, const char *why)
{
        __atomic_add_fetch(&s->reloads_refused, 1, __ATOMIC_RELAXED);
        hsm_err("reload of %s refused, nothing changed (still serving the configuration loaded before): %s", path, why);
}

/* ------------------------------------------------ the build (its own thread) */

/* What a build made, for its commit (main loop) or its abort. */
struct build {
        unsigned n, n_old, next_new, n_keep;
        struct step *steps;
        hsm_listener_chains *kset;
        struct listener **removed; /* room for the commit's list */
        hsm_bindings_plan *plan;
        hsm_server_staged *st;
};

/* Undoes what build() made for slots and staged credentials (the tokens:
 * hsm_keystore_tokens_abort, after this). */
static void build_abort(struct build *b)
{
        for (unsigned i = 0; b->steps && i < b->n; i++)
                if (b->steps[i].slot) {
                        hsm_listener_abort(b->steps[i].slot, b->steps[i].donor);
                        b->steps[i].slot->conf = b->steps[i].slot_prev_conf;
                        b->steps[i].slot = NULL;
                }
        hsm_server_stage_abort(b->st);
        b->st = NULL;
}

static void build_free(struct build *b)
{
        hsm_bindings_plan_free(b->plan);
        free(b->steps);
        free(b->kset);
        free(b->removed);
        memset(b, 0, sizeof(*b));
}

/* Builds everything for nc beside what serves (on the reload's thread,
 * under the change lock, the tokens staged). On failure what it made is
 * undone. */
static int build(hsm_server *s, hsm_conf *nc, struct build *b, char **errmsg)
{
        int r = 0;
        unsigned n = nc->n_listeners, n_old = __atomic_load_n(&s->n_listeners, __ATOMIC_ACQUIRE);
        *b = (struct build){ .n = n, .n_old = n_old, .next_new = n_old };
        b->steps = calloc(n + 1, sizeof(*b->steps));
        b->kset = calloc(n + 1, sizeof(*b->kset));
        b->removed = calloc(n_old + 1, sizeof(*b->removed));
        struct step *steps = b->steps;
        if (!steps || !b->kset || !b->removed)
                return -ENOMEM;
        /* The file's chains with state.db's bindings over them, as at start. */
        r = hsm_bindings_plan_new(nc, s->store, &b->plan, errmsg);
        if (r < 0)
                return r;
        unsigned n_set = 0;
        const hsm_listener_chains *set = hsm_bindings_plan_set(b->plan, &n_set);

        /* What becomes of each listener of the file. */
        for (unsigned i = 0; i < n; i++) {
                struct step *sp = &steps[i];
                sp->lc = &nc->listeners[i];
                sp->old = hsm_find_listener(s, sp->lc->name);
                if (sp->old && !(sp->why = listener_change(sp->old->conf, sp->lc))) {
                        sp->action = KEEP;
                        b->kset[b->n_keep++] = set[i];
                } else
                        sp->action = sp->old ? REPLACE : ADD;
        }
        /* Which old sockets the new slots take over: the one of the
         * listener replaced at the same address, else (a fixed port or a
         * unix socket) any old one at that address that is not kept. */
        for (unsigned i = 0; i < n; i++) {
                struct step *sp = &steps[i];
                if (sp->action == KEEP)
                        continue;
                if (sp->old && streq(sp->old->conf->listen.text, sp->lc->listen.text))
                        sp->donor = sp->old;
                for (unsigned j = 0; !sp->donor && !port_zero(&sp->lc->listen) && j < n_old; j++) {
                        struct listener *o = &s->listeners[j];
                        if (__atomic_load_n(&o->state, __ATOMIC_ACQUIRE) != LISTENER_LIVE ||
                            !streq(o->conf->listen.text, sp->lc->listen.text))
                                continue;
                        bool taken = false;
                        for (unsigned k = 0; k < n; k++)
                                if (steps[k].donor == o || (steps[k].action == KEEP && steps[k].old == o))
                                        taken = true;
                        if (taken) {
                                hsm_set_error(errmsg, "%s:%d: [%s %s]: listen = %s is the address of %s %s already", nc->path,
                                              sp->lc->line, sp->lc->kind == HSM_CONNECTOR ? "connector" : "listener",
                                              sp->lc->name, sp->lc->listen.text, EP_KIND(o), o->conf->name);
                                return -EADDRINUSE;
                        }
                        sp->donor = o;
                }
        }
        /* Kept listeners: new credentials, staged (not served yet). */
        int bad_l = -1, bad_c = -1;
        r = hsm_server_stage(s, b->kset, b->n_keep, &b->st, &bad_l, &bad_c, errmsg);
        if (r < 0) {
                if (bad_l >= 0 && errmsg && *errmsg) {
                        char *e = *errmsg;
                        *errmsg = NULL;
                        hsm_set_error(errmsg, "listener %s: %s", b->kset[bad_l].listener, e);
                        free(e);
                }
                return r;
        }
        /* New and replaced listeners: a slot each, built whole. A slot
         * that is FREE stays so until the commit: only the main loop's
         * retire tick frees slots, and no one else touches a free one. */
        for (unsigned i = 0; i < n; i++) {
                struct step *sp = &steps[i];
                if (sp->action == KEEP)
                        continue;
                for (unsigned j = 0; !sp->slot && j < n_old; j++)
                        if (__atomic_load_n(&s->listeners[j].state, __ATOMIC_ACQUIRE) == LISTENER_FREE) {
                                bool taken = false;
                                for (unsigned k = 0; k < i; k++)
                                        taken |= steps[k].slot == &s->listeners[j];
                                if (!taken) {
                                        sp->slot = &s->listeners[j];
                                        sp->slot_was_free = 1;
                                }
                        }
                if (!sp->slot) {
                        if (b->next_new >= s->cap_listeners) {
                                hsm_set_error(errmsg, "%s:%d: [%s]: no room for another listener (%u slots; removed ones still "
                                              "draining hold theirs)", nc->path, sp->lc->line, sp->lc->name, s->cap_listeners);
                                build_abort(b);
                                return -ENOSPC;
                        }
                        sp->slot = &s->listeners[b->next_new++];
                }
                sp->slot_prev_conf = sp->slot->conf;
                hsm_creds *cr = NULL;
                int bad = -1;
                char *e = NULL;
                r = hsm_creds_build(s->ks, sp->lc, set[i].chains, set[i].n_chains, HSM_CREDS_TEST_SIGN | HSM_CREDS_LIVE, &cr, &bad,
                                    &e);
                if (r == 0 && (r = hsm_creds_set_trust(cr, nc, sp->lc, false, &e)) < 0)
                        hsm_creds_unref(cr);
                if (r < 0) { /* the messages of hsm_creds_build name the file and line, not the listener */
                        hsm_set_error(errmsg, "%s %s: %s", sp->lc->kind == HSM_CONNECTOR ? "connector" : "listener", sp->lc->name,
                                      e ? e : strerror(-r));
                        free(e);
                        sp->slot->conf = sp->slot_prev_conf;
                        sp->slot = NULL;
                        build_abort(b);
                        return r;
                }
                hsm_build_listener(sp->lc); /* its ticket_key is derived on its token */
                r = hsm_listener_setup(s, sp->slot, nc, sp->lc, cr, sp->donor, &e);
                hsm_build_listener(NULL);
                if (r < 0) {
                        *errmsg = e ? e : strdup(strerror(-r));
                        sp->slot->conf = sp->slot_prev_conf;
                        sp->slot = NULL;
                        build_abort(b);
                        return r;
                }
        }
        return 0;
}

/* Commits what build() made (main loop; nothing fails here). */
static void commit(hsm_server *s, hsm_conf *nc, struct build *b, char *summary, size_t summary_len)
{
        unsigned n = b->n, n_old = b->n_old, n_removed = 0;
        struct step *steps = b->steps;
        struct listener **removed = b->removed;
        /* Old listeners not kept: removed or replaced. */
        for (unsigned j = 0; j < n_old; j++) {
                struct listener *o = &s->listeners[j];
                if (__atomic_load_n(&o->state, __ATOMIC_ACQUIRE) != LISTENER_LIVE)
                        continue;
                bool kept = false;
                for (unsigned i = 0; i < n; i++)
                        kept |= steps[i].action == KEEP && steps[i].old == o;
                if (!kept)
                        removed[n_removed++] = o;
        }
        char kept_s[1024] = "", added_s[1024] = "", repl_s[1024] = "", removed_s[1024] = "";
        hsm_server_stage_commit(s, b->st);
        b->st = NULL;
        uint64_t now = hsm_now_ns();
        unsigned gen = __atomic_load_n(&s->listeners_gen, __ATOMIC_RELAXED) + 1;
        for (unsigned i = 0; i < n_removed; i++) {
                struct listener *o = removed[i];
                bool moved = false;
                for (unsigned k = 0; k < n; k++)
                        moved |= steps[k].slot && steps[k].donor == o;
                if (o->ev) {
                        event_free(o->ev);
                        o->ev = NULL;
                }
                o->fd_moved = moved;
                o->retire_gen = gen;
                bool replaced = false, same_socket = false;
                for (unsigned k = 0; k < n; k++)
                        if (steps[k].action == REPLACE && steps[k].old == o) {
                                replaced = true;
                                same_socket = steps[k].donor == o;
                        }
                /* Removed (or its address changed): drain_timeout, as at
                 * SIGTERM. New settings on the same socket: the listener
                 * goes on there, its connections end when they end
                 * (idle_timeout). */
                uint64_t drain_end = now + (uint64_t)nc->drain_timeout_ms * 1000000u;
                o->retire_deadline_ns = same_socket ? UINT64_MAX : drain_end;
                /* The slots an earlier reload replaced on their socket
                 * (UINT64_MAX above) drain with the name: now that it is
                 * removed or replaced again, they get drain_timeout too. */
                for (unsigned j = 0; j < n_old; j++) {
                        struct listener *d = &s->listeners[j];
                        if (d != o && __atomic_load_n(&d->state, __ATOMIC_ACQUIRE) == LISTENER_RETIRING &&
                            strcmp(d->conf->name, o->conf->name) == 0 && d->retire_deadline_ns > drain_end)
                                d->retire_deadline_ns = drain_end;
                }
                if (o->conf->kind == HSM_CONNECTOR && o->fd >= 0) { /* only the main loop accepts on it */
                        if (!moved)
                                close(o->fd);
                        o->fd = -1;
                        o->fd_moved = 0;
                }
                __atomic_store_n(&o->state, LISTENER_RETIRING, __ATOMIC_RELEASE);
                char item[200];
                snprintf(item, sizeof(item), "%s (%u open, draining)", o->conf->name, __atomic_load_n(&o->active, __ATOMIC_RELAXED));
                if (!replaced)
                        list_add(removed_s, sizeof(removed_s), item);
        }
        for (unsigned i = 0; i < n; i++) {
                struct step *sp = &steps[i];
                if (sp->action == KEEP) {
                        __atomic_store_n(&sp->old->conf, sp->lc, __ATOMIC_RELEASE); /* the same settings, new line numbers */
                        list_add(kept_s, sizeof(kept_s), sp->lc->name);
                        continue;
                }
                struct listener *l = sp->slot;
                sp->slot = NULL; /* serving now: no abort */
                l->fd_moved = 0; /* the donor's socket is this slot's now */
                if (sp->donor) /* its options change now, not while the build could still be refused */
                        hsm_listener_socket_options(l);
                if (s->store && hsm_store_track_listener(s->store, l->conf->name, l->hs) < 0)
                        hsm_warn("%s %s: its handshake totals are not written to the state database", EP_KIND(l), l->conf->name);
                __atomic_store_n(&l->kill_now, 0, __ATOMIC_RELAXED);
                __atomic_store_n(&l->state, LISTENER_LIVE, __ATOMIC_RELEASE);
                if (l->conf->kind == HSM_CONNECTOR && hsm_connector_start(s, l) < 0)
                        hsm_err("connector %s: cannot watch its socket", l->conf->name);
                hsm_listener_log_start(l);
                char item[200];
                if (sp->action == REPLACE) {
                        snprintf(item, sizeof(item), "%s (%s%s)", sp->lc->name, sp->why,
                                 sp->donor ? "; same socket" : "");
                        list_add(repl_s, sizeof(repl_s), item);
                } else
                        list_add(added_s, sizeof(added_s), sp->lc->name);
        }
        if (b->next_new > n_old)
                __atomic_store_n(&s->n_listeners, b->next_new, __ATOMIC_RELEASE);
        __atomic_store_n(&s->conf, nc, __ATOMIC_RELEASE);
        __atomic_store_n(&s->listeners_gen, gen, __ATOMIC_RELEASE);
        uint64_t one = 1;
        if (write(s->sync_efd, &one, sizeof(one)) < 0)
                hsm_warn("reload: cannot wake the handshake threads: %s", strerror(errno));
        if (n_removed && s->ev_retire) {
                struct timeval tv = { 0, 50000 };
                event_add(s->ev_retire, &tv);
        }
        snprintf(summary, summary_len, "kept with new credentials: %s; settings changed: %s; added: %s; removed: %s",
                 kept_s[0] ? kept_s : "none", repl_s[0] ? repl_s : "none", added_s[0] ? added_s : "none",
                 removed_s[0] ? removed_s : "none");
}

/* Listeners and connectors serving now (for STATUS=). */
static unsigned n_live(hsm_server *s)
{
        unsigned n = 0, nl = __atomic_load_n(&s->n_listeners, __ATOMIC_ACQUIRE);
        for (unsigned i = 0; i < nl; i++)
                n += __atomic_load_n(&s->listeners[i].state, __ATOMIC_ACQUIRE) == LISTENER_LIVE;
        return n;
}

/* ------------------------------------------------ the reload's thread and its deadline
 *
 * The main loop reads the file and checks what needs a restart, then the
 * build runs on a thread of its own (everything that may touch a token:
 * the change lock, which an admin API change inside a token may hold, the
 * tokens opened, keys looked up, public keys read, test signatures, ticket
 * keys derived) while the main loop goes on (signals, accepts, ClientHello
 * reads, parked handshakes, SIGTERM's drain). Each step of the build that
 * may wait on a token says what it does (hsm_build_step) and has a
 * deadline; the main loop checks it (ev_reload, every JOB_TICK_MS) and at
 * the deadline refuses the reload naming the step: the thread is left in
 * the call (a PKCS#11 call cannot be interrupted), holding the change
 * lock, and undoes what it built if the call ever returns; until then a
 * reload is refused at once. A build that returns is committed on the
 * main loop (the keystore's part with a try-lock, retried until the
 * deadline), while the thread waits and still holds the change lock, so
 * that no admin API change runs between the build and its commit. */

#define JOB_TICK_MS 50

enum { JOB_BUILDING, JOB_BUILT, JOB_FINISHED };
enum { DECIDE_NONE, DECIDE_COMMIT, DECIDE_DROP };

struct reload_job {
        hsm_server *s;
        hsm_conf *nc;
        const char *path;
        pthread_t thread;
        pthread_mutex_t lock;
        pthread_cond_t cond; /* the main loop decided */
        /* Under lock: */
        int state, decision;
        int abandoned;       /* refused by the main loop (deadline, SIGTERM): the thread undoes its build */
        char step[700];      /* what the build does now ("" between steps) */
        const char *step_why;
        unsigned step_ms;
        int step_listener;   /* its timeout is a listener's handshake_timeout */
        int step_self;       /* the thread gives up by itself at the deadline (a lock it waits for) */
        uint64_t step_deadline_ns; /* 0: in no step */
        uint64_t abandoned_ns;
        /* The thread's own until FINISHED, then the main loop's: */
        char ctx[200];       /* "listener www" while one is built */
        unsigned listener_ms, default_ms;
        hsm_token_watch watch;
        uint64_t started_ns, commit_deadline_ns;
        int r;
        char *err;
        struct build b;
        char tokens[2200];
};

static __thread struct reload_job *this_job; /* the reload's thread: its job */

static void step_set(struct reload_job *j, const char *what, const char *why, bool self)
{
        unsigned ms = j->listener_ms ? j->listener_ms : j->default_ms;
        uint64_t dl = hsm_now_ns() + (uint64_t)ms * 1000000u;
        pthread_mutex_lock(&j->lock);
        snprintf(j->step, sizeof(j->step), "%s%s%s", j->ctx, j->ctx[0] ? ": " : "", what);
        j->step_why = why;
        j->step_ms = ms;
        j->step_listener = j->listener_ms != 0;
        j->step_self = self;
        j->step_deadline_ns = dl;
        pthread_mutex_unlock(&j->lock);
        j->watch.deadline_ns = dl; /* read by the token layer on this thread only */
}

static void step_v(bool self, const char *fmt, va_list ap)
{
        char what[600];
        vsnprintf(what, sizeof(what), fmt, ap);
        step_set(this_job, what, "the token does not answer", self);
}

void hsm_build_step(const char *fmt, ...)
{
        if (!this_job)
                return;
        va_list ap;
        va_start(ap, fmt);
        step_v(false, fmt, ap);
        va_end(ap);
}

void hsm_build_step_bounded(const char *fmt, ...)
{
        if (!this_job)
                return;
        va_list ap;
        va_start(ap, fmt);
        step_v(true, fmt, ap);
        va_end(ap);
}

void hsm_build_step_end(void)
{
        struct reload_job *j = this_job;
        if (!j)
                return;
        pthread_mutex_lock(&j->lock);
        j->step[0] = 0;
        j->step_deadline_ns = 0;
        pthread_mutex_unlock(&j->lock);
        j->watch.deadline_ns = 0;
}

uint64_t hsm_build_deadline(void)
{
        return this_job ? this_job->watch.deadline_ns : 0;
}

void hsm_build_listener(const hsm_conf_listener *l)
{
        struct reload_job *j = this_job;
        if (!j)
                return;
        if (l)
                snprintf(j->ctx, sizeof(j->ctx), "%s %s", l->kind == HSM_CONNECTOR ? "connector" : "listener", l->name);
        else
                j->ctx[0] = 0;
        j->listener_ms = l ? l->handshake_timeout_ms : 0;
}

/* The refusal at the deadline of the step the build is in (under j->lock). */
static char *step_overrun(const struct reload_job *j)
{
        char *m = NULL;
        if (asprintf(&m, "%s did not finish within %.1f s (%s): %s%s", j->step, j->step_ms / 1000.0,
                     j->step_listener ? "the listener's handshake_timeout" : "the longest handshake_timeout of the new configuration",
                     j->step_why,
                     j->step_self ? "" : "; its thread is left in the call (nothing of this reload is applied if it returns)") < 0)
                m = NULL;
        return m;
}

static void job_wake(struct reload_job *j, unsigned ms)
{
        struct timeval tv = { (time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000 };
        event_add(j->s->ev_reload, &tv);
}

/* The change lock's holder, for an admin API change refused at its wait's
 * deadline (hsm_server_changes_lock_wait; under the server's holder_lock). */
static uint64_t job_describe(void *arg, char *buf, size_t len)
{
        struct reload_job *j = arg;
        uint64_t now = hsm_now_ns();
        pthread_mutex_lock(&j->lock);
        uint64_t since = j->step_deadline_ns - (uint64_t)j->step_ms * 1000000u;
        if (j->step_deadline_ns && j->step[0] && since <= now)
                snprintf(buf, len, "a reload's build (%s) has been in '%s' for %.1f s%s", j->path, j->step,
                         (double)(now - since) / 1e9, j->abandoned ? ", refused already, its thread left inside the call" : "");
        else {
                since = 0;
                snprintf(buf, len, "a reload's build (%s), started %.1f s ago", j->path, (double)(now - j->started_ns) / 1e9);
        }
        pthread_mutex_unlock(&j->lock);
        return since;
}

static void *job_thread(void *arg)
{
        struct reload_job *j = arg;
        hsm_server *s = j->s;
        this_job = j;
        hsm_token_watch_thread(&j->watch);
        bool locked = false;
        int r;
        /* The change lock: an admin API change may hold it (inside a
         * token that does not answer, too). */
        pthread_mutex_lock(&j->lock); /* hsm_reload() has filled it in */
        pthread_mutex_unlock(&j->lock);
        step_set(j, "waiting for the change lock", "an admin API change holds it (a token it waits on may not answer)", true);
        uint64_t dl = j->watch.deadline_ns;
        struct timespec ts = { (time_t)(dl / 1000000000u), (long)(dl % 1000000000u) };
        int e = pthread_mutex_clocklock(&s->change_lock, CLOCK_MONOTONIC, &ts);
        if (e != 0) {
                pthread_mutex_lock(&j->lock);
                j->err = step_overrun(j);
                pthread_mutex_unlock(&j->lock);
                hsm_build_step_end();
                r = -e;
                goto done;
        }
        locked = true;
        hsm_server_changes_holder(s, job_describe, j);
        hsm_build_step_end();
        /* Tokens first: new and changed ones opened beside the serving
         * ones; the listeners are built against them. */
        r = hsm_keystore_tokens_stage(s->ks, s->conf, j->nc, j->tokens, sizeof(j->tokens), &j->err);
        if (r == 0) {
                r = build(s, j->nc, &j->b, &j->err);
                if (r < 0)
                        hsm_keystore_tokens_abort(s->ks); /* after the credentials built on them are gone */
        }
        hsm_build_listener(NULL);
        hsm_build_step_end();
        if (r == 0) {
                pthread_mutex_lock(&j->lock);
                if (!j->abandoned) {
                        j->state = JOB_BUILT;
                        event_active(s->ev_reload, EV_TIMEOUT, 1);
                        while (j->decision == DECIDE_NONE)
                                pthread_cond_wait(&j->cond, &j->lock);
                }
                bool committed = j->decision == DECIDE_COMMIT;
                pthread_mutex_unlock(&j->lock);
                if (!committed) {
                        build_abort(&j->b);
                        hsm_keystore_tokens_abort(s->ks);
                }
        }
        build_free(&j->b);
done:
        if (locked) {
                hsm_server_changes_holder(s, NULL, NULL);
                pthread_mutex_unlock(&s->change_lock);
        }
        hsm_token_watch_thread(NULL);
        this_job = NULL;
        pthread_mutex_lock(&j->lock);
        if (j->abandoned)
                hsm_notice("reload of %s: the build refused %.1f s ago returned after %.1f s (%s); nothing of it was applied",
                           j->path, (double)(hsm_now_ns() - j->abandoned_ns) / 1e9,
                           (double)(hsm_now_ns() - j->started_ns) / 1e9, r == 0 ? "built" : "failed");
        j->r = r;
        j->state = JOB_FINISHED;
        event_active(s->ev_reload, EV_TIMEOUT, 1);
        pthread_mutex_unlock(&j->lock);
        return NULL;
}

static void job_free(struct reload_job *j)
{
        pthread_cond_destroy(&j->cond);
        pthread_mutex_destroy(&j->lock);
        free(j->err);
        hsm_conf_free(j->nc);
        free(j);
}

/* Main loop: the decision on a built reload (under j->lock). */
static void decide(struct reload_job *j, int d)
{
        j->decision = d;
        pthread_cond_signal(&j->cond);
}

/* Main loop: commits the built reload j (-EBUSY: the keystore is busy now). */
static int job_commit(hsm_server *s, struct reload_job *j)
{
        char summary[4200];
        int r = hsm_keystore_tokens_try_commit(s->ks, j->nc);
        if (r < 0)
                return r;
        hsm_conf *nc = j->nc;
        commit(s, nc, &j->b, summary, sizeof(summary));
        /* The admin API reads the new configuration before the next change
         * waiting on the lock (which the thread holds) looks a listener up. */
        if (s->on_reload)
                s->on_reload(s->on_reload_arg, s->conf);
        /* Kept to the end: listeners and the admin API point into it. */
        hsm_conf **v = realloc(s->reloaded, (s->n_reloaded + 1) * sizeof(*v));
        if (v) {
                s->reloaded = v;
                v[s->n_reloaded++] = nc;
        } /* else it leaks: it must outlive everything that points into it */
        j->nc = NULL;
        if (s->log_level_forced < 0)
                hsm_log_set_level(s->conf->log_level);
        __atomic_add_fetch(&s->reloads_ok, 1, __ATOMIC_RELAXED);
        hsm_notice("reload of %s committed: %s; %s", j->path, summary, j->tokens);
        hsm_keystore_reap(s->ks); /* a retired token nothing uses: closed now */
        hsm_notify_reloaded(true, n_live(s));
        return 0;
}

void hsm_reload_tick(evutil_socket_t fd, short what, void *arg)
{
        hsm_server *s = arg;
        struct reload_job *j = s->reload_job;
        if (!j)
                return;
        pthread_mutex_lock(&j->lock);
        if (j->state == JOB_FINISHED) {
                pthread_mutex_unlock(&j->lock);
                pthread_join(j->thread, NULL); /* it has nothing left to do */
                if (!j->abandoned && j->decision == DECIDE_NONE) { /* the build failed */
                        refuse(s, j->path, j->err ? j->err : strerror(-j->r));
                        hsm_notify_reloaded(false, n_live(s));
                }
                s->reload_job = NULL;
                job_free(j);
                if (s->reload_again && !s->draining) {
                        s->reload_again = 0;
                        hsm_reload(s);
                }
                return;
        }
        if (j->abandoned || j->decision != DECIDE_NONE) { /* its end activates the event */
                pthread_mutex_unlock(&j->lock);
                return;
        }
        uint64_t now = hsm_now_ns();
        if (j->state == JOB_BUILT) {
                pthread_mutex_unlock(&j->lock);
                if (j->commit_deadline_ns == 0)
                        j->commit_deadline_ns = now + (uint64_t)j->default_ms * 1000000u;
                int r = job_commit(s, j);
                if (r == -EBUSY && now < j->commit_deadline_ns) {
                        job_wake(j, 10);
                        return;
                }
                pthread_mutex_lock(&j->lock);
                decide(j, r == 0 ? DECIDE_COMMIT : DECIDE_DROP);
                pthread_mutex_unlock(&j->lock);
                if (r < 0) {
                        char why[300];
                        snprintf(why, sizeof(why), "the commit waited %.1f s for the keystore: a lookup of an admin API change "
                                 "holds it (its token may not answer)", j->default_ms / 1000.0);
                        refuse(s, j->path, why);
                        hsm_notify_reloaded(false, n_live(s));
                }
                return;
        }
        if (j->step_deadline_ns && !j->step_self && now >= j->step_deadline_ns) {
                char *why = step_overrun(j);
                j->abandoned = 1;
                j->abandoned_ns = now;
                pthread_mutex_unlock(&j->lock);
                refuse(s, j->path, why ? why : "a step of the build did not finish by its deadline");
                free(why);
                hsm_notify_reloaded(false, n_live(s));
                return;
        }
        pthread_mutex_unlock(&j->lock);
        job_wake(j, JOB_TICK_MS);
}

void hsm_reload_abandon(hsm_server *s, const char *why)
{
        struct reload_job *j = s->reload_job;
        s->reload_again = 0;
        if (!j)
                return;
        pthread_mutex_lock(&j->lock);
        bool over = j->abandoned || j->state == JOB_FINISHED || j->decision != DECIDE_NONE;
        if (!over) {
                j->abandoned = 1;
                j->abandoned_ns = hsm_now_ns();
                decide(j, DECIDE_DROP);
        }
        pthread_mutex_unlock(&j->lock);
        if (!over) {
                refuse(s, j->path, why);
                hsm_notify_reloaded(false, n_live(s));
        }
}

void hsm_reload_stop(hsm_server *s)
{
        struct reload_job *j = s->reload_job;
        if (!j)
                return;
        hsm_reload_abandon(s, "the daemon is stopping");
        /* A build that is not stuck undoes itself within moments. */
        bool done = false;
        for (int i = 0; i < 500 && !done; i++) {
                pthread_mutex_lock(&j->lock);
                done = j->state == JOB_FINISHED;
                pthread_mutex_unlock(&j->lock);
                if (!done) {
                        struct timespec ts = { 0, 2000000 };
                        nanosleep(&ts, NULL);
                }
        }
        if (done) {
                pthread_join(j->thread, NULL);
                s->reload_job = NULL;
                job_free(j);
                return;
        }
        pthread_mutex_lock(&j->lock);
        hsm_notice("the build of a reload is still inside a token call (%s): exiting without waiting for it",
                   j->step[0] ? j->step : "between steps");
        pthread_mutex_unlock(&j->lock);
        s->reload_left = 1;
}

void hsm_reload(hsm_server *s)
{
        const char *path = s->conf_path ? s->conf_path : s->conf->path;
        struct reload_job *j = s->reload_job;
        if (j) {
                pthread_mutex_lock(&j->lock);
                bool stuck = j->abandoned;
                char *why = NULL;
                if (stuck && asprintf(&why, "the build of an earlier reload, refused %.1f s ago, has not returned (%s): no reload "
                                      "until it does", (double)(hsm_now_ns() - j->abandoned_ns) / 1e9,
                                      j->step[0] ? j->step : "between steps") < 0)
                        why = NULL;
                pthread_mutex_unlock(&j->lock);
                if (!stuck) {
                        hsm_notice("SIGHUP: a reload of %s is being built: another one follows it", path);
                        s->reload_again = 1;
                        return;
                }
                hsm_notice("SIGHUP: reloading %s", path);
                hsm_notify_reloading();
                refuse(s, path, why ? why : "the build of an earlier reload has not returned");
                free(why);
                hsm_notify_reloaded(false, n_live(s));
                return;
        }
        hsm_conf *nc = NULL;
        char *err = NULL, why[600];
        hsm_notice("SIGHUP: reloading %s", path);
        hsm_notify_reloading();
        int r = hsm_conf_load(path, &nc, &err);
        if (r < 0) {
                refuse(s, path, err ? err : strerror(-r));
                goto fail;
        }
        if (!restart_only(s->conf, nc, why, sizeof(why))) {
                refuse(s, path, why);
                goto fail;
        }
        j = calloc(1, sizeof(*j));
        if (!j) {
                refuse(s, path, strerror(ENOMEM));
                goto fail;
        }
        j->s = s;
        j->nc = nc;
        j->path = path;
        j->started_ns = hsm_now_ns();
        /* Steps outside a listener's build: the longest handshake_timeout. */
        j->default_ms = 0;
        for (unsigned i = 0; i < nc->n_listeners; i++)
                if (nc->listeners[i].handshake_timeout_ms > j->default_ms)
                        j->default_ms = nc->listeners[i].handshake_timeout_ms;
        if (!j->default_ms)
                j->default_ms = 10000;
        pthread_mutex_init(&j->lock, NULL);
        pthread_cond_init(&j->cond, NULL);
        pthread_mutex_lock(&j->lock); /* the thread's first step waits for the fields above */
        int e = pthread_create(&j->thread, NULL, job_thread, j);
        if (e != 0) {
                pthread_mutex_unlock(&j->lock);
                j->nc = NULL;
                job_free(j);
                refuse(s, path, strerror(e));
                goto fail;
        }
        s->reload_job = j;
        pthread_mutex_unlock(&j->lock);
        job_wake(j, JOB_TICK_MS);
        return;
fail:
        hsm_notify_reloaded(false, n_live(s));
        free(err);
        hsm_conf_free(nc);
}
