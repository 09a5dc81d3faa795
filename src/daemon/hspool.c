/* The handshake pool: threads that run TLS handshakes, each of which may
 * block on the token. Sized to the tokens' session pools, not to cores, so
 * that a slow token is kept busy; established connections never wait here.
 * Here: the handshake queue, the CPU gate in front of the steps
 * (handshake.c), the threads' accept and epoll loop, and the watchdog that
 * fails a handshake whose thread is stuck in a token call. */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "handshake.h"
#include "internal.h"
#include "log.h"

static bool cpu_full_locked(const hsm_server *s);
static void deferred_push_locked(hsm_server *s, struct conn *c, int cont);

void hsm_handshake_enqueue(hsm_server *s, struct conn *c)
{
        /* Every CPU slot taken: c joins the work deferred for the next free
         * slot, which the thread that ends its step takes itself. Waking an
         * idle thread now would only have it find no slot and sleep again
         * (a wake-up and an eventfd read and write per step for nothing). */
        if (s->cpu_slots) {
                pthread_mutex_lock(&s->cpu_lock);
                if (cpu_full_locked(s)) {
                        pthread_mutex_lock(&s->hs_lock);
                        s->hs_busy++; /* as queue_pop() counts it */
                        pthread_mutex_unlock(&s->hs_lock);
                        deferred_push_locked(s, c, 1);
                        pthread_mutex_unlock(&s->cpu_lock);
                        return;
                }
                pthread_mutex_unlock(&s->cpu_lock);
        }
        c->next = NULL;
        pthread_mutex_lock(&s->hs_lock);
        if (s->hs_tail)
                s->hs_tail->next = c;
        else
                s->hs_head = c;
        s->hs_tail = c;
        s->hs_queued++;
        pthread_mutex_unlock(&s->hs_lock);
        uint64_t one = 1;
        if (write(s->hs_efd, &one, sizeof(one)) < 0)
                hsm_err("cannot wake a handshake thread: %s", strerror(errno));
}

static struct conn *queue_pop(hsm_server *s)
{
        uint64_t token;
        /* One eventfd count per queued connection (EFD_SEMAPHORE). */
        if (read(s->hs_efd, &token, sizeof(token)) != sizeof(token))
                return NULL;
        pthread_mutex_lock(&s->hs_lock);
        struct conn *c = s->hs_head;
        if (c) {
                s->hs_head = c->next;
                if (!s->hs_head)
                        s->hs_tail = NULL;
                s->hs_queued--;
                s->hs_busy++;
        }
        pthread_mutex_unlock(&s->hs_lock);
        return c;
}

/* ------------------------------------------------------------ CPU gate
 *
 * At most cpu_slots handshake steps run on the CPU at once (one per core by
 * default), so that handshakes never queue the I/O loops behind a crowd of
 * runnable threads, and the CPU goes to the oldest handshake first: waiting
 * threads are served in the order their connections were accepted (no
 * thread lottery). A thread lends its slot while it waits without using the
 * CPU (its turn at a token, an operation on a token that mostly waits: the
 * token layer's off_cpu hook), and the watchdog takes back a slot from a
 * thread that stays inside a token call, so a token that hangs holds no
 * slot for long. */

/* Work that found every CPU slot taken waits here (under cpu_lock), for
 * the next thread that ends a step: handshakes going on (a parked one
 * whose socket is ready) before new ones, each in arrival order (accept
 * time: the oldest handshake first, whichever thread accepted it or made
 * it ready). A thread that ends a step takes the next one itself, without
 * a hand-over to another thread. Doubly linked (next, prev: a deferred
 * connection is neither parked nor on an I/O loop); usually the newest
 * arrives last, so the place is looked for from the tail. */
static void deferred_push_locked(hsm_server *s, struct conn *c, int cont)
{
        struct conn **head = cont ? &s->def_cont_head : &s->def_new_head;
        struct conn **tail = cont ? &s->def_cont_tail : &s->def_new_tail;
        struct conn *after = *tail;
        while (after && after->accepted_ns > c->accepted_ns)
                after = after->prev;
        c->prev = after;
        c->next = after ? after->next : *head;
        if (c->next)
                c->next->prev = c;
        else
                *tail = c;
        if (after)
                after->next = c;
        else
                *head = c;
        s->n_deferred++;
}

static struct conn *deferred_pop_locked(hsm_server *s)
{
        struct conn **head = s->def_cont_head ? &s->def_cont_head : &s->def_new_head;
        struct conn **tail = s->def_cont_head ? &s->def_cont_tail : &s->def_new_tail;
        struct conn *c = *head;
        if (c) {
                *head = c->next;
                if (*head)
                        (*head)->prev = NULL;
                else
                        *tail = NULL;
                c->next = c->prev = NULL;
                s->n_deferred--;
        }
        return c;
}

/* Under cpu_lock: no slot for new work (all taken, or a thread that gave
 * its slot away waits to get one back first). */
static bool cpu_full_locked(const hsm_server *s)
{
        return s->cpu_head || s->cpu_busy >= s->cpu_slots;
}

/* Under cpu_lock: slots to the queue's head, in order; a slot still free
 * while work is deferred wakes an idle thread for it. */
static void cpu_grant_locked(hsm_server *s)
{
        while (s->cpu_head && s->cpu_busy < s->cpu_slots) {
                struct hs_slot *w = s->cpu_head;
                s->cpu_head = w->gate_next;
                s->cpu_busy++;
                w->on_cpu = 1;
                w->gate_granted = 1;
                w->gate_since_ns = hsm_now_ns();
                pthread_cond_signal(&w->gate_cond);
        }
        if (!cpu_full_locked(s) && s->n_deferred) {
                uint64_t n = s->cpu_slots - s->cpu_busy;
                if (n > s->n_deferred)
                        n = s->n_deferred;
                if (write(s->hs_efd, &n, sizeof(n)) < 0)
                        hsm_err("cannot wake a handshake thread: %s", strerror(errno));
        }
}

/* Under cpu_lock: takes a free slot (nobody waiting for one) and the
 * oldest deferred work: the work, or NULL (nothing deferred, or no slot). */
static struct conn *cpu_take_deferred_locked(struct hs_slot *slot)
{
        hsm_server *s = slot->srv;
        struct conn *c = NULL;
        if (!cpu_full_locked(s) && (c = deferred_pop_locked(s))) {
                s->cpu_busy++;
                slot->on_cpu = 1;
                slot->gate_since_ns = hsm_now_ns();
        }
        return c;
}

static struct conn *cpu_take_deferred(struct hs_slot *slot)
{
        pthread_mutex_lock(&slot->srv->cpu_lock);
        struct conn *c = cpu_take_deferred_locked(slot);
        pthread_mutex_unlock(&slot->srv->cpu_lock);
        return c;
}

/* c is ready to run: it joins the deferred work, and if a slot is free
 * this thread takes it with the oldest deferred work (returned). */
static struct conn *cpu_defer_and_take(struct hs_slot *slot, struct conn *c, int cont)
{
        hsm_server *s = slot->srv;
        pthread_mutex_lock(&s->cpu_lock);
        deferred_push_locked(s, c, cont);
        c = cpu_take_deferred_locked(slot);
        pthread_mutex_unlock(&s->cpu_lock);
        return c;
}

/* After a step, holding a slot: a thread waiting to go on gets the slot;
 * else the next deferred work (returned, the slot kept); else the slot
 * is freed. A slot the watchdog took back is not ours to give. */
static struct conn *cpu_leave_or_next(struct hs_slot *slot)
{
        hsm_server *s = slot->srv;
        struct conn *c = NULL;
        pthread_mutex_lock(&s->cpu_lock);
        if (!slot->on_cpu) {
                pthread_mutex_unlock(&s->cpu_lock);
                return cpu_take_deferred(slot);
        }
        if (!s->cpu_head && (c = deferred_pop_locked(s))) {
                slot->gate_since_ns = hsm_now_ns();
        } else {
                slot->on_cpu = 0;
                s->cpu_busy--;
                cpu_grant_locked(s);
        }
        pthread_mutex_unlock(&s->cpu_lock);
        return c;
}

static void cpu_enter(struct hs_slot *slot, uint64_t key)
{
        hsm_server *s = slot->srv;
        if (!s->cpu_slots)
                return;
        pthread_mutex_lock(&s->cpu_lock);
        if (!cpu_full_locked(s)) {
                s->cpu_busy++;
                slot->on_cpu = 1;
                slot->gate_since_ns = hsm_now_ns();
                pthread_mutex_unlock(&s->cpu_lock);
                return;
        }
        /* In accept order: an older handshake goes first. */
        slot->gate_key = key;
        slot->gate_granted = 0;
        struct hs_slot **pp = &s->cpu_head;
        while (*pp && (*pp)->gate_key <= key)
                pp = &(*pp)->gate_next;
        slot->gate_next = *pp;
        *pp = slot;
        while (!slot->gate_granted)
                pthread_cond_wait(&slot->gate_cond, &s->cpu_lock);
        pthread_mutex_unlock(&s->cpu_lock);
}

static void cpu_leave(struct hs_slot *slot)
{
        hsm_server *s = slot->srv;
        if (!s->cpu_slots)
                return;
        pthread_mutex_lock(&s->cpu_lock);
        /* A slot the watchdog took back is not ours to give. */
        if (slot->on_cpu) {
                slot->on_cpu = 0;
                s->cpu_busy--;
                cpu_grant_locked(s);
        }
        pthread_mutex_unlock(&s->cpu_lock);
}

/* The token layer's hook: the thread waits without using the CPU. */
static void slot_off_cpu(hsm_token_watch *w, int begin)
{
        struct hs_slot *slot = (struct hs_slot *)((char *)w - offsetof(struct hs_slot, watch));
        if (begin)
                cpu_leave(slot);
        else
                cpu_enter(slot, slot->gate_key_self);
}

/* Watchdog: a thread inside a token call for longer than this keeps no
 * CPU slot (a token that hangs, or one that became slow while it was
 * taken for CPU). */
#define CPU_HOLD_IN_TOKEN_NS 50000000ull

static void cpu_revoke_stuck(hsm_server *s, uint64_t now)
{
        if (!s->cpu_slots)
                return;
        for (unsigned i = 0; i < s->n_hs_threads; i++) {
                struct hs_slot *slot = &s->hs_slots[i];
                if (!__atomic_load_n(&slot->watch.token, __ATOMIC_ACQUIRE))
                        continue;
                uint64_t since = __atomic_load_n(&slot->watch.since_ns, __ATOMIC_RELAXED);
                if (now < since + CPU_HOLD_IN_TOKEN_NS)
                        continue;
                pthread_mutex_lock(&s->cpu_lock);
                if (slot->on_cpu && now >= slot->gate_since_ns + CPU_HOLD_IN_TOKEN_NS) {
                        slot->on_cpu = 0;
                        s->cpu_busy--;
                        s->cpu_revoked++;
                        cpu_grant_locked(s);
                }
                pthread_mutex_unlock(&s->cpu_lock);
        }
}

void hsm_handshake_sched_init(hsm_server *s, unsigned cpu_slots)
{
        pthread_mutex_init(&s->cpu_lock, NULL);
        s->cpu_slots = cpu_slots;
        for (unsigned i = 0; i < s->n_hs_threads; i++) {
                struct hs_slot *slot = &s->hs_slots[i];
                pthread_cond_init(&slot->gate_cond, NULL);
                slot->watch.off_cpu = slot_off_cpu;
        }
}

/* A handshake failed at once to shed load: an alert (internal_error) the
 * client reads before the close, counted. */
static void send_raw_alert(int fd);

static void shed(hsm_server *s, struct conn *c, const char *why)
{
        __atomic_add_fetch(&s->handshakes_failed, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&s->handshakes_shed, 1, __ATOMIC_RELAXED);
        hsm_hs_count(c, HSM_HS_NOTLS);
        hsm_info("%s %s: handshake with %s failed: %s (shed)", EP_KIND(c->l), c->l->conf->name, c->peer, why);
        if (c->tls)
                gnutls_alert_send(c->tls, GNUTLS_AL_FATAL, GNUTLS_A_INTERNAL_ERROR);
        else
                send_raw_alert(c->cfd);
        if (c->l->conf->kind == HSM_LISTENER && !c->out)
                hsm_handshake_refuse(s, c);
        else
                hsm_conn_free(s, c);
}

static void run_one(struct hs_slot *slot, struct conn *c)
{
        hsm_server *s = slot->srv;
        slot->gate_key_self = c->accepted_ns;
        if (__atomic_load_n(&s->stop_now, __ATOMIC_ACQUIRE))
                /* A second signal: what is queued is dropped. */
                hsm_conn_free(s, c);
        else if (c->phase != PH_BACKEND && hsm_now_ns() >= c->deadline_ns)
                shed(s, c, "waited too long for a handshake thread");
        else
                hsm_handshake_advance(slot, c);
        pthread_mutex_lock(&s->hs_lock);
        s->hs_busy--;
        pthread_mutex_unlock(&s->hs_lock);
}

/* Runs c, then deferred work, while this thread holds a CPU slot. */
static void run_held(struct hs_slot *slot, struct conn *c)
{
        while (c) {
                run_one(slot, c);
                c = cpu_leave_or_next(slot);
        }
}

/* c is ready for a handshake thread (counted in hs_busy): run now if a
 * CPU slot is free, else it waits, deferred, for the next free slot.
 * cont: a handshake going on (before new ones). */
static void dispatch(struct hs_slot *slot, struct conn *c, int cont)
{
        if (!slot->srv->cpu_slots) {
                run_one(slot, c);
                return;
        }
        run_held(slot, cpu_defer_and_take(slot, c, cont));
}

/* A listener's socket is readable: take one connection. With
 * TCP_DEFER_ACCEPT its ClientHello is usually in already, and this thread
 * does the handshake at once; otherwise it waits on the main loop. */
static void accept_one(struct hs_slot *slot, struct listener *l)
{
        hsm_server *s = slot->srv;
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        int fd = accept4(l->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
                if (errno == EMFILE || errno == ENFILE)
                        hsm_out_of_fds(l);
                return;
        }
        struct conn *c = hsm_conn_accepted(l, fd, &ss, len);
        if (!c)
                return;
        c->phase = PH_HELLO;
        int h = hsm_hello_read(c);
        if (h == 0)
                hsm_handshake_park(s, c, c->cfd, EV_READ, c->deadline_ns);
        if (h != 1)
                return;
        c->phase = PH_TLS;
        pthread_mutex_lock(&s->hs_lock);
        s->hs_busy++;
        pthread_mutex_unlock(&s->hs_lock);
        dispatch(slot, c, 0);
}

/* ----------------------------------------------------------- watchdog */

static struct token_overrun *overrun_of(hsm_server *s, hsm_token *t)
{
        for (unsigned i = 0; i < s->n_overruns; i++)
                if (s->overruns[i].token == t)
                        return &s->overruns[i];
        struct token_overrun *o = realloc(s->overruns, (s->n_overruns + 1) * sizeof(*o));
        if (!o)
                return NULL;
        s->overruns = o;
        o = &s->overruns[s->n_overruns++];
        o->token = t;
        o->stuck = 0;
        return o;
}

/* A fatal internal_error alert, written on the socket directly: the
 * session belongs to the thread that is inside the token. */
static void send_raw_alert(int fd)
{
        static const uint8_t alert[7] = { 21, 3, 3, 0, 2, 2, 80 };
        if (send(fd, alert, sizeof(alert), MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
                hsm_debug("cannot send the alert: %s", strerror(errno));
}

void hsm_handshake_watchdog(hsm_server *s)
{
        uint64_t now = hsm_now_ns();
        cpu_revoke_stuck(s, now);
        for (unsigned i = 0; i < s->n_hs_threads; i++) {
                struct hs_slot *slot = &s->hs_slots[i];
                char peer[96], name[64];
                const char *kind = "";
                hsm_token *t = NULL;
                uint64_t since = 0;
                struct conn *c;

                pthread_mutex_lock(&slot->lock);
                c = slot->c;
                if (c && !c->abandoned && now >= c->deadline_ns &&
                    (t = __atomic_load_n(&slot->watch.token, __ATOMIC_ACQUIRE))) {
                        since = __atomic_load_n(&slot->watch.since_ns, __ATOMIC_RELAXED);
                        c->abandoned = 1;
                        c->overrun = overrun_of(s, t);
                        /* The peer learns now, not when the token answers.
                         * The descriptor stays open (the thread still uses
                         * it) until the call returns. */
                        send_raw_alert(c->cfd);
                        shutdown(c->cfd, SHUT_RDWR);
                        snprintf(peer, sizeof(peer), "%s", c->peer);
                        snprintf(name, sizeof(name), "%s", c->l->conf->name);
                        kind = EP_KIND(c->l);
                } else
                        t = NULL;
                pthread_mutex_unlock(&slot->lock);
                if (!t)
                        continue;
                __atomic_add_fetch(&s->handshakes_failed, 1, __ATOMIC_RELAXED);
                hsm_hs_count(c, HSM_HS_NOTLS);
                __atomic_add_fetch(&s->token_overruns, 1, __ATOMIC_RELAXED);
                __atomic_add_fetch(&s->stuck, 1, __ATOMIC_RELAXED);
                hsm_info("%s %s: handshake with %s failed: the token did not answer within the handshake timeout", kind, name,
                         peer);
                struct token_overrun *o = c->overrun;
                /* Logged once while the token overruns: the first call. */
                if (o && __atomic_add_fetch(&o->stuck, 1, __ATOMIC_ACQ_REL) == 1)
                        hsm_warn("token %s: a call has not returned by the handshake deadline (%.0f ms in the call); "
                                 "failing its handshake; more overruns are counted, not logged, until it answers",
                                 hsm_token_name(t), (double)(now - since) / 1e6);
        }
}

unsigned hsm_handshake_in_token(hsm_server *s)
{
        unsigned n = 0;
        for (unsigned i = 0; i < s->n_hs_threads; i++)
                if (__atomic_load_n(&s->hs_slots[i].watch.token, __ATOMIC_ACQUIRE))
                        n++;
        return n;
}

/* ----------------------------------------------------------- threads */

static int ep_add(int ep, int fd, uint32_t events, void *ptr)
{
        struct epoll_event ev = { .events = events, .data.ptr = ptr };
        return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

static void *worker(struct hs_slot *slot)
{
        hsm_server *s = slot->srv;
        hsm_token_watch_thread(&slot->watch);
        /* Established connections come first: when the CPU is short, the
         * I/O threads win over handshakes (Linux: nice is per thread). */
        if (s->conf->handshake_nice > 0) {
                pid_t tid = (pid_t)syscall(SYS_gettid);
                errno = 0;
                int cur = getpriority(PRIO_PROCESS, (id_t)tid);
                if (errno == 0)
                        setpriority(PRIO_PROCESS, (id_t)tid, cur + s->conf->handshake_nice);
        }
        /* Tags for the non-listener entries of the epoll set. */
        static char tag_queue, tag_drain, tag_stop, tag_sync;
        int ep = epoll_create1(EPOLL_CLOEXEC);
        if (ep < 0 || ep_add(ep, s->hs_efd, EPOLLIN | EPOLLEXCLUSIVE, &tag_queue) < 0 ||
            ep_add(ep, s->drain_efd, EPOLLIN, &tag_drain) < 0 || ep_add(ep, s->stop_efd, EPOLLIN, &tag_stop) < 0 ||
            ep_add(ep, s->sync_efd, EPOLLIN | EPOLLET, &tag_sync) < 0) {
                hsm_err("handshake thread: epoll: %s", strerror(errno));
                __atomic_add_fetch(&s->accept_acks, 1, __ATOMIC_RELEASE);
                if (ep >= 0)
                        close(ep);
                return NULL;
        }
        hsm_listeners_sync(slot, ep); /* the listening sockets; again at each reload (tag_sync) */

        for (;;) {
                struct epoll_event evs[8];
                int n = epoll_wait(ep, evs, 8, -1);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        hsm_err("handshake thread: epoll_wait: %s", strerror(errno));
                        if (!__atomic_load_n(&s->accept_stopped, __ATOMIC_ACQUIRE))
                                __atomic_add_fetch(&s->accept_acks, 1, __ATOMIC_RELEASE);
                        break;
                }
                for (int i = 0; i < n; i++) {
                        void *p = evs[i].data.ptr;
                        if (p == &tag_queue) {
                                struct conn *c = queue_pop(s);
                                if (c)
                                        dispatch(slot, c, 1);
                                else
                                        /* woken for deferred work */
                                        run_held(slot, cpu_take_deferred(slot));
                        } else if (p == &tag_drain) {
                                /* Stop accepting; the main loop closes the
                                 * sockets once every thread has done this. */
                                hsm_listeners_sync(slot, ep); /* accept_stopped: every listener out */
                                epoll_ctl(ep, EPOLL_CTL_DEL, s->drain_efd, NULL);
                                __atomic_add_fetch(&s->accept_acks, 1, __ATOMIC_RELEASE);
                        } else if (p == &tag_sync) {
                                hsm_listeners_sync(slot, ep);
                        } else if (p == &tag_stop) {
                                /* Finish what is queued (parks are refused
                                 * now), then end. */
                                struct conn *c;
                                while ((c = queue_pop(s)))
                                        dispatch(slot, c, 1);
                                /* and what waits for a CPU slot */
                                for (;;) {
                                        pthread_mutex_lock(&s->cpu_lock);
                                        c = deferred_pop_locked(s);
                                        pthread_mutex_unlock(&s->cpu_lock);
                                        if (!c)
                                                break;
                                        slot->gate_key_self = c->accepted_ns;
                                        cpu_enter(slot, c->accepted_ns);
                                        run_held(slot, c);
                                }
                                close(ep);
                                return NULL;
                        } else if (!__atomic_load_n(&s->accept_stopped, __ATOMIC_ACQUIRE)) {
                                /* A listener event of this batch may predate a
                                 * sync handled earlier in it (a reload retired
                                 * the listener): accept only on a listener this
                                 * thread still watches. The retire tick frees a
                                 * slot only after every thread synced, so this
                                 * check closes the window. */
                                struct listener *l = p;
                                size_t i = (size_t)(l - s->listeners);
                                if (i < s->cap_listeners && l->fd >= 0 && slot->reg[i] == l->fd &&
                                    __atomic_load_n(&l->state, __ATOMIC_ACQUIRE) == LISTENER_LIVE)
                                        accept_one(slot, p);
                        }
                }
        }
        close(ep);
        return NULL;
}

void *hsm_handshake_worker(void *arg)
{
        struct hs_slot *slot = arg;
        void *r = worker(slot);
        __atomic_store_n(&slot->exited, 1, __ATOMIC_RELEASE);
        return r;
}

void hsm_handshake_log_admission(hsm_server *s)
{
        hsm_keystore *ks = s->ks;
        hsm_token *seen[64];
        unsigned n_seen = 0;
        for (unsigned i = 0; i < hsm_keystore_n_keys(ks); i++) {
                hsm_token *t = hsm_key_token(hsm_keystore_key(ks, i));
                bool dup = false;
                for (unsigned j = 0; j < n_seen; j++)
                        dup |= seen[j] == t;
                if (dup || n_seen == 64)
                        continue;
                seen[n_seen++] = t;
                hsm_token_concurrency c;
                hsm_token_get_concurrency(t, &c);
                hsm_notice("token %s: concurrency limit=%u (%u..%u) in_flight=%u queued=%u queue_max=%u latency=%.2fms "
                           "floor=%.2fms admitted=%llu shed_queue_full=%llu shed_deadline=%llu rate_refused=%llu",
                           hsm_token_name(t), c.limit, c.min, c.max, c.in_flight, c.queued, c.queue_max, c.latency_us / 1e3,
                           c.latency_floor_us / 1e3, (unsigned long long)c.admitted, (unsigned long long)c.shed_queue_full,
                           (unsigned long long)c.shed_deadline, (unsigned long long)c.rate_refused);
        }
        pthread_mutex_lock(&s->cpu_lock);
        uint64_t revoked = s->cpu_revoked;
        unsigned busy = s->cpu_busy, waiting = s->n_deferred;
        for (struct hs_slot *w = s->cpu_head; w; w = w->gate_next)
                waiting++;
        pthread_mutex_unlock(&s->cpu_lock);
        /* cpu_waiting: handshakes waiting for a CPU slot (work deferred, and
         * threads that gave their slot away waiting to get one back);
         * client_waits: times a handshake was parked for its client's next
         * flight */
        hsm_notice("handshakes: shed=%llu cpu_slots=%u cpu_busy=%u cpu_waiting=%u cpu_slots_taken_back=%llu client_waits=%llu",
                   (unsigned long long)__atomic_load_n(&s->handshakes_shed, __ATOMIC_RELAXED), s->cpu_slots, busy,
                   waiting, (unsigned long long)revoked,
                   (unsigned long long)__atomic_load_n(&s->client_waits, __ATOMIC_RELAXED));
}
