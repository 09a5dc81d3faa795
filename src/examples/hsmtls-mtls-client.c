/* hsmtls-mtls-client: mutual TLS with a client key that stays on a PKCS#11
 * token, through libhsmtls. An example of the public API (hsmtls.h only):
 *
 *   hsmtls-mtls-client --token-uri 'pkcs11:token=hsmtls' --module softhsm2 \
 *       --pin-file pin --key 'pkcs11:token=hsmtls;object=p256;type=private' \
 *       --cert p256-chain.pem --cafile ca.pem --connect localhost:4433 [--sni NAME] \
 *       [--send TEXT] [--log-level debug]
 *
 * It opens the token, makes a gnutls_privkey_t for the key, presents it with
 * the certificate chain, verifies the server against --cafile and the host
 * name (--sni, else the HOST of --connect), sends the line TEXT (TEXT and a
 * newline; default an HTTP/1.0 GET request), prints on stdout what comes back until the server closes, and prints
 * the key's usage counters on stderr. Exit status 0 when all of that worked.
 *
 * Build: cc hsmtls-mtls-client.c $(pkg-config --cflags --libs hsmtls) */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* asprintf */
#endif
#include <arpa/inet.h>
#include <getopt.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gnutls/gnutls.h>
#include <hsmtls.h>

static int tcp_connect(const char *hostport, char **ret_host)
{
        char *host = strdup(hostport), *port = strrchr(host, ':');
        if (!port)
                return free(host), -1;
        *port++ = '\0';
        if (host[0] == '[' && host[strlen(host) - 1] == ']') { /* [IPv6]:PORT */
                memmove(host, host + 1, strlen(host));
                host[strlen(host) - 1] = '\0';
        }
        struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *ai = NULL;
        int fd = -1, r = getaddrinfo(host, port, &hints, &ai);
        if (r != 0)
                fprintf(stderr, "%s: %s\n", hostport, gai_strerror(r));
        for (struct addrinfo *a = r == 0 ? ai : NULL; a && fd < 0; a = a->ai_next) {
                fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
                if (fd >= 0 && connect(fd, a->ai_addr, a->ai_addrlen) < 0) {
                        close(fd);
                        fd = -1;
                }
        }
        if (ai)
                freeaddrinfo(ai);
        if (fd < 0)
                return free(host), -1;
        *ret_host = host;
        return fd;
}

/* The token key and its chain as the client credential. */
static int set_client_key(gnutls_certificate_credentials_t cred, hsm_key *key, const char *chain_file)
{
        gnutls_datum_t pem = { NULL, 0 };
        gnutls_pcert_st pcerts[16];
        unsigned n = 16;
        gnutls_x509_crt_t leaf = NULL;
        gnutls_privkey_t pk = NULL;
        int r = gnutls_load_file(chain_file, &pem);
        if (r >= 0)
                r = gnutls_pcert_list_import_x509_raw(pcerts, &n, &pem, GNUTLS_X509_FMT_PEM, 0);
        gnutls_free(pem.data);
        if (r < 0)
                return fprintf(stderr, "%s: %s\n", chain_file, gnutls_strerror(r)), -1;
        /* Compare public keys here: GnuTLS's own check would sign on the token. */
        if (gnutls_pcert_export_x509(&pcerts[0], &leaf) < 0 || hsm_key_matches_certificate(key, leaf) < 0) {
                fprintf(stderr, "%s does not hold the public key of %s\n", chain_file, hsm_key_uri(key));
                r = -1;
        } else if (hsm_privkey_import(key, &pk) < 0) { /* pk holds its own reference on key */
                r = -1;
        } else if ((r = gnutls_certificate_set_key(cred, NULL, 0, pcerts, (int)n, pk)) < 0) {
                fprintf(stderr, "gnutls_certificate_set_key: %s\n", gnutls_strerror(r));
                gnutls_privkey_deinit(pk);
        } else {
                return gnutls_x509_crt_deinit(leaf), 0; /* cred owns pk and the pcerts' contents now */
        }
        if (leaf)
                gnutls_x509_crt_deinit(leaf);
        for (unsigned i = 0; i < n; i++)
                gnutls_pcert_deinit(&pcerts[i]);
        return -1;
}

static void print_usage_counters(hsm_key *key)
{
        hsm_usage_entry e[HSM_OP__MAX * HSM_MECH__MAX * HSM_RESULT__MAX];
        int n = hsm_usage_snapshot(hsm_key_usage(key), e, (int)(sizeof(e) / sizeof(e[0])));
        if (n == 0)
                fprintf(stderr, "usage: token=%s key=%s: no operations\n", hsm_token_label(hsm_key_token(key)), hsm_key_label(key));
        for (int i = 0; i < n; i++)
                fprintf(stderr, "usage: token=%s key=%s op=%s mech=%s result=%s count=%llu avg_us=%llu max_us=%llu\n",
                        hsm_token_label(hsm_key_token(key)), hsm_key_label(key), hsm_op_name(e[i].op), hsm_mech_name(e[i].mech),
                        hsm_result_name(e[i].result), (unsigned long long)e[i].count,
                        (unsigned long long)(e[i].total_ns / e[i].count / 1000), (unsigned long long)(e[i].max_ns / 1000));
        for (int i = 0; i < n; i++)
                for (int w = HSM_REASON_NONE + 1; e[i].result == HSM_RESULT_ERROR && w < HSM_REASON__MAX; w++) {
                        uint64_t c = hsm_usage_failures(hsm_key_usage(key), e[i].op, e[i].mech, w);
                        if (c)
                                fprintf(stderr, "usage: token=%s key=%s op=%s mech=%s failed=%s count=%llu\n",
                                        hsm_token_label(hsm_key_token(key)), hsm_key_label(key), hsm_op_name(e[i].op),
                                        hsm_mech_name(e[i].mech), hsm_reason_name(w), (unsigned long long)c);
                }
}

int main(int argc, char **argv)
{
        static const struct option opts[] = {
                { "token-uri", required_argument, NULL, 't' }, { "module", required_argument, NULL, 'm' },
                { "pin-file", required_argument, NULL, 'p' },  { "key", required_argument, NULL, 'k' },
                { "cert", required_argument, NULL, 'c' },      { "cafile", required_argument, NULL, 'a' },
                { "connect", required_argument, NULL, 'C' },   { "sni", required_argument, NULL, 's' },
                { "send", required_argument, NULL, 'S' },      { "log-level", required_argument, NULL, 'l' },
                { NULL, 0, NULL, 0 },
        };
        const char *token_uri = NULL, *module = NULL, *pin_file = NULL, *key_uri = NULL, *cert = NULL, *cafile = NULL,
                   *connect_to = NULL, *sni = NULL, *text = NULL;
        int c, rc = 1, fd = -1, r;
        hsm_log_set_level(HSM_LOG_WARNING);
        while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
                switch (c) {
                case 't': token_uri = optarg; break;
                case 'm': module = optarg; break;
                case 'p': pin_file = optarg; break;
                case 'k': key_uri = optarg; break;
                case 'c': cert = optarg; break;
                case 'a': cafile = optarg; break;
                case 'C': connect_to = optarg; break;
                case 's': sni = optarg; break;
                case 'S': text = optarg; break;
                case 'l':
                        if ((r = hsm_log_level_from_string(optarg)) < 0)
                                return fprintf(stderr, "unknown log level %s\n", optarg), 2;
                        hsm_log_set_level(r);
                        break;
                default: return 2;
                }
        }
        if (!token_uri || !key_uri || !cert || !cafile || !connect_to) {
                fprintf(stderr, "usage: %s --token-uri URI [--module NAME|PATH] [--pin-file FILE] --key URI --cert CHAIN.pem "
                                "--cafile CA.pem --connect HOST:PORT [--sni NAME] [--send TEXT] [--log-level LEVEL]\n"
                                "libhsmtls %s\n", argv[0], hsm_version());
                return 2;
        }

        hsm_token *token = NULL;
        hsm_key *key = NULL;
        gnutls_certificate_credentials_t cred = NULL;
        gnutls_session_t s = NULL;
        char *err = NULL, *host = NULL, *pin_source = NULL, *request = NULL;
        if (pin_file && asprintf(&pin_source, "file:%s", pin_file) < 0)
                goto out;
        hsm_token_config cfg = { .uri = token_uri, .module = module, .pin_source = pin_source };
        if (hsm_token_open(&cfg, &token, &err) < 0 || hsm_token_find_key(token, key_uri, &key, &err) < 0) {
                fprintf(stderr, "%s\n", err ? err : "cannot open the token or find the key");
                goto out;
        }
        gnutls_certificate_allocate_credentials(&cred);
        gnutls_certificate_set_flags(cred, GNUTLS_CERTIFICATE_SKIP_KEY_CERT_MATCH);
        if ((r = gnutls_certificate_set_x509_trust_file(cred, cafile, GNUTLS_X509_FMT_PEM)) <= 0) {
                fprintf(stderr, "%s: %s\n", cafile, r < 0 ? gnutls_strerror(r) : "no certificate");
                goto out;
        }
        if (set_client_key(cred, key, cert) < 0)
                goto out;
        if ((fd = tcp_connect(connect_to, &host)) < 0) {
                fprintf(stderr, "cannot connect to %s\n", connect_to);
                goto out;
        }

        const char *name = sni ? sni : host;
        unsigned char ip[16];
        bool is_ip = inet_pton(AF_INET, name, ip) == 1 || inet_pton(AF_INET6, name, ip) == 1;
        gnutls_init(&s, GNUTLS_CLIENT);
        gnutls_set_default_priority(s);
        gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, cred);
        if (!is_ip) /* SNI carries host names only; an address is still verified against the certificate */
                gnutls_server_name_set(s, GNUTLS_NAME_DNS, name, strlen(name));
        gnutls_session_set_verify_cert(s, name, 0);
        gnutls_transport_set_int(s, fd);
        gnutls_handshake_set_timeout(s, GNUTLS_DEFAULT_HANDSHAKE_TIMEOUT);
        do
                r = gnutls_handshake(s);
        while (r < 0 && !gnutls_error_is_fatal(r));
        if (r < 0) {
                gnutls_datum_t why = { NULL, 0 };
                if (r == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR)
                        gnutls_certificate_verification_status_print(gnutls_session_get_verify_cert_status(s),
                                                                      GNUTLS_CRT_X509, &why, 0);
                fprintf(stderr, "handshake with %s failed: %s\n", connect_to, why.data ? (char *)why.data : gnutls_strerror(r));
                gnutls_free(why.data);
                goto out;
        }
        char *desc = gnutls_session_get_desc(s);
        fprintf(stderr, "handshake with %s: ok %s\n", connect_to, desc);
        gnutls_free(desc);

        if (text ? asprintf(&request, "%s\n", text) < 0 : asprintf(&request, "GET / HTTP/1.0\r\nHost: %s\r\n\r\n", name) < 0)
                goto out;
        if ((r = gnutls_record_send(s, request, strlen(request))) < 0) {
                fprintf(stderr, "send: %s\n", gnutls_strerror(r));
                goto out;
        }
        gnutls_bye(s, GNUTLS_SHUT_WR); /* done sending: an echo server closes after echoing */
        gnutls_record_set_timeout(s, 10000);
        char buf[4096];
        while ((r = gnutls_record_recv(s, buf, sizeof(buf))) > 0 || r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
                if (r > 0)
                        fwrite(buf, 1, (size_t)r, stdout);
        fflush(stdout);
        if (r < 0 && r != GNUTLS_E_PREMATURE_TERMINATION) {
                fprintf(stderr, "receive: %s\n", gnutls_strerror(r));
                goto out;
        }
        rc = 0;
out:
        if (key)
                print_usage_counters(key);
        if (s)
                gnutls_deinit(s);
        if (fd >= 0)
                close(fd);
        if (cred)
                gnutls_certificate_free_credentials(cred); /* drops the privkey and so its key reference */
        hsm_key_unref(key);
        hsm_token_unref(token);
        free(err);
        free(host);
        free(pin_source);
        free(request);
        return rc;
}
