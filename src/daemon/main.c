#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <gnutls/gnutls.h>

#include "admin.h"
#include "conf.h"
#include "creds.h"
#include "log.h"
#include "notify.h"
#include "server.h"
#include "store.h"

#include "hsmtls-build.h"

static void usage(FILE *f)
{
        fprintf(f,
                "Usage: hsmtlsd [OPTIONS]\n"
                "TLS termination with private keys that stay on a PKCS#11 token.\n\n"
                "  -c, --config FILE     configuration file (default %s/hsmtls/hsmtlsd.conf)\n"
                "  -t, --check           check the configuration (tokens reachable, PINs accepted,\n"
                "                        keys found, certificates matching their keys) and exit\n"
                "  -l, --log-level LEVEL error, warning, notice, info or debug (overrides the file)\n"
                "      --check-audit DIR check the audit log's hash chain in state directory DIR and exit\n"
                "                        (0: intact; 1: a record was altered or removed, or unreadable)\n"
                "  -h, --help            show this help and exit\n"
                "  -V, --version         show the version and exit\n\n"
                "Signals: SIGTERM/SIGINT drain and exit (a second one exits at once); SIGUSR1 logs\n"
                "the per-key usage counters and the handshake counters; SIGHUP reloads the\n"
                "configuration file: all of it or nothing, one log line says which and why;\n"
                "connections in progress are kept (README, Reload, lists what needs a restart).\n"
                "PINs are never taken from the command line: see pin_file, pin_env and pin_credential.\n",
                HSMTLS_SYSCONFDIR);
}

/* Before any PIN is read: no core file, and not dumpable, so that no
 * other process of this user can ptrace it or read its memory, environment
 * or descriptors under /proc/PID (those files are owned by root then), and
 * no core dump can hold a PIN or a session. Failing that is fatal. */
static int harden(void)
{
        struct rlimit rl = { 0, 0 };
        if (setrlimit(RLIMIT_CORE, &rl) < 0) {
                hsm_err("cannot set RLIMIT_CORE to 0: %s", strerror(errno));
                return -errno;
        }
        if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0) {
                hsm_err("cannot make the process not dumpable (PR_SET_DUMPABLE): %s", strerror(errno));
                return -errno;
        }
        return 0;
}

static void raise_nofile(void)
{
        struct rlimit rl;
        if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
                rl.rlim_cur = rl.rlim_max;
                setrlimit(RLIMIT_NOFILE, &rl);
        }
}

static int check_audit(const char *dir)
{
        hsm_audit_check ck;
        char *err = NULL;
        int r = hsm_audit_check_dir(dir, &ck, &err);
        if (r == 0) {
                printf("audit log %s/state.db: intact, %llu records\n", dir, (unsigned long long)ck.records);
                return 0;
        }
        if (r == -EBADMSG)
                printf("audit log %s/state.db: BROKEN at record %lld: %s (%llu records check before it)\n", dir,
                       (long long)ck.first_bad, ck.reason, (unsigned long long)ck.records);
        else
                printf("audit log %s/state.db: cannot check: %s\n", dir, err ? err : ck.reason[0] ? ck.reason : strerror(-r));
        free(err);
        return 1;
}

/* The state database (usage totals of every configured key, the audit
 * log), when [global] state_dir is set. */
/* A reload committed: the admin API reads the new configuration. */
static void on_reload(void *arg, const hsm_conf *conf)
{
        hsm_admin_set_conf(*(hsm_admin **)arg, conf);
}

static int open_store(const hsm_conf *conf, hsm_keystore *ks, hsm_store **ret, char **err)
{
        if (!conf->state_dir)
                return 0;
        int r = hsm_store_open(conf->state_dir, ret, err);
        for (unsigned i = 0; r == 0 && i < hsm_keystore_n_keys(ks); i++) {
                hsm_key *k = hsm_keystore_key(ks, i);
                r = hsm_store_track(*ret, hsm_keystore_token_name(ks, i), hsm_key_uri(k), hsm_key_usage(k));
        }
        if (r == 0)
                r = hsm_store_start(*ret, 1000);
        return r;
}

int main(int argc, char **argv)
{
        static const struct option opts[] = {
                { "config", required_argument, NULL, 'c' },
                { "check", no_argument, NULL, 't' },
                { "log-level", required_argument, NULL, 'l' },
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, 'V' },
                { "check-audit", required_argument, NULL, 'A' },
                { 0 },
        };
        const char *config = HSMTLS_SYSCONFDIR "/hsmtls/hsmtlsd.conf";
        int check = 0, level = -1, o;

        hsm_log_set_ident("hsmtlsd");
        while ((o = getopt_long(argc, argv, "c:tl:hV", opts, NULL)) != -1) {
                switch (o) {
                case 'c': config = optarg; break;
                case 't': check = 1; break;
                case 'l':
                        level = hsm_log_level_from_string(optarg);
                        if (level < 0) {
                                fprintf(stderr, "hsmtlsd: unknown log level '%s' (error, warning, notice, info, debug)\n", optarg);
                                return 2;
                        }
                        break;
                case 'h': usage(stdout); return 0;
                case 'V': printf("hsmtlsd %s (GnuTLS %s)\n", HSMTLS_VERSION, gnutls_check_version(NULL)); return 0;
                case 'A': return check_audit(optarg);
                default: usage(stderr); return 2;
                }
        }
        if (optind < argc) {
                fprintf(stderr, "hsmtlsd: unexpected argument '%s'\n", argv[optind]);
                usage(stderr);
                return 2;
        }

        if (harden() < 0)
                return 1;
        signal(SIGPIPE, SIG_IGN);
        raise_nofile();
        if (gnutls_global_init() < 0)
                return 1;

        hsm_conf *conf = NULL;
        hsm_keystore *ks = NULL;
        hsm_server *srv = NULL;
        hsm_store *store = NULL;
        hsm_admin *admin = NULL;
        char *err = NULL;
        int ret = 1;

        int r = hsm_conf_load(config, &conf, &err);
        if (r < 0) {
                hsm_err("%s", err ? err : strerror(-r));
                goto out;
        }
        hsm_log_set_level(level >= 0 ? level : conf->log_level);
        r = hsm_keystore_open(conf, &ks, &err);
        if (r < 0) {
                hsm_err("%s", err ? err : strerror(-r));
                goto out;
        }
        if (check) {
                if (level < 0 && conf->log_level < HSM_LOG_NOTICE)
                        hsm_log_set_level(HSM_LOG_NOTICE);
                for (unsigned i = 0; i < conf->n_listeners; i++) {
                        hsm_creds *cr = NULL;
                        r = hsm_creds_load(ks, conf, &conf->listeners[i], true, &cr, &err);
                        if (r < 0) {
                                hsm_err("%s", err ? err : strerror(-r));
                                goto out;
                        }
                        hsm_creds_free(cr);
                        gnutls_priority_t prio;
                        r = hsm_listener_priority(conf, &conf->listeners[i], &prio, &err);
                        if (r < 0) {
                                hsm_err("%s", err ? err : strerror(-r));
                                goto out;
                        }
                        gnutls_priority_deinit(prio);
                }
                r = hsm_admin_check(conf, ks, &err);
                if (r < 0) {
                        hsm_err("%s", err ? err : strerror(-r));
                        goto out;
                }
                hsm_notice("%s: configuration OK (tokens: %u, listeners and connectors: %u)", config, conf->n_tokens,
                           conf->n_listeners);
                ret = 0;
                goto out;
        }
        r = hsm_server_new(conf, ks, &srv, &err);
        if (r < 0) {
                hsm_err("%s", err ? err : strerror(-r));
                goto out;
        }
        r = open_store(conf, ks, &store, &err);
        if (r == 0 && store)
                hsm_admin_apply_bindings(conf, srv, store); /* state.db's bindings over the file's chains */
        if (r == 0 && conf->admin.enabled)
                r = hsm_admin_start(conf, ks, srv, store, &admin, &err);
        /* Under systemd, READY=1 (hsm_server_run) means every key signs. */
        if (r == 0 && hsm_notify_enabled())
                r = hsm_notify_self_test(ks, &err);
        if (r < 0) {
                hsm_err("%s", err ? err : strerror(-r));
                goto out;
        }
        hsm_server_set_reload(srv, config, store, level, on_reload, &admin);
        r = hsm_server_run(srv);
        hsm_server_log_usage(srv);
        ret = r < 0 ? 1 : 0;
        if (hsm_server_threads_left(srv))
                /* Threads are inside a token call that may never return:
                 * no cleanup under them (the logs are written already). */
                _exit(ret);
out:
        free(err);
        hsm_admin_stop(admin);
        hsm_store_close(store); /* the last flush of the usage totals */
        hsm_server_free(srv);
        hsm_keystore_free(ks);
        hsm_conf_free(conf);
        gnutls_global_deinit();
        return ret;
}
