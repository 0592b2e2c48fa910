/* AMX tile loop of the scores: see neod_amx.h. Compiled for AMX function by function, so the
 * module loads on any x86-64 CPU; callers check neod_amx_supported() first. */
#define _GNU_SOURCE
#include "neod_amx.h"

#include <cpuid.h>
#include <immintrin.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
/* Tile registers: C (scores) 0, A (K rows) 1, B (query pairs) 2. */
#define TILE_SCORES 0
#define TILE_KEYS 1
#define TILE_QUERY 2
#define TILE_ROWS 16

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

AMX_TARGET void neod_amx_configure(int group) {
    struct tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[TILE_SCORES] = TILE_ROWS;
    cfg.colsb[TILE_SCORES] = (uint16_t)(group * 4);
    cfg.rows[TILE_KEYS] = TILE_ROWS;
    cfg.colsb[TILE_KEYS] = 64; /* 32 bf16 of each row per multiply */
    cfg.rows[TILE_QUERY] = TILE_ROWS; /* 16 pairs = the same 32 elements */
    cfg.colsb[TILE_QUERY] = (uint16_t)(group * 4);
    _tile_loadconfig(&cfg);
}

AMX_TARGET void neod_amx_release(void) { _tile_release(); }

AMX_TARGET void neod_amx_tile_scores(const uint16_t *tile, int num_tokens, const uint32_t *q_pairs,
                                     int group, int head_dim, float *scores) {
    /* A short tile is copied into zeroed rows: the 16 rows a tile load reads may run past the
     * end of the KV pool. */
    uint16_t padded[TILE_ROWS * 128] __attribute__((aligned(64)));
    const int row_bytes = head_dim * 2;
    if (num_tokens < TILE_ROWS) {
        memcpy(padded, tile, (size_t)num_tokens * row_bytes);
        memset((char *)padded + (size_t)num_tokens * row_bytes, 0,
               (size_t)(TILE_ROWS - num_tokens) * row_bytes);
        tile = padded;
    }
    _tile_zero(TILE_SCORES);
    for (int c = 0; c < head_dim / 32; c++) {
        _tile_loadd(TILE_KEYS, tile + 32 * c, row_bytes);
        _tile_loadd(TILE_QUERY, q_pairs + (size_t)16 * c * group, group * 4);
        _tile_dpbf16ps(TILE_SCORES, TILE_KEYS, TILE_QUERY);
    }
    _tile_stored(TILE_SCORES, scores, group * 4);
}
