#include "privkey.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <gnutls/crypto.h>
#include <gnutls/x509.h>

#include "log.h"

static int sig_hash(gnutls_sign_algorithm_t algo, enum hsm_hash *ret)
{
        switch (gnutls_sign_get_hash_algorithm(algo)) {
        case GNUTLS_DIG_SHA256: *ret = HSM_HASH_SHA256; return 0;
        case GNUTLS_DIG_SHA384: *ret = HSM_HASH_SHA384; return 0;
        case GNUTLS_DIG_SHA512: *ret = HSM_HASH_SHA512; return 0;
        default: return -EOPNOTSUPP;
        }
}

static gnutls_ecc_curve_t gnutls_curve(enum hsm_curve c)
{
        switch (c) {
        case HSM_CURVE_P256: return GNUTLS_ECC_CURVE_SECP256R1;
        case HSM_CURVE_P384: return GNUTLS_ECC_CURVE_SECP384R1;
        case HSM_CURVE_P521: return GNUTLS_ECC_CURVE_SECP521R1;
        case HSM_CURVE_ED25519: return GNUTLS_ECC_CURVE_ED25519;
        default: return GNUTLS_ECC_CURVE_INVALID;
        }
}

/* Which mechanism a GnuTLS signature algorithm needs from this key, or -1. */
static int mech_for(hsm_key *k, gnutls_sign_algorithm_t algo)
{
        enum hsm_hash h;
        gnutls_pk_algorithm_t pk = gnutls_sign_get_pk_algorithm(algo);

        switch (hsm_key_type(k)) {
        case HSM_KEY_RSA:
                if (algo == GNUTLS_SIGN_RSA_RAW)
                        return HSM_MECH_RSA_PKCS;
                if (sig_hash(algo, &h) < 0)
                        return -1;
                if (pk == GNUTLS_PK_RSA)
                        return HSM_MECH_RSA_PKCS;
                /* RSA-PSS with an rsaEncryption key (rsa_pss_rsae_*). */
                if (pk == GNUTLS_PK_RSA_PSS && gnutls_sign_supports_pk_algorithm(algo, GNUTLS_PK_RSA))
                        return HSM_MECH_RSA_PKCS_PSS;
                return -1;
        case HSM_KEY_ECDSA:
                if (pk != GNUTLS_PK_ECDSA || sig_hash(algo, &h) < 0)
                        return -1;
                return HSM_MECH_ECDSA;
        case HSM_KEY_ED25519:
                return algo == GNUTLS_SIGN_EDDSA_ED25519 ? HSM_MECH_EDDSA : -1;
        }
        return -1;
}

static int sign_common(hsm_key *k, gnutls_sign_algorithm_t algo, unsigned flags, const gnutls_datum_t *in,
                       gnutls_datum_t *sig)
{
        int m = mech_for(k, algo);
        enum hsm_hash h = HSM_HASH_NONE;

        if (hsm_key_type(k) == HSM_KEY_RSA && (flags & GNUTLS_PRIVKEY_SIGN_FLAG_RSA_PSS))
                m = HSM_MECH_RSA_PKCS_PSS;
        if (m < 0 || !hsm_key_supports(k, m)) {
                hsm_debug("key '%s': signature algorithm %s not supported", hsm_key_label(k), gnutls_sign_get_name(algo));
                return GNUTLS_E_UNSUPPORTED_SIGNATURE_ALGORITHM;
        }
        if (m == HSM_MECH_RSA_PKCS_PSS && sig_hash(algo, &h) < 0)
                return GNUTLS_E_UNSUPPORTED_SIGNATURE_ALGORITHM;

        size_t len = hsm_key_signature_size(k);
        /* An ECDSA r || s is re-encoded below: it needs no heap buffer. */
        uint8_t stack[2 * 66], *raw = m == HSM_MECH_ECDSA && len <= sizeof(stack) ? stack : gnutls_malloc(len);
        if (!raw)
                return GNUTLS_E_MEMORY_ERROR;
        int r = hsm_key_sign(k, m, h, in->data, in->size, raw, &len);
        if (r < 0) {
                if (raw != stack)
                        gnutls_free(raw);
                hsm_debug("key '%s': %s signature on the token failed: %s", hsm_key_label(k), hsm_mech_name(m),
                          strerror(-r));
                return GNUTLS_E_PK_SIGN_FAILED;
        }
        if (m == HSM_MECH_ECDSA) {
                /* PKCS#11 gives r || s; TLS wants the DER SEQUENCE. */
                gnutls_datum_t rr = { raw, (unsigned)(len / 2) }, ss = { raw + len / 2, (unsigned)(len / 2) };
                r = gnutls_encode_rs_value(sig, &rr, &ss);
                if (raw != stack)
                        gnutls_free(raw);
                return r;
        }
        sig->data = raw;
        sig->size = (unsigned)len;
        return 0;
}

static int cb_sign_hash(gnutls_privkey_t pkey, gnutls_sign_algorithm_t algo, void *userdata, unsigned flags,
                        const gnutls_datum_t *hash, gnutls_datum_t *sig)
{
        return sign_common(userdata, algo, flags, hash, sig);
}

static int cb_sign_data(gnutls_privkey_t pkey, gnutls_sign_algorithm_t algo, void *userdata, unsigned flags,
                        const gnutls_datum_t *data, gnutls_datum_t *sig)
{
        hsm_key *k = userdata;
        if (hsm_key_type(k) != HSM_KEY_ED25519)
                return GNUTLS_E_INVALID_REQUEST;
        return sign_common(k, algo, flags, data, sig);
}

/* TLS 1.2 RSA key exchange: the 48-byte premaster, decrypted on the token.
 *
 * GnuTLS (3.7, gnutls_privkey_decrypt_data2() over an ext4 key) calls this,
 * takes the result if it is 48 bytes and otherwise keeps a random premaster;
 * the handshake then fails at Finished. Its check is a branch on our return
 * code and length, so we never give it a reason to branch: every ciphertext
 * that reaches C_Decrypt gives 0 and 48 bytes, the premaster or a synthetic
 * one (HMAC of the ciphertext under a secret of the key: implicit rejection,
 * as in RFC 5246 7.4.7.1 and current TLS stacks). The version bytes are
 * still GnuTLS's to check and overwrite.
 *
 * Where the key allows CKM_RSA_X_509 the token decrypts raw, so that its work
 * does not depend on the padding, and the padding is checked here in
 * constant time: no branch and no memory index depends on the block. With
 * CKM_RSA_PKCS only, the token checks the padding and may take longer for a
 * bad one (see README, rsa_key_exchange); its answer is still taken as data.
 * Nothing is logged and everything is counted alike either way. */
#define TLS_PREMASTER_SIZE 48

static uint32_t ct_barrier(uint32_t x)
{
        __asm__("" : "+r"(x));
        return x;
}

/* Masks: all ones for true, 0 for false. */
static uint32_t ct_is_zero(uint32_t x) { return ct_barrier((uint32_t)(((uint64_t)x - 1) >> 32)); }
static uint32_t ct_eq(uint32_t a, uint32_t b) { return ct_is_zero(a ^ b); }

/* em: the k-byte block. A premaster block is 00 02 PS 00 M with PS k-51
 * non-zero bytes and M 48 bytes: with M's length fixed, every index is too,
 * and every byte is read whatever it holds. */
static uint32_t ct_premaster_block_ok(const uint8_t *em, size_t k)
{
        if (k < 11 + TLS_PREMASTER_SIZE) /* the modulus length is public */
                return 0;
        uint32_t ok = ct_is_zero(em[0]) & ct_eq(em[1], 2);
        for (size_t i = 2; i < k - TLS_PREMASTER_SIZE - 1; i++)
                ok &= ~ct_is_zero(em[i]);
        ok &= ct_is_zero(em[k - TLS_PREMASTER_SIZE - 1]);
        return ok;
}

/* The k-byte block from what a raw C_Decrypt returned: k bytes, or k - 1
 * from a token that drops the leading zero byte. */
static uint32_t ct_block(const uint8_t *raw, size_t len, size_t k, uint8_t *em)
{
        uint32_t full = ct_eq((uint32_t)len, (uint32_t)k), short1 = ct_eq((uint32_t)len, (uint32_t)(k - 1));
        em[0] = (uint8_t)(raw[0] & full);
        for (size_t i = 1; i < k; i++)
                em[i] = (uint8_t)((raw[i] & full) | (raw[i - 1] & short1));
        return full | short1;
}

static int cb_decrypt(gnutls_privkey_t pkey, void *userdata, const gnutls_datum_t *ct, gnutls_datum_t *pt)
{
        hsm_key *k = userdata;
        size_t klen = hsm_key_signature_size(k), len = klen;
        uint8_t synthetic[TLS_PREMASTER_SIZE];
        uint32_t ok = 0;
        int r, raw = hsm_key_can_decrypt_raw(k);

        pt->data = NULL;
        pt->size = 0;
        uint8_t *out = gnutls_malloc(TLS_PREMASTER_SIZE), *buf = gnutls_calloc(2, klen);
        if (!out || !buf) {
                gnutls_free(out);
                gnutls_free(buf);
                return GNUTLS_E_MEMORY_ERROR;
        }
        uint8_t *em = buf + klen;
        const uint8_t *msg;
        /* Made for every ciphertext, before the token is asked. */
        hsm_key_synthetic_premaster(k, ct->data, ct->size, synthetic);
        if (raw) {
                r = hsm_key_decrypt(k, HSM_MECH_RSA_X_509, ct->data, ct->size, buf, &len, &ok);
                ok &= ct_block(buf, len, klen, em);
                ok &= ct_premaster_block_ok(em, klen);
                msg = em + klen - TLS_PREMASTER_SIZE;
        } else {
                r = hsm_key_decrypt(k, HSM_MECH_RSA_PKCS, ct->data, ct->size, buf, &len, &ok);
                ok &= ct_eq((uint32_t)len, TLS_PREMASTER_SIZE); /* len <= klen */
                msg = buf;
        }
        if (r < 0) {
                /* C_Decrypt was not reached: nothing here depends on the
                 * ciphertext. GnuTLS goes on with a random premaster. */
                hsm_debug("key '%s': decryption on the token failed: %s", hsm_key_label(k), strerror(-r));
                gnutls_memset(synthetic, 0, sizeof(synthetic));
                gnutls_free(out);
                gnutls_free(buf);
                return GNUTLS_E_DECRYPTION_FAILED;
        }
        uint8_t m8 = (uint8_t)ok;
        for (size_t i = 0; i < TLS_PREMASTER_SIZE; i++)
                out[i] = (uint8_t)((msg[i] & m8) | (synthetic[i] & (uint8_t)~m8));
        gnutls_memset(synthetic, 0, sizeof(synthetic));
        gnutls_memset(buf, 0, 2 * klen);
        gnutls_free(buf);
        pt->data = out;
        pt->size = TLS_PREMASTER_SIZE;
        return 0;
}

static void cb_deinit(gnutls_privkey_t pkey, void *userdata)
{
        hsm_key_unref(userdata);
}

static int cb_info(gnutls_privkey_t pkey, unsigned flags, void *userdata)
{
        hsm_key *k = userdata;

        if (flags & GNUTLS_PRIVKEY_INFO_PK_ALGO) {
                switch (hsm_key_type(k)) {
                case HSM_KEY_RSA: return GNUTLS_PK_RSA;
                case HSM_KEY_ECDSA: return GNUTLS_PK_ECDSA;
                case HSM_KEY_ED25519: return GNUTLS_PK_EDDSA_ED25519;
                }
                return GNUTLS_E_INVALID_REQUEST;
        }
        if (flags & GNUTLS_PRIVKEY_INFO_PK_ALGO_BITS)
                return (int)hsm_key_bits(k);
        if (flags & GNUTLS_PRIVKEY_INFO_HAVE_SIGN_ALGO) {
                gnutls_sign_algorithm_t algo = GNUTLS_FLAGS_TO_SIGN_ALGO(flags);
                int m = mech_for(k, algo);
                if (m < 0 || !hsm_key_supports(k, m))
                        return 0;
                /* A curve-bound algorithm (TLS 1.3) must name our curve. */
                gnutls_ecc_curve_t c = algo == GNUTLS_SIGN_ECDSA_SECP256R1_SHA256   ? GNUTLS_ECC_CURVE_SECP256R1
                                       : algo == GNUTLS_SIGN_ECDSA_SECP384R1_SHA384 ? GNUTLS_ECC_CURVE_SECP384R1
                                       : algo == GNUTLS_SIGN_ECDSA_SECP521R1_SHA512 ? GNUTLS_ECC_CURVE_SECP521R1
                                                                                     : GNUTLS_ECC_CURVE_INVALID;
                if (hsm_key_type(k) == HSM_KEY_ECDSA && c != GNUTLS_ECC_CURVE_INVALID && c != gnutls_curve(hsm_key_curve(k)))
                        return 0;
                return 1;
        }
        if (flags & GNUTLS_PRIVKEY_INFO_SIGN_ALGO)
                return 0;
        return GNUTLS_E_INVALID_REQUEST;
}

int hsm_privkey_import(hsm_key *key, gnutls_privkey_t *ret)
{
        gnutls_privkey_t pk;
        int r = gnutls_privkey_init(&pk);
        if (r < 0)
                return -ENOMEM;
        int can_decrypt = hsm_key_can_decrypt(key);
        r = gnutls_privkey_import_ext4(pk, hsm_key_ref(key), cb_sign_data, cb_sign_hash, can_decrypt ? cb_decrypt : NULL,
                                       cb_deinit, cb_info, GNUTLS_PRIVKEY_IMPORT_AUTO_RELEASE);
        if (r < 0) {
                hsm_key_unref(key);
                gnutls_privkey_deinit(pk);
                hsm_debug("gnutls_privkey_import_ext4: %s", gnutls_strerror(r));
                return -EINVAL;
        }
        *ret = pk;
        return 0;
}

/* EC points come as a DER OCTET STRING (PKCS#11 2.40) or raw (some tokens). */
static gnutls_datum_t unwrap_octet_string(const uint8_t *p, size_t n, size_t want_raw)
{
        gnutls_datum_t d = { (unsigned char *)p, (unsigned)n };
        if (n == want_raw)
                return d;
        if (n >= 2 && p[0] == 0x04) {
                size_t hdr = 2, len = p[1];
                if (p[1] == 0x81 && n >= 3) {
                        hdr = 3;
                        len = p[2];
                }
                if (hdr + len == n) {
                        d.data = (unsigned char *)p + hdr;
                        d.size = (unsigned)len;
                }
        }
        return d;
}

int hsm_pubkey_from_public(enum hsm_key_type type, const hsm_key_public *pp, gnutls_pubkey_t *ret)
{
        const hsm_key_public p = *pp;
        gnutls_pubkey_t pub = NULL;
        int r;
        if (gnutls_pubkey_init(&pub) < 0)
                return -ENOMEM;
        switch (type) {
        case HSM_KEY_RSA: {
                gnutls_datum_t m = { p.modulus, (unsigned)p.modulus_len }, e = { p.exponent, (unsigned)p.exponent_len };
                r = gnutls_pubkey_import_rsa_raw(pub, &m, &e);
                break;
        }
        case HSM_KEY_ECDSA: {
                gnutls_datum_t params = { p.ec_params, (unsigned)p.ec_params_len };
                /* gnutls wants the DER OCTET STRING form. */
                uint8_t buf[3 + 133];
                gnutls_datum_t pt = { p.ec_point, (unsigned)p.ec_point_len };
                if (p.ec_point_len > 0 && p.ec_point[0] == 0x04 && p.ec_point_len <= 133 &&
                    (p.ec_point_len == 65 || p.ec_point_len == 97 || p.ec_point_len == 133)) {
                        size_t n = 0;
                        buf[n++] = 0x04;
                        if (p.ec_point_len >= 128)
                                buf[n++] = 0x81;
                        buf[n++] = (uint8_t)p.ec_point_len;
                        memcpy(buf + n, p.ec_point, p.ec_point_len);
                        pt.data = buf;
                        pt.size = (unsigned)(n + p.ec_point_len);
                }
                r = gnutls_pubkey_import_ecc_x962(pub, &params, &pt);
                break;
        }
        case HSM_KEY_ED25519: {
                gnutls_datum_t x = unwrap_octet_string(p.ec_point, p.ec_point_len, 32);
                r = gnutls_pubkey_import_ecc_raw(pub, GNUTLS_ECC_CURVE_ED25519, &x, NULL);
                break;
        }
        default:
                r = GNUTLS_E_INVALID_REQUEST;
        }
        if (r < 0) {
                hsm_debug("cannot build a public key: %s", gnutls_strerror(r));
                gnutls_pubkey_deinit(pub);
                return -EINVAL;
        }
        *ret = pub;
        return 0;
}

int hsm_pubkey_import(hsm_key *key, gnutls_pubkey_t *ret)
{
        hsm_key_public p;
        int r = hsm_key_get_public(key, &p);
        if (r < 0)
                return r;
        r = hsm_pubkey_from_public(hsm_key_type(key), &p, ret);
        if (r < 0)
                hsm_debug("key '%s': cannot build its public key", hsm_key_label(key));
        hsm_key_public_done(&p);
        return r;
}

int hsm_key_matches_certificate(hsm_key *key, gnutls_x509_crt_t crt)
{
        gnutls_pubkey_t a = NULL, b = NULL;
        unsigned char ida[64], idb[64];
        size_t la = sizeof(ida), lb = sizeof(idb);
        int r = hsm_pubkey_import(key, &a);
        if (r < 0)
                return r;
        r = -EKEYREJECTED;
        if (gnutls_pubkey_init(&b) < 0 || gnutls_pubkey_import_x509(b, crt, 0) < 0)
                goto out;
        if (gnutls_pubkey_get_key_id(a, GNUTLS_KEYID_USE_SHA256, ida, &la) < 0 ||
            gnutls_pubkey_get_key_id(b, GNUTLS_KEYID_USE_SHA256, idb, &lb) < 0)
                goto out;
        if (la == lb && memcmp(ida, idb, la) == 0)
                r = 0;
out:
        gnutls_pubkey_deinit(a);
        if (b)
                gnutls_pubkey_deinit(b);
        return r;
}
