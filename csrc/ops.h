// Declarations shared by the CPU launchers (ops.cpp) and the CUDA ones (cuda_kernels.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace lsfused {

constexpr int kNormColumns = 5;  // reference.NORM_COLUMNS: s, gg, gd, dd, gdm
constexpr int kColGg = 1, kColDd = 3;  // the sums no decision uses: Pass A skips them unless all_sums
constexpr int kHpColumns = 6;    // reference.HP_COLUMNS: b1, b2, eps, bc1, sqrt_bc2, wd_scale
constexpr int64_t kModeSgd = 0;
constexpr int64_t kModeAdam = 1;

// Input checks shared by every device; each returns or raises before anything is written. The direction (d, or dm
// with along_dm) is computed or recomputed from g, v, m: check_direction checks those inputs and returns the state
// dtype; SGD has no dm (ValueError, as the reference), Adam needs v.
at::ScalarType state_dtype(at::ScalarType param);
void check_ranges(at::IntArrayRef ranges, int64_t numel);
at::ScalarType check_direction(const at::Tensor& w, const at::Tensor& w0, const at::Tensor& g,
                               const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& m,
                               at::IntArrayRef ranges, at::ArrayRef<double> hp, int64_t mode, bool along_dm);
void check_eta(const at::Tensor& eta, const at::Tensor& w, at::IntArrayRef ranges);
// Pass A: with_dm (a momentum direction: the gdm sum, a trial along dm) is checked as along_dm; trial_dm needs it.
void check_pass_a(const at::Tensor& g, const at::Tensor& w, const at::Tensor& w0, const std::optional<at::Tensor>& v,
                  const std::optional<at::Tensor>& m, at::IntArrayRef ranges, at::ArrayRef<double> hp, int64_t mode,
                  bool with_dm, const std::optional<at::Tensor>& eta, bool trial_dm);
void check_restore(const at::Tensor& w, const at::Tensor& w0, at::IntArrayRef ranges);
// Pass A without all_sums: the gg and dd columns of its [ranges, 5] output become NaN (not computed).
void mark_skipped_sums(at::Tensor& out);

}  // namespace lsfused
