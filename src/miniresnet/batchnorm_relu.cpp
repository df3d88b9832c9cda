// Training-mode BatchNorm followed by ReLU, optionally with a residual added before the ReLU,
// forward and backward, each as two passes over channels_last (N, H, W, C) memory:
//   forward:  per-channel sums of x, then y = relu(x * scale + offset [+ skip])
//   backward: per-channel sums of g = dy * (y > 0) and g * (x - mean), then dx (and dskip = g).
// PyTorch's own ops take several more passes for the same work on the CPU; the arithmetic is the
// same as F.batch_norm's. miniresnet/batchnorm_relu.py builds this file and calls it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBlock = 16;  // rows summed in T before the sums move into double: fp32 error stays ~1e-7

// One chunk of rows per thread for the reductions: each fills its own row of partial sums.
int64_t chunks_for(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / kBlock)); }

// Sums of (x - shift) and of its square over rows [r0, r1). The shift (the first row) keeps the
// sum of squares from cancelling when a channel's mean is large against its spread.
template <typename T>
void sum_shifted(const T* __restrict__ x, const T* __restrict__ shift, int64_t r0, int64_t r1, int64_t C,
                 double* __restrict__ s1, double* __restrict__ s2) {
  std::vector<T> buffer(2 * C);
  T* __restrict__ a1 = buffer.data();
  T* __restrict__ a2 = buffer.data() + C;
  for (int64_t r = r0; r < r1; r += kBlock) {
    std::fill(buffer.begin(), buffer.end(), T(0));
    for (int64_t i = r; i < std::min(r1, r + kBlock); ++i) {
      const T* __restrict__ row = x + i * C;
      for (int64_t c = 0; c < C; ++c) {
        const T d = row[c] - shift[c];
        a1[c] += d;
        a2[c] += d * d;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += a1[c];
      s2[c] += a2[c];
    }
  }
}

template <typename T>
void normalize_relu(const T* __restrict__ x, const T* __restrict__ skip, T* __restrict__ y, const T* __restrict__ scale,
                    const T* __restrict__ offset, int64_t r0, int64_t r1, int64_t C) {
  for (int64_t i = r0; i < r1; ++i) {
    const T* __restrict__ xr = x + i * C;
    T* __restrict__ yr = y + i * C;
    if (skip) {
      const T* __restrict__ sr = skip + i * C;
      for (int64_t c = 0; c < C; ++c) yr[c] = std::max(T(0), xr[c] * scale[c] + offset[c] + sr[c]);
    } else {
      for (int64_t c = 0; c < C; ++c) yr[c] = std::max(T(0), xr[c] * scale[c] + offset[c]);
    }
  }
}

// Sums of g = dy * (y > 0) and of g * (x - mean) over rows [r0, r1).
template <typename T>
void sum_gradients(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y,
                   const T* __restrict__ mean, int64_t r0, int64_t r1, int64_t C, double* __restrict__ s1,
                   double* __restrict__ s2) {
  std::vector<T> buffer(2 * C);
  T* __restrict__ a1 = buffer.data();
  T* __restrict__ a2 = buffer.data() + C;
  for (int64_t r = r0; r < r1; r += kBlock) {
    std::fill(buffer.begin(), buffer.end(), T(0));
    for (int64_t i = r; i < std::min(r1, r + kBlock); ++i) {
      const T* __restrict__ dyr = dy + i * C;
      const T* __restrict__ xr = x + i * C;
      const T* __restrict__ yr = y + i * C;
      for (int64_t c = 0; c < C; ++c) {
        const T g = yr[c] > T(0) ? dyr[c] : T(0);
        a1[c] += g;
        a2[c] += g * (xr[c] - mean[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += a1[c];
      s2[c] += a2[c];
    }
  }
}

// dx = a * g + b * x + k per channel (F.batch_norm's backward, regrouped); dskip = g.
template <typename T>
void input_gradients(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ dx,
                     T* __restrict__ dskip, const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ k,
                     int64_t r0, int64_t r1, int64_t C) {
  for (int64_t i = r0; i < r1; ++i) {
    const T* __restrict__ dyr = dy + i * C;
    const T* __restrict__ xr = x + i * C;
    const T* __restrict__ yr = y + i * C;
    T* __restrict__ dxr = dx + i * C;
    for (int64_t c = 0; c < C; ++c) {
      const T g = yr[c] > T(0) ? dyr[c] : T(0);
      dxr[c] = a[c] * g + b[c] * xr[c] + k[c];
    }
    if (dskip) {
      T* __restrict__ dsr = dskip + i * C;
      for (int64_t c = 0; c < C; ++c) dsr[c] = yr[c] > T(0) ? dyr[c] : T(0);
    }
  }
}

// Runs reduce(r0, r1, partial_row) on one chunk of rows per thread and returns the per-channel
// totals of the two sums, added up in double.
template <typename Reduce>
std::pair<std::vector<double>, std::vector<double>> reduce_rows(int64_t rows, int64_t C, Reduce reduce) {
  const int64_t chunks = chunks_for(rows);
  std::vector<double> s1(chunks * C, 0.0), s2(chunks * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) reduce(rows * k / chunks, rows * (k + 1) / chunks, &s1[k * C], &s2[k * C]);
  });
  std::vector<double> t1(C, 0.0), t2(C, 0.0);
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t c = 0; c < C; ++c) {
      t1[c] += s1[k * C + c];
      t2[c] += s2[k * C + c];
    }
  return {t1, t2};
}

constexpr int64_t kGrain = 2048;  // rows per task in the elementwise passes

template <typename T>
void forward_impl(const T* x, const T* skip, T* y, const T* weight, const T* bias, T* mean_out, T* var_out,
                  T* invstd_out, int64_t rows, int64_t C, double eps) {
  const std::vector<T> shift(x, x + C);
  auto [s1, s2] = reduce_rows(rows, C, [&](int64_t r0, int64_t r1, double* p1, double* p2) {
    sum_shifted(x, shift.data(), r0, r1, C, p1, p2);
  });
  std::vector<T> scale(C), offset(C);
  for (int64_t c = 0; c < C; ++c) {
    const double d = s1[c] / rows, var = std::max(0.0, s2[c] / rows - d * d), mean = shift[c] + d;
    const double invstd = 1.0 / std::sqrt(var + eps);
    mean_out[c] = T(mean);
    var_out[c] = T(var);
    invstd_out[c] = T(invstd);
    scale[c] = T(weight[c] * invstd);
    offset[c] = T(bias[c] - mean * weight[c] * invstd);
  }
  at::parallel_for(0, rows, kGrain, [&](int64_t lo, int64_t hi) {
    normalize_relu(x, skip, y, scale.data(), offset.data(), lo, hi, C);
  });
}

template <typename T>
void backward_impl(const T* dy, const T* x, const T* y, const T* weight, const T* mean, const T* invstd, T* dx,
                   T* dskip, T* dweight, T* dbias, int64_t rows, int64_t C) {
  auto [sum_g, sum_gx] = reduce_rows(rows, C, [&](int64_t r0, int64_t r1, double* p1, double* p2) {
    sum_gradients(dy, x, y, mean, r0, r1, C, p1, p2);
  });
  std::vector<T> a(C), b(C), k(C);
  for (int64_t c = 0; c < C; ++c) {
    const double is = invstd[c], ac = weight[c] * is, bc = -ac * is * is * sum_gx[c] / rows;
    dbias[c] = T(sum_g[c]);
    dweight[c] = T(sum_gx[c] * is);
    a[c] = T(ac);
    b[c] = T(bc);
    k[c] = T(-ac * sum_g[c] / rows - bc * mean[c]);
  }
  at::parallel_for(0, rows, kGrain, [&](int64_t lo, int64_t hi) {
    input_gradients(dy, x, y, dx, dskip, a.data(), b.data(), k.data(), lo, hi, C);
  });
}

// x, skip: channels_last-contiguous (N, C, H, W). Returns y, the batch mean, biased variance and
// 1 / sqrt(variance + eps).
std::vector<at::Tensor> forward(const at::Tensor& x, const std::optional<at::Tensor>& skip, const at::Tensor& weight,
                                const at::Tensor& bias, double eps) {
  const int64_t C = x.size(1), rows = x.numel() / C;
  auto y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  auto mean = at::empty({C}, x.options()), var = at::empty({C}, x.options()), invstd = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batchnorm_relu_forward", [&] {
    forward_impl<scalar_t>(x.const_data_ptr<scalar_t>(), skip ? skip->const_data_ptr<scalar_t>() : nullptr,
                           y.mutable_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                           bias.const_data_ptr<scalar_t>(), mean.mutable_data_ptr<scalar_t>(),
                           var.mutable_data_ptr<scalar_t>(), invstd.mutable_data_ptr<scalar_t>(), rows, C, eps);
  });
  return {y, mean, var, invstd};
}

// dy, x, y: channels_last-contiguous. Returns dx, dskip (undefined unless with_skip), dweight, dbias.
std::vector<at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& y,
                                 const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& invstd,
                                 bool with_skip) {
  const int64_t C = x.size(1), rows = x.numel() / C;
  auto dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  auto dskip = with_skip ? at::empty_like(x, at::MemoryFormat::ChannelsLast) : at::Tensor();
  auto dweight = at::empty({C}, x.options()), dbias = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batchnorm_relu_backward", [&] {
    backward_impl<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                            weight.const_data_ptr<scalar_t>(), mean.const_data_ptr<scalar_t>(),
                            invstd.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
                            with_skip ? dskip.mutable_data_ptr<scalar_t>() : nullptr,
                            dweight.mutable_data_ptr<scalar_t>(), dbias.mutable_data_ptr<scalar_t>(), rows, C);
  });
  return {dx, dskip, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY(miniresnet, m) {
  m.def("batchnorm_relu_forward(Tensor x, Tensor? skip, Tensor weight, Tensor bias, float eps) -> Tensor[]", &forward);
  m.def(
      "batchnorm_relu_backward(Tensor dy, Tensor x, Tensor y, Tensor weight, Tensor mean, Tensor invstd, "
      "bool with_skip) -> Tensor[]",
      &backward);
}
