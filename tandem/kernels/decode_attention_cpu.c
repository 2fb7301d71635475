/* Paged attention of decode tokens on the CPU: each sequence's one query row over its
   context, read from the paged KV cache where it lies (see decode_attention.py, which builds
   and calls it).

   Why C: through torch a decode step gathers every sequence's context out of the cache
   (index_select, 2 x 4 MB a SmolLM2 layer at 24 sequences x 225 tokens) and hands it to
   SDPA, whose CPU flash kernel is built for long query blocks: with one query row per
   sequence it ran at ~35 GFLOP/s, and gather + SDPA took 15 of a 34 ms step on 2 Zen 5
   cores. Here each sequence reads its keys and values once, straight from their slots, for
   all its query heads, asking for each slot's row a few slots ahead (the context's blocks
   lie anywhere in the cache); scores, softmax and the weighted sum in float32, as SDPA's
   CPU kernel accumulates; torch's OpenMP team splits the sequences. In a SmolLM2 decode step
   of 24 sequences (~180 tokens) it took 6-7 ms against ~15 for gather + SDPA.

   Layouts: q and out [nd, H, D]; k and v caches [num_slots, Hkv, D]; all float32, or all
   bfloat16 when bf16; slots [nd, W] int64, of which the first lens[s] hold sequence s's
   context in order. D a multiple of 16 up to MAX_D, H up to MAX_HEADS, a multiple of Hkv. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "vec_cpu.h"

#define MAX_D 256
#define MAX_HEADS 64

static inline void store_x(void *p, int64_t i, f32x16 v, int bf16) {
    if (bf16) store_bf16((uint16_t *)p + i, v);
    else store((float *)p + i, v);
}

/* How many slots ahead a walk asks for a slot's row (all its KV heads), and asks for it
   whole: a context's slots run in blocks, but each block lies anywhere in the cache. */
#define AHEAD 8

static inline void prefetch_row(const void *base, int64_t at, int64_t n, int bf16) {
    const char *p = (const char *)base + at * (bf16 ? 2 : 4), *end = p + n * (bf16 ? 2 : 4);
    for (; p < end; p += 64) __builtin_prefetch(p);
}


/* The first L of each of the H rows of scores s [H, stride] made e^(score - its maximum
   m[i]), in place, and inv[i] the reciprocal of the row's sum. */
static void softmax(float *s, int L, int stride, int H, const float *m, float *inv) {
    for (int i = 0; i < H; i++) {
        float *si = s + (size_t)i * stride;
        f32x16 sums = {0};
        int j = 0;
        for (; j + 16 <= L; j += 16) {
            f32x16 e = exp_nonpositive(load(si + j) - m[i]);
            store(si + j, e);
            sums += e;
        }
        float sum = hsum(sums);
        for (; j < L; j++) {
            si[j] = expf(si[j] - m[i]);
            sum += si[j];
        }
        inv[i] = L > 0 ? 1.0f / sum : 0.0f;
    }
}

/* One sequence's H query heads over its L context slots. A slot's keys (and values) of all
   KV heads lie together, so walking the slots in order reads the cache in runs of whole
   blocks. Returns -1 out of memory. */
static int attend(const void *q, const void *k, const void *v, void *out, const int64_t *slots, int L, int H,
                  int Hkv, int D, float scale, int bf16) {
    int C = D / 16, G = H / Hkv;
    f32x16 qv[H][C], acc[H][C];
    float m[H], inv[H];
    float *s = scratch_for((size_t)H * (L > 0 ? L : 1));
    if (!s) return -1;
    for (int i = 0; i < H; i++) {
        for (int c = 0; c < C; c++) {
            qv[i][c] = load_w(q, (int64_t)i * D + c * 16, bf16) * scale;
            acc[i][c] = (f32x16){0};
        }
        m[i] = -INFINITY;
    }
    int64_t stride = (int64_t)Hkv * D;
    for (int j = 0; j < L; j++) {
        if (j + AHEAD < L) prefetch_row(k, slots[j + AHEAD] * stride, stride, bf16);
        for (int h = 0; h < Hkv; h++) {
            int64_t row = slots[j] * stride + (int64_t)h * D;
            f32x16 kc[MAX_D / 16];
            for (int c = 0; c < C; c++) kc[c] = load_w(k, row + c * 16, bf16);
            for (int g = 0; g < G; g++) {
                int i = h * G + g;
                f32x16 d = qv[i][0] * kc[0];
                for (int c = 1; c < C; c++) d += qv[i][c] * kc[c];
                float x = hsum(d);
                s[(size_t)i * L + j] = x;
                if (x > m[i]) m[i] = x;
            }
        }
    }
    softmax(s, L, L, H, m, inv);
    for (int j = 0; j < L; j++) {
        if (j + AHEAD < L) prefetch_row(v, slots[j + AHEAD] * stride, stride, bf16);
        for (int h = 0; h < Hkv; h++) {
            int64_t row = slots[j] * stride + (int64_t)h * D;
            for (int c = 0; c < C; c++) {
                f32x16 vc = load_w(v, row + c * 16, bf16);
                for (int g = 0; g < G; g++) acc[h * G + g][c] += s[(size_t)(h * G + g) * L + j] * vc;
            }
        }
    }
    for (int i = 0; i < H; i++)
        for (int c = 0; c < C; c++) store_x(out, (int64_t)i * D + c * 16, acc[i][c] * inv[i], bf16);
    return 0;
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>
/* With AVX2 (8 lanes) and no AVX-512, the 16-lane vectors above are pairs of registers and
   attend's per-head accumulators and queries live on the stack; on 2 Zen 3 cores it read the
   cache at 6-8 GB/s in float32. This variant keeps its dot products in registers and reads
   the cache in the order it lies (below). */
static inline __m256 load8(const void *p, int64_t i, int bf16) {
    if (bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
    return _mm256_loadu_ps((const float *)p + i);
}

/* Lane t of the result: the sum of v[t]'s lanes. */
static inline __m256 sums_of_8(const __m256 v[8]) {
    __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

static inline float hmax8(__m256 v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

/* R query heads (rows of qs from qi, D = 8C apart) against one key row kr: each head's 8
   partial sums into part[i * 8], for sums_of_8 once 8 slots are in. */
static inline __attribute__((always_inline)) void dots(const float *qi, const void *k, int64_t kr, int C, __m256 *part,
                                                       int R, int bf16) {
    __m256 acc[4];
    for (int u = 0; u < R; u++) acc[u] = _mm256_setzero_ps();
    for (int c = 0; c < C; c++) {
        __m256 kc = load8(k, kr + c * 8, bf16);
        for (int u = 0; u < R; u++) acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(qi + (int64_t)u * C * 8 + c * 8), kc, acc[u]);
    }
    for (int u = 0; u < R; u++) part[u * 8] = acc[u];
}

/* R heads' sums oi (D = 8C apart) plus their weights pa (and pb, when two) times value rows
   va (and vb): two slots a pass halve the sums' loads and stores, which bound this loop. */
static inline __attribute__((always_inline)) void weigh(float *oi, const float *pa, const float *pb, const void *v,
                                                        int64_t va, int64_t vb, int C, int R, int two, int bf16) {
    __m256 a[4], b[4];
    for (int u = 0; u < R; u++) {
        a[u] = _mm256_broadcast_ss(pa + u);
        if (two) b[u] = _mm256_broadcast_ss(pb + u);
    }
    for (int c = 0; c < C; c++) {
        __m256 x = load8(v, va + c * 8, bf16), y = two ? load8(v, vb + c * 8, bf16) : x;
        for (int u = 0; u < R; u++) {
            float *at = oi + (int64_t)u * C * 8 + c * 8;
            __m256 acc = _mm256_fmadd_ps(a[u], x, _mm256_loadu_ps(at));
            if (two) acc = _mm256_fmadd_ps(b[u], y, acc);
            _mm256_storeu_ps(at, acc);
        }
    }
}

/* How many slots ahead the walk asks for a row: 4 beat 8 and 16 on the Zen 3. */
#define ROWS_AHEAD 4

#define BY_ROWS(R, call) \
    do { switch (R) { case 1: call(1); break; case 2: call(2); break; case 3: call(3); break; default: call(4); } } while (0)

/* Slots are walked in order, each row (all KV heads) read whole, as it lies in its block:
   on 2 Zen 3 cores, SmolLM2's heads, 32 sequences of ~190 slots from memory, the same bytes
   streamed at 21 GB/s read in that order and at 14 GB/s read 8 rows at once a head at a time
   (this kernel's first form, whose whole call reached 11 GB/s; this one 16-18). Scores of 8
   slots are reduced together (sums_of_8), their maxima kept as vectors; the probabilities
   are transposed to [L, H], so a slot's weights for its heads lie together. Sums and outputs
   in the order of the first form's: the results are the same bits. bf16 a constant where inlined. */
static inline __attribute__((always_inline)) int attend_avx2_body(const void *q, const void *k, const void *v, void *out,
                                                                  const int64_t *slots, int L, int H, int Hkv, int D,
                                                                  float scale, int bf16) {
    int G = H / Hkv, C = D / 8, Lp = (L + 7) & ~7;
    float m[MAX_HEADS], inv[MAX_HEADS];
    __m256 mv[MAX_HEADS], part[MAX_HEADS * 8];
    float *s = scratch_for(2 * (size_t)H * (Lp > 0 ? Lp : 8) + 2 * (size_t)H * D);
    if (!s) return -1;
    float *p = s + (size_t)H * (Lp > 0 ? Lp : 8), *qs = p + (size_t)H * (Lp > 0 ? Lp : 8), *o = qs + (size_t)H * D;
    for (int i = 0; i < H * D; i++) qs[i] = (bf16 ? bf16_to_f32(((const uint16_t *)q)[i]) : ((const float *)q)[i]) * scale;
    memset(o, 0, sizeof(float) * H * D);
    for (int i = 0; i < H; i++) mv[i] = _mm256_set1_ps(-INFINITY);
    int64_t stride = (int64_t)Hkv * D;
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int j0 = 0; j0 < L; j0 += 8) {
        int n = L - j0 < 8 ? L - j0 : 8;
        for (int t = 0; t < 8; t++) {
            if (t >= n) {
                for (int i = 0; i < H; i++) part[i * 8 + t] = _mm256_setzero_ps();
                continue;
            }
            int64_t row = slots[j0 + t] * stride;
            if (j0 + t + ROWS_AHEAD < L) prefetch_row(k, slots[j0 + t + ROWS_AHEAD] * stride, stride, bf16);
            for (int h = 0; h < Hkv; h++)
                for (int g0 = 0; g0 < G; g0 += 4) {
                    int i = h * G + g0;
#define DOTS(R) dots(qs + (int64_t)i * D, k, row + (int64_t)h * D, C, part + i * 8 + t, R, bf16)
                    BY_ROWS(G - g0, DOTS);
#undef DOTS
                }
        }
        __m256 past = _mm256_castsi256_ps(_mm256_cmpgt_epi32(lanes, _mm256_set1_epi32(n - 1)));
        for (int i = 0; i < H; i++) {
            __m256 sc = _mm256_blendv_ps(sums_of_8(part + i * 8), _mm256_set1_ps(-INFINITY), past);
            _mm256_storeu_ps(s + (size_t)i * Lp + j0, sc);
            mv[i] = _mm256_max_ps(mv[i], sc);
        }
    }
    for (int i = 0; i < H; i++) m[i] = hmax8(mv[i]);
    softmax(s, L, Lp, H, m, inv);
    for (int i = 0; i < H; i++)
        for (int j = 0; j < L; j++) p[(size_t)j * H + i] = s[(size_t)i * Lp + j];
    for (int j = 0; j < L; j += 2) {
        int two = j + 1 < L;
        int64_t ra = slots[j] * stride, rb = two ? slots[j + 1] * stride : ra;
        for (int a = 2 * ROWS_AHEAD; a < 2 * ROWS_AHEAD + 2 && j + a < L; a++) prefetch_row(v, slots[j + a] * stride, stride, bf16);
        for (int h = 0; h < Hkv; h++)
            for (int g0 = 0; g0 < G; g0 += 4) {
                int i = h * G + g0;
                const float *pa = p + (size_t)j * H + i, *pb = pa + H;
#define WEIGH(R) (two ? weigh(o + (int64_t)i * D, pa, pb, v, ra + (int64_t)h * D, rb + (int64_t)h * D, C, R, 1, bf16) \
                      : weigh(o + (int64_t)i * D, pa, pb, v, ra + (int64_t)h * D, rb + (int64_t)h * D, C, R, 0, bf16))
                BY_ROWS(G - g0, WEIGH);
#undef WEIGH
            }
    }
    for (int i = 0; i < H; i++) {
        __m256 scale_i = _mm256_set1_ps(inv[i]);
        for (int d = 0; d < D; d += 8) {
            float r[8];
            _mm256_storeu_ps(r, _mm256_mul_ps(_mm256_loadu_ps(o + (size_t)i * D + d), scale_i));
            for (int e = 0; e < 8; e++) {
                int64_t x = (int64_t)i * D + d + e;
                if (bf16) ((uint16_t *)out)[x] = f32_to_bf16(r[e]);
                else ((float *)out)[x] = r[e];
            }
        }
    }
    return 0;
}

static int attend_avx2(const void *q, const void *k, const void *v, void *out, const int64_t *slots, int L, int H,
                       int Hkv, int D, float scale, int bf16) {
    return bf16 ? attend_avx2_body(q, k, v, out, slots, L, H, Hkv, D, scale, 1)
                : attend_avx2_body(q, k, v, out, slots, L, H, Hkv, D, scale, 0);
}
#define ATTEND(D) attend_avx2
#else
#define ATTEND(D) attend
#endif

/* 0 on success; -1 for shapes it does not take or out of memory (out is then incomplete). */
int tandem_decode_attention(const void *q, const void *k, const void *v, void *out, const int64_t *slots,
                            const int32_t *lens, int64_t W, int nd, int H, int Hkv, int D, float scale, int bf16) {
    if (D % 16 || D > MAX_D || H > MAX_HEADS || Hkv <= 0 || H % Hkv) return -1;
    int failed = 0;
    size_t row = (size_t)H * D * (bf16 ? 2 : 4);
#pragma omp parallel for schedule(dynamic) reduction(|| : failed) if (nd > 1)
    for (int s = 0; s < nd; s++)
        if (ATTEND(D)((const char *)q + s * row, k, v, (char *)out + s * row, slots + (int64_t)s * W, lens[s], H, Hkv, D, scale, bf16))
            failed = 1;
    return failed ? -1 : 0;
}
