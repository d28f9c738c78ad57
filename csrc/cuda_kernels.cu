// CUDA kernels of the lsfused_cpp ops (built only when nvcc and a CUDA-enabled torch are present).
//
// The math and its order are those of lsfused/reference.py. Every operation goes through an explicitly rounded
// intrinsic (__fmul_rn, __fdiv_rn, __fsqrt_rn, ...), which nvcc never contracts into an FMA, and the build also
// passes --fmad=false. Sums: per-thread float64 accumulators, a fixed tree per block into a [blocks, 5] partial
// buffer, then a second kernel adds the partials in a fixed order (no atomics): deterministic. One launch per range.
// No absorbed-count kernel: cpp_ops.absorbed_counts runs the reference's off the CPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "ops.h"

namespace lsfused {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;  // elements per thread and block: kThreads * kItems
constexpr int64_t kBlockElems = kThreads * kItems;

struct HpArgs {
  double b1, b2, eps, bc1, sqrt_bc2, wd_scale;
};

// Separately rounded operations, never contracted.
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double div(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }

// The only place d and dm are computed (reference.direction): Pass A and the trials both go through these, so a
// direction recomputed from the stored g, v, m is bit for bit the one Pass A summed and tried.
template <class S>
struct DirHp {  // the direction's hyperparameters, rounded to the state dtype
  S eps, bc1, sqrt_bc2;
  __device__ explicit DirHp(const HpArgs& hp) : eps(S(hp.eps)), bc1(S(hp.bc1)), sqrt_bc2(S(hp.sqrt_bc2)) {}
};
template <class S>
__device__ __forceinline__ S adam_denom(S v, const DirHp<S>& h) {
  return add(div(sqrt_rn(v), h.sqrt_bc2), h.eps);
}
// d = -(g/denom) (x = g); with DM, dm = -((x/bc1)/denom), x = m, or g without momentum.
template <bool DM, class S>
__device__ __forceinline__ S adam_dir(S x, S denom, const DirHp<S>& h) {
  if constexpr (DM) {
    return -div(div(x, h.bc1), denom);
  } else {
    return -div(x, denom);
  }
}
template <class S>
__device__ __forceinline__ S sgd_dir(S g) {
  return -g;
}

// Which direction a trial recomputes.
enum DirKind : int { kDirSgd, kDirD, kDirDmOfG, kDirDmOfM };

template <int DIR, class P, class S>
__device__ __forceinline__ S direction_at(const P* g, const S* v, const S* m, int64_t i, const DirHp<S>& h) {
  const S gs = static_cast<S>(g[i]);
  if constexpr (DIR == kDirSgd) {
    return sgd_dir(gs);
  } else {
    const S denom = adam_denom(v[i], h);
    if constexpr (DIR == kDirDmOfM) return adam_dir<true>(m[i], denom, h);
    return adam_dir<DIR == kDirDmOfG>(gs, denom, h);
  }
}

// Block-wide float64 sum of one value per thread, in a fixed tree order; the result is valid in thread 0.
__device__ double block_sum(double x, double* shared) {
  shared[threadIdx.x] = x;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] = __dadd_rn(shared[threadIdx.x], shared[threadIdx.x + stride]);
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

// TRIAL: the fused first trial, 0 none, 1 w = w0 + eta*d, 2 w = w0 + eta*dm (the op order of trial_step_kernel),
// skipped when *eta is NaN (read on the device: no host sync). GDM: the optimizer has a momentum direction (the sum
// gdm, a trial along dm).
template <class P, class S, bool ADAM, bool HAS_M, bool GDM, int TRIAL>
__global__ void pass_a_kernel(const P* __restrict__ g, P* __restrict__ w, S* __restrict__ w0, S* __restrict__ v,
                              S* __restrict__ m, int64_t start, int64_t n, HpArgs hp, const double* __restrict__ eta,
                              double* __restrict__ part) {
  static_assert(TRIAL != 2 || GDM, "a trial along dm needs a momentum direction");
  __shared__ double shared[kThreads];
  const S b1 = S(hp.b1), omb1 = S(1.0 - hp.b1), b2 = S(hp.b2), omb2 = S(1.0 - hp.b2), wd = S(hp.wd_scale);
  const DirHp<S> dh(hp);
  const bool trial = TRIAL != 0 && !isnan(*eta);
  const S eta_s = TRIAL != 0 ? static_cast<S>(*eta) : S(0);
  double acc[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kBlockElems + threadIdx.x;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t local = base + k * kThreads;
    if (local >= n) break;
    const int64_t i = start + local;
    const S gs = static_cast<S>(g[i]);
    const S w0v = mul(static_cast<S>(w[i]), wd);  // w*1 == w bit for bit
    w0[i] = w0v;
    const double g64 = static_cast<double>(gs);
    double s, gdm = 0.0;
    S dv, dmv = S(0);
    if constexpr (ADAM) {
      const S vv = add(mul(v[i], b2), mul(mul(gs, omb2), gs));
      v[i] = vv;
      const S denom = adam_denom(vv, dh);
      dv = adam_dir<false>(gs, denom, dh);
      s = __ddiv_rn(__dmul_rn(g64, g64), static_cast<double>(denom));
      S src = gs;
      if constexpr (HAS_M) {
        src = add(mul(m[i], b1), mul(gs, omb1));
        m[i] = src;
      }
      if constexpr (GDM) {
        dmv = adam_dir<true>(src, denom, dh);
        gdm = __dmul_rn(g64, static_cast<double>(dmv));
      }
    } else {
      dv = sgd_dir(gs);
      s = __dmul_rn(g64, g64);
    }
    if (TRIAL != 0 && trial) w[i] = static_cast<P>(add(w0v, mul(eta_s, TRIAL == 2 ? dmv : dv)));
    const double d64 = static_cast<double>(dv);
    acc[0] = __dadd_rn(acc[0], s);
    acc[1] = __dadd_rn(acc[1], __dmul_rn(g64, g64));
    acc[2] = __dadd_rn(acc[2], __dmul_rn(g64, d64));
    acc[3] = __dadd_rn(acc[3], __dmul_rn(d64, d64));
    acc[4] = __dadd_rn(acc[4], gdm);
  }
  for (int c = 0; c < kNormColumns; ++c) {
    const double total = block_sum(acc[c], shared);
    if (threadIdx.x == 0) part[blockIdx.x * kNormColumns + c] = total;
  }
}

// Second pass: out[c] = sum over blocks of part[b, c], in a fixed order (one block).
__global__ void finish_sums_kernel(const double* __restrict__ part, int64_t blocks, double* __restrict__ out) {
  __shared__ double shared[kThreads];
  for (int c = 0; c < kNormColumns; ++c) {
    double x = 0.0;
    for (int64_t b = threadIdx.x; b < blocks; b += kThreads) x = __dadd_rn(x, part[b * kNormColumns + c]);
    const double total = block_sum(x, shared);
    if (threadIdx.x == 0) out[c] = total;
  }
}

// w = w0 + eta*dir, dir recomputed from g, v (m): reads w0, g, v [m], writes w.
template <class P, class S, int DIR>
__global__ void trial_step_kernel(P* __restrict__ w, const S* __restrict__ w0, const P* __restrict__ g,
                                  const S* __restrict__ v, const S* __restrict__ m, int64_t start, int64_t n,
                                  HpArgs hp, const double* __restrict__ eta) {
  const S eta_s = static_cast<S>(*eta);
  const DirHp<S> dh(hp);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kBlockElems + threadIdx.x;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t local = base + k * kThreads;
    if (local >= n) break;
    const int64_t i = start + local;
    w[i] = static_cast<P>(add(w0[i], mul(eta_s, direction_at<DIR>(g, v, m, i, dh))));
  }
}

template <class P, class S>
__global__ void restore_kernel(P* __restrict__ w, const S* __restrict__ w0, int64_t start, int64_t n) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kBlockElems + threadIdx.x;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t local = base + k * kThreads;
    if (local >= n) break;
    w[start + local] = static_cast<P>(w0[start + local]);
  }
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kBlockElems - 1) / kBlockElems); }

// Calls f with a null pointer of the param type and of the state type.
template <class F>
void dispatch(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat:
      return f(static_cast<float*>(nullptr), static_cast<float*>(nullptr));
    case at::kDouble:
      return f(static_cast<double*>(nullptr), static_cast<double*>(nullptr));
    case at::kHalf:
      return f(static_cast<c10::Half*>(nullptr), static_cast<float*>(nullptr));
    case at::kBFloat16:
      return f(static_cast<c10::BFloat16*>(nullptr), static_cast<float*>(nullptr));
    default:
      TORCH_CHECK(false, "lsfused: unsupported dtype ", t);
  }
}

template <class T>
T* ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? static_cast<T*>(t->data_ptr()) : nullptr;
}

HpArgs hp_row(at::ArrayRef<double> hp, int64_t r) {
  const double* row = hp.data() + r * kHpColumns;
  return HpArgs{row[0], row[1], row[2], row[3], row[4], row[5]};
}

at::Tensor direction_and_norms_cuda(const at::Tensor& g, at::Tensor& w, at::Tensor& w0,
                                    const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& m,
                                    at::IntArrayRef ranges, at::ArrayRef<double> hp, int64_t mode, bool with_dm,
                                    const std::optional<at::Tensor>& eta, bool trial_dm, bool all_sums) {
  check_pass_a(g, w, w0, v, m, ranges, hp, mode, with_dm, eta, trial_dm);
  // The first trial's step sizes stay on the device (NaN: no trial on that range): no sync.
  const std::optional<at::Tensor> eta64 =
      eta.has_value() ? std::optional<at::Tensor>(eta->to(at::kDouble).contiguous()) : std::nullopt;
  const int trial = eta.has_value() ? (trial_dm ? 2 : 1) : 0;
  const c10::cuda::CUDAGuard guard(w.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n_ranges = static_cast<int64_t>(ranges.size() / 2);
  at::Tensor out = at::zeros({n_ranges, kNormColumns}, w.options().dtype(at::kDouble));
  int64_t total_blocks = 0;
  for (int64_t r = 0; r < n_ranges; ++r) total_blocks += blocks_for(ranges[2 * r + 1] - ranges[2 * r]);
  at::Tensor part = at::empty({std::max<int64_t>(total_blocks, 1), kNormColumns}, out.options());
  const bool adam = mode == kModeAdam, has_m = adam && m.has_value();
  dispatch(w.scalar_type(), [&](auto* p_tag, auto* s_tag) {
    using P = std::remove_pointer_t<decltype(p_tag)>;
    using S = std::remove_pointer_t<decltype(s_tag)>;
    const P* gp = static_cast<const P*>(g.data_ptr());
    P* wp = static_cast<P*>(w.data_ptr());
    S* w0p = static_cast<S*>(w0.data_ptr());
    S *vp = adam ? ptr<S>(v) : nullptr, *mp = has_m ? ptr<S>(m) : nullptr;
    int64_t offset = 0;
    for (int64_t r = 0; r < n_ranges; ++r) {
      const int64_t a = ranges[2 * r], n = ranges[2 * r + 1] - a;
      if (n == 0) continue;
      const HpArgs h = hp_row(hp, r);
      const unsigned blocks = blocks_for(n);
      double* pp = part.data_ptr<double>() + offset * kNormColumns;
      const double* ep = eta64.has_value() ? eta64->data_ptr<double>() + r : nullptr;
      auto launch = [&](auto kernel) {
        kernel<<<blocks, kThreads, 0, stream>>>(gp, wp, w0p, vp, mp, a, n, h, ep, pp);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      // A trial along dm only with_dm (check_pass_a refused the rest).
      auto by_trial = [&](auto k0, auto k1, auto k2) {
        if (trial == 0) return launch(k0);
        if (trial == 1) return launch(k1);
        launch(k2);
      };
      if (!adam) {
        by_trial(pass_a_kernel<P, S, false, false, false, 0>, pass_a_kernel<P, S, false, false, false, 1>,
                 pass_a_kernel<P, S, false, false, false, 1>);
      } else if (has_m && with_dm) {
        by_trial(pass_a_kernel<P, S, true, true, true, 0>, pass_a_kernel<P, S, true, true, true, 1>,
                 pass_a_kernel<P, S, true, true, true, 2>);
      } else if (has_m) {
        by_trial(pass_a_kernel<P, S, true, true, false, 0>, pass_a_kernel<P, S, true, true, false, 1>,
                 pass_a_kernel<P, S, true, true, false, 1>);
      } else if (with_dm) {
        by_trial(pass_a_kernel<P, S, true, false, true, 0>, pass_a_kernel<P, S, true, false, true, 1>,
                 pass_a_kernel<P, S, true, false, true, 2>);
      } else {
        by_trial(pass_a_kernel<P, S, true, false, false, 0>, pass_a_kernel<P, S, true, false, false, 1>,
                 pass_a_kernel<P, S, true, false, false, 1>);
      }
      finish_sums_kernel<<<1, kThreads, 0, stream>>>(pp, blocks, out.data_ptr<double>() + r * kNormColumns);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      offset += blocks;
    }
  });
  if (!all_sums) mark_skipped_sums(out);  // memory-bound on a GPU: the sums are computed anyway
  return out;
}

void trial_step_cuda(at::Tensor& w, const at::Tensor& w0, const at::Tensor& g, const std::optional<at::Tensor>& v,
                     const std::optional<at::Tensor>& m, at::IntArrayRef ranges, at::ArrayRef<double> hp,
                     int64_t mode, const at::Tensor& eta, bool along_dm) {
  check_direction(w, w0, g, v, m, ranges, hp, mode, along_dm);
  check_eta(eta, w, ranges);
  const c10::cuda::CUDAGuard guard(w.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor eta64 = eta.to(at::kDouble).contiguous();  // stays on the device: no sync
  const bool adam = mode == kModeAdam;
  const int dir = !adam ? kDirSgd : !along_dm ? kDirD : m.has_value() ? kDirDmOfM : kDirDmOfG;
  dispatch(w.scalar_type(), [&](auto* p_tag, auto* s_tag) {
    using P = std::remove_pointer_t<decltype(p_tag)>;
    using S = std::remove_pointer_t<decltype(s_tag)>;
    P* wp = static_cast<P*>(w.data_ptr());
    const S* w0p = static_cast<const S*>(w0.data_ptr());
    const P* gp = static_cast<const P*>(g.data_ptr());
    const S *vp = adam ? ptr<S>(v) : nullptr, *mp = adam ? ptr<S>(m) : nullptr;
    for (size_t r = 0; r < ranges.size() / 2; ++r) {
      const int64_t a = ranges[2 * r], n = ranges[2 * r + 1] - a;
      if (n == 0) continue;
      const HpArgs h = hp_row(hp, static_cast<int64_t>(r));
      const double* ep = eta64.data_ptr<double>() + r;
      auto launch = [&](auto kernel) {
        kernel<<<blocks_for(n), kThreads, 0, stream>>>(wp, w0p, gp, vp, mp, a, n, h, ep);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      switch (dir) {
        case kDirSgd:
          launch(trial_step_kernel<P, S, kDirSgd>);
          break;
        case kDirD:
          launch(trial_step_kernel<P, S, kDirD>);
          break;
        case kDirDmOfG:
          launch(trial_step_kernel<P, S, kDirDmOfG>);
          break;
        default:
          launch(trial_step_kernel<P, S, kDirDmOfM>);
      }
    }
  });
}

void restore_cuda(at::Tensor& w, const at::Tensor& w0, at::IntArrayRef ranges) {
  check_restore(w, w0, ranges);
  const c10::cuda::CUDAGuard guard(w.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(w.scalar_type(), [&](auto* p_tag, auto* s_tag) {
    using P = std::remove_pointer_t<decltype(p_tag)>;
    using S = std::remove_pointer_t<decltype(s_tag)>;
    for (size_t r = 0; r < ranges.size() / 2; ++r) {
      const int64_t a = ranges[2 * r], n = ranges[2 * r + 1] - a;
      if (n == 0) continue;
      restore_kernel<P, S><<<blocks_for(n), kThreads, 0, stream>>>(static_cast<P*>(w.data_ptr()),
                                                                   static_cast<const S*>(w0.data_ptr()), a, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace
}  // namespace lsfused

TORCH_LIBRARY_IMPL(lsfused_cpp, CUDA, m) {
  m.impl("direction_and_norms", &lsfused::direction_and_norms_cuda);
  m.impl("trial_step", &lsfused::trial_step_cuda);
  m.impl("restore", &lsfused::restore_cuda);
}
