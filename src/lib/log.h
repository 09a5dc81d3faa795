/* Logging: one place, levels, readable lines. Lower layers log at debug
 * level only; the layer that decides logs once. */
#pragma once

#include <stdarg.h>

/* enum hsm_log_level and hsm_log_set_level(), hsm_log_get_level(),
 * hsm_log_level_from_string(), hsm_log_set_ident() are public: hsmtls.h. */
#include "hsmtls.h"

/* Sets *errmsg (when errmsg is not NULL) to a new formatted message, for
 * the caller that decides to log it. */
void hsm_set_error(char **errmsg, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

void hsm_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void hsm_logv(int level, const char *fmt, va_list ap);

#define hsm_err(...) hsm_log(HSM_LOG_ERR, __VA_ARGS__)
#define hsm_warn(...) hsm_log(HSM_LOG_WARNING, __VA_ARGS__)
#define hsm_notice(...) hsm_log(HSM_LOG_NOTICE, __VA_ARGS__)
#define hsm_info(...) hsm_log(HSM_LOG_INFO, __VA_ARGS__)
#define hsm_debug(...) do { if (hsm_log_get_level() >= HSM_LOG_DEBUG) hsm_log(HSM_LOG_DEBUG, __VA_ARGS__); } while (0)
