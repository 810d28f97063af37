// The TTT layer's two glue functions on CPU, forward and backward: QKV and Readout in
// model.py (read those first; the tests check this file against them). In torch each is a
// handful of elementwise ops and LayerNorms over strided views, each a pass over memory with
// its own dispatch; here each is one pass over the rows. Compiled with blocks.cpp into one
// extension by kernels.py.
//
// QKV:     P [B, T, 3D + H] -> qx [B, H, 2, T, d] (RoPE'd queries, keys), q [B, H, T, d] (a copy
//          of the queries), tgt = XV - XK [B, H, T, d], lr = scale * sig [B, H, T] and sig.
//          rot [T, d / 2, 2]: (cos, sin) of each position's rotation of the pair (x[2j], x[2j+1]).
// Readout: z, q [B, H, T, d] -> post_norm(concat_heads(LN(z) * w + b + q)) [B, T, D].

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace lengen_glue {

using torch::Tensor;

template <typename T>
const T* ptr_or_null(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

template <typename T>
std::vector<Tensor> qkv_forward_impl(const Tensor& P, const Tensor& rot, const Tensor& lr_bias, int64_t H,
                                     double scale_) {
  const int64_t B = P.size(0), L = P.size(1), W = P.size(2), d = (W - H) / (3 * H), D = H * d, hd = d / 2;
  const T scale = scale_;
  auto opt = P.options();
  auto qx = torch::empty({B, H, 2, L, d}, opt), q = torch::empty({B, H, L, d}, opt), tgt = torch::empty({B, H, L, d}, opt);
  auto lr = torch::empty({B, H, L}, opt), sig = torch::empty({B, H, L}, opt);
  const T *pP = P.data_ptr<T>(), *pr = rot.data_ptr<T>(), *plb = lr_bias.data_ptr<T>();
  T *pqx = qx.data_ptr<T>(), *pq = q.data_ptr<T>(), *pt = tgt.data_ptr<T>(), *plr = lr.data_ptr<T>(),
    *ps = sig.data_ptr<T>();
  at::parallel_for(0, B * H, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t b = n / H, h = n % H;
      for (int64_t t = 0; t < L; ++t) {
        const T *row = pP + (b * L + t) * W, *xq = row + h * d, *xk = row + D + h * d, *xv = row + 2 * D + h * d,
                *r = pr + t * hd * 2;
        T *oq = pqx + (n * 2 * L + t) * d, *ok = pqx + ((n * 2 + 1) * L + t) * d, *oc = pq + (n * L + t) * d,
          *ot = pt + (n * L + t) * d;
        for (int64_t j = 0; j < hd; ++j) {
          const T c = r[2 * j], s = r[2 * j + 1];
          const T q0 = xq[2 * j] * c - xq[2 * j + 1] * s, q1 = xq[2 * j] * s + xq[2 * j + 1] * c;
          const T k0 = xk[2 * j] * c - xk[2 * j + 1] * s, k1 = xk[2 * j] * s + xk[2 * j + 1] * c;
          oq[2 * j] = oc[2 * j] = q0;
          oq[2 * j + 1] = oc[2 * j + 1] = q1;
          ok[2 * j] = k0;
          ok[2 * j + 1] = k1;
          ot[2 * j] = xv[2 * j] - k0;
          ot[2 * j + 1] = xv[2 * j + 1] - k1;
        }
        const T sg = T(1) / (T(1) + std::exp(-(row[3 * D + h] + plb[h])));
        ps[n * L + t] = sg;
        plr[n * L + t] = sg * scale;
      }
    }
  });
  return {qx, q, tgt, lr, sig};
}

template <typename T>
std::vector<Tensor> qkv_backward_impl(const c10::optional<Tensor>& dqx_, const c10::optional<Tensor>& dq_,
                                      const c10::optional<Tensor>& dtgt_, const c10::optional<Tensor>& dlr_,
                                      const Tensor& rot, const Tensor& sig, double scale_, int64_t H) {
  const int64_t B = sig.size(0), L = sig.size(2), hd = rot.size(1), d = 2 * hd, D = H * d, W = 3 * D + H;
  const T scale = scale_;
  auto opt = sig.options();
  auto dP = torch::empty({B, L, W}, opt), part = torch::empty({B, H}, opt);
  const T *pdqx = ptr_or_null<T>(dqx_), *pdq = ptr_or_null<T>(dq_), *pdt = ptr_or_null<T>(dtgt_),
          *pdl = ptr_or_null<T>(dlr_), *pr = rot.data_ptr<T>(), *ps = sig.data_ptr<T>();
  T *pdP = dP.data_ptr<T>(), *ppart = part.data_ptr<T>();
  at::parallel_for(0, B * H, 1, [&](int64_t n0, int64_t n1) {
    std::vector<T> gq(d), gk(d);
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t b = n / H, h = n % H;
      T acc = 0;
      for (int64_t t = 0; t < L; ++t) {
        T *row = pdP + (b * L + t) * W, *dxq = row + h * d, *dxk = row + D + h * d, *dxv = row + 2 * D + h * d;
        const T* r = pr + t * hd * 2;
        const T *tq = pdqx ? pdqx + (n * 2 * L + t) * d : nullptr, *tk = pdqx ? pdqx + ((n * 2 + 1) * L + t) * d : nullptr,
                *tc = pdq ? pdq + (n * L + t) * d : nullptr, *tt = pdt ? pdt + (n * L + t) * d : nullptr;
        for (int64_t c = 0; c < d; ++c) {
          gq[c] = (tq ? tq[c] : T(0)) + (tc ? tc[c] : T(0));
          gk[c] = (tk ? tk[c] : T(0)) - (tt ? tt[c] : T(0));
          dxv[c] = tt ? tt[c] : T(0);
        }
        for (int64_t j = 0; j < hd; ++j) {  // the rotation's transpose: multiply by conj(rot)
          const T c = r[2 * j], s = r[2 * j + 1];
          dxq[2 * j] = gq[2 * j] * c + gq[2 * j + 1] * s;
          dxq[2 * j + 1] = gq[2 * j + 1] * c - gq[2 * j] * s;
          dxk[2 * j] = gk[2 * j] * c + gk[2 * j + 1] * s;
          dxk[2 * j + 1] = gk[2 * j + 1] * c - gk[2 * j] * s;
        }
        const T sg = ps[n * L + t], dl = pdl ? sg * (T(1) - sg) * (pdl[n * L + t] * scale) : T(0);
        row[3 * D + h] = dl;
        acc += dl;
      }
      ppart[n] = acc;
    }
  });
  return {dP, part.sum(0)};
}

// LayerNorm statistics of a row: writes its mean, returns 1 / sqrt(biased variance + eps)
template <typename T>
inline T mean_rstd(const T* x, int64_t n, T eps, T& mean) {
  T m = 0, v = 0;
#pragma omp simd reduction(+ : m)
  for (int64_t c = 0; c < n; ++c) m += x[c];
  m /= n;
#pragma omp simd reduction(+ : v)
  for (int64_t c = 0; c < n; ++c) v += (x[c] - m) * (x[c] - m);
  mean = m;
  return T(1) / std::sqrt(v / n + eps);
}

// Fixed row chunks, so that the parameter gradients' sums do not depend on the thread count.
inline int64_t chunk_start(int64_t c, int64_t rows, int64_t chunks) { return c * rows / chunks; }

template <typename T>
std::vector<Tensor> readout_forward_impl(const Tensor& z, const Tensor& q, const Tensor& w, const Tensor& b,
                                         const Tensor& pw, const Tensor& pb, double eps_, double post_eps_) {
  const int64_t B = z.size(0), H = z.size(1), L = z.size(2), d = z.size(3), D = H * d;
  const T eps = eps_, post_eps = post_eps_;
  auto opt = z.options();
  auto out = torch::empty({B, L, D}, opt), y = torch::empty({B, L, D}, opt);
  auto mean = torch::empty({B, H, L}, opt), rstd = torch::empty({B, H, L}, opt);
  auto pmean = torch::empty({B, L}, opt), prstd = torch::empty({B, L}, opt);
  const T *pz = z.data_ptr<T>(), *pq = q.data_ptr<T>(), *pwt = w.data_ptr<T>(), *pbs = b.data_ptr<T>(),
          *ppw = pw.data_ptr<T>(), *ppb = pb.data_ptr<T>();
  T *po = out.data_ptr<T>(), *py = y.data_ptr<T>(), *pm = mean.data_ptr<T>(), *pr = rstd.data_ptr<T>(),
    *ppm = pmean.data_ptr<T>(), *ppr = prstd.data_ptr<T>();
  at::parallel_for(0, B * L, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t bi = row / L, t = row % L;
      T* yr = py + row * D;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t k = (bi * H + h) * L + t;
        const T *zr = pz + k * d, *qr = pq + k * d, *wh = pwt + h * d, *bh = pbs + h * d;
        T m;
        const T rs = mean_rstd<T>(zr, d, eps, m);
        pm[k] = m;
        pr[k] = rs;
        for (int64_t c = 0; c < d; ++c) yr[h * d + c] = (zr[c] - m) * rs * wh[c] + bh[c] + qr[c];
      }
      T m;
      const T rs = mean_rstd<T>(yr, D, post_eps, m);
      ppm[row] = m;
      ppr[row] = rs;
      T* o = po + row * D;
      for (int64_t c = 0; c < D; ++c) o[c] = (yr[c] - m) * rs * ppw[c] + ppb[c];
    }
  });
  return {out, y, mean, rstd, pmean, prstd};
}

template <typename T>
std::vector<Tensor> readout_backward_impl(const Tensor& dout, const Tensor& z, const Tensor& w, const Tensor& pw,
                                          const Tensor& y, const Tensor& mean, const Tensor& rstd,
                                          const Tensor& pmean, const Tensor& prstd) {
  const int64_t B = z.size(0), H = z.size(1), L = z.size(2), d = z.size(3), D = H * d, rows = B * L;
  const int64_t chunks = std::min<int64_t>(rows, 32);
  auto opt = z.options();
  auto dz = torch::empty({B, H, L, d}, opt), dq = torch::empty({B, H, L, d}, opt);
  auto part = torch::zeros({chunks, 4, D}, opt);  // per chunk: dpw, dpb, dw, db
  const T *pdo = dout.data_ptr<T>(), *pz = z.data_ptr<T>(), *pwt = w.data_ptr<T>(), *ppw = pw.data_ptr<T>(),
          *py = y.data_ptr<T>(), *pm = mean.data_ptr<T>(), *pr = rstd.data_ptr<T>(), *ppm = pmean.data_ptr<T>(),
          *ppr = prstd.data_ptr<T>();
  T *pdz = dz.data_ptr<T>(), *pdq = dq.data_ptr<T>(), *ppart = part.data_ptr<T>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> yh(D), g(D), dy(D), zh(d), gz(d);
    for (int64_t ch = c0; ch < c1; ++ch) {
      T *dpw = ppart + ch * 4 * D, *dpb = dpw + D, *dw = dpb + D, *db = dw + D;
      for (int64_t row = chunk_start(ch, rows, chunks); row < chunk_start(ch + 1, rows, chunks); ++row) {
        const int64_t bi = row / L, t = row % L;
        const T *yr = py + row * D, *dor = pdo + row * D, m = ppm[row], rs = ppr[row];
        T mg = 0, mgy = 0;  // the post-norm's backward
#pragma omp simd reduction(+ : mg, mgy)
        for (int64_t c = 0; c < D; ++c) {
          yh[c] = (yr[c] - m) * rs;
          g[c] = dor[c] * ppw[c];
          dpw[c] += dor[c] * yh[c];
          dpb[c] += dor[c];
          mg += g[c];
          mgy += g[c] * yh[c];
        }
        mg /= D;
        mgy /= D;
        for (int64_t c = 0; c < D; ++c) dy[c] = rs * (g[c] - mg - yh[c] * mgy);
        for (int64_t h = 0; h < H; ++h) {  // per head: the residual, the affine, the inner LayerNorm
          const int64_t k = (bi * H + h) * L + t;
          const T *zr = pz + k * d, *wh = pwt + h * d, *dyh = dy.data() + h * d, zm = pm[k], zr_s = pr[k];
          T* dqr = pdq + k * d;
          T m1 = 0, m2 = 0;
#pragma omp simd reduction(+ : m1, m2)
          for (int64_t c = 0; c < d; ++c) {
            zh[c] = (zr[c] - zm) * zr_s;
            dqr[c] = dyh[c];
            db[h * d + c] += dyh[c];
            dw[h * d + c] += dyh[c] * zh[c];
            gz[c] = dyh[c] * wh[c];
            m1 += gz[c];
            m2 += gz[c] * zh[c];
          }
          m1 /= d;
          m2 /= d;
          T* dzr = pdz + k * d;
          for (int64_t c = 0; c < d; ++c) dzr[c] = zr_s * (gz[c] - m1 - zh[c] * m2);
        }
      }
    }
  });
  auto sums = part.sum(0);  // [4, D], summed in chunk order
  return {dz, dq, sums[2].reshape({H, 1, d}), sums[3].reshape({H, 1, d}), sums[0], sums[1]};
}

#define LENGEN_FLOATING(t, name, ...)                                                              \
  [&] {                                                                                            \
    if ((t).scalar_type() == torch::kDouble) {                                                     \
      using scalar = double;                                                                       \
      return __VA_ARGS__();                                                                        \
    }                                                                                              \
    TORCH_CHECK((t).scalar_type() == torch::kFloat, "TTT ", name, " CPU kernel: float32 or float64 only"); \
    using scalar = float;                                                                          \
    return __VA_ARGS__();                                                                          \
  }()

std::vector<Tensor> qkv_forward(Tensor P, Tensor rot, Tensor lr_bias, int64_t H, double scale) {
  return LENGEN_FLOATING(P, "QKV", [&] { return qkv_forward_impl<scalar>(P, rot, lr_bias, H, scale); });
}

std::vector<Tensor> qkv_backward(c10::optional<Tensor> dqx, c10::optional<Tensor> dq, c10::optional<Tensor> dtgt,
                                 c10::optional<Tensor> dlr, Tensor rot, Tensor sig, double scale, int64_t H) {
  for (auto* t : {&dqx, &dq, &dtgt, &dlr})
    if (t->has_value()) **t = (*t)->contiguous();
  return LENGEN_FLOATING(sig, "QKV", [&] { return qkv_backward_impl<scalar>(dqx, dq, dtgt, dlr, rot, sig, scale, H); });
}

std::vector<Tensor> readout_forward(Tensor z, Tensor q, Tensor w, Tensor b, Tensor pw, Tensor pb, double eps,
                                    double post_eps) {
  return LENGEN_FLOATING(z, "Readout", [&] { return readout_forward_impl<scalar>(z, q, w, b, pw, pb, eps, post_eps); });
}

std::vector<Tensor> readout_backward(Tensor dout, Tensor z, Tensor w, Tensor pw, Tensor y, Tensor mean, Tensor rstd,
                                     Tensor pmean, Tensor prstd) {
  return LENGEN_FLOATING(z, "Readout", [&] {
    return readout_backward_impl<scalar>(dout.contiguous(), z, w, pw, y, mean, rstd, pmean, prstd);
  });
}

}  // namespace lengen_glue
