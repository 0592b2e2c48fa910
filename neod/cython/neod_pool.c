/* Pinned worker pool: see neod_pool.h for the contract.
 *
 * Hand-off protocol: the caller publishes (fn, ctx), sets `remaining` to the worker count and bumps
 * `generation` under the mutex, then broadcasts `wake`. A worker polls `generation` for a while
 * and then sleeps on `wake`, always re-checking under the mutex, so no wake-up is lost. The worker
 * that brings `remaining` to zero broadcasts `done` under the mutex; the caller polls, then sleeps. */
#define _GNU_SOURCE
#include "neod_pool.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Poll this long before sleeping: covers the gap between back-to-back calls. */
#define SPIN_NS 50000L

typedef struct {
    neod_pool *pool;
    int index;
    int core;
    pthread_t thread;
    long tid;
    int pin_error; /* errno from pinning, 0 on success */
    void *scratch;
    size_t scratch_bytes;
} worker;

struct neod_pool {
    int num_threads;
    worker *workers;
    pthread_mutex_t mutex;
    pthread_cond_t wake;
    pthread_cond_t done;
    atomic_uint generation;
    atomic_int remaining;
    atomic_int stopping;
    int num_started; /* guarded by mutex */
    neod_task_fn fn;
    void *ctx;
    void *workspace;
    size_t workspace_bytes;
};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* Polls for up to SPIN_NS until generation differs from seen; returns the generation observed. */
static unsigned spin_for_generation(neod_pool *pool, unsigned seen) {
    long deadline = now_ns() + SPIN_NS;
    for (;;) {
        for (int i = 0; i < 64; i++) {
            unsigned gen = atomic_load_explicit(&pool->generation, memory_order_acquire);
            if (gen != seen) return gen;
            cpu_relax();
        }
        if (now_ns() > deadline) return seen;
    }
}

static void *worker_main(void *arg) {
    worker *w = arg;
    neod_pool *pool = w->pool;
    w->tid = (long)syscall(SYS_gettid);
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(w->core, &set);
    w->pin_error = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);

    pthread_mutex_lock(&pool->mutex);
    unsigned seen = atomic_load_explicit(&pool->generation, memory_order_relaxed);
    pool->num_started++;
    pthread_cond_broadcast(&pool->done);
    pthread_mutex_unlock(&pool->mutex);

    for (;;) {
        unsigned gen = spin_for_generation(pool, seen);
        if (gen == seen) {
            pthread_mutex_lock(&pool->mutex);
            while ((gen = atomic_load_explicit(&pool->generation, memory_order_acquire)) == seen)
                pthread_cond_wait(&pool->wake, &pool->mutex);
            pthread_mutex_unlock(&pool->mutex);
        }
        seen = gen;
        if (atomic_load_explicit(&pool->stopping, memory_order_acquire)) break;
        pool->fn(pool->ctx, w->index);
        if (atomic_fetch_sub_explicit(&pool->remaining, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&pool->mutex);
            pthread_cond_broadcast(&pool->done);
            pthread_mutex_unlock(&pool->mutex);
        }
    }
    return NULL;
}

/* Tells the started workers to exit and joins them. */
static void stop_workers(neod_pool *pool, int num_started) {
    pthread_mutex_lock(&pool->mutex);
    atomic_store_explicit(&pool->stopping, 1, memory_order_release);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mutex);
    for (int i = 0; i < num_started; i++) pthread_join(pool->workers[i].thread, NULL);
}

static void free_pool(neod_pool *pool) {
    for (int i = 0; i < pool->num_threads; i++) free(pool->workers[i].scratch);
    free(pool->workers);
    free(pool->workspace);
    pthread_cond_destroy(&pool->done);
    pthread_cond_destroy(&pool->wake);
    pthread_mutex_destroy(&pool->mutex);
    free(pool);
}

neod_pool *neod_pool_create(const int *cores, int num_threads, char *err, size_t err_len) {
    if (num_threads < 1 || num_threads > CPU_SETSIZE) {
        snprintf(err, err_len, "num_threads must be in [1, %d], got %d", CPU_SETSIZE, num_threads);
        return NULL;
    }
    for (int i = 0; i < num_threads; i++) {
        if (cores[i] < 0 || cores[i] >= CPU_SETSIZE) {
            snprintf(err, err_len, "core id %d out of range [0, %d)", cores[i], CPU_SETSIZE);
            return NULL;
        }
    }
    neod_pool *pool = calloc(1, sizeof(*pool));
    worker *workers = calloc((size_t)num_threads, sizeof(worker));
    if (pool == NULL || workers == NULL) {
        free(pool);
        free(workers);
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    pool->num_threads = num_threads;
    pool->workers = workers;
    pthread_mutex_init(&pool->mutex, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pthread_cond_init(&pool->done, NULL);
    atomic_init(&pool->generation, 0);
    atomic_init(&pool->remaining, 0);
    atomic_init(&pool->stopping, 0);

    /* Workers inherit a full signal mask: signals stay with the interpreter's threads. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int created = 0;
    int create_error = 0;
    for (; created < num_threads; created++) {
        worker *w = &workers[created];
        w->pool = pool;
        w->index = created;
        w->core = cores[created];
        create_error = pthread_create(&w->thread, NULL, worker_main, w);
        if (create_error != 0) break;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    pthread_mutex_lock(&pool->mutex);
    while (pool->num_started < created) pthread_cond_wait(&pool->done, &pool->mutex);
    pthread_mutex_unlock(&pool->mutex);

    if (create_error != 0) {
        snprintf(err, err_len, "cannot start worker thread %d: %s", created, strerror(create_error));
    } else {
        for (int i = 0; i < num_threads; i++) {
            if (workers[i].pin_error != 0) {
                snprintf(err, err_len, "cannot pin worker thread %d to core %d: %s", i,
                         workers[i].core, strerror(workers[i].pin_error));
                create_error = workers[i].pin_error;
                break;
            }
        }
    }
    if (create_error != 0) {
        stop_workers(pool, created);
        free_pool(pool);
        return NULL;
    }
    return pool;
}

void neod_pool_destroy(neod_pool *pool) {
    if (pool == NULL) return;
    stop_workers(pool, pool->num_threads);
    free_pool(pool);
}

int neod_pool_size(const neod_pool *pool) { return pool->num_threads; }

void neod_pool_thread_ids(const neod_pool *pool, long *tids) {
    for (int i = 0; i < pool->num_threads; i++) tids[i] = pool->workers[i].tid;
}

void neod_pool_run(neod_pool *pool, neod_task_fn fn, void *ctx) {
    pthread_mutex_lock(&pool->mutex);
    pool->fn = fn;
    pool->ctx = ctx;
    atomic_store_explicit(&pool->remaining, pool->num_threads, memory_order_relaxed);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mutex);

    long deadline = now_ns() + SPIN_NS;
    while (atomic_load_explicit(&pool->remaining, memory_order_acquire) != 0) {
        cpu_relax();
        if (now_ns() > deadline) {
            pthread_mutex_lock(&pool->mutex);
            while (atomic_load_explicit(&pool->remaining, memory_order_acquire) != 0)
                pthread_cond_wait(&pool->done, &pool->mutex);
            pthread_mutex_unlock(&pool->mutex);
            break;
        }
    }
}

/* Grows *buf to at least `bytes` (64-byte aligned, contents not kept). */
static void *grow(void **buf, size_t *have, size_t bytes) {
    if (*have >= bytes && *buf != NULL) return *buf;
    size_t want = (bytes + 63) & ~(size_t)63;
    void *p = aligned_alloc(64, want);
    if (p == NULL) return NULL;
    free(*buf);
    *buf = p;
    *have = want;
    return p;
}

void *neod_pool_scratch(neod_pool *pool, int thread_index, size_t bytes) {
    worker *w = &pool->workers[thread_index];
    return grow(&w->scratch, &w->scratch_bytes, bytes);
}

void *neod_pool_workspace(neod_pool *pool, size_t bytes) {
    return grow(&pool->workspace, &pool->workspace_bytes, bytes);
}
