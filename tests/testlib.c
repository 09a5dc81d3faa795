#include "testlib.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

int test_failures;
int test_count;

const char *const test_key_names[TK__MAX] = { "rsa2048", "p256", "p384", "ed25519" };

static char *env_value(const char *line, const char *name)
{
        size_t n = strlen(name);
        if (strncmp(line, "export ", 7) != 0 || strncmp(line + 7, name, n) != 0 || line[7 + n] != '=')
                return NULL;
        const char *v = line + 7 + n + 1;
        size_t len = strlen(v);
        while (len && (v[len - 1] == '\n' || v[len - 1] == '\r'))
                len--;
        if (len >= 2 && v[0] == '\'' && v[len - 1] == '\'')
                return strndup(v + 1, len - 2);
        return strndup(v, len);
}

static bool on_path(const char *tool)
{
        const char *path = getenv("PATH");
        char buf[4096];
        for (const char *p = path ? path : "/usr/bin:/bin"; *p;) {
                size_t n = strcspn(p, ":");
                snprintf(buf, sizeof(buf), "%.*s/%s", (int)n, p, tool);
                if (n && access(buf, X_OK) == 0)
                        return true;
                p += n + (p[n] == ':');
        }
        return false;
}

/* What hsm-config/provision needs and this machine lacks (NULL: nothing):
 * the SoftHSM module and the tools, each named with its Debian package. A
 * test without them skips (exit 77) rather than fails, e.g. in a package
 * build without softhsm2. */
const char *test_token_missing(void)
{
        static const char *const modules[] = { "/usr/lib/softhsm/libsofthsm2.so",
                                               "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                                               "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so" };
        static const char *const tools[][2] = { { "softhsm2-util", "softhsm2-util (softhsm2)" },
                                                { "p11tool", "p11tool (gnutls-bin)" },
                                                { "certtool", "certtool (gnutls-bin)" },
                                                { "pkcs11-tool", "pkcs11-tool (opensc)" },
                                                { "script", "script (bsdutils)" } };
        bool module = false;
        for (size_t i = 0; i < sizeof(modules) / sizeof(modules[0]); i++)
                module = module || access(modules[i], R_OK) == 0;
        if (!module)
                return "the SoftHSM module libsofthsm2.so (softhsm2)";
        for (size_t i = 0; i < sizeof(tools) / sizeof(tools[0]); i++)
                if (!on_path(tools[i][0]))
                        return tools[i][1];
        return NULL;
}

void test_token_make(test_token *t, bool file_keys)
{
        memset(t, 0, sizeof(*t));
        const char *src = getenv("SRCDIR");
        if (!src)
                src = ".";
        const char *missing = test_token_missing();
        if (missing) {
                printf("1..0 # SKIP %s not installed: no SoftHSM token can be made (hsm-config/provision)\n", missing);
                exit(77);
        }
        const char *tmp = getenv("TMPDIR");
        snprintf(t->dir, sizeof(t->dir), "%s/hsmtls-test-XXXXXX", tmp && *tmp ? tmp : "/tmp");
        if (!mkdtemp(t->dir)) {
                perror("mkdtemp");
                exit(1);
        }
        char cmd[1024];
        snprintf(cmd, sizeof(cmd), "'%s/hsm-config/provision' '%s/tok' --quiet%s%s", src, t->dir, file_keys ? " --file-keys" : "",
                 getenv("HSMTLS_TEST_CLIENT_KEYS") ? " --client-keys" : "");
        int r = system(cmd);
        if (r != 0) {
                fprintf(stderr, "provisioning failed (%d): %s\n", r, cmd);
                exit(1);
        }
        char path[512];
        snprintf(path, sizeof(path), "%s/tok/uris.env", t->dir);
        FILE *f = fopen(path, "re");
        if (!f) {
                perror(path);
                exit(1);
        }
        char line[2048];
        while (fgets(line, sizeof(line), f)) {
                char *v;
                if ((v = env_value(line, "SOFTHSM2_CONF"))) {
                        setenv("SOFTHSM2_CONF", v, 1);
                        free(v);
                }
                if ((v = env_value(line, "HSMTLS_MODULE"))) t->module = v;
                if ((v = env_value(line, "HSMTLS_TOKEN_URI"))) t->token_uri = v;
                if ((v = env_value(line, "HSMTLS_PIN_FILE"))) t->pin_file = v;
                if ((v = env_value(line, "HSMTLS_CA"))) t->ca = v;
                if ((v = env_value(line, "HSMTLS_CLIENTKEY_AUTH"))) t->auth_key = v;
                if ((v = env_value(line, "HSMTLS_CLIENTCERT_AUTH"))) t->auth_cert = v;
                for (int i = 0; i < TK__MAX; i++) {
                        char name[64];
                        char up[16];
                        size_t j;
                        for (j = 0; test_key_names[i][j]; j++)
                                up[j] = (char)(test_key_names[i][j] >= 'a' ? test_key_names[i][j] - 32 : test_key_names[i][j]);
                        up[j] = 0;
                        snprintf(name, sizeof(name), "HSMTLS_KEY_%s", up);
                        if ((v = env_value(line, name))) t->key[i] = v;
                        snprintf(name, sizeof(name), "HSMTLS_CERT_%s", up);
                        if ((v = env_value(line, name))) t->cert[i] = v;
                        snprintf(name, sizeof(name), "HSMTLS_FILEKEY_%s", up);
                        if ((v = env_value(line, name))) t->filekey[i] = v;
                        snprintf(name, sizeof(name), "HSMTLS_FILECERT_%s", up);
                        if ((v = env_value(line, name))) t->filecert[i] = v;
                }
        }
        fclose(f);
        if (!t->module || !t->token_uri || !t->pin_file || !t->key[TK_ED25519]) {
                fprintf(stderr, "uris.env is incomplete\n");
                exit(1);
        }
}

char *test_write_file(test_token *t, const char *name, const char *s)
{
        char *path = NULL;
        if (asprintf(&path, "%s/%s", t->dir, name) < 0)
                exit(1);
        FILE *f = fopen(path, "we");
        if (!f) {
                perror(path);
                exit(1);
        }
        fputs(s, f);
        fclose(f);
        chmod(path, 0600);
        return path;
}

void test_token_cleanup(test_token *t)
{
        if (!t->dir[0] || getenv("HSMTLS_KEEP_TEST_DIR"))
                return;
        char cmd[600];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", t->dir);
        if (system(cmd) != 0)
                fprintf(stderr, "cannot remove %s\n", t->dir);
        free(t->module);
        free(t->token_uri);
        free(t->pin_file);
        free(t->ca);
        free(t->auth_key);
        free(t->auth_cert);
        for (int i = 0; i < TK__MAX; i++) {
                free(t->key[i]);
                free(t->cert[i]);
                free(t->filekey[i]);
                free(t->filecert[i]);
        }
}

int test_done(void)
{
        printf("1..%d\n", test_count);
        if (test_failures)
                printf("# %d of %d checks failed\n", test_failures, test_count);
        return test_failures ? 1 : 0;
}
