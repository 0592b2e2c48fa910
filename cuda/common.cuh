/*
 * Shared device helpers: element conversion, 16-byte vector access, reductions and the dtype
 * dispatch every launcher uses. Memory-bound kernels move data in 16-byte vectors per thread
 * (coalesced across the warp) and convert to fp32 in registers; all arithmetic is fp32.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "neod_cuda.h"

namespace neod {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// N elements of T moved as one aligned access (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_float(const T* ptr, float (&out)[N]) {
  const Vec<T, N> vec = *reinterpret_cast<const Vec<T, N>*>(ptr);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(vec.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_float(T* ptr, const float (&in)[N]) {
  Vec<T, N> vec;
#pragma unroll
  for (int i = 0; i < N; ++i) vec.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec<T, N>*>(ptr) = vec;
}

// Elements per 16-byte vector.
template <typename T>
constexpr int kVec16 = 16 / sizeof(T);

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum over the whole block; every thread gets the result. blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_sum(float x) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  x = warp_sum(x);
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  const int num_warps = blockDim.x >> 5;
  x = lane < num_warps ? partial[lane] : 0.f;
  x = warp_sum(x);
  __syncthreads();  // partial may be reused by a later call
  return x;
}

inline bool aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Status of the last launch on this thread: NEOD_OK or the cudaError_t.
// The address at which the device reaches `ptr`: itself for device memory, the mapped alias for
// pinned host memory, nullptr for memory the device cannot reach (pageable host memory).
inline const void* device_alias(const void* ptr) {
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  switch (attr.type) {
    case cudaMemoryTypeDevice:
    case cudaMemoryTypeManaged: return ptr;
    case cudaMemoryTypeHost: return attr.devicePointer;
    default: return nullptr;
  }
}

inline int launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? NEOD_OK : static_cast<int>(err);
}

}  // namespace neod

// Runs the body (the variadic argument) with `scalar_t` bound to the type of a NEOD_DTYPE_* code.
#define NEOD_DISPATCH_FLOAT(dtype, ...)                      \
  switch (dtype) {                                            \
    case NEOD_DTYPE_FLOAT32: {                                \
      using scalar_t = float;                                 \
      __VA_ARGS__                                             \
    }                                                         \
    case NEOD_DTYPE_FLOAT16: {                                \
      using scalar_t = __half;                                \
      __VA_ARGS__                                             \
    }                                                         \
    case NEOD_DTYPE_BFLOAT16: {                               \
      using scalar_t = __nv_bfloat16;                         \
      __VA_ARGS__                                             \
    }                                                         \
    default:                                                  \
      return NEOD_ERR_UNSUPPORTED;                            \
  }

// As NEOD_DISPATCH_FLOAT, for the 16-bit types only (attention).
#define NEOD_DISPATCH_HALF(dtype, ...)                       \
  switch (dtype) {                                            \
    case NEOD_DTYPE_FLOAT16: {                                \
      using scalar_t = __half;                                \
      __VA_ARGS__                                             \
    }                                                         \
    case NEOD_DTYPE_BFLOAT16: {                               \
      using scalar_t = __nv_bfloat16;                         \
      __VA_ARGS__                                             \
    }                                                         \
    default:                                                  \
      return NEOD_ERR_UNSUPPORTED;                            \
  }
