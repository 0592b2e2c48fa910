/*
 * Paged decode attention: one new query token per request against its paged KV cache.
 *
 * Design. A thread block owns (request, KV head, head tile, KV split) and computes every query
 * head of its tile against that KV head, so under GQA each K/V row is read from memory once per
 * group rather than once per query head. K/V tiles stream into shared memory through a
 * kStages-deep cp.async pipeline, so several tiles are in flight while one is computed without
 * holding registers (a register double buffer measured slower: it cut occupancy). Within the
 * block a K/V row of D elements is read by D/8 threads as 16-byte vectors (a warp covers 2 or 4
 * consecutive tokens, always inside one block, so its copies are contiguous). Scores use the exp2
 * domain (q pre-scaled by scale * log2 e), with an online softmax rescaled once per UNROLL rows,
 * and fp32 accumulation throughout. Measured variants and numbers: docs/perf.md, "GPU kernels".
 *
 * Long contexts with few requests would leave most SMs idle, so the KV range of a request is cut
 * into splits (chosen per request on the device from its own length and a host-chosen maximum);
 * each split writes a partial output and its log-sum-exp, and a merge kernel combines them.
 * Requests that get a single split write their output directly and skip the merge.
 */
#include "common.cuh"
#include "params.cuh"

namespace neod {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMinChunk = 256;    // minimum tokens per split: shorter ones cost more than they save
constexpr int kSplitAlign = 64;   // split boundaries are multiples of this many tokens
constexpr int kMaxSplits = 128;
constexpr int kBlocksPerSm = 3;   // thread blocks per SM the split count aims for
constexpr int kStages = 4;        // shared-memory pipeline depth: K/V tiles per block in flight

// 16-byte global -> shared copy that bypasses registers (sm_80+); fill = false writes zeros.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool fill) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(fill ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

template <typename T, int HEAD_DIM, int GROUP_TILE, int UNROLL>
constexpr int tile_rows() {
  return kWarps * (32 / (HEAD_DIM / kVec16<T>)) * UNROLL;
}

// Dynamic shared memory of one block: kStages K/V tiles, reused for the final cross-warp merge.
template <typename T, int HEAD_DIM, int GROUP_TILE, int UNROLL>
constexpr int decode_smem_bytes() {
  constexpr int pipeline = kStages * 2 * tile_rows<T, HEAD_DIM, GROUP_TILE, UNROLL>() * HEAD_DIM *
                           static_cast<int>(sizeof(T));
  constexpr int merge = kWarps * GROUP_TILE * (HEAD_DIM + 2) * static_cast<int>(sizeof(float));
  return pipeline > merge ? pipeline : merge;
}

struct SplitPlan {
  int num_splits;
  int chunk;  // tokens per split
};

// A pure function of (seq_len, max_splits): the attention and merge kernels must agree on it.
__host__ __device__ inline SplitPlan plan_splits(int seq_len, int max_splits) {
  const int len = seq_len > 1 ? seq_len : 1;
  int n = (len + kMinChunk - 1) / kMinChunk;
  n = n < max_splits ? n : max_splits;
  const int per_split = (len + n - 1) / n;
  const int chunk = (per_split + kSplitAlign - 1) / kSplitAlign * kSplitAlign;
  return {(len + chunk - 1) / chunk, chunk};
}

// Query heads per thread block: the largest of 8, 4, 2, 1 dividing the GQA group.
__host__ __device__ inline int group_tile(int group) {
  if (group % 8 == 0) return 8;
  if (group % 4 == 0) return 4;
  if (group % 2 == 0) return 2;
  return 1;
}

template <typename T, int HEAD_DIM, int BLOCK_SIZE, int GROUP_TILE, int UNROLL>
__global__ void __launch_bounds__(kThreads) paged_decode_kernel(const DecodeParams p) {
  constexpr int VEC = kVec16<T>;
  constexpr int THREADS_PER_ROW = HEAD_DIM / VEC;
  constexpr int ROWS_PER_WARP = 32 / THREADS_PER_ROW;
  constexpr int ROWS_PER_STEP = kWarps * ROWS_PER_WARP;
  constexpr int TILE = ROWS_PER_STEP * UNROLL;
  constexpr int HEAD_STRIDE = BLOCK_SIZE * HEAD_DIM;  // one KV head of one block
  static_assert(BLOCK_SIZE % ROWS_PER_WARP == 0, "a warp's rows must share a block");

  const int tiles_per_kv_head = p.group / GROUP_TILE;
  const int kv_head = blockIdx.x / tiles_per_kv_head;
  const int q_head0 = kv_head * p.group + (blockIdx.x - kv_head * tiles_per_kv_head) * GROUP_TILE;
  const int req = blockIdx.y;
  const int split = blockIdx.z;
  const int seq_len = p.seq_lens[req];
  const SplitPlan plan = plan_splits(seq_len, p.max_splits);
  if (split >= plan.num_splits) return;

  const int64_t head_row = static_cast<int64_t>(req) * p.num_q_heads + q_head0;  // in partials
  T* out = static_cast<T*>(p.out) + req * p.out_stride + q_head0 * HEAD_DIM;
  if (seq_len <= 0) {  // nothing to attend to (padding entries): zeros
    for (int i = threadIdx.x; i < GROUP_TILE * HEAD_DIM; i += kThreads) out[i] = from_float<T>(0.f);
    return;
  }
  const int start = split * plan.chunk;
  const int end = min(seq_len, start + plan.chunk);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int col = (lane % THREADS_PER_ROW) * VEC;
  const int row = lane / THREADS_PER_ROW;

  float q[GROUP_TILE][VEC];
  const T* q_ptr = static_cast<const T*>(p.q) + req * p.q_stride + q_head0 * HEAD_DIM + col;
#pragma unroll
  for (int g = 0; g < GROUP_TILE; ++g) {
    load_float<T, VEC>(q_ptr + g * HEAD_DIM, q[g]);
#pragma unroll
    for (int i = 0; i < VEC; ++i) q[g][i] *= p.scale_log2;
  }

  float m[GROUP_TILE], l[GROUP_TILE], acc[GROUP_TILE][VEC];
#pragma unroll
  for (int g = 0; g < GROUP_TILE; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[g][i] = 0.f;
  }

  const int32_t* table = p.block_tables + req * p.block_table_stride;
  const T* kv = static_cast<const T*>(p.kv_layer) + static_cast<int64_t>(kv_head) * HEAD_STRIDE;
  const int64_t block_stride = 2ll * p.num_kv_heads * HEAD_STRIDE;
  const int64_t v_offset = static_cast<int64_t>(p.num_kv_heads) * HEAD_STRIDE;

  // Shared-memory pipeline: tile t (TILE rows of K then TILE rows of V) goes to stage t % kStages;
  // kStages - 1 tiles are in flight while one is computed, without holding registers.
  extern __shared__ __align__(16) unsigned char smem[];
  T* stages = reinterpret_cast<T*>(smem);
  constexpr int STAGE_ELEMS = 2 * TILE * HEAD_DIM;
  const int num_tiles = (end - start + TILE - 1) / TILE;
  const auto issue = [&](int tile) {
    if (tile < num_tiles) {
      T* dst = stages + (tile % kStages) * STAGE_ELEMS;
      const int base = start + tile * TILE;
#pragma unroll
      for (int j = 0; j < 2 * UNROLL; ++j) {  // 2 * TILE * THREADS_PER_ROW chunks of 16 bytes
        const int chunk = j * kThreads + threadIdx.x;
        const int which = chunk / (TILE * THREADS_PER_ROW);  // 0: K, 1: V
        const int r = (chunk / THREADS_PER_ROW) % TILE;
        const int c = (chunk % THREADS_PER_ROW) * VEC;
        const int token = base + r;
        const bool inside = token < end;
        const T* src = kv;
        if (inside) {
          src += table[token / BLOCK_SIZE] * block_stride + which * v_offset +
                 (token % BLOCK_SIZE) * HEAD_DIM + c;
        }
        cp_async16(dst + (which * TILE + r) * HEAD_DIM + c, src, inside);
      }
    }
    cp_async_commit();  // empty groups past the end keep the wait count uniform
  };

#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) issue(t);
  for (int t = 0; t < num_tiles; ++t) {
    issue(t + kStages - 1);
    cp_async_wait<kStages - 1>();
    __syncthreads();
    const T* k_tile = stages + (t % kStages) * STAGE_ELEMS;
    const T* v_tile = k_tile + TILE * HEAD_DIM;
    const int base = start + t * TILE;
    Vec<T, VEC> k_raw[UNROLL], v_raw[UNROLL];
    bool valid[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int r = u * ROWS_PER_STEP + warp * ROWS_PER_WARP + row;
      valid[u] = base + r < end;
      k_raw[u] = *reinterpret_cast<const Vec<T, VEC>*>(k_tile + r * HEAD_DIM + col);
      v_raw[u] = *reinterpret_cast<const Vec<T, VEC>*>(v_tile + r * HEAD_DIM + col);
    }

    float s[UNROLL][GROUP_TILE];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
      for (int g = 0; g < GROUP_TILE; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) dot += q[g][i] * to_float(k_raw[u].v[i]);
#pragma unroll
        for (int offset = THREADS_PER_ROW / 2; offset > 0; offset >>= 1) {
          dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        }
        s[u][g] = valid[u] ? dot : -INFINITY;
      }
    }

#pragma unroll
    for (int g = 0; g < GROUP_TILE; ++g) {
      float m_new = m[g];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) m_new = fmaxf(m_new, s[u][g]);
      if (m_new == -INFINITY) continue;  // no valid token for this row yet
      const float alpha = exp2f(m[g] - m_new);
      l[g] *= alpha;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[g][i] *= alpha;
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const float prob = exp2f(s[u][g] - m_new);
        l[g] += prob;
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[g][i] += prob * to_float(v_raw[u].v[i]);
      }
      m[g] = m_new;
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();  // only empty groups remain, but leave none pending before reusing smem

  // Merge the row groups of a warp: lanes `THREADS_PER_ROW` apart hold the same columns.
#pragma unroll
  for (int offset = THREADS_PER_ROW; offset < 32; offset <<= 1) {
#pragma unroll
    for (int g = 0; g < GROUP_TILE; ++g) {
      const float m_other = __shfl_xor_sync(0xffffffffu, m[g], offset);
      const float l_other = __shfl_xor_sync(0xffffffffu, l[g], offset);
      const float m_new = fmaxf(m[g], m_other);
      const float a = m[g] == -INFINITY ? 0.f : exp2f(m[g] - m_new);
      const float b = m_other == -INFINITY ? 0.f : exp2f(m_other - m_new);
      l[g] = l[g] * a + l_other * b;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float acc_other = __shfl_xor_sync(0xffffffffu, acc[g][i], offset);
        acc[g][i] = acc[g][i] * a + acc_other * b;
      }
      m[g] = m_new;
    }
  }

  // Merge the warps through shared memory.
  auto& warp_acc = *reinterpret_cast<float(*)[kWarps][GROUP_TILE][HEAD_DIM]>(smem);
  auto& warp_m = *reinterpret_cast<float(*)[kWarps][GROUP_TILE]>(
      smem + sizeof(float) * kWarps * GROUP_TILE * HEAD_DIM);
  auto& warp_l = *reinterpret_cast<float(*)[kWarps][GROUP_TILE]>(
      smem + sizeof(float) * kWarps * GROUP_TILE * (HEAD_DIM + 1));
  if (row == 0) {
#pragma unroll
    for (int g = 0; g < GROUP_TILE; ++g) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) warp_acc[warp][g][col + i] = acc[g][i];
      if (lane == 0) {
        warp_m[warp][g] = m[g];
        warp_l[warp][g] = l[g];
      }
    }
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < GROUP_TILE * HEAD_DIM; idx += kThreads) {
    const int g = idx / HEAD_DIM;
    const int d = idx - g * HEAD_DIM;
    float m_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_max = fmaxf(m_max, warp_m[w][g]);
    float l_sum = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      if (warp_m[w][g] == -INFINITY) continue;
      const float f = exp2f(warp_m[w][g] - m_max);
      l_sum += warp_l[w][g] * f;
      o += warp_acc[w][g][d] * f;
    }
    // l_sum > 0: this split holds at least one token
    if (plan.num_splits == 1) {
      out[idx] = from_float<T>(o / l_sum);
    } else {
      const int64_t part = (head_row + g) * p.max_splits + split;
      p.partial_out[part * HEAD_DIM + d] = o / l_sum;
      if (d == 0) p.partial_lse[part] = m_max + log2f(l_sum);
    }
  }
}

// Combines the splits of one (request, query head); one thread per output element.
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(HEAD_DIM) merge_splits_kernel(const DecodeParams p) {
  const int head = blockIdx.x;
  const int req = blockIdx.y;
  const SplitPlan plan = plan_splits(p.seq_lens[req], p.max_splits);
  if (plan.num_splits <= 1) return;
  const int64_t head_row = static_cast<int64_t>(req) * p.num_q_heads + head;
  const float* lse = p.partial_lse + head_row * p.max_splits;
  const float* part = p.partial_out + head_row * p.max_splits * HEAD_DIM + threadIdx.x;
  float lse_max = -INFINITY;
  for (int s = 0; s < plan.num_splits; ++s) lse_max = fmaxf(lse_max, lse[s]);
  float weight_sum = 0.f, o = 0.f;
  for (int s = 0; s < plan.num_splits; ++s) {
    const float w = exp2f(lse[s] - lse_max);
    weight_sum += w;
    o += w * part[s * HEAD_DIM];
  }
  T* out = static_cast<T*>(p.out) + req * p.out_stride + head * HEAD_DIM;
  out[threadIdx.x] = from_float<T>(o / weight_sum);
}

template <typename T, int HEAD_DIM, int BLOCK_SIZE, int GROUP_TILE>
int launch(const DecodeParams& p, int64_t batch, cudaStream_t stream) {
  constexpr int UNROLL = 2;  // rows per thread and tile; 4 was slower (registers, occupancy)
  const dim3 grid(static_cast<unsigned>(p.num_kv_heads * (p.group / GROUP_TILE)),
                  static_cast<unsigned>(batch), static_cast<unsigned>(p.max_splits));
  constexpr int smem_bytes = decode_smem_bytes<T, HEAD_DIM, GROUP_TILE, UNROLL>();
  static_assert(smem_bytes <= 48 * 1024, "above the default dynamic shared memory limit");
  paged_decode_kernel<T, HEAD_DIM, BLOCK_SIZE, GROUP_TILE, UNROLL>
      <<<grid, kThreads, smem_bytes, stream>>>(p);
  if (p.max_splits > 1) {
    const dim3 merge_grid(static_cast<unsigned>(p.num_q_heads), static_cast<unsigned>(batch));
    merge_splits_kernel<T, HEAD_DIM><<<merge_grid, HEAD_DIM, 0, stream>>>(p);
  }
  return launch_status();
}

template <typename T, int HEAD_DIM, int BLOCK_SIZE>
int dispatch_tile(const DecodeParams& p, int64_t batch, cudaStream_t stream) {
  switch (group_tile(p.group)) {
    case 8: return launch<T, HEAD_DIM, BLOCK_SIZE, 8>(p, batch, stream);
    case 4: return launch<T, HEAD_DIM, BLOCK_SIZE, 4>(p, batch, stream);
    case 2: return launch<T, HEAD_DIM, BLOCK_SIZE, 2>(p, batch, stream);
    default: return launch<T, HEAD_DIM, BLOCK_SIZE, 1>(p, batch, stream);
  }
}

template <typename T>
int dispatch_shape(const DecodeParams& p, int64_t batch, int64_t head_dim, int64_t block_size,
                   cudaStream_t stream) {
  if (head_dim == 128 && block_size == 16) return dispatch_tile<T, 128, 16>(p, batch, stream);
  if (head_dim == 128 && block_size == 32) return dispatch_tile<T, 128, 32>(p, batch, stream);
  if (head_dim == 64 && block_size == 16) return dispatch_tile<T, 64, 16>(p, batch, stream);
  if (head_dim == 64 && block_size == 32) return dispatch_tile<T, 64, 32>(p, batch, stream);
  return NEOD_ERR_UNSUPPORTED;
}

}  // namespace
}  // namespace neod

extern "C" int neod_paged_decode_max_splits(int64_t batch, int64_t num_q_heads,
                                            int64_t num_kv_heads, int64_t max_seq_len,
                                            int64_t num_sms) {
  if (batch <= 0 || num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0 || num_sms <= 0) {
    return 1;
  }
  const int64_t group = num_q_heads / num_kv_heads;
  const int64_t blocks = batch * num_kv_heads * (group / neod::group_tile(static_cast<int>(group)));
  const int64_t target = num_sms * neod::kBlocksPerSm;
  if (blocks >= target) return 1;
  int64_t splits = neod::ceil_div(target, blocks);
  const int64_t by_length = neod::ceil_div(max_seq_len > 1 ? max_seq_len : 1, neod::kMinChunk);
  splits = splits < by_length ? splits : by_length;
  return static_cast<int>(splits < neod::kMaxSplits ? splits : neod::kMaxSplits);
}

extern "C" int64_t neod_paged_decode_workspace_bytes(int64_t batch, int64_t num_q_heads,
                                                     int64_t head_dim, int64_t max_splits) {
  if (max_splits <= 1) return 0;
  return batch * num_q_heads * max_splits * (head_dim + 1) * static_cast<int64_t>(sizeof(float));
}

extern "C" int neod_paged_decode_attention(void* out, int64_t out_stride, const void* q,
                                           int64_t q_stride, const void* kv_layer,
                                           const int32_t* block_tables,
                                           int64_t block_table_stride, const int32_t* seq_lens,
                                           int64_t batch, int64_t num_q_heads,
                                           int64_t num_kv_heads, int64_t head_dim,
                                           int64_t block_size, float scale, int64_t max_splits,
                                           void* workspace, int64_t workspace_bytes, int dtype,
                                           cudaStream_t stream) {
  if (batch < 0 || batch > 65535 || num_kv_heads <= 0 || num_q_heads <= 0 ||
      num_q_heads % num_kv_heads != 0 || num_q_heads > 65535 || max_splits < 1 ||
      max_splits > neod::kMaxSplits || !neod::aligned16(q) || !neod::aligned16(out) ||
      !neod::aligned16(kv_layer) || q_stride % 8 != 0 || out_stride % 8 != 0) {
    return NEOD_ERR_INVALID_ARGUMENT;
  }
  if (batch == 0) return NEOD_OK;
  const int64_t needed =
      neod_paged_decode_workspace_bytes(batch, num_q_heads, head_dim, max_splits);
  if (workspace_bytes < needed || (needed > 0 && !neod::aligned16(workspace))) {
    return NEOD_ERR_WORKSPACE;
  }
  float* partial_out = static_cast<float*>(workspace);
  neod::DecodeParams p{};
  p.out = out;
  p.out_stride = out_stride;
  p.q = q;
  p.q_stride = q_stride;
  p.kv_layer = kv_layer;
  p.block_tables = block_tables;
  p.block_table_stride = block_table_stride;
  p.seq_lens = seq_lens;
  p.partial_out = partial_out;
  p.partial_lse = needed > 0 ? partial_out + batch * num_q_heads * max_splits * head_dim : nullptr;
  p.num_q_heads = static_cast<int>(num_q_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.group = static_cast<int>(num_q_heads / num_kv_heads);
  p.max_splits = static_cast<int>(max_splits);
  p.scale_log2 = scale * 1.4426950408889634f;
  NEOD_DISPATCH_HALF(
      dtype, return neod::dispatch_shape<scalar_t>(p, batch, head_dim, block_size, stream););
}
