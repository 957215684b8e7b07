/* gptwo native CPU kernels: small-M GEMV over fp32, bf16 and int8 weights, and GPT-2's whole decode step.

   Compiled on first use by gptwo/infer/native.py (cc -O3 -march=native -fopenmp -shared) and called through
   ctypes. Weights are row-major (out, in), as nn.Linear keeps them: y[m, n] = dot(W[n, :], x[m, :]) + b[n],
   four output rows per pass so each activation vector is loaded once for four weight rows. Batch-1 decoding
   streams every weight once per token, so these loops aim at memory bandwidth, not FLOPs.

   Weight kinds (K_*):
     F32      fp32 weights, FMA.
     BF16     bf16 weights widened to fp32 by a 16-bit shift, fp32 FMA with fp32 activations.
     BF16_DP  bf16 weights, activations rounded to bf16, native vdpbf16ps (fp32 accumulation).
     I8       int8 weights (one scale per output row) widened to fp32, fp32 FMA: exact weight-only int8.
     I8_VNNI  int8 weights, activations quantized to int8 per block of 64 (one scale per block, as llama.cpp's
              q8_0 does per 32), vpdpbusd on (w + 128) as unsigned times x as signed; the +128 is removed with
              the blocks' activation sums, which are the same for every row.
     I8_W16   int8 weights widened to int16 in registers, activations quantized to int16 per token (one
              scale, 15 bits: error 1/32766 of the token's largest value), vpdpwssd with int32 lanes
              (no overflow below K = 16K), one float conversion per row.
   The OpenMP runtime is the process's libgomp.so.1 (torch's, already loaded), so torch and these kernels
   share one thread pool. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

enum { K_F32 = 0, K_BF16 = 1, K_BF16_DP = 2, K_I8 = 3, K_I8_VNNI = 4, K_I8_W16 = 5 };
#define QB 64                         /* activation quantization block (I8_VNNI) */
#define INLINE static inline __attribute__((always_inline))

int gptwo_caps(void) {
    int caps = (1 << K_F32) | (1 << K_BF16) | (1 << K_I8);
#ifdef __AVX512BF16__
    caps |= 1 << K_BF16_DP;
#endif
#ifdef __AVX512VNNI__
    caps |= (1 << K_I8_VNNI) | (1 << K_I8_W16);
#endif
    return caps;
}

/* One linear layer and one batch of activations prepared for its kind. */
typedef struct { int kind, K, N; const void *w; const float *scale, *bias; } Lin;
typedef struct { const float *x; uint16_t *xb; int8_t *xq; float *xs; float *corr; int M, K, Kp; } Act;

INLINE __mmask16 tail16(int n) { return (__mmask16)((1u << n) - 1); }
INLINE __mmask32 tail32(int n) { return (__mmask32)((1ull << n) - 1); }
INLINE __mmask64 tail64(int n) { return n >= 64 ? ~0ull : (__mmask64)((1ull << n) - 1); }
INLINE __m512 bf16_to_f32(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

/* R dot products of weight rows w[r*K ...] with x, for each kind; out[r] are raw sums (before scale/bias). */
INLINE void dots_f32(const float *w, int K, const float *x, int R, float *out) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 xv = _mm512_loadu_ps(x + k);
        for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w + (size_t)r * K + k), xv, acc[r]);
    }
    if (k < K) {
        __mmask16 m = tail16(K - k);
        __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
        for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + (size_t)r * K + k), xv, acc[r]);
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

INLINE void dots_bf16(const uint16_t *w, int K, const float *x, int R, float *out) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 xv = _mm512_loadu_ps(x + k);
        for (int r = 0; r < R; r++)
            acc[r] = _mm512_fmadd_ps(bf16_to_f32(_mm256_loadu_si256((const __m256i *)(w + (size_t)r * K + k))), xv, acc[r]);
    }
    if (k < K) {
        __mmask16 m = tail16(K - k);
        __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
        for (int r = 0; r < R; r++)
            acc[r] = _mm512_fmadd_ps(bf16_to_f32(_mm256_maskz_loadu_epi16(m, w + (size_t)r * K + k)), xv, acc[r]);
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

#ifdef __AVX512BF16__
INLINE void dots_bf16_dp(const uint16_t *w, int K, const uint16_t *xb, int R, float *out) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + k);
        for (int r = 0; r < R; r++) acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + (size_t)r * K + k), xv);
    }
    if (k < K) {
        __mmask32 m = tail32(K - k);
        __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, xb + k);
        for (int r = 0; r < R; r++) acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(m, w + (size_t)r * K + k), xv);
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

INLINE void dots_i8(const int8_t *w, int K, const float *x, int R, float *out) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 xv = _mm512_loadu_ps(x + k);
        for (int r = 0; r < R; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + (size_t)r * K + k)))), xv, acc[r]);
    }
    if (k < K) {
        __mmask16 m = tail16(K - k);
        __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
        for (int r = 0; r < R; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w + (size_t)r * K + k))), xv, acc[r]);
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

#ifdef __AVX512VNNI__
/* xq is zero-padded to Kp (a multiple of QB); xs[b] the block scales. The result still holds the +128 offset. */
INLINE void dots_i8_vnni(const int8_t *w, int K, const int8_t *xq, const float *xs, int R, float *out) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int k = 0, b = 0; k < K; k += QB, b++) {
        __mmask64 m = tail64(K - k);
        __m512i xv = _mm512_loadu_si512(xq + k);
        __m512 s = _mm512_set1_ps(xs[b]);
        for (int r = 0; r < R; r++) {
            __m512i wu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w + (size_t)r * K + k), flip);
            __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, xv);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

#ifdef __AVX512VNNI__
INLINE void dots_i8_w16(const int8_t *w, int K, const int16_t *xq, int R, float *out) {
    __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    __m512i acc2[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    int k = 0;
    for (; k + 64 <= K; k += 64) { /* two independent sums per row: more work in flight per cycle */
        __m512i xv = _mm512_loadu_si512(xq + k), xv2 = _mm512_loadu_si512(xq + k + 32);
        for (int r = 0; r < R; r++) {
            __m512i wb = _mm512_loadu_si512(w + (size_t)r * K + k);
            acc[r] = _mm512_dpwssd_epi32(acc[r], _mm512_cvtepi8_epi16(_mm512_castsi512_si256(wb)), xv);
            acc2[r] = _mm512_dpwssd_epi32(acc2[r], _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(wb, 1)), xv2);
        }
    }
    for (int r = 0; r < R; r++) acc[r] = _mm512_add_epi32(acc[r], acc2[r]);
    for (; k + 32 <= K; k += 32) {
        __m512i xv = _mm512_loadu_si512(xq + k);
        for (int r = 0; r < R; r++)
            acc[r] = _mm512_dpwssd_epi32(acc[r], _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + (size_t)r * K + k))), xv);
    }
    if (k < K) {
        __mmask32 m = tail32(K - k);
        __m512i xv = _mm512_maskz_loadu_epi16(m, xq + k);
        for (int r = 0; r < R; r++) acc[r] = _mm512_dpwssd_epi32(acc[r], _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, w + (size_t)r * K + k)), xv);
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(_mm512_cvtepi32_ps(acc[r])); /* lanes fit int32; their sum may not */
}
#endif

/* Activations in the form the kind reads: bf16 copies (BF16_DP) or int8 blocks with scales (I8_VNNI). Row m. */
static void prepare_row(int kind, Act *a, int m) {
    const float *x = a->x + (size_t)m * a->K;
#ifdef __AVX512BF16__
    if (kind == K_BF16_DP) {
        uint16_t *xb = a->xb + (size_t)m * a->Kp;
        for (int k = 0; k < a->K; k += 16) {
            __mmask16 t = a->K - k >= 16 ? 0xffff : tail16(a->K - k);
            _mm256_mask_storeu_epi16(xb + k, t, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(t, x + k))); /* round to nearest even */
        }
    }
#endif
    if (kind == K_I8_W16) { /* int16 per token in xb; its scale in corr[m] */
        int16_t *xq = (int16_t *)a->xb + (size_t)m * a->Kp;
        __m512 amax = _mm512_setzero_ps();
        for (int k = 0; k < a->K; k += 16) {
            __mmask16 t = a->K - k >= 16 ? 0xffff : tail16(a->K - k);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(t, x + k)));
        }
        float mx = _mm512_reduce_max_ps(amax), inv = mx > 0 ? 16383.0f / mx : 0.0f;
        for (int k = 0; k < a->K; k += 16) {
            __mmask16 t = a->K - k >= 16 ? 0xffff : tail16(a->K - k);
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(t, x + k), _mm512_set1_ps(inv)));
            _mm256_mask_storeu_epi16(xq + k, t, _mm512_cvtsepi32_epi16(q));
        }
        a->corr[m] = mx / 16383.0f;
    }
    if (kind == K_I8_VNNI) {
        int8_t *xq = a->xq + (size_t)m * a->Kp;
        int nb = a->Kp / QB;
        float *xs = a->xs + (size_t)m * nb, corr = 0.0f;
        for (int b = 0; b < nb; b++) {
            __m512 v[4];
            __m512 amax = _mm512_setzero_ps();
            for (int i = 0; i < 4; i++) {
                int k = b * QB + i * 16;
                __mmask16 t = a->K - k >= 16 ? 0xffff : (a->K > k ? tail16(a->K - k) : 0);
                v[i] = _mm512_maskz_loadu_ps(t, x + k);
                amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
            }
            float mx = _mm512_reduce_max_ps(amax), inv = mx > 0 ? 127.0f / mx : 0.0f;
            __m512i sum = _mm512_setzero_si512();
            for (int i = 0; i < 4; i++) {
                __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], _mm512_set1_ps(inv))); /* round to nearest */
                sum = _mm512_add_epi32(sum, q);
                _mm_storeu_si128((__m128i *)(xq + b * QB + i * 16), _mm512_cvtsepi32_epi8(q));
            }
            xs[b] = mx / 127.0f;
            corr += xs[b] * (float)_mm512_reduce_add_epi32(sum);
        }
        a->corr[m] = 128.0f * corr;
    }
}

/* Rows n0..n0+R-1 of y for activation row m. */
INLINE void row_block(const Lin *L, const Act *a, int m, int n0, int R, float *out) {
    size_t off = (size_t)n0 * L->K;
    switch (L->kind) {
    case K_F32: dots_f32((const float *)L->w + off, L->K, a->x + (size_t)m * L->K, R, out); break;
    case K_BF16: dots_bf16((const uint16_t *)L->w + off, L->K, a->x + (size_t)m * L->K, R, out); break;
#ifdef __AVX512BF16__
    case K_BF16_DP: dots_bf16_dp((const uint16_t *)L->w + off, L->K, a->xb + (size_t)m * a->Kp, R, out); break;
#endif
    case K_I8: dots_i8((const int8_t *)L->w + off, L->K, a->x + (size_t)m * L->K, R, out); break;
#ifdef __AVX512VNNI__
    case K_I8_VNNI: {
        dots_i8_vnni((const int8_t *)L->w + off, L->K, a->xq + (size_t)m * a->Kp, a->xs + (size_t)m * (a->Kp / QB), R, out);
        for (int r = 0; r < R; r++) out[r] -= a->corr[m];
        break;
    }
    case K_I8_W16: {
        dots_i8_w16((const int8_t *)L->w + off, L->K, (const int16_t *)a->xb + (size_t)m * a->Kp, R, out);
        for (int r = 0; r < R; r++) out[r] *= a->corr[m];
        break;
    }
#endif
    }
    if (L->scale)
        for (int r = 0; r < R; r++) out[r] *= L->scale[n0 + r];
}

/* Work sharing without barriers. Each operation is split into chunks (rows of a linear, heads of attention)
   that write disjoint outputs and can be computed twice with the same result. A thread claims chunks from
   a counter until none is left; then, while some are unfinished, it waits briefly and afterwards computes
   the unfinished ones itself. On this shared machine the OS deschedules threads at random: a barrier
   would hold the whole team until the descheduled thread runs again (milliseconds); here the other
   thread takes its work over. Outputs go to per-layer buffers, so a late duplicate writes stale-free
   (identical) values where nobody reads anything else. */
#define MAX_CHUNKS 16
#define HELP_SPINS 2000 /* ~30 us of pause before taking over a partner's unfinished chunks */
typedef struct { int next, done; unsigned char flag[MAX_CHUNKS]; char pad[56]; } Sync;
typedef void (*ChunkFn)(const void *ctx, int chunk, int chunks);

INLINE void mark(Sync *s, int c) {
    if (!__atomic_exchange_n(&s->flag[c], 1, __ATOMIC_ACQ_REL)) __atomic_fetch_add(&s->done, 1, __ATOMIC_RELEASE);
}

static void run_chunks(Sync *s, int n, ChunkFn fn, const void *ctx) {
    for (int c; (c = __atomic_fetch_add(&s->next, 1, __ATOMIC_RELAXED)) < n;) {
        fn(ctx, c, n);
        mark(s, c);
    }
    for (int spins = 0; __atomic_load_n(&s->done, __ATOMIC_ACQUIRE) < n; spins++) {
        _mm_pause();
        if (spins < HELP_SPINS) continue;
        for (int c = 0; c < n; c++)
            if (!__atomic_load_n(&s->flag[c], __ATOMIC_ACQUIRE)) {
                fn(ctx, c, n);
                mark(s, c);
            }
    }
}

static void gelu_inplace(float *h, int n);

typedef struct { const Lin *L; const Act *a; float *y; int ldy, gelu; } LinearJob;

/* Rows [chunk/chunks] of y (M, N) = x (M, K) @ W.T (+ bias) (then GELU). */
static void linear_chunk(const void *ctx, int c, int chunks) {
    const LinearJob *j = ctx;
    const Lin *L = j->L;
    int blocks = (L->N + 3) / 4;
    int b0 = (int)((long)blocks * c / chunks), b1 = (int)((long)blocks * (c + 1) / chunks);
    int n0 = b0 * 4, n1 = b1 * 4 < L->N ? b1 * 4 : L->N;
    for (int m = 0; m < j->a->M; m++) {
        float *yr = j->y + (size_t)m * j->ldy;
        for (int g = n0; g < n1; g += 16) { /* finished values only are stored: a duplicate writes the same */
            float out[16];
            int G = n1 - g < 16 ? n1 - g : 16;
            for (int n = g; n < g + G; n += 4) {
                int R = g + G - n < 4 ? g + G - n : 4;
                if (R == 4) row_block(L, j->a, m, n, 4, out + n - g);
                else for (int r = 0; r < R; r++) row_block(L, j->a, m, n + r, 1, out + n - g + r);
            }
            for (int r = 0; r < G; r++) out[r] += L->bias ? L->bias[g + r] : 0.0f;
            if (j->gelu) gelu_inplace(out, G);
            memcpy(yr + g, out, (size_t)G * 4);
        }
    }
}

/* y = x @ W.T + b (GELU'd if asked), shared by the team through `s`; `a` is this thread's copy of x. */
static void linear_team(const Lin *L, const Act *a, float *y, int ldy, int gelu, Sync *s) {
    int blocks = (L->N + 3) / 4;
    LinearJob job = {L, a, y, ldy, gelu};
    run_chunks(s, blocks < MAX_CHUNKS ? blocks : MAX_CHUNKS, linear_chunk, &job);
}

/* Scratch bytes an Act needs for M rows of K inputs (bf16 copies, int8 blocks, scales, corrections). */
static size_t act_bytes(int M, int K) {
    size_t Kp = (size_t)(K + QB - 1) / QB * QB;
    return M * Kp * 2 + M * Kp + M * (Kp / QB) * 4 + M * 4 + 256;
}

/* x prepared for `kind` in this thread's scratch (every thread prepares its own copy: no waiting). */
static Act act_prepare(int kind, const float *x, int M, int K, char *scratch) {
    Act a = {x, 0, 0, 0, 0, M, K, (K + QB - 1) / QB * QB};
    a.xb = (uint16_t *)scratch; scratch += (size_t)M * a.Kp * 2;
    a.xq = (int8_t *)scratch; scratch += (size_t)M * a.Kp;
    scratch = (char *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    a.xs = (float *)scratch; scratch += (size_t)M * (a.Kp / QB) * 4;
    a.corr = (float *)scratch;
    for (int m = 0; m < M; m++) prepare_row(kind, &a, m);
    return a;
}

/* A standalone linear layer: y (M, N) = x (M, K) @ W.T + b, on `threads` threads. */
void gptwo_linear(int kind, const void *w, const float *scale, const float *bias, const float *x, float *y, int M, int K, int N, int threads) {
    Lin L = {kind, K, N, w, scale, bias};
    Sync sync;
    memset(&sync, 0, sizeof sync);
    char *scratch = malloc(act_bytes(M, K) * threads);
    #pragma omp parallel num_threads(threads)
    {
        Act a = act_prepare(kind, x, M, K, scratch + act_bytes(M, K) * omp_get_thread_num());
        linear_team(&L, &a, y, N, 0, &sync);
    }
    free(scratch);
}

/* ---- the whole decode step ---- */

INLINE __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* GELU, tanh approximation (GPT-2's), in place over n values; tanh(u) = 1 - 2 / (exp(2u) + 1). */
static void gelu_inplace(float *h, int n) {
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? 0xffff : tail16(n - i);
        __m512 x = _mm512_maskz_loadu_ps(m, h + i);
        __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f), _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x), _mm512_mul_ps(x, x), x));
        __m512 t = _mm512_sub_ps(_mm512_set1_ps(1.0f), _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(exp512(_mm512_add_ps(u, u)), _mm512_set1_ps(1.0f))));
        _mm512_mask_storeu_ps(h + i, m, _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.0f), t)));
    }
}

/* LayerNorm of T rows into `out` (each thread normalizes into its own buffer: cheaper than waiting). */
static void layernorm(const float *x, float *out, const float *g, const float *b, int T, int C, float eps) {
    for (int t = 0; t < T; t++) {
        const float *xr = x + (size_t)t * C;
        float *o = out + (size_t)t * C, mean = 0.0f, var = 0.0f;
        #pragma omp simd reduction(+ : mean)
        for (int c = 0; c < C; c++) mean += xr[c];
        mean /= C;
        #pragma omp simd reduction(+ : var)
        for (int c = 0; c < C; c++) var += (xr[c] - mean) * (xr[c] - mean);
        float inv = 1.0f / sqrtf(var / C + eps);
        #pragma omp simd
        for (int c = 0; c < C; c++) o[c] = (xr[c] - mean) * inv * g[c] + b[c];
    }
}

/* Causal attention of T new tokens (rows of qkv, (T, 3C)) at positions start.. over one layer's cache
   k, v (H, max_len, hd): a claimed head's keys/values are written, then its T queries attend. */
static void attention_head(const float *qkv, float *y, float *kc, float *vc, int T, int start, int C, int H, int h, int max_len, float *scores) {
    int hd = C / H;
    float scale = 1.0f / sqrtf((float)hd);
    float *kh = kc + (size_t)h * max_len * hd, *vh = vc + (size_t)h * max_len * hd;
    for (int t = 0; t < T; t++) {
        memcpy(kh + (size_t)(start + t) * hd, qkv + (size_t)t * 3 * C + C + h * hd, hd * 4);
        memcpy(vh + (size_t)(start + t) * hd, qkv + (size_t)t * 3 * C + 2 * C + h * hd, hd * 4);
    }
    for (int t = 0; t < T; t++) {
        const float *q = qkv + (size_t)t * 3 * C + h * hd;
        int n = start + t + 1;
        float mx = -INFINITY;
        for (int j = 0; j < n; j++) {
            const float *kj = kh + (size_t)j * hd;
            float s = 0.0f;
            #pragma omp simd reduction(+ : s)
            for (int d = 0; d < hd; d++) s += q[d] * kj[d];
            scores[j] = s * scale;
            mx = fmaxf(mx, scores[j]);
        }
        __m512 sum = _mm512_setzero_ps();
        for (int j = 0; j < n; j += 16) {
            __mmask16 m = n - j >= 16 ? 0xffff : tail16(n - j);
            __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + j), _mm512_set1_ps(mx))));
            _mm512_mask_storeu_ps(scores + j, m, e);
            sum = _mm512_add_ps(sum, e);
        }
        float inv = 1.0f / _mm512_reduce_add_ps(sum), *out = scores + max_len; /* this thread's, then copied */
        for (int d = 0; d < hd; d++) out[d] = 0.0f;
        for (int j = 0; j < n; j++) {
            const float *vj = vh + (size_t)j * hd;
            float p = scores[j] * inv;
            #pragma omp simd
            for (int d = 0; d < hd; d++) out[d] += p * vj[d];
        }
        memcpy(y + (size_t)t * C + h * hd, out, (size_t)hd * 4);
    }
}

typedef struct { const float *qkv; float *y, *kc, *vc, *scores; int T, start, C, H, max_len; } AttentionJob;

static void attention_chunk(const void *ctx, int c, int chunks) {
    const AttentionJob *j = ctx;
    for (int h = j->H * c / chunks; h < j->H * (c + 1) / chunks; h++)
        attention_head(j->qkv, j->y, j->kc, j->vc, j->T, j->start, j->C, j->H, h, j->max_len, j->scores);
}

/* Per layer, P holds 16 pointers: ln1 g, b; qkv w, scale, b; proj w, scale, b; ln2 g, b; fc w, scale, b;
   fc2 w, scale, b. After the layers: wte, wpe, lnf g, b, head w, head scale, k cache, v cache.
   D: n_layer, n_embd, n_head, vocab, max_len, kind, embeddings in bf16 (0/1), threads. */
enum { PER_LAYER = 16, OPS_PER_LAYER = 5, LAYER_FLOATS = 10 /* x C per token: qkv 3, att 1, proj 1, fc 4, fc2 1 */ };

/* Each thread keeps its own residual stream x and LayerNorm output (the same numbers in every thread). */
static size_t thread_bytes(int T, int C, int H, int max_len) {
    return ((size_t)T * C * 8 + (size_t)(max_len + C / H + 32) * 4 + act_bytes(T, 4 * C) + 127) / 64 * 64;
}

size_t gptwo_step_scratch_bytes(const int64_t *D, int T) {
    int L = (int)D[0], C = (int)D[1], H = (int)D[2], max_len = (int)D[4], threads = (int)D[7];
    return (size_t)L * T * LAYER_FLOATS * C * 4 + (size_t)(L * OPS_PER_LAYER + 2) * sizeof(Sync) + threads * thread_bytes(T, C, H, max_len) + 4096;
}

static void embed_row(const void **G, int emb_bf16, int64_t token, int pos, int C, float *xr) {
    if (emb_bf16) {
        const uint16_t *te = (const uint16_t *)G[0] + (size_t)token * C, *pe = (const uint16_t *)G[1] + (size_t)pos * C;
        for (int c = 0; c < C; c++) {
            uint32_t a = (uint32_t)te[c] << 16, b = (uint32_t)pe[c] << 16;
            float fa, fb; memcpy(&fa, &a, 4); memcpy(&fb, &b, 4);
            xr[c] = fa + fb;
        }
    } else {
        const float *te = (const float *)G[0] + (size_t)token * C, *pe = (const float *)G[1] + (size_t)pos * C;
        for (int c = 0; c < C; c++) xr[c] = te[c] + pe[c];
    }
}

static void add_into(float *x, const float *r, size_t n) {
    #pragma omp simd
    for (size_t i = 0; i < n; i++) x[i] += r[i];
}

/* Logits (vocab) of the last of T tokens at positions start..start+T-1; writes their keys/values to the cache.
   Returns 0, or 1 (and does nothing) when a token id is outside the vocabulary or the positions outside the cache. */
int gptwo_step(const void **P, const int64_t *D, float eps, const int64_t *tokens, int T, int start, float *logits, char *scratch) {
    int L = (int)D[0], C = (int)D[1], H = (int)D[2], V = (int)D[3], max_len = (int)D[4], kind = (int)D[5], emb_bf16 = (int)D[6], threads = (int)D[7];
    if (T < 1 || start < 0 || start + T > max_len) return 1;
    for (int t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= V) return 1;
    int hd = C / H;
    float *layers = (float *)scratch;
    Sync *sync = (Sync *)(((uintptr_t)(layers + (size_t)L * T * LAYER_FLOATS * C) + 127) & ~(uintptr_t)127);
    char *per_thread = (char *)(sync + L * OPS_PER_LAYER + 2);
    memset(sync, 0, (size_t)(L * OPS_PER_LAYER + 2) * sizeof(Sync));
    const void **G = P + (size_t)L * PER_LAYER;
    float *kcache = (float *)G[6], *vcache = (float *)G[7];
    #pragma omp parallel num_threads(threads)
    {
        char *mine = per_thread + thread_bytes(T, C, H, max_len) * omp_get_thread_num();
        float *x = (float *)mine, *xn = x + (size_t)T * C, *scores = xn + (size_t)T * C;
        char *act_scratch = (char *)(((uintptr_t)(scores + max_len + hd + 16) + 63) & ~(uintptr_t)63);
        Sync *s = sync;
        for (int t = 0; t < T; t++) embed_row(G, emb_bf16, tokens[t], start + t, C, x + (size_t)t * C);
        for (int l = 0; l < L; l++) {
            const void **W = P + (size_t)l * PER_LAYER;
            float *qkv = layers + (size_t)l * T * LAYER_FLOATS * C, *att = qkv + (size_t)T * 3 * C, *r1 = att + (size_t)T * C;
            float *h = r1 + (size_t)T * C, *r2 = h + (size_t)T * 4 * C;
            Lin qkv_l = {kind, C, 3 * C, W[2], W[3], W[4]}, proj = {kind, C, C, W[5], W[6], W[7]};
            Lin fc = {kind, C, 4 * C, W[10], W[11], W[12]}, fc2 = {kind, 4 * C, C, W[13], W[14], W[15]};
            AttentionJob attn = {qkv, att, kcache + (size_t)l * H * max_len * hd, vcache + (size_t)l * H * max_len * hd, scores, T, start, C, H, max_len};
            layernorm(x, xn, W[0], W[1], T, C, eps);
            Act a = act_prepare(kind, xn, T, C, act_scratch);
            linear_team(&qkv_l, &a, qkv, 3 * C, 0, s++);
            run_chunks(s++, H < MAX_CHUNKS ? H : MAX_CHUNKS, attention_chunk, &attn);
            a = act_prepare(kind, att, T, C, act_scratch);
            linear_team(&proj, &a, r1, C, 0, s++);
            add_into(x, r1, (size_t)T * C);
            layernorm(x, xn, W[8], W[9], T, C, eps);
            a = act_prepare(kind, xn, T, C, act_scratch);
            linear_team(&fc, &a, h, 4 * C, 1, s++);
            a = act_prepare(kind, h, T, 4 * C, act_scratch);
            linear_team(&fc2, &a, r2, C, 0, s++);
            add_into(x, r2, (size_t)T * C);
        }
        layernorm(x + (size_t)(T - 1) * C, xn, G[2], G[3], 1, C, eps);
        Lin head = {kind, C, V, G[4], G[5], 0};
        Act a = act_prepare(kind, xn, 1, C, act_scratch);
        linear_team(&head, &a, logits, V, 0, s);
    }
    return 0;
}
