/* hsmtls-load: a TLS handshake load generator (GnuTLS, threads).
 *
 * Handshake mode (default): --threads threads each open connections back to
 * back, for --duration seconds or until --count connections were made.  Each
 * connection is a full handshake (no tickets, no resumption, a fresh
 * session; with --resume RATIO that share of them resumes the session of
 * the thread's latest connection instead, by ticket or session ID, as the
 * server offers), then --requests HTTP/1.1 GET requests on the kept-alive
 * connection, then close_notify.  The handshake latency runs from the start
 * of connect() to the end of gnutls_handshake(); a request's round trip from
 * its first byte sent to the last byte of its response read.
 *
 * Keep-alive probe mode (--keepalive-probes): --connections connections are
 * opened once and kept; every --interval-ms each sends one request and
 * measures its round trip.  This shows how established connections fare
 * while another load generator hammers handshakes.
 *
 * The generator is closed-loop: a thread starts its next connection when the
 * previous one ends, so a slow server lowers the offered load.  Every
 * latency is measured on the client and includes the client's own work.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include "load.h"

#define MAX_THREADS 4096

/* ------------------------------------------------------------- options */

struct load_options opt = {
        .confirm = true,
        .threads = 16,
        .path = "/",
        .connections = 10,
        .interval_ms = 100,
        .timeout = 10,
};

struct addrinfo *target;
gnutls_certificate_credentials_t cred;
gnutls_priority_t prio;
const char *prio_string;
const char *verify_name;
const char *sni_name;
const char *host_header;
atomic_bool stop;
FILE *leaf_log;

/* -------------------------------------------------------------- set up */

static void usage(FILE *f)
{
        fputs("Usage: hsmtls-load --connect HOST:PORT [options]\n"
              "\n"
              "Handshake mode (default): threads open full TLS handshakes back to back.\n"
              "  --connect HOST:PORT    server to load ([v6addr]:PORT for IPv6)\n"
              "  --sni NAME             server name to send and to verify (default: HOST if it\n"
              "                         is a name, none if an address; --sni '' sends none)\n"
              "  --cafile FILE          trust these CA certificates (default: the system's)\n"
              "  --insecure             do not verify the server certificate\n"
              "  --cert FILE --key FILE client certificate chain and its key\n"
              "  --tls 1.2|1.3          only this protocol version (default: what NORMAL allows)\n"
              "  --priority STRING      GnuTLS priority string (overrides --tls)\n"
              "  --threads N            parallel connections (default 16)\n"
              "  --duration SECONDS     run this long (default 10 unless --count)\n"
              "  --count N              make N connections in all\n"
              "  --requests N           HTTP/1.1 GET requests per connection after the handshake\n"
              "                         (default 0: handshake, then close_notify)\n"
              "  --path PATH            request path (default /)\n"
              "  --host-header NAME     Host header (default: SNI name or HOST)\n"
              "  --timeout SECONDS      per connect, handshake and request (default 10)\n"
              "  --no-confirm           TLS 1.3 without --requests: close at once; by default\n"
              "                         the client sends close_notify and waits for the server's\n"
              "                         answer, to see a rejection (of a client certificate)\n"
              "                         that TLS 1.3 reports only after the client finished\n"
              "  --resume RATIO         this share (0 to 1) of the handshakes resume the session\n"
              "                         of the thread's latest connection (ticket or session ID);\n"
              "                         the rest are full (default 0: all full, no tickets).\n"
              "                         TLS 1.3 tickets come after the handshake: needs --requests\n"
              "                         or the default close_notify wait (not --no-confirm)\n"
              "\n"
              "Keep-alive probe mode:\n"
              "  --keepalive-probes     keep --connections connections open and send one\n"
              "                         request on each every --interval-ms\n"
              "  --connections C        (default 10)\n"
              "  --interval-ms MS       (default 100)\n"
              "  --duration/--count     run this long / this many probes per connection\n"
              "\n"
              "Output:\n"
              "  --json                 one JSON object instead of text\n"
              "  --verbose              print every error to stderr\n"
              "  --leaf-log FILE        append the SHA-256 fingerprint of the server's leaf\n"
              "                         certificate, one line per handshake\n"
              "\n"
              "Exit status: 0 no error, 1 some connections or requests failed, 2 bad usage.\n",
              f);
}

static int parse_ulong(const char *name, const char *s, unsigned long min, unsigned long max, unsigned long *ret)
{
        unsigned long v;
        char *end;

        errno = 0;
        v = strtoul(s, &end, 10);
        if (errno || end == s || *end || *s == '-' || v < min || v > max) {
                fprintf(stderr, "hsmtls-load: %s must be a number from %lu to %lu, not '%s'\n", name, min, max, s);
                return -1;
        }
        *ret = v;
        return 0;
}

static int parse_seconds(const char *name, const char *s, double *ret)
{
        char *end;
        double v;

        errno = 0;
        v = strtod(s, &end);
        if (errno || end == s || *end || !(v > 0) || v > 86400 * 7) {
                fprintf(stderr, "hsmtls-load: %s must be a positive number of seconds, not '%s'\n", name, s);
                return -1;
        }
        *ret = v;
        return 0;
}

static bool is_address(const char *host)
{
        struct in6_addr a6;
        struct in_addr a4;

        return inet_pton(AF_INET, host, &a4) == 1 || inet_pton(AF_INET6, host, &a6) == 1;
}

static int parse_connect(void)
{
        const char *s = opt.connect, *colon;
        struct addrinfo hints = { .ai_socktype = SOCK_STREAM };
        int r;

        if (s[0] == '[') {
                const char *close = strchr(s, ']');
                if (!close || close[1] != ':')
                        goto bad;
                opt.host = strndup(s + 1, (size_t)(close - s - 1));
                opt.port = strdup(close + 2);
        } else {
                colon = strrchr(s, ':');
                if (!colon || colon == s || strchr(s, ':') != colon)
                        goto bad;
                opt.host = strndup(s, (size_t)(colon - s));
                opt.port = strdup(colon + 1);
        }
        if (!opt.host || !opt.port || !*opt.port)
                goto bad;
        r = getaddrinfo(opt.host, opt.port, &hints, &target);
        if (r != 0) {
                fprintf(stderr, "hsmtls-load: cannot resolve %s: %s\n", opt.connect, gai_strerror(r));
                return -1;
        }
        return 0;
bad:
        fprintf(stderr, "hsmtls-load: --connect wants HOST:PORT or [ADDRESS]:PORT, not '%s'\n", s);
        return -1;
}

static void on_signal(int sig)
{
        atomic_store(&stop, true);
}

enum {
        OPT_CONNECT = 256, OPT_SNI, OPT_CAFILE, OPT_INSECURE, OPT_THREADS, OPT_DURATION, OPT_COUNT,
        OPT_TLS, OPT_PRIORITY, OPT_CERT, OPT_KEY, OPT_REQUESTS, OPT_PATH, OPT_HOST_HEADER,
        OPT_PROBES, OPT_CONNECTIONS, OPT_INTERVAL, OPT_TIMEOUT, OPT_JSON, OPT_VERBOSE, OPT_NO_CONFIRM,
        OPT_LEAF_LOG,
        OPT_RESUME,
};

static int parse_args(int argc, char **argv)
{
        static const struct option longopts[] = {
                { "connect", required_argument, NULL, OPT_CONNECT },
                { "sni", required_argument, NULL, OPT_SNI },
                { "cafile", required_argument, NULL, OPT_CAFILE },
                { "insecure", no_argument, NULL, OPT_INSECURE },
                { "threads", required_argument, NULL, OPT_THREADS },
                { "duration", required_argument, NULL, OPT_DURATION },
                { "count", required_argument, NULL, OPT_COUNT },
                { "tls", required_argument, NULL, OPT_TLS },
                { "priority", required_argument, NULL, OPT_PRIORITY },
                { "cert", required_argument, NULL, OPT_CERT },
                { "key", required_argument, NULL, OPT_KEY },
                { "requests", required_argument, NULL, OPT_REQUESTS },
                { "path", required_argument, NULL, OPT_PATH },
                { "host-header", required_argument, NULL, OPT_HOST_HEADER },
                { "keepalive-probes", no_argument, NULL, OPT_PROBES },
                { "connections", required_argument, NULL, OPT_CONNECTIONS },
                { "interval-ms", required_argument, NULL, OPT_INTERVAL },
                { "timeout", required_argument, NULL, OPT_TIMEOUT },
                { "json", no_argument, NULL, OPT_JSON },
                { "verbose", no_argument, NULL, OPT_VERBOSE },
                { "no-confirm", no_argument, NULL, OPT_NO_CONFIRM },
                { "leaf-log", required_argument, NULL, OPT_LEAF_LOG },
                { "resume", required_argument, NULL, OPT_RESUME },
                { "help", no_argument, NULL, 'h' },
                { NULL, 0, NULL, 0 },
        };
        unsigned long v;
        int c;

        while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
                switch (c) {
                case OPT_CONNECT: opt.connect = optarg; break;
                case OPT_SNI: opt.sni = optarg; break;
                case OPT_CAFILE: opt.cafile = optarg; break;
                case OPT_INSECURE: opt.insecure = true; break;
                case OPT_THREADS:
                        if (parse_ulong("--threads", optarg, 1, MAX_THREADS, &v) < 0)
                                return -1;
                        opt.threads = (unsigned)v;
                        break;
                case OPT_DURATION:
                        if (parse_seconds("--duration", optarg, &opt.duration) < 0)
                                return -1;
                        break;
                case OPT_COUNT:
                        if (parse_ulong("--count", optarg, 1, ULONG_MAX / 2, &opt.count) < 0)
                                return -1;
                        break;
                case OPT_TLS:
                        if (strcmp(optarg, "1.2") != 0 && strcmp(optarg, "1.3") != 0) {
                                fprintf(stderr, "hsmtls-load: --tls must be 1.2 or 1.3\n");
                                return -1;
                        }
                        opt.tls = optarg;
                        break;
                case OPT_PRIORITY: opt.priority = optarg; break;
                case OPT_CERT: opt.cert = optarg; break;
                case OPT_KEY: opt.key = optarg; break;
                case OPT_REQUESTS:
                        if (parse_ulong("--requests", optarg, 0, 1000000, &v) < 0)
                                return -1;
                        opt.requests = (unsigned)v;
                        break;
                case OPT_PATH: opt.path = optarg; break;
                case OPT_HOST_HEADER: opt.host_header = optarg; break;
                case OPT_PROBES: opt.probes = true; break;
                case OPT_CONNECTIONS:
                        if (parse_ulong("--connections", optarg, 1, MAX_THREADS, &v) < 0)
                                return -1;
                        opt.connections = (unsigned)v;
                        break;
                case OPT_INTERVAL:
                        if (parse_ulong("--interval-ms", optarg, 1, 3600000, &v) < 0)
                                return -1;
                        opt.interval_ms = (unsigned)v;
                        break;
                case OPT_TIMEOUT:
                        if (parse_seconds("--timeout", optarg, &opt.timeout) < 0)
                                return -1;
                        break;
                case OPT_JSON: opt.json = true; break;
                case OPT_VERBOSE: opt.verbose = true; break;
                case OPT_NO_CONFIRM: opt.confirm = false; break;
                case OPT_LEAF_LOG:
                        if (!(leaf_log = fopen(optarg, "ae"))) {
                                fprintf(stderr, "hsmtls-load: --leaf-log %s: %s\n", optarg, strerror(errno));
                                return -1;
                        }
                        opt.leaf_log = optarg;
                        break;
                case OPT_RESUME: {
                        char *end;
                        errno = 0;
                        opt.resume = strtod(optarg, &end);
                        if (errno || end == optarg || *end || !(opt.resume >= 0 && opt.resume <= 1)) {
                                fprintf(stderr, "hsmtls-load: --resume must be a ratio from 0 to 1, not '%s'\n", optarg);
                                return -1;
                        }
                        break;
                }
                case 'h':
                        usage(stdout);
                        exit(0);
                default:
                        usage(stderr);
                        return -1;
                }
        }
        if (optind < argc) {
                fprintf(stderr, "hsmtls-load: unexpected argument '%s'\n", argv[optind]);
                return -1;
        }
        if (opt.resume > 0 && opt.probes) {
                fprintf(stderr, "hsmtls-load: --resume is for handshake mode, not --keepalive-probes\n");
                return -1;
        }
        if (!opt.connect) {
                fprintf(stderr, "hsmtls-load: --connect HOST:PORT is required\n");
                usage(stderr);
                return -1;
        }
        if (opt.cafile && opt.insecure) {
                fprintf(stderr, "hsmtls-load: --cafile and --insecure exclude each other\n");
                return -1;
        }
        if (!opt.cert != !opt.key) {
                fprintf(stderr, "hsmtls-load: --cert and --key go together\n");
                return -1;
        }
        if (opt.path[0] != '/' || strpbrk(opt.path, " \r\n")) {
                fprintf(stderr, "hsmtls-load: --path must start with / and hold no spaces or line breaks\n");
                return -1;
        }
        if (opt.host_header && strpbrk(opt.host_header, "\r\n")) {
                fprintf(stderr, "hsmtls-load: --host-header must not hold line breaks\n");
                return -1;
        }
        if (opt.probes && opt.requests) {
                fprintf(stderr, "hsmtls-load: --requests is for handshake mode; a probe is one request\n");
                return -1;
        }
        if (opt.duration == 0 && opt.count == 0)
                opt.duration = 10;
        return 0;
}

static int setup_tls(void)
{
        static char prio_buf[512];
        const char *errpos = NULL;
        int ret;

        if ((ret = gnutls_global_init()) < 0 ||
            (ret = gnutls_certificate_allocate_credentials(&cred)) < 0) {
                fprintf(stderr, "hsmtls-load: GnuTLS: %s\n", gnutls_strerror(ret));
                return -1;
        }
        if (opt.cafile) {
                ret = gnutls_certificate_set_x509_trust_file(cred, opt.cafile, GNUTLS_X509_FMT_PEM);
                if (ret <= 0) {
                        fprintf(stderr, "hsmtls-load: no CA certificate loaded from %s: %s\n", opt.cafile,
                                ret < 0 ? gnutls_strerror(ret) : "the file holds none");
                        return -1;
                }
        } else if (!opt.insecure) {
                ret = gnutls_certificate_set_x509_system_trust(cred);
                if (ret <= 0) {
                        fprintf(stderr, "hsmtls-load: no system CA certificates (%s); use --cafile or --insecure\n",
                                ret < 0 ? gnutls_strerror(ret) : "none found");
                        return -1;
                }
        }
        if (opt.cert) {
                ret = gnutls_certificate_set_x509_key_file2(cred, opt.cert, opt.key, GNUTLS_X509_FMT_PEM, NULL, 0);
                if (ret < 0) {
                        fprintf(stderr, "hsmtls-load: cannot load --cert %s / --key %s: %s\n", opt.cert, opt.key,
                                gnutls_strerror(ret));
                        return -1;
                }
        }

        if (opt.priority) {
                if (opt.tls)
                        fprintf(stderr, "hsmtls-load: --priority given, --tls %s is ignored\n", opt.tls);
                prio_string = opt.priority;
        } else if (opt.tls) {
                snprintf(prio_buf, sizeof(prio_buf), "NORMAL:-VERS-ALL:+VERS-TLS%s", opt.tls);
                prio_string = prio_buf;
        } else {
                prio_string = "NORMAL";
        }
        ret = gnutls_priority_init2(&prio, prio_string, &errpos, 0);
        if (ret < 0) {
                fprintf(stderr, "hsmtls-load: bad priority string '%s' at '%s': %s\n", prio_string,
                        errpos ? errpos : "", gnutls_strerror(ret));
                return -1;
        }

        if (opt.sni)
                sni_name = opt.sni[0] ? opt.sni : NULL;
        else
                sni_name = is_address(opt.host) ? NULL : opt.host;
        if (!opt.insecure)
                verify_name = opt.sni && opt.sni[0] ? opt.sni : opt.host;
        host_header = opt.host_header ? opt.host_header : sni_name ? sni_name : opt.host;
        return 0;
}

int main(int argc, char **argv)
{
        struct worker *workers;
        struct samples hs = { 0 }, rq = { 0 };
        struct totals t = { 0 };
        unsigned nthreads, started = 0;
        struct sigaction sa = { .sa_handler = on_signal };
        sigset_t block, old;
        double elapsed_ms;
        pthread_attr_t attr;

        setvbuf(stdout, NULL, _IOLBF, 0);
        if (parse_args(argc, argv) < 0)
                return 2;
        if (parse_connect() < 0 || setup_tls() < 0)
                return 2;

        signal(SIGPIPE, SIG_IGN);
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGTERM, &sa, NULL);

        nthreads = opt.probes ? opt.connections : opt.threads;
        workers = calloc(nthreads, sizeof(*workers));
        if (!workers) {
                fprintf(stderr, "hsmtls-load: out of memory\n");
                return 2;
        }
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 512 * 1024);

        /* Workers leave SIGINT and SIGTERM to the main thread. */
        sigemptyset(&block);
        sigaddset(&block, SIGINT);
        sigaddset(&block, SIGTERM);
        pthread_sigmask(SIG_BLOCK, &block, &old);
        clock_gettime(CLOCK_MONOTONIC, &t_start);
        for (unsigned i = 0; i < nthreads; i++) {
                workers[i].index = i;
                if (pthread_create(&workers[i].thread, &attr, opt.probes ? probe_worker : handshake_worker,
                                   &workers[i]) != 0) {
                        fprintf(stderr, "hsmtls-load: cannot start thread %u of %u\n", i + 1, nthreads);
                        atomic_store(&stop, true);
                        break;
                }
                started++;
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        pthread_attr_destroy(&attr);

        if (opt.duration > 0) {
                struct timespec until = t_start;
                timespec_add_ms(&until, opt.duration * 1000);
                while (!atomic_load(&stop) &&
                       clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL) == EINTR)
                        ;
                atomic_store(&stop, true);
        }
        for (unsigned i = 0; i < started; i++)
                pthread_join(workers[i].thread, NULL);
        elapsed_ms = since_start_ms();

        if (collect_results(workers, started, &hs, &rq, &t) < 0) {
                fprintf(stderr, "hsmtls-load: out of memory\n");
                return 2;
        }
        t.threads = started;
        t.secs = elapsed_ms / 1e3;
        print_report(&hs, &rq, &t);

        free(hs.v);
        free(rq.v);
        free(workers);
        gnutls_priority_deinit(prio);
        gnutls_certificate_free_credentials(cred);
        freeaddrinfo(target);
        free(opt.host);
        free(opt.port);
        gnutls_global_deinit();
        return t.errors ? 1 : 0;
}
