/* ntkit: the exact CNTK of a convolution stack ending in global average pooling, one pair of inputs at a time,
 * with all layers fused in a wavefront over the first input's rows (float64, CPU).
 *
 * Built by ntkit/kernels/_native.py and called by ntkit/kernels/_conv_gap.py (native_stack; the comment above it
 * describes the algorithm). Plain C99, no dependencies: compiled on first use with the system C compiler (-O3
 * -march=native -ffp-contract=off -fno-math-errno), so IEEE operations in the written order.
 *
 * The stack: a 1x1 convolution of im2col patches (the first convolution), then L - 1 pairs (activation,
 * convolution), then the last activation, summed over all pairs of positions (the pooling). Every activation is
 * the ReLU family phi = a min(x, 0) + b max(x, 0) with the arc-cosine dual (Cho & Saul 2009)
 *
 *     rho = clamp(Sigma r1 r2, -1, 1),   D = d0 - k arccos(rho),
 *     Sigma' = sqrt(1 - rho^2) s1k s2 + D Sigma,   Theta' = D Theta,
 *
 * and every convolution (stride 1, NTK parameterization) the window-sum rule (Arora et al. 2019, Sec. 4)
 *
 *     Sigma' = b2 + w2 sum_o Sigma(p + o, p' + o),   Theta' = Sigma' + w2 sum_o Theta(p + o, p' + o).
 *
 * Layouts (per pair): positions p = (h, w) of the first input are loop indices; positions of the second input
 * are a flat index f = h' Wq + w' in rows of the common padded width Wq (the columns w' >= W of a row are
 * computed and masked to zero by the activation; they are the next convolution's zero padding).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef int64_t i64;

/* geometry of convolution l >= 1 (row l of geo): input H W, filter FH FW, padding before PH PW, output HO WO,
 * padded input HP WP */
enum { G_H, G_W, G_FH, G_FW, G_PH, G_PW, G_HO, G_WO, G_HP, G_WP, G_N };
#define GEO(l, k) geo[(l) * G_N + (k)]

/* arccos(x), x in [-1, 1]: arccos(a) = pi/2 - arcsin(a) for a = |x| <= 1/2, 2 arcsin(sqrt((1 - a) / 2)) above,
 * arcsin(s) = s + s z P(z) (z = s^2 <= 1/4, P of degree 11 by Estrin's scheme, coefficients c from Python);
 * arccos(-a) = pi - arccos(a); arccos(1) = 0 exactly. The same expression as ntkit.kernels._fused.acos_poly. */
static inline double arccos_poly(double x, const double *c) {
    double a = fabs(x);
    int big = a > 0.5;
    double z = big ? 0.5 - 0.5 * a : a * a;
    double s = big ? sqrt(z) : a;
    double z2 = z * z, z4 = z2 * z2;
    double q0 = (c[0] + c[1] * z) + (c[2] + c[3] * z) * z2;
    double q1 = (c[4] + c[5] * z) + (c[6] + c[7] * z) * z2;
    double q2 = (c[8] + c[9] * z) + (c[10] + c[11] * z) * z2;
    double p = q0 + (q1 + q2 * z4) * z4;
    double r = s + s * z * p;
    r = big ? 2.0 * r : 1.5707963267948966 - r;
    return x < 0 ? 3.141592653589793 - r : r;
}

/* The dual of one number: Sigma (cov) and Theta (ntk) in, o (Sigma') and y (Theta') out, masked by mf. */
#define DUAL_ONE(cov, ntk, r2f, s2f, mf)                                       \
    double rho = (cov) * r1 * (r2f);                                           \
    rho = rho < -1.0 ? -1.0 : rho;                                             \
    rho = rho > 1.0 ? 1.0 : rho;                                               \
    double D = d0 - k * arccos_poly(rho, c);                                   \
    double o = (mf) * (sqrt(1.0 - rho * rho) * s1k * (s2f) + D * (cov));       \
    double y = (mf) * ((ntk) * D);

/* the dual over n numbers of one first-input position (factors r1, s1k) against the second input's row of
 * factors r2, s2 and mask m (1 on positions, 0 on padding): writes O, Y, or adds to them when acc */
static void dual(i64 n, const double *restrict S, const double *restrict T, double r1, double s1k,
                 const double *restrict r2, const double *restrict s2, const double *restrict m, double d0,
                 double k, const double *restrict c, double *restrict O, double *restrict Y, int acc) {
    if (acc) {
        for (i64 f = 0; f < n; f++) { DUAL_ONE(S[f], T[f], r2[f], s2[f], m[f]) O[f] += o; Y[f] += y; }
    } else {
        for (i64 f = 0; f < n; f++) { DUAL_ONE(S[f], T[f], r2[f], s2[f], m[f]) O[f] = o; Y[f] = y; }
    }
}

/* A convolution with a filter of at most 3 rows and the dual in one loop: Sigma = b2 + w2 ((v0 + v1) + v2),
 * Theta = Sigma + w2 ((u0 + u1) + u2) from the column sums of the window's rows (a missing row points to zeros:
 * x + 0 = x exactly, so the sums equal those of the rows present, in the same order), then the dual. */
static void conv_dual(i64 n, const double *restrict v0, const double *restrict v1, const double *restrict v2,
                      const double *restrict u0, const double *restrict u1, const double *restrict u2, double w2,
                      double b2, double r1, double s1k, const double *restrict r2, const double *restrict s2,
                      const double *restrict m, double d0, double k, const double *restrict c, double *restrict O,
                      double *restrict Y, int acc) {
#define CONV_ONE                                                               \
    double cov = b2 + w2 * ((v0[f] + v1[f]) + v2[f]);                          \
    double ntk = cov + w2 * ((u0[f] + u1[f]) + u2[f]);                         \
    DUAL_ONE(cov, ntk, r2[f], s2[f], m[f])
    if (acc) {
        for (i64 f = 0; f < n; f++) { CONV_ONE O[f] += o; Y[f] += y; }
    } else {
        for (i64 f = 0; f < n; f++) { CONV_ONE O[f] = o; Y[f] = y; }
    }
#undef CONV_ONE
}

/* dst = first ? src : dst + src, over n numbers, for both tensors */
static inline void add2(i64 n, double *restrict dx, double *restrict dy, const double *restrict sx,
                        const double *restrict sy, int first) {
    if (first) {
        for (i64 f = 0; f < n; f++) { dx[f] = sx[f]; dy[f] = sy[f]; }
    } else {
        for (i64 f = 0; f < n; f++) { dx[f] = dx[f] + sx[f]; dy[f] = dy[f] + sy[f]; }
    }
}

/* Column c of activation l - 1's output row h (O, Y: n numbers, at offset doff of a padded row of rowsz) into
 * the column sums of convolution l, V[x][g] = sum_b X[x - pw + b][g + b], held in ring slot h mod FH: the column
 * contributes to V[x] for x = c + pw - b. Columns arrive in increasing order, so the first contribution to V[x]
 * (c = max(0, x - pw)) writes all of it (zeros outside the column's range: the padding) and the later ones add
 * within their range -- the same sums in the same order as adding whole padded rows. */
static void column_sums(i64 l, i64 c, i64 h, i64 n, i64 doff, i64 rowsz, const i64 *geo,
                        const double *restrict O, const double *restrict Y, double *const *ringX,
                        double *const *ringY) {
    i64 fw = GEO(l, G_FW), pw = GEO(l, G_PW), Wo = GEO(l, G_WO), nv = rowsz - (fw - 1);
    i64 slot = (h % GEO(l, G_FH)) * Wo * rowsz;
    for (i64 b = 0; b < fw; b++) {
        i64 x = c + pw - b;
        if (x < 0 || x >= Wo) continue;
        double *restrict vx = ringX[l] + slot + x * rowsz, *restrict vy = ringY[l] + slot + x * rowsz;
        i64 lo = doff - b, hi = doff - b + n;  /* V[g] gets X[g + b] = O[g + b - doff] for g in [lo, hi) */
        i64 s0 = lo < 0 ? -lo : 0;              /* (clipped to [0, nv)) */
        if (lo < 0) lo = 0;
        if (hi > nv) hi = nv;
        const double *o = O + s0, *y = Y + s0;
        if (c == (x - pw > 0 ? x - pw : 0)) {
            for (i64 g = 0; g < lo; g++) { vx[g] = 0.0; vy[g] = 0.0; }
            for (i64 g = lo; g < hi; g++) { vx[g] = o[g - lo]; vy[g] = y[g - lo]; }
            for (i64 g = hi; g < nv; g++) { vx[g] = 0.0; vy[g] = 0.0; }
        } else {
            for (i64 g = lo; g < hi; g++) { vx[g] = vx[g] + o[g - lo]; vy[g] = vy[g] + y[g - lo]; }
        }
    }
}

/* The longest row of second-input positions: the padded inputs of the convolutions and the activations' rows. */
static i64 longest_row(i64 L, i64 H, i64 W, const i64 *geo) {
    i64 Wq = L > 1 ? GEO(1, G_WP) : W, longest = (H - 1) * Wq + W;
    for (i64 l = 1; l < L; l++) {
        i64 row = GEO(l, G_HP) * GEO(l, G_WP);
        if (row > longest) longest = row;
    }
    return longest;
}

/* Numbers of the per-thread workspace of ntkit_cntk_gap_pairs (zeroed by the caller once). */
i64 ntkit_cntk_gap_workspace(i64 L, i64 H, i64 W, const i64 *geo) {
    i64 total = 0;
    for (i64 l = 1; l < L; l++)
        total += 2 * GEO(l, G_FH) * GEO(l, G_WO) * GEO(l, G_HP) * GEO(l, G_WP);
    return total + 7 * longest_row(L, H, W, geo);
}

/* The variances q_l(p) of every input at activation l (the same-position diagonal of its self pair), by the
 * same expressions in the same order as ntkit_cntk_gap_pairs, so that a self pair's diagonal equals them
 * bitwise and its correlations snap to exactly 1. Call for l = 0, 1, ..., L - 1 in turn, with the factors
 * R1, S1K of the layers before l filled in between (Python forms them from Q). Q, R1, S1K: blocks (n, Hl Wl)
 * at offsets off1[l]. */
void ntkit_cntk_gap_variances(i64 l, i64 n, i64 H, i64 W, i64 K, const double *A1, double w0, double b0,
                              const i64 *geo, const double *wb, const double *dk, const double *coef,
                              const double *R1, const double *S1K, const i64 *off1, double *Q) {
    i64 hl[l + 1], wl[l + 1];
    hl[0] = H; wl[0] = W;
    for (i64 t = 1; t <= l; t++) { hl[t] = GEO(t, G_HO); wl[t] = GEO(t, G_WO); }
    for (i64 i = 0; i < n; i++) {
        double *q = Q + off1[l] + i * hl[l] * wl[l];
        if (l == 0) {
            for (i64 p = 0; p < H * W; p++) {
                const double *a = A1 + (i * H * W + p) * K;
                double t = a[0] * a[0];
                for (i64 kq = 1; kq < K; kq++) t = t + a[kq] * a[kq];
                q[p] = b0 + w0 * t;
            }
            continue;
        }
        i64 lp = l - 1, np = hl[lp] * wl[lp];
        const double *qp = Q + off1[lp] + i * np, *r1 = R1 + off1[lp] + i * np, *s1 = S1K + off1[lp] + i * np;
        double d0 = dk[2 * lp], kk = dk[2 * lp + 1], w2 = wb[2 * l], b2 = wb[2 * l + 1];
        i64 fh = GEO(l, G_FH), fw = GEO(l, G_FW), ph = GEO(l, G_PH), pw = GEO(l, G_PW);
        i64 Hin = GEO(l, G_H), Win = GEO(l, G_W);
        for (i64 h = 0; h < hl[l]; h++) {
            for (i64 x = 0; x < wl[l]; x++) {
                double acc = 0.0;
                int first = 1;
                for (i64 a = 0; a < fh; a++) {  /* rows of the window, each summed over its columns first */
                    i64 r = h - ph + a;
                    if (r < 0 || r >= Hin) continue;
                    double v = 0.0;
                    int fb = 1;
                    for (i64 b = 0; b < fw; b++) {
                        i64 cc = x - pw + b;
                        if (cc < 0 || cc >= Win) continue;
                        i64 p = r * Win + cc;
                        double one = 1.0, o, y, cov = qp[p];
                        double s2 = sqrt(cov), r2 = 1.0 / s2;
                        dual(1, &cov, &cov, r1[p], s1[p], &r2, &s2, &one, d0, kk, coef, &o, &y, 0);
                        v = fb ? o : v + o;
                        fb = 0;
                    }
                    acc = first ? v : acc + v;
                    first = 0;
                }
                q[h * wl[l] + x] = b2 + w2 * acc;
            }
        }
    }
}

/* Sigma and Theta summed over all pairs of positions after the last activation, for the pairs (pi[m], pj[m]).
 *
 * A1 (n, H W, K): the patches of the first convolution (scaled); A2T (n, K, L0): the same patches transposed,
 * in the flat padded-row layout of the second input (zero rows in the padding), L0 = (H - 1) Wq + W.
 * wb[2 l], wb[2 l + 1]: w2 = W_std^2 / (FH FW) and b2 of convolution l >= 1; dk[2 l], dk[2 l + 1]: d0, k of
 * activation l. Per activation l: R1, S1K (n, Hl Wl) at off1[l] (first-input factors), R2, S2 (n, Ll) at
 * off2[l] (second-input factors in the flat layout, 1 on the padding), M (Ll) at offm[l] (the mask).
 * work: ntkit_cntk_gap_workspace(L, H, W, geo) numbers, zero-initialised once (the padding is never written).
 *
 * Wavefront: each column x of activation l's output row r (all second-input positions f) is added, as soon as
 * it is computed, into the column sums V[x'][g] = sum_b X[x' - pw + b][g + b] of convolution l + 1, held in slot
 * r mod FH of its ring (column_sums); convolution l + 1's output row h is the sum over the filter's rows of
 * V rows h - ph + a shifted by a Wq, followed at once by activation l + 1. The deepest row that is ready is
 * computed first, so a ring of FH rows suffices and every row is consumed while it is still in cache. */
void ntkit_cntk_gap_pairs(i64 L, i64 H, i64 W, i64 K, const double *A1, const double *A2T, double w0, double b0,
                          const i64 *geo, const double *wb, const double *dk, const double *coef,
                          const double *R1, const double *S1K, const i64 *off1, const double *R2,
                          const double *S2, const i64 *off2, const double *M, const i64 *offm, i64 npairs,
                          const i64 *pi, const i64 *pj, double *nngp, double *ntk, double *work) {
    i64 Wq = L > 1 ? GEO(1, G_WP) : W;
    i64 hl[L], wl[L], Ll[L];
    hl[0] = H; wl[0] = W;
    for (i64 l = 1; l < L; l++) { hl[l] = GEO(l, G_HO); wl[l] = GEO(l, G_WO); }
    for (i64 l = 0; l < L; l++) Ll[l] = (hl[l] - 1) * Wq + wl[l];
    double *ringX[L], *ringY[L];
    double *w = work;
    i64 Lmax = longest_row(L, H, W, geo);
    for (i64 l = 1; l < L; l++) {
        i64 row = GEO(l, G_HP) * GEO(l, G_WP);
        i64 ring = GEO(l, G_FH) * GEO(l, G_WO) * row;
        ringX[l] = w; w += ring;
        ringY[l] = w; w += ring;
    }
    double *tS = w; w += Lmax;
    double *tT = w; w += Lmax;
    double *sumO = w; w += Lmax;
    double *sumY = w; w += Lmax;
    double *oX = w; w += Lmax;  /* one column of an activation's output, before its column sums */
    double *oY = w; w += Lmax;
    const double *zeros = w;  /* never written */
    i64 last = L - 1;

    for (i64 m = 0; m < npairs; m++) {
        i64 i = pi[m], j = pj[m], produced[L];
        for (i64 l = 0; l < L; l++) produced[l] = 0;
        memset(sumO, 0, sizeof(double) * Lmax);
        memset(sumY, 0, sizeof(double) * Lmax);
        while (produced[last] < hl[last]) {
            i64 l;  /* the deepest activation whose next row has all its inputs */
            for (l = last; l >= 1; l--) {
                i64 need = produced[l] - GEO(l, G_PH) + GEO(l, G_FH);
                if (need > GEO(l, G_H)) need = GEO(l, G_H);
                if (produced[l - 1] >= need) break;
            }
            i64 h = produced[l], n = Ll[l];
            const double *r1 = R1 + off1[l] + i * hl[l] * wl[l] + h * wl[l];
            const double *s1 = S1K + off1[l] + i * hl[l] * wl[l] + h * wl[l];
            const double *r2 = R2 + off2[l] + j * n, *s2 = S2 + off2[l] + j * n, *mk = M + offm[l];
            double d0 = dk[2 * l], kk = dk[2 * l + 1];
            i64 rowsz = 0, doff = 0;
            if (l < last) {
                rowsz = GEO(l + 1, G_HP) * GEO(l + 1, G_WP);
                doff = GEO(l + 1, G_PH) * Wq + GEO(l + 1, G_PW);
            }
            for (i64 x = 0; x < wl[l]; x++) {
                const double *tin = tS;
                if (l == 0) {  /* Sigma = Theta = b0 + w0 <patch_i(p), patch_j(p')> */
                    const double *a = A1 + (i * H * W + h * W + x) * K, *B = A2T + j * K * n;
                    for (i64 f = 0; f < n; f++) tS[f] = a[0] * B[f];
                    for (i64 kq = 1; kq < K; kq++) {
                        const double *Bk = B + kq * n;
                        double ak = a[kq];
                        for (i64 f = 0; f < n; f++) tS[f] = tS[f] + ak * Bk[f];
                    }
                    for (i64 f = 0; f < n; f++) tS[f] = b0 + w0 * tS[f];
                } else if (GEO(l, G_FH) <= 3) {  /* window rows, affine step and dual in one loop */
                    i64 fh = GEO(l, G_FH), ph = GEO(l, G_PH), Hin = GEO(l, G_H), Wo = GEO(l, G_WO);
                    i64 rs = GEO(l, G_HP) * GEO(l, G_WP);
                    const double *v[3] = {zeros, zeros, zeros}, *u[3] = {zeros, zeros, zeros};
                    for (i64 a = 0; a < fh; a++) {
                        i64 r = h - ph + a;
                        if (r < 0 || r >= Hin) continue;
                        i64 at = ((r % fh) * Wo + x) * rs + a * Wq;
                        v[a] = ringX[l] + at;
                        u[a] = ringY[l] + at;
                    }
                    double w2 = wb[2 * l], b2 = wb[2 * l + 1];
                    if (l < last) {
                        conv_dual(n, v[0], v[1], v[2], u[0], u[1], u[2], w2, b2, r1[x], s1[x], r2, s2, mk, d0, kk,
                                  coef, oX, oY, 0);
                        column_sums(l + 1, x, h, n, doff, rowsz, geo, oX, oY, ringX, ringY);
                    } else {
                        conv_dual(n, v[0], v[1], v[2], u[0], u[1], u[2], w2, b2, r1[x], s1[x], r2, s2, mk, d0, kk,
                                  coef, sumO, sumY, 1);
                    }
                    continue;
                } else {  /* taller filters: the rows of the window summed into temporaries first */
                    i64 fh = GEO(l, G_FH), ph = GEO(l, G_PH), Hin = GEO(l, G_H), Wo = GEO(l, G_WO);
                    i64 rs = GEO(l, G_HP) * GEO(l, G_WP);
                    int first = 1;
                    for (i64 a = 0; a < fh; a++) {
                        i64 r = h - ph + a;
                        if (r < 0 || r >= Hin) continue;
                        i64 at = ((r % fh) * Wo + x) * rs + a * Wq;
                        add2(n, tS, tT, ringX[l] + at, ringY[l] + at, first);
                        first = 0;
                    }
                    double w2 = wb[2 * l], b2 = wb[2 * l + 1];
                    for (i64 f = 0; f < n; f++) {
                        double s = b2 + w2 * tS[f];
                        tS[f] = s;
                        tT[f] = s + w2 * tT[f];
                    }
                    tin = tT;
                }
                if (l < last) {
                    dual(n, tS, tin, r1[x], s1[x], r2, s2, mk, d0, kk, coef, oX, oY, 0);
                    column_sums(l + 1, x, h, n, doff, rowsz, geo, oX, oY, ringX, ringY);
                } else {
                    dual(n, tS, tin, r1[x], s1[x], r2, s2, mk, d0, kk, coef, sumO, sumY, 1);
                }
            }
            produced[l]++;
        }
        double so = 0.0, sy = 0.0;
        for (i64 f = 0; f < Ll[last]; f++) { so += sumO[f]; sy += sumY[f]; }
        nngp[m] = so;
        ntk[m] = sy;
    }
}
