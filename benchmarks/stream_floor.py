"""The memory floor of each pass on this CPU: loops with the access pattern of fused Adam, the check, Pass A with
the fused first trial and a further trial, but almost no arithmetic (one add or multiply per element and stream),
over bert-base's number of fp32 elements, all threads. What each pattern takes against the Adam-shaped loop is
the ratio that the real passes cannot beat here, whatever their arithmetic.

    python benchmarks/stream_floor.py [--rounds 5] [--out benchmarks/results/stream_floor.csv]

The patterns (r: read, m: read and written in place, w: written only, nt: written with streaming stores):

- fused Adam: r g, m w, m m, m v (28 B per element);
- check: r g (4 B);
- Pass A with the first trial, as the optimizers run it: r g, m w, m v, w w0 (28 B: w0's lines are read before
  they are written), and the same with w0 streamed;
- a further trial: r w0, r g, r v, nt w (16 B);
- and, to name the costs of the kinds of stream: one in-place stream, a copy (read one, write another), a streamed
  copy (the check is one read stream).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lsfused" / "kernels"))
import _cpp_build  # noqa: E402 - the extension's flags, without importing torch
from _results import write_csv  # noqa: E402 - benchmarks/, this script's folder

N = 109_500_000  # bert-base's parameters

DRIVER = r"""
#include <immintrin.h>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

typedef float v8 __attribute__((vector_size(32)));
static inline v8 ld(const float* p) { v8 x; std::memcpy(&x, p, 32); return x; }
static inline void st(float* p, v8 x) { std::memcpy(p, &x, 32); }
static inline void nt(float* p, v8 x) { _mm256_stream_ps(p, (__m256)x); }

int main(int argc, char** argv) {
  const long n = atol(argv[1]) / 64 * 64;
  const int reps = atoi(argv[2]);
  const std::string which = argv[3];
  float* b[5];
  for (auto& p : b) p = static_cast<float*>(aligned_alloc(64, n * sizeof(float)));
#pragma omp parallel for
  for (long i = 0; i < n; ++i) for (auto* p : b) p[i] = 1.0f;
  float *g = b[0], *w = b[1], *x = b[2], *v = b[3], *y = b[4];
  const v8 k = v8{} + 0.5f;
  float sink = 0;
  auto run = [&](auto&& body) {
    double best = 1e300;
    for (int r = 0; r < reps; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      float total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total)
      for (long i0 = 0; i0 < n; i0 += 1 << 15) {
        v8 acc = {};
        for (long i = i0; i < std::min(n, i0 + (1L << 15)); i += 8) body(i, acc);
        for (int j = 0; j < 8; ++j) total += acc[j];
      }
      _mm_sfence();
      sink += total;
      best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    return best;
  };
  double ms = -1;
  if (which == "in_place") ms = run([&](long i, v8& a) { st(w + i, ld(w + i) * k); });
  if (which == "copy") ms = run([&](long i, v8& a) { st(y + i, ld(g + i)); });
  if (which == "copy_streamed") ms = run([&](long i, v8& a) { nt(y + i, ld(g + i)); });
  if (which == "fused_adam") ms = run([&](long i, v8& a) {
    const v8 gi = ld(g + i);
    st(x + i, ld(x + i) * k + gi);
    st(v + i, ld(v + i) * k + gi);
    st(w + i, ld(w + i) + gi);
  });
  if (which == "check") ms = run([&](long i, v8& a) { a += ld(g + i); });
  if (which == "pass_a") ms = run([&](long i, v8& a) {
    const v8 gi = ld(g + i), wi = ld(w + i);
    st(y + i, wi);
    st(v + i, ld(v + i) * k + gi);
    st(w + i, wi + gi);
  });
  if (which == "pass_a_w0_streamed") ms = run([&](long i, v8& a) {
    const v8 gi = ld(g + i), wi = ld(w + i);
    nt(y + i, wi);
    st(v + i, ld(v + i) * k + gi);
    st(w + i, wi + gi);
  });
  if (which == "trial") ms = run([&](long i, v8& a) { nt(w + i, ld(y + i) + ld(g + i) * ld(v + i)); });
  printf("%.4f %g\n", ms, sink);
  return ms < 0;
}
"""

PATTERNS = ["in_place", "copy", "copy_streamed", "fused_adam", "check", "pass_a", "pass_a_w0_streamed",
            "trial"]  # fmt: skip


def machine() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0] if names else platform.processor()}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the patterns")
    parser.add_argument("--reps", type=int, default=3, help="repeats per run (the best is kept)")
    parser.add_argument("--n", type=int, default=N)
    parser.add_argument("--out", default="benchmarks/results/stream_floor.csv")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "driver"
        (Path(tmp) / "driver.cpp").write_text(DRIVER)
        flags = [*_cpp_build.CXX_FLAGS, "-mavx2"]
        subprocess.run(["g++", *flags, str(Path(tmp) / "driver.cpp"), "-o", str(exe)], check=True)
        times: dict[str, list[float]] = {p: [] for p in PATTERNS}
        adam_of_round: list[float] = []
        for _ in range(args.rounds):  # interleaved: this VM's bandwidth drifts between minutes
            for p in PATTERNS:
                out = subprocess.run([str(exe), str(args.n), str(args.reps), p], check=True, capture_output=True)
                times[p].append(float(out.stdout.split()[0]))
            adam_of_round.append(times["fused_adam"][-1])
    # the accepted step: the check, then Pass A with the first trial
    times["check + pass_a"] = [c + a for c, a in zip(times["check"], times["pass_a"], strict=True)]
    rows = []
    threads = os.cpu_count()
    for p, ts in times.items():
        ratios = [t / a for t, a in zip(ts, adam_of_round, strict=True)]
        row = dict(pattern=p, n=args.n, threads=threads, ms_median=statistics.median(ts),
                   of_adam=statistics.median(ratios), of_adam_min=min(ratios), of_adam_max=max(ratios),
                   machine=machine())  # fmt: skip
        rows.append(row)
        print(f"{p:<20} {row['ms_median']:7.1f} ms  {row['of_adam']:.2f}x the Adam-shaped loop "
              f"({row['of_adam_min']:.2f}-{row['of_adam_max']:.2f})", flush=True)  # fmt: skip
    write_csv(args.out, rows)


if __name__ == "__main__":
    main()
