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

/* Returns 0 on success; -1 with a message in err if the arguments are invalid (nothing written),
 * -2 if out of memory. *worker_ns as for neod_decode_plan_run. */
int neod_decode(neod_pool *pool, const struct NeodDecodeArgs *args, int64_t *worker_ns, char *err,
                size_t err_len);

/* A validated batch with its work split, reusable for every layer of one iteration: the block
 * tables and lengths are the same in every layer, only the KV pool's layer changes. */
typedef struct neod_decode_plan neod_decode_plan;

/* Bytes of memory neod_decode_plan_init needs for this batch on this pool (64-byte multiples). */
size_t neod_decode_plan_bytes(const neod_pool *pool, const struct NeodDecodeArgs *args);

/* Validates args and plans the split inside `memory` (64-byte aligned, neod_decode_plan_bytes
 * long; the plan keeps pointing into it and at args' arrays). NULL with a message in err if the
 * arguments are invalid. */
neod_decode_plan *neod_decode_plan_init(neod_pool *pool, const struct NeodDecodeArgs *args,
                                        void *memory, char *err, size_t err_len);

/* Runs a plan over the KV layer `kv`. 0 on success, -2 if out of memory. *worker_ns gets the
 * workers' time in the run, summed over them: against the pool's size times the run's length it
 * tells how much of the pool computed, and how much handed off or waited for the slowest worker. */
int neod_decode_plan_run(neod_pool *pool, neod_decode_plan *plan, void *kv, int64_t *worker_ns);

/* Memory-read bandwidth with 1..pool-size readers: for each thread_counts[i], the first
 * thread_counts[i] workers read a `bytes`-long buffer split evenly among them, `repeats` times;
 * rates[i] gets the best rate in bytes per second. The buffer is first touched by all workers (so
 * its pages spread like the KV pool's) and freed before return. Returns 0, -1 on a thread count
 * outside [1, pool size], -2 if out of memory. */
int neod_probe_read_bandwidth(neod_pool *pool, size_t bytes, const int *thread_counts,
                              int num_counts, int repeats, double *rates);

#endif
