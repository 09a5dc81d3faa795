/* PIN sources. A PIN is read when a login needs it, used once and wiped.
 * It never appears in a log line, an error message or a process argument. */
#pragma once

#include <sys/types.h>

#include <stddef.h>

typedef struct hsm_pin_source hsm_pin_source;

/* spec: "file:PATH" or a plain absolute/relative PATH, "env:VARIABLE",
 * "credential:NAME" (systemd, $CREDENTIALS_DIRECTORY/NAME).
 * "pin-value" style literals are refused. A file (or credential) must be a
 * regular file; it is read at each login. An environment variable is taken
 * out of the environment when the source is made (wiped and unset; the PIN
 * is kept in a locked page left out of core dumps, for later logins). */
int hsm_pin_source_new(const char *spec, hsm_pin_source **ret);
void hsm_pin_source_free(hsm_pin_source *src);
/* A description safe to log: "file /etc/hsmtls/pin", "environment variable X". */
const char *hsm_pin_source_describe(const hsm_pin_source *src);

/* Reads the PIN (trailing CR/LF removed). The caller wipes and frees it with
 * hsm_pin_free(). Returns 0 or a negative errno code; on failure *reason
 * (static string) says why. */
int hsm_pin_source_read(hsm_pin_source *src, char **ret_pin, size_t *ret_len, const char **reason);
void hsm_pin_free(char *pin, size_t len);
/* The user the process will run as after a privilege drop ((uid_t)-1:
 * none): a PIN file it owns is accepted while the process is still root. */
void hsm_pin_trust_uid(uid_t uid);
