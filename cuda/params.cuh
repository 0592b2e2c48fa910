/*
 * Kernel parameter structs: each kernel takes exactly one of these by value, so a launcher fills
 * one struct after validating its arguments and every specialization of a kernel shares it.
 * Strides count elements of the tensor's dtype.
 */
#pragma once

#include <cstdint>

namespace neod {

struct NormParams {
  void* out;             // [T, H]; == x for the fused in-place variant
  int64_t out_stride;
  const void* x;         // [T, H]
  int64_t x_stride;
  void* residual;        // [T, H]; nullptr for the plain norm
  int64_t residual_stride;
  const void* weight;    // [H]
  int64_t num_tokens;
  int64_t hidden;
  float eps;
};

struct RopeParams {
  const int64_t* positions;  // [T]
  void* q;                   // [T, Hq, D], heads contiguous
  int64_t q_stride;
  void* k;                   // [T, Hkv, D], heads contiguous
  int64_t k_stride;
  const float* cos_sin;      // [max_pos, D]: cos in [:D/2], sin in [D/2:]
  int64_t num_tokens;
  int num_q_heads;
  int num_kv_heads;
  int head_dim;
};

struct ActivationParams {
  void* out;        // [T, I]
  const void* x;    // [T, 2I] = gate | up
  int64_t x_stride;
  int64_t num_tokens;
  int64_t inter;
};

struct KVRowsParams {
  void* k;                 // [T, Hkv, D]: read by a store, written by a load
  int64_t k_stride;        // in copy units
  void* v;
  int64_t v_stride;
  void* kv_layer;          // [num_blocks, 2, Hkv, block_size, D]: a load's may be mapped host memory
  const int64_t* slot_ids; // [T], -1 = skip
  int64_t num_tokens;
  int num_kv_heads;
  int row_units;           // head_dim in copy units
  int block_size;
};

struct DecodeParams {
  void* out;                  // [B, Hq, D], heads contiguous
  int64_t out_stride;         // between requests
  const void* q;              // [B, Hq, D], heads contiguous
  int64_t q_stride;
  const void* kv_layer;       // [num_blocks, 2, Hkv, block_size, D]
  const int32_t* block_tables;  // [B, block_table_stride]
  int64_t block_table_stride;
  const int32_t* seq_lens;    // [B]
  float* partial_out;         // [B, Hq, max_splits, D], used when max_splits > 1
  float* partial_lse;         // [B, Hq, max_splits], log2 domain
  int num_q_heads;
  int num_kv_heads;
  int group;                  // num_q_heads / num_kv_heads
  int max_splits;
  float scale_log2;           // softmax scale * log2(e): scores live in the exp2 domain
};

struct SwapParams {
  const char* src;
  int64_t src_layer_bytes;
  char* dst;
  int64_t dst_layer_bytes;
  int64_t chunk_bytes;
  const int64_t* pairs;   // [n, 2] (src, dst), device-readable
  int64_t num_pairs;
  const int64_t* layers;  // [num_layers], device-readable
};

}  // namespace neod
