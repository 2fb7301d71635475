/* Float32 vectors of 16 lanes over float32 or bfloat16 memory, and a per-thread scratch
   buffer, for the CPU kernels (plain C with GCC vector types: it builds for whatever
   -march=native offers, AVX2 or AVX-512). */
#ifndef TANDEM_VEC_CPU_H
#define TANDEM_VEC_CPU_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float f32x16 __attribute__((vector_size(64), aligned(4)));
typedef uint32_t u32x16 __attribute__((vector_size(64), aligned(4)));
typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));

static inline f32x16 load(const float *p) { f32x16 r; memcpy(&r, p, 64); return r; }
static inline void store(float *p, f32x16 v) { memcpy(p, &v, 64); }

#if defined(__AVX512F__)
/* One widening load: the generic conversion below compiled to two loads, an extract, two
   widenings and an insert, most of them on one port (an add into bfloat16 rows ran ~2.5x slower). */
static inline f32x16 load_bf16(const uint16_t *p) {
    return (f32x16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
}
#else
static inline f32x16 load_bf16(const uint16_t *p) {
    u16x16 h; memcpy(&h, p, 32);
    u32x16 u = __builtin_convertvector(h, u32x16) << 16;
    f32x16 f; memcpy(&f, &u, 64); return f;
}
#endif

/* Round to nearest even, as torch does, denormals included; NaNs stay NaN (quieted). */
static inline void store_bf16_exact(uint16_t *p, f32x16 f) {
    u32x16 u; memcpy(&u, &f, 64);
    u32x16 rounded = u + 0x7fffu + ((u >> 16) & 1u);
    u32x16 nan = (u & 0x7fffffffu) > 0x7f800000u;
    u32x16 r = (nan & (u | 0x400000u)) | (~nan & rounded);
    u16x16 h = __builtin_convertvector(r >> 16, u16x16);
    memcpy(p, &h, 32);
}

#if defined(__AVX512BF16__)
/* Round to nearest even in one instruction (NaNs stay NaN; bf16 denormals flush to zero). */
static inline void store_bf16(uint16_t *p, f32x16 f) {
    __m256bh h = _mm512_cvtneps_pbh((__m512)f);
    memcpy(p, &h, 32);
}
#else
static inline void store_bf16(uint16_t *p, f32x16 f) { store_bf16_exact(p, f); }
#endif

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Weights in either dtype, as float32. */
static inline f32x16 load_w(const void *p, int64_t i, int bf16) {
    return bf16 ? load_bf16((const uint16_t *)p + i) : load((const float *)p + i);
}
static inline float w_at(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

typedef float f32x8 __attribute__((vector_size(32), aligned(4)));
typedef float f32x4 __attribute__((vector_size(16), aligned(4)));
/* A tree over halves: a scalar loop would chain 16 dependent adds. Lanes are read as
   elements, not copied out through memory: a memcpy from the vector's address kept the
   caller's accumulator on the stack, a store and a load in every iteration of its loop. */
static inline float hsum(f32x16 v) {
    f32x8 h;
    for (int i = 0; i < 8; i++) h[i] = v[i] + v[i + 8];
    f32x4 q;
    for (int i = 0; i < 4; i++) q[i] = h[i] + h[i + 4];
    return (q[0] + q[2]) + (q[1] + q[3]);
}

typedef int32_t i32x16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t i32x8 __attribute__((vector_size(32), aligned(4)));

/* e^x for x <= 0 (a score less its row's maximum), within ~2 ulp of expf, a vector at a time:
   libm's scalar expf took most of the kernel's time (a 24-sequence SmolLM2 step makes ~1.3M
   of them). Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, e^r a degree-7 polynomial, 2^n
   put in the exponent bits; 0 below -87, where e^x leaves float's normal range. */
#define EXP_NONPOSITIVE(NAME, F, I)                                                        \
    static inline F NAME(F x) {                                                            \
        I normal = ~(x < -87.0f); /* NaN stays NaN */                                      \
        F t = x * 1.44269504088896341f + 0.5f;                                             \
        I n = __builtin_convertvector(t, I);                                               \
        n += __builtin_convertvector(n, F) > t; /* truncation towards zero, made floor */  \
        F nf = __builtin_convertvector(n, F);                                              \
        F r = x - nf * 0.693359375f + nf * 2.12194440e-4f;                                 \
        F p = r * 1.9875691500e-4f + 1.3981999507e-3f;                                     \
        p = p * r + 8.3334519073e-3f;                                                      \
        p = p * r + 4.1665795894e-2f;                                                      \
        p = p * r + 1.6666665459e-1f;                                                      \
        p = p * r + 5.0000001201e-1f;                                                      \
        F y = p * r * r + r + 1.0f;                                                        \
        I bits = (n + 127) << 23, yb;                                                      \
        F two_n;                                                                           \
        memcpy(&two_n, &bits, sizeof bits);                                                \
        y *= two_n;                                                                        \
        memcpy(&yb, &y, sizeof y);                                                         \
        yb &= normal;                                                                      \
        memcpy(&y, &yb, sizeof y);                                                         \
        return y;                                                                          \
    }

#if defined(__AVX512F__)
EXP_NONPOSITIVE(exp_nonpositive, f32x16, i32x16)
#else
/* Without AVX-512, GCC turned the 16-lane comparisons into 16 scalar ones (vcomiss, lane
   inserts and extracts): SiLU in C ran at half torch's speed on a Zen 3. Two 8-lane halves
   compare in one instruction each. */
EXP_NONPOSITIVE(exp_nonpositive_half, f32x8, i32x8)
static inline f32x16 exp_nonpositive(f32x16 x) {
    f32x8 h[2];
    memcpy(h, &x, 64);
    h[0] = exp_nonpositive_half(h[0]);
    h[1] = exp_nonpositive_half(h[1]);
    memcpy(&x, h, 64);
    return x;
}
#endif

/* Scratch of at least `floats` floats, kept per thread and grown on demand (sgmv: TB token
   rows of x in float32, then their v; decode attention: a sequence's scores). NULL when out
   of memory. */
static __thread float *scratch;
static __thread size_t scratch_floats;

static inline float *scratch_for(size_t floats) {
    if (floats > scratch_floats) {
        free(scratch);
        scratch = malloc(floats * sizeof(float));
        scratch_floats = scratch ? floats : 0;
    }
    return scratch;
}

#endif
