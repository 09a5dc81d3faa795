/* Private to the configuration parser's files (conf.c, conflisten.c,
 * conftoken.c, confadmin.c): the parser's state and what they share. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "conf.h"

struct parse_state {
        FILE *f;
        int line;           /* line the reader last returned */
        int header_line;    /* line of the last [section] header read */
        unsigned headers;   /* [section] headers read so far */
        unsigned section_no; /* header count when the current section began */
        hsm_conf *conf;
        char *section;      /* current section as written */
        int section_line;
        enum { SEC_NONE, SEC_GLOBAL, SEC_TOKEN, SEC_LISTENER, SEC_ADMIN } kind;
        void *cur;          /* current token or listener */
        int error_line;
        char *error;
        int too_long;       /* first line longer than CONF_MAX_LINE */
        bool at_line_start;
        size_t cur_len;
        char seen[64][32];  /* settings given in the current section */
        unsigned n_seen;
};

/* Records the first error (at the current line); returns 0, what a setting
 * returns when it is refused. */
int hsm_conf_fail(struct parse_state *st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* pin-value= in value: refused with a reason (instead: what to do). */
bool hsm_conf_has_pin_value(struct parse_state *st, const char *value, const char *instead);
/* Value parsers: 0, or -EINVAL / -ERANGE. */
int hsm_conf_parse_uint(const char *v, unsigned long max, unsigned *ret);
int hsm_conf_parse_duration_ms(const char *v, unsigned *ret);
int hsm_conf_parse_bool(const char *v, bool *ret);
/* A string setting given once: 1, or 0 (refused: twice, empty). */
int hsm_conf_set_string(struct parse_state *st, char **dst, const char *name, const char *value);

/* One setting of a section: 1 taken, 0 refused (the error is in st). */
int hsm_conf_global_setting(struct parse_state *st, hsm_conf *c, const char *name, const char *value);
int hsm_conf_listener_setting(struct parse_state *st, hsm_conf_listener *l, const char *name, const char *value);
int hsm_conf_token_setting(struct parse_state *st, hsm_conf_token *t, const char *name, const char *value);
int hsm_conf_admin_setting(struct parse_state *st, hsm_conf_admin *a, const char *name, const char *value);
/* [admin] as a whole, after the file was read (defaults set): 0, or > 0
 * with *where_line the error (at *line), or < 0 out of memory. */
int hsm_conf_check_admin(hsm_conf *c, char **where_line, int *line);
