/* GET /v1/audit (paging), /v1/audit/verify. */
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

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
