/* hsmtlsd configuration: one INI file (parsed by inih), sections
 * [global], [token NAME], [listener NAME], [connector NAME], [admin]. Every setting is documented in
 * README.md. Errors name the file, the line and the reason. */
#pragma once

#include <stdbool.h>
#include <sys/socket.h>

typedef struct hsm_addr {
        struct sockaddr_storage ss;
        socklen_t len;
        char *text; /* as written */
} hsm_addr;

typedef struct hsm_conf_token {
        char *name;
        int line;
        char *uri;
        char *module;
        char *pin_source; /* normalised spec: file:..., env:..., credential:... */
        unsigned max_sessions;
        unsigned concurrency_min, concurrency_max; /* bounds of the adaptive limit (0: 1, max_sessions) */
        unsigned queue_limit;                      /* operations waiting at most (0: 4 x max_sessions) */
        unsigned key_ops_per_second;               /* per key on this token (0: no limit) */
} hsm_conf_token;

typedef struct hsm_conf_chain {
        char *cert; /* PEM file: leaf first, then intermediates */
        char *key;  /* pkcs11: URI, or a PEM key file */
        int cert_line, key_line;
        char *ocsp; /* listeners: ocsp_response, a DER file to staple; NULL: none */
        int ocsp_line;
} hsm_conf_chain;

enum hsm_endpoint_kind { HSM_LISTENER = 0, HSM_CONNECTOR };
enum hsm_client_auth { HSM_CLIENT_AUTH_NONE = 0, HSM_CLIENT_AUTH_OPTIONAL, HSM_CLIENT_AUTH_REQUIRE };

/* A [listener] (TLS in, plaintext to a backend) or a [connector]
 * (plaintext in, TLS with a client certificate out). */
typedef struct hsm_conf_listener {
        enum hsm_endpoint_kind kind;
        char *name;
        int line;
        hsm_addr listen;
        hsm_addr backend;   /* listener: backend; connector: the remote TLS server ('connect') */
        /* listener only */
        enum hsm_client_auth client_auth;
        char *client_ca;
        int client_ca_line;
        bool proxy_protocol;
        /* connector only */
        char *server_name;  /* SNI and the name the server certificate must carry */
        char *ca_file;      /* NULL: the system trust store */
        int ca_file_line;
        hsm_conf_chain *chains;
        unsigned n_chains;
        char *priority;
        int priority_line;
        bool rsa_key_exchange;
        unsigned max_connections;
        unsigned handshake_timeout_ms;
        unsigned idle_timeout_ms;
        unsigned connect_timeout_ms;
        /* listener only: resumption */
        bool session_tickets;         /* default yes */
        unsigned session_cache;       /* TLS 1.2 session-ID cache entries; 0: none */
        unsigned session_lifetime_ms; /* tickets and cache entries */
        char *ticket_key;             /* pkcs11: URI of a secret key; NULL: the [global] one, or random */
        int ticket_key_line;
        char *alpn;                   /* "h2, http/1.1" as written; NULL: no ALPN */
        char **alpn_protos;           /* the same, one protocol each, in order of preference */
        unsigned n_alpn;
} hsm_conf_listener;

/* [admin]: the admin API (src/admin). */
enum hsm_admin_role { HSM_ROLE_NONE = 0, HSM_ROLE_READ, HSM_ROLE_ADMIN };

typedef struct hsm_conf_admin_token {
        char *name;
        enum hsm_admin_role role;
        unsigned char sha256[32]; /* SHA-256 of the bearer token; the token itself is never stored */
        int line;
} hsm_conf_admin_token;

typedef struct hsm_conf_admin_identity {
        char *subject; /* client certificate subject DN (RFC 4514, as GnuTLS prints it) */
        enum hsm_admin_role role;
        int line;
} hsm_conf_admin_identity;

typedef struct hsm_conf_admin {
        bool enabled;
        int line;
        hsm_addr listen;          /* default unix:STATE_DIR/admin.sock */
        char *tls_cert, *tls_key; /* HTTPS: PEM chain and PEM key file */
        char *client_ca;          /* admin CA: client certificates are identities */
        int tls_line;
        hsm_conf_admin_token *tokens;
        unsigned n_tokens;
        hsm_conf_admin_identity *identities;
        unsigned n_identities;
        unsigned max_connections;
        unsigned max_connections_per_ip;
        unsigned max_body;        /* bytes */
        unsigned timeout_ms;      /* a connection idle this long is closed */
        unsigned threads;
        /* The audit records of refused requests without an identity
         * (src/admin/audit.c): token buckets for all addresses and per
         * address (burst, then so many a minute), a summary an interval. */
        unsigned audit_refusals_burst, audit_refusals_per_minute;
        unsigned audit_refusals_burst_per_address, audit_refusals_per_minute_per_address;
        unsigned audit_refusals_summary_interval_ms;
} hsm_conf_admin;

typedef struct hsm_conf {
        char *path;
        int global_line; /* of [global], 0: none */
        int log_level;
        unsigned handshake_threads; /* 0: from the tokens' session pools */
        unsigned io_threads;        /* 0: one per core */
        int handshake_nice;         /* handshake threads run this much nicer than the I/O threads */
        unsigned handshake_cpus;    /* handshake steps on the CPU at once (0: one per core) */
        unsigned max_connections;
        unsigned max_waiting_handshakes; /* 0: max_connections / 2 */
        unsigned drain_timeout_ms;
        char *ticket_key; /* [global] ticket_key: for listeners without their own */
        int ticket_key_line;
        hsm_conf_token *tokens;
        unsigned n_tokens;
        hsm_conf_listener *listeners; /* listeners and connectors */
        unsigned n_listeners;
        char *state_dir; /* [global] state_dir: usage totals, audit log (NULL: none) */
        char *user, *group; /* [global] user/group: privileges dropped to them after binding (NULL: none) */
        int user_line, group_line;
        hsm_conf_admin admin;
} hsm_conf;

#define HSM_DEFAULT_SESSION_CACHE 1024
#define HSM_DEFAULT_SESSION_LIFETIME_MS (2u * 3600u * 1000u)
#define HSM_DEFAULT_PRIORITY "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2:-RSA:-DHE-RSA:-DHE-DSS:-CIPHER-ALL:+CHACHA20-POLY1305:+AES-256-GCM:+AES-128-GCM:-MAC-ALL:+AEAD"

/* errmsg: "FILE:LINE: reason" (malloc'd). */
int hsm_conf_load(const char *path, hsm_conf **ret, char **errmsg);
/* The same from a buffer (len bytes, need not end in a NUL), named name in
 * error messages: for tests and fuzzing. */
int hsm_conf_load_buffer(const char *name, const char *text, size_t len, hsm_conf **ret, char **errmsg);
void hsm_conf_free(hsm_conf *c);
/* "host:port", "[v6]:port" or "unix:/path". Port 0 is allowed when passive. */
int hsm_addr_parse(const char *s, bool passive, hsm_addr *ret, const char **reason);
void hsm_addr_done(hsm_addr *a);
/* Formats a socket address as "1.2.3.4:5" / "[::1]:5" / "unix:/p". */
void hsm_sockaddr_format(const struct sockaddr *sa, socklen_t len, char *buf, size_t size);
