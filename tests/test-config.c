/* Configuration parsing: a good file with defaults, and bad files that each
 * name the file, the line and the reason. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "conf.h"
#include "log.h"
#include "testlib.h"

static char dir[] = "/tmp/hsmtls-conf-XXXXXX";

static char *write_conf(const char *name, const char *text)
{
        char *path = NULL;
        if (asprintf(&path, "%s/%s", dir, name) < 0)
                exit(1);
        FILE *f = fopen(path, "we");
        fputs(text, f);
        fclose(f);
        return path;
}

#define LISTENER "[listener web]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:8080\ncert = c.pem\nkey = pkcs11:token=t;object=k\n"

static void bad(const char *name, const char *text, int line, const char *keyword)
{
        char *path = write_conf(name, text);
        hsm_conf *c = NULL;
        char *err = NULL;
        int r = hsm_conf_load(path, &c, &err);
        char want[512];
        if (line)
                snprintf(want, sizeof(want), "%s:%d: ", path, line);
        else
                snprintf(want, sizeof(want), "%s: ", path);
        CHECK(r < 0 && !c && err && strncmp(err, want, strlen(want)) == 0 && strstr(err, keyword) &&
                      !strstr(err, "pin-value=5678"),
              "%s: refused at line %d with '%s', no PIN shown (got: %s)", name, line, keyword, err ? err : "no error");
        free(err);
        free(path);
        hsm_conf_free(c);
}

int main(void)
{
        hsm_log_set_level(HSM_LOG_ERR);
        if (!mkdtemp(dir))
                return 1;

        char *good = write_conf("good.conf",
                                "; comment\n"
                                "[global]\nlog_level = debug\ndrain_timeout = 2s\n"
                                "[token hsm]\nuri = pkcs11:token=hsmtls\nmodule = softhsm2\npin_file = /etc/hsmtls/pin\n"
                                "[listener web]\nlisten = 127.0.0.1:0\nbackend = unix:/run/app.sock\n"
                                "cert = rsa.pem\nkey = pkcs11:token=hsmtls;object=rsa2048\n"
                                "cert = ec.pem\nkey = pkcs11:token=hsmtls;object=p256\n"
                                "rsa_key_exchange = yes\nhandshake_timeout = 500ms\n"
                                "[listener api]\nlisten = [::1]:8443\nbackend = localhost:9000\ncert = a.pem\nkey = a.key\n"
                                "session_tickets = no\nsession_cache = 0\nsession_lifetime = 1.5h\nalpn = h2 , http/1.1\n");
        hsm_conf *c = NULL;
        char *err = NULL;
        int r = hsm_conf_load(good, &c, &err);
        CHECK(r == 0 && c, "a good file loads (%s)", err ? err : "ok");
        if (c) {
                CHECK(c->log_level == HSM_LOG_DEBUG && c->drain_timeout_ms == 2000 && c->max_connections == 10000,
                      "global settings and defaults");
                CHECK(c->n_tokens == 1 && strcmp(c->tokens[0].pin_source, "file:/etc/hsmtls/pin") == 0 &&
                              strcmp(c->tokens[0].module, "softhsm2") == 0,
                      "token section");
                CHECK(c->n_listeners == 2 && c->listeners[0].n_chains == 2 && c->listeners[0].rsa_key_exchange &&
                              c->listeners[0].handshake_timeout_ms == 500 && c->listeners[0].idle_timeout_ms == 300000 &&
                              strcmp(c->listeners[0].priority, HSM_DEFAULT_PRIORITY) == 0 && !c->listeners[1].rsa_key_exchange,
                      "listeners, chains and defaults (RSA key exchange off unless asked)");
                CHECK(c->listeners[0].session_tickets && c->listeners[0].session_cache == HSM_DEFAULT_SESSION_CACHE &&
                              c->listeners[0].session_lifetime_ms == 2u * 3600u * 1000u && !c->listeners[0].ticket_key &&
                              !c->listeners[0].alpn,
                      "resumption defaults: tickets on, a cache of 1024 sessions, 2h");
                CHECK(!c->listeners[1].session_tickets && c->listeners[1].session_cache == 0 &&
                              c->listeners[1].session_lifetime_ms == 90u * 60u * 1000u,
                      "session_tickets = no, session_cache = 0, session_lifetime = 1.5h");
                CHECK(c->listeners[1].n_alpn == 2 && strcmp(c->listeners[1].alpn_protos[0], "h2") == 0 &&
                              strcmp(c->listeners[1].alpn_protos[1], "http/1.1") == 0 && c->listeners[0].n_alpn == 0,
                      "alpn: a list in order, spaces around commas dropped");
                CHECK(c->listeners[0].backend.ss.ss_family == AF_UNIX && c->listeners[1].listen.ss.ss_family == AF_INET6,
                      "unix and IPv6 addresses");
        }
        hsm_conf_free(c);
        free(err);
        free(good);

        bad("unknown-key.conf", LISTENER "foo = bar\n", 6, "unknown setting 'foo'");
        bad("unknown-section.conf", "[global]\n\n[frontend x]\nlisten = 1\n", 3, "unknown section [frontend x]");
        bad("no-name.conf", "[listener]\nlisten = 127.0.0.1:1\n", 1, "unknown section");
        bad("outside.conf", "listen = 127.0.0.1:1\n" LISTENER, 1, "outside of any section");
        bad("syntax.conf", LISTENER "this line has no equals sign\n", 6, "syntax error");
        bad("bad-uri.conf", "[token t]\nuri = notauri\n" LISTENER, 2, "pkcs11: URI");
        bad("pin-value.conf", "[token t]\nuri = pkcs11:token=t?pin-value=1234\n" LISTENER, 2, "pin-value");
        bad("pin.conf", "[token t]\nuri = pkcs11:token=t\npin = 1234\n" LISTENER, 3, "PINs are not written");
        /* pin-value= is refused in every setting that takes a pkcs11: URI,
         * and the message never shows the PIN (bad() checks the line). */
        bad("pin-value-ticket.conf", LISTENER "ticket_key = pkcs11:token=t;object=tk?pin-value=5678\n", 6, "pin-value");
        bad("pin-value-gticket.conf", "[global]\nticket_key = pkcs11:token=t;object=tk?pin-value=5678\n" LISTENER, 2,
            "pin-value");
        bad("pin-value-admin.conf", LISTENER "\n[admin]\ntls_cert = /c\ntls_key = pkcs11:token=t;object=a?pin-value=5678\n", 9,
            "pin-value");
        bad("two-globals.conf", "[global]\nlog_level = info\n\n[global]\nlog_level = debug\n" LISTENER, 4,
            "[global] is defined twice (first on line 1)");
        bad("two-pins.conf", "[token t]\nuri = pkcs11:token=t\npin_file = /a\npin_env = B\n" LISTENER, 4, "more than one PIN source");
        bad("no-uri.conf", "[token t]\nmodule = softhsm2\n" LISTENER, 1, "has no 'uri'");
        bad("dup.conf", LISTENER LISTENER, 6, "defined twice");
        bad("no-listen.conf", "[listener web]\nbackend = 127.0.0.1:80\ncert = c\nkey = k\n", 1, "no 'listen'");
        bad("no-backend.conf", "[listener web]\nlisten = 127.0.0.1:0\ncert = c\nkey = k\n", 1, "no 'backend'");
        bad("no-cert.conf", "[listener web]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:80\n", 1, "no certificate");
        bad("key-first.conf", "[listener web]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:80\nkey = k\n", 4, "must follow");
        bad("cert-alone.conf", "[listener web]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:80\ncert = c\n", 4, "no 'key'");
        bad("bad-port.conf", "[listener web]\nlisten = 127.0.0.1:99999\n", 2, "port");
        bad("backend-port0.conf", "[listener web]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:0\n", 3, "port");
        bad("bad-bool.conf", LISTENER "rsa_key_exchange = maybe\n", 6, "yes or no");
        bad("bad-duration.conf", LISTENER "handshake_timeout = soon\n", 6, "duration");
        bad("bad-number.conf", "[global]\nmax_connections = -5\n" LISTENER, 2, "max_connections");
        bad("bad-level.conf", "[global]\nlog_level = loud\n" LISTENER, 2, "log_level");
        bad("bad-waiting.conf", "[global]\nmax_waiting_handshakes = many\n" LISTENER, 2, "max_waiting_handshakes");
        bad("twice-number.conf", "[global]\nmax_connections = 5\nmax_connections = 6\n" LISTENER, 3, "given twice");
        bad("connector-no-connect.conf", "[connector c]\nlisten = 127.0.0.1:0\n", 1, "no 'connect'");
        bad("connector-backend.conf", "[connector c]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:1\n", 3, "unknown setting 'backend'");
        bad("client-auth-no-ca.conf", LISTENER "client_auth = require\n", 1, "client_ca");
        bad("client-auth-bad.conf", LISTENER "client_auth = sometimes\n", 6, "none, optional or require");
        bad("bad-tickets.conf", LISTENER "session_tickets = sometimes\n", 6, "session_tickets must be yes or no");
        bad("bad-cache.conf", LISTENER "session_cache = lots\n", 6, "session_cache must be");
        bad("bad-lifetime.conf", LISTENER "session_lifetime = 0\n", 6, "session_lifetime must be");
        bad("connector-cache.conf", "[connector c]\nlisten = 127.0.0.1:0\nsession_cache = 5\n", 3, "unknown setting 'session_cache'");
        bad("alpn-empty.conf", LISTENER "alpn = h2,,http/1.1\n", 6, "alpn must be");
        bad("alpn-trailing.conf", LISTENER "alpn = h2,\n", 6, "alpn must be");
        bad("alpn-space.conf", LISTENER "alpn = h 2\n", 6, "alpn must be");
        bad("ticket-key-bad.conf", LISTENER "ticket_key = /etc/key\n", 6, "pkcs11: URI");
        bad("ocsp-first.conf", "[listener web]\nlisten = 127.0.0.1:0\nbackend = 127.0.0.1:80\nocsp_response = r.der\n", 4, "must follow");
        bad("ocsp-twice.conf", LISTENER "ocsp_response = a.der\nocsp_response = b.der\n", 7, "given twice");
        bad("proxy-v1.conf", LISTENER "proxy_protocol = v1\n", 6, "v2 or no");
        {
                /* Long lines (a long priority string) are read whole; too long ones are refused. */
                char *text = malloc(20000);
                char prio[1200];
                memset(prio, 0, sizeof(prio));
                strcpy(prio, "NORMAL");
                while (strlen(prio) < 1000)
                        strcat(prio, ":+GROUP-X25519");
                snprintf(text, 20000, LISTENER "priority = %s\n", prio);
                char *path = write_conf("long.conf", text);
                r = hsm_conf_load(path, &c, &err);
                CHECK(r == 0 && c && strcmp(c->listeners[0].priority, prio) == 0, "a 1000-character priority line is read whole (%s)",
                      err ? err : "ok");
                hsm_conf_free(c);
                c = NULL;
                free(err);
                err = NULL;
                free(path);
                char *huge = malloc(6000);
                memset(huge, 'A', 5999);
                huge[5999] = 0;
                snprintf(text, 20000, LISTENER "priority = %s\nfoo = bar\n", huge);
                bad("too-long.conf", text, 6, "line too long");
                free(huge);
                free(text);
        }
        bad("no-listener.conf", "[global]\nlog_level = info\n", 0, "nothing to do");

        /* [admin] and [global] state_dir */
#define H64 "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
        char *adm = write_conf("admin.conf", "[global]\nstate_dir = /var/lib/hsmtls\n" LISTENER
                                             "[admin]\ntoken = admin:ops:" H64 "\ntoken = read:prom:" H64 "\n"
                                             "max_body = 2048\ntimeout = 3s\naudit_refusals_per_minute = 0\n"
                                             "audit_refusals_burst_per_address = 4\naudit_refusals_summary_interval = 5m\n");
        r = hsm_conf_load(adm, &c, &err);
        CHECK(r == 0 && c, "an [admin] section loads (%s)", err ? err : "ok");
        if (c) {
                const hsm_conf_admin *a = &c->admin;
                CHECK(a->enabled && a->n_tokens == 2 && a->tokens[0].role == HSM_ROLE_ADMIN &&
                              a->tokens[1].role == HSM_ROLE_READ && strcmp(a->tokens[1].name, "prom") == 0 &&
                              a->tokens[0].sha256[0] == 0x5e && a->tokens[0].sha256[31] == 0xd8,
                      "admin tokens: roles, names, hashes");
                CHECK(a->listen.ss.ss_family == AF_UNIX && strcmp(a->listen.text, "unix:/var/lib/hsmtls/admin.sock") == 0,
                      "admin listens on STATE_DIR/admin.sock by default (%s)", a->listen.text);
                CHECK(a->max_body == 2048 && a->timeout_ms == 3000 && a->max_connections == 64 &&
                              a->max_connections_per_ip == 8 && a->threads == 2,
                      "admin limits and defaults");
                CHECK(a->audit_refusals_burst == 50 && a->audit_refusals_per_minute == 0 &&
                              a->audit_refusals_burst_per_address == 4 && a->audit_refusals_per_minute_per_address == 30 &&
                              a->audit_refusals_summary_interval_ms == 300000,
                      "admin audit limits: the values given (0 is one) and the defaults");
        }
        hsm_conf_free(c);
        free(err);
        err = NULL;
        c = NULL;
        free(adm);
        bad("admin-no-state.conf", LISTENER "[admin]\ntoken = admin:ops:" H64 "\n", 6, "state_dir");
        bad("admin-no-identity.conf", "[global]\nstate_dir = /s\n" LISTENER "[admin]\nmax_body = 4096\n", 8,
            "no identity");
        bad("admin-bad-token.conf", "[global]\nstate_dir = /s\n" LISTENER "[admin]\ntoken = admin:ops:abc\n", 9,
            "ROLE:NAME:SHA256");
        bad("admin-token-not-hex.conf",
            "[global]\nstate_dir = /s\n" LISTENER "[admin]\ntoken = admin:ops:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542dg\n",
            9, "64 hex digits");
        bad("admin-bad-role.conf", "[global]\nstate_dir = /s\n" LISTENER "[admin]\ntoken = root:ops:" H64 "\n", 9,
            "ROLE:NAME:SHA256");
        bad("admin-remote.conf",
            "[global]\nstate_dir = /s\n" LISTENER "[admin]\nlisten = 0.0.0.0:9443\ntoken = admin:ops:" H64 "\n", 8,
            "not loopback");
        bad("admin-identity-no-tls.conf",
            "[global]\nstate_dir = /s\n" LISTENER "[admin]\nidentity = admin:CN=ops\nclient_ca = ca.pem\n", 10,
            "need HTTPS");
        bad("admin-small-body.conf", "[global]\nstate_dir = /s\n" LISTENER "[admin]\nmax_body = 10\n", 9, "max_body");
        bad("admin-bad-audit-rate.conf", "[global]\nstate_dir = /s\n" LISTENER "[admin]\naudit_refusals_per_minute = -1\n", 9,
            "audit_refusals_per_minute must be a number");
        bad("admin-short-summary.conf",
            "[global]\nstate_dir = /s\n" LISTENER "[admin]\naudit_refusals_summary_interval = 100ms\n", 9,
            "audit_refusals_summary_interval must be a duration");
        bad("state-relative.conf", "[global]\nstate_dir = state\n" LISTENER, 2, "absolute");
        bad("admin-twice.conf",
            "[global]\nstate_dir = /s\n" LISTENER "[admin]\ntoken = admin:ops:" H64 "\n[admin]\nthreads = 2\n", 10,
            "defined twice");

        char *missing = NULL;
        if (asprintf(&missing, "%s/missing.conf", dir) < 0)
                return 1;
        r = hsm_conf_load(missing, &c, &err);
        CHECK(r < 0 && err && strstr(err, "missing.conf") && strstr(err, "No such file"), "missing file: %s", err ? err : "");
        free(err);
        free(missing);

        char cmd[128];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
        if (system(cmd) != 0)
                return 1;
        return test_done();
}
