#include "pin.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"

#define PIN_MAX 256

enum pin_kind { PIN_FILE, PIN_ENV, PIN_CREDENTIAL };

struct env_pin;

struct hsm_pin_source {
        enum pin_kind kind;
        char *arg;
        char *description;
        struct env_pin *env; /* PIN_ENV: the PIN taken out of the environment */
};

/* A PIN from an environment variable is taken out of the environment when
 * the first source naming the variable is made: copied into a locked page
 * that core dumps leave out, wiped in the environment (which also hides it
 * from /proc/PID/environ) and unset. Sources naming the same variable share
 * the copy; the last one to go wipes it. */
struct env_pin {
        struct env_pin *next;
        char *name;
        char *pin; /* a page of its own, PIN_MAX + 1 bytes used */
        size_t len;
        unsigned refs;
};

static pthread_mutex_t env_lock = PTHREAD_MUTEX_INITIALIZER;
static struct env_pin *env_pins;

static char *secret_page_new(void)
{
        size_t n = (size_t)sysconf(_SC_PAGESIZE);
        if (n < PIN_MAX + 1)
                n = PIN_MAX + 1;
        void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
                return NULL;
        (void)mlock(p, n);                /* best effort: not swapped out */
        (void)madvise(p, n, MADV_DONTDUMP); /* not in core dumps */
        return p;
}

static void secret_page_free(char *p)
{
        size_t n = (size_t)sysconf(_SC_PAGESIZE);
        if (n < PIN_MAX + 1)
                n = PIN_MAX + 1;
        explicit_bzero(p, PIN_MAX + 1);
        munmap(p, n);
}

/* Called with env_lock held. NULL if the variable is not set (or no memory). */
static struct env_pin *env_take_locked(const char *name)
{
        for (struct env_pin *e = env_pins; e; e = e->next)
                if (strcmp(e->name, name) == 0) {
                        e->refs++;
                        return e;
                }
        char *v = getenv(name);
        if (!v)
                return NULL;
        struct env_pin *e = calloc(1, sizeof(*e));
        if (!e || !(e->name = strdup(name)) || !(e->pin = secret_page_new())) {
                if (e)
                        free(e->name);
                free(e);
                return NULL;
        }
        size_t n = strlen(v);
        e->len = n;
        memcpy(e->pin, v, n > PIN_MAX ? PIN_MAX : n);
        explicit_bzero(v, n);
        unsetenv(name);
        e->refs = 1;
        e->next = env_pins;
        env_pins = e;
        return e;
}

static void env_put(struct env_pin *e)
{
        if (!e)
                return;
        pthread_mutex_lock(&env_lock);
        if (--e->refs == 0) {
                for (struct env_pin **p = &env_pins; *p; p = &(*p)->next)
                        if (*p == e) {
                                *p = e->next;
                                break;
                        }
                secret_page_free(e->pin);
                free(e->name);
                free(e);
        }
        pthread_mutex_unlock(&env_lock);
}

static int has_prefix(const char *s, const char *p, const char **rest)
{
        size_t n = strlen(p);
        if (strncmp(s, p, n) != 0)
                return 0;
        *rest = s + n;
        return 1;
}

int hsm_pin_source_new(const char *spec, hsm_pin_source **ret)
{
        const char *rest = NULL;
        enum pin_kind kind;

        if (!spec || !*spec)
                return -EINVAL;
        if (has_prefix(spec, "file:", &rest))
                kind = PIN_FILE;
        else if (has_prefix(spec, "env:", &rest))
                kind = PIN_ENV;
        else if (has_prefix(spec, "credential:", &rest))
                kind = PIN_CREDENTIAL;
        else if (spec[0] == '/' || spec[0] == '.') {
                kind = PIN_FILE;
                rest = spec;
        } else
                return -EINVAL;
        /* "file:///path" (RFC 8089) as well as "file:/path". */
        if (kind == PIN_FILE && strncmp(rest, "//", 2) == 0)
                rest += 2;
        if (!*rest)
                return -EINVAL;
        if (kind == PIN_CREDENTIAL && strchr(rest, '/'))
                return -EINVAL;

        hsm_pin_source *src = calloc(1, sizeof(*src));
        if (!src)
                return -ENOMEM;
        src->kind = kind;
        src->arg = strdup(rest);
        const char *what = kind == PIN_FILE ? "file" : kind == PIN_ENV ? "environment variable" : "systemd credential";
        if (!src->arg || asprintf(&src->description, "%s %s", what, rest) < 0) {
                src->description = NULL;
                hsm_pin_source_free(src);
                return -ENOMEM;
        }
        if (kind == PIN_ENV) {
                pthread_mutex_lock(&env_lock);
                src->env = env_take_locked(src->arg);
                pthread_mutex_unlock(&env_lock);
        }
        *ret = src;
        return 0;
}

void hsm_pin_source_free(hsm_pin_source *src)
{
        if (!src)
                return;
        env_put(src->env);
        free(src->arg);
        free(src->description);
        free(src);
}

const char *hsm_pin_source_describe(const hsm_pin_source *src)
{
        return src ? src->description : "no PIN source";
}

void hsm_pin_free(char *pin, size_t len)
{
        if (!pin)
                return;
        (void)len;
        secret_page_free(pin); /* wipes PIN_MAX + 1 bytes: every PIN buffer is a secret page */
}

static uid_t trusted_uid = (uid_t)-1;

void hsm_pin_trust_uid(uid_t uid) { __atomic_store_n(&trusted_uid, uid, __ATOMIC_RELAXED); }

static int read_pin_file(const char *path, char *buf, size_t *len, const char **reason)
{
        struct stat st;
        /* Only a regular file: a FIFO would block the login until someone
         * writes to it, a device may do something when opened. Checked
         * before opening, and again on what was opened (O_NONBLOCK: a FIFO
         * put there in between does not block the open either). */
        if (stat(path, &st) == 0 && !S_ISREG(st.st_mode)) {
                *reason = "PIN file is not a regular file";
                return -EINVAL;
        }
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0) {
                *reason = errno == ENOENT ? "PIN file does not exist" : errno == EACCES ? "PIN file is not readable" : "cannot open PIN file";
                return -errno;
        }
        if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
                close(fd);
                *reason = "PIN file is not a regular file";
                return -EINVAL;
        }
        /* Whoever may read it knows the PIN; whoever may write it can make
         * every login present a wrong PIN (a real token locks after a few). */
        if (st.st_mode & (S_IROTH | S_IWOTH | S_IWGRP)) {
                close(fd);
                *reason = "PIN file may be read or written by other users (make it mode 0600 or 0640)";
                return -EPERM;
        }
        uid_t trusted = __atomic_load_n(&trusted_uid, __ATOMIC_RELAXED);
        if (st.st_uid != 0 && st.st_uid != geteuid() && (trusted == (uid_t)-1 || st.st_uid != trusted)) {
                close(fd);
                *reason = "PIN file belongs to another user (it must belong to root or to the user the daemon runs as)";
                return -EPERM;
        }
        size_t n = 0;
        for (;;) {
                ssize_t r = read(fd, buf + n, PIN_MAX - n);
                if (r < 0 && errno == EINTR)
                        continue;
                if (r < 0) {
                        int e = -errno;
                        close(fd);
                        *reason = "cannot read PIN file";
                        return e;
                }
                if (r == 0)
                        break;
                n += (size_t)r;
                if (n >= PIN_MAX) {
                        close(fd);
                        *reason = "PIN file is too long";
                        return -E2BIG;
                }
        }
        close(fd);
        *len = n;
        return 0;
}

int hsm_pin_source_read(hsm_pin_source *src, char **ret_pin, size_t *ret_len, const char **reason)
{
        const char *dummy;
        if (!reason)
                reason = &dummy;
        *reason = NULL;
        /* A page of its own, locked in memory and left out of core dumps,
         * like the copies of env: PINs (and zero-filled by mmap). */
        char *buf = secret_page_new();
        if (!buf)
                return -ENOMEM;
        size_t len = 0;
        int r = 0;

        switch (src->kind) {
        case PIN_FILE:
                r = read_pin_file(src->arg, buf, &len, reason);
                break;
        case PIN_CREDENTIAL: {
                const char *dir = getenv("CREDENTIALS_DIRECTORY");
                char path[4096];
                if (!dir || !*dir) {
                        *reason = "$CREDENTIALS_DIRECTORY is not set (not started by systemd with LoadCredential=)";
                        r = -ENOENT;
                        break;
                }
                if ((size_t)snprintf(path, sizeof(path), "%s/%s", dir, src->arg) >= sizeof(path)) {
                        *reason = "credential path too long";
                        r = -ENAMETOOLONG;
                        break;
                }
                r = read_pin_file(path, buf, &len, reason);
                break;
        }
        case PIN_ENV: {
                pthread_mutex_lock(&env_lock);
                /* Not set when the source was made: perhaps it is now. */
                if (!src->env)
                        src->env = env_take_locked(src->arg);
                struct env_pin *e = src->env;
                if (!e) {
                        *reason = "environment variable is not set";
                        r = -ENOENT;
                } else if (e->len >= PIN_MAX) {
                        *reason = "PIN in environment variable is too long";
                        r = -E2BIG;
                } else {
                        len = e->len;
                        memcpy(buf, e->pin, len);
                }
                pthread_mutex_unlock(&env_lock);
                break;
        }
        }
        while (r >= 0 && len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == '\r'))
                buf[--len] = 0;
        if (r >= 0 && len == 0) {
                *reason = "PIN is empty";
                r = -ENODATA;
        }
        if (r < 0) {
                hsm_pin_free(buf, PIN_MAX);
                return r;
        }
        *ret_pin = buf;
        *ret_len = len;
        return 0;
}
