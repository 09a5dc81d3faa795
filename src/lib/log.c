#include "log.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static int log_level = HSM_LOG_INFO;
static const char *log_ident = "hsmtls";

void hsm_log_set_level(int level) { __atomic_store_n(&log_level, level, __ATOMIC_RELAXED); }
int hsm_log_get_level(void) { return __atomic_load_n(&log_level, __ATOMIC_RELAXED); }
void hsm_log_set_ident(const char *ident) { log_ident = ident; }

static const char *const level_names[] = {
        [HSM_LOG_ERR] = "error",
        [HSM_LOG_WARNING] = "warning",
        [HSM_LOG_NOTICE] = "notice",
        [HSM_LOG_INFO] = "info",
        [HSM_LOG_DEBUG] = "debug",
};

int hsm_log_level_from_string(const char *s)
{
        for (int i = HSM_LOG_ERR; i <= HSM_LOG_DEBUG; i++)
                if (strcasecmp(s, level_names[i]) == 0)
                        return i;
        return -EINVAL;
}

void hsm_logv(int level, const char *fmt, va_list ap)
{
        if (level > hsm_log_get_level())
                return;
        char line[2048];
        struct timespec ts;
        struct tm tm;
        clock_gettime(CLOCK_REALTIME, &ts);
        gmtime_r(&ts.tv_sec, &tm);
        int n = snprintf(line, sizeof(line), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s[%d]: %s: ",
                         tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                         ts.tv_nsec / 1000000, log_ident, (int)getpid(),
                         level >= HSM_LOG_ERR && level <= HSM_LOG_DEBUG ? level_names[level] : "log");
        if (n < 0 || (size_t)n >= sizeof(line))
                n = 0;
        int m = vsnprintf(line + n, sizeof(line) - n - 1, fmt, ap);
        if (m < 0)
                m = 0;
        size_t len = (size_t)n + (size_t)m;
        if (len > sizeof(line) - 2)
                len = sizeof(line) - 2;
        line[len++] = '\n';
        /* One write per line so that lines from threads do not interleave. */
        ssize_t r = write(STDERR_FILENO, line, len);
        (void)r;
}

void hsm_log(int level, const char *fmt, ...)
{
        va_list ap;
        va_start(ap, fmt);
        hsm_logv(level, fmt, ap);
        va_end(ap);
}

void hsm_set_error(char **errmsg, const char *fmt, ...)
{
        if (!errmsg)
                return;
        va_list ap;
        va_start(ap, fmt);
        if (vasprintf(errmsg, fmt, ap) < 0)
                *errmsg = NULL;
        va_end(ap);
}
