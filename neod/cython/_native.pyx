# cython: language_level=3, boundscheck=False, wraparound=False
"""Binding of the pinned thread pool and the ISPC decode-attention driver.

Thin on purpose: callers (neod.kernels.cpu_attention, neod.cpu) validate tensors and pass raw
pointers and sizes. This layer checks what the C code relies on, serializes calls from several
Python threads with one lock (the pool runs one batch at a time), and releases the GIL while the
workers run, so the calling thread blocks without stopping the interpreter.
"""

import threading

from libc.stdint cimport int32_t, int64_t, uint32_t, uintptr_t
from libc.stdlib cimport free, malloc

DTYPE_FP16 = NEOD_DTYPE_FP16
DTYPE_BF16 = NEOD_DTYPE_BF16
HEAD_DIMS = (64, 128)
# bf16 batches may run their tile products on AMX (neod_amx.h) where the CPU and the OS allow.
AMX_SUPPORTED = bool(neod_amx_supported())
cdef NeodAmx _amx_scores = NEOD_AMX_OFF
cdef NeodAmx _amx_values = NEOD_AMX_OFF


def use_amx(bint enabled, bint values=True, bint soft=False):
    """Turns the AMX tile products on or off for later batches: the scores, and with `values` the
    weighted sums of V too. Returns whether they are on: never where the CPU or the OS lacks AMX,
    unless `soft` (software tiles, which run the AMX paths' operand layouts on any CPU; tests
    only). Both paths compute the same attention: the switch is for tests and benchmarks."""
    global _amx_scores, _amx_values
    cdef NeodAmx mode = NEOD_AMX_OFF
    if enabled and soft:
        mode = NEOD_AMX_SOFT
    elif enabled and AMX_SUPPORTED:
        mode = NEOD_AMX_TILES
    _amx_scores = mode
    _amx_values = mode if values else NEOD_AMX_OFF
    return mode != NEOD_AMX_OFF


def amx_in_use():
    """"scores+values", "scores" or None: the tile products later bf16 batches run on AMX (real
    or software tiles)."""
    if _amx_scores == NEOD_AMX_OFF:
        return None
    return "scores+values" if _amx_values != NEOD_AMX_OFF else "scores"


cdef _fill_args(NeodDecodeArgs *args, uintptr_t q, uintptr_t kv, uintptr_t block_tables,
                uintptr_t seq_lens, uintptr_t k_new, uintptr_t v_new, uintptr_t out,
                uintptr_t lse, int64_t num_blocks, int batch, int num_q_heads, int num_kv_heads,
                int head_dim, int block_size, int max_blocks, int dtype, float scale,
                int64_t q_stride, int64_t kv_new_stride):
    """Checks what the C code relies on and fills one batch's arguments."""
    # An empty batch (a flight that only stores prefill rows) dereferences none of its tensors,
    # whose empty storage may well be null.
    if kv == 0 or batch != 0 and (q == 0 or block_tables == 0 or seq_lens == 0 or out == 0):
        raise ValueError("q, kv, block_tables, seq_lens and out must be non-null")
    if (k_new == 0) != (v_new == 0):
        raise ValueError("k_new and v_new must be given together")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if dtype != NEOD_DTYPE_FP16 and dtype != NEOD_DTYPE_BF16:
        raise ValueError(f"unknown dtype code {dtype}")
    if (batch < 0 or num_blocks < 1 or block_size < 1 or (batch and max_blocks < 1)
            or num_kv_heads < 1
            or num_q_heads < num_kv_heads or num_q_heads % num_kv_heads != 0):
        raise ValueError("inconsistent sizes: batch >= 0, num_blocks, block_size, max_blocks "
                         ">= 1, and num_q_heads a multiple of num_kv_heads are required")
    if q_stride < <int64_t>num_q_heads * head_dim or (
            k_new != 0 and kv_new_stride < <int64_t>num_kv_heads * head_dim):
        raise ValueError("row strides must cover a row: q_stride >= num_q_heads * head_dim, "
                         "kv_new_stride >= num_kv_heads * head_dim")
    args.q = <const void *>q
    args.kv = <void *>kv
    args.block_tables = <const int32_t *>block_tables
    args.seq_lens = <const int32_t *>seq_lens
    args.k_new = <const void *>k_new
    args.v_new = <const void *>v_new
    args.out = <void *>out
    args.lse = <float *>lse
    args.num_blocks = num_blocks
    args.batch = batch
    args.num_q_heads = num_q_heads
    args.num_kv_heads = num_kv_heads
    args.head_dim = head_dim
    args.block_size = block_size
    args.max_blocks = max_blocks
    args.q_stride = q_stride
    args.kv_new_stride = kv_new_stride
    args.dtype = <NeodDtype>dtype
    args.scale = scale
    cdef int group = num_q_heads // num_kv_heads
    cdef bint bf16 = dtype == NEOD_DTYPE_BF16
    args.amx_scores = _amx_scores if bf16 and group <= NEOD_AMX_MAX_GROUP else NEOD_AMX_OFF
    args.amx_values = _amx_values if bf16 and group <= NEOD_AMX_MAX_VALUE_GROUP else NEOD_AMX_OFF


cdef class NativePool:
    cdef neod_pool *_pool
    cdef object _lock
    cdef tuple _cores
    cdef bint _closing

    def __cinit__(self, cores):
        cdef char err[256]
        cdef int i
        cdef int num_threads = len(cores)
        cdef int *c_cores
        self._lock = threading.Lock()
        self._cores = tuple(int(core) for core in cores)
        if num_threads < 1:
            raise ValueError("a pool needs at least one core")
        c_cores = <int *>malloc(num_threads * sizeof(int))
        if c_cores == NULL:
            raise MemoryError()
        for i in range(num_threads):
            c_cores[i] = self._cores[i]
        err[0] = 0
        with nogil:
            self._pool = neod_pool_create(c_cores, num_threads, err, sizeof(err))
        free(c_cores)
        if self._pool == NULL:
            raise OSError(err.decode(errors="replace"))

    def __dealloc__(self):
        if self._pool != NULL:
            neod_pool_destroy(self._pool)
            self._pool = NULL

    @property
    def cores(self):
        return self._cores

    @property
    def closed(self):
        return self._pool == NULL

    def close(self):
        cdef neod_pool *pool
        # Refuse new calls first: the lock is not fair, and callers in a loop would otherwise
        # keep taking it back before close gets it.
        self._closing = True
        with self._lock:
            pool = self._pool
            self._pool = NULL
            with nogil:
                neod_pool_destroy(pool)

    def thread_ids(self):
        cdef long tids[1024]
        with self._lock:
            self._check_open()
            if len(self._cores) > 1024:
                raise ValueError("more than 1024 workers")
            neod_pool_thread_ids(self._pool, tids)
            return [tids[i] for i in range(len(self._cores))]

    cdef _check_open(self):
        if self._pool == NULL or self._closing:
            raise RuntimeError("the CPU pool is closed")

    def decode(self, uintptr_t q, uintptr_t kv, uintptr_t block_tables, uintptr_t seq_lens,
               uintptr_t k_new, uintptr_t v_new, uintptr_t out, uintptr_t lse,
               int64_t num_blocks, int batch, int num_q_heads, int num_kv_heads, int head_dim,
               int block_size, int max_blocks, int dtype, float scale, int64_t q_stride,
               int64_t kv_new_stride):
        """One batch (neod_decode.h); returns the workers' seconds in it, summed over them."""
        cdef NeodDecodeArgs args
        cdef char err[512]
        cdef int rc = 0
        cdef int64_t worker_ns = 0
        _fill_args(&args, q, kv, block_tables, seq_lens, k_new, v_new, out, lse, num_blocks,
                   batch, num_q_heads, num_kv_heads, head_dim, block_size, max_blocks, dtype,
                   scale, q_stride, kv_new_stride)
        err[0] = 0
        with self._lock:
            self._check_open()
            with nogil:
                rc = neod_decode(self._pool, &args, &worker_ns, err, sizeof(err))
        if rc == -1:
            raise ValueError(err.decode(errors="replace"))
        if rc != 0:
            raise MemoryError("out of memory for the CPU attention workspace")
        return worker_ns * 1e-9

    def decode_layers(self, flights, int num_layers, int64_t layer_bytes, uint32_t seq,
                      double timeout_s):
        """Every layer of one iteration in one call (neod_layers.h); returns the busy seconds and
        the workers' seconds in that work, summed over them.

        flights: sequences of 25 ints/floats each: the 19 `decode` arguments with kv pointing
        at layer 0 and lse 0, then prefill_k, prefill_v, prefill_slots, num_prefill, ready, done.
        """
        cdef NeodFlight c_flights[NEOD_MAX_FLIGHTS]
        cdef NeodFlight *f
        cdef char err[512]
        cdef int rc = 0
        cdef int i
        cdef int n = len(flights)
        cdef int64_t busy_ns = 0
        cdef int64_t worker_ns = 0
        cdef int64_t timeout_ns = <int64_t>(timeout_s * 1e9)
        if not 1 <= n <= NEOD_MAX_FLIGHTS or num_layers < 1 or layer_bytes < 1 or timeout_s <= 0:
            raise ValueError(f"need 1 to {NEOD_MAX_FLIGHTS} flights, num_layers >= 1, "
                             "layer_bytes >= 1 and a positive timeout")
        for i in range(n):
            spec = flights[i]
            if len(spec) != 25:
                raise ValueError(f"flight {i} must have 25 fields, got {len(spec)}")
            f = &c_flights[i]
            _fill_args(&f.decode, spec[0], spec[1], spec[2], spec[3], spec[4], spec[5], spec[6],
                       spec[7], spec[8], spec[9], spec[10], spec[11], spec[12], spec[13],
                       spec[14], spec[15], spec[16], spec[17], spec[18])
            if spec[22] < 0 or (spec[22] > 0 and 0 in (spec[19], spec[20], spec[21])):
                raise ValueError(f"flight {i}: prefill rows need K, V and slots")
            if spec[23] == 0 or spec[24] == 0:
                raise ValueError(f"flight {i}: ready and done flags must be non-null")
            f.prefill_k = <const void *><uintptr_t>spec[19]
            f.prefill_v = <const void *><uintptr_t>spec[20]
            f.prefill_slots = <const int64_t *><uintptr_t>spec[21]
            f.num_prefill = spec[22]
            f.ready = <const uint32_t *><uintptr_t>spec[23]
            f.done = <uint32_t *><uintptr_t>spec[24]
        err[0] = 0
        with self._lock:
            self._check_open()
            with nogil:
                rc = neod_decode_layers(self._pool, c_flights, n, num_layers, layer_bytes, seq,
                                        timeout_ns, &busy_ns, &worker_ns, err, sizeof(err))
        if rc == -1:
            raise ValueError(err.decode(errors="replace"))
        if rc == -3:
            raise TimeoutError(err.decode(errors="replace"))
        if rc != 0:
            raise MemoryError("out of memory for the CPU attention workspace")
        return busy_ns * 1e-9, worker_ns * 1e-9

    def probe_read_bandwidth(self, size_t nbytes, thread_counts, int repeats):
        cdef int n = len(thread_counts)
        cdef int i
        cdef int rc = 0
        cdef int *counts
        cdef double *rates
        if repeats < 1 or n < 1 or nbytes < 4096:
            raise ValueError("need repeats >= 1, at least one thread count and >= 4096 bytes")
        counts = <int *>malloc(n * sizeof(int))
        rates = <double *>malloc(n * sizeof(double))
        if counts == NULL or rates == NULL:
            free(counts)
            free(rates)
            raise MemoryError()
        try:
            for i in range(n):
                counts[i] = thread_counts[i]
            with self._lock:
                self._check_open()
                with nogil:
                    rc = neod_probe_read_bandwidth(self._pool, nbytes, counts, n, repeats, rates)
            if rc == -1:
                raise ValueError(f"thread counts must be in [1, {len(self._cores)}]")
            if rc != 0:
                raise MemoryError(f"cannot allocate a {nbytes}-byte probe buffer")
            return [rates[i] for i in range(n)]
        finally:
            free(counts)
            free(rates)
