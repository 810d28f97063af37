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

// Keys read only the keys of earlier mini-batches, so the keys' rows of every [2S, S] matrix
// are zero past column ck = K * (number of full mini-batches before the last one): the
// products stop there and the rest of those rows is never written nor read. (Restricting the
// queries' rows to their causal blocks as well would save more arithmetic, but at these sizes
// the extra BLAS calls cost more than they save.)
inline int key_cols(int S, int K) { return ((S - 1) / K) * K; }

// a = (gram + 1) * mqk, where it is read
template <typename T>
void coefficients(const T* gram, const T* mqk, T* a, int S, int K) {
  for (int t = 0; t < 2 * S; ++t) {
    const int n = t < S ? S : key_cols(S, K);
#pragma omp simd
    for (int j = 0; j < n; ++j) a[t * S + j] = (gram[t * S + j] + T(1)) * mqk[t * S + j];
  }
}

template <typename T>
std::vector<torch::Tensor> forward_impl(const torch::Tensor& qx, const torch::Tensor& bt, const torch::Tensor& lr,
                                        const torch::Tensor& mqk, double s_last_, const torch::Tensor& gamma2,
                                        const torch::Tensor& W, const torch::Tensor& b, int64_t K_, double eps_) {
  const int N = qx.size(0), S = qx.size(1) / 2, d = qx.size(2), K = K_, ck = key_cols(S, K);
  const int full = (S / K) * K;
  const T s_last = s_last_, eps = eps_, inv_d = T(1) / d;
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
      gemm<T>(false, true, S, S, d, 1, q, d, x, d, 0, gr, S);  // the Gram matrix: queries, then keys
      gemm<T>(false, true, S, ck, d, 1, x, d, x, d, 0, gr + S * S, S);
      coefficients(gr, pm, a.data(), S, K);
      const T* ak = a.data() + S * S;
      T* zk = base.data() + S * d;  // the keys' inner outputs, completed mini-batch by mini-batch
      for (int i = 0; i < S; i += K) {
        const int e = std::min(S, i + K);
        gemm<T>(false, false, e - i, d, i, -1, ak + i * S, S, lg, d, 1, zk + i * d, d);
        for (int r = i; r < e; ++r) {  // the inner loss's gradient: a LayerNorm backward
          const T *z = zk + r * d, *btr = btn + r * d;
          T *zhr = zh + r * d, *gr_ = gg + r * d, *lgr = lg + r * d;
          const T mean = row_sum(z, d) * inv_d;
          T var = 0;
#pragma omp simd reduction(+ : var)
          for (int c = 0; c < d; ++c) var += (z[c] - mean) * (z[c] - mean);
          const T rstd = T(1) / std::sqrt(var * inv_d + eps);
          T mg = 0, mgz = 0;
#pragma omp simd reduction(+ : mg, mgz)
          for (int c = 0; c < d; ++c) {
            const T h = (z[c] - mean) * rstd, go = btr[c] + h * g2[c];
            zhr[c] = h;
            mg += go;
            mgz += go * h;
          }
          mg *= inv_d;
          mgz *= inv_d;
          const T l = lrn[r];
#pragma omp simd
          for (int c = 0; c < d; ++c) {
            const T g = rstd * (btr[c] + zhr[c] * g2[c] - mg - zhr[c] * mgz);
            gr_[c] = g;
            lgr[c] = l * g;
          }
          rs[r] = rstd;
        }
      }
      std::copy(base.data(), base.data() + S * d, o);
      gemm<T>(false, false, S, d, S, -1, a.data(), S, lg, d, 1, o, d);
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
  const int N = qx.size(0), S = qx.size(1) / 2, d = qx.size(2), K = K_, ck = key_cols(S, K);
  const int full = (S / K) * K;
  const T s_last = s_last_, inv_d = T(1) / d;
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
      gemm<T>(true, false, S, d, S, -1, a.data(), S, dR.data(), d, 0, dLG.data(), d);
      T ds_last = 0;
      if (full && (has_dW1 || has_db1)) {
        for (int r = 0; r < full; ++r)
          for (int c = 0; c < d; ++c) t1[r * d + c] = has_db1 ? pdb1[n * d + c] : T(0);
        if (has_dW1) gemm<T>(false, false, full, d, d, 1, x, d, pdW1 + n * d * d, d, 1, t1.data(), d);
        for (int i = 0; i < full * d; ++i) {
          dLG[i] -= s_last * t1[i];
          ds_last -= t1[i] * lg[i];
        }
      }
      // reverse scan: the keys of a mini-batch also feed the inner gradients of later ones
      for (int i = ((S - 1) / K) * K; i >= 0; i -= K) {
        const int e = std::min(S, i + K);
        if (e < S)
          gemm<T>(true, false, e - i, d, S - e, -1, ak + e * S + i, S, dR.data() + (S + e) * d, d, 1,
                  dLG.data() + i * d, d);
        for (int r = i; r < e; ++r) {  // the vector-Jacobian product of the inner gradient
          const T *zhr = zh + r * d, *btr = btn + r * d, *gr_ = gg + r * d, *dlg = dLG.data() + r * d;
          T *dz = dR.data() + (S + r) * d, *dbr = dbtn + r * d;
          const T rstd = rs[r], l = lrn[r];
          dlrn[r] = row_dot(dlg, gr_, d);
          T sg = 0, sgz = 0, m2 = 0, c_ = 0;
#pragma omp simd reduction(+ : sg, sgz, m2, c_)
          for (int c = 0; c < d; ++c) {
            const T dgr = dlg[c] * l;
            sg += dgr;
            sgz += dgr * zhr[c];
            m2 += (btr[c] + zhr[c] * g2[c]) * zhr[c];
            c_ += dgr * gr_[c];
          }
          const T uz = sgz * rstd, cc = c_ * rstd;
          sg *= inv_d;
          sgz *= inv_d;
          T sh = 0, shz = 0;
#pragma omp simd reduction(+ : sh, shz)
          for (int c = 0; c < d; ++c) {
            const T dgr = dlg[c] * l, db_ = rstd * (dgr - sg - zhr[c] * sgz);
            dbr[c] = db_;
            const T dzh = db_ * g2[c] - inv_d * (dgr * rstd * m2 + (btr[c] + zhr[c] * g2[c]) * uz);
            dz[c] = dzh;  // LayerNorm backward of dzh below
            sh += dzh;
            shz += dzh * zhr[c];
          }
          sh *= inv_d;
          shz *= inv_d;
#pragma omp simd
          for (int c = 0; c < d; ++c) {
            dz[c] = rstd * (dz[c] - sh - zhr[c] * shz) - inv_d * zhr[c] * cc;
            dg2[c] += dbr[c] * zhr[c];
          }
        }
      }
      // the read-out R = qx W + b - ((gram + 1) * m) @ LG, backwards
      gemm<T>(false, true, 2 * S, d, d, 1, dR.data(), d, Wn, d, 0, dq, d);
      gemm<T>(true, false, d, d, 2 * S, 1, q, d, dR.data(), d, 0, dWn, d);
      for (int t = 0; t < 2 * S; ++t)
#pragma omp simd
        for (int c = 0; c < d; ++c) dbn[c] += dR[t * d + c];
      gemm<T>(false, true, S, S, d, 1, dR.data(), d, lg, d, 0, p.data(), S);  // p = dR LG^T
      gemm<T>(false, true, S, ck, d, 1, dR.data() + S * d, d, lg, d, 0, p.data() + S * S, S);
      // gradient of the token scales: query t reads key j with s_{t mod K} in its own mini-batch
      // and s_{K-1} for earlier ones; the keys of later mini-batches read with s_{K-1}
      for (int t = 0; t < 2 * S; ++t) {
        const int tt = t < S ? t : t - S, mt = tt / K;
        const T* pr = p.data() + t * S;
        const T* grr = gr + t * S;
        T earlier = 0;
        for (int j = 0; j < mt * K; ++j) earlier -= pr[j] * (grr[j] + T(1));
        dsn[K - 1] += earlier;
        if (t < S) {
          T same = 0;
          for (int j = mt * K; j <= t; ++j) same -= pr[j] * (grr[j] + T(1));
          dsn[t % K] += same;
        }
      }
      for (int t = 0; t < 2 * S; ++t) {  // d gram
        const int n = t < S ? S : ck;
#pragma omp simd
        for (int j = 0; j < n; ++j) p[t * S + j] *= pm[t * S + j];
      }
      const T* pk = p.data() + S * S;  // through the Gram matrix to queries and keys
      gemm<T>(false, false, S, d, S, -1, p.data(), S, x, d, 1, dq, d);
      gemm<T>(false, false, S, d, ck, -1, pk, S, x, d, 1, dq + S * d, d);
      gemm<T>(true, false, S, d, S, -1, p.data(), S, q, d, 1, dq + S * d, d);
      gemm<T>(true, false, ck, d, S, -1, pk, S, x, d, 1, dq + S * d, d);
      if (full && has_dW1)
        gemm<T>(false, true, full, d, d, -s_last, lg, d, pdW1 + n * d * d, d, 1, dq + S * d, d);
      dsn[K - 1] += ds_last;
      if (has_dW1)
        for (int i = 0; i < d * d; ++i) dWn[i] += pdW1[n * d * d + i];
      if (has_db1)
        for (int c = 0; c < d; ++c) dbn[c] += pdb1[n * d + c];
    }
  });
  return {dqx, dbt, dlr, ds.sum(0), dgamma2, dW, db};
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "TTT-Linear dual-form block, forward");
  m.def("backward", &backward, "TTT-Linear dual-form block, backward");
}
