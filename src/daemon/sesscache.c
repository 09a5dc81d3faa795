/* TLS 1.2 session-ID cache (see sesscache.h): a chained hash table of
 * session IDs and a doubly linked list in use order. GnuTLS packs a
 * session (master secret, cipher suite, the peer's certificates) into the
 * value; it is wiped when an entry goes. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <gnutls/crypto.h>

#include "sesscache.h"

#define KEY_MAX 64 /* session IDs are at most 32 bytes */

struct entry {
        struct entry *hnext;       /* hash chain */
        struct entry *prev, *next; /* use order: head the most recent */
        uint64_t born_s;
        uint32_t hash;
        uint8_t key_len;
        uint8_t key[KEY_MAX];
        size_t data_len;
        uint8_t *data;
};

struct hsm_sesscache {
        char *name;                  /* listener, for the metrics; fixed */
        struct hsm_sesscache *rnext; /* registry (reg_lock) */
        pthread_mutex_t lock;
        uint64_t hits, misses, stores, evicted, expired; /* lock */
        struct entry **buckets;
        unsigned n_buckets; /* a power of two */
        unsigned n, max;
        unsigned lifetime_s;
        struct entry *head, *tail;
        uint8_t seed[16];
};

/* Every cache, for hsm_sesscache_foreach (admin /metrics). */
static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static hsm_sesscache *reg_head;

static uint64_t now_s(void)
{
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t)ts.tv_sec;
}

/* FNV-1a over a random per-cache seed and the key: session IDs are chosen
 * by GnuTLS (random), the seed keeps chains short even if they were not. */
static uint32_t hash_of(const hsm_sesscache *sc, const uint8_t *k, size_t len)
{
        uint32_t h = 2166136261u;
        for (size_t i = 0; i < sizeof(sc->seed); i++)
                h = (h ^ sc->seed[i]) * 16777619u;
        for (size_t i = 0; i < len; i++)
                h = (h ^ k[i]) * 16777619u;
        return h;
}

int hsm_sesscache_new(const char *name, unsigned max_entries, unsigned lifetime_s, hsm_sesscache **ret)
{
        if (max_entries == 0)
                return -EINVAL;
        hsm_sesscache *sc = calloc(1, sizeof(*sc));
        if (!sc || !(sc->name = strdup(name ? name : ""))) {
                free(sc);
                return -ENOMEM;
        }
        sc->max = max_entries;
        sc->lifetime_s = lifetime_s;
        sc->n_buckets = 16;
        while (sc->n_buckets < max_entries && sc->n_buckets < (1u << 24))
                sc->n_buckets <<= 1;
        sc->buckets = calloc(sc->n_buckets, sizeof(*sc->buckets));
        if (!sc->buckets || gnutls_rnd(GNUTLS_RND_NONCE, sc->seed, sizeof(sc->seed)) < 0) {
                free(sc->buckets);
                free(sc->name);
                free(sc);
                return -ENOMEM;
        }
        pthread_mutex_init(&sc->lock, NULL);
        pthread_mutex_lock(&reg_lock);
        hsm_sesscache **pp = &reg_head;
        while (*pp)
                pp = &(*pp)->rnext;
        *pp = sc;
        pthread_mutex_unlock(&reg_lock);
        *ret = sc;
        return 0;
}

static void lru_unlink(hsm_sesscache *sc, struct entry *e)
{
        if (e->prev)
                e->prev->next = e->next;
        else
                sc->head = e->next;
        if (e->next)
                e->next->prev = e->prev;
        else
                sc->tail = e->prev;
        e->prev = e->next = NULL;
}

static void lru_push(hsm_sesscache *sc, struct entry *e)
{
        e->prev = NULL;
        e->next = sc->head;
        if (sc->head)
                sc->head->prev = e;
        sc->head = e;
        if (!sc->tail)
                sc->tail = e;
}

static void entry_free(struct entry *e)
{
        gnutls_memset(e->data, 0, e->data_len);
        free(e->data);
        free(e);
}

/* Removes e from the table and the list and frees it (under lock). */
static void drop(hsm_sesscache *sc, struct entry *e)
{
        struct entry **pp = &sc->buckets[e->hash & (sc->n_buckets - 1)];
        while (*pp != e)
                pp = &(*pp)->hnext;
        *pp = e->hnext;
        lru_unlink(sc, e);
        sc->n--;
        entry_free(e);
}

static struct entry *find(hsm_sesscache *sc, const gnutls_datum_t *key, uint32_t h)
{
        for (struct entry *e = sc->buckets[h & (sc->n_buckets - 1)]; e; e = e->hnext)
                if (e->hash == h && e->key_len == key->size && memcmp(e->key, key->data, key->size) == 0)
                        return e;
        return NULL;
}

static int store(void *ptr, gnutls_datum_t key, gnutls_datum_t data)
{
        hsm_sesscache *sc = ptr;
        if (key.size == 0 || key.size > KEY_MAX)
                return -1;
        struct entry *e = calloc(1, sizeof(*e));
        if (!e || !(e->data = malloc(data.size ? data.size : 1))) {
                free(e);
                return -1;
        }
        memcpy(e->data, data.data, data.size);
        e->data_len = data.size;
        memcpy(e->key, key.data, key.size);
        e->key_len = (uint8_t)key.size;
        e->hash = hash_of(sc, key.data, key.size);
        e->born_s = now_s();
        pthread_mutex_lock(&sc->lock);
        struct entry *old = find(sc, &key, e->hash);
        if (old)
                drop(sc, old);
        /* Expired ones at the tail first, then the least recently used. */
        while (sc->tail && (sc->n >= sc->max || e->born_s - sc->tail->born_s > sc->lifetime_s)) {
                if (e->born_s - sc->tail->born_s > sc->lifetime_s)
                        sc->expired++;
                else
                        sc->evicted++;
                drop(sc, sc->tail);
        }
        sc->stores++;
        struct entry **b = &sc->buckets[e->hash & (sc->n_buckets - 1)];
        e->hnext = *b;
        *b = e;
        lru_push(sc, e);
        sc->n++;
        pthread_mutex_unlock(&sc->lock);
        return 0;
}

static gnutls_datum_t retrieve(void *ptr, gnutls_datum_t key)
{
        hsm_sesscache *sc = ptr;
        gnutls_datum_t out = { NULL, 0 };
        if (key.size == 0 || key.size > KEY_MAX)
                return out;
        uint32_t h = hash_of(sc, key.data, key.size);
        pthread_mutex_lock(&sc->lock);
        struct entry *e = find(sc, &key, h);
        if (e && now_s() - e->born_s > sc->lifetime_s) {
                drop(sc, e);
                sc->expired++;
                e = NULL;
        }
        if (e)
                sc->hits++;
        else
                sc->misses++;
        if (e && (out.data = gnutls_malloc(e->data_len ? e->data_len : 1))) {
                memcpy(out.data, e->data, e->data_len);
                out.size = (unsigned)e->data_len;
                lru_unlink(sc, e);
                lru_push(sc, e);
        }
        pthread_mutex_unlock(&sc->lock);
        return out;
}

static int remove_fn(void *ptr, gnutls_datum_t key)
{
        hsm_sesscache *sc = ptr;
        if (key.size == 0 || key.size > KEY_MAX)
                return -1;
        uint32_t h = hash_of(sc, key.data, key.size);
        pthread_mutex_lock(&sc->lock);
        struct entry *e = find(sc, &key, h);
        if (e)
                drop(sc, e);
        pthread_mutex_unlock(&sc->lock);
        return e ? 0 : -1;
}

void hsm_sesscache_attach(hsm_sesscache *sc, gnutls_session_t session)
{
        gnutls_db_set_retrieve_function(session, retrieve);
        gnutls_db_set_store_function(session, store);
        gnutls_db_set_remove_function(session, remove_fn);
        gnutls_db_set_ptr(session, sc);
}

unsigned hsm_sesscache_count(hsm_sesscache *sc)
{
        pthread_mutex_lock(&sc->lock);
        unsigned n = sc->n;
        pthread_mutex_unlock(&sc->lock);
        return n;
}

void hsm_sesscache_stats_get(hsm_sesscache *sc, hsm_sesscache_stats *ret)
{
        pthread_mutex_lock(&sc->lock);
        *ret = (hsm_sesscache_stats){ .hits = sc->hits, .misses = sc->misses, .stores = sc->stores, .evicted = sc->evicted,
                                      .expired = sc->expired, .entries = sc->n, .max_entries = sc->max };
        pthread_mutex_unlock(&sc->lock);
}

void hsm_sesscache_foreach(void (*fn)(const char *name, const hsm_sesscache_stats *st, void *ud), void *ud)
{
        pthread_mutex_lock(&reg_lock);
        for (hsm_sesscache *sc = reg_head; sc; sc = sc->rnext) {
                hsm_sesscache_stats st;
                hsm_sesscache_stats_get(sc, &st);
                fn(sc->name, &st, ud);
        }
        pthread_mutex_unlock(&reg_lock);
}

void hsm_sesscache_free(hsm_sesscache *sc)
{
        if (!sc)
                return;
        pthread_mutex_lock(&reg_lock);
        for (hsm_sesscache **pp = &reg_head; *pp; pp = &(*pp)->rnext)
                if (*pp == sc) {
                        *pp = sc->rnext;
                        break;
                }
        pthread_mutex_unlock(&reg_lock);
        while (sc->head)
                drop(sc, sc->head);
        free(sc->buckets);
        free(sc->name);
        pthread_mutex_destroy(&sc->lock);
        free(sc);
}
