/* hsmtls-load: clocks, error counting, latency samples, percentiles and the
 * report (text or JSON). */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "load.h"

/* ------------------------------------------------------------- results */

int samples_add(struct samples *s, double ms)
{
        if (s->n == s->cap) {
                size_t cap = s->cap ? s->cap * 2 : 1024;
                double *v = realloc(s->v, cap * sizeof(*v));
                if (!v)
                        return -ENOMEM;
                s->v = v;
                s->cap = cap;
        }
        s->v[s->n++] = ms;
        return 0;
}

static int samples_merge(struct samples *into, const struct samples *from)
{
        for (size_t i = 0; i < from->n; i++)
                if (samples_add(into, from->v[i]) < 0)
                        return -ENOMEM;
        return 0;
}

static int cmp_double(const void *a, const void *b)
{
        double x = *(const double *)a, y = *(const double *)b;
        return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of sorted samples. */
static double percentile(const struct samples *s, double q)
{
        size_t rank;

        if (s->n == 0)
                return NAN;
        rank = (size_t)ceil(q * (double)s->n);
        if (rank < 1)
                rank = 1;
        if (rank > s->n)
                rank = s->n;
        return s->v[rank - 1];
}

static double mean(const struct samples *s)
{
        double sum = 0;

        for (size_t i = 0; i < s->n; i++)
                sum += s->v[i];
        return s->n ? sum / (double)s->n : NAN;
}

/* ---------------------------------------------------- clocks and errors */

static atomic_ulong errors_total;
pthread_mutex_t err_lock = PTHREAD_MUTEX_INITIALIZER;
static char first_error[512];
char negotiated[256];
struct timespec t_start;

double now_ms(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

double since_start_ms(void)
{
        return now_ms() - ((double)t_start.tv_sec * 1e3 + (double)t_start.tv_nsec / 1e6);
}

void timespec_add_ms(struct timespec *t, double ms)
{
        long long ns = t->tv_nsec + (long long)(ms * 1e6);

        t->tv_sec += (time_t)(ns / 1000000000LL);
        t->tv_nsec = (long)(ns % 1000000000LL);
}

void record_error(unsigned long *counter, const char *fmt, ...)
{
        char msg[512];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        (*counter)++;
        if (atomic_fetch_add(&errors_total, 1) == 0) {
                pthread_mutex_lock(&err_lock);
                if (!first_error[0])
                        snprintf(first_error, sizeof(first_error), "%s", msg);
                pthread_mutex_unlock(&err_lock);
        }
        if (opt.verbose)
                fprintf(stderr, "hsmtls-load: %.3f s: %s\n", since_start_ms() / 1e3, msg);
}

/* --------------------------------------------------------------- output */

static void json_string(FILE *f, const char *s)
{
        fputc('"', f);
        for (; *s; s++) {
                unsigned char ch = (unsigned char)*s;
                if (ch == '"' || ch == '\\')
                        fprintf(f, "\\%c", ch);
                else if (ch < 0x20)
                        fprintf(f, "\\u%04x", ch);
                else
                        fputc(ch, f);
        }
        fputc('"', f);
}

static void json_number(FILE *f, double v)
{
        if (isnan(v))
                fputs("null", f);
        else
                fprintf(f, "%.3f", v);
}

static void json_latency(FILE *f, const char *name, const struct samples *s)
{
        fprintf(f, ",\"%s\":{\"count\":%zu,\"p50\":", name, s->n);
        json_number(f, percentile(s, 0.50));
        fputs(",\"p90\":", f);
        json_number(f, percentile(s, 0.90));
        fputs(",\"p99\":", f);
        json_number(f, percentile(s, 0.99));
        fputs(",\"max\":", f);
        json_number(f, s->n ? s->v[s->n - 1] : NAN);
        fputs(",\"mean\":", f);
        json_number(f, mean(s));
        fputc('}', f);
}

static void text_latency(const char *name, const struct samples *s)
{
        if (s->n == 0)
                printf("%-15s none\n", name);
        else
                printf("%-15s p50 %.2f  p90 %.2f  p99 %.2f  max %.2f  mean %.2f\n", name,
                       percentile(s, 0.50), percentile(s, 0.90), percentile(s, 0.99), s->v[s->n - 1], mean(s));
}

/* Adds up the workers' samples and counts (and frees the workers' samples),
 * and sorts the samples for percentile().  0, or -ENOMEM. */
int collect_results(struct worker *workers, unsigned started, struct samples *hs, struct samples *rq,
                    struct totals *t)
{
        for (unsigned i = 0; i < started; i++) {
                struct worker *w = &workers[i];
                if (samples_merge(hs, &w->hs) < 0 || samples_merge(rq, &w->rq) < 0)
                        return -ENOMEM;
                t->connections += w->connections;
                t->errors_connect += w->errors_connect;
                t->errors_handshake += w->errors_handshake;
                t->errors_request += w->errors_request;
                t->late += w->late;
                t->resume_offered += w->resume_offered;
                t->resumed += w->resumed;
                gnutls_free(w->saved.data);
                free(w->hs.v);
                free(w->rq.v);
        }
        if (hs->n)
                qsort(hs->v, hs->n, sizeof(double), cmp_double);
        if (rq->n)
                qsort(rq->v, rq->n, sizeof(double), cmp_double);
        t->errors = t->errors_connect + t->errors_handshake + t->errors_request;
        return 0;
}

/* Prints the results to stdout: one JSON object with --json, else text.
 * HS and RQ are sorted. */
void print_report(const struct samples *hs, const struct samples *rq, const struct totals *t)
{
        if (opt.json) {
                printf("{\"mode\":\"%s\",\"connect\":", opt.probes ? "keepalive-probes" : "handshake");
                json_string(stdout, opt.connect);
                printf(",\"sni\":");
                if (sni_name)
                        json_string(stdout, sni_name);
                else
                        fputs("null", stdout);
                printf(",\"priority\":");
                json_string(stdout, prio_string);
                printf(",\"negotiated\":");
                json_string(stdout, negotiated);
                printf(",\"threads\":%u", t->threads);
                if (opt.probes)
                        printf(",\"connections_kept\":%u,\"interval_ms\":%u", opt.connections, opt.interval_ms);
                printf(",\"requests_per_connection\":%u,\"elapsed_s\":%.3f", opt.requests, t->secs);
                printf(",\"connections\":%lu,\"handshakes\":%zu,\"handshakes_per_s\":%.1f", t->connections, hs->n,
                       (double)hs->n / t->secs);
                json_latency(stdout, "handshake_ms", hs);
                if (opt.resume > 0)
                        printf(",\"resume_ratio\":%.3f,\"resume_offered\":%lu,\"resumed\":%lu", opt.resume, t->resume_offered,
                               t->resumed);
                printf(",\"requests\":%zu,\"requests_per_s\":%.1f", rq->n, (double)rq->n / t->secs);
                json_latency(stdout, "request_ms", rq);
                if (opt.probes)
                        printf(",\"late_probes\":%lu", t->late);
                printf(",\"errors\":%lu,\"errors_connect\":%lu,\"errors_handshake\":%lu,\"errors_request\":%lu",
                       t->errors, t->errors_connect, t->errors_handshake, t->errors_request);
                printf(",\"first_error\":");
                if (t->errors)
                        json_string(stdout, first_error);
                else
                        fputs("null", stdout);
                printf("}\n");
        } else {
                printf("target:         %s (sni %s, %s)\n", opt.connect, sni_name ? sni_name : "none",
                       opt.insecure ? "not verified" : "verified");
                printf("priority:       %s\n", prio_string);
                printf("negotiated:     %s\n", negotiated[0] ? negotiated : "-");
                if (opt.probes)
                        printf("mode:           keep-alive probes, %u connections, every %u ms, %.2f s\n",
                               opt.connections, opt.interval_ms, t->secs);
                else
                        printf("mode:           handshakes, %u threads, %u requests each, %.2f s\n", t->threads,
                               opt.requests, t->secs);
                printf("connections:    %lu\n", t->connections);
                if (opt.probes)
                        printf("handshakes:     %zu\n", hs->n);
                else
                        printf("handshakes:     %zu (%.1f/s)\n", hs->n, (double)hs->n / t->secs);
                text_latency("handshake ms:", hs);
                if (opt.resume > 0)
                        printf("resumed:        %lu of %lu offered (--resume %.2f; %.1f%% of handshakes)\n", t->resumed,
                               t->resume_offered, opt.resume, hs->n ? 100.0 * (double)t->resumed / (double)hs->n : 0.0);
                if (opt.requests || opt.probes) {
                        printf("requests:       %zu (%.1f/s)\n", rq->n, (double)rq->n / t->secs);
                        text_latency("request ms:", rq);
                }
                if (opt.probes)
                        printf("late probes:    %lu (sent more than one interval late)\n", t->late);
                printf("errors:         %lu (connect %lu, handshake %lu, request %lu)\n", t->errors,
                       t->errors_connect, t->errors_handshake, t->errors_request);
                if (t->errors)
                        printf("first error:    %s\n", first_error);
        }
}
