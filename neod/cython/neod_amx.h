/* The tile products of the CPU decode attention on AMX (Intel Sapphire Rapids and later).
 *
 * On GQA shapes every K and V row meets `group` query heads, and the fp32 FMAs of the ISPC kernel
 * bound it at a few GB/s of KV per core; one AMX tile multiply does 16 x 16 x 32 multiply-adds.
 * Both products take the KV rows straight from the paged cache, never rearranged.
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
 * Weighted values of up to NEOD_AMX_VALUE_STEPS steps of 16 tokens at a time (groups of up to
 * NEOD_AMX_MAX_VALUE_GROUP query heads). The V rows are the right operand as they lie in the
 * cache: a tile multiply pairs elements 2n and 2n + 1 of a row, so each head has two rows of
 * probabilities, one in the low and one in the high half of each pair, and gets the sums of the
 * even elements in one and of the odd elements in the other. Layouts:
 *   tiles[s] num_tokens[s] <= 16 rows of [head_dim] bf16: V rows of one (block, KV head)
 *   probs    [steps, 2, 16, 16] uint32: step s, part (the bf16 high part of each probability,
 *            then the rest, p - high, rounded), row, token: rows [0, group) hold head g's
 *            probability in the low half (the high half zero), rows [group, 2 group) in the high
 *            half; later rows are ignored, tokens past num_tokens[s] must be zero
 *   out      [head_dim / 32, 16, 16] fp32: out[c, g, n] = sum over the tokens of p[g] x
 *            V[32c + 2n], out[c, group + g, n] the same for element 32c + 2n + 1
 *
 * Software tiles (soft != 0): the same products in C loops, no AMX needed, so that hosts without
 * AMX test every layout above; for tests only (orders of magnitude slower). */
#ifndef NEOD_AMX_H
#define NEOD_AMX_H

#include <stdint.h>

/* Query heads per KV head the score tiles handle (the columns of one tile). */
#define NEOD_AMX_MAX_GROUP 16
/* K tiles (16 tokens each) per neod_amx_tile_scores call, and V tiles per neod_amx_tile_values
 * call. */
#define NEOD_AMX_SCORE_TILES 4
#define NEOD_AMX_VALUE_STEPS 4
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

/* out = probs x the V tiles, in the layouts above (steps <= NEOD_AMX_VALUE_STEPS). */
void neod_amx_tile_values(const uint16_t *const *tiles, const int *num_tokens, int steps,
                          const uint32_t *probs, int head_dim, float *out, int soft);

#endif
