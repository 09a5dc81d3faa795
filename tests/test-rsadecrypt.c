/* TLS 1.2 RSA key exchange decryption through the key bridge (the decrypt
 * callback of hsm_privkey_import), fed with crafted ciphertexts: a good
 * premaster, bad paddings, premasters of the wrong length, an all-zero and a
 * short ciphertext. A good one decrypts to its premaster; every bad one
 * gives 48 bytes of synthetic premaster (the same for the same ciphertext,
 * another for another), and all of them are counted and logged alike.
 *
 * Twice: on SoftHSM itself (CKM_RSA_X_509 offered: raw decryption, the
 * padding checked in constant time here), and through the fault module with
 * CKM_RSA_X_509 hidden (CKM_RSA_PKCS: the token checks the padding) and a
 * bad padding reported as CKR_SESSION_HANDLE_INVALID, which must not make
 * the pool reopen sessions, log in again or retry. */
#include <errno.h>
#include <fcntl.h>
#include <gmp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gnutls/abstract.h>
#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#include "log.h"
#include "privkey.h"
#include "testlib.h"
#include "token.h"

static test_token tt;

/* ------------------------------------------------------------ raw RSA */

static mpz_t n_mpz, e_mpz;
static size_t klen;

static void load_public(hsm_key *k)
{
        gnutls_pubkey_t pub;
        gnutls_datum_t m, e;
        if (hsm_pubkey_import(k, &pub) < 0 || gnutls_pubkey_export_rsa_raw2(pub, &m, &e, 0) < 0) {
                fprintf(stderr, "cannot read the RSA public key\n");
                exit(1);
        }
        mpz_inits(n_mpz, e_mpz, NULL);
        mpz_import(n_mpz, m.size, 1, 1, 1, 0, m.data);
        mpz_import(e_mpz, e.size, 1, 1, 1, 0, e.data);
        klen = (mpz_sizeinbase(n_mpz, 2) + 7) / 8;
        gnutls_free(m.data);
        gnutls_free(e.data);
        gnutls_pubkey_deinit(pub);
}

/* ct = em^e mod n, klen bytes. */
static void raw_encrypt(const uint8_t *em, uint8_t *ct)
{
        mpz_t m, c;
        size_t cnt = 0;
        mpz_inits(m, c, NULL);
        mpz_import(m, klen, 1, 1, 1, 0, em);
        mpz_powm(c, m, e_mpz, n_mpz);
        memset(ct, 0, klen);
        uint8_t tmp[1024];
        mpz_export(tmp, &cnt, 1, 1, 1, 0, c);
        memcpy(ct + klen - cnt, tmp, cnt);
        mpz_clears(m, c, NULL);
}

/* 00 02 PS 00 M, M of mlen bytes (PS non-zero random). */
static void pkcs1_block(uint8_t *em, const uint8_t *msg, size_t mlen)
{
        em[0] = 0;
        em[1] = 2;
        size_t ps = klen - 3 - mlen;
        gnutls_rnd(GNUTLS_RND_NONCE, em + 2, ps);
        for (size_t i = 2; i < 2 + ps; i++)
                if (em[i] == 0)
                        em[i] = 0x5a;
        em[2 + ps] = 0;
        memcpy(em + 3 + ps, msg, mlen);
}

/* ------------------------------------------------------------ the cases */

enum { C_GOOD, C_GOOD_GNUTLS, C_TYPE1, C_FIRST1, C_NO_SEP, C_SHORT_PS, C_PM47, C_PM49, C_EMPTY_MSG, C_ZERO, C_SHORT_CT,
       C_OVER_N, C__MAX };
static const char *const case_name[C__MAX] = {
        "good premaster", "good premaster (GnuTLS's own encryption)", "block type 1", "first byte 1",
        "no zero separator", "PS shorter than 8 bytes", "47-byte premaster", "49-byte premaster", "empty message",
        "all-zero ciphertext", "ciphertext one byte short", "ciphertext >= n",
};

struct ctcase {
        uint8_t ct[1024];
        size_t len;
        uint8_t pm[48]; /* the premaster of the good cases */
};

static void make_cases(hsm_key *k, struct ctcase *c)
{
        uint8_t em[1024], pm[49];
        gnutls_rnd(GNUTLS_RND_NONCE, pm, sizeof(pm));
        pm[0] = 3;
        pm[1] = 3;
        for (int i = 0; i < C__MAX; i++) {
                c[i].len = klen;
                memcpy(c[i].pm, pm, 48);
        }
        pkcs1_block(em, pm, 48);
        raw_encrypt(em, c[C_GOOD].ct);
        {
                gnutls_pubkey_t pub;
                gnutls_datum_t in = { pm, 48 }, out = { 0 };
                hsm_pubkey_import(k, &pub);
                if (gnutls_pubkey_encrypt_data(pub, 0, &in, &out) < 0 || out.size != klen)
                        exit(1);
                memcpy(c[C_GOOD_GNUTLS].ct, out.data, out.size);
                gnutls_free(out.data);
                gnutls_pubkey_deinit(pub);
        }
        pkcs1_block(em, pm, 48);
        em[1] = 1;
        raw_encrypt(em, c[C_TYPE1].ct);
        pkcs1_block(em, pm, 48);
        em[0] = 1;
        raw_encrypt(em, c[C_FIRST1].ct);
        pkcs1_block(em, pm, 48);
        em[klen - 49] = 0x17;
        raw_encrypt(em, c[C_NO_SEP].ct);
        pkcs1_block(em, pm, 48);
        em[6] = 0; /* a separator after 4 bytes of PS */
        raw_encrypt(em, c[C_SHORT_PS].ct);
        pkcs1_block(em, pm, 47);
        raw_encrypt(em, c[C_PM47].ct);
        pkcs1_block(em, pm, 49);
        raw_encrypt(em, c[C_PM49].ct);
        pkcs1_block(em, pm, 0);
        raw_encrypt(em, c[C_EMPTY_MSG].ct);
        memset(c[C_ZERO].ct, 0, klen);
        memcpy(c[C_SHORT_CT].ct, c[C_GOOD].ct + 1, klen - 1);
        c[C_SHORT_CT].len = klen - 1;
        memset(c[C_OVER_N].ct, 0xff, klen);
}

/* ------------------------------------------------------------ log capture */

static int log_fd = -1;

static void capture_log(const char *path)
{
        log_fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (log_fd < 0 || dup2(log_fd, STDERR_FILENO) < 0)
                exit(1);
        hsm_log_set_level(HSM_LOG_DEBUG);
}

static off_t log_size(void)
{
        struct stat st;
        return fstat(log_fd, &st) == 0 ? st.st_size : -1;
}

/* The log lines written since offset from, without their time stamp. */
static char *log_since(off_t from)
{
        off_t to = log_size();
        size_t n = (size_t)(to - from);
        char *buf = calloc(1, n + 1), *out = calloc(1, n + 1);
        if (pread(log_fd, buf, n, from) != (ssize_t)n)
                n = 0;
        buf[n] = 0;
        for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
                char *sp = strchr(line, ' ');
                strcat(out, sp ? sp + 1 : line);
                strcat(out, "\n");
        }
        free(buf);
        return out;
}

/* ------------------------------------------------------------ one pass */

static uint64_t count(hsm_key *k, enum hsm_mech m, enum hsm_result r)
{
        hsm_usage_entry e[32];
        int n = hsm_usage_snapshot(hsm_key_usage(k), e, 32);
        uint64_t c = 0;
        for (int i = 0; i < n; i++)
                if (e[i].op == HSM_OP_DECRYPT && e[i].mech == m && e[i].result == r)
                        c += e[i].count;
        return c;
}

static void run_cases(const char *what, hsm_token *t, hsm_key *k, enum hsm_mech mech)
{
        gnutls_privkey_t pk;
        struct ctcase c[C__MAX];
        gnutls_datum_t out[C__MAX][2] = { 0 };
        char *logs[C__MAX];
        int rets[C__MAX][2];

        CHECK(hsm_privkey_import(k, &pk) == 0, "%s: privkey", what);
        make_cases(k, c);
        for (int i = 0; i < C__MAX; i++)
                for (int j = 0; j < 2; j++) {
                        gnutls_datum_t ct = { c[i].ct, (unsigned)c[i].len };
                        uint64_t ok0 = count(k, mech, HSM_RESULT_OK);
                        off_t l0 = log_size();
                        rets[i][j] = gnutls_privkey_decrypt_data(pk, 0, &ct, &out[i][j]);
                        if (j == 0)
                                logs[i] = log_since(l0);
                        CHECK(count(k, mech, HSM_RESULT_OK) - ok0 == 1, "%s: %s: one %s decryption counted ok", what,
                              case_name[i], hsm_mech_name(mech));
                }
        CHECK(count(k, mech, HSM_RESULT_ERROR) == 0 && count(k, mech == HSM_MECH_RSA_PKCS ? HSM_MECH_RSA_X_509 : HSM_MECH_RSA_PKCS,
                                                            HSM_RESULT_OK) == 0,
              "%s: no decryption counted as an error or under another mechanism", what);

        for (int i = 0; i < C__MAX; i++) {
                CHECK(rets[i][0] == 0 && rets[i][1] == 0 && out[i][0].size == 48 && out[i][1].size == 48,
                      "%s: %s: 0 and 48 bytes (%d, %u)", what, case_name[i], rets[i][0], out[i][0].size);
                CHECK(strcmp(logs[i], logs[C_GOOD]) == 0, "%s: %s: the same log lines as a good one ('%s' / '%s')", what,
                      case_name[i], logs[i], logs[C_GOOD]);
                if (out[i][0].size != 48 || out[i][1].size != 48)
                        continue;
                int good = i == C_GOOD || i == C_GOOD_GNUTLS;
                int is_pm = memcmp(out[i][0].data, c[i].pm, 48) == 0;
                if (good)
                        CHECK(is_pm, "%s: %s: decrypts to the premaster", what, case_name[i]);
                else
                        CHECK(!is_pm, "%s: %s: not the premaster, a synthetic one", what, case_name[i]);
                CHECK(memcmp(out[i][0].data, out[i][1].data, 48) == 0, "%s: %s: the same 48 bytes the second time", what,
                      case_name[i]);
        }
        /* Synthetic premasters differ from one ciphertext to the next. */
        int distinct = 1;
        for (int i = C_TYPE1; i < C__MAX; i++)
                for (int j = i + 1; j < C__MAX; j++)
                        if (out[i][0].size == 48 && out[j][0].size == 48 && memcmp(out[i][0].data, out[j][0].data, 48) == 0)
                                distinct = 0;
        CHECK(distinct, "%s: every bad ciphertext has a synthetic premaster of its own", what);
        /* A 47- or 49-byte premaster is not passed on cut or padded. */
        CHECK(out[C_PM47][0].size == 48 && memcmp(out[C_PM47][0].data, c[C_PM47].pm, 47) != 0 &&
                      out[C_PM49][0].size == 48 && memcmp(out[C_PM49][0].data + 1, c[C_PM49].pm + 1, 47) != 0,
              "%s: wrong-length premasters are not passed on in part", what);
        /* Another key object for the same key has another secret: the
         * synthetic value is no function of the ciphertext alone. */
        uint8_t s1[48], s2[48];
        hsm_key_synthetic_premaster(k, c[C_TYPE1].ct, klen, s1);
        hsm_key *k2 = NULL;
        char *err = NULL;
        if (hsm_token_find_key(t, tt.key[TK_RSA2048], &k2, &err) == 0) {
                hsm_key_synthetic_premaster(k2, c[C_TYPE1].ct, klen, s2);
                CHECK(out[C_TYPE1][0].size == 48 && memcmp(s1, out[C_TYPE1][0].data, 48) == 0 && memcmp(s1, s2, 48) != 0,
                      "%s: the synthetic premaster is HMAC(secret of the key, ciphertext), the secret random per key", what);
                hsm_key_unref(k2);
        } else
                CHECK(0, "%s: second key object (%s)", what, err ? err : "");
        free(err);
        for (int i = 0; i < C__MAX; i++) {
                gnutls_free(out[i][0].data);
                gnutls_free(out[i][1].data);
                free(logs[i]);
        }
        gnutls_privkey_deinit(pk);
}

static int read_counter(const char *file, const char *name)
{
        FILE *f = fopen(file, "re");
        char line[2048] = "", key[64];
        if (!f)
                return -1;
        if (!fgets(line, sizeof(line), f))
                line[0] = 0;
        fclose(f);
        snprintf(key, sizeof(key), " %s=", name);
        memmove(line + 1, line, strlen(line) + 1);
        line[0] = ' ';
        const char *p = strstr(line, key);
        return p ? atoi(p + strlen(key)) : -1;
}

int main(void)
{
        gnutls_global_init();
        hsm_log_set_level(getenv("HSMTLS_DEBUG") ? HSM_LOG_DEBUG : HSM_LOG_WARNING);
        test_token_make(&tt, false);
        char *pin = NULL, *logfile = NULL, *counts = NULL;
        if (asprintf(&pin, "file:%s", tt.pin_file) < 0 || asprintf(&logfile, "%s/log", tt.dir) < 0 ||
            asprintf(&counts, "%s/calls", tt.dir) < 0)
                return 1;
        int saved_stderr = dup(STDERR_FILENO);
        capture_log(logfile);
        char *err = NULL;

        /* SoftHSM itself: CKM_RSA_X_509 is offered. */
        {
                hsm_token_config cfg = { .name = "soft", .uri = tt.token_uri, .module = tt.module, .pin_source = pin };
                hsm_token *t = NULL;
                hsm_key *k = NULL;
                if (hsm_token_open(&cfg, &t, &err) < 0 || hsm_token_find_key(t, tt.key[TK_RSA2048], &k, &err) < 0) {
                        dprintf(saved_stderr, "%s\n", err ? err : "cannot open the token");
                        return 1;
                }
                load_public(k);
                CHECK(hsm_key_can_decrypt(k) && hsm_key_can_decrypt_raw(k), "SoftHSM: the key may decrypt with CKM_RSA_X_509");
                run_cases("raw", t, k, HSM_MECH_RSA_X_509);
                hsm_key_unref(k);

                /* A key whose CKA_ALLOWED_MECHANISMS leaves out CKM_RSA_X_509
                 * decrypts with CKM_RSA_PKCS (the token would refuse raw). */
                char *cmd = NULL, *uri = NULL;
                if (asprintf(&cmd, "pkcs11-tool --module '%s' --login --pin \"$(cat '%s')\" --keypairgen --key-type rsa:2048 "
                                   "--label restricted --id 77 --allowed-mechanisms RSA-PKCS,SHA256-RSA-PKCS --usage-decrypt "
                                   "--usage-sign >/dev/null 2>&1", tt.module, tt.pin_file) < 0 ||
                    asprintf(&uri, "%s;object=restricted;type=private", tt.token_uri) < 0)
                        return 1;
                if (system(cmd) != 0) {
                        CHECK(0, "pkcs11-tool makes a key with CKA_ALLOWED_MECHANISMS = CKM_RSA_PKCS");
                } else if (hsm_token_find_key(t, uri, &k, &err) < 0) {
                        CHECK(0, "restricted key found (%s)", err ? err : "");
                } else {
                        CHECK(hsm_key_can_decrypt(k) && !hsm_key_can_decrypt_raw(k),
                              "CKA_ALLOWED_MECHANISMS without CKM_RSA_X_509: no raw decryption");
                        gnutls_privkey_t pk;
                        gnutls_pubkey_t pub;
                        uint8_t pm[48] = { 3, 3, 42 };
                        gnutls_datum_t in = { pm, 48 }, ct = { 0 }, out = { 0 };
                        hsm_privkey_import(k, &pk);
                        hsm_pubkey_import(k, &pub);
                        gnutls_pubkey_encrypt_data(pub, 0, &in, &ct);
                        int r = gnutls_privkey_decrypt_data(pk, 0, &ct, &out);
                        CHECK(r == 0 && out.size == 48 && memcmp(out.data, pm, 48) == 0 &&
                                      count(k, HSM_MECH_RSA_PKCS, HSM_RESULT_OK) == 1 && count(k, HSM_MECH_RSA_X_509, HSM_RESULT_ERROR) == 0,
                              "it decrypts a premaster with CKM_RSA_PKCS (%d, %u bytes)", r, out.size);
                        gnutls_free(out.data);
                        gnutls_free(ct.data);
                        gnutls_pubkey_deinit(pub);
                        gnutls_privkey_deinit(pk);
                        hsm_key_unref(k);
                }
                free(cmd);
                free(uri);

                /* A 1024-bit key is refused (the decryption code needs 64
                 * bytes and more, and no such key is served), as a key that
                 * cannot be used: the token stays ready. */
                if (asprintf(&cmd, "pkcs11-tool --module '%s' --login --pin \"$(cat '%s')\" --keypairgen --key-type rsa:1024 "
                                   "--label small --id 78 --usage-decrypt --usage-sign >/dev/null 2>&1", tt.module, tt.pin_file) < 0 ||
                    asprintf(&uri, "%s;object=small;type=private", tt.token_uri) < 0)
                        return 1;
                free(err);
                err = NULL;
                if (system(cmd) != 0) {
                        CHECK(0, "pkcs11-tool makes a 1024-bit RSA key");
                } else {
                        k = NULL;
                        int r = hsm_token_find_key(t, uri, &k, &err);
                        CHECK(r == -EOPNOTSUPP && !k && err && strstr(err, "1024 bits"), "a 1024-bit RSA key is refused (%d: %s)", r,
                              err ? err : "");
                        char *why = NULL;
                        enum hsm_token_state ts = hsm_token_state(t, &why);
                        CHECK(ts == HSM_TOKEN_READY, "the token stays ready after refusing a key it cannot use (%s: %s)",
                              hsm_token_state_name(ts), why ? why : "");
                        free(why);
                        hsm_key_unref(k);
                }
                free(err);
                err = NULL;
                free(cmd);
                free(uri);
                hsm_token_unref(t);
        }

        /* CKM_RSA_X_509 hidden, a bad padding reported as a lost session. */
        const char *slow = getenv("SLOWTOKEN");
        if (slow && *slow) {
                setenv("HSMTLS_SLOWTOKEN_MODULE", tt.module, 1);
                setenv("HSMTLS_SLOWTOKEN_HIDE_MECHS", "0x3", 1);          /* CKM_RSA_X_509 */
                setenv("HSMTLS_SLOWTOKEN_DECRYPT_FAIL_RV", "0xb3", 1);    /* CKR_SESSION_HANDLE_INVALID */
                setenv("HSMTLS_SLOWTOKEN_COUNT_FILE", counts, 1);
                hsm_token_config cfg = { .name = "pkcs", .uri = tt.token_uri, .module = slow, .pin_source = pin };
                hsm_token *t = NULL;
                hsm_key *k = NULL;
                if (hsm_token_open(&cfg, &t, &err) < 0 || hsm_token_find_key(t, tt.key[TK_RSA2048], &k, &err) < 0) {
                        dprintf(saved_stderr, "%s\n", err ? err : "cannot open the token through the fault module");
                        return 1;
                }
                CHECK(hsm_key_can_decrypt(k) && !hsm_key_can_decrypt_raw(k),
                      "without CKM_RSA_X_509 the key decrypts with CKM_RSA_PKCS");
                hsm_token_stats st0, st1;
                hsm_token_get_stats(t, &st0);
                run_cases("pkcs", t, k, HSM_MECH_RSA_PKCS);
                hsm_token_get_stats(t, &st1);
                CHECK(st1.sessions_reopened == st0.sessions_reopened && st1.logins == st0.logins &&
                              st1.handles_refreshed == st0.handles_refreshed,
                      "pkcs: a bad padding answered CKR_SESSION_HANDLE_INVALID reopens nothing (reopened %llu, logins %llu)",
                      (unsigned long long)(st1.sessions_reopened - st0.sessions_reopened),
                      (unsigned long long)(st1.logins - st0.logins));
                hsm_key_unref(k);
                hsm_token_unref(t);
                /* 2 x C__MAX decryptions, each one C_DecryptInit and one
                 * C_Decrypt: no retry. */
                int d = read_counter(counts, "C_Decrypt"), di = read_counter(counts, "C_DecryptInit");
                CHECK(d == 2 * C__MAX && di == 2 * C__MAX, "pkcs: one C_Decrypt per decryption, none retried (%d, %d; want %d)",
                      d, di, 2 * C__MAX);
                unsetenv("HSMTLS_SLOWTOKEN_HIDE_MECHS");
                unsetenv("HSMTLS_SLOWTOKEN_DECRYPT_FAIL_RV");
                unsetenv("HSMTLS_SLOWTOKEN_COUNT_FILE");
        } else
                printf("# SLOWTOKEN not set: the CKM_RSA_PKCS pass is skipped\n");

        dup2(saved_stderr, STDERR_FILENO);
        mpz_clears(n_mpz, e_mpz, NULL);
        free(pin);
        free(logfile);
        free(counts);
        test_token_cleanup(&tt);
        gnutls_global_deinit();
        return test_done();
}
