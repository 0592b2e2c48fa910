/*
 * Block swap between the GPU KV pool and the pinned host pool (either direction).
 *
 * A block-layer (K and V of every KV head of one block in one layer) is one contiguous chunk in
 * both pools, so a swap is a list of equal-sized chunk copies. Two ways are offered, chosen by the
 * caller after measurement (docs/perf.md):
 *  - NEOD_SWAP_MEMCPY: the copy engines. Runs of consecutive (src, dst) ids are merged into one
 *    copy each, and all copies of the call are issued with one cudaMemcpyBatchAsync (a loop of
 *    cudaMemcpyAsync on the legacy default stream, which the batch call does not accept). Uses no
 *    SMs, so it overlaps with compute.
 *  - NEOD_SWAP_KERNEL: one launch in which each thread block copies one block-layer with 16-byte
 *    loads and stores through the host pool's mapped (UVA) address. Costs SM time but has one
 *    launch whatever the fragmentation.
 */
#include <vector>

#include "common.cuh"
#include "params.cuh"

namespace neod {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread: PCIe latency needs many

__global__ void __launch_bounds__(kThreads) swap_kernel(const SwapParams p) {
  const int64_t pair = blockIdx.x;
  const int64_t layer = p.layers[blockIdx.y];
  const int64_t src_block = p.pairs[2 * pair];
  const int64_t dst_block = p.pairs[2 * pair + 1];
  const uint4* src = reinterpret_cast<const uint4*>(p.src + layer * p.src_layer_bytes +
                                                    src_block * p.chunk_bytes);
  uint4* dst = reinterpret_cast<uint4*>(p.dst + layer * p.dst_layer_bytes +
                                        dst_block * p.chunk_bytes);
  const int64_t n = p.chunk_bytes / 16;
  for (int64_t base = threadIdx.x; base < n; base += kThreads * kUnroll) {
    uint4 buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < n) buf[u] = src[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < n) dst[i] = buf[u];
    }
  }
}

int swap_with_kernel(SwapParams p, int64_t num_layers, cudaStream_t stream) {
  if (p.chunk_bytes % 16 != 0 || !aligned16(p.src) || !aligned16(p.dst) ||
      p.src_layer_bytes % 16 != 0 || p.dst_layer_bytes % 16 != 0 || num_layers > 65535 ||
      p.num_pairs > INT32_MAX) {
    return NEOD_ERR_UNSUPPORTED;
  }
  p.src = static_cast<const char*>(device_alias(p.src));
  p.dst = static_cast<char*>(const_cast<void*>(device_alias(p.dst)));
  if (p.src == nullptr || p.dst == nullptr) return NEOD_ERR_INVALID_ARGUMENT;
  const dim3 grid(static_cast<unsigned>(p.num_pairs), static_cast<unsigned>(num_layers));
  swap_kernel<<<grid, kThreads, 0, stream>>>(p);
  return launch_status();
}

int swap_with_memcpy(const SwapParams& p, int64_t num_layers, cudaStream_t stream) {
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  for (int64_t li = 0; li < num_layers; ++li) {
    const int64_t layer = p.layers[li];
    for (int64_t i = 0; i < p.num_pairs;) {
      const int64_t src_block = p.pairs[2 * i];
      const int64_t dst_block = p.pairs[2 * i + 1];
      int64_t run = 1;
      while (i + run < p.num_pairs && p.pairs[2 * (i + run)] == src_block + run &&
             p.pairs[2 * (i + run) + 1] == dst_block + run) {
        ++run;
      }
      srcs.push_back(p.src + layer * p.src_layer_bytes + src_block * p.chunk_bytes);
      dsts.push_back(p.dst + layer * p.dst_layer_bytes + dst_block * p.chunk_bytes);
      sizes.push_back(static_cast<size_t>(run * p.chunk_bytes));
      i += run;
    }
  }
  if (dsts.empty()) return NEOD_OK;
  if (stream != nullptr && stream != cudaStreamLegacy) {
    cudaMemcpyAttributes attrs{};
    attrs.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attrs.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    size_t attrs_index = 0;
    const cudaError_t err = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(),
                                                 dsts.size(), &attrs, &attrs_index, 1, stream);
    if (err == cudaSuccess) return NEOD_OK;
    if (err != cudaErrorNotSupported && err != cudaErrorInvalidValue) return static_cast<int>(err);
    cudaGetLastError();  // clear it: the per-copy loop below reports any real fault
  }
  for (size_t i = 0; i < dsts.size(); ++i) {
    const cudaError_t err = cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyDefault, stream);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return NEOD_OK;
}

}  // namespace
}  // namespace neod

extern "C" int neod_swap_blocks(const void* src, int64_t src_layer_bytes, void* dst,
                                int64_t dst_layer_bytes, int64_t chunk_bytes,
                                const int64_t* pairs, int64_t num_pairs, const int64_t* layers,
                                int64_t num_layers, int method, cudaStream_t stream) {
  if (chunk_bytes <= 0 || num_pairs < 0 || num_layers < 0 || src == nullptr || dst == nullptr) {
    return NEOD_ERR_INVALID_ARGUMENT;
  }
  if (num_pairs == 0 || num_layers == 0) return NEOD_OK;
  const neod::SwapParams p{static_cast<const char*>(src), src_layer_bytes, static_cast<char*>(dst),
                           dst_layer_bytes, chunk_bytes, pairs, num_pairs, layers};
  switch (method) {
    case NEOD_SWAP_MEMCPY: return neod::swap_with_memcpy(p, num_layers, stream);
    case NEOD_SWAP_KERNEL: return neod::swap_with_kernel(p, num_layers, stream);
    default: return NEOD_ERR_INVALID_ARGUMENT;
  }
}
