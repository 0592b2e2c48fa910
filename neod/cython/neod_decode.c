/* Decode attention and read-bandwidth probe on the pinned pool: see neod_decode.h.
 *
 * Work split: the batch's KV blocks (every block holds all KV heads of a layer, so blocks are KV
 * bytes) are dealt out in equal contiguous shares, walking the requests in order; a request that
 * straddles a share boundary becomes several pieces. There are a few shares per worker, and each
 * worker claims the next unclaimed share until none is left: a worker slowed by whatever shares
 * its core (the engine's threads, an SMT sibling, a VM neighbour) takes fewer shares instead of
 * setting the pace for all of them, as a fixed share per worker did. Pieces of one request are
 * merged by log-sum-exp by whichever worker finishes the last one (an atomic countdown), so the
 * workers never wait for each other. At most 2 * (shares - 1) pieces are partial, which bounds
 * every buffer. */
#define _GNU_SOURCE
#include "neod_decode.h"
#include "neod_amx.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* A share smaller than this many blocks costs more in hand-off and merging than it saves. */
#define MIN_BLOCKS_PER_SHARE 4
/* Score slots per online-softmax step: amortizes the per-head rescale over several blocks. */
#define CHUNK_TOKENS 64

typedef struct {
    int request;
    int first_partial;
    int num_partials;
} split_request;

struct neod_decode_plan {
    struct NeodDecodeArgs args; /* as validated; each run passes its own (its kv layer) */
    struct NeodWorkItem *items;
    int *item_split;   /* [num_items] index into splits, or -1 for a whole request */
    int *share_first; /* share s is items [share_first[s], share_first[s + 1]) */
    int num_shares;
    split_request *splits;
    int num_splits;
    size_t scratch_floats; /* per worker */
};

typedef struct {
    neod_pool *pool;
    const neod_decode_plan *plan;
    const struct NeodDecodeArgs *args;
    struct NeodDecodeRun run;
    atomic_int next_share;  /* the next share a worker may claim */
    atomic_int out_of_memory;
    atomic_llong worker_ns;  /* time in decode_task, summed over the workers */
} decode_job;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static size_t pad16(size_t n) { return (n + 15) & ~(size_t)15; }

/* Blocks per online-softmax step: at least CHUNK_TOKENS score slots (a block's slots are padded to
 * 16, the widest SIMD target's lane count). */
static int chunk_blocks(const struct NeodDecodeArgs *a) {
    size_t bs = pad16(a->block_size);
    return bs >= CHUNK_TOKENS ? 1 : (int)(CHUNK_TOKENS / bs);
}

/* Floats of the per-worker query region: the fp32 query, or with AMX scores the query pairs
 * ([num_kv_heads, head_dim / 2, 16], neod_amx.h), whichever is larger. */
static size_t query_floats(const struct NeodDecodeArgs *a) {
    size_t q = (size_t)a->num_q_heads * a->head_dim;
    size_t pairs = (size_t)a->num_kv_heads * a->head_dim * 8;
    return pad16(a->amx_scores != NEOD_AMX_OFF && pairs > q ? pairs : q);
}

/* Floats of the AMX operands and results (neod_amx.h), 0 without AMX: the score tiles
 * [4, 16, 16] fp32, then, in the same place, the values' probabilities [4, 2, 16, 16] uint32 and
 * sums [head_dim / 32, 16, 16] fp32. */
static size_t tile_floats(const struct NeodDecodeArgs *a) {
    size_t scores = a->amx_scores != NEOD_AMX_OFF ? NEOD_AMX_SCORE_TILES * 256 : 0;
    if (a->amx_values == NEOD_AMX_OFF) return scores;
    size_t values = NEOD_AMX_VALUE_STEPS * 512 + (size_t)a->head_dim / 32 * 256;
    return values > scores ? values : scores;
}

/* Floats of per-worker scratch (struct NeodScratch, each array a multiple of 16 floats). */
static size_t scratch_floats(const struct NeodDecodeArgs *a) {
    size_t hq = a->num_q_heads, bs = pad16(a->block_size);
    size_t part = 16 * (hq / (size_t)a->num_kv_heads) * bs;
    size_t scores = hq * bs * (size_t)chunk_blocks(a);
    return query_floats(a) + pad16(hq * a->head_dim) + 2 * pad16(hq) + scores + part +
           tile_floats(a);
}

/* Writes request b's new K and V (every KV head) at position seq_len - 1. */
static void append_new_kv(const struct NeodDecodeArgs *a, int b) {
    int pos = a->seq_lens[b] - 1;
    int64_t block = a->block_tables[(int64_t)b * a->max_blocks + pos / a->block_size];
    int64_t slot = pos % a->block_size;
    int64_t d = a->head_dim, hkv = a->num_kv_heads;
    int64_t tile = (int64_t)a->block_size * d;
    uint16_t *kv = a->kv;
    const uint16_t *k_new = (const uint16_t *)a->k_new + (int64_t)b * a->kv_new_stride;
    const uint16_t *v_new = (const uint16_t *)a->v_new + (int64_t)b * a->kv_new_stride;
    for (int64_t h = 0; h < hkv; h++) {
        memcpy(kv + ((block * 2 + 0) * hkv + h) * tile + slot * d, k_new + h * d, d * 2);
        memcpy(kv + ((block * 2 + 1) * hkv + h) * tile + slot * d, v_new + h * d, d * 2);
    }
}

size_t neod_decode_scratch_bytes(const neod_decode_plan *plan) {
    return plan->scratch_floats * sizeof(float);
}

int neod_decode_plan_shares(const neod_decode_plan *plan) { return plan->num_shares; }

int neod_decode_plan_uses_amx(const neod_decode_plan *plan) {
    return plan->args.amx_scores == NEOD_AMX_TILES || plan->args.amx_values == NEOD_AMX_TILES;
}

void neod_decode_run_arm(const neod_decode_plan *plan, struct NeodDecodeRun *run) {
    for (int s = 0; s < plan->num_splits; s++)
        run->split_remaining[s] = plan->splits[s].num_partials;
}

void neod_decode_share(const neod_decode_plan *plan, const struct NeodDecodeArgs *a, int share,
                       float *mem, const struct NeodDecodeRun *run) {
    size_t qf = query_floats(a), acc = pad16((size_t)a->num_q_heads * a->head_dim);
    size_t h = pad16(a->num_q_heads);
    size_t scores = (size_t)a->num_q_heads * pad16(a->block_size) * (size_t)chunk_blocks(a);
    size_t part = 16 * (size_t)(a->num_q_heads / a->num_kv_heads) * pad16(a->block_size);
    float *s = mem + qf + acc + 2 * h;
    float *tiles = tile_floats(a) ? s + scores + part : NULL;
    struct NeodScratch scratch = {mem, mem + qf, mem + qf + acc, mem + qf + acc + h, s,
                                  s + scores, tiles, chunk_blocks(a)};
    int append = a->k_new != NULL && a->v_new != NULL;
    for (int i = plan->share_first[share]; i < plan->share_first[share + 1]; i++) {
        const struct NeodWorkItem *item = &plan->items[i];
        int last_block = (a->seq_lens[item->request] - 1) / a->block_size;
        if (append && item->block_begin <= last_block && last_block < item->block_end)
            append_new_kv(a, item->request);
        neod_attend(a, item, &scratch, run->partial_out, run->partial_lse);
        int k = plan->item_split[i];
        if (k >= 0 && __atomic_fetch_sub(&run->split_remaining[k], 1, __ATOMIC_ACQ_REL) == 1) {
            const split_request *sp = &plan->splits[k];
            neod_merge_partials(a, sp->request, sp->first_partial, sp->num_partials,
                                run->partial_out, run->partial_lse);
        }
    }
}

static void decode_task(void *ctx, int t) {
    decode_job *job = ctx;
    int share = atomic_fetch_add_explicit(&job->next_share, 1, memory_order_relaxed);
    if (share >= job->plan->num_shares) return;
    int64_t start = now_ns();
    float *mem = neod_pool_scratch(job->pool, t, neod_decode_scratch_bytes(job->plan));
    if (mem == NULL) {
        atomic_store(&job->out_of_memory, 1);
        return;
    }
    int amx = neod_decode_plan_uses_amx(job->plan);
    if (amx) neod_amx_configure();
    for (; share < job->plan->num_shares;
         share = atomic_fetch_add_explicit(&job->next_share, 1, memory_order_relaxed))
        neod_decode_share(job->plan, job->args, share, mem, &job->run);
    if (amx) neod_amx_release();
    atomic_fetch_add_explicit(&job->worker_ns, now_ns() - start, memory_order_relaxed);
}

/* Checks every seq_len and every block id the batch will touch; returns its total block count. */
static int64_t validate(const struct NeodDecodeArgs *a, char *err, size_t err_len) {
    int64_t total = 0;
    int64_t capacity = (int64_t)a->max_blocks * a->block_size;
    for (int b = 0; b < a->batch; b++) {
        int64_t len = a->seq_lens[b];
        if (len < 1 || len > capacity) {
            snprintf(err, err_len, "seq_lens[%d] = %lld is outside [1, %lld] (max_blocks * block_size)",
                     b, (long long)len, (long long)capacity);
            return -1;
        }
        int64_t num = (len + a->block_size - 1) / a->block_size;
        const int32_t *row = a->block_tables + (int64_t)b * a->max_blocks;
        for (int64_t j = 0; j < num; j++) {
            if (row[j] < 0 || row[j] >= a->num_blocks) {
                snprintf(err, err_len, "block_tables[%d, %lld] = %d is not a block id in [0, %lld)",
                         b, (long long)j, row[j], (long long)a->num_blocks);
                return -1;
            }
        }
        total += num;
    }
    return total;
}

size_t neod_decode_plan_bytes(const neod_pool *pool, const struct NeodDecodeArgs *a) {
    size_t shares = (size_t)neod_pool_size(pool) * NEOD_SHARES_PER_WORKER;
    size_t max_items = (size_t)a->batch + shares;
    size_t sizes[] = {sizeof(struct neod_decode_plan), max_items * sizeof(struct NeodWorkItem),
                      max_items * sizeof(int), (shares + 1) * sizeof(int),
                      shares * sizeof(split_request)};
    size_t bytes = 0;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) bytes += (sizes[i] + 63) & ~(size_t)63;
    return bytes;
}

size_t neod_decode_run_bytes(const neod_pool *pool, const struct NeodDecodeArgs *a) {
    size_t shares = (size_t)neod_pool_size(pool) * NEOD_SHARES_PER_WORKER;
    size_t partials = 2 * shares, hq = a->num_q_heads, d = a->head_dim;
    size_t sizes[] = {partials * hq * d * sizeof(float), partials * hq * sizeof(float),
                      shares * sizeof(int)};
    size_t bytes = 0;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) bytes += (sizes[i] + 63) & ~(size_t)63;
    return bytes;
}

struct NeodDecodeRun neod_decode_run_init(const neod_pool *pool, const struct NeodDecodeArgs *a,
                                          void *memory) {
    size_t shares = (size_t)neod_pool_size(pool) * NEOD_SHARES_PER_WORKER;
    size_t partials = 2 * shares, hq = a->num_q_heads, d = a->head_dim;
    char *cursor = memory;
    struct NeodDecodeRun run;
    run.partial_out = neod_pool_take(&cursor, partials * hq * d * sizeof(float));
    run.partial_lse = neod_pool_take(&cursor, partials * hq * sizeof(float));
    run.split_remaining = neod_pool_take(&cursor, shares * sizeof(int));
    return run;
}

neod_decode_plan *neod_decode_plan_init(neod_pool *pool, const struct NeodDecodeArgs *a,
                                        void *memory, char *err, size_t err_len) {
    int64_t total = validate(a, err, err_len);
    if (total < 0) return NULL;
    int threads = neod_pool_size(pool);
    int max_shares = threads * NEOD_SHARES_PER_WORKER;
    int64_t shares = total / MIN_BLOCKS_PER_SHARE;
    if (shares < 1) shares = 1;
    if (shares > max_shares) shares = max_shares;
    /* Whole rounds: with workers at one speed a call ends when its busiest worker has done
     * ceil(shares / threads) shares. Three decodes of ~1100 tokens (207 blocks) on 14 threads
     * in 51 shares of ~4 blocks keep the busiest worker for 16 blocks; in 42 shares of ~5 every
     * worker reads 3 shares, ~15 blocks, the call's 207 / 14. It counts where a call starts
     * alone, as the engine's GPU-paced calls do; back to back, idle workers start the next. */
    if (shares > threads) shares -= shares % threads;
    size_t max_items = (size_t)a->batch + (size_t)max_shares;

    char *cursor = memory;
    neod_decode_plan *plan = neod_pool_take(&cursor, sizeof(*plan));
    plan->args = *a;
    plan->items = neod_pool_take(&cursor, max_items * sizeof(struct NeodWorkItem));
    plan->item_split = neod_pool_take(&cursor, max_items * sizeof(int));
    plan->share_first = neod_pool_take(&cursor, ((size_t)max_shares + 1) * sizeof(int));
    plan->splits = neod_pool_take(&cursor, (size_t)max_shares * sizeof(split_request));
    plan->num_shares = (int)shares;
    plan->scratch_floats = scratch_floats(a);
    struct NeodWorkItem *items = plan->items;
    int *item_split = plan->item_split;
    int *share_first = plan->share_first;

    /* Deal the blocks out: share s takes total / shares blocks (plus one for the first
     * total % shares shares), continuing where share s - 1 stopped. */
    int num_items = 0, b = 0;
    int64_t pos = 0;
    for (int t = 0; t < shares; t++) {
        share_first[t] = num_items;
        int64_t quota = total / shares + (t < total % shares);
        while (quota > 0) {
            int64_t num = (a->seq_lens[b] + a->block_size - 1) / a->block_size;
            int64_t n = num - pos < quota ? num - pos : quota;
            items[num_items] = (struct NeodWorkItem){b, (int32_t)pos, (int32_t)(pos + n), -1};
            item_split[num_items] = -1;
            num_items++;
            pos += n;
            quota -= n;
            if (pos == num) {
                b++;
                pos = 0;
            }
        }
    }
    share_first[shares] = num_items;

    /* Consecutive items of one request are its pieces: give them consecutive partial slots. */
    int num_splits = 0, num_partials = 0;
    for (int i = 0; i < num_items;) {
        int j = i + 1;
        while (j < num_items && items[j].request == items[i].request) j++;
        if (j - i > 1) {
            split_request *sp = &plan->splits[num_splits];
            sp->request = items[i].request;
            sp->first_partial = num_partials;
            sp->num_partials = j - i;
            for (int k = i; k < j; k++) {
                items[k].partial = num_partials++;
                item_split[k] = num_splits;
            }
            num_splits++;
        }
        i = j;
    }
    plan->num_splits = num_splits;
    return plan;
}

int neod_decode(neod_pool *pool, const struct NeodDecodeArgs *a, int64_t *worker_ns, char *err,
                size_t err_len) {
    *worker_ns = 0;
    if (a->batch == 0) return 0;
    size_t plan_bytes = neod_decode_plan_bytes(pool, a);
    char *memory = neod_pool_workspace(pool, plan_bytes + neod_decode_run_bytes(pool, a));
    if (memory == NULL) return -2;
    neod_decode_plan *plan = neod_decode_plan_init(pool, a, memory, err, err_len);
    if (plan == NULL) return -1;
    decode_job job = {.pool = pool, .plan = plan, .args = a,
                      .run = neod_decode_run_init(pool, a, memory + plan_bytes)};
    neod_decode_run_arm(plan, &job.run);
    atomic_init(&job.out_of_memory, 0);
    atomic_init(&job.worker_ns, 0);
    atomic_init(&job.next_share, 0);
    neod_pool_run(pool, decode_task, &job);
    *worker_ns = atomic_load(&job.worker_ns);
    return atomic_load(&job.out_of_memory) ? -2 : 0;
}

/* ---- read-bandwidth probe ------------------------------------------------------------------ */

typedef struct {
    float *data;
    size_t count;
    int num_workers; /* workers [0, num_workers) each take one even slice of the buffer */
    int touch;       /* write the slice (first touch) instead of reading it */
    float *sinks;    /* one per worker, 64 bytes apart: keeps the sums alive, no false sharing */
} probe_job;

static void probe_task(void *ctx, int t) {
    probe_job *job = ctx;
    if (t >= job->num_workers) return;
    size_t per = job->count / (size_t)job->num_workers;
    size_t begin = per * (size_t)t;
    size_t count = t == job->num_workers - 1 ? job->count - begin : per;
    if (job->touch)
        memset(job->data + begin, 0x3f, count * sizeof(float));
    else
        job->sinks[16 * t] = neod_read_sum(job->data + begin, (int64_t)count);
}

static double seconds_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int neod_probe_read_bandwidth(neod_pool *pool, size_t bytes, const int *thread_counts,
                              int num_counts, int repeats, double *rates) {
    int pool_size = neod_pool_size(pool);
    for (int i = 0; i < num_counts; i++)
        if (thread_counts[i] < 1 || thread_counts[i] > pool_size) return -1;
    size_t count = bytes / sizeof(float);
    float *data = aligned_alloc(64, (count * sizeof(float) + 63) & ~(size_t)63);
    float *sinks = aligned_alloc(64, (size_t)pool_size * 16 * sizeof(float));
    if (data == NULL || sinks == NULL) {
        free(data);
        free(sinks);
        return -2;
    }
    probe_job job = {data, count, pool_size, 1, sinks};
    neod_pool_run(pool, probe_task, &job);
    job.touch = 0;
    for (int i = 0; i < num_counts; i++) {
        job.num_workers = thread_counts[i];
        double best = 0.0;
        for (int r = 0; r < repeats; r++) {
            double start = seconds_now();
            neod_pool_run(pool, probe_task, &job);
            double rate = (double)(count * sizeof(float)) / (seconds_now() - start);
            if (rate > best) best = rate;
        }
        rates[i] = best;
    }
    free(sinks);
    free(data);
    return 0;
}
