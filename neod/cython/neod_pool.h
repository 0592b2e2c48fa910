/* A fixed set of worker threads, each pinned to one core, that run one task at a time.
 *
 * Why not OpenMP: its threads are unpinned, spin for long after a parallel region (stealing the
 * core of the thread that drives the GPU) and cannot be restarted with another core set. Here a
 * worker spins for a few tens of microseconds after a task (back-to-back calls arrive that close
 * together; an iteration's layers are one task, neod_layers.h) and then sleeps on a condition
 * variable.
 *
 * neod_pool_run is not reentrant: the caller serializes calls (the Cython binding holds a lock). */
#ifndef NEOD_POOL_H
#define NEOD_POOL_H

#include <stddef.h>

typedef struct neod_pool neod_pool;

/* Runs on every worker; thread_index in [0, num_threads). */
typedef void (*neod_task_fn)(void *ctx, int thread_index);

/* Starts one worker per entry of cores[], pinned to that core. Returns NULL and writes a message to
 * err on failure (no thread is left running). */
neod_pool *neod_pool_create(const int *cores, int num_threads, char *err, size_t err_len);

/* Stops and joins the workers and frees everything; pool may be NULL. */
void neod_pool_destroy(neod_pool *pool);

int neod_pool_size(const neod_pool *pool);

/* Kernel thread ids (gettid) of the workers, in thread_index order. */
void neod_pool_thread_ids(const neod_pool *pool, long *tids);

/* Runs fn(ctx, i) on every worker i and returns when all have returned. */
void neod_pool_run(neod_pool *pool, neod_task_fn fn, void *ctx);

/* Per-worker scratch of at least `bytes`, 64-byte aligned, kept between runs (first touched by the
 * worker, so it is local to its NUMA node). Only worker thread_index may call it, from inside a
 * task. NULL if out of memory. */
void *neod_pool_scratch(neod_pool *pool, int thread_index, size_t bytes);

/* Caller-side workspace of at least `bytes`, 64-byte aligned, kept between runs; only the thread
 * that calls neod_pool_run may use it, outside or around a run. NULL if out of memory. */
void *neod_pool_workspace(neod_pool *pool, size_t bytes);

/* Bump allocation inside a workspace: the region at *cursor, which then moves past it to the next
 * 64-byte boundary (so every region starts 64-byte aligned). */
static inline void *neod_pool_take(char **cursor, size_t bytes) {
    void *p = *cursor;
    *cursor += (bytes + 63) & ~(size_t)63;
    return p;
}

#endif
