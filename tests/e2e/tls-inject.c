/* tls-inject: a TLS client that misbehaves after the handshake, for the
 * end-to-end alert tests.
 *
 *   tls-inject PORT CAFILE SNI PRIORITY MODE
 *
 * Connects to 127.0.0.1:PORT, completes a verified handshake with PRIORITY,
 * sends one good record ("ping\n") and reads its echo (the e2e backend
 * echoes data that is not HTTP), then misbehaves as MODE says:
 *   flip   the next application data record goes out with one bit of its
 *          last byte (inside the authentication tag / MAC) flipped
 *   ccs    a plaintext ChangeCipherSpec record (14 03 03 00 01 01), which
 *          is not allowed after the handshake
 *   reneg  (TLS 1.2) asks for a renegotiation (a new handshake)
 *   none   nothing: sends a second good record (the control case)
 * and then reads what the server answers. It prints one line:
 *   alert NAME       the server sent this fatal alert (GnuTLS's name)
 *   data N           N bytes of application data came back (MODE none)
 *   closed ERROR     the connection ended without an alert
 * Exit status 0 when a line was printed, 2 on a setup error.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gnutls/gnutls.h>

static int corrupt_next;

static ssize_t push(gnutls_transport_ptr_t ptr, const void *data, size_t len)
{
        int fd = (int)(intptr_t)ptr;
        if (corrupt_next && len > 5 && ((const unsigned char *)data)[0] == 23) {
                unsigned char *copy = malloc(len);
                if (!copy)
                        return -1;
                memcpy(copy, data, len);
                copy[len - 1] ^= 0x01;
                corrupt_next = 0;
                ssize_t r = send(fd, copy, len, MSG_NOSIGNAL);
                free(copy);
                return r;
        }
        return send(fd, data, len, MSG_NOSIGNAL);
}

static ssize_t pull(gnutls_transport_ptr_t ptr, void *data, size_t len)
{
        return recv((int)(intptr_t)ptr, data, len, 0);
}

static int pull_timeout(gnutls_transport_ptr_t ptr, unsigned ms)
{
        struct pollfd p = { .fd = (int)(intptr_t)ptr, .events = POLLIN };
        return poll(&p, 1, (int)ms);
}

static int die(const char *what, int r)
{
        fprintf(stderr, "tls-inject: %s: %s\n", what, r < 0 ? gnutls_strerror(r) : strerror(errno));
        return 2;
}

/* Reads until a record arrives, an alert, or the end (5 s at most). */
static void report(gnutls_session_t s)
{
        char buf[4096];
        for (;;) {
                ssize_t n = gnutls_record_recv(s, buf, sizeof(buf));
                if (n > 0) {
                        printf("data %zd\n", n);
                        return;
                }
                if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED)
                        continue;
                if (n == GNUTLS_E_FATAL_ALERT_RECEIVED || n == GNUTLS_E_WARNING_ALERT_RECEIVED) {
                        const char *name = gnutls_alert_get_strname(gnutls_alert_get(s));
                        printf("alert %s\n", name ? name : "?");
                        return;
                }
                printf("closed %s\n", n == 0 ? "EOF" : gnutls_strerror((int)n));
                return;
        }
}

int main(int argc, char **argv)
{
        if (argc != 6) {
                fprintf(stderr, "usage: %s PORT CAFILE SNI PRIORITY flip|ccs|reneg|none\n", argv[0]);
                return 2;
        }
        const char *mode = argv[5];
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1])) };
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
                return die("connect", 0);

        gnutls_certificate_credentials_t cred;
        gnutls_session_t s;
        int r;
        if ((r = gnutls_certificate_allocate_credentials(&cred)) < 0 ||
            (r = gnutls_certificate_set_x509_trust_file(cred, argv[2], GNUTLS_X509_FMT_PEM)) < 0)
                return die("credentials", r);
        if ((r = gnutls_init(&s, GNUTLS_CLIENT)) < 0 || (r = gnutls_priority_set_direct(s, argv[4], NULL)) < 0 ||
            (r = gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, cred)) < 0 ||
            (r = gnutls_server_name_set(s, GNUTLS_NAME_DNS, argv[3], strlen(argv[3]))) < 0)
                return die("session", r);
        gnutls_session_set_verify_cert(s, argv[3], 0);
        gnutls_transport_set_ptr(s, (gnutls_transport_ptr_t)(intptr_t)fd);
        gnutls_transport_set_push_function(s, push);
        gnutls_transport_set_pull_function(s, pull);
        gnutls_transport_set_pull_timeout_function(s, pull_timeout);
        gnutls_record_set_timeout(s, 5000);
        do
                r = gnutls_handshake(s);
        while (r < 0 && !gnutls_error_is_fatal(r));
        if (r < 0)
                return die("handshake", r);

        /* A first good record and its echo: the proxying works. */
        char buf[64];
        if ((r = (int)gnutls_record_send(s, "ping\n", 5)) != 5)
                return die("send", r);
        size_t got = 0;
        while (got < 5) {
                ssize_t n = gnutls_record_recv(s, buf + got, sizeof(buf) - got);
                if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED)
                        continue;
                if (n <= 0)
                        return die("echo", (int)n);
                got += (size_t)n;
        }

        if (strcmp(mode, "flip") == 0) {
                corrupt_next = 1;
                gnutls_record_send(s, "pong\n", 5);
        } else if (strcmp(mode, "ccs") == 0) {
                static const unsigned char ccs[] = { 0x14, 0x03, 0x03, 0x00, 0x01, 0x01 };
                if (send(fd, ccs, sizeof(ccs), MSG_NOSIGNAL) != (ssize_t)sizeof(ccs))
                        return die("send ccs", 0);
        } else if (strcmp(mode, "reneg") == 0) {
                do
                        r = gnutls_handshake(s);
                while (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED);
                if (r == GNUTLS_E_WARNING_ALERT_RECEIVED || r == GNUTLS_E_FATAL_ALERT_RECEIVED) {
                        const char *name = gnutls_alert_get_strname(gnutls_alert_get(s));
                        printf("alert %s\n", name ? name : "?");
                } else
                        printf("renegotiation: %s\n", r == 0 ? "done" : gnutls_strerror(r));
                gnutls_deinit(s);
                gnutls_certificate_free_credentials(cred);
                close(fd);
                return 0;
        } else if (strcmp(mode, "none") == 0) {
                gnutls_record_send(s, "pong\n", 5);
        } else {
                fprintf(stderr, "tls-inject: unknown mode %s\n", mode);
                return 2;
        }
        report(s);
        gnutls_deinit(s);
        gnutls_certificate_free_credentials(cred);
        close(fd);
        return 0;
}
