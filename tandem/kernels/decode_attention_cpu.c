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


/* Each of the H rows of scores s [H, L] made e^(score - its maximum m[i]), in place, and
   inv[i] the reciprocal of the row's sum. */
static void softmax(float *s, int L, int H, const float *m, float *inv) {
    for (int i = 0; i < H; i++) {
        float *si = s + (size_t)i * L;
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
    softmax(s, L, H, m, inv);
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
   cache at 6-8 GB/s in float32 (copy bandwidth 26 GB/s). This variant keeps its sums in
   registers: scores 8 slots at a time (8 dot products reduced together, one horizontal
   reduction per 8 scores rather than per score), and the weighted sum of values per KV head
   in chunks of 32 dimensions for up to 3 of its query heads (12 accumulators). For D a
   multiple of 32; attend serves the rest. */
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

#define GROUP 3 /* query heads of a KV head per pass over its values */
#define CHUNK 4 /* vectors of 8 dimensions per pass */

static int attend_avx2(const void *q, const void *k, const void *v, void *out, const int64_t *slots, int L, int H,
                       int Hkv, int D, float scale, int bf16) {
    int G = H / Hkv, C = D / 8;
    float m[MAX_HEADS], inv[MAX_HEADS];
    float *s = scratch_for((size_t)H * (L > 0 ? L : 1) + (size_t)H * D);
    if (!s) return -1;
    float *qs = s + (size_t)H * (L > 0 ? L : 1);
    for (int i = 0; i < H * D; i++) qs[i] = (bf16 ? bf16_to_f32(((const uint16_t *)q)[i]) : ((const float *)q)[i]) * scale;
    for (int i = 0; i < H; i++) m[i] = -INFINITY;
    int64_t stride = (int64_t)Hkv * D;
    for (int j0 = 0; j0 < L; j0 += 8) {
        int n = L - j0 < 8 ? L - j0 : 8;
        int64_t row[8];
        for (int t = 0; t < 8; t++) row[t] = slots[j0 + (t < n ? t : n - 1)] * stride;
        for (int t = 8; t < 16 && j0 + t < L; t++) prefetch_row(k, slots[j0 + t] * stride, stride, bf16);
        for (int h = 0; h < Hkv; h++) {
            for (int g = 0; g < G; g++) {
                int i = h * G + g;
                __m256 acc[8];
                _Pragma("GCC unroll 8") for (int t = 0; t < 8; t++) acc[t] = _mm256_setzero_ps();
                for (int c = 0; c < C; c++) {
                    __m256 qc = _mm256_loadu_ps(qs + (int64_t)i * D + c * 8);
                    _Pragma("GCC unroll 8") for (int t = 0; t < 8; t++)
                        acc[t] = _mm256_fmadd_ps(qc, load8(k, row[t] + (int64_t)h * D + c * 8, bf16), acc[t]);
                }
                float sc[8];
                _mm256_storeu_ps(sc, sums_of_8(acc));
                for (int t = 0; t < n; t++) {
                    s[(size_t)i * L + j0 + t] = sc[t];
                    if (sc[t] > m[i]) m[i] = sc[t];
                }
            }
        }
    }
    softmax(s, L, H, m, inv);
    for (int h = 0; h < Hkv; h++) {
        for (int g0 = 0; g0 < G; g0 += GROUP) {
            const float *sg[GROUP];
            for (int u = 0; u < GROUP; u++) sg[u] = s + (size_t)(h * G + (g0 + u < G ? g0 + u : G - 1)) * L;
            for (int c0 = 0; c0 < D; c0 += 8 * CHUNK) {
                __m256 acc[GROUP][CHUNK];
                _Pragma("GCC unroll 4") for (int u = 0; u < GROUP; u++)
                    _Pragma("GCC unroll 4") for (int w = 0; w < CHUNK; w++) acc[u][w] = _mm256_setzero_ps();
                int64_t at = (int64_t)h * D + c0;
                for (int j = 0; j < L; j++) {
                    if (j + AHEAD < L) prefetch_row(v, slots[j + AHEAD] * stride + at, 8 * CHUNK, bf16);
                    __m256 vc[CHUNK];
                    _Pragma("GCC unroll 4") for (int w = 0; w < CHUNK; w++) vc[w] = load8(v, slots[j] * stride + at + w * 8, bf16);
                    _Pragma("GCC unroll 4") for (int u = 0; u < GROUP; u++) {
                        __m256 b = _mm256_broadcast_ss(sg[u] + j);
                        _Pragma("GCC unroll 4") for (int w = 0; w < CHUNK; w++) acc[u][w] = _mm256_fmadd_ps(b, vc[w], acc[u][w]);
                    }
                }
                for (int u = 0; u < GROUP && g0 + u < G; u++) {
                    int i = h * G + g0 + u;
                    float o[8 * CHUNK];
                    __m256 scale_i = _mm256_set1_ps(inv[i]);
                    _Pragma("GCC unroll 4") for (int w = 0; w < CHUNK; w++) _mm256_storeu_ps(o + w * 8, _mm256_mul_ps(acc[u][w], scale_i));
                    for (int d = 0; d < 8 * CHUNK; d++) {
                        int64_t x = (int64_t)i * D + c0 + d;
                        if (bf16) ((uint16_t *)out)[x] = f32_to_bf16(o[d]);
                        else ((float *)out)[x] = o[d];
                    }
                }
            }
        }
    }
    return 0;
}
#define ATTEND(D) ((D) % (8 * CHUNK) == 0 ? attend_avx2 : attend)
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
