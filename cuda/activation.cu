/*
 * SiLU-and-mul: y = silu(gate) * up for x = [gate | up], the MLP activation of Llama models.
 *
 * A 2-D grid (rows x column chunks) so that both a decode batch of a few rows and a long prefill
 * fill the GPU; each thread handles one 16-byte vector of gate, up and output.
 */
#include "common.cuh"
#include "params.cuh"

namespace neod {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) silu_and_mul_kernel(const ActivationParams p) {
  const int64_t row = blockIdx.x;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (col >= p.inter) return;
  const T* gate_ptr = static_cast<const T*>(p.x) + row * p.x_stride + col;
  float gate[VEC], up[VEC];
  load_float<T, VEC>(gate_ptr, gate);
  load_float<T, VEC>(gate_ptr + p.inter, up);
#pragma unroll
  for (int i = 0; i < VEC; ++i) gate[i] = gate[i] / (1.f + __expf(-gate[i])) * up[i];
  store_float<T, VEC>(static_cast<T*>(p.out) + row * p.inter + col, gate);
}

template <typename T>
int launch(const ActivationParams& p, cudaStream_t stream) {
  constexpr int V = kVec16<T>;
  const bool vectorised =
      p.inter % V == 0 && p.x_stride % V == 0 && aligned16(p.x) && aligned16(p.out);
  const int vec = vectorised ? V : 1;
  const int64_t col_blocks = ceil_div(ceil_div(p.inter, vec), kThreads);
  if (col_blocks > 65535) return NEOD_ERR_UNSUPPORTED;  // gridDim.y limit
  const dim3 grid(static_cast<unsigned>(p.num_tokens), static_cast<unsigned>(col_blocks));
  if (vectorised) {
    silu_and_mul_kernel<T, V><<<grid, kThreads, 0, stream>>>(p);
  } else {
    silu_and_mul_kernel<T, 1><<<grid, kThreads, 0, stream>>>(p);
  }
  return launch_status();
}

}  // namespace
}  // namespace neod

extern "C" int neod_silu_and_mul(void* out, const void* x, int64_t x_stride, int64_t num_tokens,
                                 int64_t inter, int dtype, cudaStream_t stream) {
  if (inter <= 0 || num_tokens < 0 || num_tokens > INT32_MAX) return NEOD_ERR_INVALID_ARGUMENT;
  if (num_tokens == 0) return NEOD_OK;
  const neod::ActivationParams p{out, x, x_stride, num_tokens, inter};
  NEOD_DISPATCH_FLOAT(dtype, return neod::launch<scalar_t>(p, stream););
}
