/* Small helpers shared by the C tests: TAP-like checks and a fresh SoftHSM
 * token made by hsm-config/provision (the same script the README uses). */
#pragma once

#include <stdbool.h>
#include <stdio.h>

extern int test_failures;
extern int test_count;

#define CHECK(cond, ...)                                                                  \
        do {                                                                              \
                test_count++;                                                             \
                if (cond) {                                                               \
                        printf("ok %d - ", test_count);                                   \
                } else {                                                                  \
                        test_failures++;                                                  \
                        printf("not ok %d - %s:%d: ", test_count, __FILE__, __LINE__);    \
                }                                                                         \
                printf(__VA_ARGS__);                                                      \
                printf("\n");                                                             \
                fflush(stdout);                                                           \
        } while (0)

enum { TK_RSA2048, TK_P256, TK_P384, TK_ED25519, TK__MAX };

typedef struct test_token {
        char dir[256];
        char *module, *token_uri, *pin_file, *ca;
        char *key[TK__MAX];  /* pkcs11: URIs */
        char *cert[TK__MAX]; /* chain PEM files */
        char *filekey[TK__MAX], *filecert[TK__MAX];
        char *auth_key, *auth_cert; /* with HSMTLS_TEST_CLIENT_KEYS=1: the CKA_ALWAYS_AUTHENTICATE client key */
} test_token;

extern const char *const test_key_names[TK__MAX];

/* What making a SoftHSM token needs and is missing (see testlib.c), or NULL. */
const char *test_token_missing(void);
/* Makes a fresh token in a new temporary folder (sets SOFTHSM2_CONF).
 * Exits 77 (skip) when SoftHSM or the provisioning tools are missing. */
void test_token_make(test_token *t, bool file_keys);
void test_token_cleanup(test_token *t);
/* Writes s to a new file in the token folder; returns its path (malloc'd). */
char *test_write_file(test_token *t, const char *name, const char *s);
int test_done(void);
