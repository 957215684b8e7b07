/* The native kernels' own test, in C: every weight kind's GEMV and the whole decode step (a ragged batch over a paged KV cache) against plain C
   references computed in double (as llm.c checks its C against PyTorch's numbers). It needs nothing but a
   C compiler, so it runs on any ISA, in a cross build under qemu-user too (tests/infer/test_infer_kernels.py):

     cc -O2 [ISA flags] -fopenmp tests/infer/kernels_test.c src/gptwo/infer/kernels/gptwo_kernels.c -lm

   Prints one line per check and "N passed, N failed"; exits 1 on any failure. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int gptwo_abi(void);
const char *gptwo_isa(void);
int gptwo_caps(void);
int gptwo_linear(int kind, const void *w, const float *scale, const float *bias, const float *x, float *y, int M, int K, int N, int threads);
size_t gptwo_step_scratch_bytes(const int64_t *D);
int gptwo_step_check(const int64_t *D, int T, const int64_t *tokens, int S, const int64_t *seqs, const int64_t *tables,
                     int64_t n_tables, int R, const int64_t *rows);
int gptwo_step(const void **P, const int64_t *D, float eps, int T, const int64_t *tokens, int S, const int64_t *seqs,
               const int64_t *tables, int64_t n_tables, int R, const int64_t *rows, float *logits, char *scratch, size_t scratch_len);

enum { K_F32, K_BF16, K_BF16_DP, K_I8, K_I8_VNNI, K_I8_W16 };
static const char *KIND[] = {"f32", "bf16", "bf16_dp", "i8", "i8_vnni", "i8_w16"};
static int passed, failed;

static void check(int ok, const char *what, double err, double bound) {
    printf("%s %s (error %.3g, bound %.3g)\n", ok ? "ok  " : "FAIL", what, err, bound);
    ok ? passed++ : failed++;
}

static uint64_t rng = 88172645463325252ull;
static float uniform(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return (float)((rng >> 40) / 16777216.0) * 2.0f - 1.0f; }
static uint16_t to_bf16(float f) { uint32_t u; memcpy(&u, &f, 4); return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16); }
static float from_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

/* Weights of one linear in a kind, and the float weights they stand for (what the reference multiplies). */
typedef struct { void *w; float *scale, *exact; } Weights;

static Weights make_weights(int kind, const float *w, int N, int K) {
    Weights out = {0, 0, malloc(sizeof(float) * N * K)};
    if (kind == K_F32) {
        out.w = malloc(sizeof(float) * N * K);
        memcpy(out.w, w, sizeof(float) * N * K);
        memcpy(out.exact, w, sizeof(float) * N * K);
    } else if (kind == K_BF16 || kind == K_BF16_DP) {
        uint16_t *h = malloc(2 * (size_t)N * K);
        for (int i = 0; i < N * K; i++) h[i] = to_bf16(w[i]), out.exact[i] = from_bf16(h[i]);
        out.w = h;
    } else {
        int8_t *q = malloc((size_t)N * K);
        out.scale = malloc(sizeof(float) * N);
        for (int n = 0; n < N; n++) {
            float mx = 1e-12f;
            for (int k = 0; k < K; k++) mx = fmaxf(mx, fabsf(w[n * K + k]));
            out.scale[n] = mx / 127.0f;
            for (int k = 0; k < K; k++) {
                q[n * K + k] = (int8_t)lrintf(w[n * K + k] / out.scale[n]);
                out.exact[n * K + k] = q[n * K + k] * out.scale[n];
            }
        }
        out.w = q;
    }
    return out;
}

/* How far a kind may be from the exact product over these weights: its activation rounding. */
static double act_bound(int kind, const float *x, const float *wexact, int K) {
    double mx = 0, absdot = 0, bound = 0;
    for (int k = 0; k < K; k++) mx = fmax(mx, fabs(x[k])), absdot += fabs(x[k] * wexact[k]);
    if (kind == K_BF16_DP) bound = absdot * 0.0079; /* 2^-7 relative per element */
    if (kind == K_I8_W16) { double s = 0; for (int k = 0; k < K; k++) s += fabs(wexact[k]); bound = mx / 32766 * s * 1.001; }
    if (kind == K_I8_VNNI) {
        for (int b = 0; b < K; b += 64) {
            double bm = 0, s = 0;
            for (int k = b; k < K && k < b + 64; k++) bm = fmax(bm, fabs(x[k])), s += fabs(wexact[k]);
            bound += bm / 254 * s * 1.001;
        }
    }
    return bound + 1e-5 * absdot + 1e-5;
}

static void test_linear(int kind, int M, int K, int N, int threads) {
    float *w = malloc(sizeof(float) * N * K), *x = malloc(sizeof(float) * M * K), *b = malloc(sizeof(float) * N), *y = malloc(sizeof(float) * M * N);
    for (int i = 0; i < N * K; i++) w[i] = uniform() * 0.3f;
    for (int i = 0; i < M * K; i++) x[i] = uniform();
    for (int i = 0; i < N; i++) b[i] = uniform();
    Weights W = make_weights(kind, w, N, K);
    int status = gptwo_linear(kind, W.w, W.scale, b, x, y, M, K, N, threads);
    double worst = 0, worst_bound = 0;
    int ok = status == 0;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double ref = b[n];
            for (int k = 0; k < K; k++) ref += (double)x[m * K + k] * W.exact[n * K + k];
            double err = fabs(y[m * N + n] - ref), bound = act_bound(kind, x + m * K, W.exact + n * K, K);
            if (!(err <= bound)) ok = 0;
            if (err - bound > worst - worst_bound || worst == 0) worst = err, worst_bound = bound;
        }
    char what[96];
    snprintf(what, sizeof what, "linear %s M=%d K=%d N=%d threads=%d", KIND[kind], M, K, N, threads);
    check(ok, what, worst, worst_bound);
    free(w), free(x), free(b), free(y), free(W.w), free(W.scale), free(W.exact);
}

/* ---- the decode step against a plain forward ---- */
enum { L = 2, C = 36, H = 4, V = 53, MAXLEN = 24, HD = C / H };

typedef struct { float ln1g[C], ln1b[C], qkv[3 * C * C], qkvb[3 * C], proj[C * C], projb[C], ln2g[C], ln2b[C], fc[4 * C * C], fcb[4 * C], fc2[C * 4 * C], fc2b[C]; } Layer;
static Layer layers[L];
static float wte[V * C], wpe[MAXLEN * C], lnfg[C], lnfb[C];

static void fill(float *p, int n, float scale, float offset) { for (int i = 0; i < n; i++) p[i] = offset + uniform() * scale; }

static void ref_ln(const double *x, double *o, const float *g, const float *b) {
    double mean = 0, var = 0;
    for (int c = 0; c < C; c++) mean += x[c];
    mean /= C;
    for (int c = 0; c < C; c++) var += (x[c] - mean) * (x[c] - mean);
    var /= C;
    for (int c = 0; c < C; c++) o[c] = (x[c] - mean) / sqrt(var + 1e-5) * g[c] + b[c];
}

static void ref_linear(const double *x, const float *w, const float *b, int K, int N, double *y) {
    for (int n = 0; n < N; n++) {
        double s = b[n];
        for (int k = 0; k < K; k++) s += x[k] * w[n * K + k];
        y[n] = s;
    }
}

/* Logits of the last of tokens[0..T) with every weight as `exact` (the kind's weights in float). */
static void ref_forward(const int64_t *tokens, int T, float *exact[L][4], const float *head, double *logits) {
    static double x[MAXLEN][C], q[MAXLEN][3 * C], att[MAXLEN][C];
    double xn[C], tmp[4 * C], h[4 * C];
    for (int t = 0; t < T; t++)
        for (int c = 0; c < C; c++) x[t][c] = wte[tokens[t] * C + c] + wpe[t * C + c];
    for (int l = 0; l < L; l++) {
        Layer *ly = &layers[l];
        for (int t = 0; t < T; t++) ref_ln(x[t], xn, ly->ln1g, ly->ln1b), ref_linear(xn, exact[l][0], ly->qkvb, C, 3 * C, q[t]);
        for (int t = 0; t < T; t++)
            for (int hh = 0; hh < H; hh++) {
                double s[MAXLEN], mx = -1e300, sum = 0;
                for (int j = 0; j <= t; j++) {
                    s[j] = 0;
                    for (int d = 0; d < HD; d++) s[j] += q[t][hh * HD + d] * q[j][C + hh * HD + d];
                    s[j] /= sqrt((double)HD);
                    mx = fmax(mx, s[j]);
                }
                for (int j = 0; j <= t; j++) s[j] = exp(s[j] - mx), sum += s[j];
                for (int d = 0; d < HD; d++) {
                    double o = 0;
                    for (int j = 0; j <= t; j++) o += s[j] / sum * q[j][2 * C + hh * HD + d];
                    att[t][hh * HD + d] = o;
                }
            }
        for (int t = 0; t < T; t++) {
            ref_linear(att[t], exact[l][1], ly->projb, C, C, tmp);
            for (int c = 0; c < C; c++) x[t][c] += tmp[c];
            ref_ln(x[t], xn, ly->ln2g, ly->ln2b);
            ref_linear(xn, exact[l][2], ly->fcb, C, 4 * C, h);
            for (int i = 0; i < 4 * C; i++) h[i] = 0.5 * h[i] * (1 + tanh(0.7978845608028654 * (h[i] + 0.044715 * h[i] * h[i] * h[i])));
            ref_linear(h, exact[l][3], ly->fc2b, 4 * C, C, tmp);
            for (int c = 0; c < C; c++) x[t][c] += tmp[c];
        }
    }
    ref_ln(x[T - 1], xn, lnfg, lnfb);
    for (int v = 0; v < V; v++) {
        double s = 0;
        for (int c = 0; c < C; c++) s += xn[c] * head[v * C + c];
        logits[v] = s;
    }
}

/* Two sequences through the paged cache (blocks of BS, tables non-contiguous and interleaved): a ragged
   prefill (7 tokens beside 3, logits of every token of the second), then five ragged steps (1 token beside 2). */
enum { BS = 4, NB = 2 * (MAXLEN / BS) + 1, MAXT = 10 };
static const int64_t TABLE_A[MAXLEN / BS] = {7, 2, 12, 4, 11, 5}, TABLE_B[MAXLEN / BS] = {3, 10, 1, 8, 6, 9};

static int64_t dims[11] = {L, C, H, V, MAXLEN, 0, 0, 1, NB, BS, MAXT};

/* One call: sequence a brings na tokens at position pa, b nb at pb; rows are the last of a, then b's last rb. */
static int call_step(const void **P, const int64_t *tok_a, int pa, int na, const int64_t *tok_b, int pb, int nb, int rb, float *logits, char *scratch, size_t bytes) {
    int64_t tokens[2 * MAXLEN], seqs[8] = {pa, na, 0, MAXLEN / BS, pb, nb, MAXLEN / BS, MAXLEN / BS}, tables[2 * (MAXLEN / BS)], rows[2 * MAXLEN];
    memcpy(tokens, tok_a + pa, na * 8), memcpy(tokens + na, tok_b + pb, nb * 8);
    memcpy(tables, TABLE_A, sizeof TABLE_A), memcpy(tables + MAXLEN / BS, TABLE_B, sizeof TABLE_B);
    rows[0] = na - 1;
    for (int r = 0; r < rb; r++) rows[1 + r] = na + nb - rb + r;
    return gptwo_step(P, dims, 1e-5f, na + nb, tokens, 2, seqs, tables, 2 * (MAXLEN / BS), 1 + rb, rows, logits, scratch, bytes);
}

/* Largest relative error of logits against the forward of `tokens`' prefixes of lengths ends[0..n). */
static double error_against(const float *logits, const int64_t *tokens, const int *ends, int n, float *exact[L][4], const float *head) {
    double worst = 0, ref[V];
    for (int i = 0; i < n; i++) {
        ref_forward(tokens, ends[i], exact, head, ref);
        for (int v = 0; v < V; v++) worst = fmax(worst, fabs(logits[i * V + v] - ref[v]) / (1 + fabs(ref[v])));
    }
    return worst;
}

/* Calls the step must refuse, each leaving the cache as it was. */
static void test_refusals(const void **P, const int64_t *a, const int64_t *b, float *logits, char *scratch, size_t bytes, const float *kc, float *snapshot, size_t cache_floats) {
    memcpy(snapshot, kc, cache_floats * 4);
    int64_t bad[MAXLEN];
    memcpy(bad, a, sizeof bad), bad[0] = V;
    check(call_step(P, bad, 0, 1, b, 0, 1, 1, logits, scratch, bytes) == 1, "step refuses a token id >= vocab", 0, 0);
    bad[0] = -1;
    check(call_step(P, bad, 0, 1, b, 0, 1, 1, logits, scratch, bytes) == 1, "step refuses a negative token id", 0, 0);
    check(call_step(P, a, 0, 5, b, 0, 6, 1, logits, scratch, bytes) == 2, "step refuses more tokens than its scratch holds", 0, 0);
    check(call_step(P, a, 0, 1, b, 0, 1, 2, logits, scratch, bytes) == 5, "step refuses more rows than its tokens", 0, 0);
    check(call_step(P, a, 0, 1, b, 0, 1, 1, logits, scratch, bytes - 1) == 2, "step refuses a scratch too small", 0, 0);
    int64_t seqs[4] = {MAXLEN - 1, 2, 0, MAXLEN / BS}, rows[1] = {1}, two[2] = {1, 2};
    check(gptwo_step(P, dims, 1e-5f, 2, two, 1, seqs, TABLE_A, MAXLEN / BS, 1, rows, logits, scratch, bytes) == 3, "step refuses positions past the context", 0, 0);
    int64_t table[1] = {NB};
    seqs[0] = 0, seqs[3] = 1;
    check(gptwo_step(P, dims, 1e-5f, 2, two, 1, seqs, table, 1, 1, rows, logits, scratch, bytes) == 4, "step refuses a block id >= num_blocks", 0, 0);
    table[0] = 0;
    check(gptwo_step(P, dims, 1e-5f, 2, two, 1, seqs, table, 1, 1, rows, logits, scratch, bytes) == 4, "step refuses the null block", 0, 0);
    seqs[0] = BS - 1, table[0] = 1; /* positions BS-1, BS: two blocks needed, one given */
    check(gptwo_step(P, dims, 1e-5f, 2, two, 1, seqs, table, 1, 1, rows, logits, scratch, bytes) == 4, "step refuses a table shorter than its positions", 0, 0);
    seqs[0] = 0, seqs[3] = 2; /* a table running past the tables array */
    check(gptwo_step(P, dims, 1e-5f, 2, two, 1, seqs, table, 1, 1, rows, logits, scratch, bytes) == 5, "step refuses a table past the array", 0, 0);
    seqs[1] = 1, seqs[3] = 1; /* counts summing to 1 of 2 tokens */
    check(gptwo_step(P, dims, 1e-5f, 2, two, 1, seqs, table, 1, 1, rows, logits, scratch, bytes) == 5, "step refuses counts that miss tokens", 0, 0);
    check(memcmp(snapshot, kc, cache_floats * 4) == 0, "refused steps leave the cache as it was", 0, 0);
    seqs[1] = 2, seqs[3] = 1;
    check(gptwo_step_check(dims, 2, two, 1, seqs, table, 1, 1, rows) == 0, "step_check takes a good call", 0, 0);
    table[0] = NB;
    check(gptwo_step_check(dims, 2, two, 1, seqs, table, 1, 1, rows) == 4, "step_check refuses what the step refuses", 0, 0);
}

static void test_step(int kind, int threads) {
    Weights W[L][4], head = make_weights(kind, wte, V, C);
    float *exact[L][4];
    const void *P[L * 16 + 8];
    for (int l = 0; l < L; l++) {
        Layer *ly = &layers[l];
        const float *src[4] = {ly->qkv, ly->proj, ly->fc, ly->fc2};
        int shape[4][2] = {{3 * C, C}, {C, C}, {4 * C, C}, {C, 4 * C}};
        const float *bias[4] = {ly->qkvb, ly->projb, ly->fcb, ly->fc2b};
        for (int i = 0; i < 4; i++) W[l][i] = make_weights(kind, src[i], shape[i][0], shape[i][1]), exact[l][i] = W[l][i].exact;
        const void *p[16] = {ly->ln1g, ly->ln1b, W[l][0].w, W[l][0].scale, bias[0], W[l][1].w, W[l][1].scale, bias[1],
                             ly->ln2g, ly->ln2b, W[l][2].w, W[l][2].scale, bias[2], W[l][3].w, W[l][3].scale, bias[3]};
        memcpy(P + l * 16, p, sizeof p);
    }
    size_t cache_floats = (size_t)L * NB * H * BS * HD;
    float *kc = calloc(cache_floats, 4), *vc = calloc(cache_floats, 4), *snapshot = malloc(cache_floats * 4), logits[MAXT * V];
    const void *tail[8] = {wte, wpe, lnfg, lnfb, head.w, head.scale, kc, vc};
    memcpy(P + L * 16, tail, sizeof tail);
    dims[5] = kind, dims[7] = threads;
    int64_t a[MAXLEN], b[MAXLEN];
    for (int t = 0; t < MAXLEN; t++) a[t] = (int64_t)((uniform() + 1) * 0.5 * (V - 1)), b[t] = (int64_t)((uniform() + 1) * 0.5 * (V - 1));
    size_t bytes = gptwo_step_scratch_bytes(dims);
    char *scratch = malloc(bytes);
    double tol = kind == K_F32 || kind == K_I8 ? 2e-4 : kind == K_I8_VNNI ? 0.15 : 0.05, worst = 0; /* int8 activations per block: the noisiest (0.11 seen) */
    int ok = call_step(P, a, 0, 7, b, 0, 3, 3, logits, scratch, bytes) == 0;
    int ends0[1] = {7}, ends1[3] = {1, 2, 3};
    worst = fmax(error_against(logits, a, ends0, 1, exact, head.exact), error_against(logits + V, b, ends1, 3, exact, head.exact));
    for (int step = 0; ok && step < 5; step++) {
        ok = call_step(P, a, 7 + step, 1, b, 3 + 2 * step, 2, 1, logits, scratch, bytes) == 0;
        int end_a[1] = {8 + step}, end_b[1] = {5 + 2 * step};
        worst = fmax(worst, fmax(error_against(logits, a, end_a, 1, exact, head.exact), error_against(logits + V, b, end_b, 1, exact, head.exact)));
    }
    char what[96];
    snprintf(what, sizeof what, "step %s ragged paged prefill + 5 steps threads=%d", KIND[kind], threads);
    check(ok && worst <= tol, what, worst, tol);
    if (kind == K_F32 && threads == 1) test_refusals(P, a, b, logits, scratch, bytes, kc, snapshot, cache_floats);
    for (int l = 0; l < L; l++)
        for (int i = 0; i < 4; i++) free(W[l][i].w), free(W[l][i].scale), free(W[l][i].exact);
    free(head.w), free(head.scale), free(head.exact), free(kc), free(vc), free(snapshot), free(scratch);
}

int main(void) {
    printf("isa %s, abi %d, caps 0x%x\n", gptwo_isa(), gptwo_abi(), gptwo_caps());
    int shapes[][3] = {{1, 77, 45}, {3, 200, 33}, {5, 768, 130}, {2, 64, 4}, {1, 1, 1}, {4, 130, 17}};
    for (int kind = 0; kind < 6; kind++)
        for (unsigned s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            for (int threads = 1; threads <= 3; threads += 2) test_linear(kind, shapes[s][0], shapes[s][1], shapes[s][2], threads);
    check(gptwo_linear(9, 0, 0, 0, 0, 0, 1, 1, 1, 1) == 1, "linear refuses an unknown kind", 0, 0);
    for (int l = 0; l < L; l++) {
        Layer *ly = &layers[l];
        fill(ly->ln1g, C, 0.2f, 1), fill(ly->ln1b, C, 0.1f, 0), fill(ly->qkv, 3 * C * C, 0.3f, 0), fill(ly->qkvb, 3 * C, 0.1f, 0);
        fill(ly->proj, C * C, 0.3f, 0), fill(ly->projb, C, 0.1f, 0), fill(ly->ln2g, C, 0.2f, 1), fill(ly->ln2b, C, 0.1f, 0);
        fill(ly->fc, 4 * C * C, 0.3f, 0), fill(ly->fcb, 4 * C, 0.1f, 0), fill(ly->fc2, 4 * C * C, 0.15f, 0), fill(ly->fc2b, C, 0.1f, 0);
    }
    fill(wte, V * C, 0.5f, 0), fill(wpe, MAXLEN * C, 0.2f, 0), fill(lnfg, C, 0.2f, 1), fill(lnfb, C, 0.1f, 0);
    for (int kind = 0; kind < 6; kind++)
        for (int threads = 1; threads <= 2; threads++) test_step(kind, threads);
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
