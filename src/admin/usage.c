/* GET /v1/usage: per key (the keys the listeners use), since start and
 * lifetime (the state database adds earlier runs). */
#include "internal.h"

#include <string.h>

#include "usage.h"

static int reply_usage(struct req *r, json_t *keys, json_t *listeners)
{
        char started[40];
        fmt_time(r->a->started_unix, started, sizeof(started));
        return req_reply(r, 200, json_pack("{s:s,s:o,s:o}", "started", started, "keys", keys, "listeners", listeners));
}

struct lkeys {
        hsm_admin *a;
        json_t *arr;
        const hsm_hs_counters *c;
};

const char *admin_key_token(hsm_admin *a, const char *uri, const char **label)
{
        for (unsigned i = 0; i < hsm_keystore_n_keys(a->ks); i++)
                if (strcmp(hsm_key_uri(hsm_keystore_key(a->ks, i)), uri) == 0) {
                        *label = hsm_key_label(hsm_keystore_key(a->ks, i));
                        return hsm_keystore_token_name(a->ks, i);
                }
        return NULL;
}

static void add_lkey(const char *uri, uint64_t since_start, uint64_t lifetime, void *ud)
{
        struct lkeys *lk = ud;
        const char *label = "";
        const char *tok = admin_key_token(lk->a, uri, &label);
        if (!tok)
                for (unsigned i = 0; i < HSM_HS_KEYS; i++)
                        if (__atomic_load_n(&lk->c->keys[i].state, __ATOMIC_ACQUIRE) == 2 &&
                            strcmp(lk->c->keys[i].uri, uri) == 0)
                                label = lk->c->keys[i].label;
        json_array_append_new(lk->arr, json_pack("{s:o,s:o,s:o,s:I,s:I}", "uri", json_text(uri), "label",
                                                 json_text(label), "token", json_text(tok), "since_start",
                                                 (json_int_t)since_start, "lifetime", (json_int_t)lifetime));
}

json_t *admin_usage_listeners(hsm_admin *a)
{
        json_t *arr = json_array();
        for (unsigned i = 0; a->srv && i < hsm_server_n_listeners(a->srv); i++) {
                hsm_listener_info li;
                const hsm_hs_counters *c = hsm_server_listener_handshakes(a->srv, i);
                if (hsm_server_listener_info(a->srv, i, &li) < 0 || !c)
                        continue;
                json_t *hs = json_array();
                uint64_t ok = 0, failed = 0;
                for (int v = 0; v < HSM_TLSV__MAX; v++)
                        for (int res = 0; res < 2; res++)
                                for (int rs = 0; rs < 2; rs++) {
                                        uint64_t n = hsm_hs_get(c, v, !res, rs);
                                        int64_t life = a->store ? hsm_store_listener_lifetime(a->store, li.name, v, !res, rs)
                                                                : -1;
                                        if (life < 0)
                                                life = (int64_t)n;
                                        *(res ? &failed : &ok) += n;
                                        if (!n && !life)
                                                continue;
                                        json_array_append_new(hs, json_pack("{s:s,s:s,s:b,s:I,s:I}", "version",
                                                                            hsm_tls_version_name(v), "result",
                                                                            res ? "error" : "ok", "resumed", rs,
                                                                            "since_start", (json_int_t)n, "lifetime",
                                                                            (json_int_t)life));
                                }
                struct lkeys lk = { a, json_array(), c };
                if (!a->store || hsm_store_listener_keys(a->store, li.name, add_lkey, &lk) < 0)
                        for (unsigned k = 0; k < HSM_HS_KEYS; k++)
                                if (__atomic_load_n(&c->keys[k].state, __ATOMIC_ACQUIRE) == 2) {
                                        uint64_t n = __atomic_load_n(&c->keys[k].handshakes, __ATOMIC_RELAXED);
                                        add_lkey(c->keys[k].uri, n, n, &lk);
                                }
                json_array_append_new(arr, json_pack("{s:s,s:s,s:I,s:I,s:o,s:o}", "name", li.name, "kind", li.kind,
                                                     "handshakes_ok", (json_int_t)ok, "handshakes_failed",
                                                     (json_int_t)failed, "handshakes", hs, "keys", lk.arr));
        }
        return arr;
}

/* The key's failures by operation, mechanism and reason: the non-zero
 * ones, since start or over the lifetime. */
static json_t *key_failures(hsm_admin *a, const char *tok, hsm_key *k)
{
        json_t *arr = json_array();
        uint64_t life[HSM_OP__MAX][HSM_MECH__MAX][HSM_REASON__MAX];
        bool kept = a->store && hsm_store_failure_lifetimes(a->store, tok, hsm_key_uri(k), life) == 0;
        for (int o = 0; o < HSM_OP__MAX; o++)
                for (int m = 0; m < HSM_MECH__MAX; m++)
                        for (int w = HSM_REASON_NONE + 1; w < HSM_REASON__MAX; w++) {
                                uint64_t n = hsm_usage_failures(hsm_key_usage(k), o, m, w);
                                uint64_t l = kept ? life[o][m][w] : n;
                                if (!n && !l)
                                        continue;
                                json_array_append_new(arr, json_pack("{s:s,s:s,s:s,s:I,s:I}", "op", hsm_op_name(o),
                                                                     "mechanism", hsm_mech_name(m), "reason",
                                                                     hsm_reason_name(w), "since_start", (json_int_t)n,
                                                                     "lifetime", (json_int_t)l));
                        }
        return arr;
}

int route_usage(struct req *r)
{
        hsm_admin *a = r->a;
        const char *only = req_query(r, "token");
        if (only && !admin_find_token(a, only))
                return req_error(r, 404, "not_found", "token", "no token named '%.100s'", only);
        json_t *keys = json_array();
        for (unsigned i = 0; i < hsm_keystore_n_keys(a->ks); i++) {
                hsm_key *k = hsm_keystore_key(a->ks, i);
                const char *tok = hsm_keystore_token_name(a->ks, i);
                if (only && strcmp(only, tok) != 0)
                        continue;
                hsm_usage_entry e[HSM_OP__MAX * HSM_MECH__MAX * HSM_RESULT__MAX];
                int n = hsm_usage_snapshot(hsm_key_usage(k), e, (int)(sizeof(e) / sizeof(e[0])));
                json_t *counters = json_array();
                for (int j = 0; j < n; j++) {
                        int64_t life = a->store ? hsm_store_lifetime(a->store, tok, hsm_key_uri(k), e[j].op, e[j].mech,
                                                                     e[j].result)
                                                : -1;
                        uint64_t hist[HSM_USAGE_BUCKETS];
                        hsm_usage_histogram(hsm_key_usage(k), e[j].op, e[j].mech, e[j].result, hist);
                        uint64_t p50 = hsm_usage_quantile_ns(hist, 0.5), p99 = hsm_usage_quantile_ns(hist, 0.99);
                        /* past the last bucket: the maximum is the best bound */
                        p50 = p50 == UINT64_MAX ? e[j].max_ns : p50;
                        p99 = p99 == UINT64_MAX ? e[j].max_ns : p99;
                        json_array_append_new(
                                counters,
                                json_pack("{s:s,s:s,s:s,s:I,s:I,s:f,s:f,s:f,s:f}", "op", hsm_op_name(e[j].op),
                                          "mechanism", hsm_mech_name(e[j].mech), "result", hsm_result_name(e[j].result),
                                          "since_start", (json_int_t)e[j].count, "lifetime",
                                          (json_int_t)(life >= 0 ? (uint64_t)life : e[j].count), "total_seconds",
                                          (double)e[j].total_ns / 1e9, "max_seconds", (double)e[j].max_ns / 1e9,
                                          "p50_seconds", (double)p50 / 1e9, "p99_seconds", (double)p99 / 1e9));
                }
                /* Counters seen only in earlier runs. */
                if (a->store)
                        for (int o = 0; o < HSM_OP__MAX; o++)
                                for (int m = 0; m < HSM_MECH__MAX; m++)
                                        for (int s = 0; s < HSM_RESULT__MAX; s++) {
                                                bool seen = false;
                                                for (int j = 0; j < n; j++)
                                                        if ((int)e[j].op == o && (int)e[j].mech == m && (int)e[j].result == s)
                                                                seen = true;
                                                int64_t life = hsm_store_lifetime(a->store, tok, hsm_key_uri(k), o, m, s);
                                                if (seen || life <= 0)
                                                        continue;
                                                json_array_append_new(
                                                        counters,
                                                        json_pack("{s:s,s:s,s:s,s:I,s:I,s:f,s:f,s:f,s:f}", "op",
                                                                  hsm_op_name(o), "mechanism", hsm_mech_name(m),
                                                                  "result", hsm_result_name(s), "since_start",
                                                                  (json_int_t)0, "lifetime", (json_int_t)life,
                                                                  "total_seconds", 0.0, "max_seconds", 0.0,
                                                                  "p50_seconds", 0.0, "p99_seconds", 0.0));
                                        }
                uint64_t wh[HSM_USAGE_BUCKETS], wn, wt;
                hsm_usage_waits(hsm_key_usage(k), wh, &wn, &wt);
                uint64_t w50 = hsm_usage_quantile_ns(wh, 0.5), w99 = hsm_usage_quantile_ns(wh, 0.99);
                /* past the last bucket (5 s): the bound is the last one */
                w50 = w50 == UINT64_MAX ? hsm_usage_bucket_ns[HSM_USAGE_BUCKETS - 2] : w50;
                w99 = w99 == UINT64_MAX ? hsm_usage_bucket_ns[HSM_USAGE_BUCKETS - 2] : w99;
                uint64_t last = hsm_usage_last_use(hsm_key_usage(k));
                json_t *lu = json_null();
                if (last) {
                        char when[40];
                        fmt_time((int64_t)(last / 1000000000u), when, sizeof(when));
                        lu = json_string(when);
                }
                json_array_append_new(keys, json_pack("{s:s,s:s,s:s,s:o,s:o,s:{s:I,s:f,s:f,s:f},s:o}", "token", tok,
                                                      "label", hsm_key_label(k), "uri", hsm_key_uri(k), "counters",
                                                      counters, "failures", key_failures(a, tok, k), "session_wait", "count", (json_int_t)wn, "total_seconds",
                                                      (double)wt / 1e9, "p50_seconds", (double)w50 / 1e9, "p99_seconds",
                                                      (double)w99 / 1e9, "last_use", lu));
        }
        if (only)
                /* ?token=: the keys of that token, and no listeners */
                return reply_usage(r, keys, json_array());
        return reply_usage(r, keys, admin_usage_listeners(a));
}
