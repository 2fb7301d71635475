/* Batched multi-LoRA on the CPU: y[t] += B_slot(t) (A_slot(t) x[t]) for every token of every
   segment, in one call per linear group (see native_cpu.py, which compiles and calls it).

   Why C: on 2 cores a step's 120 LoRA calls through torch ran ~7-27 small ops each, every op
   5-60 us (MKL's small GEMMs, dtype casts, gathers, index_add_), for 3-10 us of arithmetic.
   Here a call gathers and converts its token rows, multiplies and adds into y in place, each
   weight element read once per block of TB tokens, with torch's own OpenMP team splitting
   the (segment, token block) items.

   Layouts: x [T, fin], y [T, N] (float32, or bfloat16 when *_bf16), rows contiguous;
   a [slots, S*R, fin] and bt [slots, R, ldb] float32, or both bfloat16 when w_bf16 (half the
   bytes to stream; every sum is float32 either way) (bt: B transposed, so the expand is a
   run of contiguous axpys; its rows ldb >= N apart, see slot_pool.b_row); ranks [slots];
   segments (slot, start, len) over sorted, the
   token rows grouped by slot. Slice s of a slot uses rows s*R .. s*R+rank of a and columns
   sum(widths[:s]) .. + widths[s] of bt. Plain C with GCC vector types, so it builds for
   whatever -march=native offers (AVX2 or AVX-512); AVX512-BF16's dot product where the
   CPU has it and x and the weights are bf16 (shrink_dp, expand_dp: the intrinsic paths), and
   AMX's tiles where it has those too (amx_item, from a repacked copy of the weights). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "../vec_cpu.h"
#if defined(_OPENMP)
#include <omp.h>
#endif

/* Tokens per block: each weight row loaded once serves TB tokens. */
#define TB 4
/* Tokens per block on the AVX512-BF16 paths and AVX2's float32 one, compiled once per count
   up to TB_DP (dispatch_dp, dispatch_f32): a block does its real tokens' arithmetic (at TB 4,
   a 1-token segment, common with many adapters, did four tokens' worth), and a segment of up
   to TB_DP tokens reads its weights once. In alternated SmolLM2 decode steps' 120 calls (32
   tokens, 2-core Emerald Rapids Xeon, bf16, where vdpbf16ps bounds these calls), against TB 4
   for every block, over four to seven runs on a noisy host: 0.85-0.97x the time with 8
   adapters, 0.92-1.02x with one, 0.87-0.95x with 64 drawn by Zipf. */
#define TB_DP 8
/* Output columns per expand block (two vectors per token stay in registers). */
#define NB 32
/* How far ahead of its loads a shrink asks for a's rows, in bytes. In paired SmolLM2 decode
   steps (2 Zen 5 cores, bf16), against 1 KiB: 3 KiB (with store_bf16's one instruction)
   took the kernel from 15.8 to 13.2 ms a step with 32 adapters, 4.9 to 4.2 with 8; 6 KiB
   then 11.9 -> 10.5 and 3.7 -> 3.4 against 3 KiB; 12 KiB was no better. */
#define A_PREFETCH 6144

/* Weights to prefetch while a loop runs, a few lines each of its iterations: a shrink waits on
   a's rows from memory while an expand waits on its arithmetic, so the shrink asks for the B
   its expand will read and the expand for the next item's A. Asked all at once, they would
   overflow what a core keeps in flight. The range: `runs` runs of `run_bytes`, `stride` apart
   (a slot's slices of A, their rows past the rank left out). Measured in SmolLM2 decode steps
   (8 adapters, 32 tokens, 2 Zen 4 cores, bf16): the kernel's time 5.4 -> 4.7 ms a step. On a
   2-core Emerald Rapids Xeon it cost instead: paired bench/lora_serving.py runs alternated in
   one process, seven rounds, 8 adapters 0.788x -> 0.805x of the base without it (0.83x when
   the calls only read their bytes), 64 Zipf 0.695x -> 0.708x (why was not measured: perhaps
   the extra requests hold fill buffers the waiting loads need). CPUs with AMX tiles (Intel's,
   from Sapphire Rapids) build without it (TRICKLE). */
#if defined(__AMX_TILE__)
#define TRICKLE 0
#else
#define TRICKLE 1
#endif
struct trickle {
    const char *run;
    int64_t run_bytes, stride, off, lines, iters, owed;
    int runs;
};

static struct trickle trickle_of(const void *p, int64_t run_bytes, int64_t stride, int runs) {
    struct trickle tr = {(const char *)p, run_bytes, stride, 0, 0, 1, 0, run_bytes > 0 ? runs : 0};
    return tr;
}

/* The loop that carries tr runs `iters` iterations: each asks for lines/iters of the lines,
   evenly (Bresenham's sums, no division in the loop). */
static inline void trickle_start(struct trickle *tr, int64_t iters) {
    tr->lines = (int64_t)tr->runs * ((tr->run_bytes + 63) / 64);
    tr->iters = iters > 0 ? iters : 1;
    tr->owed = 0;
}

static inline void trickle_step(struct trickle *tr) {
    if (!TRICKLE) return;
    for (tr->owed += tr->lines; tr->owed >= tr->iters && tr->runs; tr->owed -= tr->iters) {
        __builtin_prefetch(tr->run + tr->off);
        tr->off += 64;
        if (tr->off >= tr->run_bytes) { tr->off = 0; tr->run += tr->stride; tr->runs--; }
    }
}


/* x rows of the block as float32, zero rows past nb (they feed lanes whose results are dropped). */
static void gather(const void *x, int x_bf16, int64_t fin, const int64_t *toks, int nb, float *xb) {
    for (int t = 0; t < TB; t++) {
        float *dst = xb + (size_t)t * fin;
        if (t >= nb) { memset(dst, 0, fin * sizeof(float)); continue; }
        if (x_bf16) {
            const uint16_t *src = (const uint16_t *)x + toks[t] * fin;
            int64_t i = 0;
            for (; i + 16 <= fin; i += 16) store(dst + i, load_bf16(src + i));
            for (; i < fin; i++) dst[i] = bf16_to_f32(src[i]);
        } else {
            memcpy(dst, (const float *)x + toks[t] * fin, fin * sizeof(float));
        }
    }
}

/* v[t, s*R + k] = x[t] . a_row(s, k) for the block's TB rows. */
static void shrink(const float *xb, int64_t fin, const void *a, int64_t a_off, int w_bf16, int S, int R, int rank, float *v,
                   struct trickle *tr) {
    trickle_start(tr, (int64_t)S * rank * (fin / 16));
    for (int s = 0; s < S; s++)
        for (int k = 0; k < rank; k++) {
            int64_t row = a_off + ((int64_t)s * R + k) * fin;
            f32x16 acc[TB] = {{0}};
            int64_t i = 0;
            for (; i + 16 <= fin; i += 16) {
                /* Weights stream from memory: ask for them ahead of the loads (measured: 20-30% faster). */
                __builtin_prefetch((const char *)a + (row + i) * (w_bf16 ? 2 : 4) + A_PREFETCH);
                trickle_step(tr);
                f32x16 r = load_w(a, row + i, w_bf16);
                for (int t = 0; t < TB; t++) acc[t] += load(xb + (size_t)t * fin + i) * r;
            }
            for (int t = 0; t < TB; t++) {
                float sum = hsum(acc[t]);
                for (int64_t j = i; j < fin; j++) sum += xb[(size_t)t * fin + j] * w_at(a, row + j, w_bf16);
                v[((size_t)t * S + s) * R + k] = sum;
            }
        }
}

#if defined(__AVX512BF16__)
/* bf16 x and weights on a CPU with AVX512-BF16: vdpbf16ps multiplies 32 pairs a step with
   no conversions (exact products, float32 sums in another order); two rows of a a pass, so
   2*tb sums are under way at once. Measured in a SmolLM2 decode step (2 Zen 5 cores): the
   kernel's time 3.9 -> 3.4 ms with one adapter. */
static inline __attribute__((always_inline)) void shrink_dp(const uint16_t *xb, int64_t fin, const uint16_t *a, int64_t a_off,
                                                           int S, int R, int rank, float *v, struct trickle *tr, const int tb) {
    trickle_start(tr, (int64_t)S * ((rank + 1) / 2) * (fin / 32));
    for (int s = 0; s < S; s++)
        for (int k = 0; k < rank; k += 2) {
            int two = k + 1 < rank;
            const uint16_t *row0 = a + a_off + ((int64_t)s * R + k) * fin, *row1 = two ? row0 + fin : row0;
            __m512 acc0[TB_DP], acc1[TB_DP];
            for (int t = 0; t < tb; t++) acc0[t] = acc1[t] = _mm512_setzero_ps();
            int64_t i = 0;
            for (; i + 32 <= fin; i += 32) {
                __builtin_prefetch((const char *)(row0 + i) + A_PREFETCH);
                __builtin_prefetch((const char *)(row1 + i) + A_PREFETCH);
                trickle_step(tr);
                __m512bh r0 = (__m512bh)_mm512_loadu_si512(row0 + i), r1 = (__m512bh)_mm512_loadu_si512(row1 + i);
                for (int t = 0; t < tb; t++) {
                    __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + (size_t)t * fin + i);
                    acc0[t] = _mm512_dpbf16_ps(acc0[t], r0, xv);
                    acc1[t] = _mm512_dpbf16_ps(acc1[t], r1, xv);
                }
            }
            for (int t = 0; t < tb; t++) {
                float s0 = _mm512_reduce_add_ps(acc0[t]), s1 = _mm512_reduce_add_ps(acc1[t]);
                for (int64_t j = i; j < fin; j++) {
                    s0 += bf16_to_f32(xb[(size_t)t * fin + j]) * bf16_to_f32(row0[j]);
                    s1 += bf16_to_f32(xb[(size_t)t * fin + j]) * bf16_to_f32(row1[j]);
                }
                v[((size_t)t * S + s) * R + k] = s0;
                if (two) v[((size_t)t * S + s) * R + k + 1] = s1;
            }
        }
}
#endif

static void add_row(void *y, int y_bf16, int64_t N, int64_t tok, int64_t col, const float *d, int n) {
    if (y_bf16) {
        uint16_t *yr = (uint16_t *)y + tok * N + col;
        int j = 0;
        for (; j + 16 <= n; j += 16) store_bf16(yr + j, load_bf16(yr + j) + load(d + j));
        for (; j < n; j++) yr[j] = f32_to_bf16(bf16_to_f32(yr[j]) + d[j]);
    } else {
        float *yr = (float *)y + tok * N + col;
        for (int j = 0; j < n; j++) yr[j] += d[j];
    }
}

#if defined(__AVX512BF16__)
/* y[tok, col .. col + NB) += (d0, d1), the sums of add_row rounded the same way. */
static inline __attribute__((always_inline)) void add_block(void *y, int y_bf16, int64_t N, int64_t tok, int64_t col,
                                                            __m512 d0, __m512 d1) {
    if (y_bf16) {
        uint16_t *yr = (uint16_t *)y + tok * N + col;
        store_bf16(yr, load_bf16(yr) + (f32x16)d0);
        store_bf16(yr + 16, load_bf16(yr + 16) + (f32x16)d1);
    } else {
        float *yr = (float *)y + tok * N + col;
        _mm512_storeu_ps(yr, _mm512_add_ps(_mm512_loadu_ps(yr), d0));
        _mm512_storeu_ps(yr + 16, _mm512_add_ps(_mm512_loadu_ps(yr + 16), d1));
    }
}
#endif

/* Column blocks of NB in the slices (an expand's iterations per rank step). */
static int64_t full_blocks(const int32_t *widths, int S) {
    int64_t n = 0;
    for (int s = 0; s < S; s++) n += widths[s] / NB;
    return n;
}

/* out[t][j] = v[t, s] . bt_slot[:rank, col + j] for the block's nb real rows, j < n: a slice's
   last columns when its width is no multiple of NB. */
static void expand_tail(const float *v, const void *bt, int64_t bt_off, int w_bf16, int64_t ldb, int S, int R, int rank, int s,
                        int64_t col, int n, int nb, float (*out)[NB]) {
    for (int t = 0; t < nb; t++)
        for (int j = 0; j < n; j++) {
            float sum = 0.f;
            for (int k = 0; k < rank; k++) sum += v[((size_t)t * S + s) * R + k] * w_at(bt, bt_off + (int64_t)k * ldb + col + j, w_bf16);
            out[t][j] = sum;
        }
}

/* y[tok, slice s] += v[t, s] @ bt_slot[:rank, slice s] for the block's nb real rows. */
static void expand(const float *v, const void *bt, int64_t bt_off, int w_bf16, int64_t N, int64_t ldb, int S, int R, int rank,
                   const int32_t *widths, const int64_t *toks, int nb, void *y, int y_bf16, struct trickle *tr) {
    trickle_start(tr, full_blocks(widths, S) * rank);
    int64_t col0 = 0;
    for (int s = 0; s < S; s++) {
        int64_t w = widths[s];
        for (int64_t n0 = 0; n0 < w; n0 += NB) {
            f32x16 lo[TB] = {{0}}, hi[TB] = {{0}};
            float out[TB][NB];
            int n = (int)(w - n0 < NB ? w - n0 : NB);
            if (n == NB) {
                for (int k = 0; k < rank; k++) {
                    int64_t br = bt_off + (int64_t)k * ldb + col0 + n0;
                    __builtin_prefetch((const char *)bt + br * (w_bf16 ? 2 : 4) + 256);
                    trickle_step(tr);
                    f32x16 b0 = load_w(bt, br, w_bf16), b1 = load_w(bt, br + 16, w_bf16);
                    for (int t = 0; t < TB; t++) {
                        float c = v[((size_t)t * S + s) * R + k];
                        lo[t] += c * b0;
                        hi[t] += c * b1;
                    }
                }
                for (int t = 0; t < nb; t++) { store(out[t], lo[t]); store(out[t] + 16, hi[t]); }
            } else {
                expand_tail(v, bt, bt_off, w_bf16, ldb, S, R, rank, s, col0 + n0, n, nb, out);
            }
            for (int t = 0; t < nb; t++) add_row(y, y_bf16, N, toks[t], col0 + n0, out[t], n);
        }
        col0 += w;
    }
}

#if defined(__AVX512BF16__)
/* expand for bfloat16 weights with vdpbf16ps: rows k and k+1 of NB columns interleave (within
   128-bit lanes) into two vectors of (k, k+1) pairs, each multiplied by the token's pair of v
   rounded to bfloat16 (as peft's bfloat16 LoRA rounds A x before B), sums float32. Half the
   multiply instructions of expand's float32 FMAs, which bounded it: a SmolLM2 layer's four
   calls (32 tokens, 2 Zen 4 cores, weights in cache) took 99 -> 69 us with 8 adapters, 121 ->
   72 us with one. The lanes come out in the interleave's column order; one permute per 16
   outputs puts them back. vb: scratch for the pairs. */
static inline __attribute__((always_inline)) void expand_dp(const float *v, const uint16_t *bt, int64_t bt_off, int64_t N, int64_t ldb, int S,
                                                           int R, int rank, const int32_t *widths, const int64_t *toks, void *y,
                                                           int y_bf16, uint16_t *vb, struct trickle *tr, const int tb) {
    trickle_start(tr, full_blocks(widths, S) * ((rank + 1) / 2));
    int R2 = R + (R & 1);
    for (int t = 0; t < tb; t++)
        for (int s = 0; s < S; s++)
            for (int k = 0; k < R2; k++)
                vb[((size_t)t * S + s) * R2 + k] = k < rank ? f32_to_bf16(v[((size_t)t * S + s) * R + k]) : 0;
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    int64_t col0 = 0;
    for (int s = 0; s < S; s++) {
        int64_t w = widths[s];
        for (int64_t n0 = 0; n0 < w; n0 += NB) {
            int n = (int)(w - n0 < NB ? w - n0 : NB);
            if (n == NB) {
                __m512 lo[TB_DP], hi[TB_DP];
                for (int t = 0; t < tb; t++) lo[t] = hi[t] = _mm512_setzero_ps();
                for (int k = 0; k < rank; k += 2) {
                    /* Past an odd rank, row k again, against v's zero. */
                    const uint16_t *r0 = bt + bt_off + (int64_t)k * ldb + col0 + n0, *r1 = k + 1 < rank ? r0 + ldb : r0;
                    __builtin_prefetch((const char *)r0 + 256);
                    __builtin_prefetch((const char *)r1 + 256);
                    trickle_step(tr);
                    __m512i b0 = _mm512_loadu_si512(r0), b1 = _mm512_loadu_si512(r1);
                    __m512bh pl = (__m512bh)_mm512_unpacklo_epi16(b0, b1), ph = (__m512bh)_mm512_unpackhi_epi16(b0, b1);
                    for (int t = 0; t < tb; t++) {
                        int32_t pair;
                        memcpy(&pair, vb + ((size_t)t * S + s) * R2 + k, 4);
                        __m512bh c = (__m512bh)_mm512_set1_epi32(pair);
                        lo[t] = _mm512_dpbf16_ps(lo[t], pl, c);
                        hi[t] = _mm512_dpbf16_ps(hi[t], ph, c);
                    }
                }
                /* Added into y from the registers: through a buffer and add_row, the same sums
                   cost 1.3 points of the base's speed (SmolLM2 bf16 decode, 8 adapters, 2-core
                   Emerald Rapids Xeon: 0.829x -> 0.842x, four paired rounds, every one higher). */
                for (int t = 0; t < tb; t++)
                    add_block(y, y_bf16, N, toks[t], col0 + n0, _mm512_permutex2var_ps(lo[t], first, hi[t]),
                              _mm512_permutex2var_ps(lo[t], second, hi[t]));
            } else {
                float out[TB_DP][NB];
                expand_tail(v, bt, bt_off, 1, ldb, S, R, rank, s, col0 + n0, n, tb, out);
                for (int t = 0; t < tb; t++) add_row(y, y_bf16, N, toks[t], col0 + n0, out[t], n);
            }
        }
        col0 += w;
    }
}

/* One block of tb bfloat16 tokens through shrink_dp and expand_dp; xb: room for its x rows. */
static inline __attribute__((always_inline)) void block_dp(const uint16_t *x, int64_t fin, const uint16_t *a, int64_t a_off,
                                                          const uint16_t *bt, int64_t bt_off, int64_t N, int64_t ldb, int S, int R, int rank,
                                                          const int32_t *widths, const int64_t *toks, void *y, int y_bf16,
                                                          uint16_t *xb, float *v, uint16_t *vb, struct trickle *b_rows,
                                                          struct trickle *a_next, const int tb) {
    for (int t = 0; t < tb; t++) memcpy(xb + (size_t)t * fin, x + toks[t] * fin, fin * 2);
    shrink_dp(xb, fin, a, a_off, S, R, rank, v, b_rows, tb);
    expand_dp(v, bt, bt_off, N, ldb, S, R, rank, widths, toks, y, y_bf16, vb, a_next, tb);
}

/* block_dp compiled for each count, its loops over tokens unrolled and their sums in registers. */
static void dispatch_dp(int nb, const uint16_t *x, int64_t fin, const uint16_t *a, int64_t a_off, const uint16_t *bt,
                        int64_t bt_off, int64_t N, int64_t ldb, int S, int R, int rank, const int32_t *widths, const int64_t *toks, void *y,
                        int y_bf16, uint16_t *xb, float *v, uint16_t *vb, struct trickle *b_rows, struct trickle *a_next) {
#define BLOCK_DP(tb) block_dp(x, fin, a, a_off, bt, bt_off, N, ldb, S, R, rank, widths, toks, y, y_bf16, xb, v, vb, b_rows, a_next, tb)
    switch (nb) {
    case 1: BLOCK_DP(1); break;
    case 2: BLOCK_DP(2); break;
    case 3: BLOCK_DP(3); break;
    case 4: BLOCK_DP(4); break;
    case 5: BLOCK_DP(5); break;
    case 6: BLOCK_DP(6); break;
    case 7: BLOCK_DP(7); break;
    default: BLOCK_DP(8); break;
    }
#undef BLOCK_DP
}
#endif

#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
/* Intel AMX: a tile multiply does a 16 x 16 x 32 bfloat16 product with float32 sums in one
   instruction, where vdpbf16ps bounds the dp paths above (85 GFLOP/s a core against AMX's 1.7
   TFLOP/s on a 2-core Emerald Rapids Xeon). A tile multiply reads its right operand as the
   (k, k+1) pairs of each column, a layout neither A nor B^T is kept in, so the weights go
   through a repacked copy:
   - shrink: v [tokens x S*R] = x [tokens x fin] A^T. x's rows are the left operand as they
     are (gathered); A^T's pairs (`at`) come from 16 x 16 transposes of A's 32-bit pairs,
     tile (chunk c of 32 fin columns, group j of 16 v columns) at (c * groups + j) * 256, so
     a shrink reads them in order.
   - expand: y [tokens x N] += v [tokens x R] B^T: v rounded to bfloat16 (as expand_dp does)
     is the left operand as it is; B^T's rows k and k+1 interleave into pairs (`bp`), in
     blocks of 16 columns of a slice (zero past its width), each block's tiles together.
   Rows of A and B^T past a slot's rank are packed as zeros (the pool may hold anything there).
   An item repacks its slot's weights, which only a long segment's tokens pay back (tried:
   slower below 16 tokens). A copy of every slot kept by the pool, repacked at each load, let
   every segment take the tiles: a decode step's calls took 0.75-0.84x the dp path's time over
   weights out of cache, but alternated serving runs (five sets on a 2-core Emerald Rapids)
   gained nothing beyond the host's noise for twice the slot memory, and it went. The kernel
   asks Linux for leave to use the tiles once; without it the dp paths run. */
#include <sys/syscall.h>
#include <unistd.h>

/* Segments of at least AMX_MIN_ROWS tokens take this path. */
#define AMX_MIN_ROWS 16
/* Tokens an item takes at most (four tiles of 16 rows). */
#define AMX_ROWS 64
/* Output columns an expand writes out before adding them into y. */
#define AMX_PANEL 256
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Tiles 0-3: sums (shrink: four groups of 16 columns of v; expand: four blocks of 16 columns
   of y); then x's rows, at's pairs (in the expand, a second tile of bp's pairs), v's rows and
   bp's pairs. Macros, not an enum: the intrinsics paste the number into the instruction. */
#define T_X 4
#define T_AT 5
#define T_BP2 5
#define T_V 6
#define T_BP 7

static int amx_allowed(void) {
    static int allowed = -1;
    if (allowed < 0) allowed = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return allowed;
}

/* The packed shapes: fin in chunks of 32, v's S*R columns in groups of 16, the rank in kp
   columns (even; past 32 a multiple of 32) taken kc at a time (nq passes), and room for
   `blocks` blocks of 16 columns (each slice's last one may be partial). */
struct amx_shape {
    int64_t fin_p, chunks, groups, blocks;
    int kp, kc, nq;
};

static struct amx_shape amx_shape_of(int64_t fin, int64_t N, int S, int R) {
    struct amx_shape sh;
    sh.chunks = (fin + 31) / 32;
    sh.fin_p = sh.chunks * 32;
    sh.groups = ((int64_t)S * R + 15) / 16;
    sh.blocks = N / 16 + S;
    sh.kp = R + (R & 1) <= 32 ? R + (R & 1) : (R + 31) / 32 * 32;
    sh.kc = sh.kp < 32 ? sh.kp : 32;
    sh.nq = sh.kp / sh.kc;
    return sh;
}

/* 32-bit words: a slot's at, one block of bp, a slot's copy. */
static int64_t amx_at_words(const struct amx_shape *sh) { return sh->chunks * sh->groups * 256; }
static int64_t amx_block_words(const struct amx_shape *sh) { return (int64_t)sh->kp / 2 * 16; }
static int64_t amx_packed_words(const struct amx_shape *sh) { return amx_at_words(sh) + sh->blocks * amx_block_words(sh); }

/* The tiles' shapes for the shrink, or (expand) for the expand: tile 5 is at's there, bp's
   here; m rows of x a tile (16, or an item's tokens where it has fewer). */
static void amx_configure(const struct amx_shape *sh, int expand, int m) {
    struct tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.rows[t] = (uint8_t)(t < 4 || t == T_X || t == T_V ? m : 16), c.colsb[t] = 64;
    c.colsb[T_V] = (uint16_t)(sh->kc * 2);
    c.rows[T_BP] = (uint8_t)(sh->kc / 2);
    if (expand) c.rows[T_BP2] = (uint8_t)(sh->kc / 2);
    _tile_loadconfig(&c);
}

/* An item's scratch in floats: x's rows, the slot's repacked weights, v's rows, two tiles of
   sums, 16 rows of a panel's deltas. */
static size_t amx_scratch_floats(const struct amx_shape *sh, int S) {
    return (size_t)AMX_ROWS * sh->fin_p / 2 + (size_t)amx_packed_words(sh) + (size_t)AMX_ROWS * S * sh->kp / 2 + 2 * 256
           + 16 * AMX_PANEL + 16;
}

/* out[p][i] = in[i][p] for a 16 x 16 block of 32-bit elements (unpacks, then 128-bit lanes). */
static inline void transpose16(__m512i r[16]) {
    __m512i a[16], b[16];
    for (int k = 0; k < 8; k++) {
        a[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
        a[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
    }
    /* b[4k + m], lane L: column 4L + m of rows 4k .. 4k+3. */
    for (int k = 0; k < 4; k++) {
        b[4 * k] = _mm512_unpacklo_epi64(a[4 * k], a[4 * k + 2]);
        b[4 * k + 1] = _mm512_unpackhi_epi64(a[4 * k], a[4 * k + 2]);
        b[4 * k + 2] = _mm512_unpacklo_epi64(a[4 * k + 1], a[4 * k + 3]);
        b[4 * k + 3] = _mm512_unpackhi_epi64(a[4 * k + 1], a[4 * k + 3]);
    }
    for (int m = 0; m < 4; m++) {
        __m512i e0 = _mm512_shuffle_i32x4(b[m], b[4 + m], 0x44), e1 = _mm512_shuffle_i32x4(b[m], b[4 + m], 0xEE);
        __m512i e2 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], 0x44), e3 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], 0xEE);
        r[m] = _mm512_shuffle_i32x4(e0, e2, 0x88);
        r[4 + m] = _mm512_shuffle_i32x4(e0, e2, 0xDD);
        r[8 + m] = _mm512_shuffle_i32x4(e1, e3, 0x88);
        r[12 + m] = _mm512_shuffle_i32x4(e1, e3, 0xDD);
    }
}

/* A slot's copy from its a [S*R, fin] and bt [R, N] (see above), packed in `packed`. */
static void amx_pack(const uint16_t *a, const uint16_t *bt, int64_t fin, int64_t ldb, int S, int R, const int32_t *widths, int rank,
                     const struct amx_shape *sh, uint32_t *packed) {
    for (int64_t c = 0; c < sh->chunks; c++) {
        int64_t left = fin - c * 32;
        __mmask32 m = left >= 32 ? ~(__mmask32)0 : ((__mmask32)1 << left) - 1;
        for (int64_t j = 0; j < sh->groups; j++) {
            __m512i r[16];
            for (int i = 0; i < 16; i++) {
                int64_t row = j * 16 + i;
                int live = row < (int64_t)S * R && row % R < rank;
                r[i] = live ? _mm512_maskz_loadu_epi16(m, a + row * fin + c * 32) : _mm512_setzero_si512();
            }
            transpose16(r);
            uint32_t *tile = packed + (c * sh->groups + j) * 256;
            for (int p = 0; p < 16; p++) _mm512_storeu_si512(tile + p * 16, r[p]);
        }
    }
    uint32_t *block = packed + amx_at_words(sh);
    int64_t col0 = 0;
    for (int s = 0; s < S; s++) {
        for (int64_t b0 = 0; b0 < widths[s]; b0 += 16, block += amx_block_words(sh)) {
            int64_t n = widths[s] - b0 < 16 ? widths[s] - b0 : 16;
            __mmask16 m = (__mmask16)((1u << n) - 1);
            for (int k = 0; k < sh->kp; k += 2) {
                __m512i b0k = _mm512_setzero_si512(), b1k = _mm512_setzero_si512();
                if (k < rank) b0k = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, bt + (int64_t)k * ldb + col0 + b0));
                if (k + 1 < rank) b1k = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, bt + (int64_t)(k + 1) * ldb + col0 + b0));
                _mm512_storeu_si512(block + (int64_t)(k / 2) * 16, _mm512_or_si512(b0k, _mm512_slli_epi32(b1k, 16)));
            }
        }
        col0 += widths[s];
    }
}

/* Sums of up to four groups of v's columns for the rows of x (tile numbers are immediates). */
#define AMX_GROUP(g)                                                                            \
    if (ng > g) {                                                                               \
        _tile_loadd(T_AT, at + (c * sh->groups + j0 + g) * 256, 64);                            \
        _tile_dpbf16ps(g, T_X, T_AT);                                                           \
    }

/* One item: nb (<= AMX_ROWS) tokens of one slot through shrink and expand, its weights
   repacked into scratch from a and bt. */
static void amx_item(const uint16_t *x, int64_t fin, const uint16_t *a, const uint16_t *bt, int64_t N, int64_t ldb,
                     int S, int R, int rank, const int32_t *widths, const int64_t *toks, int nb, void *y, int y_bf16,
                     const struct amx_shape *sh, float *scratch_base) {
    uint16_t *xg = (uint16_t *)scratch_base;
    uint32_t *packed = (uint32_t *)(xg + (size_t)AMX_ROWS * sh->fin_p);
    uint16_t *vb = (uint16_t *)(packed + amx_packed_words(sh));
    float *sums = (float *)(vb + (size_t)AMX_ROWS * S * sh->kp), *out = sums + 2 * 256;
    amx_pack(a, bt, fin, ldb, S, R, widths, rank, sh, packed);
    const uint32_t *at = packed, *bp = packed + amx_at_words(sh);
    /* An item of one tile has its tokens' rows only (m of them); of more, 16 a tile, the last
       tile's rows past nb zero. */
    int tiles = (nb + 15) / 16, m = tiles == 1 ? nb : 16, rows_p = (tiles - 1) * 16 + m;
    for (int t = 0; t < rows_p; t++) {
        uint16_t *dst = xg + (size_t)t * sh->fin_p;
        if (t < nb) memcpy(dst, x + toks[t] * fin, fin * 2);
        memset(dst + (t < nb ? fin : 0), 0, (sh->fin_p - (t < nb ? fin : 0)) * 2);
    }
    int64_t vstride = (int64_t)S * sh->kp;
    memset(vb, 0, (size_t)rows_p * vstride * 2);
    amx_configure(sh, 0, m);
    for (int mt = 0; mt < tiles; mt++)
        for (int64_t j0 = 0; j0 < sh->groups; j0 += 4) {
            int ng = sh->groups - j0 < 4 ? (int)(sh->groups - j0) : 4;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t c = 0; c < sh->chunks; c++) {
                _tile_loadd(T_X, xg + (size_t)mt * 16 * sh->fin_p + c * 32, sh->fin_p * 2);
                AMX_GROUP(0) AMX_GROUP(1) AMX_GROUP(2) AMX_GROUP(3)
            }
            _tile_stored(0, sums, 64);
            if (ng > 1) _tile_stored(1, sums + 256, 64);
            for (int g = 0; g < ng; g++) {
                if (g == 2) _tile_stored(2, sums, 64);
                if (g == 3) _tile_stored(3, sums + 256, 64);
                /* v rounded into vb, 0 past the rank (already there); a group of 16 columns lies
                   within one slice when R is a multiple of 16. */
                const float *gs = sums + (g & 1) * 256;
                uint16_t *rows = vb + (size_t)mt * 16 * vstride;
                int64_t vcol = (j0 + g) * 16;
                if (R % 16 == 0 && vcol % R + 16 <= rank) {
                    uint16_t *dst = rows + (vcol / R) * sh->kp + vcol % R;
                    for (int t = 0; t < m; t++) store_bf16_exact(dst + (size_t)t * vstride, load(gs + t * 16));
                    continue;
                }
                for (int col = 0; col < 16; col++) {
                    int s = (int)((vcol + col) / R), k = (int)((vcol + col) % R);
                    if (s >= S || k >= rank) continue;
                    for (int t = 0; t < m; t++) rows[(size_t)t * vstride + (size_t)s * sh->kp + k] = f32_to_bf16(gs[t * 16 + col]);
                }
            }
        }
    /* A panel of up to AMX_PANEL columns at a time: its blocks of bp serve every 16 rows from
       L1, and the rows' deltas go into out (in L1), then into y. Rows of a whole N in out,
       12 KB apart, made every tile store wait on its lines. Four blocks at a time, each in its
       own tile of sums, so that a block's multiply does not wait for the previous one's store. */
    amx_configure(sh, 1, m);
    int64_t bw = amx_block_words(sh), qw = (int64_t)sh->kc / 2 * 16, col0 = 0;
    const uint32_t *slice_blocks = bp;
    for (int s = 0; s < S; s++) {
        int64_t w = widths[s];
        for (int64_t p0 = 0; p0 < w; p0 += AMX_PANEL) {
            int64_t pw = w - p0 < AMX_PANEL ? w - p0 : AMX_PANEL, pb = (pw + 15) / 16;
            const uint32_t *panel = slice_blocks + p0 / 16 * bw;
            for (int mt = 0; mt < tiles; mt++) {
                const uint16_t *vs = vb + (size_t)mt * 16 * vstride + (size_t)s * sh->kp;
                /* Blocks in pairs, the pairs in tiles 0-1 and 2-3 by turns: a pair's sums are
                   stored after the next pair's multiplies are issued, not right after its own
                   (a store waits for its multiply's result, and the tiles' work runs in order). */
                int pending = 0; /* blocks of the previous pair in tiles 2-3 not stored yet */
                float *pending_out = out;
                for (int64_t i0 = 0; i0 < pb; i0 += 4) {
                    int nblk = pb - i0 < 4 ? (int)(pb - i0) : 4;
                    const uint32_t *bq = panel + i0 * bw;
                    float *o = out + i0 * 16;
                    _tile_zero(0);
                    _tile_zero(1);
                    for (int q = 0; q < sh->nq; q++) {
                        _tile_loadd(T_V, vs + q * sh->kc, vstride * 2);
                        _tile_loadd(T_BP, bq + q * qw, 64);
                        _tile_dpbf16ps(0, T_V, T_BP);
                        if (nblk > 1) { _tile_loadd(T_BP2, bq + bw + q * qw, 64); _tile_dpbf16ps(1, T_V, T_BP2); }
                    }
                    if (pending > 0) _tile_stored(2, pending_out, AMX_PANEL * 4);
                    if (pending > 1) _tile_stored(3, pending_out + 16, AMX_PANEL * 4);
                    pending = nblk - 2 > 0 ? nblk - 2 : 0;
                    pending_out = o + 32;
                    if (pending) {
                        _tile_zero(2);
                        _tile_zero(3);
                        for (int q = 0; q < sh->nq; q++) {
                            _tile_loadd(T_V, vs + q * sh->kc, vstride * 2);
                            _tile_loadd(T_BP, bq + 2 * bw + q * qw, 64);
                            _tile_dpbf16ps(2, T_V, T_BP);
                            if (pending > 1) { _tile_loadd(T_BP2, bq + 3 * bw + q * qw, 64); _tile_dpbf16ps(3, T_V, T_BP2); }
                        }
                    }
                    _tile_stored(0, o, AMX_PANEL * 4);
                    if (nblk > 1) _tile_stored(1, o + 16, AMX_PANEL * 4);
                }
                if (pending > 0) _tile_stored(2, pending_out, AMX_PANEL * 4);
                if (pending > 1) _tile_stored(3, pending_out + 16, AMX_PANEL * 4);
                int rows = nb - mt * 16 < 16 ? nb - mt * 16 : 16;
                for (int t = 0; t < rows; t++)
                    add_row(y, y_bf16, N, toks[mt * 16 + t], col0 + p0, out + (size_t)t * AMX_PANEL, (int)pw);
            }
        }
        slice_blocks += (w + 15) / 16 * bw;
        col0 += w;
    }
}
#undef AMX_GROUP
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>
/* With AVX2 and no AVX-512, the 16-lane loops above compile to register pairs passed through
   the stack (a token's broadcast built from 16 scalar stores, the expand's accumulators in
   memory) and ran 2.8-10x slower than torch's GEMMs on a Zen 3. For float32 x, weights and y
   these 8-lane loops serve instead, every sum in a register, in blocks of up to TB_DP tokens
   compiled per count (dispatch_f32), the tokens four at a time over each weight row, the
   shrink asking for the expand's B as it goes (trickle). Against blocks of TB 4 tokens, one
   rank row a pass and the loops rolled (2-core Zen 3, SmolLM2 float32, 8 adapters, 32 tokens):
   a decode step's 120 calls took 0.84-0.85x the time, in cache or past it, and (with B's rows
   padded, slot_pool.b_row) bench/lora_floor.py's step with the kernel went from 0.851x to
   0.885x of the base's speed. */
#define AVX2_F32 1
#define NB8 16

/* The sum of v's lanes. */
static inline float hsum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* v[t, s*R + k] = x[t] . a_row(s, k) for tb tokens: P rows of a a pass, the tokens four at a
   time over them (the first four's loads bring the rows into L1 for the rest), so that 8
   sums are under way (FMA's latency bounds fewer) and x's 8 floats load once for P rows;
   the loop over fin unrolled twice (in-L2 SmolLM2 shapes on a Zen 3 core: 3.7 -> 5.6 FMAs
   a ns, of its 6.4). xi: x's rows interleaved by 8 floats ([fin/8][tb][8]), so one pointer
   walks them (a pointer a token ran out of registers and was reloaded from the stack every
   step); xr: the rows, for the last fin % 8. Rows past the rank in the last pass repeat the
   rank's last row, dropped. */
static inline __attribute__((always_inline)) void shrink_f32(const float *xi, const float *const *xr, int64_t fin, const float *a,
                                                            int S, int R, int rank, float *v, struct trickle *tr, const int tb) {
    const int P = tb <= 2 ? 4 : 2;
    trickle_start(tr, (int64_t)S * ((rank + P - 1) / P) * (fin / 8));
    for (int s = 0; s < S; s++)
        for (int k = 0; k < rank; k += P) {
            const float *row[4];
            _Pragma("GCC unroll 4") for (int p = 0; p < P; p++) row[p] = a + ((int64_t)s * R + (k + p < rank ? k + p : rank - 1)) * fin;
            _Pragma("GCC unroll 2") for (int g = 0; g < tb; g += 4) {
                const int n = tb - g < 4 ? tb - g : 4;
                __m256 acc[4][4];
                _Pragma("GCC unroll 4") for (int p = 0; p < P; p++)
                    _Pragma("GCC unroll 4") for (int t = 0; t < n; t++) acc[p][t] = _mm256_setzero_ps();
                const float *xp = xi + g * 8;
                int64_t i = 0;
                _Pragma("GCC unroll 2") for (; i + 8 <= fin; i += 8, xp += tb * 8) {
                    __m256 r[4];
                    _Pragma("GCC unroll 4") for (int p = 0; p < P; p++) {
                        if (g == 0) __builtin_prefetch((const char *)(row[p] + i) + A_PREFETCH);
                        r[p] = _mm256_loadu_ps(row[p] + i);
                    }
                    if (g == 0) trickle_step(tr);
                    _Pragma("GCC unroll 4") for (int t = 0; t < n; t++) {
                        __m256 xv = _mm256_loadu_ps(xp + t * 8);
                        _Pragma("GCC unroll 4") for (int p = 0; p < P; p++) acc[p][t] = _mm256_fmadd_ps(xv, r[p], acc[p][t]);
                    }
                }
                _Pragma("GCC unroll 4") for (int p = 0; p < P; p++)
                    _Pragma("GCC unroll 4") for (int t = 0; t < n; t++) {
                        float sum = hsum8(acc[p][t]);
                        for (int64_t j = i; j < fin; j++) sum += xr[g + t][j] * row[p][j];
                        if (k + p < rank) v[((size_t)(g + t) * S + s) * R + k + p] = sum;
                    }
            }
        }
}

/* y[tok, slice s] += v[t, s] @ bt[:rank, slice s] for tb tokens, 16 columns at a time: the
   tokens four at a time over the block's rank rows (the first four's loads bring its lines
   into L1 for the rest), 2 vectors of sums each, or 4 (even and odd k apart) for two tokens
   or fewer, so that FMA's latency does not bound them. */
static inline __attribute__((always_inline)) void expand_f32(const float *v, const float *bt, int64_t N, int64_t ldb, int S, int R, int rank,
                                                            const int32_t *widths, const int64_t *toks, float *y, const int tb) {
    int64_t col0 = 0;
    for (int s = 0; s < S; s++) {
        int64_t w = widths[s], n0 = 0;
        for (; n0 + NB8 <= w; n0 += NB8)
            _Pragma("GCC unroll 2") for (int g = 0; g < tb; g += 4) {
                const int n = tb - g < 4 ? tb - g : 4, split = n <= 2 ? 2 : 1;
                __m256 lo[2][4], hi[2][4];
                _Pragma("GCC unroll 8") for (int h = 0; h < split; h++)
                    _Pragma("GCC unroll 8") for (int t = 0; t < n; t++) lo[h][t] = hi[h][t] = _mm256_setzero_ps();
                _Pragma("GCC unroll 4") for (int k = 0; k < rank; k += split) {
                    _Pragma("GCC unroll 2") for (int h = 0; h < split; h++) {
                        if (k + h == rank) break;
                        const float *br = bt + (int64_t)(k + h) * ldb + col0 + n0;
                        if (g == 0) __builtin_prefetch((const char *)br + 256);
                        __m256 b0 = _mm256_loadu_ps(br), b1 = _mm256_loadu_ps(br + 8);
                        _Pragma("GCC unroll 8") for (int t = 0; t < n; t++) {
                            __m256 c = _mm256_broadcast_ss(v + ((size_t)(g + t) * S + s) * R + k + h);
                            lo[h][t] = _mm256_fmadd_ps(c, b0, lo[h][t]);
                            hi[h][t] = _mm256_fmadd_ps(c, b1, hi[h][t]);
                        }
                    }
                }
                _Pragma("GCC unroll 8") for (int t = 0; t < n; t++) {
                    __m256 l = lo[0][t], u = hi[0][t];
                    if (split == 2) l = _mm256_add_ps(l, lo[1][t]), u = _mm256_add_ps(u, hi[1][t]);
                    float *yr = y + toks[g + t] * N + col0 + n0;
                    _mm256_storeu_ps(yr, _mm256_add_ps(_mm256_loadu_ps(yr), l));
                    _mm256_storeu_ps(yr + 8, _mm256_add_ps(_mm256_loadu_ps(yr + 8), u));
                }
            }
        for (int t = 0; t < tb; t++)
            for (int64_t j = n0; j < w; j++) {
                float sum = 0.f;
                for (int k = 0; k < rank; k++) sum += v[((size_t)t * S + s) * R + k] * bt[(int64_t)k * ldb + col0 + j];
                y[toks[t] * N + col0 + j] += sum;
            }
        col0 += w;
    }
}

/* One block of tb float32 tokens of a slot (a, bt: its weights) through shrink_f32 and expand_f32. */
static inline __attribute__((always_inline)) void block_f32(const float *x, int64_t fin, const float *a, const float *bt, int64_t N, int64_t ldb,
                                                           int S, int R, int rank, const int32_t *widths, const int64_t *toks,
                                                           float *y, float *xi, float *v, struct trickle *tr, const int tb) {
    const float *xr[TB_DP];
    _Pragma("GCC unroll 8") for (int t = 0; t < tb; t++) xr[t] = x + toks[t] * fin;
    for (int64_t i = 0; i + 8 <= fin; i += 8)
        _Pragma("GCC unroll 8") for (int t = 0; t < tb; t++) _mm256_storeu_ps(xi + i * tb + t * 8, _mm256_loadu_ps(xr[t] + i));
    shrink_f32(xi, xr, fin, a, S, R, rank, v, tr, tb);
    expand_f32(v, bt, N, ldb, S, R, rank, widths, toks, y, tb);
}

/* block_f32 compiled for each count, its loops over tokens and rows unrolled, sums in registers. */
static void dispatch_f32(int nb, const float *x, int64_t fin, const float *a, const float *bt, int64_t N, int64_t ldb, int S, int R, int rank,
                         const int32_t *widths, const int64_t *toks, float *y, float *xi, float *v, struct trickle *tr) {
#define BLOCK_F32(tb) block_f32(x, fin, a, bt, N, ldb, S, R, rank, widths, toks, y, xi, v, tr, tb)
    switch (nb) {
    case 1: BLOCK_F32(1); break;
    case 2: BLOCK_F32(2); break;
    case 3: BLOCK_F32(3); break;
    case 4: BLOCK_F32(4); break;
    case 5: BLOCK_F32(5); break;
    case 6: BLOCK_F32(6); break;
    case 7: BLOCK_F32(7); break;
    default: BLOCK_F32(8); break;
    }
#undef BLOCK_F32
}
#else
#define AVX2_F32 0
#endif

/* A pool's layout, fixed while the pool lives (native_cpu.py builds it once per pool): x's
   rows are fin wide and y's N. */
struct tandem_lora_pool {
    const void *a, *bt;
    const int32_t *ranks, *widths;
    int64_t fin, N, ldb;
    int32_t w_bf16, S, R;
};

/* A step's segments, shared by its ~120 calls (built once per LoRABatch). Segments longer
   than max_len are left to the caller (a GEMM library does them faster). */
struct tandem_lora_step {
    const int32_t *seg_slot, *seg_start, *seg_len;
    const int64_t *sorted;
    int32_t nseg, max_len;
};

/* The items of a step: (segment, first token, tokens) in blocks of `block` tokens, and of
   `long_block` for segments of at least long_min; the segments past max_len and those of
   rank-0 slots are left out. Fills items (3 ints each) when given; returns their count. */
static int plan_items(const struct tandem_lora_step *step, const int32_t *ranks, int block, int long_min, int long_block,
                      int32_t *items) {
    int n = 0;
    for (int g = 0; g < step->nseg; g++) {
        int len = step->seg_len[g];
        if (!ranks[step->seg_slot[g]] || len > step->max_len) continue;
        int b = len >= long_min ? long_block : block;
        for (int t0 = 0; t0 < len; t0 += b, n++)
            if (items) items[3 * n] = g, items[3 * n + 1] = t0, items[3 * n + 2] = len - t0 < b ? len - t0 : b;
    }
    return n;
}

/* 1 where float32 calls take the 8-lane loops (AVX2 without AVX-512). */
int tandem_lora_avx2_f32(void) { return AVX2_F32; }

/* 1 where the kernel has its AMX path (compiled for this CPU and allowed by Linux). */
int tandem_lora_amx(void) {
#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
    return amx_allowed();
#else
    return 0;
#endif
}

#if defined(TANDEM_LORA_FLOOR) && TANDEM_LORA_FLOOR == 2
/* What an item of a read-only build does (bench/lora_floor.py): read the weights the item
   would, A's rows below the rank in each slice and B^T's, asked for ahead as shrink_dp asks
   for A, a word of every line (the line is what memory moves), and nothing else. The sum goes
   into an empty asm statement that claims to use it: assigned to a volatile local instead, GCC
   dropped every load and kept the prefetches alone (until 2026-12-06 this build measured that:
   its "only read" calls moved 35-40 GB/s on a Zen 3 core whose loads of the same lines run 13-17). */
static uint64_t read_lines(const char *p, int64_t bytes) {
    uint64_t sum = 0, word;
    for (int64_t i = 0; i < bytes; i += 64) {
        __builtin_prefetch(p + i + A_PREFETCH);
        memcpy(&word, p + i, 8);
        sum += word;
    }
    return sum;
}

static void read_item(const char *a, const char *bt, int64_t fin, int64_t ldb, int S, int R, int rank, int64_t wsize) {
    uint64_t sum = read_lines(bt, (int64_t)rank * ldb * wsize);
    for (int s = 0; s < S; s++) sum += read_lines(a + (int64_t)s * R * fin * wsize, (int64_t)rank * fin * wsize);
    __asm__ volatile("" : : "r"(sum));
}
#endif

/* dtypes: bit 0 set when x is bfloat16 (else float32), bit 1 when y is. Five arguments, the
   rest in the pool's and the step's structs: ctypes converts each argument in Python, and on
   a 2-core Emerald Rapids Xeon a call with the eight this took before (widths and dtype flags
   apart) cost ~1.5 us against ~0.9 with five (the served path makes 120 a step).
   Returns 0, or -1 when scratch memory could not be had (y is then untouched or partly updated
   only if a thread failed mid-way, which the caller treats as fatal). */
int tandem_lora_sgmv(const void *x, void *y, int dtypes, const struct tandem_lora_pool *pool,
                     const struct tandem_lora_step *step) {
#if defined(TANDEM_LORA_FLOOR) && TANDEM_LORA_FLOOR == 1
    /* A build whose calls do nothing (bench/lora_floor.py): what the engine spends around them. */
    (void)x, (void)y, (void)dtypes, (void)pool, (void)step;
    return 0;
#endif
    int x_bf16 = dtypes & 1, y_bf16 = dtypes >> 1 & 1;
    int64_t fin = pool->fin, N = pool->N, ldb = pool->ldb;
    const void *a = pool->a, *bt = pool->bt;
    const int32_t *ranks = pool->ranks, *widths = pool->widths;
    int w_bf16 = pool->w_bf16, S = pool->S, R = pool->R;
    const int32_t *seg_slot = step->seg_slot, *seg_start = step->seg_start, *seg_len = step->seg_len;
    const int64_t *sorted = step->sorted;
    int block = TB, long_min = INT32_MAX, long_block = TB;
    /* Paths whose blocks are compiled per token count (up to TB_DP). */
    int per_count = AVX2_F32 && !x_bf16 && !w_bf16 && !y_bf16;
#if defined(__AVX512BF16__)
    per_count = x_bf16 && w_bf16;
#endif
    if (per_count) {
#if defined(_OPENMP)
        int threads = omp_get_max_threads();
#else
        int threads = 1;
#endif
#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
        /* The long segments take the tiles, their repacking paid back by their tokens. */
        if (amx_allowed()) long_min = AMX_MIN_ROWS;
        for (long_block = AMX_ROWS; long_block > 8 && plan_items(step, ranks, TB_DP, long_min, long_block, NULL) < threads;
             long_block /= 2) {}
#endif
        /* Halved while there are fewer items than threads: one 8-token segment in one block
           would leave the other cores idle. */
        for (block = TB_DP; block > 1 && plan_items(step, ranks, block, long_min, long_block, NULL) < threads; block /= 2) {}
    }
    int nitems = plan_items(step, ranks, block, long_min, long_block, NULL);
    int32_t *items = malloc(sizeof(int32_t) * 3 * (size_t)(nitems + 1));
    if (!items) return -1;
    plan_items(step, ranks, block, long_min, long_block, items);
    /* Each thread's scratch, taken before any item adds into y: a call that cannot have it
       fails with y untouched (taken per item, a failing thread left its items out while the
       others had added theirs). Room for the largest of its uses, AMX's where an item runs on
       the tiles. */
    size_t floats = (size_t)block * fin + (size_t)block * S * R + (size_t)block * S * (R + 1) / 2 + 1;
#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
    struct amx_shape sh = amx_shape_of(fin, N, S, R);
    for (int it = 0; it < nitems; it++)
        if (seg_len[items[3 * it]] >= long_min && amx_scratch_floats(&sh, S) > floats) floats = amx_scratch_floats(&sh, S);
#endif
    int failed = 0;
#pragma omp parallel if (nitems > 1)
    {
        float *buf = scratch_for(floats);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
        /* Every thread's verdict in before any reads it: all of them skip the loop, or none. */
#pragma omp barrier
        int any_failed;
#pragma omp atomic read
        any_failed = failed;
        if (!any_failed) {
#pragma omp for schedule(static)
            for (int it = 0; it < nitems; it++) {
                int g = items[3 * it], t0 = items[3 * it + 1], nb = items[3 * it + 2];
                int slot = seg_slot[g], rank = ranks[slot];
                const int64_t *toks = sorted + seg_start[g] + t0;
#if defined(TANDEM_LORA_FLOOR) && TANDEM_LORA_FLOOR == 2
                {
                    int64_t ws = w_bf16 ? 2 : 4;
                    read_item((const char *)a + (int64_t)slot * S * R * fin * ws, (const char *)bt + (int64_t)slot * R * ldb * ws, fin, ldb,
                              S, R, rank, ws);
                    (void)toks, (void)nb;
                    continue;
                }
#endif
#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
                if (seg_len[g] >= long_min) {
                    amx_item((const uint16_t *)x, fin, (const uint16_t *)a + (int64_t)slot * S * R * fin,
                             (const uint16_t *)bt + (int64_t)slot * R * ldb, N, ldb, S, R, rank, widths, toks, nb, y, y_bf16, &sh, buf);
                    _tile_release();
                    continue;
                }
#endif
                /* x's block, v, and (bfloat16 expand) v's pairs. */
                float *xb = buf, *v = xb + (size_t)block * fin;
                int64_t wsize = w_bf16 ? 2 : 4;
                /* This item's B rows (those below the rank are contiguous), and the next item's A when it
                   is another slot's. */
                struct trickle b_rows = trickle_of((const char *)bt + (int64_t)slot * R * ldb * wsize, (int64_t)rank * ldb * wsize, 0, 1);
                int next = it + 1 < nitems ? seg_slot[items[3 * it + 3]] : slot;
                struct trickle a_next = trickle_of((const char *)a + (int64_t)next * S * R * fin * wsize,
                                                   next == slot ? 0 : (int64_t)ranks[next] * fin * wsize, (int64_t)R * fin * wsize, S);
#if defined(__AVX512BF16__)
                if (x_bf16 && w_bf16) {
                    dispatch_dp(nb, (const uint16_t *)x, fin, (const uint16_t *)a, (int64_t)slot * S * R * fin, (const uint16_t *)bt,
                                (int64_t)slot * R * ldb, N, ldb, S, R, rank, widths, toks, y, y_bf16, (uint16_t *)xb, v,
                                (uint16_t *)(v + (size_t)block * S * R), &b_rows, &a_next);
                    continue;
                }
#endif
#if AVX2_F32
                if (per_count) {
                    dispatch_f32(nb, (const float *)x, fin, (const float *)a + (int64_t)slot * S * R * fin, (const float *)bt + (int64_t)slot * R * ldb,
                                 N, ldb, S, R, rank, widths, toks, (float *)y, xb, v, &b_rows);
                    continue;
                }
#endif
                gather(x, x_bf16, fin, toks, nb, xb);
                shrink(xb, fin, a, (int64_t)slot * S * R * fin, w_bf16, S, R, rank, v, &b_rows);
                expand(v, bt, (int64_t)slot * R * ldb, w_bf16, N, ldb, S, R, rank, widths, toks, nb, y, y_bf16, &a_next);
            }
        }
    }
    free(items);
    return failed ? -1 : 0;
}

/* One slice of an adapter going into a slot: a [r, fin] and b [w, r], float32 rows as the
   adapter file holds them, to the slot's rows of A (a_dst, rows of fin) and its columns of
   B transposed (bt_dst, rows of n), b times scale in float32, each value rounded once into
   the slot's dtype as torch rounds it. */
struct tandem_lora_slice {
    const float *a, *b;
    void *a_dst, *bt_dst;
    int64_t fin, w, r, n;
    float scale;
};

static void put(void *dst, int bf16, int64_t i, const float *v, int64_t count) {
    int64_t j = 0;
    if (bf16) {
        uint16_t *d = (uint16_t *)dst + i;
        for (; j + 16 <= count; j += 16) store_bf16_exact(d + j, load(v + j));
        for (; j < count; j++) d[j] = f32_to_bf16(v[j]);
    } else {
        memcpy((float *)dst + i, v, count * sizeof(float));
    }
}

/* A slot load in one call (SlotPool._load): the per-slice torch copies it replaces cost
   ~8 ms an adapter, 5 of them transposing B element by element. */
void tandem_lora_load(const struct tandem_lora_slice *slices, int count, int w_bf16) {
#pragma omp parallel for schedule(dynamic) if (count > 1)
    for (int i = 0; i < count; i++) {
        const struct tandem_lora_slice *sl = &slices[i];
        for (int64_t k = 0; k < sl->r; k++) put(sl->a_dst, w_bf16, k * sl->fin, sl->a + k * sl->fin, sl->fin);
        /* Blocks of 16 rows of b (16 r floats, in cache), read down each column k. */
        for (int64_t i0 = 0; i0 < sl->w; i0 += 16) {
            int64_t nb = sl->w - i0 < 16 ? sl->w - i0 : 16;
            for (int64_t k = 0; k < sl->r; k++) {
                float col[16];
                for (int64_t t = 0; t < nb; t++) col[t] = sl->b[(i0 + t) * sl->r + k] * sl->scale;
                put(sl->bt_dst, w_bf16, k * sl->n + i0, col, nb);
            }
        }
    }
}
