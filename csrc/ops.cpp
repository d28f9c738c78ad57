// The lsfused_cpp ops: schemas, CPU launchers (checks, chunking, threads) and registration.
//
// The ops mirror lsfused/reference.py (see its docstring for the math); Python reaches them through
// lsfused/kernels/cpp_ops.py as torch.ops.lsfused_cpp.*. CUDA kernels are registered by cuda_kernels.cu when the
// extension is built with CUDA.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_kernels.h"
#include "ops.h"

namespace lsfused {

void check_ranges(at::IntArrayRef ranges, int64_t numel) {
  TORCH_CHECK(ranges.size() % 2 == 0, "lsfused: ranges must hold start/end pairs, got ", ranges.size(), " entries");
  for (size_t r = 0; r < ranges.size(); r += 2) {
    TORCH_CHECK(0 <= ranges[r] && ranges[r] <= ranges[r + 1] && ranges[r + 1] <= numel, "lsfused: range [",
                ranges[r], ", ", ranges[r + 1], ") is not inside a buffer of ", numel, " elements");
  }
}

void check_buffer(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == dtype, "lsfused: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "lsfused: ", name, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous() && t.numel() == like.numel(), "lsfused: ", name,
              " must be a contiguous 1-D buffer of ", like.numel(), " elements");
}

at::ScalarType state_dtype(at::ScalarType param) {
  TORCH_CHECK(param == at::kFloat || param == at::kDouble || param == at::kHalf || param == at::kBFloat16,
              "lsfused: parameters must be float32, float64, float16 or bfloat16, got ", param);
  return param == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

// Fixed chunk size: chunk boundaries, hence the float64 sums, do not depend on the number of threads.
constexpr int64_t kChunk = int64_t{1} << 15;

// LSFUSED_CPU_ISA=baseline forces the baseline copy (to test it on an AVX2 machine).
const KernelTable& cpu_kernels() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
  static const KernelTable& table = [] () -> const KernelTable& {
    const char* forced = std::getenv("LSFUSED_CPU_ISA");
    if (forced != nullptr && std::string(forced) == "baseline") return kCpuBaseline;
    return __builtin_cpu_supports("avx2") ? kCpuAvx2 : kCpuBaseline;
  }();
  return table;
#else
  return kCpuBaseline;
#endif
}

DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kF32;
    case at::kDouble:
      return DType::kF64;
    case at::kHalf:
      return DType::kF16;
    default:
      return DType::kBF16;
  }
}

struct Chunk {
  int64_t begin, end, range;
};

// From this many elements per call on, write-only outputs of the memory-bound kernels (Pass B, restore, SGD Pass A)
// are streamed past the caches: they would not stay there, and streaming skips reading each line before writing
// it (about 25% less traffic). Adam's Pass A does not stream: streaming w0 (and d, while it was stored) measured
// slower at bert-base size on the Zen 3 VM used here each time it was tried, per store or by sub-blocks, although a
// loop with Pass A's accesses and no arithmetic gains from it (benchmarks/README.md).
constexpr int64_t kStreamFrom = int64_t{1} << 21;

int64_t total(const std::vector<Chunk>& chunks) {
  int64_t n = 0;
  for (const Chunk& c : chunks) n += c.end - c.begin;
  return n;
}

// The listed ranges cut into kChunk-sized pieces, in range order.
std::vector<Chunk> chunks_of(at::IntArrayRef ranges) {
  std::vector<Chunk> out;
  for (size_t r = 0; r < ranges.size(); r += 2) {
    for (int64_t a = ranges[r]; a < ranges[r + 1]; a += kChunk) {
      out.push_back({a, std::min(a + kChunk, ranges[r + 1]), static_cast<int64_t>(r / 2)});
    }
  }
  return out;
}

template <class F>
void for_chunks(const std::vector<Chunk>& chunks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) f(k, chunks[k]);
  });
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

Hp hp_row(at::ArrayRef<double> hp, int64_t range) {
  const double* row = hp.data() + range * kHpColumns;
  return Hp{row[0], row[1], row[2], row[3], row[4], row[5]};
}

// One float64 step size per range, read on the host.
std::vector<double> etas_of(const at::Tensor& eta, int64_t n_ranges) {
  const at::Tensor eta64 = eta.to(at::kDouble).contiguous();
  return std::vector<double>(eta64.data_ptr<double>(), eta64.data_ptr<double>() + n_ranges);
}

at::Tensor direction_and_norms_cpu(const at::Tensor& g, at::Tensor& w, at::Tensor& w0,
                                   const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& m,
                                   at::IntArrayRef ranges, at::ArrayRef<double> hp, int64_t mode, bool with_dm,
                                   const std::optional<at::Tensor>& eta, bool trial_dm, bool all_sums) {
  check_pass_a(g, w, w0, v, m, ranges, hp, mode, with_dm, eta, trial_dm);
  const int64_t n_ranges = static_cast<int64_t>(ranges.size() / 2);
  const auto chunks = chunks_of(ranges);
  std::vector<double> part(chunks.size() * kNormColumns);
  const bool adam = mode == kModeAdam;
  const PassAPtrs ptrs{g.data_ptr(), w.data_ptr(), w0.data_ptr(), adam ? v->data_ptr() : nullptr,
                       adam && m.has_value() ? m->data_ptr() : nullptr};
  const DType code = dtype_code(g.scalar_type());
  const KernelTable& kern = cpu_kernels();
  const bool stream = !adam && total(chunks) >= kStreamFrom;
  // The first trial's step size per range (NaN: no trial there).
  const std::vector<double> etas = eta.has_value()
                                       ? etas_of(*eta, n_ranges)
                                       : std::vector<double>(n_ranges, std::numeric_limits<double>::quiet_NaN());
  for_chunks(chunks, [&](int64_t k, const Chunk& c) {
    Hp h = hp_row(hp, c.range);
    h.with_dm = with_dm;
    h.all_sums = all_sums;
    if (!std::isnan(etas[c.range])) {
      h.eta = etas[c.range];
      h.trial = trial_dm ? 2 : 1;
    }
    kern.pass_a(code, static_cast<int>(mode), ptrs, c.begin, c.end - c.begin, h, &part[k * kNormColumns], stream);
  });
  at::Tensor out = at::zeros({n_ranges, kNormColumns}, g.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (size_t k = 0; k < chunks.size(); ++k) {  // chunk order: deterministic
    for (int c = 0; c < kNormColumns; ++c) o[chunks[k].range * kNormColumns + c] += part[k * kNormColumns + c];
  }
  if (!all_sums) mark_skipped_sums(out);
  return out;
}

TrialPtrs trial_ptrs(const at::Tensor& w, const at::Tensor& w0, const at::Tensor& g,
                     const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& m, int64_t mode) {
  const bool adam = mode == kModeAdam;
  return TrialPtrs{w.data_ptr(), w0.data_ptr(), g.data_ptr(), adam ? v->data_ptr() : nullptr,
                   adam ? ptr_or_null(m) : nullptr};
}

void trial_step_cpu(at::Tensor& w, const at::Tensor& w0, const at::Tensor& g, const std::optional<at::Tensor>& v,
                    const std::optional<at::Tensor>& m, at::IntArrayRef ranges, at::ArrayRef<double> hp,
                    int64_t mode, const at::Tensor& eta, bool along_dm) {
  check_direction(w, w0, g, v, m, ranges, hp, mode, along_dm);
  check_eta(eta, w, ranges);
  const std::vector<double> etas = etas_of(eta, static_cast<int64_t>(ranges.size() / 2));
  const TrialPtrs ptrs = trial_ptrs(w, w0, g, v, m, mode);
  const DType code = dtype_code(w.scalar_type());
  const KernelTable& kern = cpu_kernels();
  const auto chunks = chunks_of(ranges);
  const bool stream = total(chunks) >= kStreamFrom;
  for_chunks(chunks, [&](int64_t, const Chunk& c) {
    Hp h = hp_row(hp, c.range);
    h.eta = etas[c.range];
    kern.trial_step(code, static_cast<int>(mode), ptrs, c.begin, c.end - c.begin, h, along_dm, stream);
  });
}

void restore_cpu(at::Tensor& w, const at::Tensor& w0, at::IntArrayRef ranges) {
  check_restore(w, w0, ranges);
  const DType code = dtype_code(w.scalar_type());
  const KernelTable& kern = cpu_kernels();
  const auto chunks = chunks_of(ranges);
  const bool stream = total(chunks) >= kStreamFrom;
  for_chunks(chunks, [&](int64_t, const Chunk& c) {
    kern.restore(code, w.data_ptr(), w0.data_ptr(), c.begin, c.end - c.begin, stream);
  });
}

at::Tensor absorbed_counts_cpu(const at::Tensor& w, const at::Tensor& w0, const at::Tensor& g,
                               const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& m,
                               at::IntArrayRef ranges, at::ArrayRef<double> hp, int64_t mode, bool along_dm) {
  check_direction(w, w0, g, v, m, ranges, hp, mode, along_dm);
  const TrialPtrs ptrs = trial_ptrs(w, w0, g, v, m, mode);
  const auto chunks = chunks_of(ranges);
  std::vector<int64_t> part(chunks.size() * 2);
  const DType code = dtype_code(w.scalar_type());
  const KernelTable& kern = cpu_kernels();
  for_chunks(chunks, [&](int64_t k, const Chunk& c) {
    kern.absorbed(code, static_cast<int>(mode), ptrs, c.begin, c.end - c.begin, hp_row(hp, c.range), along_dm,
                  &part[2 * k]);
  });
  at::Tensor out = at::zeros({static_cast<int64_t>(ranges.size() / 2), 2}, w.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (size_t k = 0; k < chunks.size(); ++k) {
    o[2 * chunks[k].range] += static_cast<double>(part[2 * k]);
    o[2 * chunks[k].range + 1] += static_cast<double>(part[2 * k + 1]);
  }
  return out;
}

// (non-finite count, float64 sum of g*g) in one read of g; chunk sums added in chunk order (thread-independent).
std::tuple<int64_t, double> grad_check_cpu(const at::Tensor& g) {
  TORCH_CHECK(g.is_contiguous(), "lsfused: grad_check needs a contiguous tensor");
  state_dtype(g.scalar_type());
  const int64_t ranges_[2] = {0, g.numel()};
  const auto chunks = chunks_of(at::IntArrayRef(ranges_, 2));
  std::vector<int64_t> count(chunks.size());
  std::vector<double> sumsq(chunks.size());
  const DType code = dtype_code(g.scalar_type());
  const KernelTable& kern = cpu_kernels();
  for_chunks(chunks, [&](int64_t k, const Chunk& c) {
    count[k] = kern.grad_check(code, g.data_ptr(), c.begin, c.end - c.begin, &sumsq[k]);
  });
  int64_t bad = 0;
  double total_sq = 0.0;
  for (size_t k = 0; k < chunks.size(); ++k) {
    bad += count[k];
    total_sq += sumsq[k];
  }
  return {bad, total_sq};
}

std::string cpu_isa() { return cpu_kernels().isa; }

}  // namespace

at::ScalarType check_direction(const at::Tensor& w, const at::Tensor& w0, const at::Tensor& g,
                               const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& m,
                               at::IntArrayRef ranges, at::ArrayRef<double> hp, int64_t mode, bool along_dm) {
  TORCH_CHECK(mode == kModeSgd || mode == kModeAdam, "lsfused: mode must be 0 (SGD) or 1 (Adam), got ", mode);
  TORCH_CHECK_VALUE(mode == kModeAdam || !along_dm, "lsfused: SGD has no momentum direction (dm)");
  const at::ScalarType sdt = state_dtype(w.scalar_type());
  check_buffer(w, "w", w.scalar_type(), w);
  check_buffer(g, "g", w.scalar_type(), w);
  check_buffer(w0, "w0", sdt, w);
  if (mode == kModeAdam) {
    TORCH_CHECK(v.has_value(), "lsfused: Adam mode needs the second moment v");
    check_buffer(*v, "v", sdt, w);
    if (m.has_value()) check_buffer(*m, "m", sdt, w);
  }
  check_ranges(ranges, w.numel());
  TORCH_CHECK(hp.size() == ranges.size() / 2 * kHpColumns, "lsfused: hp must hold ", kHpColumns,
              " values per range, got ", hp.size(), " for ", ranges.size() / 2, " ranges");
  return sdt;
}

void check_eta(const at::Tensor& eta, const at::Tensor& w, at::IntArrayRef ranges) {
  TORCH_CHECK(eta.device() == w.device(), "lsfused: eta is on ", eta.device(), ", expected ", w.device());
  TORCH_CHECK(eta.dim() == 1 && eta.numel() >= static_cast<int64_t>(ranges.size() / 2),
              "lsfused: eta needs one entry per range");
}

void check_pass_a(const at::Tensor& g, const at::Tensor& w, const at::Tensor& w0, const std::optional<at::Tensor>& v,
                  const std::optional<at::Tensor>& m, at::IntArrayRef ranges, at::ArrayRef<double> hp, int64_t mode,
                  bool with_dm, const std::optional<at::Tensor>& eta, bool trial_dm) {
  TORCH_CHECK_VALUE(!trial_dm || with_dm, "lsfused: trial_dm needs with_dm (an optimizer with a momentum direction)");
  check_direction(w, w0, g, v, m, ranges, hp, mode, with_dm);
  if (eta.has_value()) check_eta(*eta, w, ranges);
}

void mark_skipped_sums(at::Tensor& out) {
  out.select(1, kColGg).fill_(std::numeric_limits<double>::quiet_NaN());
  out.select(1, kColDd).fill_(std::numeric_limits<double>::quiet_NaN());
}

void check_restore(const at::Tensor& w, const at::Tensor& w0, at::IntArrayRef ranges) {
  check_buffer(w, "w", w.scalar_type(), w);
  check_buffer(w0, "w0", state_dtype(w.scalar_type()), w);
  check_ranges(ranges, w.numel());
}

}  // namespace lsfused

TORCH_LIBRARY(lsfused_cpp, m) {
  m.def(
      "direction_and_norms(Tensor g, Tensor(a!) w, Tensor(b!) w0, Tensor(c!)? v, Tensor(d!)? m, int[] ranges, "
      "float[] hp, int mode, bool with_dm=False, Tensor? eta=None, bool trial_dm=False, bool all_sums=True) -> Tensor");
  m.def(
      "trial_step(Tensor(a!) w, Tensor w0, Tensor g, Tensor? v, Tensor? m, int[] ranges, float[] hp, int mode, "
      "Tensor eta, bool along_dm=False) -> ()");
  m.def("restore(Tensor(a!) w, Tensor w0, int[] ranges) -> ()");
  m.def(
      "absorbed_counts(Tensor w, Tensor w0, Tensor g, Tensor? v, Tensor? m, int[] ranges, float[] hp, int mode, "
      "bool along_dm=False) -> Tensor");
  m.def("grad_check(Tensor g) -> (int, float)");
  m.def("cpu_isa() -> str", &lsfused::cpu_isa);
}

TORCH_LIBRARY_IMPL(lsfused_cpp, CPU, m) {
  m.impl("direction_and_norms", &lsfused::direction_and_norms_cpu);
  m.impl("trial_step", &lsfused::trial_step_cpu);
  m.impl("restore", &lsfused::restore_cpu);
  m.impl("absorbed_counts", &lsfused::absorbed_counts_cpu);
  m.impl("grad_check", &lsfused::grad_check_cpu);
}
