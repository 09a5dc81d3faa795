/* GET /v1/audit (paging), /v1/audit/verify; the rate limit of the records
 * of refused requests. */
#include "internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "usage.h"

static int parse_int(const char *s, long long min, long long max, long long *ret)
{
        char *end;
        errno = 0;
        long long v = strtoll(s, &end, 10);
        if (!*s || *end || errno || v < min || v > max)
                return -EINVAL;
        *ret = v;
        return 0;
}

struct page {
        json_t *records;
        int64_t last;
};

static int add_record(const hsm_audit_record *a, void *ud)
{
        struct page *p = ud;
        /* Every text through json_text(): a record with bytes that are no
         * UTF-8 (a %ff in a refused URL) is listed, never skipped. */
        json_t *o = json_pack("{s:I,s:o,s:o,s:o,s:o,s:o,s:o,s:i,s:o,s:o,s:o}", "seq", (json_int_t)a->seq, "time",
                              json_text(a->time), "who", json_text(a->who), "peer", json_text(a->peer), "method",
                              json_text(a->method), "path", json_text(a->path), "action", json_text(a->action), "status",
                              a->status, "detail", json_text(a->detail), "prev_sha256", json_text(a->prev_sha256),
                              "sha256", json_text(a->sha256));
        if (!o || json_array_append_new(p->records, o) < 0)
                return -ENOMEM;
        p->last = a->seq;
        return 0;
}

int route_audit(struct req *r)
{
        long long after = 0, limit = 100;
        const char *s;
        if ((s = req_query(r, "after")) && parse_int(s, 0, INT64_MAX, &after) < 0)
                return req_error(r, 400, "invalid_field", "after", "after must be an integer >= 0");
        if ((s = req_query(r, "limit")) && parse_int(s, 1, 1000, &limit) < 0)
                return req_error(r, 400, "invalid_field", "limit", "limit must be an integer from 1 to 1000");
        struct page p = { json_array(), 0 };
        int n = hsm_store_audit_list(r->a->store, after, (unsigned)limit, add_record, &p);
        if (n < 0) {
                json_decref(p.records);
                return req_error(r, 500, "internal", NULL, "cannot read the audit log");
        }
        json_t *body = json_pack("{s:o}", "records", p.records);
        json_object_set_new(body, "next_after", n == limit ? json_integer(p.last) : json_null());
        return req_reply(r, 200, body);
}

int route_audit_verify(struct req *r)
{
        hsm_audit_check ck;
        int rr = hsm_store_audit_verify(r->a->store, &ck);
        if (rr < 0 && rr != -EBADMSG)
                return req_error(r, 500, "internal", NULL, "%s", ck.reason);
        json_t *body = json_pack("{s:b,s:I}", "ok", rr == 0, "records", (json_int_t)ck.records);
        json_object_set_new(body, "first_bad_seq", rr == 0 ? json_null() : json_integer(ck.first_bad));
        json_object_set_new(body, "reason", rr == 0 ? json_null() : json_string(ck.reason));
        return req_reply(r, 200, body);
}

/* ------------------------------------------------------------ rate limit */

/* Requests refused before an identity was established (no credential, a
 * wrong one, a client certificate of another CA: any 4xx/5xx without a
 * role) are audited through two token buckets ([admin]
 * audit_refusals_burst_per_address and audit_refusals_per_minute_per_address
 * for each client address: TCP the IP address without the port, every unix
 * socket client shares "unix"; audit_refusals_burst and
 * audit_refusals_per_minute for all addresses together). A request that
 * finds either empty is counted, not written, and empties that bucket: a
 * bucket refills only while no request is refused for it, so that a client
 * that goes on being refused gets no record of its own at the refill rate.
 * The count goes out as one record "N refused requests from ADDR
 * suppressed since TIME" (action audit.suppressed): when that address's
 * bucket has a token again (looked at on every admin request; the summary
 * takes tokens from both buckets), and while the refusals go on, once per
 * audit_refusals_summary_interval for at most MAX_SUMMARIES addresses
 * (those beyond share one "other addresses" record), and at shutdown. So
 * a flood from any number of addresses writes the bursts and then at most
 * MAX_SUMMARIES + 1 records an interval; every refused request is still
 * counted. Changes that succeed, and every request of an identity, are
 * always written. The settings are read at each request (a reload applies
 * them). */
#define AUDIT_ADDRS 256
#define MAX_SUMMARIES 8

struct abucket {
        char addr[72]; /* "" : free */
        double tokens;
        uint64_t refilled_ns, last_ns;
        uint64_t suppressed;
        int last_status;
        char first[40]; /* when the first suppressed request came */
};

struct audit_limit {
        pthread_mutex_t lock;
        struct abucket b[AUDIT_ADDRS];
        double all_tokens;
        uint64_t all_refilled_ns;
        uint64_t summaries_ns; /* the last interval's summaries */
        /* suppressed requests of addresses whose entry was reused */
        uint64_t other_suppressed, other_addrs;
        int other_status;
};

/* The limits of the configuration in use (a reload may change them). */
struct limits {
        double addr_burst, addr_rate, all_burst, all_rate; /* rates: tokens a nanosecond */
        uint64_t interval_ns;
};

static void limits_of(hsm_admin *a, struct limits *lm)
{
        const hsm_conf *c = __atomic_load_n(&a->conf, __ATOMIC_ACQUIRE);
        const hsm_conf_admin *ac = &c->admin;
        *lm = (struct limits){ .addr_burst = ac->audit_refusals_burst_per_address,
                               .addr_rate = ac->audit_refusals_per_minute_per_address / 60e9,
                               .all_burst = ac->audit_refusals_burst,
                               .all_rate = ac->audit_refusals_per_minute / 60e9,
                               .interval_ns = (uint64_t)ac->audit_refusals_summary_interval_ms * 1000000u };
}

int admin_audit_limit_new(hsm_admin *a)
{
        struct audit_limit *l = calloc(1, sizeof(*l));
        if (!l)
                return -ENOMEM;
        struct limits lm;
        limits_of(a, &lm);
        pthread_mutex_init(&l->lock, NULL);
        l->all_tokens = lm.all_burst;
        l->all_refilled_ns = l->summaries_ns = hsm_now_ns();
        a->alimit = l;
        return 0;
}

static void refill(double *tokens, uint64_t *at, uint64_t now, double rate, double burst)
{
        *tokens += (double)(now - *at) * rate;
        if (*tokens > burst)
                *tokens = burst;
        *at = now;
}

/* The address part of a peer ("192.0.2.1:5000" -> "192.0.2.1",
 * "[2001:db8::1]:5000" -> "2001:db8::1", "unix" stays). */
static void peer_addr(const char *peer, char *out, size_t size)
{
        const char *colon = strrchr(peer, ':');
        if (peer[0] == '[') {
                const char *end = strchr(peer, ']');
                snprintf(out, size, "%.*s", end ? (int)(end - peer - 1) : (int)strlen(peer + 1), peer + 1);
        } else if (colon && strchr(peer, ':') == colon)
                snprintf(out, size, "%.*s", (int)(colon - peer), peer);
        else
                snprintf(out, size, "%s", peer);
}

static void now_text(char *buf, size_t size)
{
        fmt_time((int64_t)time(NULL), buf, size);
}

struct summary {
        char addr[72], first[40];
        uint64_t n, addrs;
        int status;
};

static void write_summaries(hsm_admin *a, const struct summary *s, unsigned n)
{
        for (unsigned i = 0; i < n; i++) {
                char detail[256];
                if (s[i].addrs)
                        snprintf(detail, sizeof(detail),
                                 "%llu refused requests from %llu other addresses suppressed (audit rate limit)",
                                 (unsigned long long)s[i].n, (unsigned long long)s[i].addrs);
                else
                        snprintf(detail, sizeof(detail), "%llu refused requests from %.71s suppressed since %.39s (audit rate limit)",
                                 (unsigned long long)s[i].n, s[i].addr, s[i].first);
                hsm_store_audit(a->store, "-", s[i].addrs ? "-" : s[i].addr, "-", "-", "audit.suppressed", s[i].status,
                                detail, NULL);
        }
}

static void take_summary(struct abucket *b, struct summary *s)
{
        *s = (struct summary){ .n = b->suppressed, .status = b->last_status };
        snprintf(s->addr, sizeof(s->addr), "%s", b->addr);
        snprintf(s->first, sizeof(s->first), "%s", b->first);
        b->suppressed = 0;
}

/* Takes the summaries that are due (all: at shutdown, every one) into s
 * (at most MAX_SUMMARIES + 1). */
static unsigned due_summaries(struct audit_limit *l, const struct limits *lm, uint64_t now, bool all, struct summary *s)
{
        unsigned n = 0;
        /* The refusals go on: once an interval, every address's count
         * (the first MAX_SUMMARIES one by one, the others together). */
        bool interval = all || now - l->summaries_ns >= lm->interval_ns;
        if (interval && !all)
                l->summaries_ns = now;
        refill(&l->all_tokens, &l->all_refilled_ns, now, lm->all_rate, lm->all_burst);
        for (unsigned i = 0; i < AUDIT_ADDRS; i++) {
                struct abucket *b = &l->b[i];
                if (!b->addr[0] || !b->suppressed)
                        continue;
                refill(&b->tokens, &b->refilled_ns, now, lm->addr_rate, lm->addr_burst);
                bool paused = b->tokens >= 1 && l->all_tokens >= 1; /* the address has a token again */
                if (n < MAX_SUMMARIES && (interval || paused)) {
                        if (!interval) {
                                b->tokens -= 1;
                                l->all_tokens -= 1;
                        }
                        take_summary(b, &s[n++]);
                } else if (interval && !all) {
                        l->other_suppressed += b->suppressed;
                        l->other_addrs++;
                        l->other_status = b->last_status;
                        b->suppressed = 0;
                } else if (all && n == MAX_SUMMARIES)
                        break; /* the caller comes again */
        }
        if (l->other_suppressed && n < MAX_SUMMARIES + 1 && (interval || l->all_tokens >= 1)) {
                if (!interval)
                        l->all_tokens -= 1;
                s[n++] = (struct summary){ .n = l->other_suppressed, .addrs = l->other_addrs, .status = l->other_status };
                l->other_suppressed = l->other_addrs = 0;
        }
        return n;
}

void admin_audit_flush_summaries(hsm_admin *a, bool all)
{
        struct audit_limit *l = a->alimit;
        if (!l || !a->store)
                return;
        struct summary s[MAX_SUMMARIES + 1];
        struct limits lm;
        limits_of(a, &lm);
        unsigned n;
        do {
                pthread_mutex_lock(&l->lock);
                n = due_summaries(l, &lm, hsm_now_ns(), all, s);
                pthread_mutex_unlock(&l->lock);
                write_summaries(a, s, n);
        } while (all && n >= MAX_SUMMARIES);
}

bool admin_audit_admit(hsm_admin *a, const char *peer, int status)
{
        struct audit_limit *l = a->alimit;
        if (!l)
                return true;
        struct limits lm;
        limits_of(a, &lm);
        char addr[72];
        peer_addr(peer, addr, sizeof(addr));
        uint64_t now = hsm_now_ns();
        pthread_mutex_lock(&l->lock);
        struct abucket *b = NULL, *oldest = &l->b[0];
        for (unsigned i = 0; i < AUDIT_ADDRS && !b; i++) {
                if (strcmp(l->b[i].addr, addr) == 0)
                        b = &l->b[i];
                else if (!l->b[i].addr[0] || (oldest->addr[0] && l->b[i].last_ns < oldest->last_ns))
                        oldest = &l->b[i];
        }
        if (!b) {
                /* A new address: the entry used longest ago (its pending
                 * count joins the "other addresses" summary). */
                b = oldest;
                if (b->addr[0] && b->suppressed) {
                        l->other_suppressed += b->suppressed;
                        l->other_addrs++;
                        l->other_status = b->last_status;
                }
                memset(b, 0, sizeof(*b));
                snprintf(b->addr, sizeof(b->addr), "%s", addr);
                b->tokens = lm.addr_burst;
                b->refilled_ns = now;
        }
        b->last_ns = now;
        refill(&b->tokens, &b->refilled_ns, now, lm.addr_rate, lm.addr_burst);
        refill(&l->all_tokens, &l->all_refilled_ns, now, lm.all_rate, lm.all_burst);
        bool admit = b->tokens >= 1 && l->all_tokens >= 1;
        if (admit) {
                b->tokens -= 1;
                l->all_tokens -= 1;
        } else {
                /* The bucket that was empty stays empty while the refusals
                 * go on: it refills only in a pause. */
                if (b->tokens < 1)
                        b->tokens = 0;
                if (l->all_tokens < 1)
                        l->all_tokens = 0;
                if (!b->suppressed++)
                        now_text(b->first, sizeof(b->first));
                b->last_status = status;
        }
        pthread_mutex_unlock(&l->lock);
        return admit;
}

void admin_audit_limit_free(hsm_admin *a)
{
        if (!a->alimit)
                return;
        admin_audit_flush_summaries(a, true);
        pthread_mutex_destroy(&a->alimit->lock);
        free(a->alimit);
        a->alimit = NULL;
}
