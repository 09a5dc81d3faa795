/* Admission of token operations: an adaptive concurrency limit per token
 * (a gradient: grow while latency stays near its floor and throughput
 * grows, shrink when latency rises without more throughput), a bounded
 * queue served in deadline order (arrival order for equal timeouts), and a
 * per-key rate limit. Load beyond what the token can do is shed at once,
 * with a reason the caller can tell its peer, never left to stall. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "token-internal.h"

/* A window of samples ends after at least WINDOW_MIN_NS and max(8, 2 x the
 * limit) operations (or after WINDOW_MAX_NS with any). */
#define WINDOW_MIN_NS 20000000ull
#define WINDOW_MAX_NS 1000000000ull
/* Latency within NEAR of the floor: the token keeps up, grow. Within
 * TOLERANCE: grow only if throughput grew too, else step back. Beyond:
 * shrink by the gradient (at most by half). */
#define NEAR 1.10
#define TOLERANCE 1.50
#define DEFAULT_QUEUE_FACTOR 4
#define LOG_INTERVAL_NS 1000000000ull
/* Thread CPU time is sampled on every operation for the first ones, then
 * on one in CPU_SAMPLE_EVERY (each sample is two system calls: the thread
 * CPU clock has no vDSO). */
#define CPU_SAMPLE_EVERY 32

struct hsm_admit_waiter {
        struct hsm_admit_waiter *next;
        pthread_cond_t cond;
        uint64_t key; /* deadline (UINT64_MAX: none) */
        bool granted;
};

static uint64_t thread_cpu_ns(void)
{
        struct timespec ts;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
        return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void hsm_admit_init(hsm_token *t, unsigned max_sessions)
{
        struct hsm_admission *a = &t->adm;
        pthread_mutex_init(&a->lock, NULL);
        a->max = max_sessions ? max_sessions : 1;
        a->min = 1;
        /* Start low: the first windows measure the floor without a queue
         * inside the token; the limit then climbs to what the token takes. */
        a->limit = a->min;
        a->queue_max = DEFAULT_QUEUE_FACTOR * a->max;
        a->prev_limit = a->limit;
}

void hsm_admit_destroy(hsm_token *t)
{
        pthread_mutex_destroy(&t->adm.lock);
}

/* Under lock: hand free turns to the queue's head, in order. */
static void grant_locked(struct hsm_admission *a)
{
        while (a->head && a->in_flight < a->limit) {
                struct hsm_admit_waiter *w = a->head;
                a->head = w->next;
                if (!a->head)
                        a->tail = NULL;
                a->queued--;
                a->in_flight++;
                w->granted = true;
                pthread_cond_signal(&w->cond);
        }
}

static void set_limit_locked(hsm_token *t, unsigned limit, double lat_ns, double tput)
{
        struct hsm_admission *a = &t->adm;
        if (limit < a->min)
                limit = a->min;
        if (limit > a->max)
                limit = a->max;
        if (limit == a->limit)
                return;
        unsigned was = a->limit;
        __atomic_store_n(&a->limit, limit, __ATOMIC_RELAXED);
        a->limit_changes++;
        uint64_t now = hsm_now_ns();
        /* Logged when it changes, at most once a second. */
        if (now - a->last_log_ns >= LOG_INTERVAL_NS) {
                a->last_log_ns = now;
                hsm_info("token %s: concurrency limit %u (was %u; latency %.2f ms, floor %.2f ms, %.0f operations/s)",
                         t->name, limit, was, lat_ns / 1e6, a->floor_ns / 1e6, tput);
        }
        grant_locked(a);
}

/* Under lock: one operation took lat_ns; at the end of a window, adapt. */
static void sample_locked(hsm_token *t, uint64_t now, uint64_t lat_ns)
{
        struct hsm_admission *a = &t->adm;
        a->lat_ewma_ns = a->lat_ewma_ns > 0 ? a->lat_ewma_ns + ((double)lat_ns - a->lat_ewma_ns) / 16 : (double)lat_ns;
        if (a->win_n == 0 && a->win_start_ns == 0)
                a->win_start_ns = now;
        a->win_n++;
        a->win_sum_ns += lat_ns;
        uint64_t el = now - a->win_start_ns;
        unsigned need = 2 * a->limit > 8 ? 2 * a->limit : 8;
        if (!((el >= WINDOW_MIN_NS && a->win_n >= need) || el >= WINDOW_MAX_NS))
                return;
        double avg = (double)a->win_sum_ns / a->win_n;
        double tput = el ? a->win_n * 1e9 / (double)el : 0;
        bool saturated = a->win_saturated;
        a->win_start_ns = now;
        a->win_sum_ns = 0;
        a->win_n = 0;
        a->win_saturated = a->queued > 0;
        /* The floor: the lowest window mean; it follows a token that got
         * slower for good, slowly. */
        if (a->floor_ns <= 0 || avg < a->floor_ns)
                a->floor_ns = avg;
        else
                a->floor_ns += (avg - a->floor_ns) / 128;
        unsigned limit = a->limit, next = limit;
        bool more_tput = a->prev_limit < limit && tput > a->prev_tput * 1.05;
        if (avg <= a->floor_ns * NEAR) {
                /* The token keeps up; grow only where there is demand. */
                if (saturated)
                        next = limit + (limit / 8 > 1 ? limit / 8 : 1);
        } else if (avg <= a->floor_ns * TOLERANCE) {
                if (more_tput && saturated)
                        next = limit + 1;
                else if (!more_tput && limit > a->prev_limit)
                        next = limit - 1;
        } else if (!more_tput) {
                double g = a->floor_ns * TOLERANCE / avg;
                if (g < 0.5)
                        g = 0.5;
                unsigned target = (unsigned)(limit * g);
                unsigned step = (limit - target) / 2;
                next = limit - (step ? step : 1);
                if (next < 1 || next > limit)
                        next = 1;
        }
        a->prev_limit = limit;
        a->prev_tput = tput;
        set_limit_locked(t, next, avg, tput);
}

int hsm_admit_enter(hsm_token *t, hsm_admit_ticket *tk)
{
        struct hsm_admission *a = &t->adm;
        hsm_token_watch *w = hsm_token_current_watch();
        uint64_t deadline = w && w->deadline_ns ? w->deadline_ns : UINT64_MAX;
        memset(tk, 0, sizeof(*tk));

        pthread_mutex_lock(&a->lock);
        /* The token is CPU (in-process) when an operation's thread CPU
         * time is a good part of the latency floor (the best wall time:
         * robust when other work preempts the thread) or of its own wall
         * time; a network HSM uses a few µs of CPU per operation. */
        bool cpu = (a->floor_ns > 0 && a->cpu_ns_ewma >= 0.25 * a->floor_ns) || a->cpu_ratio >= 0.5;
        tk->sample = a->cpu_samples < 64 || a->admitted % CPU_SAMPLE_EVERY == 0;
        if (a->in_flight >= a->limit || a->head) {
                a->win_saturated = true;
                uint64_t now = hsm_now_ns();
                /* Would it start before its deadline? The ones ahead, and
                 * this one, at `limit` at a time, at the recent latency. */
                if (deadline != UINT64_MAX && a->lat_ewma_ns > 0) {
                        double wait = (a->queued + 1) * a->lat_ewma_ns / (a->limit ? a->limit : 1);
                        if (now >= deadline || (double)now + wait >= (double)deadline) {
                                a->shed_deadline++;
                                pthread_mutex_unlock(&a->lock);
                                if (w)
                                        w->shed = -ETIMEDOUT;
                                hsm_debug("token %s: would not start before the deadline: refused", t->name);
                                return -ETIMEDOUT;
                        }
                }
                if (a->queued >= a->queue_max) {
                        a->shed_queue_full++;
                        pthread_mutex_unlock(&a->lock);
                        if (w)
                                w->shed = -EBUSY;
                        hsm_debug("token %s: %u operations waiting already: refused", t->name, a->queue_max);
                        return -EBUSY;
                }
                struct hsm_admit_waiter me = { .key = deadline };
                pthread_condattr_t ca;
                pthread_condattr_init(&ca);
                pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
                pthread_cond_init(&me.cond, &ca);
                pthread_condattr_destroy(&ca);
                /* In deadline order; equal deadlines in arrival order
                 * (usually after the last one: no walk). */
                struct hsm_admit_waiter **pp = a->tail && a->tail->key <= me.key ? &a->tail->next : &a->head;
                while (*pp && (*pp)->key <= me.key)
                        pp = &(*pp)->next;
                me.next = *pp;
                *pp = &me;
                if (!me.next)
                        a->tail = &me;
                a->queued++;
                bool lent = w && w->off_cpu;
                if (lent) {
                        /* Waiting uses no CPU: lend the slot meanwhile. */
                        pthread_mutex_unlock(&a->lock);
                        w->off_cpu(w, 1);
                        pthread_mutex_lock(&a->lock);
                }
                uint64_t until = deadline != UINT64_MAX ? deadline : now + 30ull * 1000000000u;
                struct timespec ts = { (time_t)(until / 1000000000u), (long)(until % 1000000000u) };
                while (!me.granted)
                        if (pthread_cond_timedwait(&me.cond, &a->lock, &ts) == ETIMEDOUT && !me.granted) {
                                struct hsm_admit_waiter *prev = NULL;
                                for (pp = &a->head; *pp && *pp != &me; pp = &(*pp)->next)
                                        prev = *pp;
                                if (*pp)
                                        *pp = me.next;
                                if (a->tail == &me)
                                        a->tail = prev;
                                a->queued--;
                                a->shed_deadline++;
                                pthread_mutex_unlock(&a->lock);
                                pthread_cond_destroy(&me.cond);
                                if (lent)
                                        w->off_cpu(w, 0);
                                if (w)
                                        w->shed = -ETIMEDOUT;
                                hsm_debug("token %s: no turn before the deadline", t->name);
                                return -ETIMEDOUT;
                        }
                pthread_cond_destroy(&me.cond);
                /* The turn's time counts from here, also while the thread
                 * waits for its CPU slot: a limit above what the CPU can
                 * run shows as latency. */
                tk->start_ns = hsm_now_ns();
                /* in_flight was counted by the one who granted the turn */
                if (lent && !cpu) {
                        /* The operation waits too: keep the slot lent
                         * until it ends (hsm_admit_leave()). */
                        tk->off_cpu = true;
                } else if (lent) {
                        pthread_mutex_unlock(&a->lock);
                        w->off_cpu(w, 0);
                        pthread_mutex_lock(&a->lock);
                }
        } else {
                a->in_flight++;
                if (w && w->off_cpu && !cpu) {
                        tk->off_cpu = true;
                        pthread_mutex_unlock(&a->lock);
                        w->off_cpu(w, 1);
                        pthread_mutex_lock(&a->lock);
                }
        }
        a->admitted++;
        pthread_mutex_unlock(&a->lock);
        tk->wall0_ns = hsm_now_ns();
        if (!tk->start_ns)
                tk->start_ns = tk->wall0_ns;
        if (tk->sample)
                tk->cpu0_ns = thread_cpu_ns();
        return 0;
}

void hsm_admit_leave(hsm_token *t, hsm_admit_ticket *tk)
{
        struct hsm_admission *a = &t->adm;
        uint64_t now = hsm_now_ns();
        uint64_t lat = now - tk->start_ns;
        double ratio = -1, cpu_ns = 0;
        if (tk->sample && now > tk->wall0_ns) {
                cpu_ns = (double)(thread_cpu_ns() - tk->cpu0_ns);
                ratio = cpu_ns / (double)(now - tk->wall0_ns);
        }
        pthread_mutex_lock(&a->lock);
        a->in_flight--;
        if (ratio >= 0) {
                a->cpu_ratio = a->cpu_samples ? a->cpu_ratio + (ratio - a->cpu_ratio) / 8 : ratio;
                a->cpu_ns_ewma = a->cpu_samples ? a->cpu_ns_ewma + (cpu_ns - a->cpu_ns_ewma) / 8 : cpu_ns;
                a->cpu_samples++;
        }
        sample_locked(t, now, lat);
        grant_locked(a);
        pthread_mutex_unlock(&a->lock);
        if (tk->off_cpu) {
                hsm_token_watch *w = hsm_token_current_watch();
                if (w && w->off_cpu)
                        w->off_cpu(w, 0);
        }
}

int hsm_admit_rate(hsm_token *t, hsm_rate_bucket *b)
{
        unsigned rate = __atomic_load_n(&t->adm.key_rate, __ATOMIC_RELAXED);
        if (!rate)
                return 0;
        uint64_t now = hsm_now_ns();
        int r = 0;
        pthread_mutex_lock(&b->lock);
        if (b->last_ns == 0) {
                b->tokens = rate;
                b->last_ns = now;
        }
        b->tokens += (double)(now - b->last_ns) * rate / 1e9;
        b->last_ns = now;
        if (b->tokens > rate)
                b->tokens = rate;
        if (b->tokens >= 1)
                b->tokens -= 1;
        else
                r = -EBUSY;
        pthread_mutex_unlock(&b->lock);
        if (r < 0) {
                pthread_mutex_lock(&t->adm.lock);
                t->adm.rate_refused++;
                pthread_mutex_unlock(&t->adm.lock);
                hsm_token_watch *w = hsm_token_current_watch();
                if (w)
                        w->shed = -EBUSY;
                hsm_debug("token %s: a key is over %u operations a second: refused", t->name, rate);
        }
        return r;
}

int hsm_token_get_concurrency(hsm_token *t, hsm_token_concurrency *ret)
{
        struct hsm_admission *a = &t->adm;
        memset(ret, 0, sizeof(*ret));
        pthread_mutex_lock(&a->lock);
        ret->limit = a->limit;
        ret->min = a->min;
        ret->max = a->max;
        ret->in_flight = a->in_flight;
        ret->queued = a->queued;
        ret->queue_max = a->queue_max;
        ret->key_ops_per_second = a->key_rate;
        ret->latency_floor_us = (uint64_t)(a->floor_ns / 1000);
        ret->latency_us = (uint64_t)(a->lat_ewma_ns / 1000);
        ret->admitted = a->admitted;
        ret->shed_queue_full = a->shed_queue_full;
        ret->shed_deadline = a->shed_deadline;
        ret->rate_refused = a->rate_refused;
        ret->limit_changes = a->limit_changes;
        pthread_mutex_unlock(&a->lock);
        return 0;
}

int hsm_token_set_concurrency(hsm_token *t, unsigned min, unsigned max, unsigned queue_max, int key_ops_per_second)
{
        struct hsm_admission *a = &t->adm;
        unsigned cap = hsm_token_max_sessions(t);
        pthread_mutex_lock(&a->lock);
        unsigned nmin = min ? min : a->min, nmax = max ? max : a->max;
        if (nmax > cap)
                nmax = cap;
        if (nmin > cap)
                nmin = cap;
        if (nmin > nmax) {
                pthread_mutex_unlock(&a->lock);
                return -EINVAL;
        }
        a->min = nmin;
        a->max = nmax;
        if (queue_max)
                a->queue_max = queue_max;
        if (key_ops_per_second >= 0)
                __atomic_store_n(&a->key_rate, (unsigned)key_ops_per_second, __ATOMIC_RELAXED);
        unsigned limit = a->limit < nmin ? nmin : a->limit > nmax ? nmax : a->limit;
        if (limit != a->limit) {
                __atomic_store_n(&a->limit, limit, __ATOMIC_RELAXED);
                a->limit_changes++;
                grant_locked(a);
        }
        pthread_mutex_unlock(&a->lock);
        hsm_info("token %s: concurrency %u to %u operations at once (now %u), at most %u waiting%s", t->name, nmin, nmax,
                 limit, a->queue_max, a->key_rate ? ", key rate limited" : "");
        return 0;
}
