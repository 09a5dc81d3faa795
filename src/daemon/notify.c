/* sd_notify: readiness, drain and status for systemd (Type=notify). */
#include "notify.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <systemd/sd-daemon.h>

#include "internal.h"
#include "log.h"

bool hsm_notify_enabled(void)
{
        const char *s = getenv("NOTIFY_SOCKET");
        return s && *s;
}

int hsm_notify_self_test(hsm_keystore *ks, char **errmsg)
{
        unsigned tested = 0, passed_over = 0;
        for (unsigned i = 0; i < hsm_keystore_n_keys(ks); i++) {
                hsm_key *k = hsm_keystore_key(ks, i);
                int r = hsm_key_self_test(k);
                if (r == -EOPNOTSUPP) {
                        hsm_info("token %s: key %s: no start-up test signature (it needs a context-specific login, "
                                 "may not sign, or the token lacks the mechanism)",
                                 hsm_keystore_token_name(ks, i), hsm_key_uri(k));
                        passed_over++;
                        continue;
                }
                if (r < 0) {
                        hsm_set_error(errmsg, "token %s: key %s did not answer its start-up test signature: %s",
                                      hsm_keystore_token_name(ks, i), hsm_key_uri(k), strerror(-r));
                        return r;
                }
                tested++;
        }
        hsm_info("start-up test signatures: %u key%s answered, %u passed over", tested, tested == 1 ? "" : "s", passed_over);
        return 0;
}

static void notify(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void notify(const char *fmt, ...)
{
        if (!hsm_notify_enabled())
                return;
        char buf[256];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof(buf), fmt, ap);
        va_end(ap);
        int r = sd_notify(0, buf);
        if (r < 0)
                hsm_debug("sd_notify: %s", strerror(-r));
}

void hsm_notify_ready(unsigned n_listeners, unsigned n_connectors)
{
        if (n_connectors)
                notify("READY=1\nSTATUS=serving %u listener%s and %u connector%s", n_listeners, n_listeners == 1 ? "" : "s",
                       n_connectors, n_connectors == 1 ? "" : "s");
        else
                notify("READY=1\nSTATUS=serving %u listener%s", n_listeners, n_listeners == 1 ? "" : "s");
}

void hsm_notify_stopping(unsigned open_connections)
{
        notify("STOPPING=1\nSTATUS=draining %u connection%s", open_connections, open_connections == 1 ? "" : "s");
}

void hsm_notify_draining(unsigned open_connections)
{
        static uint64_t last; /* atomic */
        if (!hsm_notify_enabled() || !hsm_once_a_second(&last))
                return;
        notify("STATUS=draining %u connection%s", open_connections, open_connections == 1 ? "" : "s");
}

void hsm_notify_stopped(void)
{
        notify("STATUS=stopped");
}

void hsm_notify_reloading(void)
{
        /* systemd 253+ wants the CLOCK_MONOTONIC time of the reload with it
         * (Type=notify-reload); older ones ignore the field. */
        notify("RELOADING=1\nMONOTONIC_USEC=%llu\nSTATUS=reloading the configuration",
               (unsigned long long)(hsm_now_ns() / 1000u));
}

void hsm_notify_reloaded(bool committed, unsigned n_serving)
{
        notify("READY=1\nSTATUS=serving %u listener%s (%s)", n_serving, n_serving == 1 ? "" : "s",
               committed ? "reload committed" : "reload refused, nothing changed");
}
