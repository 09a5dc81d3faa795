/* In-process GnuTLS handshakes over memory against keys on a fresh SoftHSM
 * token: every key type with TLS 1.2 and 1.3, RSA key exchange, counters
 * that move by exactly one operation per handshake, and a bad RSA
 * ClientKeyExchange that ends exactly like a bad Finished. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/abstract.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include "log.h"
#include "privkey.h"
#include "testlib.h"
#include "token.h"

static test_token tt;

struct pipe_buf {
        unsigned char data[256 * 1024];
        size_t len;
};

struct endpoint {
        gnutls_session_t s;
        struct pipe_buf *in, *out;
        int tamper; /* 0 none, 1 corrupt the ClientKeyExchange, 2 corrupt the first encrypted handshake record */
        int seen_ccs;
};

static ssize_t mem_push(gnutls_transport_ptr_t p, const void *data, size_t len)
{
        struct endpoint *e = p;
        if (e->out->len + len > sizeof(e->out->data)) {
                gnutls_transport_set_errno(e->s, EAGAIN);
                return -1;
        }
        unsigned char *dst = e->out->data + e->out->len;
        memcpy(dst, data, len);
        /* Records are written whole; tamper with the one we want. */
        if (e->tamper && len >= 6) {
                if (dst[0] == 20)
                        e->seen_ccs = 1;
                if (e->tamper == 1 && dst[0] == 22 && dst[5] == 16 && len > 40) {
                        dst[30] ^= 0x5a; /* inside the encrypted premaster */
                        e->tamper = 0;
                } else if (e->tamper == 2 && e->seen_ccs && dst[0] == 22 && len > 20) {
                        dst[len - 3] ^= 0x5a; /* inside the encrypted Finished */
                        e->tamper = 0;
                }
        }
        e->out->len += len;
        return (ssize_t)len;
}

static ssize_t mem_pull(gnutls_transport_ptr_t p, void *data, size_t len)
{
        struct endpoint *e = p;
        if (e->in->len == 0) {
                gnutls_transport_set_errno(e->s, EAGAIN);
                return -1;
        }
        if (len > e->in->len)
                len = e->in->len;
        memcpy(data, e->in->data, len);
        memmove(e->in->data, e->in->data + len, e->in->len - len);
        e->in->len -= len;
        return (ssize_t)len;
}

struct result {
        int client, server;
        int server_alert_sent; /* the alert description the server put on the wire, or -1 */
        size_t server_alert_len; /* bytes written with it */
        gnutls_protocol_t version;
        gnutls_sign_algorithm_t sign;
        gnutls_kx_algorithm_t kx;
        int data_ok;
};

static int last_alert_on_wire(struct pipe_buf *b)
{
        /* One plaintext fatal alert record: 21 3 x 0 2 2 desc (TLS 1.2: the
         * server fails before its own ChangeCipherSpec). */
        if (b->len == 7 && b->data[0] == 21 && b->data[1] == 3 && b->data[3] == 0 && b->data[4] == 2 && b->data[5] == 2)
                return b->data[6];
        return -1;
}

static const char *const host_of[TK__MAX] = { "www.hsmtls.test", "www.hsmtls.test", "api.hsmtls.test", "ed.hsmtls.test" };

static struct result handshake_host(gnutls_certificate_credentials_t scred, const char *sprio, const char *cprio, int tamper,
                                    const char *host)
{
        static struct pipe_buf c2s, s2c;
        struct endpoint ce = { .in = &s2c, .out = &c2s, .tamper = tamper }, se = { .in = &c2s, .out = &s2c };
        gnutls_certificate_credentials_t ccred;
        struct result res = { .client = GNUTLS_E_AGAIN, .server = GNUTLS_E_AGAIN, .server_alert_sent = -1 };
        c2s.len = s2c.len = 0;

        gnutls_certificate_allocate_credentials(&ccred);
        gnutls_certificate_set_x509_trust_file(ccred, tt.ca, GNUTLS_X509_FMT_PEM);
        gnutls_init(&se.s, GNUTLS_SERVER | GNUTLS_NONBLOCK);
        gnutls_init(&ce.s, GNUTLS_CLIENT | GNUTLS_NONBLOCK | GNUTLS_NO_TICKETS);
        gnutls_priority_set_direct(se.s, sprio, NULL);
        gnutls_priority_set_direct(ce.s, cprio, NULL);
        gnutls_credentials_set(se.s, GNUTLS_CRD_CERTIFICATE, scred);
        gnutls_credentials_set(ce.s, GNUTLS_CRD_CERTIFICATE, ccred);
        gnutls_session_set_verify_cert(ce.s, host, 0);
        gnutls_server_name_set(ce.s, GNUTLS_NAME_DNS, host, strlen(host));
        struct endpoint *eps[2] = { &ce, &se };
        for (int i = 0; i < 2; i++) {
                gnutls_transport_set_ptr(eps[i]->s, eps[i]);
                gnutls_transport_set_push_function(eps[i]->s, mem_push);
                gnutls_transport_set_pull_function(eps[i]->s, mem_pull);
        }
        for (int round = 0; round < 100; round++) {
                if (res.client == GNUTLS_E_AGAIN)
                        res.client = gnutls_handshake(ce.s);
                if (res.server == GNUTLS_E_AGAIN) {
                        res.server = gnutls_handshake(se.s);
                        if (res.server < 0 && res.server != GNUTLS_E_AGAIN) {
                                /* GnuTLS sends no alert by itself: send the one
                                 * hsmtlsd sends after a failed handshake
                                 * (handshake.c) and capture exactly those bytes. */
                                static struct pipe_buf tail;
                                size_t before = s2c.len;
                                gnutls_alert_send_appropriate(se.s, res.server);
                                tail.len = s2c.len - before;
                                memcpy(tail.data, s2c.data + before, tail.len);
                                res.server_alert_sent = last_alert_on_wire(&tail);
                                res.server_alert_len = tail.len;
                        }
                }
                if ((res.client != GNUTLS_E_AGAIN || res.server < 0) && res.server != GNUTLS_E_AGAIN)
                        break;
        }
        if (res.client == 0 && res.server == 0) {
                res.version = gnutls_protocol_get_version(se.s);
                res.sign = gnutls_sign_algorithm_get(se.s);
                res.kx = gnutls_kx_get(se.s);
                char buf[64] = "";
                ssize_t w = gnutls_record_send(ce.s, "ping through the tunnel", 23);
                ssize_t n = gnutls_record_recv(se.s, buf, sizeof(buf));
                res.data_ok = w == 23 && n == 23 && memcmp(buf, "ping through the tunnel", 23) == 0;
        }
        gnutls_deinit(ce.s);
        gnutls_deinit(se.s);
        gnutls_certificate_free_credentials(ccred);
        return res;
}

static struct result handshake(gnutls_certificate_credentials_t scred, const char *sprio, const char *cprio, int tamper)
{
        return handshake_host(scred, sprio, cprio, tamper, host_of[TK_RSA2048]);
}

static gnutls_certificate_credentials_t server_creds(hsm_key *k, const char *chain)
{
        gnutls_certificate_credentials_t cred;
        gnutls_privkey_t pk;
        gnutls_pcert_st *pcerts = calloc(4, sizeof(*pcerts));
        unsigned n = 4;
        gnutls_certificate_allocate_credentials(&cred);
        if (hsm_privkey_import(k, &pk) < 0 ||
            gnutls_pcert_list_import_x509_file(pcerts, &n, chain, GNUTLS_X509_FMT_PEM, NULL, NULL, 0) < 0 ||
            gnutls_certificate_set_key(cred, NULL, 0, pcerts, (int)n, pk) < 0) {
                fprintf(stderr, "cannot build server credentials for %s\n", chain);
                exit(1);
        }
        free(pcerts);
        return cred;
}

static uint64_t count(hsm_key *k, enum hsm_op op, enum hsm_mech m)
{
        hsm_usage_entry e[16];
        int n = hsm_usage_snapshot(hsm_key_usage(k), e, 16);
        uint64_t c = 0;
        for (int i = 0; i < n; i++)
                if (e[i].op == op && e[i].mech == m && e[i].result == HSM_RESULT_OK)
                        c += e[i].count;
        return c;
}

#define PRIO_SERVER "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"

int main(void)
{
        gnutls_global_init();
        hsm_log_set_level(getenv("HSMTLS_DEBUG") ? HSM_LOG_DEBUG : HSM_LOG_WARNING);
        test_token_make(&tt, false);
        char *pin = NULL;
        if (asprintf(&pin, "file:%s", tt.pin_file) < 0)
                return 1;
        hsm_token_config cfg = { .name = "test", .uri = tt.token_uri, .module = tt.module, .pin_source = pin };
        hsm_token *t = NULL;
        char *err = NULL;
        if (hsm_token_open(&cfg, &t, &err) < 0) {
                fprintf(stderr, "%s\n", err);
                return 1;
        }
        hsm_key *keys[TK__MAX];
        gnutls_certificate_credentials_t creds[TK__MAX];
        for (int i = 0; i < TK__MAX; i++) {
                if (hsm_token_find_key(t, tt.key[i], &keys[i], &err) < 0) {
                        fprintf(stderr, "%s\n", err);
                        return 1;
                }
                creds[i] = server_creds(keys[i], tt.cert[i]);
        }

        static const struct {
                int key;
                const char *version;
                const char *cprio;
                gnutls_protocol_t want_version;
                gnutls_sign_algorithm_t want_sign;
                enum hsm_mech mech;
        } cases[] = {
                { TK_RSA2048, "1.3", "NORMAL:-VERS-ALL:+VERS-TLS1.3", GNUTLS_TLS1_3, GNUTLS_SIGN_RSA_PSS_RSAE_SHA256, HSM_MECH_RSA_PKCS_PSS },
                { TK_RSA2048, "1.2", "NORMAL:-VERS-ALL:+VERS-TLS1.2:-SIGN-ALL:+SIGN-RSA-SHA256", GNUTLS_TLS1_2, GNUTLS_SIGN_RSA_SHA256, HSM_MECH_RSA_PKCS },
                { TK_RSA2048, "1.2", "NORMAL:-VERS-ALL:+VERS-TLS1.2:-SIGN-ALL:+SIGN-RSA-PSS-RSAE-SHA384", GNUTLS_TLS1_2, GNUTLS_SIGN_RSA_PSS_RSAE_SHA384, HSM_MECH_RSA_PKCS_PSS },
                { TK_P256, "1.3", "NORMAL:-VERS-ALL:+VERS-TLS1.3", GNUTLS_TLS1_3, GNUTLS_SIGN_ECDSA_SECP256R1_SHA256, HSM_MECH_ECDSA },
                { TK_P256, "1.2", "NORMAL:-VERS-ALL:+VERS-TLS1.2", GNUTLS_TLS1_2, GNUTLS_SIGN_ECDSA_SHA256, HSM_MECH_ECDSA },
                { TK_P384, "1.3", "NORMAL:-VERS-ALL:+VERS-TLS1.3", GNUTLS_TLS1_3, GNUTLS_SIGN_ECDSA_SECP384R1_SHA384, HSM_MECH_ECDSA },
                { TK_P384, "1.2", "NORMAL:-VERS-ALL:+VERS-TLS1.2", GNUTLS_TLS1_2, GNUTLS_SIGN_ECDSA_SHA256, HSM_MECH_ECDSA },
                { TK_ED25519, "1.3", "NORMAL:-VERS-ALL:+VERS-TLS1.3", GNUTLS_TLS1_3, GNUTLS_SIGN_EDDSA_ED25519, HSM_MECH_EDDSA },
                { TK_ED25519, "1.2", "NORMAL:-VERS-ALL:+VERS-TLS1.2", GNUTLS_TLS1_2, GNUTLS_SIGN_EDDSA_ED25519, HSM_MECH_EDDSA },
        };
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                hsm_key *k = keys[cases[i].key];
                uint64_t before = count(k, HSM_OP_SIGN, cases[i].mech);
                uint64_t all_before = hsm_usage_total(hsm_key_usage(k), HSM_OP_SIGN, -1);
                struct result r = handshake_host(creds[cases[i].key], PRIO_SERVER, cases[i].cprio, 0, host_of[cases[i].key]);
                uint64_t after = count(k, HSM_OP_SIGN, cases[i].mech);
                uint64_t all_after = hsm_usage_total(hsm_key_usage(k), HSM_OP_SIGN, -1);
                CHECK(r.client == 0 && r.server == 0 && r.data_ok, "%s TLS %s handshake with the token key (client %s, server %s)",
                      test_key_names[cases[i].key], cases[i].version, gnutls_strerror(r.client), gnutls_strerror(r.server));
                CHECK(r.version == cases[i].want_version && r.sign == cases[i].want_sign, "%s TLS %s: version %s, signature %s",
                      test_key_names[cases[i].key], cases[i].version, gnutls_protocol_get_name(r.version),
                      gnutls_sign_get_name(r.sign));
                CHECK(after - before == 1 && all_after - all_before == 1, "%s TLS %s: exactly one %s signature on the token",
                      test_key_names[cases[i].key], cases[i].version, hsm_mech_name(cases[i].mech));
        }

        /* TLS 1.2 RSA key exchange with the premaster decrypted on the token.
         * (That it is refused unless rsa_key_exchange enables it is the
         * daemon's setting: tests/e2e/rsa-kx.sh, listener nokx.) */
        const char *rsa_client = "NORMAL:-VERS-ALL:+VERS-TLS1.2:-KX-ALL:+RSA";
        {
                hsm_key *k = keys[TK_RSA2048];
                uint64_t d0 = count(k, HSM_OP_DECRYPT, HSM_MECH_RSA_X_509), s0 = hsm_usage_total(hsm_key_usage(k), HSM_OP_SIGN, -1);
                struct result r = handshake(creds[TK_RSA2048], PRIO_SERVER ":+RSA", rsa_client, 0);
                CHECK(r.client == 0 && r.server == 0 && r.data_ok && r.kx == GNUTLS_KX_RSA,
                      "TLS 1.2 RSA key exchange with the premaster decrypted on the token (%s)", gnutls_strerror(r.server));
                uint64_t d1 = count(k, HSM_OP_DECRYPT, HSM_MECH_RSA_X_509), s1 = hsm_usage_total(hsm_key_usage(k), HSM_OP_SIGN, -1);
                CHECK(d1 - d0 == 1 && s1 == s0, "exactly one raw CKM_RSA_X_509 decryption (SoftHSM offers it) and no signature");

                /* A bad ClientKeyExchange must end exactly like a bad Finished. */
                struct result bad_cke = handshake(creds[TK_RSA2048], PRIO_SERVER ":+RSA", rsa_client, 1);
                struct result bad_fin = handshake(creds[TK_RSA2048], PRIO_SERVER ":+RSA", rsa_client, 2);
                CHECK(bad_cke.server < 0 && bad_fin.server < 0, "both tampered handshakes fail (%s / %s)",
                      gnutls_strerror(bad_cke.server), gnutls_strerror(bad_fin.server));
                CHECK(bad_cke.server == bad_fin.server, "same server error for a bad ClientKeyExchange and a bad Finished (%d, %d)",
                      bad_cke.server, bad_fin.server);
                CHECK(bad_fin.server_alert_sent >= 0 && bad_cke.server_alert_sent == bad_fin.server_alert_sent,
                      "same fatal alert on the wire for both (%d, %d; %zu and %zu bytes)", bad_cke.server_alert_sent,
                      bad_fin.server_alert_sent, bad_cke.server_alert_len, bad_fin.server_alert_len);
                uint64_t d2 = count(k, HSM_OP_DECRYPT, HSM_MECH_RSA_X_509);
                CHECK(d2 - d1 == 2 && hsm_usage_total(hsm_key_usage(k), HSM_OP_DECRYPT, HSM_RESULT_ERROR) == 0,
                      "both decryptions counted as answered; no padding oracle in the counters");
        }

        /* RSA and ECDSA chains in one set of credentials: the client's
         * signature algorithms choose. */
        {
                gnutls_certificate_credentials_t both;
                gnutls_certificate_allocate_credentials(&both);
                int idx[2] = { TK_RSA2048, TK_P256 };
                for (int i = 0; i < 2; i++) {
                        gnutls_privkey_t pk;
                        gnutls_pcert_st pc[4];
                        unsigned n = 4;
                        hsm_privkey_import(keys[idx[i]], &pk);
                        gnutls_pcert_list_import_x509_file(pc, &n, tt.cert[idx[i]], GNUTLS_X509_FMT_PEM, NULL, NULL, 0);
                        gnutls_certificate_set_key(both, NULL, 0, pc, (int)n, pk);
                }
                struct result r1 = handshake(both, PRIO_SERVER, "NORMAL:-VERS-ALL:+VERS-TLS1.3:-SIGN-ALL:+SIGN-RSA-PSS-RSAE-SHA256", 0);
                struct result r2 = handshake(both, PRIO_SERVER, "NORMAL:-VERS-ALL:+VERS-TLS1.3:-SIGN-ALL:+SIGN-ECDSA-SECP256R1-SHA256", 0);
                CHECK(r1.server == 0 && r1.sign == GNUTLS_SIGN_RSA_PSS_RSAE_SHA256, "RSA-only client gets the RSA chain");
                CHECK(r2.server == 0 && r2.sign == GNUTLS_SIGN_ECDSA_SECP256R1_SHA256, "ECDSA-only client gets the ECDSA chain");
                gnutls_certificate_free_credentials(both);
        }

        for (int i = 0; i < TK__MAX; i++)
                gnutls_certificate_free_credentials(creds[i]);
        for (int i = 0; i < TK__MAX; i++)
                hsm_key_unref(keys[i]);
        hsm_token_unref(t);

        /* A token without CKM_RSA_PKCS_PSS (the fault module hides it): GnuTLS
         * is not offered RSA-PSS, so TLS 1.3 cannot use the RSA key at all
         * and TLS 1.2 falls back to PKCS#1 v1.5. */
        const char *slow = getenv("SLOWTOKEN");
        if (slow && *slow) {
                setenv("HSMTLS_SLOWTOKEN_MODULE", tt.module, 1);
                setenv("HSMTLS_SLOWTOKEN_HIDE_MECHS", "0xd", 1); /* CKM_RSA_PKCS_PSS */
                hsm_token_config nc = { .name = "nopss", .uri = tt.token_uri, .module = slow, .pin_source = pin };
                hsm_token *nt = NULL;
                hsm_key *rsa = NULL, *ec = NULL;
                if (hsm_token_open(&nc, &nt, &err) < 0 || hsm_token_find_key(nt, tt.key[TK_RSA2048], &rsa, &err) < 0 ||
                    hsm_token_find_key(nt, tt.key[TK_P256], &ec, &err) < 0) {
                        fprintf(stderr, "%s\n", err ? err : "cannot open the token through the fault module");
                        return 1;
                }
                CHECK(!hsm_key_supports(rsa, HSM_MECH_RSA_PKCS_PSS) && hsm_key_supports(rsa, HSM_MECH_RSA_PKCS),
                      "without CKM_RSA_PKCS_PSS in the mechanism list the key does not offer RSA-PSS");
                gnutls_certificate_credentials_t nopss = server_creds(rsa, tt.cert[TK_RSA2048]);
                /* Refused in the negotiation (no certificate can sign for a
                 * TLS 1.3 client), not by a failed signature: offering RSA-PSS
                 * anyway ends in GNUTLS_E_UNSUPPORTED_SIGNATURE_ALGORITHM. */
                /* (gnutls_certificate_set_key() made one signature already: it
                 * checks that key and certificate match.) */
                uint64_t n0 = hsm_usage_total(hsm_key_usage(rsa), HSM_OP_SIGN, -1);
                uint64_t p0 = count(rsa, HSM_OP_SIGN, HSM_MECH_RSA_PKCS);
                struct result r13 = handshake(nopss, PRIO_SERVER, "NORMAL:-VERS-ALL:+VERS-TLS1.3", 0);
                CHECK(r13.server == GNUTLS_E_NO_CIPHER_SUITES, "TLS 1.3 is refused in the negotiation: no RSA-PSS on this token (%s)",
                      gnutls_strerror(r13.server));
                struct result r12 = handshake(nopss, PRIO_SERVER, "NORMAL:-VERS-ALL:+VERS-TLS1.2", 0);
                CHECK(r12.server == 0 && r12.sign == GNUTLS_SIGN_RSA_SHA256 && r12.data_ok,
                      "TLS 1.2 signs with PKCS#1 v1.5 instead (%s)", gnutls_sign_get_name(r12.sign));
                uint64_t n1 = hsm_usage_total(hsm_key_usage(rsa), HSM_OP_SIGN, -1);
                CHECK(hsm_usage_total(hsm_key_usage(rsa), HSM_OP_SIGN, HSM_RESULT_ERROR) == 0 &&
                      count(rsa, HSM_OP_SIGN, HSM_MECH_RSA_PKCS_PSS) == 0 && n1 - n0 == 1 &&
                      count(rsa, HSM_OP_SIGN, HSM_MECH_RSA_PKCS) - p0 == 1,
                      "no signature was attempted with the missing mechanism (TLS 1.3 none, TLS 1.2 one PKCS#1 v1.5)");
                /* The RSA chain first, an ECDSA chain next to it: a TLS 1.3
                 * client gets the ECDSA one, since the RSA key cannot sign. */
                gnutls_certificate_credentials_t mixed;
                gnutls_certificate_allocate_credentials(&mixed);
                hsm_key *both[2] = { rsa, ec };
                const char *chains[2] = { tt.cert[TK_RSA2048], tt.cert[TK_P256] };
                for (int i = 0; i < 2; i++) {
                        gnutls_privkey_t pk;
                        gnutls_pcert_st pc[4];
                        unsigned n = 4;
                        hsm_privkey_import(both[i], &pk);
                        gnutls_pcert_list_import_x509_file(pc, &n, chains[i], GNUTLS_X509_FMT_PEM, NULL, NULL, 0);
                        gnutls_certificate_set_key(mixed, NULL, 0, pc, (int)n, pk);
                }
                uint64_t n2 = hsm_usage_total(hsm_key_usage(rsa), HSM_OP_SIGN, -1);
                struct result rm = handshake_host(mixed, PRIO_SERVER, "NORMAL:-VERS-ALL:+VERS-TLS1.3", 0, host_of[TK_P256]);
                CHECK(rm.client == 0 && rm.server == 0 && rm.data_ok && rm.sign == GNUTLS_SIGN_ECDSA_SECP256R1_SHA256,
                      "TLS 1.3 with an ECDSA chain configured too: ECDSA signs (%s, %s)", gnutls_strerror(rm.server),
                      gnutls_sign_get_name(rm.sign));
                CHECK(hsm_usage_total(hsm_key_usage(rsa), HSM_OP_SIGN, -1) == n2, "and the RSA key made no signature for it");
                gnutls_certificate_free_credentials(mixed);
                gnutls_certificate_free_credentials(nopss);
                hsm_key_unref(ec);
                hsm_key_unref(rsa);
                hsm_token_unref(nt);
                unsetenv("HSMTLS_SLOWTOKEN_HIDE_MECHS");
        }
        free(pin);
        test_token_cleanup(&tt);
        gnutls_global_deinit();
        return test_done();
}
