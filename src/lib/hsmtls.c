/* Library-wide glue for the public API (hsmtls.h). */
#include "hsmtls.h"

#include "hsmtls-build.h"

const char *hsm_version(void) { return HSMTLS_VERSION; }
