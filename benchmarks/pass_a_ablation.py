"""What bounds the cpp backend's Pass A on this CPU: the fused Pass A (fp32, ``betas[0] = 0``, with the
first trial) timed as an optimizer runs it (without the sums gg and dd, which only a recorder asks for), with them,
and with parts of its arithmetic removed, in the L2 cache (one thread) and on a
bert-base-sized buffer (all threads); and beside it the trial (Pass B), which recomputes d from g and v (reads w0, g,
v; writes w), in each variant (the divider edits apply to it too: the direction is one shared helper).

The variants are textual edits of a copy of ``csrc/cpu_kernels_impl.h`` (each must match exactly once, so a kernel
change makes this script fail rather than measure something else), compiled with the extension's flags plus AVX2
into a small driver (Pass B streams its stores from 2^21 elements on, as the extension's launcher does). Removing
arithmetic gives wrong numbers on purpose: only the times mean anything. No hardware
counters are needed (this VM has none: ``perf stat`` reports cycles as not supported).

    python benchmarks/pass_a_ablation.py [--out benchmarks/results/pass_a_ablation.csv]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lsfused" / "kernels"))
import _cpp_build  # noqa: E402 - the extension's flags, without importing torch
from _results import write_csv  # noqa: E402 - benchmarks/, this script's folder

FLAGS = [*_cpp_build.CXX_FLAGS, "-mavx2"]  # the whole driver is the AVX2 copy, as ops.cpp picks on this CPU

DIV = ("vsqrt(v) / h.sqrt_bc2 + h.eps", "v * h.sqrt_bc2 + h.eps")  # drops the sqrt and one division
DIV_D = ("return -(x / denom);", "return -(x * denom);")
DIV_S = ("s = g64 * g64 / to_f64(denom);", "s = g64 * g64 * to_f64(denom);")
SUM_GD = [("    acc_gd = acc_gd + gd;\n", "")]
# name -> (edits, all_sums)
VARIANTS = {
    "as shipped": ([], False),
    "as shipped, all sums (a recorder attached)": ([], True),
    "no divider ops (sqrt, 3 divisions)": ([DIV, DIV_D, DIV_S], False),
    "no float64 sums but s": (SUM_GD, False),
    "no divider ops, no sums but s": ([DIV, DIV_D, DIV_S, *SUM_GD], False),
}

DRIVER = r"""
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <omp.h>
#define LSFUSED_TABLE kT
#define LSFUSED_ISA_NAME "ablation"
#define LSFUSED_AVX2
#include "cpu_kernels_impl.h"
using namespace lsfused;

int main(int argc, char** argv) {
  const long n = atol(argv[1]);
  const int reps = atoi(argv[2]);
  const bool all_sums = atoi(argv[3]) != 0;
  float* buf[4];
  for (auto& p : buf) p = static_cast<float*>(aligned_alloc(64, n * sizeof(float)));
  float *g = buf[0], *w = buf[1], *w0 = buf[2], *v = buf[3];
#pragma omp parallel for
  for (long i = 0; i < n; ++i) {
    g[i] = ((i * 2654435761u) % 1000 / 1000.0f - 0.5f) * 1e-3f;
    w[i] = 0.5f, v[i] = 1e-8f, w0[i] = 0.0f;
  }
  const PassAPtrs ptr{g, w, w0, v, nullptr};
  const TrialPtrs trial{w, w0, g, v, nullptr};
  Hp hp{0.0, 0.999, 1e-8, 1.0, 0.0316, 1.0, 1e-3, 1};
  hp.all_sums = all_sums;
  const long chunk = 1 << 16;
  auto best_ms = [&](auto&& body) {
    double best = 1e300;
    for (int r = 0; r < reps; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel for schedule(static)
      for (long c = 0; c < n; c += chunk) body(c, std::min(chunk, n - c));
      best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    return best;
  };
  const double a = best_ms([&](long c, long m) {
    double out[5];  // not checked: with parts removed the sums are wrong on purpose
    kT.pass_a(DType::kF32, 1, ptr, c, m, hp, out, false);
  });
  const bool stream = n >= (1L << 21);  // ops.cpp's kStreamFrom
  const double b = best_ms([&](long c, long m) { kT.trial_step(DType::kF32, 1, trial, c, m, hp, false, stream); });
  printf("%.4f %.4f\n", a, b);
}
"""


def build(variant: list[tuple[str, str]], work: Path) -> Path:
    text = (ROOT / "csrc" / "cpu_kernels_impl.h").read_text()
    for old, new in variant:
        if text.count(old) != 1:
            raise SystemExit(f"ablation edit {old!r} matches {text.count(old)} times: update this script")
        text = text.replace(old, new)
    (work / "cpu_kernels_impl.h").write_text(text)
    (work / "cpu_kernels.h").write_text((ROOT / "csrc" / "cpu_kernels.h").read_text())
    (work / "driver.cpp").write_text(DRIVER)
    exe = work / "driver"
    subprocess.run(["g++", *FLAGS, f"-I{work}", str(work / "driver.cpp"), "-o", str(exe)], check=True)
    return exe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/pass_a_ablation.csv")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the variants (min taken)")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    runs = [("in L2", 16384, 20000, 1), ("bert-base", 109_500_000, 3, threads)]
    with tempfile.TemporaryDirectory() as tmp:
        exes = {}
        for name, (variant, all_sums) in VARIANTS.items():
            work = Path(tmp) / str(len(exes))
            work.mkdir()
            exes[name] = (build(variant, work), all_sums)
        rows = []
        for where, n, reps, nthreads in runs:
            best: dict[str, list[float]] = {}
            for _ in range(args.rounds):  # interleaved: the VM's bandwidth drifts between minutes
                for name, (exe, all_sums) in exes.items():
                    env = {**os.environ, "OMP_NUM_THREADS": str(nthreads)}
                    cmd = [str(exe), str(n), str(reps), str(int(all_sums))]
                    out = subprocess.run(cmd, check=True, env=env, capture_output=True)
                    times = [float(x) for x in out.stdout.split()]
                    best[name] = [min(a, b) for a, b in zip(best.get(name, times), times, strict=True)]
            base = best["as shipped"][0]
            for name, (pass_a, trial) in best.items():
                ns = pass_a * 1e6 / n * nthreads
                row = dict(where=where, variant=name, threads=nthreads, pass_a_ms=pass_a, ns_per_elem_thread=ns,
                           of_shipped=pass_a / base, trial_ms=trial)  # fmt: skip
                rows.append(row)
                print(f"{where:<10} {name:<38} Pass A {pass_a:9.3f} ms {ns:6.3f} ns/elem/thread {pass_a / base:5.2f}x"
                      f" | trial {trial:8.3f} ms", flush=True)  # fmt: skip
    write_csv(args.out, rows)


if __name__ == "__main__":
    main()
