/* e2e backend: a tiny plaintext server for the end-to-end tests.
 *
 * Binds 127.0.0.1 on a port the kernel picks, prints "PORT <n>" on stdout
 * and serves until killed, one thread per connection.
 *
 * A connection whose first bytes look like an HTTP/1.x request line is
 * served as HTTP: every request on the kept-alive connection is answered
 * with "200 OK" and the body "hello from backend: <request line>\n"; a
 * request body (Content-Length) is read and discarded; "Connection: close"
 * (or HTTP/1.0 without keep-alive) closes after the answer.
 * Anything else is echoed back byte for byte until the peer closes its side
 * (then the write side is shut down too, so the peer sees EOF).
 *
 * Usage: backend [--quiet]      (--quiet: no per-connection log on stderr)
 */
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define HDR_MAX 16384

static int verbose = 1;

static int write_all(int fd, const void *buf, size_t len)
{
        const char *p = buf;
        while (len > 0) {
                ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -1;
                }
                p += n;
                len -= (size_t)n;
        }
        return 0;
}

static void echo_loop(int fd, const char *first, size_t first_len)
{
        char buf[65536];
        unsigned long long total = first_len;
        if (first_len && write_all(fd, first, first_len) < 0)
                return;
        for (;;) {
                ssize_t n = recv(fd, buf, sizeof(buf), 0);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        break;
                total += (unsigned long long)n;
                if (write_all(fd, buf, (size_t)n) < 0)
                        return;
        }
        shutdown(fd, SHUT_WR);
        if (verbose)
                fprintf(stderr, "backend: echo connection done, %llu bytes\n", total);
}

static char *find_hdr_end(char *b, size_t n)
{
        for (size_t i = 0; i + 3 < n; i++)
                if (b[i] == '\r' && b[i + 1] == '\n' && b[i + 2] == '\r' && b[i + 3] == '\n')
                        return b + i + 4;
        for (size_t i = 0; i + 1 < n; i++)
                if (b[i] == '\n' && b[i + 1] == '\n')
                        return b + i + 2;
        return NULL;
}

/* Case-insensitive header lookup in [hdrs, end): returns the value (trimmed) in out. */
static int header_value(const char *hdrs, const char *end, const char *name, char *out, size_t out_size)
{
        size_t nl = strlen(name);
        const char *p = hdrs;
        while (p < end) {
                const char *eol = memchr(p, '\n', (size_t)(end - p));
                if (!eol)
                        eol = end;
                if ((size_t)(eol - p) > nl && strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
                        const char *v = p + nl + 1;
                        while (v < eol && (*v == ' ' || *v == '\t'))
                                v++;
                        const char *ve = eol;
                        while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t'))
                                ve--;
                        size_t l = (size_t)(ve - v);
                        if (l >= out_size)
                                l = out_size - 1;
                        memcpy(out, v, l);
                        out[l] = 0;
                        return 1;
                }
                p = eol + 1;
        }
        return 0;
}

static void http_loop(int fd, char *buf, size_t len)
{
        unsigned requests = 0;
        for (;;) {
                char *end;
                while (!(end = find_hdr_end(buf, len))) {
                        if (len >= HDR_MAX) {
                                static const char tl[] = "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                                write_all(fd, tl, sizeof(tl) - 1);
                                goto out;
                        }
                        ssize_t n = recv(fd, buf + len, HDR_MAX - len, 0);
                        if (n < 0 && errno == EINTR)
                                continue;
                        if (n <= 0)
                                goto out;
                        len += (size_t)n;
                }
                /* Request line. */
                char *eol = memchr(buf, '\n', (size_t)(end - buf));
                size_t rl_len = (size_t)(eol - buf);
                if (rl_len && buf[rl_len - 1] == '\r')
                        rl_len--;
                char line[1024];
                if (rl_len >= sizeof(line))
                        rl_len = sizeof(line) - 1;
                memcpy(line, buf, rl_len);
                line[rl_len] = 0;

                char v[256];
                int close_after = 0;
                int http10 = strstr(line, "HTTP/1.0") != NULL;
                if (header_value(eol + 1, end, "Connection", v, sizeof(v))) {
                        if (strcasestr(v, "close"))
                                close_after = 1;
                        else if (http10 && strcasestr(v, "keep-alive"))
                                http10 = 0;
                }
                if (http10)
                        close_after = 1;
                unsigned long long body = 0;
                if (header_value(eol + 1, end, "Content-Length", v, sizeof(v)))
                        body = strtoull(v, NULL, 10);

                /* Drop the header and the body from the buffer. */
                size_t used = (size_t)(end - buf);
                memmove(buf, end, len - used);
                len -= used;
                while (body > 0) {
                        if (len > 0) {
                                size_t k = body < len ? (size_t)body : len;
                                memmove(buf, buf + k, len - k);
                                len -= k;
                                body -= k;
                                continue;
                        }
                        ssize_t n = recv(fd, buf, HDR_MAX, 0);
                        if (n < 0 && errno == EINTR)
                                continue;
                        if (n <= 0)
                                goto out;
                        len = (size_t)n;
                }

                char resp[2048];
                int bl = (int)strlen(line) + (int)strlen("hello from backend: \n");
                int n = snprintf(resp, sizeof(resp),
                                 "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n"
                                 "hello from backend: %s\n",
                                 bl, close_after ? "Connection: close\r\n" : "", line);
                if (write_all(fd, resp, (size_t)n) < 0)
                        goto out;
                requests++;
                if (close_after)
                        break;
        }
out:
        if (verbose)
                fprintf(stderr, "backend: http connection done, %u requests\n", requests);
}

static void *serve(void *arg)
{
        int fd = (int)(intptr_t)arg;
        char *buf = malloc(HDR_MAX);
        size_t len = 0;
        int http = -1;
        if (!buf)
                goto out;
        /* Decide on the first bytes: an upper-case word followed by a space is HTTP. */
        while (http < 0) {
                ssize_t n = recv(fd, buf + len, HDR_MAX - len, 0);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        goto out;
                len += (size_t)n;
                size_t i = 0;
                while (i < len && i < 16 && isupper((unsigned char)buf[i]))
                        i++;
                if (i == 0 || i == 16 || (i < len && buf[i] != ' '))
                        http = 0;
                else if (i < len)
                        http = 1;
                /* else: only upper-case letters so far, read more */
        }
        if (http)
                http_loop(fd, buf, len);
        else
                echo_loop(fd, buf, len);
out:
        free(buf);
        close(fd);
        return NULL;
}

int main(int argc, char **argv)
{
        for (int i = 1; i < argc; i++) {
                if (strcmp(argv[i], "--quiet") == 0)
                        verbose = 0;
                else {
                        fprintf(stderr, "usage: %s [--quiet]\n", argv[0]);
                        return 2;
                }
        }
        signal(SIGPIPE, SIG_IGN);
        int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (lfd < 0) {
                perror("backend: socket");
                return 1;
        }
        int one = 1;
        setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = 0 };
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 512) < 0) {
                perror("backend: bind/listen");
                return 1;
        }
        socklen_t sl = sizeof(sa);
        if (getsockname(lfd, (struct sockaddr *)&sa, &sl) < 0) {
                perror("backend: getsockname");
                return 1;
        }
        printf("PORT %u\n", ntohs(sa.sin_port));
        fflush(stdout);

        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        for (;;) {
                int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
                if (fd < 0) {
                        if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE)
                                continue;
                        perror("backend: accept");
                        return 1;
                }
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                pthread_t t;
                if (pthread_create(&t, &attr, serve, (void *)(intptr_t)fd) != 0) {
                        close(fd);
                        continue;
                }
        }
}
