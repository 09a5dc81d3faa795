/* GET /metrics: Prometheus text format 0.0.4, prefix hsmtls_, base units,
 * _total counters, bounded labels (token, key label, op, mechanism, result,
 * reason, listener: all from the configuration or fixed sets). */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "keyadmin.h"
#include "sesscache.h"
#include "usage.h"

#include "hsmtls-build.h"

/* Label values: \ " and newline escaped. */
static void esc(FILE *f, const char *s)
{
        for (; *s; s++) {
                if (*s == '\\' || *s == '"')
                        fputc('\\', f), fputc(*s, f);
                else if (*s == '\n')
                        fputs("\\n", f);
                else
                        fputc(*s, f);
        }
}

static void head(FILE *f, const char *name, const char *type, const char *help)
{
        fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* hsmtls_session_cache_*: the caches by listener name, merged (a listener
 * that a reload replaced drains with its own cache beside its successor's:
 * one series per name, the sum of both). */
struct caches {
        struct cache_sum {
                char *name;
                hsm_sesscache_stats st;
        } *v;
        unsigned n;
};

static void cache_add(const char *listener, const hsm_sesscache_stats *st, void *ud)
{
        struct caches *cs = ud;
        struct cache_sum *c = NULL;
        for (unsigned i = 0; !c && i < cs->n; i++)
                if (strcmp(cs->v[i].name, listener) == 0)
                        c = &cs->v[i];
        if (!c) {
                struct cache_sum *v = realloc(cs->v, (cs->n + 1) * sizeof(*v));
                if (!v)
                        return;
                cs->v = v;
                c = &v[cs->n];
                memset(c, 0, sizeof(*c));
                if (!(c->name = strdup(listener)))
                        return;
                cs->n++;
        }
        c->st.hits += st->hits;
        c->st.misses += st->misses;
        c->st.stores += st->stores;
        c->st.evicted += st->evicted;
        c->st.expired += st->expired;
        c->st.entries += st->entries;
        c->st.max_entries += st->max_entries;
}

static void expiry_line(const char *fp, const char *source, int64_t not_after, void *ud)
{
        fprintf(ud, "hsmtls_certificate_not_after_timestamp_seconds{fingerprint=\"%s\",source=\"%s\"} %lld\n", fp,
                source, (long long)not_after);
}

int route_metrics(struct req *r)
{
        hsm_admin *a = r->a;
        char *buf = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&buf, &len);
        if (!f)
                return req_error(r, 500, "internal", NULL, "out of memory");

        head(f, "hsmtls_build_info", "gauge", "Version of hsmtlsd (always 1).");
        fprintf(f, "hsmtls_build_info{version=\"%s\"} 1\n", HSMTLS_VERSION);
        head(f, "hsmtls_start_time_seconds", "gauge", "Start time of hsmtlsd, seconds since the epoch.");
        fprintf(f, "hsmtls_start_time_seconds %lld\n", (long long)a->started_unix);

        unsigned nk = hsm_keystore_n_keys(a->ks);
        hsm_usage_entry (*e)[HSM_OP__MAX * HSM_MECH__MAX * HSM_RESULT__MAX] = calloc(nk ? nk : 1, sizeof(*e));
        int *n = calloc(nk ? nk : 1, sizeof(int));
        for (unsigned i = 0; e && n && i < nk; i++)
                n[i] = hsm_usage_snapshot(hsm_key_usage(hsm_keystore_key(a->ks, i)), e[i], HSM_OP__MAX * HSM_MECH__MAX * HSM_RESULT__MAX);
        static const char *const fam[] = { "hsmtls_key_operations_total", "hsmtls_key_operation_max_seconds" };
        static const char *const help[] = { "Operations on token keys since start.",
                                             "Longest operation on a token key since start." };
        for (int m = 0; m < 2; m++) {
                head(f, fam[m], m == 1 ? "gauge" : "counter", help[m]);
                for (unsigned i = 0; e && n && i < nk; i++) {
                        hsm_key *k = hsm_keystore_key(a->ks, i);
                        for (int j = 0; j < n[i]; j++) {
                                fprintf(f, "%s{token=\"", fam[m]);
                                esc(f, hsm_keystore_token_name(a->ks, i));
                                fputs("\",key=\"", f);
                                esc(f, hsm_key_label(k));
                                fprintf(f, "\",op=\"%s\",mechanism=\"%s\",result=\"%s\"} ", hsm_op_name(e[i][j].op),
                                        hsm_mech_name(e[i][j].mech), hsm_result_name(e[i][j].result));
                                if (m == 0)
                                        fprintf(f, "%llu\n", (unsigned long long)e[i][j].count);
                                else
                                        fprintf(f, "%.9f\n", (double)e[i][j].max_ns / 1e9);
                        }
                }
        }
        head(f, "hsmtls_key_operation_duration_seconds", "histogram", "Duration of operations on token keys since start.");
        for (unsigned i = 0; e && n && i < nk; i++) {
                hsm_key *k = hsm_keystore_key(a->ks, i);
                for (int j = 0; j < n[i]; j++) {
                        uint64_t hist[HSM_USAGE_BUCKETS], cum = 0;
                        hsm_usage_histogram(hsm_key_usage(k), e[i][j].op, e[i][j].mech, e[i][j].result, hist);
                        for (unsigned b = 0; b <= HSM_USAGE_BUCKETS; b++) {
                                bool sum = b == HSM_USAGE_BUCKETS;
                                if (b < HSM_USAGE_BUCKETS)
                                        cum += hist[b];
                                fputs(b == HSM_USAGE_BUCKETS ? "hsmtls_key_operation_duration_seconds_sum{token=\""
                                                             : "hsmtls_key_operation_duration_seconds_bucket{token=\"",
                                      f);
                                esc(f, hsm_keystore_token_name(a->ks, i));
                                fputs("\",key=\"", f);
                                esc(f, hsm_key_label(k));
                                fprintf(f, "\",op=\"%s\",mechanism=\"%s\",result=\"%s\"", hsm_op_name(e[i][j].op),
                                        hsm_mech_name(e[i][j].mech), hsm_result_name(e[i][j].result));
                                if (sum) {
                                        fprintf(f, "} %.9f\n", (double)e[i][j].total_ns / 1e9);
                                        break;
                                }
                                if (b < HSM_USAGE_BUCKETS - 1)
                                        fprintf(f, ",le=\"%g\"} %llu\n", (double)hsm_usage_bucket_ns[b] / 1e9,
                                                (unsigned long long)cum);
                                else
                                        fprintf(f, ",le=\"+Inf\"} %llu\n", (unsigned long long)cum);
                        }
                        fputs("hsmtls_key_operation_duration_seconds_count{token=\"", f);
                        esc(f, hsm_keystore_token_name(a->ks, i));
                        fputs("\",key=\"", f);
                        esc(f, hsm_key_label(k));
                        fprintf(f, "\",op=\"%s\",mechanism=\"%s\",result=\"%s\"} %llu\n", hsm_op_name(e[i][j].op),
                                hsm_mech_name(e[i][j].mech), hsm_result_name(e[i][j].result), (unsigned long long)cum);
                }
        }
        /* By reason: every reason of each operation and mechanism the key
         * was used with since start (zeros too, for rate()): at most
         * HSM_REASON__MAX - 1 series per counter above. */
        head(f, "hsmtls_key_operation_failures_total", "counter",
             "Failed operations on token keys since start, by reason (rate, queue, deadline, absent, failed, login, "
             "session, key, mechanism, token_error, late).");
        for (unsigned i = 0; e && n && i < nk; i++) {
                hsm_key *k = hsm_keystore_key(a->ks, i);
                bool used[HSM_OP__MAX][HSM_MECH__MAX] = { { false } };
                for (int j = 0; j < n[i]; j++)
                        used[e[i][j].op][e[i][j].mech] = true;
                for (int o = 0; o < HSM_OP__MAX; o++)
                        for (int m = 0; m < HSM_MECH__MAX; m++)
                                for (int w = HSM_REASON_NONE + 1; used[o][m] && w < HSM_REASON__MAX; w++) {
                                        fputs("hsmtls_key_operation_failures_total{token=\"", f);
                                        esc(f, hsm_keystore_token_name(a->ks, i));
                                        fputs("\",key=\"", f);
                                        esc(f, hsm_key_label(k));
                                        fprintf(f, "\",op=\"%s\",mechanism=\"%s\",reason=\"%s\"} %llu\n", hsm_op_name(o),
                                                hsm_mech_name(m), hsm_reason_name(w),
                                                (unsigned long long)hsm_usage_failures(hsm_key_usage(k), o, m, w));
                                }
        }
        head(f, "hsmtls_key_session_wait_seconds", "histogram",
             "Time the key's operations waited for a session of its token's pool, since start.");
        for (unsigned i = 0; i < nk; i++) {
                hsm_key *k = hsm_keystore_key(a->ks, i);
                uint64_t hist[HSM_USAGE_BUCKETS], count, total, cum = 0;
                hsm_usage_waits(hsm_key_usage(k), hist, &count, &total);
                for (unsigned b = 0; b < HSM_USAGE_BUCKETS; b++) {
                        cum += hist[b];
                        fputs("hsmtls_key_session_wait_seconds_bucket{token=\"", f);
                        esc(f, hsm_keystore_token_name(a->ks, i));
                        fputs("\",key=\"", f);
                        esc(f, hsm_key_label(k));
                        if (b < HSM_USAGE_BUCKETS - 1)
                                fprintf(f, "\",le=\"%g\"} %llu\n", (double)hsm_usage_bucket_ns[b] / 1e9, (unsigned long long)cum);
                        else
                                fprintf(f, "\",le=\"+Inf\"} %llu\n", (unsigned long long)cum);
                }
                for (int m = 0; m < 2; m++) {
                        fputs(m ? "hsmtls_key_session_wait_seconds_count{token=\"" : "hsmtls_key_session_wait_seconds_sum{token=\"", f);
                        esc(f, hsm_keystore_token_name(a->ks, i));
                        fputs("\",key=\"", f);
                        esc(f, hsm_key_label(k));
                        if (m)
                                fprintf(f, "\"} %llu\n", (unsigned long long)cum);
                        else
                                fprintf(f, "\"} %.9f\n", (double)total / 1e9);
                }
        }
        head(f, "hsmtls_key_last_use_timestamp_seconds", "gauge",
             "Time of the key's last operation since start, seconds since the epoch (absent: none).");
        for (unsigned i = 0; i < nk; i++) {
                hsm_key *k = hsm_keystore_key(a->ks, i);
                uint64_t last = hsm_usage_last_use(hsm_key_usage(k));
                if (!last)
                        continue;
                fputs("hsmtls_key_last_use_timestamp_seconds{token=\"", f);
                esc(f, hsm_keystore_token_name(a->ks, i));
                fputs("\",key=\"", f);
                esc(f, hsm_key_label(k));
                fprintf(f, "\"} %.3f\n", (double)last / 1e9);
        }
        free(e);
        free(n);

        unsigned nt = 0, max = hsm_keystore_n_tokens(a->ks);
        hsm_token_info *ti = calloc(max ? max : 1, sizeof(*ti));
        hsm_token **tv = calloc(max ? max : 1, sizeof(*tv)); /* one look: a reload may retire one meanwhile */
        for (unsigned i = 0; ti && tv && i < max; i++)
                if ((tv[nt] = hsm_keystore_token(a->ks, i))) {
                        hsm_token_get_info(tv[nt], &ti[nt]);
                        nt++;
                }
        head(f, "hsmtls_token_up", "gauge", "1 when the token answers and is logged in.");
        for (unsigned i = 0; ti && i < nt; i++) {
                fputs("hsmtls_token_up{token=\"", f);
                esc(f, hsm_token_name(tv[i]));
                fprintf(f, "\"} %d\n", ti[i].present && ti[i].logged_in);
        }
        head(f, "hsmtls_token_sessions", "gauge", "Sessions of the token's pool, by state.");
        for (unsigned i = 0; ti && i < nt; i++)
                for (int s = 0; s < 2; s++) {
                        fputs("hsmtls_token_sessions{token=\"", f);
                        esc(f, hsm_token_name(tv[i]));
                        fprintf(f, "\",state=\"%s\"} %u\n", s ? "idle" : "in_use",
                                s ? ti[i].sessions_idle : ti[i].sessions_open - ti[i].sessions_idle);
                }
        head(f, "hsmtls_token_sessions_max", "gauge", "Size of the token's session pool.");
        for (unsigned i = 0; ti && i < nt; i++) {
                fputs("hsmtls_token_sessions_max{token=\"", f);
                esc(f, hsm_token_name(tv[i]));
                fprintf(f, "\"} %u\n", ti[i].sessions_max);
        }
        free(tv);
        free(ti);

        /* Per listener, one series per name: the slots that serve now, each
         * name once (a reload's commit can show the old and the new slot of
         * a name both serving for a moment). */
        unsigned nl = hsm_server_n_listeners(a->srv), nu = 0;
        hsm_listener_info *li = calloc(nl ? nl : 1, sizeof(*li));
        const hsm_hs_counters **lc = calloc(nl ? nl : 1, sizeof(*lc));
        for (unsigned i = 0; li && lc && i < nl; i++) {
                if (hsm_server_listener_info(a->srv, i, &li[nu]) < 0 || !(lc[nu] = hsm_server_listener_handshakes(a->srv, i)))
                        continue;
                bool seen = false;
                for (unsigned j = 0; j < nu; j++)
                        seen |= strcmp(li[j].name, li[nu].name) == 0;
                nu += !seen;
        }
        /* Handshakes per listener: the combinations that can happen (a
         * resumption only succeeds; a failure before a version was agreed
         * is "unknown"), each listed even at 0. */
        head(f, "hsmtls_handshakes_total", "counter",
             "TLS handshakes since start, by listener or connector, TLS version, result and resumption.");
        for (unsigned i = 0; i < nu; i++)
                for (int v = 0; v < HSM_TLSV__MAX; v++)
                        for (int res = 0; res < 2; res++)
                                for (int rs = 0; rs < 2; rs++) {
                                        if ((res && rs) || (!res && v == HSM_TLSV_UNKNOWN))
                                                continue;
                                        fputs("hsmtls_handshakes_total{listener=\"", f);
                                        esc(f, li[i].name);
                                        fprintf(f, "\",version=\"%s\",result=\"%s\",resumed=\"%s\"} %llu\n",
                                                hsm_tls_version_name(v), res ? "error" : "ok", rs ? "true" : "false",
                                                (unsigned long long)hsm_hs_get(lc[i], v, !res, rs));
                                }
        head(f, "hsmtls_listener_key_handshakes_total", "counter",
             "Full TLS handshakes since start that succeeded with a chain of the token key, by listener or connector.");
        for (unsigned i = 0; i < nu; i++) {
                const hsm_hs_counters *c = lc[i];
                for (unsigned k = 0; k < HSM_HS_KEYS; k++) {
                        if (__atomic_load_n(&c->keys[k].state, __ATOMIC_ACQUIRE) != 2)
                                continue;
                        const char *label = "", *tok = admin_key_token(a, c->keys[k].uri, &label);
                        fputs("hsmtls_listener_key_handshakes_total{listener=\"", f);
                        esc(f, li[i].name);
                        fputs("\",token=\"", f);
                        esc(f, tok ? tok : "");
                        fputs("\",key=\"", f);
                        esc(f, c->keys[k].label);
                        fprintf(f, "\"} %llu\n", (unsigned long long)__atomic_load_n(&c->keys[k].handshakes, __ATOMIC_RELAXED));
                }
        }
        head(f, "hsmtls_connections", "gauge", "Connections from accept to close, by listener or connector.");
        for (unsigned i = 0; i < nu; i++) {
                fputs("hsmtls_connections{listener=\"", f);
                esc(f, li[i].name);
                fprintf(f, "\"} %u\n", li[i].connections);
        }
        head(f, "hsmtls_listener_up", "gauge", "1 while the listener or connector accepts connections.");
        for (unsigned i = 0; i < nu; i++) {
                fputs("hsmtls_listener_up{listener=\"", f);
                esc(f, li[i].name);
                fprintf(f, "\"} %d\n", li[i].serving);
        }
        free(li);
        free(lc);
        static const struct { const char *name, *type, *help; } cache_fam[] = {
                { "hsmtls_session_cache_hits_total", "counter", "TLS 1.2 session-ID lookups that resumed a cached session, by listener." },
                { "hsmtls_session_cache_misses_total", "counter", "TLS 1.2 session-ID lookups that found nothing (unknown or expired), by listener." },
                { "hsmtls_session_cache_stores_total", "counter", "Sessions stored in the TLS 1.2 session-ID cache, by listener." },
                { "hsmtls_session_cache_evictions_total", "counter", "Sessions dropped from the cache before their lookup (full, or past session_lifetime), by listener." },
                { "hsmtls_session_cache_entries", "gauge", "Sessions in the TLS 1.2 session-ID cache now, by listener." },
                { "hsmtls_session_cache_max_entries", "gauge", "Size of the TLS 1.2 session-ID cache (session_cache), by listener." },
        };
        struct caches cs = { 0 };
        hsm_sesscache_foreach(cache_add, &cs);
        for (int i = 0; i < 6; i++) {
                head(f, cache_fam[i].name, cache_fam[i].type, cache_fam[i].help);
                for (unsigned j = 0; j < cs.n; j++) {
                        const hsm_sesscache_stats *st = &cs.v[j].st;
                        const uint64_t v[] = { st->hits, st->misses, st->stores, st->evicted + st->expired, st->entries,
                                               st->max_entries };
                        fprintf(f, "%s{listener=\"", cache_fam[i].name);
                        esc(f, cs.v[j].name);
                        fprintf(f, "\"} %llu\n", (unsigned long long)v[i]);
                }
        }
        for (unsigned j = 0; j < cs.n; j++)
                free(cs.v[j].name);
        free(cs.v);
        head(f, "hsmtls_certificate_not_after_timestamp_seconds", "gauge",
             "End of validity of each leaf certificate (configured or uploaded), seconds since the epoch.");
        admin_for_each_expiry(a, expiry_line, f);
        if (fclose(f) != 0) {
                free(buf);
                return req_error(r, 500, "internal", NULL, "out of memory");
        }
        r->status = 200;
        r->text = buf;
        return 0;
}
