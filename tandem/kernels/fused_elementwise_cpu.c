/* A decoder layer's elementwise work on the CPU, one call where torch makes many (see
   fused_elementwise.py, which builds and calls it): RMSNorm, with the residual add before it;
   rotary embedding of q and k; SiLU(gate) * up.

   Why C: in a SmolLM2 bf16 decode step of 16 sequences (34 ms on 2 Zen 4 cores), the ~40
   small torch ops per layer between the GEMMs (casts, pow, mean, rsqrt, cat, neg, silu, each
   2-20 us on a few kB) took ~7 ms. Each function here does its op in one pass, rows split
   over torch's OpenMP team when there are enough of them.

   Numerics are torch's, op by op: every intermediate that torch rounds to the model's dtype
   is rounded here too (round to nearest even; with AVX512-BF16 by its instruction, which
   flushes bf16 denormals to zero), float32 statistics as transformers' RMSNorm,
   and no fused multiply-adds (pragma below), so float32 rope and residual adds are bit-equal
   to torch's. What differs is the order of the squares' sum in RMSNorm and the exponential in
   SiLU (~2 ulp of float32): a bfloat16 result then lands one bf16 step away in rare ties.

   Layouts: row-major, rows contiguous in memory unless a stride is given; all tensors float32,
   or all bfloat16 when bf16. Widths are multiples of 16; a head's width a multiple of 32. */
#pragma GCC optimize("fp-contract=off")
#include <math.h>
#include <stdint.h>
#include "vec_cpu.h"

/* Below this many elements a call runs on one thread. */
#define PARALLEL_MIN 32768

static inline f32x16 ld(const void *p, int64_t i, int bf16) { return load_w(p, i, bf16); }

static inline void st(void *p, int64_t i, f32x16 v, int bf16) {
    if (bf16) store_bf16((uint16_t *)p + i, v);
    else store((float *)p + i, v);
}

/* v rounded to the model's dtype and back: the value torch holds between two ops. */
static inline f32x16 rounded(f32x16 v, int bf16) {
    if (!bf16) return v;
#if defined(__AVX512BF16__)
    u16x16 h;
    store_bf16((uint16_t *)&h, v);
    return (f32x16)(__builtin_convertvector(h, u32x16) << 16);
#else
    u32x16 u = (u32x16)v;
    u32x16 nan = (u & 0x7fffffffu) > 0x7f800000u;
    u32x16 r = (nan & (u | 0x400000u)) | (~nan & (u + 0x7fffu + ((u >> 16) & 1u)));
    return (f32x16)(r & 0xffff0000u);
#endif
}

/* The bodies below are inlined with bf16 a constant, once per dtype, so no loop tests it. */
#define PER_DTYPE(body, ...) \
    do { if (bf16) body(__VA_ARGS__, 1); else body(__VA_ARGS__, 0); } while (0)

static inline __attribute__((always_inline)) void norm_row(const void *x, const void *delta, void *sum, const void *w,
                                                           void *out, int64_t base, int64_t d, float eps, int bf16) {
    f32x16 acc = {0};
    for (int64_t j = 0; j < d; j += 16) {
        f32x16 h = ld(x, base + j, bf16);
        if (delta) {
            h = rounded(h + ld(delta, base + j, bf16), bf16);
            st(sum, base + j, h, bf16);
        }
        acc += h * h;
    }
    const void *src = delta ? sum : x;
    float inv = 1.0f / __builtin_sqrtf(hsum(acc) / (float)d + eps);
    for (int64_t j = 0; j < d; j += 16) st(out, base + j, ld(w, j, bf16) * rounded(ld(src, base + j, bf16) * inv, bf16), bf16);
}

/* out = w * dtype(h / rms(h)), h = x, or dtype(x + delta) (also stored to sum) when delta is
   given: transformers' LlamaRMSNorm after the residual add. */
void tandem_rms_norm(const void *x, const void *delta, void *sum, const void *w, void *out, int64_t rows, int64_t d,
                     float eps, int bf16) {
#pragma omp parallel for schedule(static) if (rows * d >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) PER_DTYPE(norm_row, x, delta, sum, w, out, r * d, d, eps);
}

static inline __attribute__((always_inline)) void rope_row(const void *qkv, int64_t src, const void *cos, const void *sin,
                                                           int64_t at, void *dst, int64_t to, int hd, int bf16) {
    int half = hd / 2;
    for (int j = 0; j < hd; j += 16) {
        f32x16 x = ld(qkv, src + j, bf16);
        f32x16 rot = j < half ? -ld(qkv, src + j + half, bf16) : ld(qkv, src + j - half, bf16);
        f32x16 a = rounded(x * ld(cos, at + j, bf16), bf16);
        f32x16 b = rounded(rot * ld(sin, at + j, bf16), bf16);
        st(dst, to + j, a + b, bf16);
    }
}

/* Rotate-half rotary embedding of the first heads + kv_heads heads of each qkv row (row
   stride `stride` elements): q [rows, heads, hd], k [rows, kv_heads, hd]; cos, sin [rows, hd].
   x * cos + rotate_half(x) * sin, each product and the sum rounded as torch does. */
void tandem_rope(const void *qkv, int64_t stride, const void *cos, const void *sin, void *q, void *k, int64_t rows,
                 int heads, int kv_heads, int hd, int bf16) {
#pragma omp parallel for schedule(static) if (rows * (heads + kv_heads) * hd >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        for (int h = 0; h < heads + kv_heads; h++) {
            void *dst = h < heads ? q : k;
            int64_t to = h < heads ? (r * heads + h) * hd : (r * kv_heads + h - heads) * hd;
            PER_DTYPE(rope_row, qkv, r * stride + (int64_t)h * hd, cos, sin, r * hd, dst, to, hd);
        }
    }
}

static inline __attribute__((always_inline)) void silu_mul_row(const void *gu, void *out, int64_t r, int64_t inter, int bf16) {
    int64_t g0 = r * 2 * inter, u0 = g0 + inter;
    for (int64_t j = 0; j < inter; j += 16) {
        f32x16 g = ld(gu, g0 + j, bf16);
        u32x16 neg = (u32x16)((i32x16)g >> 31); /* the sign bit: a float compare has no AVX2 form at 16 lanes */
        f32x16 e = exp_nonpositive((f32x16)((u32x16)g | 0x80000000u)); /* e^-|g| */
        /* g < 0: g e^g / (1 + e^g); else g / (1 + e^-g), torch's formula */
        f32x16 one = (f32x16){0} + 1.0f;
        f32x16 factor = (f32x16)((neg & (u32x16)e) | (~neg & (u32x16)one));
        st(out, r * inter + j, rounded(g * factor / (1.0f + e), bf16) * ld(gu, u0 + j, bf16), bf16);
    }
}

/* out [rows, inter] = dtype(silu(gate)) * up, gate and up the halves of each gu row
   [rows, 2 * inter]. silu from e^-|g|, so the exponential never overflows. */
void tandem_silu_mul(const void *gu, void *out, int64_t rows, int64_t inter, int bf16) {
#pragma omp parallel for schedule(static) if (rows * inter >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) PER_DTYPE(silu_mul_row, gu, out, r, inter);
}
