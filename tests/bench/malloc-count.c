/* malloc-count: an LD_PRELOAD counter of heap calls, for
 * tests/bench/per-handshake.
 *
 * Counts malloc, calloc, realloc, free and the aligned allocations of the
 * whole process (relaxed atomic adds, forwarded to glibc's __libc_*
 * functions, so nothing is allocated or looked up on the way). On signal
 * SIGRTMIN+3 it writes one line to $HSMTLS_MALLOC_COUNT_FILE (to FILE.tmp,
 * then renamed, with write(2) and rename(2) only: async-signal-safe):
 *   seq=3 malloc=1200 calloc=30 realloc=7 aligned=0 free=1190
 * seq counts the snapshots, so a reader can wait for a fresh one.
 *
 * Build: cc -O2 -shared -fPIC -o malloc-count.so malloc-count.c
 * Use:   HSMTLS_MALLOC_COUNT_FILE=/tmp/m LD_PRELOAD=./malloc-count.so prog
 *        kill -s RTMIN+3 PID; cat /tmp/m
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);

static unsigned long n_malloc, n_calloc, n_realloc, n_aligned, n_free, n_seq;
static char path[512], tmp_path[520];

#define ADD(x) __atomic_add_fetch(&(x), 1, __ATOMIC_RELAXED)

void *malloc(size_t n)
{
        ADD(n_malloc);
        return __libc_malloc(n);
}

void *calloc(size_t a, size_t b)
{
        ADD(n_calloc);
        return __libc_calloc(a, b);
}

void *realloc(void *p, size_t n)
{
        ADD(n_realloc);
        return __libc_realloc(p, n);
}

void free(void *p)
{
        if (p)
                ADD(n_free);
        __libc_free(p);
}

void *memalign(size_t align, size_t n)
{
        ADD(n_aligned);
        return __libc_memalign(align, n);
}

void *aligned_alloc(size_t align, size_t n)
{
        ADD(n_aligned);
        return __libc_memalign(align, n);
}

int posix_memalign(void **ret, size_t align, size_t n)
{
        ADD(n_aligned);
        void *p = __libc_memalign(align, n);
        if (!p)
                return ENOMEM;
        *ret = p;
        return 0;
}

static size_t put_num(char *b, unsigned long v)
{
        char d[24];
        size_t n = 0, i = 0;
        do
                d[n++] = (char)('0' + v % 10);
        while ((v /= 10));
        while (n)
                b[i++] = d[--n];
        return i;
}

static size_t put_str(char *b, const char *s)
{
        size_t n = strlen(s);
        memcpy(b, s, n);
        return n;
}

static void on_signal(int sig)
{
        (void)sig;
        int saved = errno;
        char line[256];
        size_t n = 0;
        static const char *const names[] = { "seq=", " malloc=", " calloc=", " realloc=", " aligned=", " free=" };
        unsigned long v[6] = { __atomic_add_fetch(&n_seq, 1, __ATOMIC_RELAXED), __atomic_load_n(&n_malloc, __ATOMIC_RELAXED),
                               __atomic_load_n(&n_calloc, __ATOMIC_RELAXED), __atomic_load_n(&n_realloc, __ATOMIC_RELAXED),
                               __atomic_load_n(&n_aligned, __ATOMIC_RELAXED), __atomic_load_n(&n_free, __ATOMIC_RELAXED) };
        for (int i = 0; i < 6; i++) {
                n += put_str(line + n, names[i]);
                n += put_num(line + n, v[i]);
        }
        line[n++] = '\n';
        int fd = open(tmp_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd >= 0) {
                ssize_t w = write(fd, line, n);
                close(fd);
                if (w == (ssize_t)n)
                        rename(tmp_path, path);
        }
        errno = saved;
}

__attribute__((constructor)) static void init(void)
{
        const char *p = getenv("HSMTLS_MALLOC_COUNT_FILE");
        if (!p || strlen(p) >= sizeof(path))
                return;
        strcpy(path, p);
        strcpy(tmp_path, p);
        strcat(tmp_path, ".tmp");
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = on_signal;
        sa.sa_flags = SA_RESTART;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGRTMIN + 3, &sa, NULL);
}
