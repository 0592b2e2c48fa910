# C declarations of the pinned pool (neod_pool.h) and the decode driver (neod_decode.h).
from libc.stdint cimport int32_t, int64_t, uint32_t


cdef extern from "neod_pool.h" nogil:
    ctypedef struct neod_pool:
        pass

    neod_pool *neod_pool_create(const int *cores, int num_threads, char *err, size_t err_len)
    void neod_pool_destroy(neod_pool *pool)
    int neod_pool_size(const neod_pool *pool)
    void neod_pool_thread_ids(const neod_pool *pool, long *tids)


cdef extern from "neod_decode.h" nogil:
    cdef enum NeodDtype:
        NEOD_DTYPE_FP16
        NEOD_DTYPE_BF16

    cdef enum NeodAmx:
        NEOD_AMX_OFF
        NEOD_AMX_TILES
        NEOD_AMX_SOFT

    cdef struct NeodDecodeArgs:
        const void *q
        void *kv
        const int32_t *block_tables
        const int32_t *seq_lens
        const void *k_new
        const void *v_new
        void *out
        float *lse
        int64_t num_blocks
        int32_t batch
        int32_t num_q_heads
        int32_t num_kv_heads
        int32_t head_dim
        int32_t block_size
        int32_t max_blocks
        int64_t q_stride
        int64_t kv_new_stride
        NeodDtype dtype
        float scale
        NeodAmx amx_scores
        NeodAmx amx_values

    int neod_decode(neod_pool *pool, const NeodDecodeArgs *args, int64_t *worker_ns, char *err,
                    size_t err_len)
    int neod_probe_read_bandwidth(neod_pool *pool, size_t nbytes, const int *thread_counts,
                                  int num_counts, int repeats, double *rates)


cdef extern from "neod_amx.h" nogil:
    enum: NEOD_AMX_MAX_GROUP
    enum: NEOD_AMX_MAX_VALUE_GROUP
    int neod_amx_supported()


cdef extern from "neod_layers.h" nogil:
    enum: NEOD_MAX_FLIGHTS

    cdef struct NeodFlight:
        NeodDecodeArgs decode
        const void *prefill_k
        const void *prefill_v
        const int64_t *prefill_slots
        int32_t num_prefill
        const uint32_t *ready
        uint32_t *done

    int neod_decode_layers(neod_pool *pool, const NeodFlight *flights, int num_flights,
                           int num_layers, int64_t layer_bytes, uint32_t seq, int64_t timeout_ns,
                           int64_t *busy_ns, int64_t *worker_ns, char *err, size_t err_len)
