/* The tile products of the CPU decode attention on AMX (Intel Sapphire Rapids and later).
 *
 * On GQA shapes every K and V row meets `group` query heads, and the fp32 FMAs of the ISPC kernel
 * bound it at a few GB/s of KV per core; one AMX tile multiply does 16 x 16 x 32 multiply-adds.
 * The ISPC kernel (ispc/decode_attention.ispc) keeps everything else: work items, chunks, online
 * softmax, the operand layouts below, partials. ISPC cannot emit AMX instructions, hence this C
 * file. Products are exact (bf16 x bf16) and summed in fp32, as on the fp32 path.
 *
 * Per worker thread: neod_amx_configure before the first tile, neod_amx_release after the last
 * (not needed for software tiles).
 *
 * Scores of up to NEOD_AMX_SCORE_TILES tiles of 16 tokens at a time, layouts:
 *   tiles[i] num_tokens[i] <= 16 rows of [head_dim] bf16: K rows of one (block, KV head)
 *   q_pairs  [head_dim / 2, 16] uint32: the group's query heads as bf16 pairs, transposed (the
 *            "VNNI" layout a tile multiply takes its right operand in), columns past the group zero
 *   scores   [num_tiles, 16, 16] fp32: scores[i, t, h] = q[h] . tiles[i][t], unscaled; rows past
 *            num_tokens[i] are left undefined
 *
 * Weighted values, over `steps` steps of 32 score slots (groups of up to NEOD_AMX_MAX_VALUE_GROUP
 * query heads):
 *   probs   [16, steps * 32] bf16: each head's probabilities split in two bf16 parts, the high
 *           parts in rows [0, group), the rest (p - high, rounded) in rows [group, 2 group), so
 *           the sum of both rows keeps 16 bits of each probability; later rows are ignored
 *   pairs   [steps, head_dim / 32, 2, 16, 16] uint32: the V rows of the slots, as pairs of
 *           consecutive slots (pair row k of a step: slots 2k and 2k + 1, low and high half);
 *           [., c, 0, ., i] holds element 32c + 2i, [., c, 1, ., i] element 32c + 2i + 1; the
 *           slots of missing tokens are zero
 *   out     [head_dim / 32, 2, 16, 16] fp32: out[c, e, r, i] = sum over the slots of
 *           probs[r, slot] * V[slot, 32c + 2i + e]
 *
 * Software tiles (soft != 0): the same products in C loops, no AMX needed, so that hosts without
 * AMX test every layout above; for tests only (orders of magnitude slower). */
#ifndef NEOD_AMX_H
#define NEOD_AMX_H

#include <stdint.h>

/* Query heads per KV head the score tiles handle (the columns of one tile). */
#define NEOD_AMX_MAX_GROUP 16
/* K tiles (16 tokens each) per neod_amx_tile_scores call. */
#define NEOD_AMX_SCORE_TILES 4
/* Query heads per KV head the value tiles handle (two rows each, 16 rows in a tile). */
#define NEOD_AMX_MAX_VALUE_GROUP 8

/* Whether this process may use AMX-BF16: the CPU has it and the kernel granted the tile state. */
int neod_amx_supported(void);

/* Sets this thread's tiles up (every tile 16 rows x 64 bytes). */
void neod_amx_configure(void);
void neod_amx_release(void);

/* scores = the K tiles x q_pairs, in the layouts above (num_tiles <= NEOD_AMX_SCORE_TILES). */
void neod_amx_tile_scores(const uint16_t *const *tiles, const int *num_tokens, int num_tiles,
                          const uint32_t *q_pairs, int head_dim, float *scores, int soft);

/* out = probs x V over `steps` steps, in the layouts above. */
void neod_amx_tile_values(const uint16_t *probs, int steps, const uint32_t *pairs, int head_dim,
                          float *out, int soft);

#endif
