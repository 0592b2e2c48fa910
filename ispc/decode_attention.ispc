// Paged decode attention on the CPU: one new query token per request against that request's
// paged KV cache, as NEO offloads it (docs/architecture.md fixes the layout).
//
// Design: SIMD lanes run along head_dim, so a K or V row is a few contiguous vector loads,
// converted to fp32 once and reused by every query head of its GQA group. Work advances in chunks
// of whole blocks (>= 64 tokens): first the scores of the chunk's K tiles, head by head in memory
// order, then one online-softmax step per query head (max, exp, rescale of the fp32 accumulator,
// paid once per chunk), then the chunk's V tiles, again in memory order. Every K and V byte is
// read from memory exactly once; the next tile is prefetched while one is computed, because every
// 4 KiB tile is a new page and hardware prefetchers stop at page boundaries.
//
// The caller (neod/cython/neod_decode.c) cuts the batch into work items of whole blocks, balanced
// by KV bytes across threads; an item that covers a whole request writes the final output, a piece
// of a longer request writes an fp32 partial that neod_merge_partials folds in by log-sum-exp.
// Nothing here allocates or holds static state: every buffer is sized by the caller.

#include "decode_attention.isph"

// Vectors in the longest supported row (head_dim 128); sizes the key-row register array.
#define MAX_ROW_VECTORS (128 / TARGET_WIDTH)

// ---- element conversion ---------------------------------------------------------------------

// Rows live in registers and scratch in "SIMD order", vector v of a row holding programCount of its
// elements. For fp16 that is plain order (hardware conversion). For bf16 one 32-bit load gives two
// vectors with no shuffle: the low halves of 2 * programCount elements (the even ones) shifted up,
// and the high halves (the odd ones) masked, so vector 2c holds elements 2(c * programCount + i)
// and vector 2c + 1 elements 2(c * programCount + i) + 1. Dot products and weighted sums of rows
// do not depend on the order; store_pair puts elements back in place.
template <int BF16>
static inline varying float load_row(const uniform uint16 * uniform row, uniform int v) {
    if (BF16) {
        const uniform uint32 * uniform words = (const uniform uint32 * uniform)row;
        varying uint32 w = words[(v >> 1) * programCount + programIndex];
        return floatbits((v & 1) ? (w & 0xffff0000) : (w << 16));
    } else {
        const uniform float16 * uniform h = (const uniform float16 * uniform)row;
        return (float)h[v * programCount + programIndex];
    }
}

// fp32 -> bf16 with round-to-nearest-even; NaN stays a (quiet) NaN instead of rounding to inf.
static inline varying uint32 to_bf16(varying float x) {
    varying uint32 bits = intbits(x);
    varying uint32 rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
    if (x != x) {
        rounded = (bits >> 16) | 0x40;
    }
    return rounded;
}

// Stores vectors v and v + 1 (v even) of a row held in SIMD order, in the row's element order.
template <int BF16>
static inline void store_pair(uniform uint16 * uniform row, uniform int v, varying float x0,
                              varying float x1) {
    if (BF16) {
        uniform uint32 * uniform words = (uniform uint32 * uniform)row;
        words[(v >> 1) * programCount + programIndex] = to_bf16(x0) | (to_bf16(x1) << 16);
    } else {
        uniform float16 * uniform h = (uniform float16 * uniform)row;
        h[v * programCount + programIndex] = (float16)x0;
        h[(v + 1) * programCount + programIndex] = (float16)x1;
    }
}

// ---- building blocks ------------------------------------------------------------------------

// In place over rows [0, programCount) of `rows` (one vector each): lane i of row 0 becomes the
// sum of all lanes of row i. A transposing tree of programCount - 1 shuffle pairs, instead of one
// horizontal reduction per row.
static inline unmasked void transpose_sum(uniform float rows[]) {
    // shuffle(a, b, i) indexes the concatenation [a | b]: lane i of `even` picks lane 2i of it.
    varying int32 even = 2 * programIndex;
    varying int32 odd = even + 1;
    for (uniform int n = programCount / 2; n >= 1; n /= 2) {
        for (uniform int i = 0; i < n; i++) {
            varying float a = rows[(2 * i) * programCount + programIndex];
            varying float b = rows[(2 * i + 1) * programCount + programIndex];
            rows[i * programCount + programIndex] = shuffle(a, b, even) + shuffle(a, b, odd);
        }
    }
}

// Prefetches one row of D 16-bit elements into L2 (a no-op for NULL). L2, not L1: the row is
// used a whole tile later, and L1 holds the working set of the tile being computed.
template <int D>
static inline void prefetch_row(const uniform uint16 * uniform row) {
    if (row != NULL) {
        for (uniform int i = 0; i < D; i += 32) {
            prefetch_l2(row + i);
        }
    }
}

// Converts rows [0, num_rows) of a (block, K|V, head) tile to fp32 rows of `tile`, prefetching
// the same rows of `next`, the tile processed after this one.
template <int BF16, int D>
static inline unmasked void load_tile(const uniform uint16 * uniform src, uniform int num_rows,
                                      uniform float tile[], const uniform uint16 * uniform next) {
    for (uniform int t = 0; t < num_rows; t++) {
        prefetch_row<D>(next == NULL ? NULL : next + t * D);
        for (uniform int c = 0; c < D / programCount; c++) {
            tile[t * D + c * programCount + programIndex] = load_row<BF16>(src + t * D, c);
        }
    }
}

// acc[0, 8 vectors) += sum over t < num_tokens of p[t] * rows[t * stride + (0, 8 vectors)].
// Named accumulators, not an array: LLVM keeps them in registers (an array stays in memory), and
// eight independent FMA chains cover the FMA latency.
static inline unmasked void accumulate8(uniform float acc[], const uniform float rows[],
                                        const uniform float p[], uniform int num_tokens,
                                        uniform int stride) {
    uniform const int W = programCount;
    varying float o0 = acc[programIndex], o1 = acc[W + programIndex];
    varying float o2 = acc[2 * W + programIndex], o3 = acc[3 * W + programIndex];
    varying float o4 = acc[4 * W + programIndex], o5 = acc[5 * W + programIndex];
    varying float o6 = acc[6 * W + programIndex], o7 = acc[7 * W + programIndex];
    for (uniform int t = 0; t < num_tokens; t++) {
        const uniform float * uniform r = rows + t * stride;
        uniform const float w = p[t];
        o0 += w * r[programIndex];
        o1 += w * r[W + programIndex];
        o2 += w * r[2 * W + programIndex];
        o3 += w * r[3 * W + programIndex];
        o4 += w * r[4 * W + programIndex];
        o5 += w * r[5 * W + programIndex];
        o6 += w * r[6 * W + programIndex];
        o7 += w * r[7 * W + programIndex];
    }
    acc[programIndex] = o0;
    acc[W + programIndex] = o1;
    acc[2 * W + programIndex] = o2;
    acc[3 * W + programIndex] = o3;
    acc[4 * W + programIndex] = o4;
    acc[5 * W + programIndex] = o5;
    acc[6 * W + programIndex] = o6;
    acc[7 * W + programIndex] = o7;
}

// The same for 4-vector rows, with even and odd tokens in separate accumulators (8 chains).
static inline unmasked void accumulate4(uniform float acc[], const uniform float rows[],
                                        const uniform float p[], uniform int num_tokens,
                                        uniform int stride) {
    uniform const int W = programCount;
    varying float e0 = acc[programIndex], e1 = acc[W + programIndex];
    varying float e2 = acc[2 * W + programIndex], e3 = acc[3 * W + programIndex];
    varying float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
    uniform int t = 0;
    for (; t + 1 < num_tokens; t += 2) {
        const uniform float * uniform r = rows + t * stride;
        uniform const float we = p[t], wd = p[t + 1];
        e0 += we * r[programIndex];
        e1 += we * r[W + programIndex];
        e2 += we * r[2 * W + programIndex];
        e3 += we * r[3 * W + programIndex];
        d0 += wd * r[stride + programIndex];
        d1 += wd * r[stride + W + programIndex];
        d2 += wd * r[stride + 2 * W + programIndex];
        d3 += wd * r[stride + 3 * W + programIndex];
    }
    if (t < num_tokens) {
        const uniform float * uniform r = rows + t * stride;
        uniform const float we = p[t];
        e0 += we * r[programIndex];
        e1 += we * r[W + programIndex];
        e2 += we * r[2 * W + programIndex];
        e3 += we * r[3 * W + programIndex];
    }
    acc[programIndex] = e0 + d0;
    acc[W + programIndex] = e1 + d1;
    acc[2 * W + programIndex] = e2 + d2;
    acc[3 * W + programIndex] = e3 + d3;
}

// ---- one work item: request `b`, blocks [block_begin, block_end) of its table ----------------

// D (head_dim) is a compile-time constant so that the loops over a row unroll into registers.
template <int BF16, int D>
static unmasked void attend(const uniform NeodDecodeArgs * uniform a,
                            const uniform NeodWorkItem * uniform item,
                            const uniform NeodScratch * uniform scr, uniform float out_partial[],
                            uniform float lse_partial[]) {
    uniform const int NC = D / programCount;           // vectors per row
    uniform const int b = item->request;
    uniform const int hq = a->num_q_heads;
    uniform const int hkv = a->num_kv_heads;
    uniform const int group = hq / hkv;
    uniform const int bs = a->block_size;
    uniform const int bs_padded = (bs + 15) & ~15;    // see NeodScratch
    uniform const int seq_len = a->seq_lens[b];
    uniform const int64 head_stride = (uniform int64)bs * D;         // one (block, K|V, head) tile
    uniform const int64 block_stride = 2 * (uniform int64)hkv * head_stride;
    const uniform uint16 * uniform kv = (const uniform uint16 * uniform)a->kv;
    const uniform uint16 * uniform q = (const uniform uint16 * uniform)a->q + (uniform int64)b * hq * D;
    const uniform int32 * uniform table = a->block_tables + (uniform int64)b * a->max_blocks;
    uniform float * uniform qf = scr->q;       // [hq, D] scaled query
    uniform float * uniform acc = scr->acc;    // [hq, D] unnormalised output
    uniform float * uniform m = scr->max;      // [hq] running max of scores
    uniform float * uniform l = scr->sum;      // [hq] running sum of exp(score - max)
    uniform const int chunk_blocks = scr->chunk_blocks;
    uniform const int row = chunk_blocks * bs_padded;    // one head's scores over a chunk
    uniform float * uniform s = scr->scores;   // [hq, row] scores, then probabilities
    uniform float * uniform part = scr->part;  // [group, bs_padded, programCount] partial dots
    uniform float * uniform tile = scr->tile;  // [bs_padded, D] fp32 copy of a V tile

    for (uniform int h = 0; h < hq; h++) {
        for (uniform int c = 0; c < NC; c++) {
            uniform int col = c * programCount;
            qf[h * D + col + programIndex] = load_row<BF16>(q + h * D, c) * a->scale;
            acc[h * D + col + programIndex] = 0.0f;
        }
        m[h] = -floatbits(0x7f800000);
        l[h] = 0.0f;
    }

    // Chunks of whole blocks: scores of the chunk's blocks (head by head, K tiles in memory order),
    // one online-softmax step per query head for the whole chunk, then the chunk's V tiles.
    for (uniform int j0 = item->block_begin; j0 < item->block_end; j0 += chunk_blocks) {
        uniform const int j1 = min(j0 + chunk_blocks, item->block_end);
        for (uniform int j = j0; j < j1; j++) {
            uniform const int num_tokens = min(bs, seq_len - j * bs);
            uniform const int num_padded = (num_tokens + programCount - 1) & ~(programCount - 1);
            const uniform uint16 * uniform k_block = kv + (uniform int64)table[j] * block_stride;
            for (uniform int kh = 0; kh < hkv; kh++) {
                const uniform uint16 * uniform k_tile = k_block + kh * head_stride;
                uniform float * uniform qg = qf + kh * group * D;
                // Every tile is a fresh 4 KiB page, where hardware prefetchers stop: fetch the
                // tile processed next (next head's K, next block's K, or the chunk's first V)
                // a row at a time while this one is computed.
                const uniform uint16 * uniform next = kh + 1 < hkv ? k_tile + head_stride
                    : j + 1 < j1 ? kv + (uniform int64)table[j + 1] * block_stride
                    : kv + (uniform int64)table[j0] * block_stride + hkv * head_stride;

                // Partial dot products: each key row is converted once and used by the whole
                // group; two accumulators per dot halve the FMA dependency chain.
                for (uniform int t = 0; t < num_tokens; t++) {
                    prefetch_row<D>(next + t * D);
                    varying float k[MAX_ROW_VECTORS];
                    for (uniform int c = 0; c < NC; c++) {
                        k[c] = load_row<BF16>(k_tile + t * D, c);
                    }
                    for (uniform int g = 0; g < group; g++) {
                        uniform float * uniform qh = qg + g * D;
                        varying float even = qh[programIndex] * k[0];
                        varying float odd = qh[programCount + programIndex] * k[1];
                        for (uniform int c = 2; c < NC; c += 2) {
                            even += qh[c * programCount + programIndex] * k[c];
                            odd += qh[(c + 1) * programCount + programIndex] * k[c + 1];
                        }
                        part[(g * bs_padded + t) * programCount + programIndex] = even + odd;
                    }
                }

                // Scores, programCount tokens at a time; padding slots get -inf (weight 0).
                for (uniform int g = 0; g < group; g++) {
                    uniform float * uniform sg = s + (kh * group + g) * row + (j - j0) * bs_padded;
                    for (uniform int t0 = 0; t0 < num_padded; t0 += programCount) {
                        uniform float * uniform rows = part + (g * bs_padded + t0) * programCount;
                        transpose_sum(rows);
                        sg[t0 + programIndex] = t0 + programIndex < num_tokens
                            ? rows[programIndex] : -floatbits(0x7f800000);
                    }
                    for (uniform int t0 = num_padded; t0 < bs_padded; t0 += programCount) {
                        sg[t0 + programIndex] = -floatbits(0x7f800000);
                    }
                }
            }
        }

        // Online softmax over the chunk: probabilities overwrite the scores, and each head's
        // accumulator is rescaled once per chunk.
        uniform const int chunk_len = (j1 - j0) * bs_padded;
        for (uniform int h = 0; h < hq; h++) {
            uniform float * uniform sh = s + h * row;
            varying float vmax = -floatbits(0x7f800000);
            for (uniform int t0 = 0; t0 < chunk_len; t0 += programCount) {
                vmax = max(vmax, sh[t0 + programIndex]);
            }
            uniform const float m_old = m[h];
            uniform const float m_new = max(m_old, reduce_max(vmax));
            varying float vsum = 0.0f;
            for (uniform int t0 = 0; t0 < chunk_len; t0 += programCount) {
                varying float p = exp(sh[t0 + programIndex] - m_new);
                sh[t0 + programIndex] = p;
                vsum += p;
            }
            uniform const float alpha = exp(m_old - m_new);
            if (alpha != 1.0f) {
                for (uniform int c = 0; c < NC; c++) {
                    acc[h * D + c * programCount + programIndex] *= alpha;
                }
            }
            l[h] = l[h] * alpha + reduce_add(vsum);
            m[h] = m_new;
        }

        // Probability-weighted values, V tiles in memory order: each tile is converted once,
        // then each query head keeps its accumulators in registers across the tile's tokens.
        for (uniform int j = j0; j < j1; j++) {
            uniform const int num_tokens = min(bs, seq_len - j * bs);
            const uniform uint16 * uniform v_block =
                kv + (uniform int64)table[j] * block_stride + hkv * head_stride;
            for (uniform int kh = 0; kh < hkv; kh++) {
                const uniform uint16 * uniform next = kh + 1 < hkv ? v_block + (kh + 1) * head_stride
                    : j + 1 < j1 ? kv + (uniform int64)table[j + 1] * block_stride + hkv * head_stride
                    : j1 < item->block_end ? kv + (uniform int64)table[j1] * block_stride : NULL;
                load_tile<BF16, D>(v_block + kh * head_stride, num_tokens, tile, next);
                for (uniform int h = kh * group; h < (kh + 1) * group; h++) {
                    uniform float * uniform p = s + h * row + (j - j0) * bs_padded;
                    if (NC == 4) {
                        accumulate4(acc + h * D, tile, p, num_tokens, D);
                    } else {
                        for (uniform int c0 = 0; c0 < NC; c0 += 8) {
                            accumulate8(acc + h * D + c0 * programCount,
                                        tile + c0 * programCount, p, num_tokens, D);
                        }
                    }
                }
            }
        }
    }

    // Normalise; a whole request goes straight to the output in the KV dtype.
    uniform bool whole = item->partial < 0;
    uniform uint16 * uniform out = (uniform uint16 * uniform)a->out + (uniform int64)b * hq * D;
    for (uniform int h = 0; h < hq; h++) {
        uniform const float inv = 1.0f / l[h];
        uniform const float lse = m[h] + log(l[h]);
        uniform float * uniform partial = out_partial + ((uniform int64)item->partial * hq + h) * D;
        for (uniform int c = 0; c < NC; c += 2) {
            varying float o0 = acc[h * D + c * programCount + programIndex] * inv;
            varying float o1 = acc[h * D + (c + 1) * programCount + programIndex] * inv;
            if (whole) {
                store_pair<BF16>(out + h * D, c, o0, o1);
            } else {  // partials stay in SIMD order: only merge reads them
                partial[c * programCount + programIndex] = o0;
                partial[(c + 1) * programCount + programIndex] = o1;
            }
        }
        if (whole) {
            if (a->lse != NULL) {
                a->lse[(uniform int64)b * hq + h] = lse;
            }
        } else {
            lse_partial[(uniform int64)item->partial * hq + h] = lse;
        }
    }
}

export void neod_attend(const uniform NeodDecodeArgs * uniform args,
                        const uniform NeodWorkItem * uniform item,
                        const uniform NeodScratch * uniform scratch, uniform float out_partial[],
                        uniform float lse_partial[]) {
    uniform bool bf16 = args->dtype == NEOD_DTYPE_BF16;
    if (args->head_dim == 128) {
        if (bf16) attend<1, 128>(args, item, scratch, out_partial, lse_partial);
        else attend<0, 128>(args, item, scratch, out_partial, lse_partial);
    } else {
        if (bf16) attend<1, 64>(args, item, scratch, out_partial, lse_partial);
        else attend<0, 64>(args, item, scratch, out_partial, lse_partial);
    }
}

// ---- flash-decoding merge: partials [first, first + count) of request `b` ---------------------

template <int BF16>
static unmasked void merge(const uniform NeodDecodeArgs * uniform a, uniform int b, uniform int first,
                  uniform int count, const uniform float out_partial[],
                  const uniform float lse_partial[]) {
    uniform const int hq = a->num_q_heads;
    uniform const int d = a->head_dim;
    uniform uint16 * uniform out = (uniform uint16 * uniform)a->out + (uniform int64)b * hq * d;
    for (uniform int h = 0; h < hq; h++) {
        uniform float lse_max = -floatbits(0x7f800000);
        for (uniform int p = first; p < first + count; p++) {
            lse_max = max(lse_max, lse_partial[(uniform int64)p * hq + h]);
        }
        uniform float total = 0.0f;
        for (uniform int p = first; p < first + count; p++) {
            total += exp(lse_partial[(uniform int64)p * hq + h] - lse_max);
        }
        uniform const float inv_total = 1.0f / total;
        for (uniform int v = 0; v < d / programCount; v += 2) {
            varying float o0 = 0.0f, o1 = 0.0f;
            for (uniform int p = first; p < first + count; p++) {
                uniform float w = exp(lse_partial[(uniform int64)p * hq + h] - lse_max) * inv_total;
                const uniform float * uniform part = out_partial + ((uniform int64)p * hq + h) * d;
                o0 += w * part[v * programCount + programIndex];
                o1 += w * part[(v + 1) * programCount + programIndex];
            }
            store_pair<BF16>(out + h * d, v, o0, o1);
        }
        if (a->lse != NULL) {
            a->lse[(uniform int64)b * hq + h] = lse_max + log(total);
        }
    }
}

export void neod_merge_partials(const uniform NeodDecodeArgs * uniform args, uniform int request,
                                uniform int first, uniform int count,
                                const uniform float out_partial[],
                                const uniform float lse_partial[]) {
    if (args->dtype == NEOD_DTYPE_BF16) {
        merge<1>(args, request, first, count, out_partial, lse_partial);
    } else {
        merge<0>(args, request, first, count, out_partial, lse_partial);
    }
}

// ---- memory-read bandwidth probe ------------------------------------------------------------

// Sums `count` floats with four independent accumulators so that the adds never limit the rate:
// the result only keeps the loads alive; its value is meaningless. Offsets past 2 GiB go into the
// uniform pointer, never into a varying index (ISPC computes varying offsets in 32 bits).
export uniform float neod_read_sum(const uniform float data[], uniform int64 count) {
    varying float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    uniform const int step = 4 * programCount;
    const uniform float * uniform p = data;
    const uniform float * uniform end = data + (count - count % step);
    for (; p < end; p += step) {
        s0 += p[programIndex];
        s1 += p[programCount + programIndex];
        s2 += p[2 * programCount + programIndex];
        s3 += p[3 * programCount + programIndex];
    }
    uniform const int tail = (uniform int)(count % step);
    foreach (i = 0 ... tail) {
        s0 += p[i];
    }
    return reduce_add((s0 + s1) + (s2 + s3));
}
