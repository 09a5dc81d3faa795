#include "pin.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"

#define PIN_MAX 256

enum pin_kind { PIN_FILE, PIN_ENV, PIN_CREDENTIAL };

struct hsm_pin_source {
        enum pin_kind kind;
        char *arg;
        char *description;
};

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
        *ret = src;
        return 0;
}

void hsm_pin_source_free(hsm_pin_source *src)
{
        if (!src)
                return;
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
        explicit_bzero(pin, PIN_MAX + 1); /* every PIN buffer is PIN_MAX + 1 bytes */
        free(pin);
}

static int read_pin_file(const char *path, char *buf, size_t *len, const char **reason)
{
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0) {
                *reason = errno == ENOENT ? "PIN file does not exist" : errno == EACCES ? "PIN file is not readable" : "cannot open PIN file";
                return -errno;
        }
        struct stat st;
        if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
                close(fd);
                *reason = "PIN file is not a regular file";
                return -EINVAL;
        }
        if (st.st_mode & (S_IROTH | S_IWOTH))
                hsm_log(HSM_LOG_WARNING, "PIN file %s is accessible by other users; it should be mode 0600 or 0640", path);
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

int hsm_pin_source_read(const hsm_pin_source *src, char **ret_pin, size_t *ret_len, const char **reason)
{
        const char *dummy;
        if (!reason)
                reason = &dummy;
        *reason = NULL;
        char *buf = calloc(1, PIN_MAX + 1);
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
                const char *v = getenv(src->arg);
                if (!v) {
                        *reason = "environment variable is not set";
                        r = -ENOENT;
                        break;
                }
                len = strlen(v);
                if (len >= PIN_MAX) {
                        *reason = "PIN in environment variable is too long";
                        r = -E2BIG;
                        break;
                }
                memcpy(buf, v, len);
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
