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

// Input checks shared by every device; each returns or raises (TORCH_CHECK). check_pass_a returns the state dtype.
at::ScalarType state_dtype(at::ScalarType param);
void check_ranges(at::IntArrayRef ranges, int64_t numel);
at::ScalarType check_pass_a(const at::Tensor& g, const at::Tensor& w, const at::Tensor& w0, const at::Tensor& d,
                            const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& m,
                            const std::optional<at::Tensor>& dm, at::IntArrayRef ranges, at::ArrayRef<double> hp,
                            int64_t mode, const std::optional<at::Tensor>& eta = std::nullopt,
                            bool trial_dm = false);
void check_trial_step(const at::Tensor& w, const at::Tensor& w0, const at::Tensor& d, at::IntArrayRef ranges,
                      const at::Tensor& eta);
void check_restore(const at::Tensor& w, const at::Tensor& w0, at::IntArrayRef ranges);
// Pass A without all_sums: the gg and dd columns of its [ranges, 5] output become NaN (not computed).
void mark_skipped_sums(at::Tensor& out);

}  // namespace lsfused
