/* AMX tile loops of the scores and the weighted values: see neod_amx.h. The module loads on any
 * x86-64 CPU; callers check neod_amx_supported() first.
 *
 * Tile instructions are written as inline assembly that tells the compiler what memory they read
 * and write. GCC 12's intrinsics do not (ldtilecfg is declared to read 8 bytes, tileloadd none), so
 * at -O2 it dropped the stores that filled the tile configuration, and a tile load could overtake
 * the stores of its operand. */
#define _GNU_SOURCE
#include "neod_amx.h"

#include <cpuid.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define TILE_LOAD(tile, base, stride)                                                     \
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #tile ::"r"(base), "r"((long)(stride)) \
                     : "memory")
#define TILE_STORE(tile, base, stride)                                                     \
    __asm__ volatile("tilestored %%tmm" #tile ", (%0,%1,1)" ::"r"(base), "r"((long)(stride)) \
                     : "memory")
#define TILE_ZERO(tile) __asm__ volatile("tilezero %%tmm" #tile ::)
/* tile c += a x b, bf16 pairs summed in fp32 */
#define TILE_DPBF16PS(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
/* Every tile is 16 rows x 64 bytes. Scores: A (K rows) tmm0/tmm1, B (query pairs) tmm2/tmm3,
 * C tmm4-7 (four 16-token tiles at a time). Values: A (probabilities, high and low parts)
 * tmm2/tmm3, B (V rows) tmm0/tmm1, C tmm4-7 (one per 32-element slice of the row). Operands
 * alternate between two registers so that a load need not wait for the multiply that still reads
 * the register's previous contents. */
#define TILE_ROWS 16
#define TILE_BYTES 64
#define TILE_WORDS (TILE_ROWS * TILE_BYTES / 4)

struct tile_config {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

int neod_amx_supported(void) {
    static int supported = -1;
    if (supported < 0) {
        unsigned eax, ebx, ecx, edx;
        int cpu = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx >> 22 & 1) &&
                  (edx >> 24 & 1); /* AMX-BF16, AMX-TILE */
        /* Linux hands out the 8 KiB tile state only on request (5.16 and later). */
        supported = cpu && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }
    return supported;
}

void neod_amx_configure(void) {
    struct tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = TILE_ROWS;
        cfg.colsb[t] = TILE_BYTES;
    }
    __asm__ volatile("ldtilecfg %0" ::"m"(cfg));
}

void neod_amx_release(void) { __asm__ volatile("tilerelease"); }

/* Copies a short K or V tile into zeroed rows: the 16 rows a tile load reads may run past the
 * end of the KV pool, and rows past the request's tokens hold whatever was there (NaN bits
 * included, which a zero probability would not cancel). */
static const uint16_t *full_tile(const uint16_t *tile, int num_tokens, int head_dim,
                                 uint16_t *padded) {
    if (num_tokens >= TILE_ROWS) return tile;
    size_t row_bytes = (size_t)head_dim * 2;
    memcpy(padded, tile, (size_t)num_tokens * row_bytes);
    memset((char *)padded + (size_t)num_tokens * row_bytes, 0, (TILE_ROWS - num_tokens) * row_bytes);
    return padded;
}

/* K tile i's slice `slice` of 32 elements against the query pairs in q_tile, into c_tile. */
#define SCORE_STEP(c_tile, k_tile, q_tile, i, slice)        \
    if (num_tiles > (i)) {                                  \
        TILE_LOAD(k_tile, k[i] + 32 * (slice), row_bytes);  \
        TILE_DPBF16PS(c_tile, k_tile, q_tile);              \
    }

/* Four accumulators, so that the multiplies of different K tiles overlap. */
static void tile_scores(const uint16_t *const *tiles, const int *num_tokens, int num_tiles,
                        const uint32_t *q_pairs, int head_dim, float *scores) {
    uint16_t padded[NEOD_AMX_SCORE_TILES][TILE_ROWS * 128] __attribute__((aligned(64)));
    const uint16_t *k[NEOD_AMX_SCORE_TILES];
    for (int i = 0; i < num_tiles; i++) k[i] = full_tile(tiles[i], num_tokens[i], head_dim, padded[i]);
    const int row_bytes = head_dim * 2;
    TILE_ZERO(4);
    TILE_ZERO(5);
    TILE_ZERO(6);
    TILE_ZERO(7);
    for (int c = 0; c < head_dim / 32; c += 2) {
        TILE_LOAD(2, q_pairs + (size_t)c * TILE_WORDS, TILE_BYTES);
        SCORE_STEP(4, 0, 2, 0, c)
        SCORE_STEP(5, 1, 2, 1, c)
        SCORE_STEP(6, 0, 2, 2, c)
        SCORE_STEP(7, 1, 2, 3, c)
        TILE_LOAD(3, q_pairs + (size_t)(c + 1) * TILE_WORDS, TILE_BYTES);
        SCORE_STEP(4, 0, 3, 0, c + 1)
        SCORE_STEP(5, 1, 3, 1, c + 1)
        SCORE_STEP(6, 0, 3, 2, c + 1)
        SCORE_STEP(7, 1, 3, 3, c + 1)
    }
    TILE_STORE(4, scores, TILE_BYTES);
    if (num_tiles > 1) TILE_STORE(5, scores + TILE_WORDS, TILE_BYTES);
    if (num_tiles > 2) TILE_STORE(6, scores + 2 * TILE_WORDS, TILE_BYTES);
    if (num_tiles > 3) TILE_STORE(7, scores + 3 * TILE_WORDS, TILE_BYTES);
}

/* V slice `slice` (32 elements) of step s against the probabilities' high and low parts. */
#define VALUE_SLICE(c_tile, v_tile, slice)                 \
    TILE_LOAD(v_tile, v + 32 * (slice), row_bytes);        \
    TILE_DPBF16PS(c_tile, 2, v_tile);                      \
    TILE_DPBF16PS(c_tile, 3, v_tile);

/* One accumulator per 32-element slice of the row, in tmm4-7 across the steps. */
static void tile_values(const uint16_t *const *tiles, const int *num_tokens, int steps,
                        const uint32_t *probs, int head_dim, float *out) {
    uint16_t padded[TILE_ROWS * 128] __attribute__((aligned(64)));
    const int row_bytes = head_dim * 2;
    TILE_ZERO(4);
    TILE_ZERO(5);
    TILE_ZERO(6);
    TILE_ZERO(7);
    for (int s = 0; s < steps; s++) {
        const uint16_t *v = full_tile(tiles[s], num_tokens[s], head_dim, padded);
        TILE_LOAD(2, probs + (size_t)s * 2 * TILE_WORDS, TILE_BYTES);
        TILE_LOAD(3, probs + ((size_t)s * 2 + 1) * TILE_WORDS, TILE_BYTES);
        VALUE_SLICE(4, 0, 0)
        VALUE_SLICE(5, 1, 1)
        if (head_dim == 128) {
            VALUE_SLICE(6, 0, 2)
            VALUE_SLICE(7, 1, 3)
        }
    }
    TILE_STORE(4, out, TILE_BYTES);
    TILE_STORE(5, out + TILE_WORDS, TILE_BYTES);
    if (head_dim == 128) {
        TILE_STORE(6, out + 2 * TILE_WORDS, TILE_BYTES);
        TILE_STORE(7, out + 3 * TILE_WORDS, TILE_BYTES);
    }
}

/* ---- software tiles ------------------------------------------------------------------------ */

static float bf16_at(const uint16_t *x, size_t i) {
    uint32_t bits = (uint32_t)x[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* A bf16 pair's low (0) or high (1) element. */
static float pair_half(uint32_t pair, int half) {
    uint16_t h = (uint16_t)(half ? pair >> 16 : pair & 0xffff);
    return bf16_at(&h, 0);
}

static void soft_scores(const uint16_t *const *tiles, const int *num_tokens, int num_tiles,
                        const uint32_t *q_pairs, int head_dim, float *scores) {
    for (int i = 0; i < num_tiles; i++) {
        int n = num_tokens[i] < TILE_ROWS ? num_tokens[i] : TILE_ROWS;
        for (int t = 0; t < n; t++) {
            for (int h = 0; h < 16; h++) {
                float sum = 0.0f;
                for (int k = 0; k < head_dim / 2; k++) {
                    uint32_t q = q_pairs[(size_t)k * 16 + h];
                    sum += bf16_at(tiles[i], (size_t)t * head_dim + 2 * k) * pair_half(q, 0) +
                           bf16_at(tiles[i], (size_t)t * head_dim + 2 * k + 1) * pair_half(q, 1);
                }
                scores[(i * TILE_ROWS + t) * 16 + h] = sum;
            }
        }
    }
}

static void soft_values(const uint16_t *const *tiles, const int *num_tokens, int steps,
                        const uint32_t *probs, int head_dim, float *out) {
    for (int c = 0; c < head_dim / 32; c++) {
        for (int r = 0; r < TILE_ROWS; r++) {
            for (int n = 0; n < 16; n++) {
                float sum = 0.0f;
                for (int s = 0; s < steps; s++) {
                    int count = num_tokens[s] < TILE_ROWS ? num_tokens[s] : TILE_ROWS;
                    for (int part = 0; part < 2; part++) {
                        const uint32_t *a = probs + ((size_t)s * 2 + part) * TILE_WORDS;
                        for (int k = 0; k < count; k++) {
                            size_t at = (size_t)k * head_dim + 32 * c + 2 * n;
                            sum += pair_half(a[r * 16 + k], 0) * bf16_at(tiles[s], at) +
                                   pair_half(a[r * 16 + k], 1) * bf16_at(tiles[s], at + 1);
                        }
                    }
                }
                out[((size_t)c * TILE_ROWS + r) * 16 + n] = sum;
            }
        }
    }
}

void neod_amx_tile_scores(const uint16_t *const *tiles, const int *num_tokens, int num_tiles,
                          const uint32_t *q_pairs, int head_dim, float *scores, int soft) {
    if (soft)
        soft_scores(tiles, num_tokens, num_tiles, q_pairs, head_dim, scores);
    else
        tile_scores(tiles, num_tokens, num_tiles, q_pairs, head_dim, scores);
}

void neod_amx_tile_values(const uint16_t *const *tiles, const int *num_tokens, int steps,
                          const uint32_t *probs, int head_dim, float *out, int soft) {
    if (soft)
        soft_values(tiles, num_tokens, steps, probs, head_dim, out);
    else
        tile_values(tiles, num_tokens, steps, probs, head_dim, out);
}
