/* See neod_layers.h.
 *
 * The call is a sequence of steps, step j = layer j / F of flight j % F (F flights). A step's
 * units are its staged prefill rows in chunks, then its decode shares (neod_decode.h); a step
 * with neither has one empty unit, so that its done flag still follows its ready flag. Every
 * worker walks the steps in order: it waits for the step's ready flag, claims units until none is
 * left, and moves on. The worker that finishes a step's last unit sets its done flag.
 *
 * A worker enters step j only once step j - 2 is done. Since every worker passes through every
 * step, all steps before j - 1 are then done: steps j - 1 and j are the only ones in flight. So
 * two partial buffers (step parity) serve every split request, and each step has its own split
 * countdowns, armed before the call. */
#define _GNU_SOURCE
#include "neod_layers.h"
#include "neod_amx.h"

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

/* Row chunks per worker, at most: as in the decode split (neod_decode.c), a worker slowed by
 * whatever shares its core takes fewer chunks instead of pacing the layer. */
#define STORE_CHUNKS_PER_WORKER 4

typedef struct {
    /* Written by the workers during the call, on a cache line of their own. */
    _Alignas(64) atomic_int next_unit; /* the first unit not claimed yet */
    atomic_int remaining;              /* units not finished: the step is done at 0 */
    atomic_llong start_ns;             /* when its earliest unit began */
    atomic_llong end_ns;               /* when its last unit finished */
    /* Read-only during the call. */
    _Alignas(64) struct NeodDecodeArgs args; /* the flight's batch, kv at this layer */
    const struct NeodFlight *flight;
    const neod_decode_plan *plan; /* NULL where the flight has no decode rows */
    struct NeodDecodeRun run;
    char *kv;                     /* this layer of the pool */
    int64_t row_bytes;            /* one staged prefill token's K (or V) */
    int64_t rows_per_unit;        /* staged prefill rows per store unit */
    int layer;
    int store_units;
    int num_units;
} step;

typedef struct {
    neod_pool *pool;
    step *steps;
    int num_steps;
    uint32_t seq;
    int64_t timeout_ns;
    size_t scratch_bytes; /* per worker, for the largest plan; 0 without decode rows */
    int amx;              /* some plan uses AMX tiles */
    atomic_int failed;    /* 0, or the return code that stops every worker (-2, -3) */
    int failed_step;      /* the step whose ready flag did not come (-3) */
    atomic_llong worker_ns;
} program;

/* Stops every worker with rc, unless another failure came first. */
static void fail(program *p, int rc, int step_index) {
    int expected = 0;
    if (atomic_compare_exchange_strong(&p->failed, &expected, rc)) p->failed_step = step_index;
}

static int failed(program *p) { return atomic_load_explicit(&p->failed, memory_order_relaxed); }

/* Polls step j's ready flag: 0 once it is set, -1 on a failure or once timeout_ns has passed. */
static int wait_ready(program *p, int j) {
    const step *s = &p->steps[j];
    const uint32_t *flag = &s->flight->ready[s->layer];
    int64_t deadline = clock_ns() + p->timeout_ns;
    for (;;) {
        for (int i = 0; i < 256; i++) {
            if (__atomic_load_n(flag, __ATOMIC_ACQUIRE) == p->seq) return 0;
            relax();
        }
        if (failed(p)) return -1;
        if (clock_ns() > deadline) {
            fail(p, -3, j);
            return -1;
        }
    }
}

/* Polls until step s is done: 0, or -1 on a failure (its units then may never finish). */
static int wait_done(program *p, step *s) {
    for (;;) {
        for (int i = 0; i < 256; i++) {
            if (atomic_load_explicit(&s->remaining, memory_order_acquire) == 0) return 0;
            relax();
        }
        if (failed(p)) return -1;
    }
}

/* Copies staged prefill rows [first, last) into their slots, K and V, every head. */
static void store_rows(const step *s, int64_t first, int64_t last) {
    const struct NeodFlight *f = s->flight;
    const struct NeodDecodeArgs *a = &f->decode;
    int64_t head_bytes = (int64_t)a->head_dim * 2;
    int64_t tile_bytes = (int64_t)a->block_size * head_bytes; /* one head of one block */
    for (int64_t r = first; r < last; r++) {
        int64_t block = f->prefill_slots[r] / a->block_size;
        int64_t offset = f->prefill_slots[r] % a->block_size;
        for (int64_t kv = 0; kv < 2; kv++) {
            const char *src = (const char *)(kv ? f->prefill_v : f->prefill_k) + r * s->row_bytes;
            char *dst = s->kv + ((block * 2 + kv) * a->num_kv_heads) * tile_bytes +
                        offset * head_bytes;
            for (int64_t h = 0; h < a->num_kv_heads; h++)
                memcpy(dst + h * tile_bytes, src + h * head_bytes, head_bytes);
        }
    }
}

static void run_unit(const step *s, int unit, float *scratch) {
    if (unit < s->store_units) {
        int64_t first = (int64_t)unit * s->rows_per_unit;
        int64_t last = first + s->rows_per_unit;
        store_rows(s, first, last < s->flight->num_prefill ? last : s->flight->num_prefill);
    } else if (s->plan != NULL) {
        neod_decode_share(s->plan, &s->args, unit - s->store_units, scratch, &s->run);
    }
}

static void program_task(void *ctx, int t) {
    program *p = ctx;
    float *scratch = NULL;
    if (p->scratch_bytes > 0) scratch = neod_pool_scratch(p->pool, t, p->scratch_bytes);
    if (p->scratch_bytes > 0 && scratch == NULL) {
        fail(p, -2, -1);
        return;
    }
    if (p->amx) neod_amx_configure();
    int64_t worked = 0;
    for (int j = 0; j < p->num_steps; j++) {
        step *s = &p->steps[j];
        if (j >= 2 && wait_done(p, &p->steps[j - 2]) != 0) break;
        if (wait_ready(p, j) != 0) break;
        for (;;) {
            int unit = atomic_fetch_add_explicit(&s->next_unit, 1, memory_order_relaxed);
            if (unit >= s->num_units) break;
            int64_t begin = clock_ns();
            long long first = atomic_load_explicit(&s->start_ns, memory_order_relaxed);
            while ((first == 0 || begin < first) &&
                   !atomic_compare_exchange_weak(&s->start_ns, &first, begin)) {
            }
            run_unit(s, unit, scratch);
            worked += clock_ns() - begin;
            if (atomic_fetch_sub_explicit(&s->remaining, 1, memory_order_acq_rel) == 1) {
                /* After every other unit's end: theirs were taken before their countdowns. */
                atomic_store_explicit(&s->end_ns, clock_ns(), memory_order_relaxed);
                __atomic_store_n(&s->flight->done[s->layer], p->seq, __ATOMIC_RELEASE);
            }
        }
    }
    if (p->amx) neod_amx_release();
    atomic_fetch_add_explicit(&p->worker_ns, worked, memory_order_relaxed);
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

/* Time during which some step was being computed: the union of the finished steps' intervals
 * (their starts come in step order, their ends need not). */
static int64_t busy_time(const step *steps, int num_steps) {
    int64_t busy = 0, covered = 0;
    for (int j = 0; j < num_steps; j++) {
        if (atomic_load(&steps[j].remaining) != 0) continue;
        int64_t start = atomic_load(&steps[j].start_ns), end = atomic_load(&steps[j].end_ns);
        if (start < covered) start = covered;
        if (end > start) busy += end - start;
        if (end > covered) covered = end;
    }
    return busy;
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
    int threads = neod_pool_size(pool);
    int num_steps = num_layers * num_flights;
    /* The two partial buffers fit the widest flight; countdowns come per step. */
    struct NeodDecodeArgs widest = {0};
    size_t plan_bytes = 0;
    for (int i = 0; i < num_flights; i++) {
        const struct NeodDecodeArgs *a = &flights[i].decode;
        if (a->batch <= 0) continue;
        plan_bytes += neod_decode_plan_bytes(pool, a);
        if (a->num_q_heads > widest.num_q_heads) widest.num_q_heads = a->num_q_heads;
        if (a->head_dim > widest.head_dim) widest.head_dim = a->head_dim;
    }
    size_t run_bytes = widest.num_q_heads > 0 ? neod_decode_run_bytes(pool, &widest) : 0;
    size_t countdowns = (size_t)threads * NEOD_SHARES_PER_WORKER;
    size_t bytes = plan_bytes + 2 * run_bytes + (size_t)num_steps * sizeof(step) +
                   (size_t)num_steps * countdowns * sizeof(int) + 64 * 4;
    char *cursor = neod_pool_workspace(pool, bytes);
    if (cursor == NULL) {
        release_all(flights, num_flights, num_layers, seq);
        return -2;
    }
    program p = {.pool = pool, .num_steps = num_steps, .seq = seq, .timeout_ns = timeout_ns};
    neod_decode_plan *plans[NEOD_MAX_FLIGHTS] = {0};
    int rc = 0;
    for (int i = 0; rc == 0 && i < num_flights; i++) {
        rc = check_prefill(&flights[i], i, err, err_len);
        if (rc != 0 || flights[i].decode.batch <= 0) continue;
        void *memory = neod_pool_take(&cursor, neod_decode_plan_bytes(pool, &flights[i].decode));
        plans[i] = neod_decode_plan_init(pool, &flights[i].decode, memory, err, err_len);
        if (plans[i] == NULL) {
            rc = -1;
            break;
        }
        size_t scratch = neod_decode_scratch_bytes(plans[i]);
        if (scratch > p.scratch_bytes) p.scratch_bytes = scratch;
        p.amx |= neod_decode_plan_uses_amx(plans[i]);
    }
    if (rc != 0) {
        release_all(flights, num_flights, num_layers, seq);
        return rc;
    }
    struct NeodDecodeRun parity[2] = {{0}};
    for (int k = 0; run_bytes > 0 && k < 2; k++)
        parity[k] = neod_decode_run_init(pool, &widest, neod_pool_take(&cursor, run_bytes));
    p.steps = neod_pool_take(&cursor, (size_t)num_steps * sizeof(step));
    int *split_remaining = neod_pool_take(&cursor, (size_t)num_steps * countdowns * sizeof(int));

    int64_t store_chunks = (int64_t)threads * STORE_CHUNKS_PER_WORKER;
    for (int j = 0; j < num_steps; j++) {
        const struct NeodFlight *f = &flights[j % num_flights];
        step *s = &p.steps[j];
        s->flight = f;
        s->layer = j / num_flights;
        s->plan = plans[j % num_flights];
        s->kv = (char *)f->decode.kv + (int64_t)s->layer * layer_bytes;
        s->args = f->decode;
        s->args.kv = s->kv;
        s->row_bytes = (int64_t)f->decode.num_kv_heads * f->decode.head_dim * 2;
        s->rows_per_unit =
            f->num_prefill > 0 ? (f->num_prefill + store_chunks - 1) / store_chunks : 0;
        s->store_units = f->num_prefill > 0
                             ? (int)((f->num_prefill + s->rows_per_unit - 1) / s->rows_per_unit)
                             : 0;
        s->num_units = s->store_units + (s->plan != NULL ? neod_decode_plan_shares(s->plan) : 0);
        if (s->num_units == 0) s->num_units = 1;
        if (s->plan != NULL) {
            s->run = parity[j & 1];
            s->run.split_remaining = split_remaining + (size_t)j * countdowns;
            neod_decode_run_arm(s->plan, &s->run);
        }
        atomic_init(&s->next_unit, 0);
        atomic_init(&s->remaining, s->num_units);
        atomic_init(&s->start_ns, 0);
        atomic_init(&s->end_ns, 0);
    }
    atomic_init(&p.failed, 0);
    atomic_init(&p.worker_ns, 0);
    neod_pool_run(pool, program_task, &p);

    *busy_ns = busy_time(p.steps, num_steps);
    *worker_ns = atomic_load(&p.worker_ns);
    rc = atomic_load(&p.failed);
    if (rc == -3)
        snprintf(err, err_len, "layer %d of flight %d: its inputs did not arrive within %.1f s",
                 p.failed_step / num_flights, p.failed_step % num_flights,
                 (double)timeout_ns * 1e-9);
    if (rc != 0) release_all(flights, num_flights, num_layers, seq);
    return rc;
}
