/* GET /v1/usage: per key (the keys the listeners use), since start and
 * lifetime (the state database adds earlier runs). */
#include "internal.h"

#include <string.h>

#include "usage.h"

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
                json_array_append_new(keys, json_pack("{s:s,s:s,s:s,s:o}", "token", tok, "label", hsm_key_label(k),
                                                      "uri", hsm_key_uri(k), "counters", counters));
        }
        char started[40];
        fmt_time(a->started_unix, started, sizeof(started));
        /* Handshakes per listener are not counted yet (README, Admin API). */
        return req_reply(r, 200, json_pack("{s:s,s:o,s:[]}", "started", started, "keys", keys, "listeners"));
}
