/*
 * Rotary embedding in place, rotate-half (GPT-NeoX / HF Llama) style.
 *
 * One thread block per token: the cos/sin row is read once per token and shared by every head of
 * q and k. Each thread rotates VEC dimension pairs (i, i + D/2) of one head with 16-byte accesses
 * to both halves. head_dim is a run-time value; it only has to split into whole vectors.
 */
#include "common.cuh"
#include "params.cuh"

namespace neod {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) rotary_kernel(const RopeParams p) {
  const int64_t token = blockIdx.x;
  const int half = p.head_dim / 2;
  const int vecs_per_head = half / VEC;
  const int num_heads = p.num_q_heads + p.num_kv_heads;
  const float* cos_row = p.cos_sin + p.positions[token] * p.head_dim;
  const float* sin_row = cos_row + half;
  for (int idx = threadIdx.x; idx < num_heads * vecs_per_head; idx += blockDim.x) {
    const int head = idx / vecs_per_head;
    const int col = (idx - head * vecs_per_head) * VEC;
    T* x = head < p.num_q_heads
               ? static_cast<T*>(p.q) + token * p.q_stride + head * p.head_dim
               : static_cast<T*>(p.k) + token * p.k_stride + (head - p.num_q_heads) * p.head_dim;
    float x1[VEC], x2[VEC], cos[VEC], sin[VEC];
    load_float<T, VEC>(x + col, x1);
    load_float<T, VEC>(x + half + col, x2);
    load_float<float, VEC>(cos_row + col, cos);
    load_float<float, VEC>(sin_row + col, sin);
    float y1[VEC], y2[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      y1[i] = x1[i] * cos[i] - x2[i] * sin[i];
      y2[i] = x2[i] * cos[i] + x1[i] * sin[i];
    }
    store_float<T, VEC>(x + col, y1);
    store_float<T, VEC>(x + half + col, y2);
  }
}

template <typename T>
int launch(const RopeParams& p, cudaStream_t stream) {
  constexpr int V = kVec16<T>;
  const int half = p.head_dim / 2;
  // Vector accesses need whole, aligned vectors: 16 bytes of x, V floats of the table.
  const bool table_aligned = reinterpret_cast<uintptr_t>(p.cos_sin) % (V * sizeof(float)) == 0;
  const bool vectorised = half % V == 0 && aligned16(p.q) && aligned16(p.k) && table_aligned &&
                          p.q_stride % V == 0 && p.k_stride % V == 0;
  const dim3 grid(static_cast<unsigned>(p.num_tokens));
  if (vectorised) {
    rotary_kernel<T, V><<<grid, kThreads, 0, stream>>>(p);
  } else {
    rotary_kernel<T, 1><<<grid, kThreads, 0, stream>>>(p);
  }
  return launch_status();
}

}  // namespace
}  // namespace neod

extern "C" int neod_rotary_embedding(const int64_t* positions, void* q, int64_t q_stride, void* k,
                                     int64_t k_stride, const float* cos_sin, int64_t num_tokens,
                                     int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                     int dtype, cudaStream_t stream) {
  if (head_dim <= 0 || head_dim % 2 != 0 || num_tokens < 0 || num_tokens > INT32_MAX ||
      num_q_heads < 0 || num_kv_heads < 0) {
    return NEOD_ERR_INVALID_ARGUMENT;
  }
  if (num_tokens == 0 || num_q_heads + num_kv_heads == 0) return NEOD_OK;
  const neod::RopeParams p{positions,  q,
                           q_stride,   k,
                           k_stride,   cos_sin,
                           num_tokens, static_cast<int>(num_q_heads),
                           static_cast<int>(num_kv_heads), static_cast<int>(head_dim)};
  NEOD_DISPATCH_FLOAT(dtype, return neod::launch<scalar_t>(p, stream););
}
