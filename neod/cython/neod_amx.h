/* The q . k tile product of the CPU decode attention on AMX (Intel Sapphire Rapids and later).
 *
 * On GQA shapes every K row meets `group` query heads, and the fp32 FMAs of the ISPC kernel bound
 * it at a few GB/s of KV per core; one AMX tile multiply does 16 tokens x group heads x 32
 * elements. The ISPC kernel (ispc/decode_attention.ispc) keeps everything else: work items,
 * chunks, online softmax, the weighted sum of V, partials. ISPC cannot emit AMX instructions,
 * hence this C file. Scores are exact bf16 products summed in fp32, as on the fp32 path.
 *
 * Per worker thread: neod_amx_configure before the first tile, neod_amx_release after the last.
 *
 * Layouts:
 *   tile    [num_tokens, head_dim] bf16, one (block, K, KV head) tile of the paged cache
 *   q_pairs [head_dim / 2, group] uint32: the group's query heads as bf16 pairs, transposed (the
 *           "VNNI" layout a tile multiply takes its right operand in)
 *   scores  [16, group] fp32, unscaled; rows past num_tokens are left undefined */
#ifndef NEOD_AMX_H
#define NEOD_AMX_H

#include <stdint.h>

/* Query heads per KV head the tile loop handles (the columns of one tile). */
#define NEOD_AMX_MAX_GROUP 16

/* Whether this process may use AMX-BF16: the CPU has it and the kernel granted the tile state. */
int neod_amx_supported(void);

/* Sets this thread's tiles up for groups of `group` query heads. */
void neod_amx_configure(int group);
void neod_amx_release(void);

/* scores[t][h] = q[h] . tile[t] for t < min(num_tokens, 16), h < group. */
void neod_amx_tile_scores(const uint16_t *tile, int num_tokens, const uint32_t *q_pairs, int group,
                          int head_dim, float *scores);

#endif
