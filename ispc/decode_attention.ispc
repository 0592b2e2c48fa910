// Paged decode attention on the CPU: one new query token per request against that request's
// paged KV cache, as NEO offloads it (docs/architecture.md fixes the layout).
//
// Design: SIMD lanes run along head_dim, so a K or V row is a few contiguous vector loads,
// converted to fp32 in registers and reused by several query heads of its GQA group. The kernel is
// bound by FMA issue, so it keeps the FMAs' operands in registers: K dots hold the query vectors
// of 2-4 heads, V sums hold the output accumulators of several heads, both across a whole tile or
// chunk. Work advances in chunks of whole blocks (>= 64 tokens): first the scores of the chunk's K
// tiles, then one online-softmax step per query head (max, exp, rescale of the fp32 accumulator,
// paid once per chunk), then the chunk's V tiles; both phases walk KV head by KV head, the chunk's
// blocks inside. Every K and V byte is read from memory once (repeat passes over a tile hit L1);
// tiles are prefetched a KV head ahead, because every 4 KiB tile is a new page and hardware
// prefetchers stop at page boundaries.
//
// On CPUs with AMX (bf16 KV), the tile products run on AMX instead (neod/cython/neod_amx.h): the
// scores of four 16-token K tiles per call, the weighted V rows of four 16-token steps per call,
// both reading the KV rows where they lie; this file keeps the rest (operands, online softmax,
// sums into the fp32 accumulator).
//
// The caller (neod/cython/neod_decode.c) cuts the batch into work items of whole blocks, balanced
// by KV bytes across threads; an item that covers a whole request writes the final output, a piece
// of a longer request writes an fp32 partial that neod_merge_partials folds in by log-sum-exp.
// Nothing here allocates or holds static state: every buffer is sized by the caller.

#include "decode_attention.isph"

// Tile products on AMX (neod/cython/neod_amx.h, which gives the operand layouts): ISPC cannot
// emit AMX instructions. soft: the same products in software, for tests.
extern "C" void neod_amx_tile_scores(const uniform uint16 * uniform * uniform tiles,
                                     const uniform int * uniform num_tokens, uniform int num_tiles,
                                     const uniform uint32 * uniform q_pairs, uniform int head_dim,
                                     uniform float * uniform scores, uniform int soft);
extern "C" void neod_amx_tile_values(const uniform uint16 * uniform * uniform tiles,
                                     const uniform int * uniform num_tokens, uniform int steps,
                                     const uniform uint32 * uniform probs, uniform int head_dim,
                                     uniform float * uniform out, uniform int soft);
// K tiles per neod_amx_tile_scores call (NEOD_AMX_SCORE_TILES), V tiles per
// neod_amx_tile_values call (NEOD_AMX_VALUE_STEPS).
#define AMX_SCORE_TILES 4
#define AMX_VALUE_STEPS 4

// Vectors in the longest supported row (head_dim 128); sizes the key-row array of dot_group.
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

// Lane i of the result is the sum of all lanes of rows[i], i < programCount: a transposing tree of
// programCount - 1 shuffle pairs in registers, instead of one horizontal reduction per row.
static inline varying float transpose_sum(const uniform float rows[]) {
    // shuffle(a, b, i) indexes the concatenation [a | b]: lane i of `even` picks lane 2i of it.
    varying int32 even = 2 * programIndex;
    varying int32 odd = even + 1;
    varying float r[programCount];
    #pragma unroll
    for (uniform int i = 0; i < programCount; i++) {
        r[i] = rows[i * programCount + programIndex];
    }
    #pragma unroll
    for (uniform int n = programCount / 2; n >= 1; n /= 2) {
        #pragma unroll
        for (uniform int i = 0; i < n; i++) {
            r[i] = shuffle(r[2 * i], r[2 * i + 1], even) + shuffle(r[2 * i], r[2 * i + 1], odd);
        }
    }
    return r[0];
}

// Prefetches one row of D 16-bit elements into L2. L2, not L1: the row is used a whole KV head
// later, and L1 holds the working set of the tiles being computed.
template <int D>
static inline void prefetch_row(const uniform uint16 * uniform row) {
    for (uniform int i = 0; i < D; i += 32) {
        prefetch_l2(row + i);
    }
}

// Where the tiles of one chunk live, and which tiles to prefetch while computing them.
struct Chunk {
    const uniform uint16 * uniform kv;
    const uniform int32 * uniform table;   // the request's block table
    uniform int64 block_stride;            // elements per block (K and V of every KV head)
    uniform int64 head_stride;             // elements per tile: one (block, K|V, KV head)
    uniform int j0, j1;                    // the chunk's blocks [j0, j1) of the table
    uniform int block_end;                 // the work item's end, for the next chunk's K
    uniform int seq_len;
    uniform int bs;
};

// Tile of block j (table index), KV head kh; kv_part 0 for K, 1 for V.
static inline const uniform uint16 * uniform tile_at(const uniform Chunk &c, uniform int j,
                                                     uniform int kv_part, uniform int kh,
                                                     uniform int hkv) {
    return c.kv + (uniform int64)c.table[j] * c.block_stride + (kv_part * hkv + kh) * c.head_stride;
}

// The tile read one KV head after (j, kv_part, kh): both phases walk KV head by KV head, the
// chunk's blocks inside, so this is the same block's next head; after the last head, K leads to the
// chunk's V and V to the next chunk's K (block j + chunk size), NULL past the work item.
static inline const uniform uint16 * uniform tile_after(const uniform Chunk &c, uniform int j,
                                                        uniform int kv_part, uniform int kh,
                                                        uniform int hkv) {
    if (kh + 1 < hkv) return tile_at(c, j, kv_part, kh + 1, hkv);
    if (kv_part == 0) return tile_at(c, j, 1, 0, hkv);
    uniform int next = j + (c.j1 - c.j0);
    return next < c.block_end ? tile_at(c, next, 0, 0, hkv) : NULL;
}

// Named variables, not arrays: ISPC keeps varying arrays that live across a loop in memory.
#define EACH8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define EACH16(X) EACH8(X) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)

// x_i for a compile-time i < 8 (or < 16): folds to one variable.
static inline varying float pick(uniform int i, varying float x0, varying float x1,
                                 varying float x2, varying float x3, varying float x4,
                                 varying float x5, varying float x6, varying float x7) {
    return i == 0 ? x0 : i == 1 ? x1 : i == 2 ? x2 : i == 3 ? x3
         : i == 4 ? x4 : i == 5 ? x5 : i == 6 ? x6 : x7;
}

static inline varying float pick16(uniform int i, varying float x0, varying float x1,
                                   varying float x2, varying float x3, varying float x4,
                                   varying float x5, varying float x6, varying float x7,
                                   varying float x8, varying float x9, varying float x10,
                                   varying float x11, varying float x12, varying float x13,
                                   varying float x14, varying float x15) {
    return i < 8 ? pick(i, x0, x1, x2, x3, x4, x5, x6, x7)
                 : pick(i - 8, x8, x9, x10, x11, x12, x13, x14, x15);
}

#if TARGET_WIDTH == 16
// Partial dot products of QH = 16 / NC query heads against the tile's key rows, the heads' 16
// query vectors held in registers: each key row is loaded (half a vector load per vector, bf16)
// and converted once per pass, and every FMA takes both operands from registers. Without this the
// FMAs wait on the loads of the query (one vector load per FMA, the load ports' limit).
template <int BF16, int D>
static inline unmasked void dot_heads(const uniform uint16 * uniform tile, uniform int num_tokens,
                                      const uniform float qg[], uniform float part[],
                                      uniform int bs_padded,
                                      const uniform uint16 * uniform next) {
    uniform const int NC = D / programCount;
    uniform const int QH = 16 / NC;
#define LOAD_Q(i) varying float q##i = qg[i * programCount + programIndex];
    EACH16(LOAD_Q)
    for (uniform int t = 0; t < num_tokens; t++) {
        if (next != NULL) {
            prefetch_row<D>(next + t * D);
        }
#define LOAD_K(i) varying float k##i = 0.0f; if (i < NC) k##i = load_row<BF16>(tile + t * D, i);
        EACH8(LOAD_K)
#define QV(h, v) pick16((h) * NC + (v), q0, q1, q2, q3, q4, q5, q6, q7, q8, q9, q10, q11, q12, \
                        q13, q14, q15)
#define HEAD_DOT(h) if (h < QH) { \
            varying float even = QV(h, 0) * k0; \
            varying float odd = QV(h, 1) * k1; \
            even += QV(h, 2) * k2; \
            odd += QV(h, 3) * k3; \
            if (NC == 8) { \
                even += QV(h, 4) * k4; \
                odd += QV(h, 5) * k5; \
                even += QV(h, 6) * k6; \
                odd += QV(h, 7) * k7; \
            } \
            part[(h * bs_padded + t) * programCount + programIndex] = even + odd; \
        }
        HEAD_DOT(0) HEAD_DOT(1) HEAD_DOT(2) HEAD_DOT(3)
    }
}
#endif

// Partial dot products of `group` query heads against the tile's key rows, the query read from
// memory: each key row is converted once and used by every head (two FMA chains per dot).
template <int BF16, int D>
static inline unmasked void dot_group(const uniform uint16 * uniform tile, uniform int num_tokens,
                                      uniform int group, const uniform float qg[],
                                      uniform float part[], uniform int bs_padded,
                                      const uniform uint16 * uniform next) {
    uniform const int NC = D / programCount;
    for (uniform int t = 0; t < num_tokens; t++) {
        prefetch_row<D>(next + t * D);
        varying float k[MAX_ROW_VECTORS];
        for (uniform int v = 0; v < NC; v++) {
            k[v] = load_row<BF16>(tile + t * D, v);
        }
        for (uniform int g = 0; g < group; g++) {
            const uniform float * uniform qh = qg + g * D;
            varying float even = qh[programIndex] * k[0];
            varying float odd = qh[programCount + programIndex] * k[1];
            for (uniform int v = 2; v < NC; v += 2) {
                even += qh[v * programCount + programIndex] * k[v];
                odd += qh[(v + 1) * programCount + programIndex] * k[v + 1];
            }
            part[(g * bs_padded + t) * programCount + programIndex] = even + odd;
        }
    }
}

// Scores of the chunk for the query heads [kh * group, (kh + 1) * group) against KV head kh. The
// partial dot vectors are reduced programCount tokens at a time by transpose_sum; padding slots
// get -inf.
template <int BF16, int D>
static inline unmasked void score_head(const uniform Chunk &c, uniform int kh, uniform int hkv,
                                       uniform int group, const uniform float qg[],
                                       uniform float part[], uniform float sg[], uniform int row,
                                       uniform int bs_padded) {
    for (uniform int j = c.j0; j < c.j1; j++) {
        uniform const int num_tokens = min(c.bs, c.seq_len - j * c.bs);
        const uniform uint16 * uniform tile = tile_at(c, j, 0, kh, hkv);
        const uniform uint16 * uniform next = tile_after(c, j, 0, kh, hkv);
#if TARGET_WIDTH == 16
        // Passes of 16 / NC heads (2 for head_dim 128, 4 for 64); the tile stays in L1.
        uniform const int QH = 16 / (D / programCount);
        uniform int g = 0;
        for (; g + QH <= group; g += QH) {
            dot_heads<BF16, D>(tile, num_tokens, qg + g * D, part + g * bs_padded * programCount,
                               bs_padded, g == 0 ? next : NULL);
        }
        if (g < group) {
            dot_group<BF16, D>(tile, num_tokens, group - g, qg + g * D,
                               part + g * bs_padded * programCount, bs_padded, next);
        }
#else
        dot_group<BF16, D>(tile, num_tokens, group, qg, part, bs_padded, next);
#endif
        uniform const int num_padded = (num_tokens + programCount - 1) & ~(programCount - 1);
        for (uniform int g = 0; g < group; g++) {
            uniform float * uniform s = sg + g * row + (j - c.j0) * bs_padded;
            for (uniform int t0 = 0; t0 < num_padded; t0 += programCount) {
                varying float dots = transpose_sum(part + (g * bs_padded + t0) * programCount);
                s[t0 + programIndex] = t0 + programIndex < num_tokens ? dots : -floatbits(0x7f800000);
            }
            for (uniform int t0 = num_padded; t0 < bs_padded; t0 += programCount) {
                s[t0 + programIndex] = -floatbits(0x7f800000);
            }
        }
    }
}

// The scores of the K tiles gathered so far (AMX_SCORE_TILES at most), scaled and transposed
// from out ([tile, token, head]) into the chunk's score rows.
static inline unmasked void flush_amx_scores(const uniform uint16 * uniform * uniform tiles,
                                             const uniform int counts[], const uniform int slots[],
                                             uniform int num_tiles, uniform int group,
                                             const uniform uint32 qp[], uniform int head_dim,
                                             uniform float scale, uniform float out[],
                                             uniform float sg[], uniform int row,
                                             uniform int soft) {
    neod_amx_tile_scores(tiles, counts, num_tiles, qp, head_dim, out, soft);
    for (uniform int i = 0; i < num_tiles; i++) {
        for (uniform int g = 0; g < group; g++) {
            foreach (t = 0 ... counts[i]) {
                sg[g * row + slots[i] + t] = out[(i * 16 + t) * 16 + g] * scale;
            }
        }
    }
}

// score_head on AMX tiles: the chunk's K tiles of KV head kh, AMX_SCORE_TILES of 16 tokens per
// call, against the query pairs qp ([D / 2, 16], see neod_amx.h).
template <int D>
static inline unmasked void score_head_amx(const uniform Chunk &c, uniform int kh,
                                           uniform int hkv, uniform int group,
                                           const uniform uint32 qp[], uniform float scale,
                                           uniform float out[], uniform float sg[],
                                           uniform int row, uniform int bs_padded,
                                           uniform int soft) {
    const uniform uint16 * uniform tiles[AMX_SCORE_TILES];
    uniform int counts[AMX_SCORE_TILES];
    uniform int slots[AMX_SCORE_TILES];
    uniform int n = 0;
    for (uniform int j = c.j0; j < c.j1; j++) {
        uniform const int num_tokens = min(c.bs, c.seq_len - j * c.bs);
        const uniform uint16 * uniform tile = tile_at(c, j, 0, kh, hkv);
        const uniform uint16 * uniform next = tile_after(c, j, 0, kh, hkv);
        if (next != NULL) {
            for (uniform int t = 0; t < num_tokens; t++) {
                prefetch_row<D>(next + t * D);
            }
        }
        for (uniform int t0 = 0; t0 < num_tokens; t0 += 16) {
            tiles[n] = tile + t0 * D;
            counts[n] = min(16, num_tokens - t0);
            slots[n] = (j - c.j0) * bs_padded + t0;
            if (++n == AMX_SCORE_TILES) {
                flush_amx_scores(tiles, counts, slots, n, group, qp, D, scale, out, sg, row, soft);
                n = 0;
            }
        }
        for (uniform int g = 0; g < group; g++) {
            foreach (t = num_tokens ... bs_padded) {
                sg[g * row + (j - c.j0) * bs_padded + t] = -floatbits(0x7f800000);
            }
        }
    }
    if (n > 0) {
        flush_amx_scores(tiles, counts, slots, n, group, qp, D, scale, out, sg, row, soft);
    }
}

// acc[H heads][vectors v0 .. v0 + S) += probability-weighted V rows of KV head kh over the chunk.
// The H x S <= 16 accumulators (o_i: head i / S, vector i % S) stay in registers across the
// chunk's tiles; each V vector is converted once per pass and used by all H heads. S is capped at
// the row's vector count and even: one bf16 load gives two vectors.
template <int BF16, int D, int H, int S>
static unmasked void weigh_values(const uniform Chunk &c, uniform int kh, uniform int hkv,
                                  uniform float acc[], const uniform float p[], uniform int row,
                                  uniform int bs_padded, uniform int v0, uniform bool prefetch) {
    uniform const int SN = min(S, D / programCount);
    uniform const int N = H * SN;
#define LOAD_ACC(i) varying float o##i = 0.0f; \
    if (i < N) o##i = acc[(i / SN) * D + (v0 + i % SN) * programCount + programIndex];
    EACH16(LOAD_ACC)
    for (uniform int j = c.j0; j < c.j1; j++) {
        uniform const int num_tokens = min(c.bs, c.seq_len - j * c.bs);
        const uniform uint16 * uniform tile = tile_at(c, j, 1, kh, hkv);
        const uniform uint16 * uniform next = prefetch ? tile_after(c, j, 1, kh, hkv) : NULL;
        const uniform float * uniform pj = p + (j - c.j0) * bs_padded;
        for (uniform int t = 0; t < num_tokens; t++) {
            if (next != NULL) {
                prefetch_row<D>(next + t * D);
            }
#define LOAD_V(i) varying float x##i = 0.0f; if (i < SN) x##i = load_row<BF16>(tile + t * D, v0 + i);
            EACH8(LOAD_V)
#define WEIGH(i) if (i < N) o##i += pj[(i / SN) * row + t] * pick(i % SN, x0, x1, x2, x3, x4, x5, x6, x7);
            EACH16(WEIGH)
        }
    }
#define STORE_ACC(i) if (i < N) acc[(i / SN) * D + (v0 + i % SN) * programCount + programIndex] = o##i;
    EACH16(STORE_ACC)
}

// All query heads of KV head kh, `group` of them from acc and p on: passes of H heads over S
// vectors of the row at a time (the last pass may be narrower), H x S accumulators being half the
// vector registers. Heads go 8 (4 below AVX-512), then 4, 2, 1 at a time.
template <int BF16, int D, int H, int S>
static inline unmasked void weigh_heads(const uniform Chunk &c, uniform int kh, uniform int hkv,
                                        uniform float acc[], const uniform float p[],
                                        uniform int row, uniform int bs_padded, uniform bool first) {
    uniform const int NC = D / programCount;
    for (uniform int v0 = 0; v0 < NC; v0 += S) {
        weigh_values<BF16, D, H, S>(c, kh, hkv, acc, p, row, bs_padded, v0, first && v0 == 0);
    }
}

template <int BF16, int D>
static unmasked void weigh_group(const uniform Chunk &c, uniform int kh, uniform int hkv,
                                 uniform int group, uniform float acc[], const uniform float p[],
                                 uniform int row, uniform int bs_padded) {
    uniform int h = 0;
#if TARGET_WIDTH == 16
    for (; h + 8 <= group; h += 8) {
        weigh_heads<BF16, D, 8, 2>(c, kh, hkv, acc + h * D, p + h * row, row, bs_padded, h == 0);
    }
    for (; h + 4 <= group; h += 4) {
        weigh_heads<BF16, D, 4, 4>(c, kh, hkv, acc + h * D, p + h * row, row, bs_padded, h == 0);
    }
#define PAIR_SLICE 8
#else
    for (; h + 4 <= group; h += 4) {
        weigh_heads<BF16, D, 4, 2>(c, kh, hkv, acc + h * D, p + h * row, row, bs_padded, h == 0);
    }
#define PAIR_SLICE 4
#endif
    for (; h + 2 <= group; h += 2) {
        weigh_heads<BF16, D, 2, PAIR_SLICE>(c, kh, hkv, acc + h * D, p + h * row, row, bs_padded, h == 0);
    }
    for (; h < group; h++) {
        weigh_heads<BF16, D, 1, 8>(c, kh, hkv, acc + h * D, p + h * row, row, bs_padded, h == 0);
    }
}

// The weighted V rows of the steps gathered so far (AMX_VALUE_STEPS at most) added to acc, whose
// vectors hold a row in SIMD order: the probabilities of each step become the tile operands
// ([2 parts, 16 rows, 16 tokens] pairs, neod_amx.h), and out ([slices, 16, 16]) gives the sums
// of each slice's even and odd elements.
static inline unmasked void flush_amx_values(const uniform uint16 * uniform * uniform tiles,
                                             const uniform int counts[], const uniform int slots[],
                                             uniform int steps, uniform int group,
                                             uniform int head_dim, const uniform float p[],
                                             uniform int row, uniform float acc[],
                                             uniform uint32 probs[], uniform float out[],
                                             uniform int soft) {
    // The high part is truncated (x - high is then exact), the low one rounded to nearest even; a
    // NaN probability stays NaN in the low part (the result of an operation is a quiet NaN).
    for (uniform int i = 0; i < steps; i++) {
        uniform uint32 * uniform high_part = probs + i * 2 * 256;
        uniform uint32 * uniform low_part = high_part + 256;
        for (uniform int g = 0; g < group; g++) {
            foreach (t = 0 ... 16) {
                varying float x = p[g * row + slots[i] + t];
                varying uint32 high = intbits(x) & 0xffff0000;
                varying uint32 low = intbits(x - floatbits(high));
                low = (low + 0x7fff + ((low >> 16) & 1)) >> 16;
                high_part[g * 16 + t] = high >> 16;
                high_part[(group + g) * 16 + t] = high;
                low_part[g * 16 + t] = low;
                low_part[(group + g) * 16 + t] = low << 16;
            }
        }
    }
    neod_amx_tile_values(tiles, counts, steps, probs, head_dim, out, soft);
    // out[sl, g, n] is element 32 sl + 2 n of head g's row, out[sl, group + g, n] element
    // 32 sl + 2 n + 1.
    for (uniform int sl = 0; sl < head_dim / 32; sl++) {
        for (uniform int e = 0; e < 2; e++) {
            const uniform float * uniform o = out + (sl * 16 + e * group) * 16;
            for (uniform int g = 0; g < group; g++) {
                foreach (n = 0 ... 16) {
#if TARGET_WIDTH == 16
                    acc[g * head_dim + (2 * sl + e) * 16 + n] += o[g * 16 + n];
#else
                    varying int d = 32 * sl + 2 * n + e;
                    acc[g * head_dim + (2 * (d / (2 * programCount)) + e) * programCount
                        + (d % (2 * programCount)) / 2] += o[g * 16 + n];
#endif
                }
            }
        }
    }
}

// weigh_group on AMX tiles, for groups of up to 8 heads: AMX_VALUE_STEPS steps of 16 tokens per
// call, the V rows taken from the cache as they are.
template <int D>
static unmasked void weigh_group_amx(const uniform Chunk &c, uniform int kh, uniform int hkv,
                                     uniform int group, uniform float acc[],
                                     const uniform float p[], uniform int row,
                                     uniform int bs_padded, uniform float tiles[],
                                     uniform int soft) {
    uniform uint32 * uniform probs = (uniform uint32 * uniform)tiles;  // [steps, 2, 16, 16]
    uniform float * uniform out = tiles + AMX_VALUE_STEPS * 2 * 256;   // [D / 32, 16, 16]
    const uniform uint16 * uniform steps[AMX_VALUE_STEPS];
    uniform int counts[AMX_VALUE_STEPS];
    uniform int slots[AMX_VALUE_STEPS];
    uniform int n = 0;
    for (uniform int j = c.j0; j < c.j1; j++) {
        uniform const int num_tokens = min(c.bs, c.seq_len - j * c.bs);
        const uniform uint16 * uniform tile = tile_at(c, j, 1, kh, hkv);
        const uniform uint16 * uniform next = tile_after(c, j, 1, kh, hkv);
        if (next != NULL) {
            for (uniform int t = 0; t < num_tokens; t++) {
                prefetch_row<D>(next + t * D);
            }
        }
        for (uniform int t0 = 0; t0 < num_tokens; t0 += 16) {
            steps[n] = tile + t0 * D;
            counts[n] = min(16, num_tokens - t0);
            slots[n] = (j - c.j0) * bs_padded + t0;
            if (++n == AMX_VALUE_STEPS) {
                flush_amx_values(steps, counts, slots, n, group, D, p, row, acc, probs, out, soft);
                n = 0;
            }
        }
    }
    if (n > 0) {
        flush_amx_values(steps, counts, slots, n, group, D, p, row, acc, probs, out, soft);
    }
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
    const uniform uint16 * uniform q = (const uniform uint16 * uniform)a->q + (uniform int64)b * a->q_stride;
    uniform float * uniform qf = scr->q;       // [hq, D] scaled query
    uniform float * uniform acc = scr->acc;    // [hq, D] unnormalised output
    uniform float * uniform m = scr->max;      // [hq] running max of scores
    uniform float * uniform l = scr->sum;      // [hq] running sum of exp(score - max)
    uniform const int chunk_blocks = scr->chunk_blocks;
    uniform const int row = chunk_blocks * bs_padded;    // one head's scores over a chunk
    uniform float * uniform s = scr->scores;   // [hq, row] scores, then probabilities
    uniform float * uniform part = scr->part;  // [group, bs_padded, programCount] partial dots

    uniform Chunk c;
    c.kv = (const uniform uint16 * uniform)a->kv;
    c.table = a->block_tables + (uniform int64)b * a->max_blocks;
    c.head_stride = (uniform int64)bs * D;
    c.block_stride = 2 * (uniform int64)hkv * c.head_stride;
    c.block_end = item->block_end;
    c.seq_len = a->seq_lens[b];
    c.bs = bs;

    for (uniform int h = 0; h < hq; h++) {
        for (uniform int v = 0; v < NC; v++) {
            uniform int col = v * programCount;
            qf[h * D + col + programIndex] = load_row<BF16>(q + h * D, v) * a->scale;
            acc[h * D + col + programIndex] = 0.0f;
        }
        m[h] = -floatbits(0x7f800000);
        l[h] = 0.0f;
    }
    // AMX scores take the raw bf16 query as pairs, per KV head [D / 2, 16], in qf's place.
    uniform const bool amx = BF16 && a->amx_scores != NEOD_AMX_OFF;
    uniform const bool amx_values = BF16 && a->amx_values != NEOD_AMX_OFF;
    uniform uint32 * uniform qp = (uniform uint32 * uniform)qf;
    if (amx) {
        const uniform uint32 * uniform q_words = (const uniform uint32 * uniform)q;  // [hq, D / 2]
        for (uniform int kh = 0; kh < hkv; kh++) {
            for (uniform int w = 0; w < D / 2; w++) {
                foreach (g = 0 ... 16) {
                    qp[(kh * (D / 2) + w) * 16 + g] =
                        g < group ? q_words[(kh * group + g) * (D / 2) + w] : 0;
                }
            }
        }
    }

    // Chunks of whole blocks: the chunk's scores (KV head by KV head, its blocks inside), one
    // online-softmax step per query head for the whole chunk, then the chunk's V tiles in the
    // same order.
    for (uniform int j0 = item->block_begin; j0 < item->block_end; j0 += chunk_blocks) {
        c.j0 = j0;
        c.j1 = min(j0 + chunk_blocks, item->block_end);
        for (uniform int kh = 0; kh < hkv; kh++) {
            if (amx) {
                score_head_amx<D>(c, kh, hkv, group, qp + kh * (D / 2) * 16, a->scale,
                                  scr->tiles, s + kh * group * row, row, bs_padded,
                                  a->amx_scores == NEOD_AMX_SOFT);
            } else {
                score_head<BF16, D>(c, kh, hkv, group, qf + kh * group * D, part,
                                    s + kh * group * row, row, bs_padded);
            }
        }

        // Online softmax over the chunk: probabilities overwrite the scores, and each head's
        // accumulator is rescaled once per chunk.
        uniform const int chunk_len = (c.j1 - j0) * bs_padded;
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
                for (uniform int v = 0; v < NC; v++) {
                    acc[h * D + v * programCount + programIndex] *= alpha;
                }
            }
            l[h] = l[h] * alpha + reduce_add(vsum);
            m[h] = m_new;
        }

        for (uniform int kh = 0; kh < hkv; kh++) {
            if (amx_values) {
                weigh_group_amx<D>(c, kh, hkv, group, acc + kh * group * D, s + kh * group * row,
                                   row, bs_padded, scr->tiles, a->amx_values == NEOD_AMX_SOFT);
            } else {
                weigh_group<BF16, D>(c, kh, hkv, group, acc + kh * group * D,
                                     s + kh * group * row, row, bs_padded);
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
        for (uniform int v = 0; v < NC; v += 2) {
            varying float o0 = acc[h * D + v * programCount + programIndex] * inv;
            varying float o1 = acc[h * D + (v + 1) * programCount + programIndex] * inv;
            if (whole) {
                store_pair<BF16>(out + h * D, v, o0, o1);
            } else {  // partials stay in SIMD order: only merge reads them
                partial[v * programCount + programIndex] = o0;
                partial[(v + 1) * programCount + programIndex] = o1;
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
