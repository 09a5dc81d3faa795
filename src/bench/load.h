/* hsmtls-load: what its parts share.
 *
 *   hsmtls-load.c  main(), options, TLS set-up, starting and joining threads
 *   load-conn.c    connections, handshakes, HTTP requests, the worker threads
 *   load-stats.c   clocks, errors, latency samples, percentiles, the report
 */
#pragma once

#include <netdb.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <time.h>

#include <gnutls/gnutls.h>

/* ------------------------------------------------------------- options */

struct load_options {
        const char *connect;
        char *host;            /* from --connect, brackets removed */
        char *port;
        const char *sni;       /* NULL: host if it is a name; "": none */
        const char *cafile;
        bool insecure;
        unsigned threads;
        double duration;       /* seconds; 0 = not set */
        unsigned long count;   /* 0 = not set */
        const char *tls;
        const char *priority;
        const char *cert, *key;
        unsigned requests;
        const char *path;
        const char *host_header;
        bool probes;
        unsigned connections;
        unsigned interval_ms;
        double timeout;
        bool json;
        bool verbose;
        bool confirm;
        const char *leaf_log;  /* --leaf-log FILE */
        double resume;         /* --resume RATIO: share of handshakes that resume; 0: none (no tickets) */
};

/* In hsmtls-load.c: set up before the threads start, read-only after. */
extern struct load_options opt;
extern struct addrinfo *target;
extern gnutls_certificate_credentials_t cred;
extern gnutls_priority_t prio;
extern const char *prio_string;
extern const char *verify_name;     /* NULL: no verification */
extern const char *sni_name;        /* NULL: no SNI */
extern const char *host_header;
extern atomic_bool stop;
extern FILE *leaf_log;              /* --leaf-log: the server's leaf per handshake */

/* ------------------------------------------------------------- results */

struct samples {
        double *v;
        size_t n, cap;
};

struct worker {
        pthread_t thread;
        unsigned index;
        struct samples hs;      /* handshake latencies, ms */
        struct samples rq;      /* request round trips, ms */
        unsigned long connections;
        unsigned long errors_connect, errors_handshake, errors_request;
        unsigned long late;     /* probes sent more than one interval late */
        /* --resume: the session of this thread's latest connection, and how
         * many handshakes offered it / were resumed by the server */
        gnutls_datum_t saved;
        double resume_acc;
        unsigned long resume_offered, resumed;
};

/* The workers' counts added up. */
struct totals {
        unsigned threads;       /* threads started */
        double secs;            /* elapsed */
        unsigned long connections;
        unsigned long errors, errors_connect, errors_handshake, errors_request;
        unsigned long late;
        unsigned long resume_offered, resumed;
};

/* In load-stats.c. */
extern pthread_mutex_t err_lock;
extern char negotiated[256];
extern struct timespec t_start;

int samples_add(struct samples *s, double ms);
double now_ms(void);
double since_start_ms(void);
void timespec_add_ms(struct timespec *t, double ms);
void record_error(unsigned long *counter, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int collect_results(struct worker *workers, unsigned started, struct samples *hs, struct samples *rq,
                    struct totals *t);
void print_report(const struct samples *hs, const struct samples *rq, const struct totals *t);

/* ------------------------------------------------------- worker threads */

/* In load-conn.c; ARG is the thread's struct worker. */
void *handshake_worker(void *arg);
void *probe_worker(void *arg);
