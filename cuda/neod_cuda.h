/*
 * neod CUDA kernels: the C ABI.
 *
 * Every operation is one launcher taking raw device pointers, sizes, a dtype code and a
 * cudaStream_t, and returning a status code; nothing here knows about a framework, so the Python
 * side binds it with ctypes and the same library serves every model: head_dim and block_size pick
 * compiled specializations at run time, layer and head counts are plain arguments.
 *
 * Status: 0 success; negative values are neod errors (below); positive values are the
 * cudaError_t of the failed launch or copy (text from neod_cuda_error_string).
 * Layouts follow docs/architecture.md; "stride" arguments count elements, never bytes.
 */
#ifndef NEOD_CUDA_H_
#define NEOD_CUDA_H_

#include <cuda_runtime.h>
#include <stdint.h>

/* The library is built with hidden visibility; only these entry points are exported. */
#define NEOD_API __attribute__((visibility("default")))

#ifdef __cplusplus
extern "C" {
#endif

#define NEOD_OK 0
#define NEOD_ERR_INVALID_ARGUMENT (-1) /* a size, pointer or stride the kernel cannot accept */
#define NEOD_ERR_UNSUPPORTED (-2)      /* a dtype / head_dim / block_size with no specialization */
#define NEOD_ERR_WORKSPACE (-3)        /* the split-KV workspace is too small */
#define NEOD_ERR_DRIVER (-4)           /* a driver stream memory operation was refused */

#define NEOD_DTYPE_FLOAT32 0
#define NEOD_DTYPE_FLOAT16 1
#define NEOD_DTYPE_BFLOAT16 2

#define NEOD_SWAP_MEMCPY 0 /* copy engines: batched cudaMemcpyAsync over runs of block ids */
#define NEOD_SWAP_KERNEL 1 /* SM copy kernel through mapped pinned host memory */

NEOD_API int neod_abi_version(void);
NEOD_API const char* neod_cuda_error_string(int status);

/* residual[t] += x[t]; x[t] = rmsnorm(residual[t]) * weight. x, residual [T, H]; weight [H] of
 * dtype x or fp32 (weight_dtype). */
NEOD_API int neod_fused_add_rms_norm(void* x, int64_t x_stride, void* residual,
                                     int64_t residual_stride, const void* weight, int weight_dtype,
                                     int64_t num_tokens, int64_t hidden, float eps, int dtype,
                                     cudaStream_t stream);

/* out[t] = rmsnorm(x[t]) * weight. */
NEOD_API int neod_rms_norm(void* out, int64_t out_stride, const void* x, int64_t x_stride,
                           const void* weight, int weight_dtype, int64_t num_tokens, int64_t hidden,
                           float eps, int dtype, cudaStream_t stream);

/* In-place rotate-half RoPE. q [T, Hq, D], k [T, Hkv, D] with heads contiguous and a token
 * stride; positions [T] int64; cos_sin [max_pos, D] fp32 (cos | sin). */
NEOD_API int neod_rotary_embedding(const int64_t* positions, void* q, int64_t q_stride, void* k,
                                   int64_t k_stride, const float* cos_sin, int64_t num_tokens,
                                   int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                   int dtype, cudaStream_t stream);

/* out [T, I] = silu(x[:, :I]) * x[:, I:], x [T, 2I] with a row stride. */
NEOD_API int neod_silu_and_mul(void* out, const void* x, int64_t x_stride, int64_t num_tokens,
                               int64_t inter, int dtype, cudaStream_t stream);

/* kv_layer [num_blocks, 2, Hkv, block_size, D]; k, v [T, Hkv, D] with a token stride;
 * slot_ids [T] int64, -1 = skip. */
NEOD_API int neod_store_kv(const void* k, int64_t k_stride, const void* v, int64_t v_stride,
                           void* kv_layer, const int64_t* slot_ids, int64_t num_tokens,
                           int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int dtype,
                           cudaStream_t stream);

/* The inverse of neod_store_kv: the rows of k, v [T, Hkv, D] (token stride) <- their slots of
 * kv_layer [num_blocks, 2, Hkv, block_size, D], which may be pinned host memory (read through
 * its mapped address); slot_ids [T] int64 on the device, -1 = leave the row as it is. */
NEOD_API int neod_load_kv(void* k, int64_t k_stride, void* v, int64_t v_stride,
                          const void* kv_layer, const int64_t* slot_ids, int64_t num_tokens,
                          int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int dtype,
                          cudaStream_t stream);

/* How many KV splits a decode batch should use (1 = no split, no workspace); a pure function of
 * its arguments, so callers may cache it. max_seq_len may be an upper bound. */
NEOD_API int neod_paged_decode_max_splits(int64_t batch, int64_t num_q_heads, int64_t num_kv_heads,
                                          int64_t max_seq_len, int64_t num_sms);

/* Bytes of workspace neod_paged_decode_attention needs (0, and workspace may be NULL, when
 * max_splits == 1). */
NEOD_API int64_t neod_paged_decode_workspace_bytes(int64_t batch, int64_t num_q_heads,
                                                   int64_t head_dim, int64_t max_splits);

/* out, q [B, Hq, D] with heads contiguous and a request stride; kv_layer
 * [num_blocks, 2, Hkv, block_size, D]; block_tables [B, >= max_blocks] int32 with a row stride;
 * seq_lens [B] int32. */
NEOD_API int neod_paged_decode_attention(void* out, int64_t out_stride, const void* q,
                                         int64_t q_stride, const void* kv_layer,
                                         const int32_t* block_tables, int64_t block_table_stride,
                                         const int32_t* seq_lens, int64_t batch,
                                         int64_t num_q_heads, int64_t num_kv_heads,
                                         int64_t head_dim, int64_t block_size, float scale,
                                         int64_t max_splits, void* workspace,
                                         int64_t workspace_bytes, int dtype, cudaStream_t stream);

/* Copy block-layers: for each layer id l in layers and each (src, dst) pair in pairs,
 * dst + l * dst_layer_bytes + dst * chunk_bytes <- src + l * src_layer_bytes + src * chunk_bytes.
 * NEOD_SWAP_MEMCPY reads pairs/layers on the host; NEOD_SWAP_KERNEL reads them on the device. */
NEOD_API int neod_swap_blocks(const void* src, int64_t src_layer_bytes, void* dst,
                              int64_t dst_layer_bytes, int64_t chunk_bytes, const int64_t* pairs,
                              int64_t num_pairs, const int64_t* layers, int64_t num_layers,
                              int method, cudaStream_t stream);

/* Stream-ordered flags in pinned host memory (4-byte aligned): write sets *flag = value once the
 * stream's earlier work (host-memory writes included) is done; wait holds the stream's later work
 * until *flag == value, polled by the GPU, so the host thread never waits. */
NEOD_API int neod_stream_write_flag(uint32_t* flag, uint32_t value, cudaStream_t stream);
NEOD_API int neod_stream_wait_flag(const uint32_t* flag, uint32_t value, cudaStream_t stream);

/* Events for neod_handoff, without timing: recording one costs only its place in the stream. */
NEOD_API int neod_event_create(cudaEvent_t* event);
NEOD_API int neod_event_destroy(cudaEvent_t event);
NEOD_API int neod_stream_wait_event(cudaStream_t stream, cudaEvent_t event);

/* One leg of a sub-batch's trip between the devices for one layer, issued in one call, in this
 * order on `copy`: wait for the work issued so far on `after` (through `joined`, recorded there;
 * skipped when joined is null), wait until *wait_flag == wait_value (skipped when wait_flag is
 * null), copy `height` rows of `width` bytes from src (rows `spitch` bytes apart) to dst (rows
 * `dpitch` apart; skipped when height is 0), record `copied` (unless null), then set
 * *set_flag = set_value (unless null) once the copy's host writes are visible. */
NEOD_API int neod_handoff(cudaStream_t after, cudaEvent_t joined, cudaStream_t copy,
                          const uint32_t* wait_flag, uint32_t wait_value, void* dst,
                          int64_t dpitch, const void* src, int64_t spitch, int64_t width,
                          int64_t height, cudaEvent_t copied, uint32_t* set_flag,
                          uint32_t set_value);

#ifdef __cplusplus
}
#endif

#endif /* NEOD_CUDA_H_ */
