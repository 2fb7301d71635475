/* y = x W^T (+ bias) for a few rows of x (a decode step's), one pass over W per group of
   rows (see skinny_linear.py, which packs W, builds and calls it). Two kernels: bfloat16 for
   CPUs with AVX512-BF16, float32 for CPUs with AVX2 and FMA.

   Why: at a few rows a linear streams its weight once and does little arithmetic, and
   oneDNN's bf16 linear on its reordered weight streamed SmolLM2's at 15-40 GB/s on 2 Zen 4
   cores, where this loop reaches 30-60 GB/s (bench/base_linears.py): a decode step of one
   sequence went from ~20 to ~13 ms. In float32 on 2 Zen 3 cores (AVX2), oneDNN's kernels
   ran SmolLM2's shapes at 100-125 GFLOP/s at 32 rows where this loop ran 115-150.

   bfloat16 layout: W packed as [ceil(N / 64)][K / 2][64][2] (zero rows pad N): a tile of 64
   output columns is one contiguous stream, and each 64-byte line holds one pair of inputs
   (k, k+1) for 16 columns, what AVX512-BF16's dot product of pairs takes. Per pair of
   inputs, a row's (x[k], x[k+1]) is broadcast and multiplied into the tile's 4 vectors:
   float32 sums, rounded to bfloat16 once at the end (with the bias added in float32).
   float32 layout: [ceil(N / 16)][K][16], a 64-byte line per input for the tile's 2 vectors.
   Tiles are taken one at a time by torch's OpenMP team (dynamic: in a server the event
   loop's thread shares the cores, and a thread it preempts would hold up a static half;
   in float32 each thread claims one tile ahead, to ask for its lines early);
   rows go through a tile 6 at a time (24 accumulators in bfloat16, 12 in float32), so from
   7 rows on the tile is read again from cache, not memory. */
#include <stdint.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>

#define TILE_COLS 64
#define MAX_GROUP 6

#define TILE(R)                                                                                        \
    static void tile_##R(const uint32_t *x, int64_t pairs, const uint16_t *p, const uint16_t *bias,    \
                         int64_t col, int cols, uint16_t *y, int64_t N) {                               \
        __m512 acc[R][4];                                                                              \
        for (int r = 0; r < R; r++)                                                                    \
            for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();                               \
        for (int64_t kp = 0; kp < pairs; kp++) {                                                       \
            const uint16_t *w = p + kp * 2 * TILE_COLS;                                                \
            __m512bh wv[4];                                                                            \
            for (int j = 0; j < 4; j++) wv[j] = (__m512bh)_mm512_loadu_si512(w + 32 * j);              \
            for (int r = 0; r < R; r++) {                                                              \
                __m512bh b = (__m512bh)_mm512_set1_epi32((int)x[r * pairs + kp]);                      \
                for (int j = 0; j < 4; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], b, wv[j]);         \
            }                                                                                          \
        }                                                                                              \
        for (int j = 0; j < 4 && cols > 16 * j; j++) {                                                 \
            int n = cols - 16 * j;                                                                     \
            __mmask16 m = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);                    \
            __m512 bv = _mm512_setzero_ps();                                                           \
            if (bias) {                                                                                \
                __m256i h = _mm256_maskz_loadu_epi16(m, bias + col + 16 * j);                          \
                bv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));            \
            }                                                                                          \
            for (int r = 0; r < R; r++) {                                                              \
                __m256bh h = _mm512_cvtneps_pbh(_mm512_add_ps(acc[r][j], bv));                         \
                _mm256_mask_storeu_epi16(y + r * N + col + 16 * j, m, (__m256i)h);                     \
            }                                                                                          \
        }                                                                                              \
    }
TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)

typedef void (*tile_fn)(const uint32_t *, int64_t, const uint16_t *, const uint16_t *, int64_t, int, uint16_t *, int64_t);
static const tile_fn tile_of_rows[MAX_GROUP + 1] = {0, tile_1, tile_2, tile_3, tile_4, tile_5, tile_6};

int tandem_skinny_tile_cols(void) { return TILE_COLS; }

/* x [M, K], y [M, N] bfloat16, rows contiguous; K even; bias [N] or NULL. */
void tandem_skinny_linear(const uint16_t *x, const uint16_t *packed, const uint16_t *bias, uint16_t *y, int M, int64_t N,
                          int64_t K) {
    int64_t pairs = K / 2, tiles = (N + TILE_COLS - 1) / TILE_COLS;
#pragma omp parallel for schedule(dynamic) if (tiles > 1)
    for (int64_t t = 0; t < tiles; t++) {
        const uint16_t *p = packed + t * pairs * 2 * TILE_COLS;
        int cols = N - t * TILE_COLS < TILE_COLS ? (int)(N - t * TILE_COLS) : TILE_COLS;
        for (int m0 = 0; m0 < M;) {
            int rows = M - m0 < MAX_GROUP ? M - m0 : MAX_GROUP;
            tile_of_rows[rows]((const uint32_t *)x + m0 * pairs, pairs, p, bias, t * TILE_COLS, cols, y + m0 * N, N);
            m0 += rows;
        }
    }
}
#else
/* Without AVX512-BF16 there is no kernel (no tiles): skinny_linear.py keeps oneDNN's path. */
int tandem_skinny_tile_cols(void) { return 0; }
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#define F32_TILE_COLS 16

/* The accumulators are indexed only by constants once the row loops unroll: an index the
   compiler cannot resolve keeps them in memory, a store per FMA (it halved the rate). */
#define F32_TILE(R)                                                                                    \
    static void f32_tile_##R(const float *x, int64_t K, const float *p, const float *bias, int64_t col, \
                             int cols, float *y, int64_t N, const char *ahead, int every) {             \
        __m256 acc[R][2];                                                                              \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps(); \
        for (int64_t k0 = 0; k0 < K; k0 += every) {                                                   \
            if (ahead) _mm_prefetch(ahead + k0 / every * 64, _MM_HINT_T1);                             \
            int64_t k1 = k0 + every < K ? k0 + every : K;                                              \
            for (int64_t k = k0; k < k1; k++) {                                                        \
                __m256 w0 = _mm256_loadu_ps(p + k * F32_TILE_COLS), w1 = _mm256_loadu_ps(p + k * F32_TILE_COLS + 8); \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                  \
                    __m256 b = _mm256_broadcast_ss(x + r * K + k);                                     \
                    acc[r][0] = _mm256_fmadd_ps(b, w0, acc[r][0]);                                     \
                    acc[r][1] = _mm256_fmadd_ps(b, w1, acc[r][1]);                                     \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
        __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);                                      \
        __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols), lane);                                \
        __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(cols - 8), lane);                            \
        __m256 b0 = bias ? _mm256_maskload_ps(bias + col, m0) : _mm256_setzero_ps();                   \
        __m256 b1 = bias ? _mm256_maskload_ps(bias + col + 8, m1) : _mm256_setzero_ps();               \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                          \
            _mm256_maskstore_ps(y + r * N + col, m0, _mm256_add_ps(acc[r][0], b0));                    \
            _mm256_maskstore_ps(y + r * N + col + 8, m1, _mm256_add_ps(acc[r][1], b1));                \
        }                                                                                              \
    }
F32_TILE(1) F32_TILE(2) F32_TILE(3) F32_TILE(4) F32_TILE(5) F32_TILE(6)

typedef void (*f32_tile_fn)(const float *, int64_t, const float *, const float *, int64_t, int, float *, int64_t, const char *, int);
static const f32_tile_fn f32_tile_of_rows[7] = {0, f32_tile_1, f32_tile_2, f32_tile_3, f32_tile_4, f32_tile_5, f32_tile_6};

int tandem_skinny_f32_tile_cols(void) { return F32_TILE_COLS; }

/* x [M, K], y [M, N] float32, rows contiguous; bias [N] or NULL. Rows go in balanced groups of
   at most 6 (32 rows: 5, 5, 5, 5, 6, 6): a group of 2 would leave 4 accumulators, too few
   to cover the FMA's latency. A thread claims its next tile when it starts one, and with two
   groups or more each group asks for its share of the next tile's lines, one every `groups`
   inputs: the first group then reads its tile from cache, not at memory's pace. On 2 Zen 3
   cores, SmolLM2's shapes at 32 rows went from 116-133 to 139-164 GFLOP/s (the weights of
   12 layers in turn, so not in cache); up to 6 rows the walk is as before. */
void tandem_skinny_linear_f32(const float *x, const float *packed, const float *bias, float *y, int M, int64_t N, int64_t K) {
    int64_t tiles = (N + F32_TILE_COLS - 1) / F32_TILE_COLS, claimed = 0;
    int groups = (M + 5) / 6;
#pragma omp parallel if (tiles > 1)
    {
        int64_t t = __atomic_fetch_add(&claimed, 1, __ATOMIC_RELAXED);
        while (t < tiles) {
            int64_t next = __atomic_fetch_add(&claimed, 1, __ATOMIC_RELAXED);
            const float *p = packed + t * K * F32_TILE_COLS;
            const char *ahead = next < tiles && groups > 1 ? (const char *)(packed + next * K * F32_TILE_COLS) : 0;
            int cols = N - t * F32_TILE_COLS < F32_TILE_COLS ? (int)(N - t * F32_TILE_COLS) : F32_TILE_COLS;
            for (int g = 0, m0 = 0; g < groups; g++) {
                int rows = (M - m0) / (groups - g);
                int64_t lines = (K * g) / groups; /* this group asks for the next tile's lines [K g / G, K (g + 1) / G) */
                f32_tile_of_rows[rows](x + (int64_t)m0 * K, K, p, bias, t * F32_TILE_COLS, cols, y + (int64_t)m0 * N, N,
                                       ahead ? ahead + lines * 64 : 0, ahead ? groups : (int)K);
                m0 += rows;
            }
            t = next;
        }
    }
}
#else
/* Without AVX2 and FMA there is no float32 kernel: skinny_linear.py keeps oneDNN's path. */
int tandem_skinny_f32_tile_cols(void) { return 0; }
#endif
