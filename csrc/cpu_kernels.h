// Interface between the torch-facing launcher (ops.cpp) and the elementwise CPU kernels.
//
// The kernels (cpu_kernels_impl.h) see no torch header: they are compiled twice, at the baseline ISA
// (cpu_kernels_base.cpp) and for AVX2 (cpu_kernels_avx2.cpp), each copy in its own namespace so that no inline
// function compiled for AVX2 can be picked by the linker for the baseline path. ops.cpp picks a table at run time.
#pragma once

#include <cstdint>

namespace lsfused {

enum class DType : int { kF32, kF64, kF16, kBF16 };

// One row of reference.HP_COLUMNS, as given (float64); kernels round to the state dtype. eta: the step size of a
// trial (Pass B, or Pass A's fused first trial), rounded to the state dtype. trial (Pass A only): the fused first
// trial of this range, 0 none, 1 w = w0 + eta*d, 2 w = w0 + eta*dm. with_dm (Pass A only): the optimizer has a
// momentum direction, so the sum gdm is computed (else 0). all_sums: false leaves the sums gg and dd out (no
// decision uses them; the launcher marks them NaN).
struct Hp {
  double b1, b2, eps, bc1, sqrt_bc2, wd_scale;
  double eta = 0.0;
  int trial = 0;
  bool with_dm = false;
  bool all_sums = true;
};

// Base pointers of the flat buffers of one bucket (g, w in the param dtype; the rest in the state dtype). No
// direction buffer: whoever needs d or dm recomputes it from g, v and m.
struct PassAPtrs {
  const void* g;
  void* w;  // written only by a fused first trial
  void* w0;
  void* v;  // null for SGD
  void* m;  // null without momentum
};

// What a trial and the absorbed count read (and the trial writes: w).
struct TrialPtrs {
  void* w;
  const void* w0;
  const void* g;
  const void* v;  // null for SGD
  const void* m;  // null without momentum
};

struct KernelTable {
  const char* isa;
  // Pass A over elements [begin, begin + n); writes the 5 float64 sums of reference.NORM_COLUMNS to out, and the
  // first trial point into w when hp.trial says so.
  // stream: use non-temporal stores for write-only outputs where aligned (for buffers larger than the caches).
  void (*pass_a)(DType, int mode, const PassAPtrs&, int64_t begin, int64_t n, const Hp&, double* out, bool stream);
  // Pass B: w = w0 + eta*dir over [begin, begin + n), dir (d, or dm with along_dm) recomputed from g, v, m.
  void (*trial_step)(DType, int mode, const TrialPtrs&, int64_t begin, int64_t n, const Hp&, bool along_dm,
                     bool stream);
  // w = w0 over [begin, begin + n).
  void (*restore)(DType, void* w, const void* w0, int64_t begin, int64_t n, bool stream);
  // out = [elements with dir != 0, those of them where w == w0 rounded to the param dtype] over [begin, begin + n),
  // dir recomputed as trial_step does.
  void (*absorbed)(DType, int mode, const TrialPtrs&, int64_t begin, int64_t n, const Hp&, bool along_dm,
                   int64_t* out);
  // Over g[begin, begin + n): returns the number of non-finite entries and writes the float64 sum of g*g to sumsq.
  int64_t (*grad_check)(DType, const void* g, int64_t begin, int64_t n, double* sumsq);
};

extern const KernelTable kCpuBaseline;
extern const KernelTable kCpuAvx2;

}  // namespace lsfused
