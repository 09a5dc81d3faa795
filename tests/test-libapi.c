/* The public API of libhsmtls as another program sees it: only <hsmtls.h>,
 * linked against the shared library libhsmtls.so.0.
 *
 *   test-libapi              the API: version, exported symbols, tokens,
 *                            keys, privkeys (sign and verify), usage counters
 *   test-libapi --example P  runs the example program P
 *                            (src/examples/hsmtls-mtls-client) against
 *                            gnutls-serv demanding a client certificate */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/abstract.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include "hsmtls-build.h"
#include "hsmtls.h"
#include "testlib.h"

static test_token tt;

static char *file_spec(const char *path)
{
        char *s = NULL;
        if (asprintf(&s, "file:%s", path) < 0)
                exit(1);
        return s;
}

/* The leaf certificate of a chain file, read without the library. */
static gnutls_x509_crt_t load_leaf(const char *chain)
{
        gnutls_datum_t pem = { NULL, 0 };
        gnutls_x509_crt_t crt = NULL;
        if (gnutls_load_file(chain, &pem) < 0)
                return NULL;
        gnutls_x509_crt_init(&crt);
        if (gnutls_x509_crt_import(crt, &pem, GNUTLS_X509_FMT_PEM) < 0) {
                gnutls_x509_crt_deinit(crt);
                crt = NULL;
        }
        gnutls_free(pem.data);
        return crt;
}

/* Signs msg with the token key through a gnutls_privkey_t and verifies the
 * signature with the public key of the key's certificate (not the token's). */
static int sign_and_verify(gnutls_privkey_t priv, gnutls_x509_crt_t crt, gnutls_sign_algorithm_t algo)
{
        gnutls_datum_t msg = { (unsigned char *)"libhsmtls public API", 20 }, sig = { NULL, 0 };
        gnutls_pubkey_t pub = NULL;
        int r = gnutls_pubkey_init(&pub);
        if (r >= 0)
                r = gnutls_pubkey_import_x509(pub, crt, 0);
        if (r >= 0)
                r = gnutls_privkey_sign_data2(priv, algo, 0, &msg, &sig);
        if (r >= 0)
                r = gnutls_pubkey_verify_data2(pub, algo, 0, &msg, &sig);
        gnutls_free(sig.data);
        gnutls_pubkey_deinit(pub);
        return r;
}

static void test_version_and_symbols(void)
{
        CHECK(strcmp(hsm_version(), HSMTLS_VERSION) == 0, "hsm_version() is '%s' (project %s)", hsm_version(), HSMTLS_VERSION);

        /* This program uses the shared library, not a static copy. */
        Dl_info info = { 0 };
        CHECK(dladdr((void *)hsm_token_open, &info) && info.dli_fname && strstr(info.dli_fname, "libhsmtls.so"),
              "hsm_token_open comes from %s", info.dli_fname ? info.dli_fname : "?");
        void *h = dlopen("libhsmtls.so.0", RTLD_NOW | RTLD_NOLOAD);
        CHECK(h != NULL, "libhsmtls.so.0 is loaded (by its soname)");
        if (!h)
                return;
        static const char *const public[] = { "hsm_version", "hsm_token_open", "hsm_token_unref", "hsm_token_find_key",
                                              "hsm_key_unref", "hsm_privkey_import", "hsm_key_usage", "hsm_usage_snapshot",
                                              "hsm_usage_total", "hsm_mech_name", "hsm_log_set_level" };
        for (size_t i = 0; i < sizeof(public) / sizeof(public[0]); i++)
                CHECK(dlvsym(h, public[i], "HSMTLS_0.1") != NULL, "%s is exported as %s@HSMTLS_0.1", public[i], public[i]);
        /* Added in 0.2: the token's state. */
        static const char *const public2[] = { "hsm_token_state", "hsm_token_state_name" };
        for (size_t i = 0; i < sizeof(public2) / sizeof(public2[0]); i++)
                CHECK(dlvsym(h, public2[i], "HSMTLS_0.2") != NULL, "%s is exported as %s@HSMTLS_0.2", public2[i], public2[i]);
        /* Added in 0.4: failures by reason. */
        static const char *const public4[] = { "hsm_usage_failures", "hsm_reason_name" };
        for (size_t i = 0; i < sizeof(public4) / sizeof(public4[0]); i++)
                CHECK(dlvsym(h, public4[i], "HSMTLS_0.4") != NULL, "%s is exported as %s@HSMTLS_0.4", public4[i], public4[i]);
        /* Internal functions of the library stay hidden. */
        static const char *const internal[] = { "hsm_key_sign", "hsm_key_decrypt", "hsm_usage_record", "hsm_log",
                                                "hsm_p11_errno", "hsm_session_get", "hsm_modules_get", "hsm_pin_source_read",
                                                "hsm_token_drop_sessions", "hsm_token_enter", "hsm_token_note",
                                                "hsm_module_reinit", "hsm_key_uri_template" };
        for (size_t i = 0; i < sizeof(internal) / sizeof(internal[0]); i++)
                CHECK(dlsym(h, internal[i]) == NULL, "internal %s is not exported", internal[i]);
        dlclose(h);
}

static void test_log_and_names(void)
{
        int saved = hsm_log_get_level();
        hsm_log_set_level(HSM_LOG_DEBUG);
        CHECK(hsm_log_get_level() == HSM_LOG_DEBUG, "log level can be set and read back");
        hsm_log_set_level(saved);
        CHECK(hsm_log_level_from_string("warning") == HSM_LOG_WARNING && hsm_log_level_from_string("DEBUG") == HSM_LOG_DEBUG &&
                      hsm_log_level_from_string("loud") == -EINVAL,
              "log level names");
        CHECK(strcmp(hsm_op_name(HSM_OP_SIGN), "sign") == 0 && strcmp(hsm_op_name(HSM_OP_DECRYPT), "decrypt") == 0 &&
                      strcmp(hsm_mech_name(HSM_MECH_ECDSA), "CKM_ECDSA") == 0 &&
                      strcmp(hsm_mech_name(HSM_MECH_RSA_PKCS_PSS), "CKM_RSA_PKCS_PSS") == 0 &&
                      strcmp(hsm_result_name(HSM_RESULT_OK), "ok") == 0 && strcmp(hsm_result_name(HSM_RESULT_ERROR), "error") == 0 &&
                      strcmp(hsm_reason_name(HSM_REASON_DEADLINE), "deadline") == 0,
              "operation, mechanism, result and reason names");
}

static void test_open_errors(const char *pin_spec)
{
        hsm_token *t = NULL;
        char *err = NULL;
        hsm_token_config bad_uri = { .uri = "https://example.org/", .module = tt.module, .pin_source = pin_spec };
        int r = hsm_token_open(&bad_uri, &t, &err);
        CHECK(r == -EINVAL && t == NULL && err != NULL, "a bad URI is refused with -EINVAL (%d: %s)", r, err ? err : "-");
        free(err);
        err = NULL;
        hsm_token_config no_token = { .uri = "pkcs11:token=no-such-token", .module = tt.module, .pin_source = pin_spec };
        r = hsm_token_open(&no_token, &t, &err);
        CHECK(r == -ENODEV && t == NULL && err != NULL, "a missing token is -ENODEV (%d: %s)", r, err ? err : "-");
        free(err);
        /* errmsg may be NULL, also when the module is not found. */
        hsm_token_config no_module = { .uri = tt.token_uri, .module = "no-such-module", .pin_source = pin_spec };
        r = hsm_token_open(&no_module, &t, NULL);
        CHECK(r == -ENOENT && t == NULL, "an unknown module is -ENOENT, with errmsg NULL (%d)", r);
        hsm_token_config no_module_path = { .uri = tt.token_uri, .module = "/nonexistent/libnothing.so", .pin_source = pin_spec };
        r = hsm_token_open(&no_module_path, &t, NULL);
        CHECK(r == -ENOENT && t == NULL, "a missing module path is -ENOENT, with errmsg NULL (%d)", r);
}

static int run_api(void)
{
        test_token_make(&tt, false);
        char *pin_spec = file_spec(tt.pin_file);
        test_version_and_symbols();
        test_log_and_names();
        test_open_errors(pin_spec);

        hsm_token *t = NULL;
        char *err = NULL;
        hsm_token_config cfg = { .name = "libapi", .uri = tt.token_uri, .module = tt.module, .pin_source = pin_spec };
        int r = hsm_token_open(&cfg, &t, &err);
        CHECK(r == 0 && t != NULL, "token opens (%s)", err ? err : "ok");
        free(err);
        err = NULL;
        if (!t)
                goto out;
        CHECK(strcmp(hsm_token_name(t), "libapi") == 0 && strcmp(hsm_token_label(t), "hsmtls") == 0,
              "token name '%s', label '%s'", hsm_token_name(t), hsm_token_label(t));
        /* max_sessions 0: the token's ulMaxSessionCount, or 32 when it
         * reports no limit, as SoftHSM does (CK_EFFECTIVELY_INFINITE). */
        CHECK(hsm_token_max_sessions(t) == 32, "session pool of %u (the default for a token without a limit)",
              hsm_token_max_sessions(t));
        {
                hsm_token *t3 = NULL;
                hsm_token_config c3 = cfg;
                c3.name = "libapi-3";
                c3.max_sessions = 3;
                r = hsm_token_open(&c3, &t3, &err);
                CHECK(r == 0 && hsm_token_max_sessions(t3) == 3, "max_sessions = 3: a pool of %u", t3 ? hsm_token_max_sessions(t3) : 0);
                free(err);
                err = NULL;
                hsm_token_unref(t3);
        }
        char *why = NULL;
        enum hsm_token_state st = hsm_token_state(t, &why);
        CHECK(st == HSM_TOKEN_READY && why && strcmp(hsm_token_state_name(st), "ready") == 0, "a token just opened is %s (%s)",
              hsm_token_state_name(st), why ? why : "-");
        free(why);
        CHECK(strcmp(hsm_token_state_name(HSM_TOKEN_ABSENT), "absent") == 0 && strcmp(hsm_token_state_name(99), "?") == 0,
              "state names");

        hsm_key *missing = NULL;
        r = hsm_token_find_key(t, "pkcs11:object=no-such-key;type=private", &missing, &err);
        CHECK(r == -ENOENT && missing == NULL && err != NULL, "a missing key is -ENOENT (%s)", err ? err : "-");
        free(err);
        err = NULL;

        static const enum hsm_key_type types[TK__MAX] = { HSM_KEY_RSA, HSM_KEY_ECDSA, HSM_KEY_ECDSA, HSM_KEY_ED25519 };
        static const enum hsm_mech mechs[TK__MAX] = { HSM_MECH_RSA_PKCS_PSS, HSM_MECH_ECDSA, HSM_MECH_ECDSA, HSM_MECH_EDDSA };
        static const gnutls_sign_algorithm_t algos[TK__MAX] = { GNUTLS_SIGN_RSA_PSS_RSAE_SHA256, GNUTLS_SIGN_ECDSA_SECP256R1_SHA256,
                                                                GNUTLS_SIGN_ECDSA_SECP384R1_SHA384, GNUTLS_SIGN_EDDSA_ED25519 };
        for (int i = 0; i < TK__MAX; i++) {
                hsm_key *k = NULL;
                r = hsm_token_find_key(t, tt.key[i], &k, &err);
                CHECK(r == 0 && k != NULL, "key %s found (%s)", test_key_names[i], err ? err : "ok");
                free(err);
                err = NULL;
                if (!k)
                        continue;
                unsigned f = hsm_key_flags(k);
                CHECK(hsm_key_type(k) == types[i] && hsm_key_token(k) == t && strcmp(hsm_key_label(k), test_key_names[i]) == 0 &&
                              (f & HSM_KEY_SENSITIVE) && !(f & HSM_KEY_EXTRACTABLE) && (f & HSM_KEY_CAN_SIGN) &&
                              hsm_key_supports(k, mechs[i]),
                      "key %s: type, token, label, flags 0x%x, %s supported", test_key_names[i], f, hsm_mech_name(mechs[i]));

                gnutls_x509_crt_t crt = load_leaf(tt.cert[i]);
                gnutls_x509_crt_t other = load_leaf(tt.cert[(i + 1) % TK__MAX]);
                CHECK(crt && hsm_key_matches_certificate(k, crt) == 0, "key %s matches its certificate", test_key_names[i]);
                CHECK(other && hsm_key_matches_certificate(k, other) == -EKEYREJECTED, "key %s does not match another certificate",
                      test_key_names[i]);

                hsm_usage *u = hsm_key_usage(k);
                uint64_t before = hsm_usage_total(u, HSM_OP_SIGN, -1);
                gnutls_privkey_t priv = NULL;
                r = hsm_privkey_import(k, &priv);
                CHECK(r == 0 && priv != NULL, "key %s as a gnutls_privkey_t", test_key_names[i]);
                if (priv) {
                        r = crt ? sign_and_verify(priv, crt, algos[i]) : -1;
                        CHECK(r >= 0, "key %s: %s signature verifies with the certificate's public key (%s)", test_key_names[i],
                              gnutls_sign_get_name(algos[i]), r < 0 ? gnutls_strerror(r) : "ok");
                }
                uint64_t after = hsm_usage_total(u, HSM_OP_SIGN, HSM_RESULT_OK);
                CHECK(before == 0 && after == 1 && hsm_usage_total(u, HSM_OP_SIGN, HSM_RESULT_ERROR) == 0 &&
                              hsm_usage_total(u, HSM_OP_DECRYPT, -1) == 0,
                      "key %s: sign counter moved by exactly one (%llu -> %llu)", test_key_names[i], (unsigned long long)before,
                      (unsigned long long)after);
                hsm_usage_entry e[HSM_OP__MAX * HSM_MECH__MAX * HSM_RESULT__MAX];
                int n = hsm_usage_snapshot(u, e, (int)(sizeof(e) / sizeof(e[0])));
                CHECK(n == 1 && e[0].op == HSM_OP_SIGN && e[0].mech == mechs[i] && e[0].result == HSM_RESULT_OK && e[0].count == 1 &&
                              e[0].total_ns >= e[0].max_ns && e[0].max_ns > 0,
                      "key %s: snapshot has one entry op=%s mech=%s result=%s count=%llu", test_key_names[i],
                      n > 0 ? hsm_op_name(e[0].op) : "-", n > 0 ? hsm_mech_name(e[0].mech) : "-",
                      n > 0 ? hsm_result_name(e[0].result) : "-", n > 0 ? (unsigned long long)e[0].count : 0ULL);
                CHECK(hsm_usage_snapshot(u, e, 0) == 0, "a snapshot into no room copies nothing");

                if (i == TK_P256) {
                        CHECK(hsm_key_ref(k) == k && hsm_token_ref(t) == t, "_ref() returns its argument");
                        hsm_key_unref(k);
                        hsm_token_unref(t);
                }
                gnutls_x509_crt_deinit(other);
                gnutls_x509_crt_deinit(crt);
                if (priv)
                        gnutls_privkey_deinit(priv);
                hsm_key_unref(k);
        }

        /* A privkey outlives the key and token references it was made from. */
        hsm_key *k = NULL;
        gnutls_privkey_t priv = NULL;
        gnutls_x509_crt_t crt = load_leaf(tt.cert[TK_P256]);
        r = hsm_token_find_key(t, tt.key[TK_P256], &k, NULL);
        if (r == 0)
                r = hsm_privkey_import(k, &priv);
        hsm_key_unref(k);
        hsm_token_unref(t);
        t = NULL;
        CHECK(r == 0 && crt && sign_and_verify(priv, crt, GNUTLS_SIGN_ECDSA_SECP256R1_SHA256) >= 0,
              "a privkey still signs after its key and token were unreferenced");
        if (priv)
                gnutls_privkey_deinit(priv);
        gnutls_x509_crt_deinit(crt);
        hsm_key_unref(NULL);
        hsm_token_unref(NULL);
out:
        free(pin_spec);
        test_token_cleanup(&tt);
        return test_done();
}

/* ------------------------------------------------------------ the example against gnutls-serv */

static double now_s(void)
{
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A TCP port on 127.0.0.1 that is free now (bound to port 0, then closed). */
static int free_port(void)
{
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        socklen_t len = sizeof(a);
        if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || getsockname(fd, (struct sockaddr *)&a, &len) < 0) {
                perror("free port");
                exit(1);
        }
        close(fd);
        return ntohs(a.sin_port);
}

/* Starts argv with stdin from /dev/null and stdout+stderr to log; the child
 * dies with this process (so that nothing is left behind if we are killed). */
static pid_t spawn(char *const argv[], const char *log)
{
        pid_t pid = fork();
        if (pid < 0) {
                perror("fork");
                exit(1);
        }
        if (pid == 0) {
                prctl(PR_SET_PDEATHSIG, SIGKILL);
                int in = open("/dev/null", O_RDONLY), out = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
                if (in < 0 || out < 0 || dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(out, 2) < 0)
                        _exit(127);
                execvp(argv[0], argv);
                _exit(127);
        }
        return pid;
}

/* Waits for pid at most timeout seconds, then kills it. Returns the wait status. */
static int wait_bounded(pid_t pid, double timeout)
{
        int status = 0;
        double end = now_s() + timeout;
        struct timespec tick = { 0, 20 * 1000 * 1000 };
        while (waitpid(pid, &status, WNOHANG) == 0) {
                if (now_s() > end) {
                        kill(pid, SIGKILL);
                        waitpid(pid, &status, 0);
                        return -1;
                }
                nanosleep(&tick, NULL);
        }
        return status;
}

static bool accepts(int port)
{
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                 .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        bool ok = fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
        if (fd >= 0)
                close(fd);
        return ok;
}

/* Starts gnutls-serv on a free port and waits (at most 10 s) until it
 * accepts; tries another port if it exits (the port was taken meanwhile). */
static pid_t start_server(const char *log, int *ret_port)
{
        if (access("/usr/bin/gnutls-serv", X_OK) != 0) {
                printf("1..0 # SKIP gnutls-serv not installed\n");
                exit(77);
        }
        for (int attempt = 0; attempt < 3; attempt++) {
                int port = free_port();
                char ports[16];
                snprintf(ports, sizeof(ports), "%d", port);
                char *argv[] = { "gnutls-serv", "--echo", "--require-client-cert", "--verify-client-cert",
                                 "--x509cafile", tt.ca, "--x509certfile", tt.filecert[TK_P256],
                                 "--x509keyfile", tt.filekey[TK_P256], "-p", ports, NULL };
                pid_t pid = spawn(argv, log);
                struct timespec tick = { 0, 20 * 1000 * 1000 };
                int status;
                for (double end = now_s() + 10; now_s() < end; nanosleep(&tick, NULL)) {
                        if (waitpid(pid, &status, WNOHANG) == pid)
                                break; /* exited: try another port */
                        if (accepts(port)) {
                                *ret_port = port;
                                return pid;
                        }
                }
                kill(pid, SIGKILL);
                waitpid(pid, &status, 0);
        }
        fprintf(stderr, "gnutls-serv did not start (see %s)\n", log);
        return -1;
}

static char *read_file(const char *path)
{
        gnutls_datum_t d = { NULL, 0 };
        if (gnutls_load_file(path, &d) < 0)
                return strdup("");
        char *s = strndup((char *)d.data, d.size);
        gnutls_free(d.data);
        return s;
}

static int run_example(const char *example)
{
        test_token_make(&tt, true);
        CHECK(tt.ca && tt.filecert[TK_P256] && tt.filekey[TK_P256], "provisioned with file keys for the server");
        char serv_log[512], out_log[512], cli_log[512];
        snprintf(serv_log, sizeof(serv_log), "%s/gnutls-serv.log", tt.dir);
        snprintf(out_log, sizeof(out_log), "%s/example.out", tt.dir);
        snprintf(cli_log, sizeof(cli_log), "%s/gnutls-cli.log", tt.dir);
        int port = 0;
        pid_t server = start_server(serv_log, &port);
        CHECK(server > 0, "gnutls-serv --require-client-cert accepts on port %d", port);
        if (server < 0)
                goto out;

        char connect_to[64];
        snprintf(connect_to, sizeof(connect_to), "localhost:%d", port);
        char *argv[] = { (char *)example, "--token-uri", tt.token_uri, "--module", tt.module, "--pin-file", tt.pin_file,
                         "--key", tt.key[TK_P256], "--cert", tt.cert[TK_P256], "--cafile", tt.ca, "--connect", connect_to,
                         "--send", "hello from a key on the token", NULL };
        int status = wait_bounded(spawn(argv, out_log), 30);
        char *out = read_file(out_log);
        printf("# example output:\n");
        for (char *line = out, *nl; *line; line = nl ? nl + 1 : line + strlen(line)) {
                nl = strchr(line, '\n');
                printf("#   %.*s\n", nl ? (int)(nl - line) : (int)strlen(line), line);
        }
        CHECK(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0, "the example exits 0 (status 0x%x)", status);
        char want[128];
        snprintf(want, sizeof(want), "handshake with %s: ok (TLS1.", connect_to);
        CHECK(strstr(out, want) != NULL, "the example reports a successful handshake");
        CHECK(strstr(out, "hello from a key on the token\n") != NULL, "the server echoed what the example sent");
        CHECK(strstr(out, "usage: token=hsmtls key=p256 op=sign mech=CKM_ECDSA result=ok count=1 ") != NULL,
              "the token key signed exactly once (usage: ... count=1)");
        CHECK(strstr(out, "result=error") == NULL, "no failed operation counted");

        /* Control: the server really demands a client certificate. */
        if (access("/usr/bin/gnutls-cli", X_OK) == 0) {
                char ports[16];
                snprintf(ports, sizeof(ports), "%d", port);
                char *cli[] = { "gnutls-cli", "--x509cafile", tt.ca, "-p", ports, "localhost", NULL };
                int cs = wait_bounded(spawn(cli, cli_log), 30);
                CHECK(cs >= 0 && !(WIFEXITED(cs) && WEXITSTATUS(cs) == 0), "gnutls-cli without a client certificate is refused");
        }
        char *slog = read_file(serv_log);
        CHECK(strstr(slog, "The certificate is trusted") != NULL, "gnutls-serv verified the example's client certificate");
        free(slog);
        free(out);

        kill(server, SIGTERM);
        int ss = wait_bounded(server, 10);
        CHECK(ss != -1, "gnutls-serv stopped");
out:
        test_token_cleanup(&tt);
        return test_done();
}

int main(int argc, char **argv)
{
        hsm_log_set_level(getenv("HSMTLS_DEBUG") ? HSM_LOG_DEBUG : HSM_LOG_WARNING);
        if (argc == 3 && strcmp(argv[1], "--example") == 0)
                return run_example(argv[2]);
        if (argc != 1) {
                fprintf(stderr, "usage: %s [--example PATH]\n", argv[0]);
                return 2;
        }
        return run_api();
}
