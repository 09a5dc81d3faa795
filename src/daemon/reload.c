/* Reload (SIGHUP, systemctl reload): re-reads the configuration file,
 * builds everything new beside what serves (credentials with a test
 * signature per key, priorities, sockets bound, ticket keys), and commits
 * all of it or nothing, in one log line. Runs on the main loop; handshakes
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
 * test signature has the listener's handshake_timeout as its deadline
 * (creds.c): a hung token refuses the reload instead of holding the main
 * loop. Handshake counters belong to the names (hsm_server_hs_counters). */
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

/* Builds everything for nc; commits it or changes nothing. Under the
 * change lock. */
static int build_and_commit(hsm_server *s, hsm_conf *nc, char *summary, size_t summary_len, char **errmsg)
{
        int r = 0;
        unsigned n = nc->n_listeners, n_old = __atomic_load_n(&s->n_listeners, __ATOMIC_ACQUIRE), next_new = n_old;
        struct step *steps = calloc(n + 1, sizeof(*steps));
        hsm_listener_chains *kset = calloc(n + 1, sizeof(*kset));
        struct listener **removed = calloc(n_old + 1, sizeof(*removed));
        unsigned n_keep = 0, n_removed = 0;
        hsm_bindings_plan *plan = NULL;
        hsm_server_staged *st = NULL;
        if (!steps || !kset || !removed) {
                r = -ENOMEM;
                goto out;
        }
        /* The file's chains with state.db's bindings over them, as at start. */
        r = hsm_bindings_plan_new(nc, s->store, &plan, errmsg);
        if (r < 0)
                goto out;
        unsigned n_set = 0;
        const hsm_listener_chains *set = hsm_bindings_plan_set(plan, &n_set);

        /* What becomes of each listener of the file. */
        for (unsigned i = 0; i < n; i++) {
                struct step *sp = &steps[i];
                sp->lc = &nc->listeners[i];
                sp->old = hsm_find_listener(s, sp->lc->name);
                if (sp->old && !(sp->why = listener_change(sp->old->conf, sp->lc))) {
                        sp->action = KEEP;
                        kset[n_keep++] = set[i];
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
                                r = -EADDRINUSE;
                                goto out;
                        }
                        sp->donor = o;
                }
        }
        /* Kept listeners: new credentials, staged (not served yet). */
        int bad_l = -1, bad_c = -1;
        r = hsm_server_stage(s, kset, n_keep, &st, &bad_l, &bad_c, errmsg);
        if (r < 0) {
                if (bad_l >= 0 && errmsg && *errmsg) {
                        char *e = *errmsg;
                        *errmsg = NULL;
                        hsm_set_error(errmsg, "listener %s: %s", kset[bad_l].listener, e);
                        free(e);
                }
                goto out;
        }
        /* New and replaced listeners: a slot each, built whole. */
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
                        if (next_new >= s->cap_listeners) {
                                hsm_set_error(errmsg, "%s:%d: [%s]: no room for another listener (%u slots; removed ones still "
                                              "draining hold theirs)", nc->path, sp->lc->line, sp->lc->name, s->cap_listeners);
                                r = -ENOSPC;
                                goto out;
                        }
                        sp->slot = &s->listeners[next_new++];
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
                        goto out;
                }
                r = hsm_listener_setup(s, sp->slot, nc, sp->lc, cr, sp->donor, &e);
                if (r < 0) {
                        *errmsg = e ? e : strdup(strerror(-r));
                        sp->slot->conf = sp->slot_prev_conf;
                        sp->slot = NULL;
                        goto out;
                }
        }
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

        /* ------------------------------------------------ commit: nothing fails from here */
        char kept_s[1024] = "", added_s[1024] = "", repl_s[1024] = "", removed_s[1024] = "";
        hsm_server_stage_commit(s, st);
        st = NULL;
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
        if (next_new > n_old)
                __atomic_store_n(&s->n_listeners, next_new, __ATOMIC_RELEASE);
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
        r = 0;
out:
        if (r < 0)
                for (unsigned i = 0; steps && i < n; i++)
                        if (steps[i].slot) {
                                hsm_listener_abort(steps[i].slot, steps[i].donor);
                                steps[i].slot->conf = steps[i].slot_prev_conf;
                        }
        hsm_server_stage_abort(st);
        hsm_bindings_plan_free(plan);
        free(steps);
        free(kset);
        free(removed);
        return r;
}

/* Listeners and connectors serving now (for STATUS=). */
static unsigned n_live(hsm_server *s)
{
        unsigned n = 0, nl = __atomic_load_n(&s->n_listeners, __ATOMIC_ACQUIRE);
        for (unsigned i = 0; i < nl; i++)
                n += __atomic_load_n(&s->listeners[i].state, __ATOMIC_ACQUIRE) == LISTENER_LIVE;
        return n;
}

void hsm_reload(hsm_server *s)
{
        const char *path = s->conf_path ? s->conf_path : s->conf->path;
        hsm_conf *nc = NULL;
        char *err = NULL, why[600], summary[4200], tokens[2200];
        bool ok = false;
        hsm_notice("SIGHUP: reloading %s", path);
        hsm_notify_reloading();
        int r = hsm_conf_load(path, &nc, &err);
        if (r < 0) {
                refuse(s, path, err ? err : strerror(-r));
                goto out;
        }
        if (!restart_only(s->conf, nc, why, sizeof(why))) {
                refuse(s, path, why);
                goto out;
        }
        hsm_server_changes_lock(s);
        /* Tokens first: new and changed ones opened beside the serving
         * ones; the listeners are built against them. */
        r = hsm_keystore_tokens_stage(s->ks, s->conf, nc, tokens, sizeof(tokens), &err);
        if (r == 0) {
                r = build_and_commit(s, nc, summary, sizeof(summary), &err);
                if (r < 0)
                        hsm_keystore_tokens_abort(s->ks); /* after the credentials built on them are gone */
                else
                        hsm_keystore_tokens_commit(s->ks, nc);
        }
        /* The admin API reads the new configuration before the next change
         * waiting on the lock looks a listener up. */
        if (r == 0 && s->on_reload)
                s->on_reload(s->on_reload_arg, s->conf);
        hsm_server_changes_unlock(s);
        if (r < 0) {
                refuse(s, path, err ? err : strerror(-r));
                goto out;
        }
        /* Kept to the end: listeners and the admin API point into it. */
        hsm_conf **v = realloc(s->reloaded, (s->n_reloaded + 1) * sizeof(*v));
        if (v) {
                s->reloaded = v;
                v[s->n_reloaded++] = nc;
        } /* else it leaks: it must outlive everything that points into it */
        nc = NULL;
        if (s->log_level_forced < 0)
                hsm_log_set_level(s->conf->log_level);
        __atomic_add_fetch(&s->reloads_ok, 1, __ATOMIC_RELAXED);
        hsm_notice("reload of %s committed: %s; %s", path, summary, tokens);
        hsm_keystore_reap(s->ks); /* a retired token nothing uses: closed now */
        ok = true;
out:
        hsm_notify_reloaded(ok, n_live(s));
        free(err);
        hsm_conf_free(nc);
}
