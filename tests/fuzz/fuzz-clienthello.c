/* libFuzzer target: the ClientHello peek's parser (clienthello.c), as the
 * peek uses it: the record size from ever longer prefixes of the input
 * (each answer consistent with the last), then the parse of exactly the
 * first record when it is all in. Checks: every refusal says why; the size
 * never shrinks below what was asked for; a parsed host name is
 * NUL-terminated, non-empty and free of NULs; the ALPN list lies inside
 * the input and holds n_alpn well-formed names; an SSLv2-format hello has
 * no extensions. */
#include <assert.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "clienthello.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
        size_t have = 0, need = 0;
        const char *why = NULL;
        /* the peek: read up to what the header asks for, then again */
        for (;;) {
                int r = hsm_clienthello_record_size(data, have, &need, &why);
                if (r < 0) {
                        assert(why && *why);
                        assert(r == -EPROTO || r == -EMSGSIZE);
                        return 0;
                }
                assert(need > have || (need == have && have > 5));
                assert(need <= HSM_HELLO_RECORD_MAX + 5);
                if (need == have)
                        break;
                if (need > size)
                        return 0; /* the client would still be sending */
                have = need;
        }
        hsm_clienthello h;
        memset(&h, 0xa5, sizeof(h));
        int r = hsm_clienthello_parse(data, have, &h, &why);
        if (r < 0) {
                assert(why && *why);
                return 0;
        }
        if (h.has_sni) {
                size_t n = strnlen(h.sni, sizeof(h.sni));
                assert(n > 0 && n < sizeof(h.sni));
        }
        if (h.alpn) {
                assert(h.alpn >= data && h.alpn + h.alpn_len <= data + have);
                size_t off = 0;
                unsigned n = 0;
                while (off < h.alpn_len) {
                        assert(h.alpn[off] > 0);
                        off += 1 + h.alpn[off];
                        n++;
                }
                assert(off == h.alpn_len && n == h.n_alpn && n > 0);
        } else
                assert(h.alpn_len == 0);
        if (h.sslv2)
                assert(!h.has_sni && !h.alpn && h.record_version == 0x0200 && h.n_suites > 0);
        char v[16];
        hsm_clienthello_version_name(h.max_version, v, sizeof(v));
        return 0;
}
