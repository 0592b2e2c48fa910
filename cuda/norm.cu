/*
 * RMSNorm and fused residual-add + RMSNorm, one thread block per token row.
 *
 * The row stays in registers between the two passes (sum of squares, then scale), so each element
 * is read and written once: up to kVecsPerThread 16-byte vectors per thread and 1024 threads, i.e.
 * rows of up to 32768 bf16 elements. The fused variant stores the residual rounded to its dtype and
 * normalises that rounded value, exactly as the torch reference does.
 */
#include "common.cuh"
#include "params.cuh"

namespace neod {
namespace {

constexpr int kVecsPerThread = 4;
constexpr int kMaxThreads = 1024;

template <typename T, typename W, int VEC, bool FUSED>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_kernel(const NormParams p) {
  const int64_t row = blockIdx.x;
  const int num_vecs = static_cast<int>(p.hidden / VEC);
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
  T* residual = FUSED ? static_cast<T*>(p.residual) + row * p.residual_stride : nullptr;

  float vals[kVecsPerThread][VEC];
  float sum_sq = 0.f;
#pragma unroll
  for (int j = 0; j < kVecsPerThread; ++j) {
    const int idx = j * blockDim.x + threadIdx.x;
    if (idx >= num_vecs) continue;
    load_float<T, VEC>(x + idx * VEC, vals[j]);
    if constexpr (FUSED) {
      float res[VEC];
      load_float<T, VEC>(residual + idx * VEC, res);
      Vec<T, VEC> stored;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        stored.v[i] = from_float<T>(vals[j][i] + res[i]);
        vals[j][i] = to_float(stored.v[i]);
      }
      *reinterpret_cast<Vec<T, VEC>*>(residual + idx * VEC) = stored;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum_sq += vals[j][i] * vals[j][i];
  }
  // block_sum synchronises the block, so an in-place out (== x) is only written after every read.
  const float inv_rms = rsqrtf(block_sum(sum_sq) / static_cast<float>(p.hidden) + p.eps);

  T* out = static_cast<T*>(p.out) + row * p.out_stride;
  const W* weight = static_cast<const W*>(p.weight);
#pragma unroll
  for (int j = 0; j < kVecsPerThread; ++j) {
    const int idx = j * blockDim.x + threadIdx.x;
    if (idx >= num_vecs) continue;
    float w[VEC];
    load_float<W, VEC>(weight + idx * VEC, w);
#pragma unroll
    for (int i = 0; i < VEC; ++i) vals[j][i] *= inv_rms * w[i];
    store_float<T, VEC>(out + idx * VEC, vals[j]);
  }
}

template <typename T, typename W, bool FUSED>
int launch(const NormParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return NEOD_OK;
  constexpr int V = kVec16<T>;
  const auto fits = [](const void* ptr, int64_t stride, size_t align, int64_t elems) {
    return ptr == nullptr ||
           (reinterpret_cast<uintptr_t>(ptr) % align == 0 && stride % elems == 0);
  };
  const bool vectorised = p.hidden % V == 0 && fits(p.x, p.x_stride, 16, V) &&
                          fits(p.out, p.out_stride, 16, V) &&
                          fits(p.residual, p.residual_stride, 16, V) &&
                          fits(p.weight, 0, sizeof(W) * V, V);
  const int64_t num_vecs = vectorised ? p.hidden / V : p.hidden;
  const int64_t threads = ceil_div(ceil_div(num_vecs, kVecsPerThread), 32) * 32;
  if (threads > kMaxThreads) return NEOD_ERR_UNSUPPORTED;
  const dim3 grid(static_cast<unsigned>(p.num_tokens));
  if (vectorised) {
    rms_norm_kernel<T, W, V, FUSED><<<grid, threads, 0, stream>>>(p);
  } else {
    rms_norm_kernel<T, W, 1, FUSED><<<grid, threads, 0, stream>>>(p);
  }
  return launch_status();
}

template <bool FUSED>
int dispatch(const NormParams& p, int dtype, int weight_dtype, cudaStream_t stream) {
  if (p.hidden <= 0 || p.num_tokens < 0 || p.num_tokens > INT32_MAX) {
    return NEOD_ERR_INVALID_ARGUMENT;
  }
  NEOD_DISPATCH_FLOAT(dtype, {
    if (weight_dtype == dtype) return launch<scalar_t, scalar_t, FUSED>(p, stream);
    if (weight_dtype == NEOD_DTYPE_FLOAT32) return launch<scalar_t, float, FUSED>(p, stream);
    return NEOD_ERR_UNSUPPORTED;
  });
}

}  // namespace
}  // namespace neod

extern "C" int neod_fused_add_rms_norm(void* x, int64_t x_stride, void* residual,
                                       int64_t residual_stride, const void* weight,
                                       int weight_dtype, int64_t num_tokens, int64_t hidden,
                                       float eps, int dtype, cudaStream_t stream) {
  const neod::NormParams p{x,        x_stride,   x,      x_stride, residual, residual_stride,
                           weight,   num_tokens, hidden, eps};
  return neod::dispatch<true>(p, dtype, weight_dtype, stream);
}

extern "C" int neod_rms_norm(void* out, int64_t out_stride, const void* x, int64_t x_stride,
                             const void* weight, int weight_dtype, int64_t num_tokens,
                             int64_t hidden, float eps, int dtype, cudaStream_t stream) {
  const neod::NormParams p{out,    out_stride, x,      x_stride, nullptr, 0,
                           weight, num_tokens, hidden, eps};
  return neod::dispatch<false>(p, dtype, weight_dtype, stream);
}
