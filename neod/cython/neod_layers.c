/* See neod_layers.h. */
#define _GNU_SOURCE
#include "neod_layers.h"

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static int64_t clock_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Polls *flag until it equals value; 0, or -3 once timeout_ns has passed. */
static int wait_flag(const uint32_t *flag, uint32_t value, int64_t timeout_ns) {
    int64_t deadline = clock_ns() + timeout_ns;
    for (;;) {
        for (int i = 0; i < 256; i++) {
            if (__atomic_load_n(flag, __ATOMIC_ACQUIRE) == value) return 0;
            relax();
        }
        if (clock_ns() > deadline) return -3;
    }
}

/* Row chunks per worker, at most: as in the decode split (neod_decode.c), a worker slowed by
 * whatever shares its core takes fewer chunks instead of pacing the layer. */
#define STORE_CHUNKS_PER_WORKER 4

typedef struct {
    const struct NeodFlight *flight;
    char *kv; /* this layer of the pool */
    int64_t row_bytes; /* one token's K (or V): num_kv_heads * head_dim elements */
    int64_t chunk_rows; /* rows a worker claims at a time */
    atomic_llong next_row; /* the first row not claimed yet */
    atomic_llong worker_ns; /* time in store_task, summed over the workers */
} store_job;

/* Copies claimed chunks of the staged prefill rows into their slots, K and V, every head, until
 * none is left. */
static void store_task(void *ctx, int t) {
    (void)t;
    store_job *job = ctx;
    const struct NeodFlight *f = job->flight;
    const struct NeodDecodeArgs *a = &f->decode;
    int64_t n = f->num_prefill, step = job->chunk_rows;
    int64_t first = atomic_fetch_add_explicit(&job->next_row, step, memory_order_relaxed);
    if (first >= n) return;
    int64_t start = clock_ns();
    int64_t head_bytes = (int64_t)a->head_dim * 2;
    int64_t tile_bytes = (int64_t)a->block_size * head_bytes; /* one head of one block */
    for (; first < n; first = atomic_fetch_add_explicit(&job->next_row, step, memory_order_relaxed)) {
        int64_t last = first + step < n ? first + step : n;
        for (int64_t r = first; r < last; r++) {
            int64_t block = f->prefill_slots[r] / a->block_size;
            int64_t offset = f->prefill_slots[r] % a->block_size;
            for (int64_t kv = 0; kv < 2; kv++) {
                const char *src = (const char *)(kv ? f->prefill_v : f->prefill_k) + r * job->row_bytes;
                char *dst = job->kv + ((block * 2 + kv) * a->num_kv_heads) * tile_bytes +
                            offset * head_bytes;
                for (int64_t h = 0; h < a->num_kv_heads; h++)
                    memcpy(dst + h * tile_bytes, src + h * head_bytes, head_bytes);
            }
        }
    }
    atomic_fetch_add_explicit(&job->worker_ns, clock_ns() - start, memory_order_relaxed);
}

static int check_prefill(const struct NeodFlight *f, int index, char *err, size_t err_len) {
    const struct NeodDecodeArgs *a = &f->decode;
    if (f->num_prefill == 0) return 0;
    if (f->num_prefill < 0 || f->prefill_k == NULL || f->prefill_v == NULL || f->prefill_slots == NULL) {
        snprintf(err, err_len, "flight %d: prefill rows need K, V and slots", index);
        return -1;
    }
    int64_t capacity = a->num_blocks * a->block_size;
    for (int32_t r = 0; r < f->num_prefill; r++) {
        if (f->prefill_slots[r] < 0 || f->prefill_slots[r] >= capacity) {
            snprintf(err, err_len, "flight %d: prefill slot %lld is outside [0, %lld)", index,
                     (long long)f->prefill_slots[r], (long long)capacity);
            return -1;
        }
    }
    return 0;
}

static void release_all(const struct NeodFlight *flights, int num_flights, int num_layers,
                        uint32_t seq) {
    for (int i = 0; i < num_flights; i++)
        for (int l = 0; l < num_layers; l++) __atomic_store_n(&flights[i].done[l], seq, __ATOMIC_RELEASE);
}

int neod_decode_layers(neod_pool *pool, const struct NeodFlight *flights, int num_flights,
                       int num_layers, int64_t layer_bytes, uint32_t seq, int64_t timeout_ns,
                       int64_t *busy_ns, int64_t *worker_ns, char *err, size_t err_len) {
    *busy_ns = 0;
    *worker_ns = 0;
    if (num_flights < 1 || num_flights > NEOD_MAX_FLIGHTS || num_layers < 1) {
        snprintf(err, err_len, "need 1 to %d flights and at least one layer", NEOD_MAX_FLIGHTS);
        return -1;
    }
    neod_decode_plan *plans[NEOD_MAX_FLIGHTS] = {0};
    size_t offsets[NEOD_MAX_FLIGHTS + 1] = {0};
    for (int i = 0; i < num_flights; i++)
        offsets[i + 1] = offsets[i] + (flights[i].decode.batch > 0
                                            ? neod_decode_plan_bytes(pool, &flights[i].decode)
                                            : 0);
    char *memory = neod_pool_workspace(pool, offsets[num_flights] + 64);
    int rc = memory == NULL ? -2 : 0;
    for (int i = 0; rc == 0 && i < num_flights; i++) {
        rc = check_prefill(&flights[i], i, err, err_len);
        if (rc == 0 && flights[i].decode.batch > 0) {
            plans[i] = neod_decode_plan_init(pool, &flights[i].decode, memory + offsets[i], err,
                                             err_len);
            if (plans[i] == NULL) rc = -1;
        }
    }
    if (rc != 0) {
        release_all(flights, num_flights, num_layers, seq);
        return rc;
    }

    neod_pool_hold(pool, 1);
    int threads = neod_pool_size(pool);
    for (int l = 0; rc == 0 && l < num_layers; l++) {
        for (int i = 0; rc == 0 && i < num_flights; i++) {
            const struct NeodFlight *f = &flights[i];
            if (wait_flag(&f->ready[l], seq, timeout_ns) != 0) {
                snprintf(err, err_len, "layer %d of flight %d: its inputs did not arrive within %.1f s",
                         l, i, (double)timeout_ns * 1e-9);
                rc = -3;
                break;
            }
            int64_t start = clock_ns();
            char *kv = (char *)f->decode.kv + (int64_t)l * layer_bytes;
            if (f->num_prefill > 0) {
                int64_t chunks = (int64_t)threads * STORE_CHUNKS_PER_WORKER;
                store_job job = {f, kv, (int64_t)f->decode.num_kv_heads * f->decode.head_dim * 2,
                                 (f->num_prefill + chunks - 1) / chunks};
                atomic_init(&job.next_row, 0);
                atomic_init(&job.worker_ns, 0);
                neod_pool_run(pool, store_task, &job);
                *worker_ns += atomic_load(&job.worker_ns);
            }
            if (plans[i] != NULL) {
                int64_t run_ns;
                rc = neod_decode_plan_run(pool, plans[i], kv, &run_ns);
                *worker_ns += run_ns;
            }
            __atomic_store_n(&f->done[l], seq, __ATOMIC_RELEASE);
            *busy_ns += clock_ns() - start;
        }
    }
    neod_pool_hold(pool, 0);
    if (rc != 0) release_all(flights, num_flights, num_layers, seq);
    return rc;
}
