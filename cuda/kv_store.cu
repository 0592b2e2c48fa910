/*
 * KV rows between a batch and one layer's paged cache: a store writes each token's K and V rows
 * into its slot, a load reads them back out of their slots.
 *
 * A store serves prefill and decode tokens alike; slot -1 marks a token whose KV is not kept
 * (padding, or a request whose KV lives on the host). A load gathers the keys of a prompt's
 * earlier chunks for its next one; its layer may be the pinned host pool, read through the
 * address the device has for it, so that a prompt whose KV lives on the host goes on without a
 * copy through the CPU. Slot -1 leaves a row untouched. Both are pure copies, so they move raw
 * units of the widest size (16 bytes down to 2) that the row size, pointers and strides allow,
 * which makes them independent of the dtype. One thread block per token; threads stride over
 * heads x units.
 */
#include "common.cuh"
#include "params.cuh"

namespace neod {
namespace {

constexpr int kThreads = 128;

template <typename U, bool kLoad>
__global__ void __launch_bounds__(kThreads) kv_rows_kernel(const KVRowsParams p) {
  const int64_t token = blockIdx.x;
  const int64_t slot = p.slot_ids[token];
  if (slot < 0) return;
  const int64_t block = slot / p.block_size;
  const int64_t offset = slot - block * p.block_size;
  const int64_t head_units = static_cast<int64_t>(p.block_size) * p.row_units;
  U* cache = static_cast<U*>(p.kv_layer) + block * 2 * p.num_kv_heads * head_units +
             offset * p.row_units;
  U* k = static_cast<U*>(p.k) + token * p.k_stride;
  U* v = static_cast<U*>(p.v) + token * p.v_stride;
  const int total = p.num_kv_heads * p.row_units;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int head = idx / p.row_units;
    const int col = idx - head * p.row_units;
    U* k_slot = cache + head * head_units + col;
    U* v_slot = cache + (p.num_kv_heads + head) * head_units + col;
    if constexpr (kLoad) {
      k[idx] = *k_slot;
      v[idx] = *v_slot;
    } else {
      *k_slot = k[idx];
      *v_slot = v[idx];
    }
  }
}

template <typename U>
int launch(KVRowsParams p, bool load, int64_t row_bytes, int64_t k_stride_bytes,
           int64_t v_stride_bytes, cudaStream_t stream) {
  p.row_units = static_cast<int>(row_bytes / sizeof(U));
  p.k_stride = k_stride_bytes / static_cast<int64_t>(sizeof(U));
  p.v_stride = v_stride_bytes / static_cast<int64_t>(sizeof(U));
  const unsigned grid = static_cast<unsigned>(p.num_tokens);
  if (load) {
    kv_rows_kernel<U, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    kv_rows_kernel<U, false><<<grid, kThreads, 0, stream>>>(p);
  }
  return launch_status();
}

int kv_rows(void* k, int64_t k_stride, void* v, int64_t v_stride, void* kv_layer,
            const int64_t* slot_ids, int64_t num_tokens, int64_t num_kv_heads, int64_t head_dim,
            int64_t block_size, int dtype, bool load, cudaStream_t stream) {
  int64_t elem_bytes;
  switch (dtype) {
    case NEOD_DTYPE_FLOAT32: elem_bytes = 4; break;
    case NEOD_DTYPE_FLOAT16:
    case NEOD_DTYPE_BFLOAT16: elem_bytes = 2; break;
    default: return NEOD_ERR_UNSUPPORTED;
  }
  if (num_tokens < 0 || num_tokens > INT32_MAX || num_kv_heads <= 0 || head_dim <= 0 ||
      block_size <= 0 || num_kv_heads * head_dim > INT32_MAX) {
    return NEOD_ERR_INVALID_ARGUMENT;
  }
  if (num_tokens == 0) return NEOD_OK;
  if (kv_layer == nullptr) return NEOD_ERR_INVALID_ARGUMENT;  // a load's layer out of reach
  const int64_t row_bytes = head_dim * elem_bytes;
  const int64_t k_stride_bytes = k_stride * elem_bytes;
  const int64_t v_stride_bytes = v_stride * elem_bytes;
  // The widest unit that divides every row, stride and base address.
  const uint64_t bits = static_cast<uint64_t>(row_bytes | k_stride_bytes | v_stride_bytes) |
                        reinterpret_cast<uintptr_t>(k) | reinterpret_cast<uintptr_t>(v) |
                        reinterpret_cast<uintptr_t>(kv_layer);
  // row_units and the strides are filled in per copy unit by launch()
  const KVRowsParams p{k, 0, v, 0, kv_layer, slot_ids, num_tokens,
                       static_cast<int>(num_kv_heads), 0, static_cast<int>(block_size)};
  const int64_t rb = row_bytes, ks = k_stride_bytes, vs = v_stride_bytes;
  if (bits % 16 == 0) return launch<uint4>(p, load, rb, ks, vs, stream);
  if (bits % 8 == 0) return launch<uint2>(p, load, rb, ks, vs, stream);
  if (bits % 4 == 0) return launch<uint32_t>(p, load, rb, ks, vs, stream);
  return launch<uint16_t>(p, load, rb, ks, vs, stream);
}

}  // namespace
}  // namespace neod

extern "C" int neod_store_kv(const void* k, int64_t k_stride, const void* v, int64_t v_stride,
                             void* kv_layer, const int64_t* slot_ids, int64_t num_tokens,
                             int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                             int dtype, cudaStream_t stream) {
  return neod::kv_rows(const_cast<void*>(k), k_stride, const_cast<void*>(v), v_stride, kv_layer,
                       slot_ids, num_tokens, num_kv_heads, head_dim, block_size, dtype, false,
                       stream);
}

extern "C" int neod_load_kv(void* k, int64_t k_stride, void* v, int64_t v_stride,
                            const void* kv_layer, const int64_t* slot_ids, int64_t num_tokens,
                            int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int dtype,
                            cudaStream_t stream) {
  void* layer = const_cast<void*>(neod::device_alias(kv_layer));
  return neod::kv_rows(k, k_stride, v, v_stride, layer, slot_ids, num_tokens, num_kv_heads,
                       head_dim, block_size, dtype, true, stream);
}
