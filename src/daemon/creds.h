/* Certificates bound to keys: the keystore opens the configured tokens and
 * resolves key names (pkcs11: URIs or PEM files); a listener's credentials
 * hold one or more chains, each checked against its key. */
#pragma once

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include "conf.h"
#include "token.h"

typedef struct hsm_keystore hsm_keystore;

/* keystore.c. The readers below take no lock and may run on any thread
 * while keys are added (the lists only grow; README "Reload"). */
int hsm_keystore_open(const hsm_conf *c, hsm_keystore **ret, char **errmsg);
void hsm_keystore_free(hsm_keystore *ks);
/* Token keys in use (every key a credential was ever built with, at start,
 * through the admin API or at a reload), for usage reports. */
unsigned hsm_keystore_n_keys(const hsm_keystore *ks);
hsm_key *hsm_keystore_key(const hsm_keystore *ks, unsigned i);
const char *hsm_keystore_token_name(const hsm_keystore *ks, unsigned i); /* config name of key i's token */
/* The configured tokens (admin API): those a reload retired are left out,
 * so hsm_keystore_token() may return NULL for an i below an earlier
 * hsm_keystore_n_tokens(). */
unsigned hsm_keystore_n_tokens(const hsm_keystore *ks);
hsm_token *hsm_keystore_token(const hsm_keystore *ks, unsigned i);
/* cb(arg, token name, key) for every key in the keystore now and, from now
 * on, for each key added (under the keystore's lock, on the thread that
 * adds it): the state database tracks them. */
void hsm_keystore_on_key(hsm_keystore *ks, void (*cb)(void *arg, const char *token, hsm_key *k), void *arg);
/* The key a pkcs11: URI names (a reference), added to the keystore the
 * first time; and the key whose public key the certificate has. */
int hsm_keystore_find(hsm_keystore *ks, const char *uri, hsm_key **ret, char **errmsg);
int hsm_keystore_find_for_cert(hsm_keystore *ks, gnutls_x509_crt_t crt, hsm_key **ret);
/* Why a lookup answered -ENOSPC: the keystore's lists are full (they only
 * grow, to 4096 keys; a restart empties them). */
extern const char hsm_keystore_full_msg[];
/* Reload (reload.c, under the server's change lock): opens the [token]s
 * of nc that are new or whose uri, module, pin_source or max_sessions
 * changed from oc, beside the serving ones; until the commit or abort,
 * lookups see nc's tokens. *summary: what happens to the tokens. A token
 * that cannot be opened: -errno, *errmsg with file, line and reason,
 * nothing changed. */
int hsm_keystore_tokens_stage(hsm_keystore *ks, const hsm_conf *oc, const hsm_conf *nc, char *summary, size_t len,
                              char **errmsg);
/* Publishes what was staged: new tokens, replaced ones in place of the
 * old (which are retired), removed ones retired; nc's admission limits
 * applied. The main loop never waits for the keystore's lock (a lookup
 * may hold it inside a token call): -EBUSY when another holds it now,
 * and nothing changed; else 0. */
int hsm_keystore_tokens_try_commit(hsm_keystore *ks, const hsm_conf *nc);
/* Closes what was staged; nothing changes. Nothing staged: does nothing. */
void hsm_keystore_tokens_abort(hsm_keystore *ks);
/* Closes the sessions of retired tokens that nothing uses any more
 * (main loop; cheap when there are none). */
void hsm_keystore_reap(hsm_keystore *ks);
/* Sum of the session pools of all tokens. */
unsigned hsm_keystore_total_sessions(const hsm_keystore *ks);
/* A listener's session ticket master key derived on the token that uri
 * names (hsm_token_derive_ticket_key, context: the listener name);
 * *token_name: that token's config name. */
int hsm_keystore_derive_ticket_key(hsm_keystore *ks, const char *uri, const char *context, uint8_t *out, size_t len,
                                   const char **token_name, char **errmsg);

/* A reload builds on a thread of its own (reload.c) while the main loop
 * goes on serving and holds the build to a deadline: each step of it that
 * may wait on a token (a key looked up, a public key read, a token opened,
 * a ticket key derived, a lock that such a step may hold) says first what
 * it does ("key K on token T: reading its public key"); it must end within
 * the handshake_timeout of the listener being built (hsm_build_listener),
 * else within the longest handshake_timeout of the new configuration. The
 * step's deadline is also the thread's token watch deadline (its wait for
 * a session ends there). On any other thread these do nothing. */
void hsm_build_listener(const hsm_conf_listener *l); /* NULL: no listener */
void hsm_build_step(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* A step that ends by its deadline on its own (a test signature on a
 * thread of its own): named, the main loop does not cut it short. */
void hsm_build_step_bounded(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void hsm_build_step_end(void);
/* The current step's deadline (CLOCK_MONOTONIC ns), or 0: not on a build
 * thread, or in no step. */
uint64_t hsm_build_deadline(void);

/* What one chain is built from: a PEM chain (a file, or the text of an
 * uploaded chain), its key and, optionally, an OCSP response file and the
 * names it serves. Strings are only read during hsm_creds_build (which
 * keeps copies). */
typedef struct hsm_chain_spec {
        const char *source;     /* "config" (the configuration file) or "api" (a binding in state.db) */
        const char *cert_file;  /* a PEM file, leaf first; or NULL and: */
        const char *cert_pem;   /* the PEM text */
        const char *key;        /* a pkcs11: URI or a PEM key file; NULL: the key on a configured token
                                 * whose public key is the leaf's */
        const char *ocsp;       /* a DER OCSP response file to staple, or NULL */
        const char *const *names; /* the SNI names it serves; n_names 0: the leaf's own names */
        unsigned n_names;
        /* Prefixes of error messages about the certificate, the key and the
         * OCSP file ("hsmtlsd.conf:12", "binding www/FINGERPRINT"). */
        const char *cert_where, *key_where, *ocsp_where;
} hsm_chain_spec;

typedef struct hsm_chain_info {
        char *description; /* "rsa2048-chain.pem with pkcs11:...": for logs */
        char *key_name;    /* token key label or file name */
        gnutls_datum_t leaf; /* DER, for telling which chain a handshake used */
        hsm_key *key;      /* NULL for a file key; a reference */
        struct hsm_ocsp_file *ocsp; /* ocsp_response, or NULL (the hook for OCSP stapling, per chain) */
        char fingerprint[65]; /* SHA-256 of the leaf's DER, lowercase hex */
        char **names;      /* the names it serves: spec.names, or the leaf's DNS SANs (its CN without any) */
        unsigned n_names;
        int pk;            /* the leaf's gnutls_pk_algorithm_t (RSA-PSS counted as RSA) */
        hsm_chain_spec spec; /* what it was built from (owned copies: the base of the next change) */
} hsm_chain_info;

/* A listener's credentials: an immutable, reference-counted snapshot. The
 * listener holds one reference; a handshake takes one when it starts
 * (hsm_listener_creds() in server.c) and drops it after gnutls_deinit, so
 * a handshake in flight and an established connection keep the chains
 * they started with when a change swaps in new credentials. */
typedef struct hsm_creds {
        gnutls_certificate_credentials_t cred;
        hsm_chain_info *chains;
        unsigned n_chains;
        unsigned refs;       /* atomic */
        unsigned generation; /* 1 for those built at start, +1 at each swap */
        int retired;         /* atomic: replaced by a swap (the release is then logged) */
        char *name;          /* the listener's, for log lines */
} hsm_creds;

/* hsm_creds_build() flags. */
enum {
        HSM_CREDS_VERBOSE = 1 << 0,   /* log one line per chain (check mode) */
        HSM_CREDS_TEST_SIGN = 1 << 1, /* one test signature per key, verified with the leaf's public key */
        HSM_CREDS_LIVE = 1 << 2,      /* built while serving (any thread); keys are added to the keystore as at
                                       * start (its lists are safe to grow while others read them) */
};

/* Builds credentials for listener l from chains (in order: the order in
 * which GnuTLS prefers them). Checks: each chain parses, is in order and
 * carries its key's public key (hsm_key_matches_certificate); each of the
 * names given is one the leaf is valid for; no name is served by two
 * chains with keys of the same type (unless both come from the
 * configuration file, which is taken as it is); with HSM_CREDS_TEST_SIGN a
 * signature per key. Returns 0, or a negative errno code with *errmsg set
 * and *ret_bad (may be NULL) the index of the chain at fault (-1: the
 * listener's own settings, e.g. client_ca): -ENOENT a file cannot be read,
 * -EINVAL a chain that does not parse or a name the leaf is not valid for,
 * -EKEYREJECTED chain and key differ, -ENOKEY no configured token holds the
 * leaf's key, -EEXIST a name clash, -EIO the test signature failed,
 * -ETIMEDOUT (HSM_CREDS_LIVE) it did not return within the listener's
 * handshake_timeout, or an earlier one with that key has not returned yet
 * (it runs on a thread of its own: the caller never waits longer). */
int hsm_creds_build(hsm_keystore *ks, const hsm_conf_listener *l, const hsm_chain_spec *chains, unsigned n_chains,
                    unsigned flags, hsm_creds **ret, int *ret_bad, char **errmsg);
/* Test signatures (HSM_CREDS_LIVE) whose thread is still inside the token:
 * at exit, the process must not unload the token under them. */
unsigned hsm_creds_tests_running(void);
/* The configuration file's chains of listener l as specs (arrays owned by
 * the caller: hsm_chain_specs_free). */
int hsm_chain_specs_from_conf(const hsm_conf *c, const hsm_conf_listener *l, hsm_chain_spec **ret, char ***ret_strings);
void hsm_chain_specs_free(hsm_chain_spec *specs, char **strings);
/* Loads every chain of the listener from the configuration file (at start,
 * and for --check). verbose: log one line per chain (check mode). */
int hsm_creds_load(hsm_keystore *ks, const hsm_conf *c, const hsm_conf_listener *l, bool verbose, hsm_creds **ret,
                   char **errmsg);
/* Whom cr trusts: listener l's client_ca (client_auth), a connector's
 * ca_file or the system store. hsm_creds_load does it; a caller of
 * hsm_creds_build must too. */
int hsm_creds_set_trust(hsm_creds *cr, const hsm_conf *c, const hsm_conf_listener *l, bool verbose, char **errmsg);
hsm_creds *hsm_creds_ref(hsm_creds *cr);
/* Drops a reference; the last one frees. NULL is accepted. */
void hsm_creds_unref(hsm_creds *cr);
/* The same as hsm_creds_unref (the owner's reference). */
void hsm_creds_free(hsm_creds *cr);
/* Which chain the session presented (index), or -1. */
int hsm_creds_chain_of(const hsm_creds *cr, gnutls_session_t s);
