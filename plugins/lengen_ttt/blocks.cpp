// TTT-Linear's dual-form block on CPU, forward and backward, one (sequence, head) at a time.
//
// The same computation as LinearBlock in model.py (read that first: its docstring has the
// math, and the tests check this file against it). There every step is a batched torch op
// over all sequences x heads, so a block is ~100 ops whose operands no longer sit in cache.
// Here each (sequence, head) problem -- a few 64 x 64 matrices -- is done start to end
// while it is in L1/L2, with the matrix products handed to the BLAS torch links (MKL's
// sgemm_/dgemm_) and the row-wise LayerNorm algebra fused into single loops. Problems are
// spread over torch's intra-op threads. Compiled on first use by lengen_ttt/kernels.py.
//
// Shapes (N = sequences x heads, S tokens in the block, d head dim, K mini-batch):
//   qx [N, 2S, d] (queries then keys), bt [N, S, d], lr [N, S], mqk [2S, S] (the token
//   scale masks), gamma2 [N, d], W [N, d, d], b [N, d]; all contiguous.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*);
}

namespace {

inline void blas(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                 const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                 const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void blas(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
                 const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
                 const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major C[M, N] = alpha op(A)[M, K] op(B)[K, N] + beta C (lda/ldb/ldc: row strides).
template <typename T>
void gemm(bool ta, bool tb, int M, int N, int K, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C,
          int ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
  blas(&tB, &tA, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);  // column-major: C^T = B^T A^T
}

template <typename T>
inline T row_sum(const T* x, int d) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int c = 0; c < d; ++c) s += x[c];
  return s;
}

template <typename T>
inline T row_dot(const T* x, const T* y, int d) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int c = 0; c < d; ++c) s += x[c] * y[c];
  return s;
}

// The [2S, S] coefficient matrices are causal: query t reads the keys up to the end of its own
// mini-batch, a key reads only the keys of earlier mini-batches. The products skip two parts
// that are zero, and the rest of those rows is never written nor read:
// - keys: rows of the first mini-batch (the first kr = min(K, S)) entirely, and for the other
//   rows the columns past ck = K * (number of full mini-batches before the last one);
// - queries: rows [0, sp) past column sp, sp being the first mini-batch boundary at or before
//   S / 2 (0 for short blocks). Splitting the queries' products at every mini-batch boundary
//   would save more arithmetic, but at these sizes the extra BLAS calls cost more than they save.
inline int key_cols(int S, int K) { return ((S - 1) / K) * K; }
inline int query_split(int S, int K) { return (S / 2 / K) * K; }

// how many leading columns of row t of a [2S, S] matrix are read
inline int row_cols(int t, int S, int K) {
  const int sp = query_split(S, K);
  return t < sp ? sp : t < S ? S : (t - S < K ? 0 : key_cols(S, K));
}

// The queries' products. A is a queries' [S, S] block (rows [0, sp) zero past column sp).
// C[S, n] = alpha A B + beta C
template <typename T>
void gemm_q(int S, int sp, int n, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C, int ldc) {
  gemm<T>(false, false, sp, n, sp, alpha, A, lda, B, ldb, beta, C, ldc);
  gemm<T>(false, false, S - sp, n, S, alpha, A + sp * lda, lda, B, ldb, beta, C + sp * ldc, ldc);
}
// C[S, n] = alpha A^T B + beta C
template <typename T>
void gemm_qt(int S, int sp, int n, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C, int ldc) {
  gemm<T>(true, false, sp, n, S, alpha, A, lda, B, ldb, beta, C, ldc);
  gemm<T>(true, false, S - sp, n, S - sp, alpha, A + sp * lda + sp, lda, B + sp * ldb, ldb, beta, C + sp * ldc, ldc);
}
// A = alpha X Y^T (X [S, k], Y [S, k]), only where a queries' block is read
template <typename T>
void gemm_q_nt(int S, int sp, int k, T alpha, const T* X, int ldx, const T* Y, int ldy, T* A, int lda) {
  gemm<T>(false, true, sp, sp, k, alpha, X, ldx, Y, ldy, T(0), A, lda);
  gemm<T>(false, true, S - sp, S, k, alpha, X + sp * ldx, ldx, Y, ldy, T(0), A + sp * lda, lda);
}

// a = (gram + 1) * mqk, where it is read: all 2S rows, or the queries' S (coefficients_q)
template <typename T>
void coefficients(const T* gram, const T* mqk, T* a, int S, int K, int rows = -1) {
  for (int t = 0; t < (rows < 0 ? 2 * S : rows); ++t) {
    const int n = row_cols(t, S, K);
#pragma omp simd
    for (int j = 0; j < n; ++j) a[t * S + j] = (gram[t * S + j] + T(1)) * mqk[t * S + j];
  }
}
template <typename T>
void coefficients_q(const T* gram, const T* mqk, T* a, int S, int K) { coefficients(gram, mqk, a, S, K, S); }

// The inner loss's gradient for one token: with zh = LN(z) (no affine), go = bt + zh * gamma2,
// g = rstd (go - mean(go) - zh mean(go zh)) (a LayerNorm backward). Writes zh and g, returns rstd.
template <typename T>
inline T ln_l2_row(const T* z, const T* bt, const T* g2, T eps, int d, T* zh, T* g) {
  const T inv_d = T(1) / d, mean = row_sum(z, d) * inv_d;
  T var = 0;
#pragma omp simd reduction(+ : var)
  for (int c = 0; c < d; ++c) var += (z[c] - mean) * (z[c] - mean);
  const T rstd = T(1) / std::sqrt(var * inv_d + eps);
  T mg = 0, mgz = 0;
#pragma omp simd reduction(+ : mg, mgz)
  for (int c = 0; c < d; ++c) {
    const T h = (z[c] - mean) * rstd, go = bt[c] + h * g2[c];
    zh[c] = h;
    mg += go;
    mgz += go * h;
  }
  mg *= inv_d;
  mgz *= inv_d;
#pragma omp simd
  for (int c = 0; c < d; ++c) g[c] = rstd * (bt[c] + zh[c] * g2[c] - mg - zh[c] * mgz);
  return rstd;
}

// Its vector-Jacobian product: given dgrad = l * dl (the gradient reaching g), writes dz and
// dbt and adds dbt * zh to dgamma2.
template <typename T>
inline void ln_l2_vjp_row(const T* dl, T l, const T* g, const T* zh, T rstd, const T* bt, const T* g2, int d, T* dz,
                          T* dbt, T* dgamma2) {
  const T inv_d = T(1) / d;
  T sg = 0, sgz = 0, m2 = 0, c_ = 0;
#pragma omp simd reduction(+ : sg, sgz, m2, c_)
  for (int c = 0; c < d; ++c) {
    const T dgr = dl[c] * l;
    sg += dgr;
    sgz += dgr * zh[c];
    m2 += (bt[c] + zh[c] * g2[c]) * zh[c];
    c_ += dgr * g[c];
  }
  const T uz = sgz * rstd, cc = c_ * rstd;
  sg *= inv_d;
  sgz *= inv_d;
  T sh = 0, shz = 0;
#pragma omp simd reduction(+ : sh, shz)
  for (int c = 0; c < d; ++c) {
    const T dgr = dl[c] * l, db_ = rstd * (dgr - sg - zh[c] * sgz);
    dbt[c] = db_;
    const T dzh = db_ * g2[c] - inv_d * (dgr * rstd * m2 + (bt[c] + zh[c] * g2[c]) * uz);
    dz[c] = dzh;  // the LayerNorm backward of dzh below
    sh += dzh;
    shz += dzh * zh[c];
  }
  sh *= inv_d;
  shz *= inv_d;
#pragma omp simd
  for (int c = 0; c < d; ++c) {
    dz[c] = rstd * (dz[c] - sh - zh[c] * shz) - inv_d * zh[c] * cc;
    dgamma2[c] += dbt[c] * zh[c];
  }
}

// Gradient of the token scales s from p = dR X^T (the gradient of the coefficients before the
// masks) and the Gram matrix, over rows [t0, t1) of a [2S, S] pair: query t reads key j with
// s_{t mod K} in its own mini-batch and s_{K-1} for earlier ones; the keys of later
// mini-batches read with s_{K-1}.
template <typename T>
inline void scale_grad(const T* p, const T* gram, int t0, int t1, int S, int K, T* ds) {
  for (int t = t0; t < t1; ++t) {
    const int tt = t < S ? t : t - S, mt = tt / K;
    const T *pr = p + t * S, *gr = gram + t * S;
    T earlier = 0;
    for (int j = 0; j < mt * K; ++j) earlier -= pr[j] * (gr[j] + T(1));
    ds[K - 1] += earlier;
    if (t < S) {
      T same = 0;
      for (int j = mt * K; j <= t; ++j) same -= pr[j] * (gr[j] + T(1));
      ds[t % K] += same;
    }
  }
}

// The weights after a block's `full` tokens, W - s_last x^T LG and b - s_last sum(LG) (x [., d]
// the keys, LG [., w]): given their gradients dWe [d, w], dbe [w] (null if unused), adds their
// share to dLG and returns the last token scale's (tmp: [full, w] scratch).
template <typename T>
T step_backward(const T* x, const T* lg, int w, const T* dWe, const T* dbe, int full, T s_last, int d, T* tmp,
                T* dLG) {
  T ds_last = 0;
  if (!full || (!dWe && !dbe)) return ds_last;
  for (int r = 0; r < full; ++r)
    for (int c = 0; c < w; ++c) tmp[r * w + c] = dbe ? dbe[c] : T(0);
  if (dWe) gemm<T>(false, false, full, w, d, 1, x, d, dWe, w, 1, tmp, w);
  for (int i = 0; i < full * w; ++i) {
    dLG[i] -= s_last * tmp[i];
    ds_last -= tmp[i] * lg[i];
  }
  return ds_last;
}

// The backward of both blocks' dual-form read-out of their (first) layer, R = base - ((gram + 1)
// * mqk) @ LG with base = q W + b (q [2S, d]: queries then keys x, W [d, w], LG [S, w],
// gram = q x^T), given dR [2S, w], the gradient reaching R (the keys' rows filled by the scan),
// and the gradients dWe [d, w], dbe [w] of the weights after the block's `full` tokens (null if
// unused). Writes dq [2S, d] and dW [d, w], adds to db [w] and to the token scales' ds (all but
// the last scale's term through dWe/dbe, which the scan adds); p [2S, S] is scratch.
template <typename T>
void readout_backward(const T* dR, const T* q, const T* W, const T* lg, int w, const T* gram, const T* mqk,
                      const T* dWe, const T* dbe, int full, T s_last, int S, int K, int d, T* p, T* ds, T* dq, T* dW,
                      T* db) {
  const int ck = key_cols(S, K), kr = std::min(K, S), sp = query_split(S, K);
  const T* x = q + S * d;
  gemm<T>(false, true, 2 * S, d, w, 1, dR, w, W, w, 0, dq, d);
  gemm<T>(true, false, d, w, 2 * S, 1, q, d, dR, w, 0, dW, w);
  for (int t = 0; t < 2 * S; ++t)
#pragma omp simd
    for (int c = 0; c < w; ++c) db[c] += dR[t * w + c];
  gemm_q_nt<T>(S, sp, w, 1, dR, w, lg, w, p, S);  // p = dR LG^T, where it is read
  gemm<T>(false, true, S - kr, ck, w, 1, dR + (S + kr) * w, w, lg, w, 0, p + (S + kr) * S, S);
  scale_grad(p, gram, 0, 2 * S, S, K, ds);
  for (int t = 0; t < 2 * S; ++t) {  // p * mqk: the gradient of the Gram matrix
    const int n = row_cols(t, S, K);
#pragma omp simd
    for (int j = 0; j < n; ++j) p[t * S + j] *= mqk[t * S + j];
  }
  const T* pk = p + S * S;  // through the Gram matrix to queries and keys
  gemm_q<T>(S, sp, d, -1, p, S, x, d, 1, dq, d);
  gemm<T>(false, false, S - kr, d, ck, -1, pk + kr * S, S, x, d, 1, dq + (S + kr) * d, d);
  gemm_qt<T>(S, sp, d, -1, p, S, q, d, 1, dq + S * d, d);
  gemm<T>(true, false, ck, d, S - kr, -1, pk + kr * S, S, x + kr * d, d, 1, dq + S * d, d);
  if (dWe) {  // the weights after the block read the keys of its full mini-batches
    if (full) gemm<T>(false, true, full, d, w, -s_last, lg, w, dWe, w, 1, dq + S * d, d);
    for (int i = 0; i < d * w; ++i) dW[i] += dWe[i];
  }
  if (dbe)
    for (int c = 0; c < w; ++c) db[c] += dbe[c];
}

template <typename T>
std::vector<torch::Tensor> forward_impl(const torch::Tensor& qx, const torch::Tensor& bt, const torch::Tensor& lr,
                                        const torch::Tensor& mqk, double s_last_, const torch::Tensor& gamma2,
                                        const torch::Tensor& W, const torch::Tensor& b, int64_t K_, double eps_) {
  const int N = qx.size(0), S = qx.size(1) / 2, d = qx.size(2), K = K_;
  const int ck = key_cols(S, K), kr = std::min(K, S), sp = query_split(S, K);
  const int full = (S / K) * K;
  const T s_last = s_last_, eps = eps_;
  auto opt = qx.options();
  auto out = torch::empty({N, S, d}, opt), W1 = torch::empty({N, d, d}, opt), b1 = torch::empty({N, 1, d}, opt);
  auto LG = torch::empty({N, S, d}, opt), gram = torch::empty({N, 2 * S, S}, opt);
  auto ZH = torch::empty({N, S, d}, opt), RSTD = torch::empty({N, S}, opt), G = torch::empty({N, S, d}, opt);
  const T *pq = qx.data_ptr<T>(), *pbt = bt.data_ptr<T>(), *plr = lr.data_ptr<T>(), *pm = mqk.data_ptr<T>(),
          *pg2 = gamma2.data_ptr<T>(), *pW = W.data_ptr<T>(), *pb = b.data_ptr<T>();
  T *po = out.data_ptr<T>(), *pW1 = W1.data_ptr<T>(), *pb1 = b1.data_ptr<T>(), *pLG = LG.data_ptr<T>(),
    *pgr = gram.data_ptr<T>(), *pZH = ZH.data_ptr<T>(), *pR = RSTD.data_ptr<T>(), *pG = G.data_ptr<T>();
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<T> base(2 * S * d), a(2 * S * S);
    for (int64_t n = n0; n < n1; ++n) {
      const T *q = pq + n * 2 * S * d, *x = q + S * d, *btn = pbt + n * S * d, *lrn = plr + n * S,
              *g2 = pg2 + n * d, *Wn = pW + n * d * d, *bn = pb + n * d;
      T *lg = pLG + n * S * d, *gr = pgr + n * 2 * S * S, *zh = pZH + n * S * d, *rs = pR + n * S,
        *gg = pG + n * S * d, *o = po + n * S * d, *W1n = pW1 + n * d * d, *b1n = pb1 + n * d;
      // f(XQ), f(XK) at the block's start; the Gram matrix; the coefficients
      for (int t = 0; t < 2 * S; ++t) std::copy(bn, bn + d, base.data() + t * d);
      gemm<T>(false, false, 2 * S, d, d, 1, q, d, Wn, d, 1, base.data(), d);
      gemm_q_nt<T>(S, sp, d, 1, q, d, x, d, gr, S);  // the Gram matrix: queries, then keys
      gemm<T>(false, true, S - kr, ck, d, 1, x + kr * d, d, x, d, 0, gr + (S + kr) * S, S);
      coefficients(gr, pm, a.data(), S, K);
      const T* ak = a.data() + S * S;
      T* zk = base.data() + S * d;  // the keys' inner outputs, completed mini-batch by mini-batch
      for (int i = 0; i < S; i += K) {
        const int e = std::min(S, i + K);
        gemm<T>(false, false, e - i, d, i, -1, ak + i * S, S, lg, d, 1, zk + i * d, d);
        for (int r = i; r < e; ++r) {  // the inner loss's gradient: a LayerNorm backward
          rs[r] = ln_l2_row(zk + r * d, btn + r * d, g2, eps, d, zh + r * d, gg + r * d);
#pragma omp simd
          for (int c = 0; c < d; ++c) lg[r * d + c] = lrn[r] * gg[r * d + c];
        }
      }
      std::copy(base.data(), base.data() + S * d, o);
      gemm_q<T>(S, sp, d, -1, a.data(), S, lg, d, 1, o, d);
      std::copy(Wn, Wn + d * d, W1n);
      std::copy(bn, bn + d, b1n);
      if (full) {  // the step after the block's full mini-batches, with the last token's scale
        gemm<T>(true, false, d, d, full, -s_last, x, d, lg, d, 1, W1n, d);
        for (int r = 0; r < full; ++r)
#pragma omp simd
          for (int c = 0; c < d; ++c) b1n[c] -= s_last * lg[r * d + c];
      }
    }
  });
  return {out, W1, b1, LG, gram, ZH, RSTD, G};
}

template <typename T>
std::vector<torch::Tensor> backward_impl(const torch::Tensor& dout, const torch::Tensor& dW1, const torch::Tensor& db1,
                                         const torch::Tensor& qx, const torch::Tensor& bt, const torch::Tensor& lr,
                                         const torch::Tensor& mqk, double s_last_, const torch::Tensor& gamma2,
                                         const torch::Tensor& W, const torch::Tensor& LG, const torch::Tensor& gram,
                                         const torch::Tensor& ZH, const torch::Tensor& RSTD, const torch::Tensor& G,
                                         int64_t K_) {
  const int N = qx.size(0), S = qx.size(1) / 2, d = qx.size(2), K = K_;
  const int sp = query_split(S, K);
  const int full = (S / K) * K;
  const T s_last = s_last_;
  const bool has_dW1 = dW1.defined(), has_db1 = db1.defined();
  auto opt = qx.options();
  auto dqx = torch::empty({N, 2 * S, d}, opt), dbt = torch::empty({N, S, d}, opt), dlr = torch::empty({N, S}, opt);
  auto ds = torch::zeros({N, K}, opt), dgamma2 = torch::zeros({N, 1, d}, opt);
  auto dW = torch::empty({N, d, d}, opt), db = torch::zeros({N, 1, d}, opt);
  const T *pdo = dout.data_ptr<T>(), *pdW1 = has_dW1 ? dW1.data_ptr<T>() : nullptr,
          *pdb1 = has_db1 ? db1.data_ptr<T>() : nullptr, *pq = qx.data_ptr<T>(), *pbt = bt.data_ptr<T>(),
          *plr = lr.data_ptr<T>(), *pm = mqk.data_ptr<T>(), *pg2 = gamma2.data_ptr<T>(), *pW = W.data_ptr<T>(),
          *pLG = LG.data_ptr<T>(), *pgr = gram.data_ptr<T>(), *pZH = ZH.data_ptr<T>(), *pR = RSTD.data_ptr<T>(),
          *pG = G.data_ptr<T>();
  T *pdq = dqx.data_ptr<T>(), *pdbt = dbt.data_ptr<T>(), *pdlr = dlr.data_ptr<T>(), *pds = ds.data_ptr<T>(),
    *pdg2 = dgamma2.data_ptr<T>(), *pdW = dW.data_ptr<T>(), *pdb = db.data_ptr<T>();
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<T> a(2 * S * S), dR(2 * S * d), dLG(S * d), p(2 * S * S), t1(std::max(full, 1) * d);
    for (int64_t n = n0; n < n1; ++n) {
      const T *q = pq + n * 2 * S * d, *x = q + S * d, *btn = pbt + n * S * d, *lrn = plr + n * S,
              *g2 = pg2 + n * d, *Wn = pW + n * d * d, *lg = pLG + n * S * d, *gr = pgr + n * 2 * S * S,
              *zh = pZH + n * S * d, *rs = pR + n * S, *gg = pG + n * S * d, *don = pdo + n * S * d;
      T *dq = pdq + n * 2 * S * d, *dbtn = pdbt + n * S * d, *dlrn = pdlr + n * S, *dsn = pds + n * K,
        *dg2 = pdg2 + n * d, *dWn = pdW + n * d * d, *dbn = pdb + n * d;
      coefficients(gr, pm, a.data(), S, K);
      const T* ak = a.data() + S * S;
      std::copy(don, don + S * d, dR.data());
      // the gradient reaching LG directly: through the query outputs and the weights after the block
      gemm_qt<T>(S, sp, d, -1, a.data(), S, dR.data(), d, 0, dLG.data(), d);
      T ds_last = step_backward(x, lg, d, has_dW1 ? pdW1 + n * d * d : nullptr, has_db1 ? pdb1 + n * d : nullptr,
                                full, s_last, d, t1.data(), dLG.data());
      // reverse scan: the keys of a mini-batch also feed the inner gradients of later ones
      for (int i = ((S - 1) / K) * K; i >= 0; i -= K) {
        const int e = std::min(S, i + K);
        if (e < S)
          gemm<T>(true, false, e - i, d, S - e, -1, ak + e * S + i, S, dR.data() + (S + e) * d, d, 1,
                  dLG.data() + i * d, d);
        for (int r = i; r < e; ++r) {
          dlrn[r] = row_dot(dLG.data() + r * d, gg + r * d, d);
          ln_l2_vjp_row(dLG.data() + r * d, lrn[r], gg + r * d, zh + r * d, rs[r], btn + r * d, g2, d,
                        dR.data() + (S + r) * d, dbtn + r * d, dg2);
        }
      }
      readout_backward(dR.data(), q, Wn, lg, d, gr, pm, has_dW1 ? pdW1 + n * d * d : nullptr,
                       has_db1 ? pdb1 + n * d : nullptr, full, s_last, S, K, d, p.data(), dsn, dq, dWn, dbn);
      dsn[K - 1] += ds_last;
    }
  });
  return {dqx, dbt, dlr, ds.sum(0), dgamma2, dW, db};
}

// ---------------------------------------------------------------------------------------
// TTT-MLP: f(x) = gelu(x W1 + b1) W2 + b2, W1 [d, h], W2 [h, d] (MLPBlock in model.py). The
// first layer is in dual form across the block, the second is carried explicitly through
// its mini-batches (W2S keeps the weights each mini-batch started from for the backward).

constexpr double GELU_C = 0.7978845608028654, GELU_A = 0.044715;  // sqrt(2 / pi), tanh-GELU's cubic term

// gelu(z) = z sigmoid(2u), u = c (z + a z^3) (= the tanh form). gelu_sigmoid writes
// sigmoid(2u) with torch's vectorized sigmoid (a scalar exp per element would cost more than
// all the products); the rest is computed from it.
template <typename T>
void gelu_sigmoid(const T* z, int n, T* sg) {
  const T c2 = 2 * GELU_C, a = GELU_A;
#pragma omp simd
  for (int i = 0; i < n; ++i) sg[i] = c2 * z[i] * (1 + a * z[i] * z[i]);
  torch::from_blob(sg, {n}, torch::CppTypeToScalarType<T>::value).sigmoid_();
}

// gelu(z) into y and gelu'(z) = sg + 2 sg (1 - sg) u' z into dy (either may be null)
template <typename T>
void gelu_from(const T* z, const T* sg, int n, T* y, T* dy) {
  const T c = GELU_C, a = GELU_A;
  if (y)
#pragma omp simd
    for (int i = 0; i < n; ++i) y[i] = z[i] * sg[i];
  if (dy)
#pragma omp simd
    for (int i = 0; i < n; ++i) dy[i] = sg[i] + 2 * sg[i] * (1 - sg[i]) * c * (1 + 3 * a * z[i] * z[i]) * z[i];
}

// gelu''(z) = (1 - t^2) (u' + 3 a c z^2 - z t u'^2), t = 2 sg - 1
template <typename T>
inline T gelu_second(T z, T sg) {
  const T c = GELU_C, a = GELU_A, z2 = z * z, up = c * (1 + 3 * a * z2), t = 2 * sg - 1;
  return (1 - t * t) * (up + 3 * c * a * z2 - z * t * up * up);
}

template <typename T>
std::vector<torch::Tensor> mlp_forward_impl(const torch::Tensor& qx, const torch::Tensor& bt, const torch::Tensor& lr,
                                            const torch::Tensor& mqk, double s_last_, const torch::Tensor& gamma2,
                                            const torch::Tensor& W1, const torch::Tensor& b1, const torch::Tensor& W2,
                                            const torch::Tensor& b2, int64_t K_, double eps_) {
  const int N = qx.size(0), S = qx.size(1) / 2, d = qx.size(2), h = W1.size(2), K = K_;
  const int ck = key_cols(S, K), kr = std::min(K, S), sp = query_split(S, K);
  const int full = (S / K) * K, nb = (S + K - 1) / K;
  const T s_last = s_last_, eps = eps_;
  auto opt = qx.options();
  auto out = torch::empty({N, S, d}, opt), W1o = torch::empty({N, d, h}, opt), b1o = torch::empty({N, 1, h}, opt);
  auto W2o = torch::empty({N, h, d}, opt), b2o = torch::empty({N, 1, d}, opt);
  auto LG1 = torch::empty({N, S, h}, opt), LG2 = torch::empty({N, S, d}, opt), X2 = torch::empty({N, S, h}, opt);
  auto gram = torch::empty({N, 2 * S, S}, opt), Z1Q = torch::empty({N, S, h}, opt), GRAM2 = torch::empty({N, S, S}, opt);
  auto Z1 = torch::empty({N, S, h}, opt), ZH = torch::empty({N, S, d}, opt), RSTD = torch::empty({N, S}, opt);
  auto G2 = torch::empty({N, S, d}, opt), HH = torch::empty({N, S, h}, opt), W2S = torch::empty({N, nb, h, d}, opt);
  auto SG = torch::empty({N, S, h}, opt), SGQ = torch::empty({N, S, h}, opt);  // sigmoid(2u) of z1 and z1q
  const T *pq = qx.data_ptr<T>(), *pbt = bt.data_ptr<T>(), *plr = lr.data_ptr<T>(), *pm = mqk.data_ptr<T>(),
          *pg2 = gamma2.data_ptr<T>(), *pW1 = W1.data_ptr<T>(), *pb1 = b1.data_ptr<T>(), *pW2 = W2.data_ptr<T>(),
          *pb2 = b2.data_ptr<T>();
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<T> base(2 * S * h), a(2 * S * S), dx2(K * h), z2(K * d), b2n(d), x2q(S * h);
    for (int64_t n = n0; n < n1; ++n) {
      const T *q = pq + n * 2 * S * d, *x = q + S * d, *btn = pbt + n * S * d, *lrn = plr + n * S,
              *g2 = pg2 + n * d, *W1n = pW1 + n * d * h, *b1n = pb1 + n * h, *W2n0 = pW2 + n * h * d;
      T *lg1 = LG1.data_ptr<T>() + n * S * h, *lg2 = LG2.data_ptr<T>() + n * S * d, *X2n = X2.data_ptr<T>() + n * S * h,
        *gr = gram.data_ptr<T>() + n * 2 * S * S, *z1q = Z1Q.data_ptr<T>() + n * S * h,
        *gr2 = GRAM2.data_ptr<T>() + n * S * S, *z1s = Z1.data_ptr<T>() + n * S * h, *zh = ZH.data_ptr<T>() + n * S * d,
        *rs = RSTD.data_ptr<T>() + n * S, *gg2 = G2.data_ptr<T>() + n * S * d, *hh = HH.data_ptr<T>() + n * S * h,
        *w2s = W2S.data_ptr<T>() + n * nb * h * d, *o = out.data_ptr<T>() + n * S * d,
        *W2c = W2o.data_ptr<T>() + n * h * d, *sgs = SG.data_ptr<T>() + n * S * h, *sgq = SGQ.data_ptr<T>() + n * S * h;
      // the first layer at the block's start, the Gram matrix, the coefficients
      for (int t = 0; t < 2 * S; ++t) std::copy(b1n, b1n + h, base.data() + t * h);
      gemm<T>(false, false, 2 * S, h, d, 1, q, d, W1n, h, 1, base.data(), h);
      gemm_q_nt<T>(S, sp, d, 1, q, d, x, d, gr, S);
      gemm<T>(false, true, S - kr, ck, d, 1, x + kr * d, d, x, d, 0, gr + (S + kr) * S, S);
      coefficients(gr, pm, a.data(), S, K);
      const T* ak = a.data() + S * S;
      std::copy(W2n0, W2n0 + h * d, W2c);  // the second layer, carried through the mini-batches
      std::copy(pb2 + n * d, pb2 + (n + 1) * d, b2n.data());
      for (int i = 0, mb = 0; i < S; i += K, ++mb) {
        const int e = std::min(S, i + K), m = e - i;
        T* z1 = z1s + i * h;
        std::copy(base.data() + (S + i) * h, base.data() + (S + e) * h, z1);
        gemm<T>(false, false, m, h, i, -1, ak + i * S, S, lg1, h, 1, z1, h);
        gelu_sigmoid(z1, m * h, sgs + i * h);
        gelu_from(z1, sgs + i * h, m * h, X2n + i * h, dx2.data());
        std::copy(W2c, W2c + h * d, w2s + mb * h * d);
        for (int r = 0; r < m; ++r) std::copy(b2n.begin(), b2n.end(), z2.data() + r * d);
        gemm<T>(false, false, m, d, h, 1, X2n + i * h, h, W2c, d, 1, z2.data(), d);
        for (int r = 0; r < m; ++r)
          rs[i + r] = ln_l2_row(z2.data() + r * d, btn + (i + r) * d, g2, eps, d, zh + (i + r) * d, gg2 + (i + r) * d);
        gemm<T>(false, true, m, h, d, 1, gg2 + i * d, d, W2c, d, 0, hh + i * h, h);  // g2 back through W2
        for (int r = 0; r < m; ++r) {
          const T l = lrn[i + r];
          for (int c = 0; c < h; ++c) lg1[(i + r) * h + c] = l * hh[(i + r) * h + c] * dx2[r * h + c];
          for (int c = 0; c < d; ++c) lg2[(i + r) * d + c] = l * gg2[(i + r) * d + c];
        }
        if (m == K) {  // a full mini-batch moves the second layer
          gemm<T>(true, false, h, d, m, -s_last, X2n + i * h, h, lg2 + i * d, d, 1, W2c, d);
          for (int r = i; r < e; ++r)
            for (int c = 0; c < d; ++c) b2n[c] -= s_last * lg2[r * d + c];
        }
      }
      std::copy(b2n.begin(), b2n.end(), b2o.data_ptr<T>() + n * d);
      // the queries read both layers in dual form from the block's starting weights
      std::copy(base.data(), base.data() + S * h, z1q);
      gemm_q<T>(S, sp, h, -1, a.data(), S, lg1, h, 1, z1q, h);
      gelu_sigmoid(z1q, S * h, sgq);
      gelu_from<T>(z1q, sgq, S * h, x2q.data(), nullptr);
      gemm_q_nt<T>(S, sp, h, 1, x2q.data(), h, X2n, h, gr2, S);
      for (int t = 0; t < S; ++t) std::copy(pb2 + n * d, pb2 + (n + 1) * d, o + t * d);
      coefficients_q(gr2, pm, a.data(), S, K);  // the first S rows now hold a2
      gemm<T>(false, false, S, d, h, 1, x2q.data(), h, W2n0, d, 1, o, d);
      gemm_q<T>(S, sp, d, -1, a.data(), S, lg2, d, 1, o, d);
      T *W1c = W1o.data_ptr<T>() + n * d * h, *b1c = b1o.data_ptr<T>() + n * h;
      std::copy(W1n, W1n + d * h, W1c);
      std::copy(b1n, b1n + h, b1c);
      if (full) {
        gemm<T>(true, false, d, h, full, -s_last, x, d, lg1, h, 1, W1c, h);
        for (int r = 0; r < full; ++r)
          for (int c = 0; c < h; ++c) b1c[c] -= s_last * lg1[r * h + c];
      }
    }
  });
  return {out, W1o, b1o, W2o, b2o, LG1, LG2, X2, gram, Z1Q, GRAM2, Z1, ZH, RSTD, G2, HH, W2S, SG, SGQ};
}

template <typename T>
std::vector<torch::Tensor> mlp_backward_impl(const std::vector<torch::Tensor>& grads, const torch::Tensor& qx,
                                             const torch::Tensor& bt, const torch::Tensor& lr,
                                             const torch::Tensor& mqk, double s_last_, const torch::Tensor& gamma2,
                                             const torch::Tensor& W1, const torch::Tensor& W2,
                                             const std::vector<torch::Tensor>& saved, int64_t K_) {
  const torch::Tensor &dout = grads[0], &dW1e = grads[1], &db1e = grads[2], &dW2e = grads[3], &db2e = grads[4];
  const torch::Tensor &LG1 = saved[0], &LG2 = saved[1], &X2 = saved[2], &gram = saved[3], &Z1Q = saved[4],
                      &GRAM2 = saved[5], &Z1 = saved[6], &ZH = saved[7], &RSTD = saved[8], &G2 = saved[9],
                      &HH = saved[10], &W2S = saved[11], &SG = saved[12], &SGQ = saved[13];
  const int N = qx.size(0), S = qx.size(1) / 2, d = qx.size(2), h = W1.size(2), K = K_;
  const int sp = query_split(S, K);
  const int full = (S / K) * K, nb = (S + K - 1) / K;
  const T s_last = s_last_;
  const bool has_dW1 = dW1e.defined(), has_db1 = db1e.defined(), has_dW2 = dW2e.defined(), has_db2 = db2e.defined();
  auto opt = qx.options();
  auto dqx = torch::empty({N, 2 * S, d}, opt), dbt = torch::empty({N, S, d}, opt), dlr = torch::empty({N, S}, opt);
  auto ds = torch::zeros({N, K}, opt), dgamma2 = torch::zeros({N, 1, d}, opt);
  auto dW1 = torch::empty({N, d, h}, opt), db1 = torch::zeros({N, 1, h}, opt);
  auto dW2 = torch::empty({N, h, d}, opt), db2 = torch::zeros({N, 1, d}, opt);
  const T *pq = qx.data_ptr<T>(), *pbt = bt.data_ptr<T>(), *plr = lr.data_ptr<T>(), *pm = mqk.data_ptr<T>(),
          *pg2 = gamma2.data_ptr<T>(), *pW1 = W1.data_ptr<T>(), *pW2 = W2.data_ptr<T>(), *pdo = dout.data_ptr<T>();
  const T *pdW1e = has_dW1 ? dW1e.data_ptr<T>() : nullptr, *pdb1e = has_db1 ? db1e.data_ptr<T>() : nullptr,
          *pdW2e = has_dW2 ? dW2e.data_ptr<T>() : nullptr, *pdb2e = has_db2 ? db2e.data_ptr<T>() : nullptr;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<T> a(2 * S * S), a2(S * S), x2q(S * h), dgq(S * h), dx2q(S * h), dLG2(S * d), p2(S * S),
        dX2(S * h), dLG1(S * h), dbase(2 * S * h), dW2c(h * d), db2c(d), t(std::max(K, full) * std::max(h, d)),
        dg2(K * d), dz2(K * d), dhh(K * h), dg1(K * h), d1(K * h), p(2 * S * S);
    for (int64_t n = n0; n < n1; ++n) {
      const T *q = pq + n * 2 * S * d, *x = q + S * d, *btn = pbt + n * S * d, *lrn = plr + n * S,
              *g2 = pg2 + n * d, *W1n = pW1 + n * d * h, *W2n = pW2 + n * h * d, *don = pdo + n * S * d;
      const T *lg1 = LG1.data_ptr<T>() + n * S * h, *lg2 = LG2.data_ptr<T>() + n * S * d,
              *X2n = X2.data_ptr<T>() + n * S * h, *gr = gram.data_ptr<T>() + n * 2 * S * S,
              *z1q = Z1Q.data_ptr<T>() + n * S * h, *gr2 = GRAM2.data_ptr<T>() + n * S * S,
              *z1s = Z1.data_ptr<T>() + n * S * h, *zh = ZH.data_ptr<T>() + n * S * d, *rs = RSTD.data_ptr<T>() + n * S,
              *gg2 = G2.data_ptr<T>() + n * S * d, *hh = HH.data_ptr<T>() + n * S * h,
              *w2s = W2S.data_ptr<T>() + n * nb * h * d, *sgs = SG.data_ptr<T>() + n * S * h,
              *sgq = SGQ.data_ptr<T>() + n * S * h;
      T *dq = dqx.data_ptr<T>() + n * 2 * S * d, *dbtn = dbt.data_ptr<T>() + n * S * d, *dlrn = dlr.data_ptr<T>() + n * S,
        *dsn = ds.data_ptr<T>() + n * K, *dg2n = dgamma2.data_ptr<T>() + n * d, *dW1n = dW1.data_ptr<T>() + n * d * h,
        *db1n = db1.data_ptr<T>() + n * h, *dW2n = dW2.data_ptr<T>() + n * h * d, *db2n = db2.data_ptr<T>() + n * d;
      coefficients(gr, pm, a.data(), S, K);
      const T* ak = a.data() + S * S;
      gelu_from(z1q, sgq, S * h, x2q.data(), dgq.data());
      coefficients_q(gr2, pm, a2.data(), S, K);
      // the queries' second layer: out = x2q W2 + b2 - ((x2q X2^T + 1) * mq) @ LG2
      gemm<T>(false, true, S, h, d, 1, don, d, W2n, d, 0, dx2q.data(), h);
      gemm<T>(true, false, h, d, S, 1, x2q.data(), h, don, d, 0, dW2n, d);
      for (int r = 0; r < S; ++r)
        for (int c = 0; c < d; ++c) db2n[c] += don[r * d + c];
      gemm_qt<T>(S, sp, d, -1, a2.data(), S, don, d, 0, dLG2.data(), d);
      gemm_q_nt<T>(S, sp, d, 1, don, d, lg2, d, p2.data(), S);
      scale_grad(p2.data(), gr2, 0, S, S, K, dsn);
      for (int t_ = 0; t_ < S; ++t_)  // d gram2
        for (int j = 0, nc = row_cols(t_, S, K); j < nc; ++j) p2[t_ * S + j] *= pm[t_ * S + j];
      gemm_q<T>(S, sp, h, -1, p2.data(), S, X2n, h, 1, dx2q.data(), h);
      gemm_qt<T>(S, sp, h, -1, p2.data(), S, x2q.data(), h, 0, dX2.data(), h);
      // the queries' first layer: z1q = base_q - a_q @ LG1
      for (int i = 0; i < S * h; ++i) dbase[i] = dx2q[i] * dgq[i];
      gemm_qt<T>(S, sp, h, -1, a.data(), S, dbase.data(), h, 0, dLG1.data(), h);
      // the first layer's weights after the block
      T ds_last = step_backward(x, lg1, h, has_dW1 ? pdW1e + n * d * h : nullptr, has_db1 ? pdb1e + n * h : nullptr,
                                full, s_last, d, t.data(), dLG1.data());
      // reverse scan through the keys' mini-batches
      if (has_dW2) std::copy(pdW2e + n * h * d, pdW2e + (n + 1) * h * d, dW2c.begin());
      else std::fill(dW2c.begin(), dW2c.end(), T(0));
      if (has_db2) std::copy(pdb2e + n * d, pdb2e + (n + 1) * d, db2c.begin());
      else std::fill(db2c.begin(), db2c.end(), T(0));
      for (int mb = nb - 1; mb >= 0; --mb) {
        const int i = mb * K, e = std::min(S, i + K), m = e - i;
        const T *x2 = X2n + i * h, *l2 = lg2 + i * d, *w2 = w2s + mb * h * d, *z1 = z1s + i * h, *hhn = hh + i * h;
        T *dx2 = dX2.data() + i * h, *dlg2 = dLG2.data() + i * d, *dlg1 = dLG1.data() + i * h;
        if (m == K) {  // W2_{n+1} = W2_n - s x2^T lg2, b2_{n+1} = b2_n - s sum(lg2)
          gemm<T>(false, true, m, h, d, -s_last, l2, d, dW2c.data(), d, 1, dx2, h);
          for (int r = 0; r < m; ++r) std::copy(db2c.begin(), db2c.end(), t.data() + r * d);
          gemm<T>(false, false, m, d, h, 1, x2, h, dW2c.data(), d, 1, t.data(), d);
          for (int r = 0; r < m * d; ++r) {
            dlg2[r] -= s_last * t[r];
            ds_last -= t[r] * l2[r];
          }
        }
        if (e < S) gemm<T>(true, false, m, h, S - e, -1, ak + e * S + i, S, dbase.data() + (S + e) * h, h, 1, dlg1, h);
        const T* sg1 = sgs + i * h;
        gelu_from<T>(z1, sg1, m * h, nullptr, d1.data());
        for (int r = 0; r < m; ++r) {
          const T l = lrn[i + r];
          T acc = row_dot(dlg2 + r * d, gg2 + (i + r) * d, d);
          for (int c = 0; c < h; ++c) {
            const int k = r * h + c;
            acc += dlg1[k] * hhn[k] * d1[k];
            dg1[k] = dlg1[k] * l;
            dhh[k] = dg1[k] * d1[k];
          }
          dlrn[i + r] = acc;
          for (int c = 0; c < d; ++c) dg2[r * d + c] = dlg2[r * d + c] * l;
        }
        gemm<T>(false, false, m, d, h, 1, dhh.data(), h, w2, d, 1, dg2.data(), d);
        gemm<T>(true, false, h, d, m, 1, dhh.data(), h, gg2 + i * d, d, 1, dW2c.data(), d);
        for (int r = 0; r < m; ++r)
          ln_l2_vjp_row(dg2.data() + r * d, T(1), gg2 + (i + r) * d, zh + (i + r) * d, rs[i + r], btn + (i + r) * d, g2,
                        d, dz2.data() + r * d, dbtn + (i + r) * d, dg2n);
        gemm<T>(false, true, m, h, d, 1, dz2.data(), d, w2, d, 1, dx2, h);
        gemm<T>(true, false, h, d, m, 1, x2, h, dz2.data(), d, 1, dW2c.data(), d);
        for (int r = 0; r < m; ++r)
          for (int c = 0; c < d; ++c) db2c[c] += dz2[r * d + c];
        for (int r = 0; r < m; ++r)
          for (int c = 0; c < h; ++c) {
            const int k = r * h + c;
            dbase[(S + i + r) * h + c] = dx2[k] * d1[k] + dg1[k] * hhn[k] * gelu_second(z1[k], sg1[k]);
          }
      }
      for (int i = 0; i < h * d; ++i) dW2n[i] += dW2c[i];
      for (int c = 0; c < d; ++c) db2n[c] += db2c[c];
      // the first layer: base = qx W1 + b1, read out as base - ((gram + 1) * m) @ LG1
      readout_backward(dbase.data(), q, W1n, lg1, h, gr, pm, has_dW1 ? pdW1e + n * d * h : nullptr,
                       has_db1 ? pdb1e + n * h : nullptr, full, s_last, S, K, d, p.data(), dsn, dq, dW1n, db1n);
      dsn[K - 1] += ds_last;
    }
  });
  return {dqx, dbt, dlr, ds.sum(0), dgamma2, dW1, db1, dW2, db2};
}

std::vector<torch::Tensor> mlp_forward(torch::Tensor qx, torch::Tensor bt, torch::Tensor lr, torch::Tensor mqk,
                                       double s_last, torch::Tensor gamma2, torch::Tensor W1, torch::Tensor b1,
                                       torch::Tensor W2, torch::Tensor b2, int64_t K, double eps) {
  if (qx.scalar_type() == torch::kDouble)
    return mlp_forward_impl<double>(qx, bt, lr, mqk, s_last, gamma2, W1, b1, W2, b2, K, eps);
  TORCH_CHECK(qx.scalar_type() == torch::kFloat, "TTT-MLP CPU kernel: float32 or float64 only");
  return mlp_forward_impl<float>(qx, bt, lr, mqk, s_last, gamma2, W1, b1, W2, b2, K, eps);
}

std::vector<torch::Tensor> mlp_backward(std::vector<c10::optional<torch::Tensor>> grads, torch::Tensor qx,
                                        torch::Tensor bt, torch::Tensor lr, torch::Tensor mqk, double s_last,
                                        torch::Tensor gamma2, torch::Tensor W1, torch::Tensor W2,
                                        std::vector<torch::Tensor> saved, int64_t K) {
  std::vector<torch::Tensor> g;
  for (auto& t : grads) g.push_back(t.has_value() ? t->contiguous() : torch::Tensor());
  if (qx.scalar_type() == torch::kDouble)
    return mlp_backward_impl<double>(g, qx, bt, lr, mqk, s_last, gamma2, W1, W2, saved, K);
  return mlp_backward_impl<float>(g, qx, bt, lr, mqk, s_last, gamma2, W1, W2, saved, K);
}

std::vector<torch::Tensor> forward(torch::Tensor qx, torch::Tensor bt, torch::Tensor lr, torch::Tensor mqk,
                                   double s_last, torch::Tensor gamma2, torch::Tensor W, torch::Tensor b, int64_t K,
                                   double eps) {
  if (qx.scalar_type() == torch::kDouble) return forward_impl<double>(qx, bt, lr, mqk, s_last, gamma2, W, b, K, eps);
  TORCH_CHECK(qx.scalar_type() == torch::kFloat, "TTT-Linear CPU kernel: float32 or float64 only");
  return forward_impl<float>(qx, bt, lr, mqk, s_last, gamma2, W, b, K, eps);
}

std::vector<torch::Tensor> backward(torch::Tensor dout, c10::optional<torch::Tensor> dW1,
                                    c10::optional<torch::Tensor> db1, torch::Tensor qx, torch::Tensor bt,
                                    torch::Tensor lr, torch::Tensor mqk, double s_last, torch::Tensor gamma2,
                                    torch::Tensor W, torch::Tensor LG, torch::Tensor gram, torch::Tensor ZH,
                                    torch::Tensor RSTD, torch::Tensor G, int64_t K) {
  const torch::Tensor w1 = dW1.has_value() ? dW1->contiguous() : torch::Tensor();
  const torch::Tensor b1 = db1.has_value() ? db1->contiguous() : torch::Tensor();
  if (qx.scalar_type() == torch::kDouble)
    return backward_impl<double>(dout, w1, b1, qx, bt, lr, mqk, s_last, gamma2, W, LG, gram, ZH, RSTD, G, K);
  return backward_impl<float>(dout, w1, b1, qx, bt, lr, mqk, s_last, gamma2, W, LG, gram, ZH, RSTD, G, K);
}

}  // namespace

namespace lengen_glue {  // glue.cpp: the layer's QKV and Readout functions
using torch::Tensor;
std::vector<Tensor> qkv_forward(Tensor P, Tensor rot, Tensor lr_bias, int64_t H, double scale);
std::vector<Tensor> qkv_backward(c10::optional<Tensor> dqx, c10::optional<Tensor> dq, c10::optional<Tensor> dtgt,
                                 c10::optional<Tensor> dlr, Tensor rot, Tensor sig, double scale, int64_t H);
std::vector<Tensor> readout_forward(Tensor z, Tensor q, Tensor w, Tensor b, Tensor pw, Tensor pb, double eps,
                                    double post_eps);
std::vector<Tensor> readout_backward(Tensor dout, Tensor z, Tensor w, Tensor pw, Tensor y, Tensor mean, Tensor rstd,
                                     Tensor pmean, Tensor prstd);
}  // namespace lengen_glue

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "TTT-Linear dual-form block, forward");
  m.def("backward", &backward, "TTT-Linear dual-form block, backward");
  m.def("mlp_forward", &mlp_forward, "TTT-MLP dual-form block, forward");
  m.def("mlp_backward", &mlp_backward, "TTT-MLP dual-form block, backward");
  m.def("qkv_forward", &lengen_glue::qkv_forward, "TTT layer's projection split, RoPE, target, learning rates");
  m.def("qkv_backward", &lengen_glue::qkv_backward, "its backward");
  m.def("readout_forward", &lengen_glue::readout_forward, "TTT layer's inner LN, residual and post-norm");
  m.def("readout_backward", &lengen_glue::readout_backward, "its backward");
}
