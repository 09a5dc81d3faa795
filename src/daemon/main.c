#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <gnutls/gnutls.h>

#include "admin.h"
#include "conf.h"
#include "creds.h"
#include "log.h"
#include "pin.h"
#include "notify.h"
#include "ocsp.h"
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

/* [global] user/group: who the daemon becomes once its listeners are
 * bound. Looked up at start, so that an unknown name stops it before any
 * token is opened. */
typedef struct run_as {
        bool set;
        uid_t uid;
        gid_t gid;
        gid_t *groups; /* the user's supplementary groups (group database), gid included */
        int n_groups;
        char *user;
} run_as;

static bool all_digits(const char *s)
{
        for (; *s; s++)
                if (*s < '0' || *s > '9')
                        return false;
        return true;
}

static int conf_error(char **err, const hsm_conf *c, int line, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int conf_error(char **err, const hsm_conf *c, int line, const char *fmt, ...)
{
        char *m = NULL;
        va_list ap;
        va_start(ap, fmt);
        if (vasprintf(&m, fmt, ap) < 0)
                m = NULL;
        va_end(ap);
        if (asprintf(err, "%s:%d: %s", c->path, line, m ? m : "out of memory") < 0)
                *err = NULL;
        free(m);
        return -EINVAL;
}

static int resolve_run_as(const hsm_conf *c, bool check, run_as *ra, char **err)
{
        char buf[16384];
        if (!c->user && !c->group)
                return 0;
        if (!c->user)
                return conf_error(err, c, c->group_line, "group = %s needs user = too (dropping only the group would keep root)", c->group);
        struct passwd pwb, *pw = NULL;
        int e = all_digits(c->user) ? getpwuid_r((uid_t)strtoul(c->user, NULL, 10), &pwb, buf, sizeof(buf), &pw)
                                    : getpwnam_r(c->user, &pwb, buf, sizeof(buf), &pw);
        if (!pw)
                return conf_error(err, c, c->user_line, "user = %s: %s", c->user,
                                  e ? strerror(e) : "unknown user (not in the user database: getent passwd)");
        if (pw->pw_uid == 0)
                return conf_error(err, c, c->user_line, "user = %s is root: no privileges would be dropped (leave user out)", c->user);
        ra->uid = pw->pw_uid;
        ra->gid = pw->pw_gid;
        ra->user = strdup(pw->pw_name);
        if (!ra->user)
                return -ENOMEM;
        if (c->group) {
                struct group grb, *gr = NULL;
                char gbuf[16384];
                e = all_digits(c->group) ? getgrgid_r((gid_t)strtoul(c->group, NULL, 10), &grb, gbuf, sizeof(gbuf), &gr)
                                         : getgrnam_r(c->group, &grb, gbuf, sizeof(gbuf), &gr);
                if (!gr)
                        return conf_error(err, c, c->group_line, "group = %s: %s", c->group,
                                          e ? strerror(e) : "unknown group (not in the group database: getent group)");
                if (gr->gr_gid == 0)
                        return conf_error(err, c, c->group_line, "group = %s is root's group: leave group out, or name another", c->group);
                ra->gid = gr->gr_gid;
        }
        /* The supplementary groups are the user's own (as login would give
         * them), never the ones hsmtlsd was started with. */
        int n = 16;
        for (;;) {
                gid_t *g = realloc(ra->groups, (size_t)n * sizeof(gid_t));
                if (!g)
                        return -ENOMEM;
                ra->groups = g;
                int want = n;
                if (getgrouplist(ra->user, ra->gid, ra->groups, &want) >= 0) {
                        ra->n_groups = want;
                        break;
                }
                if (want <= n || want > 65536)
                        return conf_error(err, c, c->user_line, "user = %s: cannot list its groups", c->user);
                n = want;
        }
        for (int i = 0; i < ra->n_groups; i++)
                if (ra->groups[i] == 0)
                        return conf_error(err, c, c->user_line, "user = %s is a member of root's group (gid 0): no privileges would be dropped", c->user);
        if (geteuid() != 0) {
                if (check || (geteuid() == ra->uid && getegid() == ra->gid))
                        ra->set = false; /* --check, or already that user: nothing to do */
                else
                        return conf_error(err, c, c->user_line, "user = %s: hsmtlsd must start as root to become another user (it runs as uid %u)",
                                          c->user, (unsigned)geteuid());
        } else
                ra->set = true;
        return 0;
}

static void run_as_done(run_as *ra)
{
        free(ra->groups);
        free(ra->user);
}

/* The state directory, what is in it (state.db and its -wal and -shm) and
 * the admin API's unix socket are made by root before the drop: give them
 * to the user, who goes on writing (and, at a restart as that user, opening)
 * them. Root works in a directory the user may control, so nothing is
 * followed: the directory itself must be no symbolic link and belong to
 * root or the user; each entry is opened without following a link (a
 * symbolic link is left alone: its target may be anywhere), and a file with
 * another hard link (the same file outside) refuses the start; the owner
 * is changed through the descriptor opened, never by name again. */
static int chown_state_dir(const char *dir, const run_as *ra)
{
        int r = 0;
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (dfd < 0) {
                r = -errno;
                hsm_err("state directory %s: cannot open it without following a link: %s", dir,
                        r == -ELOOP || r == -ENOTDIR ? "it is a symbolic link (or no directory): give its real path" : strerror(-r));
                return r;
        }
        struct stat st;
        if (fstat(dfd, &st) < 0) {
                r = -errno;
                hsm_err("state directory %s: %s", dir, strerror(-r));
                close(dfd);
                return r;
        }
        if (st.st_uid != 0 && st.st_uid != ra->uid) {
                hsm_err("state directory %s belongs to uid %u, neither root nor user %s: not given to %s", dir, (unsigned)st.st_uid,
                        ra->user, ra->user);
                close(dfd);
                return -EPERM;
        }
        if (fchown(dfd, ra->uid, ra->gid) < 0) {
                r = -errno;
                hsm_err("state directory %s: cannot give it to user %s: %s", dir, ra->user, strerror(-r));
                close(dfd);
                return r;
        }
        int lfd = dup(dfd);
        DIR *d = lfd >= 0 ? fdopendir(lfd) : NULL;
        if (!d) {
                r = -errno;
                hsm_err("state directory %s: %s", dir, strerror(-r));
                if (lfd >= 0)
                        close(lfd);
                close(dfd);
                return r;
        }
        struct dirent *de;
        while (r == 0 && (de = readdir(d))) {
                if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
                        continue;
                int fd = openat(dfd, de->d_name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
                if (fd < 0 || fstat(fd, &st) < 0) {
                        r = -errno;
                        hsm_err("state directory %s: %s: %s", dir, de->d_name, strerror(-r));
                } else if (S_ISLNK(st.st_mode))
                        hsm_notice("state directory %s: %s is a symbolic link: left alone (not followed)", dir, de->d_name);
                else if (!S_ISDIR(st.st_mode) && st.st_nlink > 1) {
                        hsm_err("state directory %s: %s has %lu hard links: it may be a file outside the directory; not "
                                "given to user %s", dir, de->d_name, (unsigned long)st.st_nlink, ra->user);
                        r = -EPERM;
                } else if (fchownat(fd, "", ra->uid, ra->gid, AT_EMPTY_PATH) < 0) {
                        r = -errno;
                        hsm_err("state directory %s: cannot give %s to user %s: %s", dir, de->d_name, ra->user, strerror(-r));
                }
                if (fd >= 0)
                        close(fd);
        }
        closedir(d);
        close(dfd);
        return r;
}

static int chown_state(const hsm_conf *c, const run_as *ra)
{
        int r;
        if (c->state_dir && (r = chown_state_dir(c->state_dir, ra)) < 0)
                return r;
        if (c->admin.enabled && c->admin.listen.ss.ss_family == AF_UNIX) {
                const char *path = ((const struct sockaddr_un *)&c->admin.listen.ss)->sun_path;
                if (lchown(path, ra->uid, ra->gid) < 0) {
                        hsm_err("[admin] listen unix:%s: cannot give it to user %s: %s", path, ra->user, strerror(errno));
                        return -errno;
                }
        }
        return 0;
}

/* After the listeners are bound and before anything is served: the
 * groups, then the group, then the user (all threads: glibc applies them
 * process-wide), then a check that none of it can be undone. */
static int drop_privileges(const hsm_conf *c, const run_as *ra)
{
        if (!ra->set)
                return 0;
        int r = chown_state(c, ra);
        if (r < 0)
                return r;
        if (setgroups((size_t)ra->n_groups, ra->groups) < 0) {
                hsm_err("user = %s: setgroups: %s", ra->user, strerror(errno));
                return -errno;
        }
        if (setresgid(ra->gid, ra->gid, ra->gid) < 0) {
                hsm_err("user = %s: setresgid(%u): %s", ra->user, (unsigned)ra->gid, strerror(errno));
                return -errno;
        }
        if (setresuid(ra->uid, ra->uid, ra->uid) < 0) {
                hsm_err("user = %s: setresuid(%u): %s", ra->user, (unsigned)ra->uid, strerror(errno));
                return -errno;
        }
        uid_t ru, eu, su;
        gid_t rg, eg, sg;
        gid_t now[64];
        int n = getgroups(64, now);
        if (getresuid(&ru, &eu, &su) < 0 || getresgid(&rg, &eg, &sg) < 0 || ru != ra->uid || eu != ra->uid ||
            su != ra->uid || rg != ra->gid || eg != ra->gid || sg != ra->gid || n < 0 || n > ra->n_groups) {
                hsm_err("user = %s: the user and groups did not change as asked", ra->user);
                return -EPERM;
        }
        for (int i = 0; i < n; i++)
                if (now[i] == 0) {
                        hsm_err("user = %s: root's group is still a supplementary group", ra->user);
                        return -EPERM;
                }
        if (setuid(0) == 0 || seteuid(0) == 0 || setgid(0) == 0 || setegid(0) == 0) {
                hsm_err("user = %s: root could be regained after the drop", ra->user);
                return -EPERM;
        }
        /* A change of user resets dumpability to the system's suid_dumpable. */
        if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0) {
                hsm_err("cannot make the process not dumpable (PR_SET_DUMPABLE): %s", strerror(errno));
                return -errno;
        }
        hsm_notice("running as user %s (uid %u, gid %u, %d supplementary group%s)", ra->user, (unsigned)ra->uid,
                   (unsigned)ra->gid, n, n == 1 ? "" : "s");
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

/* --check: the bindings made through the admin API (state.db), applied
 * over the file's chains as a start applies them (hsm_bindings_plan_new),
 * built and checked like the file's: a binding that no longer builds (its
 * key deleted, its chain not its key's) is reported with its listener,
 * fingerprint and reason (a start would serve the file's chains for that
 * listener, a reload would be refused). Without a state directory, or
 * one that has no state.db yet, there is nothing to check. */
static int check_bindings(const hsm_conf *conf, hsm_keystore *ks, char **err)
{
        hsm_store *st = NULL;
        hsm_bindings_plan *plan = NULL;
        if (!conf->state_dir)
                return 0;
        int r = hsm_store_open_readonly(conf->state_dir, &st, err);
        if (r == -ENOENT)
                return 0;
        if (r == -EACCES) {
                hsm_warn("%s/state.db cannot be read by this user: the bindings made through the admin API are not checked",
                         conf->state_dir);
                return 0;
        }
        if (r < 0)
                return r;
        r = hsm_bindings_plan_new(conf, st, &plan, err);
        unsigned n = 0;
        const hsm_listener_chains *set = r == 0 ? hsm_bindings_plan_set(plan, &n) : NULL;
        for (unsigned i = 0; r == 0 && i < n; i++) {
                if (!hsm_bindings_plan_bound(plan, i))
                        continue;
                const hsm_conf_listener *l = &conf->listeners[i];
                hsm_creds *cr = NULL;
                char *e = NULL;
                r = hsm_creds_build(ks, l, set[i].chains, set[i].n_chains, HSM_CREDS_VERBOSE, &cr, NULL, &e);
                if (r == 0)
                        r = hsm_creds_set_trust(cr, conf, l, false, &e);
                hsm_creds_unref(cr);
                if (r < 0) {
                        hsm_set_error(err, "listener %s: the bindings in %s/state.db cannot be applied: %s (a start would "
                                      "serve the configuration file's chains, a reload is refused)",
                                      l->name, conf->state_dir, e ? e : strerror(-r));
                        free(e);
                } else
                        hsm_notice("listener %s: the bindings in %s/state.db apply over the configuration file (%u chain%s)",
                                   l->name, conf->state_dir, set[i].n_chains, set[i].n_chains == 1 ? "" : "s");
        }
        hsm_bindings_plan_free(plan);
        hsm_store_close(st);
        return r;
}

/* The state database (usage totals of every configured key, the audit
 * log), when [global] state_dir is set. */
/* A reload committed: the admin API reads the new configuration. */
static void on_reload(void *arg, const hsm_conf *conf)
{
        hsm_admin_set_conf(*(hsm_admin **)arg, conf);
}

/* Every key of the keystore, at start and whenever one is added (a key
 * first used through the admin API or by a reload): its usage totals. */
static void track_key(void *arg, const char *token, hsm_key *k)
{
        if (hsm_store_track(arg, token, hsm_key_uri(k), hsm_key_usage(k)) < 0)
                hsm_warn("state database: the usage of key %s on token %s is not kept", hsm_key_uri(k), token);
}

static int open_store(const hsm_conf *conf, hsm_keystore *ks, hsm_store **ret, char **err)
{
        if (!conf->state_dir)
                return 0;
        int r = hsm_store_open(conf->state_dir, ret, err);
        if (r == 0)
                r = hsm_store_start(*ret, 1000);
        if (r == 0)
                hsm_keystore_on_key(ks, track_key, *ret);
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
        run_as ra = { 0 };
        char *err = NULL;
        int ret = 1;

        int r = hsm_conf_load(config, &conf, &err);
        if (r < 0) {
                hsm_err("%s", err ? err : strerror(-r));
                goto out;
        }
        hsm_log_set_level(level >= 0 ? level : conf->log_level);
        r = resolve_run_as(conf, check, &ra, &err);
        if (r < 0) {
                hsm_err("%s", err ? err : strerror(-r));
                goto out;
        }
        if (ra.user)
                hsm_pin_trust_uid(ra.uid); /* its PIN file may be its own */
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
                r = check_bindings(conf, ks, &err);
                if (r < 0) {
                        hsm_err("%s", err ? err : strerror(-r));
                        goto out;
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
        if (drop_privileges(conf, &ra) < 0)
                goto out;
        r = hsm_server_run(srv);
        hsm_server_log_usage(srv);
        ret = r < 0 ? 1 : 0;
        if (hsm_server_threads_left(srv))
                /* Threads are inside a token call that may never return:
                 * no cleanup under them (the logs are written already). */
                _exit(ret);
        /* The admin API runs until here: a change it was making may have
         * started a test signature after that look, which may still be
         * inside the token once the change gave up waiting for it. */
        hsm_admin_stop(admin);
        admin = NULL;
        if (hsm_server_threads_left(srv))
                _exit(ret);
out:
        free(err);
        hsm_admin_stop(admin);
        hsm_ocsp_shutdown(); /* no OCSP fetch outlives the teardown below */
        if (ks)
                hsm_keystore_on_key(ks, NULL, NULL);
        hsm_store_close(store); /* the last flush of the usage totals */
        hsm_server_free(srv);
        hsm_keystore_free(ks);
        hsm_conf_free(conf);
        run_as_done(&ra);
        gnutls_global_deinit();
        return ret;
}
