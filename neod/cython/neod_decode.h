/* Paged decode attention and the memory-read probe, run on a neod_pool.
 *
 * neod_decode plans the batch in the calling thread (validation, and a split of the KV blocks into
 * equal shares, a few per worker, cutting long requests into pieces), then runs it on the pool:
 * each worker claims shares until none is left, appends the new K/V of the requests whose last
 * block a share holds, attends its pieces, and the worker that finishes the last piece of a split
 * request merges its partials. No barrier, no serial phase. */
#ifndef NEOD_DECODE_H
#define NEOD_DECODE_H

#include <stddef.h>
#include <stdint.h>

#include "decode_attention_ispc.h"
#include "neod_pool.h"

/* Shares per worker, at most: enough for the others to absorb one worker at half speed. A plan
 * has at most this many times the pool's size shares, and as many split requests. */
#define NEOD_SHARES_PER_WORKER 4

/* Returns 0 on success; -1 with a message in err if the arguments are invalid (nothing written),
 * -2 if out of memory. *worker_ns gets the workers' time in the call, summed over them: against
 * the pool's size times the call's length it tells how much of the pool computed, and how much
 * handed off or waited for the slowest worker. */
int neod_decode(neod_pool *pool, const struct NeodDecodeArgs *args, int64_t *worker_ns, char *err,
                size_t err_len);

/* A validated batch with its work split into shares, reusable for every layer of one iteration:
 * the block tables and lengths are the same in every layer, only the KV pool's layer changes. */
typedef struct neod_decode_plan neod_decode_plan;

/* Bytes of memory neod_decode_plan_init needs for this batch on this pool (64-byte multiples). */
size_t neod_decode_plan_bytes(const neod_pool *pool, const struct NeodDecodeArgs *args);

/* Validates args and plans the split inside `memory` (64-byte aligned, neod_decode_plan_bytes
 * long; the plan keeps pointing into it and at args' arrays). NULL with a message in err if the
 * arguments are invalid. */
neod_decode_plan *neod_decode_plan_init(neod_pool *pool, const struct NeodDecodeArgs *args,
                                        void *memory, char *err, size_t err_len);

/* What one run of a plan writes besides its output: the partial results of split requests and
 * their countdowns. Two runs in flight at once need one each. */
struct NeodDecodeRun {
    float *partial_out;   /* [2 * shares, num_q_heads, head_dim] */
    float *partial_lse;   /* [2 * shares, num_q_heads] */
    int *split_remaining; /* [shares] pieces of each split request not attended yet */
};

/* Bytes of one NeodDecodeRun for batches of this shape on this pool, and the run laid out in
 * `memory` (64-byte aligned, that long). */
size_t neod_decode_run_bytes(const neod_pool *pool, const struct NeodDecodeArgs *args);
struct NeodDecodeRun neod_decode_run_init(const neod_pool *pool, const struct NeodDecodeArgs *args,
                                          void *memory);

/* Sets the run's countdowns for one pass over the plan's shares; before the pass's first share. */
void neod_decode_run_arm(const neod_decode_plan *plan, struct NeodDecodeRun *run);

int neod_decode_plan_shares(const neod_decode_plan *plan);

/* Per-worker scratch bytes a share needs, and whether shares use AMX tiles (the worker then
 * configures them once, neod_amx_configure, before its first share). */
size_t neod_decode_scratch_bytes(const neod_decode_plan *plan);
int neod_decode_plan_uses_amx(const neod_decode_plan *plan);

/* Attends share `share` of the plan over `args` (the plan's batch, kv pointing at the layer to
 * read), from any worker, with `scratch` of neod_decode_scratch_bytes: appends the new K/V of the
 * requests whose last block the share holds, and merges a split request's pieces if this share
 * attended its last one. Shares of one armed run may run in any order on any workers. */
void neod_decode_share(const neod_decode_plan *plan, const struct NeodDecodeArgs *args, int share,
                       float *scratch, const struct NeodDecodeRun *run);

/* Memory-read bandwidth with 1..pool-size readers: for each thread_counts[i], the first
 * thread_counts[i] workers read a `bytes`-long buffer split evenly among them, `repeats` times;
 * rates[i] gets the best rate in bytes per second. The buffer is first touched by all workers (so
 * its pages spread like the KV pool's) and freed before return. Returns 0, -1 on a thread count
 * outside [1, pool size], -2 if out of memory. */
int neod_probe_read_bandwidth(neod_pool *pool, size_t bytes, const int *thread_counts,
                              int num_counts, int repeats, double *rates);

#endif
