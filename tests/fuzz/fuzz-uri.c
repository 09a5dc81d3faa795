/* libFuzzer target: pkcs11: URI handling, as hsm_token_open() and
 * hsm_token_find_key() do it before they touch a token: the token URI
 * (pin-value= refused, module-name=/module-path=, pin-source= as a PIN
 * source spec), matched against a token; the key URI and the C_FindObjects
 * template it gives. Checks: pin-value= is never accepted; a template holds
 * CKA_CLASS exactly once, CKO_PRIVATE_KEY, and CKA_LABEL or CKA_ID. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <p11-kit/uri.h>

#include "log.h"
#include "pin.h"
#include "token-internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void pad(unsigned char *dst, size_t n, const char *s)
{
        memset(dst, ' ', n);
        memcpy(dst, s, strlen(s) < n ? strlen(s) : n);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        if (size > 4096)
                return 0;
        char *s = malloc(size + 1);
        if (!s)
                return 0;
        memcpy(s, data, size);
        s[size] = 0;
        hsm_log_set_level(HSM_LOG_ERR - 1);

        P11KitUri *uri = NULL;
        char *err = NULL;
        if (hsm_token_uri_parse(s, "fuzz", &uri, &err) == 0) {
                if (p11_kit_uri_get_pin_value(uri))
                        abort();
                CK_TOKEN_INFO ti;
                memset(&ti, 0, sizeof(ti));
                pad(ti.label, sizeof(ti.label), "hsmtls");
                pad(ti.manufacturerID, sizeof(ti.manufacturerID), "SoftHSM project");
                pad(ti.model, sizeof(ti.model), "SoftHSM v2");
                pad(ti.serialNumber, sizeof(ti.serialNumber), "0123456789abcdef");
                ti.flags = CKF_TOKEN_INITIALIZED | CKF_LOGIN_REQUIRED;
                (void)p11_kit_uri_match_token_info(uri, &ti);
                (void)p11_kit_uri_get_module_path(uri);
                (void)p11_kit_uri_get_module_name(uri);
                const char *ps = p11_kit_uri_get_pin_source(uri);
                /* env: would take a variable out of this process's environment */
                if (ps && strncmp(ps, "env:", 4) != 0) {
                        hsm_pin_source *src = NULL;
                        if (hsm_pin_source_new(ps, &src) == 0) {
                                if (!hsm_pin_source_describe(src))
                                        abort();
                                hsm_pin_source_free(src);
                        }
                }
                p11_kit_uri_free(uri);
        } else if (!err)
                abort(); /* refused without a reason */
        free(err);
        err = NULL;

        CK_ATTRIBUTE *match = NULL;
        CK_ULONG n = 0;
        uri = NULL;
        if (hsm_key_uri_template(s, &uri, &match, &n, &err) == 0) {
                if (p11_kit_uri_get_pin_value(uri))
                        abort();
                unsigned classes = 0, selectors = 0;
                for (CK_ULONG i = 0; i < n; i++) {
                        if (!match[i].pValue)
                                abort();
                        if (match[i].type == CKA_CLASS) {
                                classes++;
                                if (match[i].ulValueLen != sizeof(CK_OBJECT_CLASS) ||
                                    *(CK_OBJECT_CLASS *)match[i].pValue != CKO_PRIVATE_KEY)
                                        abort();
                        } else if (match[i].type == CKA_LABEL || match[i].type == CKA_ID)
                                selectors++;
                }
                if (classes != 1 || selectors == 0)
                        abort();
                hsm_key_template_free(match, n);
                p11_kit_uri_free(uri);
        } else if (!err)
                abort();
        free(err);
        free(s);
        return 0;
}
