/* gptwo native CPU kernels: small-M GEMV over fp32, bf16 and int8 weights, and GPT-2's whole decode step over a
   ragged batch of sequences and one paged KV cache.

   One source for every CPU. gptwo/infer/native.py compiles it once per instruction set with that set's
   flags (-O3 -fopenmp -shared plus -march=...) and loads it with ctypes; the preprocessor picks the
   vector width VW and the few instructions that have no portable spelling:
     avx512   VW 16: x86-64 with AVX-512 F, BW and VL (-march=native); vdpbf16ps where the CPU has
              AVX512_BF16, vpdpwssd/vpdpbusd where it has AVX512_VNNI, else vpmaddwd.
     avx2     VW 8: x86-64-v3 (AVX2, FMA, F16C); vpmaddwd for the int16 products.
     neon     VW 4: aarch64 (NEON is part of the base ISA); smlal for the int16 products.
     generic  VW 4: any target GCC or Clang compiles for (SSE2 on x86-64), plain vector code only.
   Everything else is written once with GCC/Clang vector extensions: `vf` is VW floats, `vw` 2*VW int16
   (one register either way), and a multiply-add with -ffp-contract=fast is one FMA. Every weight kind
   runs on every ISA with the same numbers; `gptwo_caps` says which run on their own instruction here.

   Weights are row-major (out, in), as nn.Linear keeps them: y[m, n] = dot(W[n, :], x[m, :]) + b[n],
   four output rows per pass so each activation vector is loaded once for four weight rows. Batch-1
   decoding streams every weight once per token, so these loops aim at memory bandwidth, not FLOPs.

   Weight kinds (K_*):
     F32      fp32 weights, FMA.
     BF16     bf16 weights widened to fp32 by a 16-bit shift, fp32 FMA with fp32 activations.
     BF16_DP  bf16 weights, activations rounded to bf16 (nearest even), fp32 accumulation: vdpbf16ps on
              AVX512_BF16, the same products widened to fp32 elsewhere.
     I8       int8 weights (one scale per output row) widened to fp32, fp32 FMA: exact weight-only int8.
     I8_VNNI  int8 weights, activations quantized to int8 per block of 64 (one scale per block, as llama.cpp's
              q8_0 does per 32); (w + 128) as unsigned times x as signed (vpdpbusd on AVX512_VNNI, int16
              products elsewhere); the +128 is removed with the blocks' activation sums, the same for every row.
     I8_W16   int8 weights widened to int16 in registers, activations quantized to int16 per token (one
              scale, 15 bits: error 1/32766 of the token's largest value), pairs of int16 products summed
              into int32 lanes (vpdpwssd, vpmaddwd, smlal; no overflow below K = 16K), one float
              conversion per row.
   The OpenMP runtime is the process's libgomp.so.1 (torch's, already loaded), so torch and these kernels
   share one thread pool.

   The Python side checks gptwo_abi() == GPTWO_ABI after loading: bump it whenever a signature, the
   pointer table of gptwo_step, its dimensions or its batch layout change. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#if !defined(GPTWO_GENERIC) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define GPTWO_ISA "avx512"
#define VW 16
#elif !defined(GPTWO_GENERIC) && defined(__AVX2__) && defined(__FMA__)
#define GPTWO_ISA "avx2"
#define VW 8
#elif !defined(GPTWO_GENERIC) && defined(__aarch64__) && defined(__ARM_NEON)
#define GPTWO_ISA "neon"
#define VW 4
#define GPTWO_NEON 1
#else
#define GPTWO_ISA "generic"
#define VW 4
#endif
#if VW >= 8
#include <immintrin.h>
#endif
#ifdef GPTWO_NEON
#include <arm_neon.h>
#endif

#define GPTWO_ABI 3
enum { K_F32 = 0, K_BF16 = 1, K_BF16_DP = 2, K_I8 = 3, K_I8_VNNI = 4, K_I8_W16 = 5, N_KINDS = 6 };
#define QB 64                         /* activation quantization block (I8_VNNI) */
#define INLINE static inline __attribute__((always_inline))

int gptwo_abi(void) { return GPTWO_ABI; }
const char *gptwo_isa(void) { return GPTWO_ISA; }

/* Bit k set: kind k runs on an instruction made for it here (the others run too, emulated). */
int gptwo_caps(void) {
    int caps = (1 << K_F32) | (1 << K_BF16) | (1 << K_I8);
#ifdef __AVX512BF16__
    caps |= 1 << K_BF16_DP;
#endif
#if VW >= 8 || defined(GPTWO_NEON)
    caps |= 1 << K_I8_W16; /* vpdpwssd / vpmaddwd / smlal */
#endif
#ifdef __AVX512VNNI__
    caps |= 1 << K_I8_VNNI;
#endif
    return caps;
}

/* ---- vectors ---- */
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef int16_t vw __attribute__((vector_size(VW * 4)));  /* 2*VW int16 */
typedef uint16_t vh __attribute__((vector_size(VW * 2))); /* VW bf16 */
typedef int8_t vb __attribute__((vector_size(VW)));       /* VW int8 */
typedef int8_t vb2 __attribute__((vector_size(VW * 2)));  /* 2*VW int8 */

INLINE vf ld(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE void st(float *p, vf v) { memcpy(p, &v, sizeof v); }
INLINE vf ld_part(const float *p, int n) { float t[VW] = {0}; memcpy(t, p, (size_t)n * 4); return ld(t); }
INLINE void st_part(float *p, vf v, int n) { float t[VW]; st(t, v); memcpy(p, t, (size_t)n * 4); }
INLINE vf splat(float a) { vf v = {0}; return v + a; }
INLINE vf vmin(vf a, vf b) { vi m = a < b; return (vf)((m & (vi)a) | (~m & (vi)b)); }
INLINE vf vmax(vf a, vf b) { vi m = a > b; return (vf)((m & (vi)a) | (~m & (vi)b)); }
INLINE float hsum(vf v) { float s = 0.0f; for (int i = 0; i < VW; i++) s += v[i]; return s; }
INLINE float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
/* Widening loads: VW bf16 or int8 as VW floats, 2*VW int8 as int16. GCC scalarizes __builtin_convertvector
   from half- and quarter-width vectors, so each ISA spells these three with its own widening instruction. */
#if VW == 16
INLINE vf ld_bf16(const uint16_t *p) { return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16); }
INLINE vf ld_i8(const int8_t *p) { return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }
INLINE vw ld_i8_w(const int8_t *p) { return (vw)_mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p)); }
#elif VW == 8
INLINE vf ld_bf16(const uint16_t *p) { return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16); }
INLINE vf ld_i8(const int8_t *p) { return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
INLINE vw ld_i8_w(const int8_t *p) { return (vw)_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)); }
#elif defined(GPTWO_NEON)
INLINE vf ld_bf16(const uint16_t *p) { return (vf)vshll_n_u16(vld1_u16(p), 16); }
INLINE vf ld_i8(const int8_t *p) {
    int32_t four;
    memcpy(&four, p, 4);
    return (vf)vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(four))))));
}
INLINE vw ld_i8_w(const int8_t *p) { return (vw)vmovl_s8(vld1_s8(p)); }
#else
INLINE vf ld_bf16(const uint16_t *p) { vh h; memcpy(&h, p, sizeof h); return (vf)(__builtin_convertvector(h, vu) << 16); }
INLINE vf ld_i8(const int8_t *p) { vb b; memcpy(&b, p, sizeof b); return __builtin_convertvector(__builtin_convertvector(b, vi), vf); }
INLINE vw ld_i8_w(const int8_t *p) { vb2 b; memcpy(&b, p, sizeof b); return __builtin_convertvector(b, vw); }
#endif
INLINE vw ld_i16(const int16_t *p) { vw v; memcpy(&v, p, sizeof v); return v; }

/* acc + a * b over int16 lanes, each adjacent pair of products summed into one int32 lane. */
INLINE vi madd16(vi acc, vw a, vw b) {
#if VW == 16 && defined(__AVX512VNNI__)
    return (vi)_mm512_dpwssd_epi32((__m512i)acc, (__m512i)a, (__m512i)b);
#elif VW == 16
    return acc + (vi)_mm512_madd_epi16((__m512i)a, (__m512i)b);
#elif VW == 8
    return acc + (vi)_mm256_madd_epi16((__m256i)a, (__m256i)b);
#elif defined(GPTWO_NEON)
    int32x4_t r = vmlal_s16((int32x4_t)acc, vget_low_s16((int16x8_t)a), vget_low_s16((int16x8_t)b));
    return (vi)vmlal_high_s16(r, (int16x8_t)a, (int16x8_t)b);
#else
    for (int i = 0; i < VW; i++) acc[i] += (int32_t)a[2 * i] * b[2 * i] + (int32_t)a[2 * i + 1] * b[2 * i + 1];
    return acc;
#endif
}

/* x rounded to the nearest integer, ties to even, for |x| < 2^22 (the usual 1.5 * 2^23 trick). */
INLINE float rne(float x) { return (x + 12582912.0f) - 12582912.0f; }

INLINE void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Weights stream from memory once per token: ask for the row PREFETCH_BLOCKS blocks of R rows ahead
   (rows are contiguous, so that is where this loop will read next), into L2 (prefetcht1; hint 2).
   Measured on the 124M shape's head (768 x 50000) at 2 threads, AVX2: 12-18 GB/s without it (the
   hardware prefetcher alone keeps too few lines in flight for four interleaved row streams),
   about the same with prefetchnta/prefetcht0, 24-36 GB/s into L2 (fp32, bf16, int8); 2-16 blocks
   ahead all within noise. */
#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 4
#endif
#ifndef PREFETCH_HINT
#define PREFETCH_HINT 2
#endif
INLINE void prefetch_ahead(const void *p, int R, int K, int elt) {
    __builtin_prefetch((const char *)p + (size_t)PREFETCH_BLOCKS * R * K * elt, 0, PREFETCH_HINT);
}

/* One linear layer and one batch of activations prepared for its kind. */
typedef struct { int kind, K, N; const void *w; const float *scale, *bias; } Lin;
typedef struct { const float *x; float *xp; uint16_t *xb; int8_t *xq; float *xs; float *corr; int M, K, Kp; } Act;

/* ---- R (<= 4) dot products of weight rows w[r*K ...] with x, per kind; out[r] are raw sums ---- */
INLINE void dots_f32(const float *w, int K, const float *x, int R, float *out) {
    vf acc[4] = {{0}, {0}, {0}, {0}};
    int k = 0;
    for (; k + VW <= K; k += VW) {
        vf xv = ld(x + k);
        for (int r = 0; r < R; r++) { prefetch_ahead(w + (size_t)r * K + k, R, K, 4); acc[r] += ld(w + (size_t)r * K + k) * xv; }
    }
    for (int r = 0; r < R; r++) {
        float s = hsum(acc[r]);
        for (int j = k; j < K; j++) s += w[(size_t)r * K + j] * x[j];
        out[r] = s;
    }
}

/* bf16 weights, 2*VW at a time as VW 32-bit lanes: the low halves shifted up are the even elements as
   fp32, the high halves masked the odd ones, multiplied by xp, x reordered per 2*VW block into its
   even then its odd elements (prepare_row). One load, a shift and an and per 2*VW weights. */
INLINE void dots_bf16(const uint16_t *w, int K, const float *x, const float *xp, int R, float *out) {
    vf acc[4] = {{0}, {0}, {0}, {0}}, acc2[4] = {{0}, {0}, {0}, {0}};
    int k = 0;
    for (; k + 2 * VW <= K; k += 2 * VW) {
        vf xe = ld(xp + k), xo = ld(xp + k + VW);
        for (int r = 0; r < R; r++) {
            vu u;
            prefetch_ahead(w + (size_t)r * K + k, R, K, 2);
            memcpy(&u, w + (size_t)r * K + k, sizeof u);
            acc[r] += (vf)(u << 16) * xe;
            acc2[r] += (vf)(u & 0xffff0000u) * xo;
        }
    }
    for (int r = 0; r < R; r++) {
        float s = hsum(acc[r] + acc2[r]);
        for (int j = k; j < K; j++) s += bf16_to_f32(w[(size_t)r * K + j]) * x[j];
        out[r] = s;
    }
}

#ifdef __AVX512BF16__
INLINE __mmask32 tail32(int n) { return (__mmask32)((1ull << n) - 1); }
INLINE void dots_bf16_dp(const uint16_t *w, int K, const uint16_t *xb, int R, float *out) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + k);
        for (int r = 0; r < R; r++) {
            prefetch_ahead(w + (size_t)r * K + k, R, K, 2);
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + (size_t)r * K + k), xv);
        }
    }
    if (k < K) {
        __mmask32 m = tail32(K - k);
        __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, xb + k);
        for (int r = 0; r < R; r++) acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(m, w + (size_t)r * K + k), xv);
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}
#else
INLINE void dots_bf16_dp(const uint16_t *w, int K, const uint16_t *xb, int R, float *out) {
    vf acc[4] = {{0}, {0}, {0}, {0}};
    int k = 0;
    for (; k + VW <= K; k += VW) {
        vf xv = ld_bf16(xb + k);
        for (int r = 0; r < R; r++) { prefetch_ahead(w + (size_t)r * K + k, R, K, 2); acc[r] += ld_bf16(w + (size_t)r * K + k) * xv; }
    }
    for (int r = 0; r < R; r++) {
        float s = hsum(acc[r]);
        for (int j = k; j < K; j++) s += bf16_to_f32(w[(size_t)r * K + j]) * bf16_to_f32(xb[j]);
        out[r] = s;
    }
}
#endif

INLINE void dots_i8(const int8_t *w, int K, const float *x, int R, float *out) {
    vf acc[4] = {{0}, {0}, {0}, {0}};
    int k = 0;
    for (; k + VW <= K; k += VW) {
        vf xv = ld(x + k);
        for (int r = 0; r < R; r++) { prefetch_ahead(w + (size_t)r * K + k, R, K, 1); acc[r] += ld_i8(w + (size_t)r * K + k) * xv; }
    }
    for (int r = 0; r < R; r++) {
        float s = hsum(acc[r]);
        for (int j = k; j < K; j++) s += (float)w[(size_t)r * K + j] * x[j];
        out[r] = s;
    }
}

/* xq is zero-padded to Kp (a multiple of QB); xs[b] the block scales. The result still holds the +128 offset. */
#ifdef __AVX512VNNI__
INLINE __mmask64 tail64(int n) { return n >= 64 ? ~0ull : (__mmask64)((1ull << n) - 1); }
INLINE void dots_i8_vnni(const int8_t *w, int K, const int8_t *xq, const float *xs, int R, float *out) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int k = 0, b = 0; k < K; k += QB, b++) {
        __mmask64 m = tail64(K - k);
        __m512i xv = _mm512_loadu_si512(xq + k);
        __m512 s = _mm512_set1_ps(xs[b]);
        for (int r = 0; r < R; r++) {
            prefetch_ahead(w + (size_t)r * K + k, R, K, 1);
            __m512i wu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w + (size_t)r * K + k), flip);
            __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, xv);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}
#else
INLINE void dots_i8_vnni(const int8_t *w, int K, const int8_t *xq, const float *xs, int R, float *out) {
    vf acc[4] = {{0}, {0}, {0}, {0}};
    for (int k = 0, b = 0; k < K; k += QB, b++) {
        vi d[4] = {{0}, {0}, {0}, {0}};
        for (int i = k; i < k + QB; i += 2 * VW) {
            vw xv = ld_i8_w(xq + i);
            for (int r = 0; r < R; r++) {
                const int8_t *wr = w + (size_t)r * K + i;
                vw wv;
                prefetch_ahead(wr, R, K, 1);
                if (i + 2 * VW <= K) wv = ld_i8_w(wr);
                else { int8_t t[2 * VW] = {0}; if (i < K) memcpy(t, wr, (size_t)(K - i)); wv = ld_i8_w(t); } /* xq is 0 there */
                d[r] = madd16(d[r], wv + 128, xv);
            }
        }
        for (int r = 0; r < R; r++) acc[r] += __builtin_convertvector(d[r], vf) * xs[b];
    }
    for (int r = 0; r < R; r++) out[r] = hsum(acc[r]);
}
#endif

INLINE void dots_i8_w16(const int8_t *w, int K, const int16_t *xq, int R, float *out) {
    vi acc[4] = {{0}, {0}, {0}, {0}}, acc2[4] = {{0}, {0}, {0}, {0}};
    int k = 0;
    for (; k + 4 * VW <= K; k += 4 * VW) { /* two independent sums per row: more work in flight per cycle */
        vw xv = ld_i16(xq + k), xv2 = ld_i16(xq + k + 2 * VW);
        for (int r = 0; r < R; r++) {
            prefetch_ahead(w + (size_t)r * K + k, R, K, 1);
            acc[r] = madd16(acc[r], ld_i8_w(w + (size_t)r * K + k), xv);
            acc2[r] = madd16(acc2[r], ld_i8_w(w + (size_t)r * K + k + 2 * VW), xv2);
        }
    }
    for (int r = 0; r < R; r++) acc[r] += acc2[r];
    for (; k + 2 * VW <= K; k += 2 * VW) {
        vw xv = ld_i16(xq + k);
        for (int r = 0; r < R; r++) acc[r] = madd16(acc[r], ld_i8_w(w + (size_t)r * K + k), xv);
    }
    for (int r = 0; r < R; r++) {
        float s = hsum(__builtin_convertvector(acc[r], vf)); /* lanes fit int32; their sum may not */
        int32_t tail = 0;
        for (int j = k; j < K; j++) tail += (int32_t)w[(size_t)r * K + j] * xq[j];
        out[r] = s + (float)tail;
    }
}

/* Activations in the form the kind reads, row m: bf16 copies (BF16_DP), int16 per token (I8_W16) or int8
   blocks with scales (I8_VNNI). O(K) per row against the linear's O(K N): plain loops. */
static void prepare_row(int kind, Act *a, int m) {
    const float *x = a->x + (size_t)m * a->K;
    int K = a->K;
    if (kind == K_BF16) { /* even then odd elements of each 2*VW block (the tail is read from x) */
        float *xp = a->xp + (size_t)m * a->Kp;
        for (int k = 0; k + 2 * VW <= K; k += 2 * VW)
            for (int i = 0; i < VW; i++) xp[k + i] = x[k + 2 * i], xp[k + VW + i] = x[k + 2 * i + 1];
    }
    if (kind == K_BF16_DP) {
        uint16_t *xb = a->xb + (size_t)m * a->Kp;
        for (int k = 0; k < K; k++) {
            uint32_t u;
            memcpy(&u, x + k, 4);
            xb[k] = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40) /* NaN stays NaN */
                                                    : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        }
    }
    if (kind == K_I8_W16) { /* int16 per token in xb; its scale in corr[m] */
        int16_t *xq = (int16_t *)a->xb + (size_t)m * a->Kp;
        float mx = 0.0f;
        for (int k = 0; k < K; k++) mx = fabsf(x[k]) > mx ? fabsf(x[k]) : mx;
        float inv = mx > 0 ? 16383.0f / mx : 0.0f;
        for (int k = 0; k < K; k++) xq[k] = (int16_t)rne(x[k] * inv);
        a->corr[m] = mx / 16383.0f;
    }
    if (kind == K_I8_VNNI) {
        int8_t *xq = a->xq + (size_t)m * a->Kp;
        int nb = a->Kp / QB;
        float *xs = a->xs + (size_t)m * nb, corr = 0.0f;
        for (int b = 0; b < nb; b++) {
            int k0 = b * QB, k1 = k0 + QB < K ? k0 + QB : K;
            float mx = 0.0f;
            for (int k = k0; k < k1; k++) mx = fabsf(x[k]) > mx ? fabsf(x[k]) : mx;
            float inv = mx > 0 ? 127.0f / mx : 0.0f;
            int32_t sum = 0;
            for (int k = k0; k < k0 + QB; k++) {
                int8_t q = k < k1 ? (int8_t)rne(x[k] * inv) : 0;
                xq[k] = q;
                sum += q;
            }
            xs[b] = mx / 127.0f;
            corr += xs[b] * (float)sum;
        }
        a->corr[m] = 128.0f * corr;
    }
}

/* Rows n0..n0+R-1 of y for activation row m. */
INLINE void row_block(const Lin *L, const Act *a, int m, int n0, int R, float *out) {
    size_t off = (size_t)n0 * L->K;
    switch (L->kind) {
    case K_F32: dots_f32((const float *)L->w + off, L->K, a->x + (size_t)m * L->K, R, out); break;
    case K_BF16: dots_bf16((const uint16_t *)L->w + off, L->K, a->x + (size_t)m * L->K, a->xp + (size_t)m * a->Kp, R, out); break;
    case K_BF16_DP: dots_bf16_dp((const uint16_t *)L->w + off, L->K, a->xb + (size_t)m * a->Kp, R, out); break;
    case K_I8: dots_i8((const int8_t *)L->w + off, L->K, a->x + (size_t)m * L->K, R, out); break;
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
    }
    if (L->scale)
        for (int r = 0; r < R; r++) out[r] *= L->scale[n0 + r];
}

/* Work sharing without barriers. Each operation is split into chunks (rows of a linear, heads of attention)
   that write disjoint outputs and can be computed twice with the same result. A thread claims chunks from
   a counter until none is left; then, while some are unfinished, it waits briefly and afterwards computes
   the unfinished ones itself. When the OS deschedules a thread (other processes want the core), a
   barrier would hold the whole team until that thread runs again (milliseconds); here the other thread
   takes its work over. Outputs go to per-layer buffers, so a late duplicate writes stale-free
   (identical) values where nobody reads anything else. */
#define MAX_CHUNKS 64
#ifndef CHUNK_BYTES
#define CHUNK_BYTES (256 * 1024) /* weight bytes per chunk: few chunks (atomics) for small linears, small tails for the head */
#endif
#ifndef HELP_SPINS
#define HELP_SPINS 2000 /* ~30 us of pause before taking over a partner's unfinished chunks */
#endif
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
        cpu_relax();
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
    int blocks = (L->N + 3) / 4, elt = L->kind == K_F32 ? 4 : L->kind <= K_BF16_DP ? 2 : 1;
    size_t bytes = (size_t)L->N * L->K * elt;
    int chunks = (int)(bytes / CHUNK_BYTES) > 16 ? (int)(bytes / CHUNK_BYTES) : 16; /* at least 16, as before */
    chunks = chunks < MAX_CHUNKS ? chunks : MAX_CHUNKS;
    LinearJob job = {L, a, y, ldy, gelu};
    run_chunks(s, blocks < chunks ? blocks : chunks, linear_chunk, &job);
}

/* Scratch bytes an Act needs for M rows of K inputs (reordered floats, bf16/int16 copies, int8 blocks, scales, corrections). */
static size_t act_bytes(int M, int K) {
    size_t Kp = (size_t)(K + QB - 1) / QB * QB;
    return M * Kp * 4 + M * Kp * 2 + M * Kp + M * (Kp / QB) * 4 + M * 4 + 256;
}

/* x prepared for `kind` in this thread's scratch (every thread prepares its own copy: no waiting). */
static Act act_prepare(int kind, const float *x, int M, int K, char *scratch) {
    Act a = {x, 0, 0, 0, 0, 0, M, K, (K + QB - 1) / QB * QB};
    a.xp = (float *)scratch; scratch += (size_t)M * a.Kp * 4;
    a.xb = (uint16_t *)scratch; scratch += (size_t)M * a.Kp * 2;
    a.xq = (int8_t *)scratch; scratch += (size_t)M * a.Kp;
    scratch = (char *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    a.xs = (float *)scratch; scratch += (size_t)M * (a.Kp / QB) * 4;
    a.corr = (float *)scratch;
    for (int m = 0; m < M; m++) prepare_row(kind, &a, m);
    return a;
}

/* A standalone linear layer: y (M, N) = x (M, K) @ W.T + b, on `threads` threads.
   Returns 0, 1 for an unknown kind or a size below 1, 2 when its scratch cannot be allocated. */
int gptwo_linear(int kind, const void *w, const float *scale, const float *bias, const float *x, float *y, int M, int K, int N, int threads) {
    if (kind < 0 || kind >= N_KINDS || M < 1 || K < 1 || N < 1 || threads < 1) return 1;
    Lin L = {kind, K, N, w, scale, bias};
    Sync sync;
    memset(&sync, 0, sizeof sync);
    char *scratch = malloc(act_bytes(M, K) * threads);
    if (!scratch) return 2;
    #pragma omp parallel num_threads(threads)
    {
        Act a = act_prepare(kind, x, M, K, scratch + act_bytes(M, K) * omp_get_thread_num());
        linear_team(&L, &a, y, N, 0, &sync);
    }
    free(scratch);
    return 0;
}

/* ---- the whole decode step ---- */

/* exp(x) to about 1 ulp over [-88, 88] (clamped outside): 2^n * p(r), x = n ln 2 + r, p of degree 6. */
INLINE vf vexp(vf x) {
    x = vmax(vmin(x, splat(88.0f)), splat(-88.0f));
    vf n = (x * 1.44269504089f + 12582912.0f) - 12582912.0f; /* nearest integer, |n| <= 127 */
    vf r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187e-06f;
    vf p = splat(1.0f / 720);
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23; /* 2^n (n = -127 gives 0) */
    return p * (vf)e;
}

/* GELU, tanh approximation (GPT-2's), on a vector; tanh(u) = 1 - 2 / (exp(2u) + 1). */
INLINE vf vgelu(vf x) {
    vf u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    vf t = 1.0f - 2.0f / (vexp(u + u) + 1.0f);
    return 0.5f * x * (1.0f + t);
}

static void gelu_inplace(float *h, int n) {
    int i = 0;
    for (; i + VW <= n; i += VW) st(h + i, vgelu(ld(h + i)));
    if (i < n) st_part(h + i, vgelu(ld_part(h + i, n - i)), n - i);
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

/* scores[0..n) = exp(scores - mx); returns their sum. */
static float exp_shifted(float *scores, int n, float mx) {
    vf sum = {0};
    int j = 0;
    for (; j + VW <= n; j += VW) {
        vf e = vexp(ld(scores + j) - mx);
        st(scores + j, e);
        sum += e;
    }
    float total = hsum(sum);
    if (j < n) {
        vf e = vexp(ld_part(scores + j, n - j) - mx);
        st_part(scores + j, e, n - j);
        for (int i = 0; i < n - j; i++) total += e[i];
    }
    return total;
}

/* ---- attention over the paged KV cache ----
   A layer's cache is (num_blocks, H, bs, hd): position p of a sequence lives in block table[p / bs], slot
   p % bs, a head's bs keys of a block side by side. Work items are (sequence, query block of QBLOCK new
   tokens, head). An item reads the keys/values below its sequence's start from the cache and those of
   the call's own tokens from the qkv rows (so no item waits for another's writes), and writes its
   tokens' keys/values into the cache for later calls. */
#define QBLOCK 32

INLINE float *cache_slot(float *cache, int64_t block, int h, int slot, int H, int bs, int hd) {
    return cache + (((size_t)block * H + h) * bs + slot) * hd;
}

/* scores[j] = scale * q . k_j for n keys k_j = k + j * stride; returns the larger of mx and their largest. */
static float score_rows(const float *q, const float *k, size_t stride, int n, int hd, float scale, float *scores, float mx) {
    for (int j = 0; j < n; j++) {
        const float *kj = k + (size_t)j * stride;
        float s = 0.0f;
        #pragma omp simd reduction(+ : s)
        for (int d = 0; d < hd; d++) s += q[d] * kj[d];
        scores[j] = s * scale;
        mx = fmaxf(mx, scores[j]);
    }
    return mx;
}

/* out += sum over j of p[j] * inv * v_j, for n values v_j = v + j * stride. */
static void mix_rows(float *out, const float *p, float inv, const float *v, size_t stride, int n, int hd) {
    for (int j = 0; j < n; j++) {
        const float *vj = v + (size_t)j * stride;
        float pj = p[j] * inv;
        #pragma omp simd
        for (int d = 0; d < hd; d++) out[d] += pj * vj[d];
    }
}

/* seqs holds 4 int64 per sequence: start, count (new tokens), offset of its block table in `tables`, table length.
   tok_first[s]: index of sequence s's first new token; item_first[s]: of its first work item (both S + 1 long). */
typedef struct {
    const float *qkv; float *y, *kc, *vc, *scores;
    const int64_t *seqs, *tables; const int *tok_first, *item_first;
    int S, C, H, bs, positions;
} AttentionJob;

/* Work item `item` of sequence s: head item % H, new tokens QBLOCK * (item / H) onwards. */
static void attention_item(const AttentionJob *j, int s, int item) {
    int C = j->C, H = j->H, hd = C / H, bs = j->bs, h = item % H, t0 = item / H * QBLOCK;
    const int64_t *seq = j->seqs + 4 * (size_t)s, *table = j->tables + seq[2];
    int start = (int)seq[0], n = (int)seq[1], t1 = t0 + QBLOCK < n ? t0 + QBLOCK : n;
    const float *rows = j->qkv + (size_t)j->tok_first[s] * 3 * C; /* this sequence's new q | k | v rows */
    float scale = 1.0f / sqrtf((float)hd), *scores = j->scores, *out = scores + j->positions;
    for (int t = t0; t < t1; t++) {
        int p = start + t;
        memcpy(cache_slot(j->kc, table[p / bs], h, p % bs, H, bs, hd), rows + (size_t)t * 3 * C + C + h * hd, (size_t)hd * 4);
        memcpy(cache_slot(j->vc, table[p / bs], h, p % bs, H, bs, hd), rows + (size_t)t * 3 * C + 2 * C + h * hd, (size_t)hd * 4);
    }
    for (int t = t0; t < t1; t++) {
        const float *q = rows + (size_t)t * 3 * C + h * hd;
        float mx = -INFINITY;
        for (int p = 0; p < start; p += bs)
            mx = score_rows(q, cache_slot(j->kc, table[p / bs], h, 0, H, bs, hd), hd, start - p < bs ? start - p : bs, hd, scale, scores + p, mx);
        mx = score_rows(q, rows + C + h * hd, 3 * (size_t)C, t + 1, hd, scale, scores + start, mx);
        float inv = 1.0f / exp_shifted(scores, start + t + 1, mx);
        for (int d = 0; d < hd; d++) out[d] = 0.0f;
        for (int p = 0; p < start; p += bs)
            mix_rows(out, scores + p, inv, cache_slot(j->vc, table[p / bs], h, 0, H, bs, hd), hd, start - p < bs ? start - p : bs, hd);
        mix_rows(out, scores + start, inv, rows + 2 * C + h * hd, 3 * (size_t)C, t + 1, hd);
        memcpy(j->y + (size_t)(j->tok_first[s] + t) * C + h * hd, out, (size_t)hd * 4); /* out is this thread's, then copied */
    }
}

static void attention_chunk(const void *ctx, int c, int chunks) {
    const AttentionJob *j = ctx;
    int items = j->item_first[j->S], i0 = (int)((long)items * c / chunks), i1 = (int)((long)items * (c + 1) / chunks);
    int lo = 0, hi = j->S - 1; /* the sequence of item i0: the last s with item_first[s] <= i0 */
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (j->item_first[mid] <= i0) lo = mid;
        else hi = mid - 1;
    }
    for (int i = i0, s = lo; i < i1; i++) {
        while (i >= j->item_first[s + 1]) s++;
        attention_item(j, s, i - j->item_first[s]);
    }
}

/* ---- the whole decode step ----
   Per layer, P holds 16 pointers: ln1 g, b; qkv w, scale, b; proj w, scale, b; ln2 g, b; fc w, scale, b;
   fc2 w, scale, b. After the layers: wte, wpe, lnf g, b, head w, head scale, k cache, v cache (each fp32,
   (n_layer, num_blocks, n_head, block_size, head_dim), contiguous). D holds the dimensions below. */
enum { D_LAYERS, D_EMBD, D_HEADS, D_VOCAB, D_POSITIONS /* rows of wpe */, D_KIND, D_EMB_BF16, D_THREADS,
       D_BLOCKS, D_BLOCK_SIZE, D_MAX_TOKENS /* new tokens per call, all sequences together */ };
enum { PER_LAYER = 16, OPS_PER_LAYER = 5, LAYER_FLOATS = 10 /* x C per token: qkv 3, att 1, proj 1, fc 4, fc2 1 */ };
/* gptwo_step's results: 0, or why it refused the call (and did nothing). */
enum { STEP_OK, STEP_BAD_TOKEN, STEP_BAD_SIZE, STEP_BAD_POSITION, STEP_BAD_BLOCK, STEP_BAD_LAYOUT };

/* Each thread keeps its own residual stream x and LayerNorm output (the same numbers in every thread). */
static size_t thread_bytes(int T, int C, int H, int positions) {
    return ((size_t)T * C * 8 + (size_t)(positions + C / H + 32) * 4 + act_bytes(T, 4 * C) + 127) / 64 * 64;
}

static int dims_ok(const int64_t *D) {
    return D[D_LAYERS] >= 1 && D[D_LAYERS] <= 1 << 16 && D[D_EMBD] >= 1 && D[D_EMBD] <= 1 << 20 && D[D_HEADS] >= 1
           && D[D_HEADS] <= 1 << 12 && D[D_EMBD] % D[D_HEADS] == 0 && D[D_VOCAB] >= 1 && D[D_VOCAB] <= 1 << 26
           && D[D_POSITIONS] >= 1 && D[D_POSITIONS] <= 1 << 24 && D[D_KIND] >= 0 && D[D_KIND] < N_KINDS
           && (D[D_EMB_BF16] == 0 || D[D_EMB_BF16] == 1) && D[D_THREADS] >= 1 && D[D_THREADS] <= 1024
           && D[D_BLOCKS] >= 1 && D[D_BLOCKS] <= INT32_MAX && D[D_BLOCK_SIZE] >= 1 && D[D_BLOCK_SIZE] <= 1 << 16
           && D[D_MAX_TOKENS] >= 1 && D[D_MAX_TOKENS] <= 1 << 16;
}

static size_t step_bytes(const int64_t *D, int T) {
    int L = (int)D[D_LAYERS], C = (int)D[D_EMBD], H = (int)D[D_HEADS], positions = (int)D[D_POSITIONS];
    return (size_t)L * T * LAYER_FLOATS * C * 4 + (size_t)(T + 1) * 2 * sizeof(int) + (size_t)(L * OPS_PER_LAYER + 2) * sizeof(Sync)
           + (size_t)D[D_THREADS] * thread_bytes(T, C, H, positions) + 4096;
}

/* Bytes of scratch gptwo_step needs for D's dimensions (D_MAX_TOKENS tokens a call); 0 for dimensions it does not take. */
size_t gptwo_step_scratch_bytes(const int64_t *D) {
    return dims_ok(D) ? step_bytes(D, (int)D[D_MAX_TOKENS]) : 0;
}

/* Whether gptwo_step would take this batch: STEP_OK or the first reason it would refuse it (see gptwo_step).
   The Python side checks every call of a batch it splits before running the first, so a refused batch
   writes nothing. */
int gptwo_step_check(const int64_t *D, int T, const int64_t *tokens, int S, const int64_t *seqs, const int64_t *tables,
                     int64_t n_tables, int R, const int64_t *rows) {
    if (!dims_ok(D) || T < 1 || T > D[D_MAX_TOKENS]) return STEP_BAD_SIZE;
    if (S < 1 || S > T || R < 0 || R > T || n_tables < 0) return STEP_BAD_LAYOUT;
    int64_t total = 0;
    for (int s = 0; s < S; s++) {
        const int64_t *q = seqs + 4 * (size_t)s;
        if (q[1] < 1 || q[1] > T || q[2] < 0 || q[3] < 0 || q[2] > n_tables || q[3] > n_tables - q[2]) return STEP_BAD_LAYOUT;
        total += q[1];
    }
    if (total != T) return STEP_BAD_LAYOUT;
    for (int r = 0; r < R; r++)
        if (rows[r] < 0 || rows[r] >= T) return STEP_BAD_LAYOUT;
    for (int t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= D[D_VOCAB]) return STEP_BAD_TOKEN;
    for (int s = 0; s < S; s++)
        if (seqs[4 * s] < 0 || seqs[4 * s] > D[D_POSITIONS] - seqs[4 * s + 1]) return STEP_BAD_POSITION;
    for (int s = 0; s < S; s++) {
        const int64_t *q = seqs + 4 * (size_t)s, *table = tables + q[2];
        int64_t need = (q[0] + q[1] + D[D_BLOCK_SIZE] - 1) / D[D_BLOCK_SIZE];
        if (need > q[3]) return STEP_BAD_BLOCK;
        for (int64_t b = 0; b < need; b++)
            if (table[b] < 1 || table[b] >= D[D_BLOCKS]) return STEP_BAD_BLOCK; /* block 0 is the null block */
    }
    return STEP_OK;
}

static void embed_row(const void **G, int emb_bf16, int64_t token, int pos, int C, float *xr) {
    if (emb_bf16) {
        const uint16_t *te = (const uint16_t *)G[0] + (size_t)token * C, *pe = (const uint16_t *)G[1] + (size_t)pos * C;
        for (int c = 0; c < C; c++) xr[c] = bf16_to_f32(te[c]) + bf16_to_f32(pe[c]);
    } else {
        const float *te = (const float *)G[0] + (size_t)token * C, *pe = (const float *)G[1] + (size_t)pos * C;
        for (int c = 0; c < C; c++) xr[c] = te[c] + pe[c];
    }
}

static void add_into(float *x, const float *r, size_t n) {
    #pragma omp simd
    for (size_t i = 0; i < n; i++) x[i] += r[i];
}

/* One step over a ragged batch: S sequences bring T new tokens in all (`tokens`, sequence after sequence);
   sequence s's count tokens sit at positions start.. (seqs, 4 int64 per sequence as in AttentionJob) and
   attend over that sequence's positions 0..their own, the earlier ones read from the paged cache through
   its block table. Every linear runs once over all T rows. Writes the new tokens' keys/values to the cache
   and the logits (R, vocab) of tokens rows[0..R) (indices into `tokens`) to `logits`.
   Returns STEP_OK, or (having done nothing): STEP_BAD_TOKEN for a token id outside the vocabulary;
   STEP_BAD_SIZE when T is not in 1..D_MAX_TOKENS, the dimensions are unusable or the scratch
   (scratch_len bytes) is smaller than gptwo_step_scratch_bytes; STEP_BAD_POSITION for positions outside
   0..D_POSITIONS-1; STEP_BAD_BLOCK for a table shorter than its positions need or a block id outside
   1..D_BLOCKS-1; STEP_BAD_LAYOUT when counts, table offsets or rows do not describe T tokens. */
int gptwo_step(const void **P, const int64_t *D, float eps, int T, const int64_t *tokens, int S, const int64_t *seqs,
               const int64_t *tables, int64_t n_tables, int R, const int64_t *rows, float *logits, char *scratch, size_t scratch_len) {
    int status = gptwo_step_check(D, T, tokens, S, seqs, tables, n_tables, R, rows);
    if (status != STEP_OK) return status;
    if (gptwo_step_scratch_bytes(D) > scratch_len) return STEP_BAD_SIZE;
    int L = (int)D[D_LAYERS], C = (int)D[D_EMBD], H = (int)D[D_HEADS], V = (int)D[D_VOCAB], positions = (int)D[D_POSITIONS];
    int kind = (int)D[D_KIND], emb_bf16 = (int)D[D_EMB_BF16], threads = (int)D[D_THREADS], bs = (int)D[D_BLOCK_SIZE];
    int hd = C / H;
    float *layers = (float *)scratch;
    int *tok_first = (int *)(layers + (size_t)L * T * LAYER_FLOATS * C), *item_first = tok_first + T + 1;
    Sync *sync = (Sync *)(((uintptr_t)(item_first + T + 1) + 127) & ~(uintptr_t)127);
    char *per_thread = (char *)(sync + L * OPS_PER_LAYER + 2);
    memset(sync, 0, (size_t)(L * OPS_PER_LAYER + 2) * sizeof(Sync));
    tok_first[0] = item_first[0] = 0;
    for (int s = 0; s < S; s++) {
        int count = (int)seqs[4 * s + 1];
        tok_first[s + 1] = tok_first[s] + count;
        item_first[s + 1] = item_first[s] + H * ((count + QBLOCK - 1) / QBLOCK);
    }
    int items = item_first[S];
    const void **G = P + (size_t)L * PER_LAYER;
    float *kcache = (float *)G[6], *vcache = (float *)G[7];
    size_t layer_cache = (size_t)D[D_BLOCKS] * H * bs * hd;
    #pragma omp parallel num_threads(threads)
    {
        char *mine = per_thread + thread_bytes(T, C, H, positions) * omp_get_thread_num();
        float *x = (float *)mine, *xn = x + (size_t)T * C, *scores = xn + (size_t)T * C;
        char *act_scratch = (char *)(((uintptr_t)(scores + positions + hd + 16) + 63) & ~(uintptr_t)63);
        Sync *s = sync;
        for (int q = 0; q < S; q++)
            for (int t = tok_first[q]; t < tok_first[q + 1]; t++)
                embed_row(G, emb_bf16, tokens[t], (int)seqs[4 * q] + t - tok_first[q], C, x + (size_t)t * C);
        for (int l = 0; l < L; l++) {
            const void **W = P + (size_t)l * PER_LAYER;
            float *qkv = layers + (size_t)l * T * LAYER_FLOATS * C, *att = qkv + (size_t)T * 3 * C, *r1 = att + (size_t)T * C;
            float *h = r1 + (size_t)T * C, *r2 = h + (size_t)T * 4 * C;
            Lin qkv_l = {kind, C, 3 * C, W[2], W[3], W[4]}, proj = {kind, C, C, W[5], W[6], W[7]};
            Lin fc = {kind, C, 4 * C, W[10], W[11], W[12]}, fc2 = {kind, 4 * C, C, W[13], W[14], W[15]};
            AttentionJob attn = {qkv, att, kcache + l * layer_cache, vcache + l * layer_cache, scores, seqs, tables,
                                 tok_first, item_first, S, C, H, bs, positions};
            layernorm(x, xn, W[0], W[1], T, C, eps);
            Act a = act_prepare(kind, xn, T, C, act_scratch);
            linear_team(&qkv_l, &a, qkv, 3 * C, 0, s++);
            run_chunks(s++, items < MAX_CHUNKS ? items : MAX_CHUNKS, attention_chunk, &attn);
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
        if (R > 0) { /* the final LayerNorm and the head for the rows asked for only */
            for (int r = 0; r < R; r++) layernorm(x + (size_t)rows[r] * C, xn + (size_t)r * C, G[2], G[3], 1, C, eps);
            Lin head = {kind, C, V, G[4], G[5], 0};
            Act a = act_prepare(kind, xn, R, C, act_scratch);
            linear_team(&head, &a, logits, V, 0, s);
        }
    }
    return STEP_OK;
}
