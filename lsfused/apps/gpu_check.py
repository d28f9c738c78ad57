"""``make gpu-check`` (``python -m lsfused.apps.gpu_check``): everything a CUDA machine can tell that a CPU cannot,
in one command and one table, in a few minutes.

1. The tests whose ops run on the GPU when one is present (``tests/test_ops.py``, ``test_backend_parity.py``,
   ``test_fused_trial.py``, ``test_optim_fused_trial.py``: every GPU backend against the reference, bit for bit),
   with Triton compiled rather than interpreted.
2. ``lsfused bench --quick --device cuda``: Pass A and Pass B bandwidth against a device copy, and the accepted step
   and the steps with backtracks against ``torch.optim.Adam(fused=True)``, for every GPU backend.
3. Peak memory per optimizer (``torch.cuda.max_memory_allocated`` over building it and 3 steps, above the model's
   weights and gradients), per parameter, against fused Adam's.

Without a CUDA device it stops at once with exit status 2 and says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

GPU_TESTS = ("tests/test_ops.py", "tests/test_backend_parity.py", "tests/test_fused_trial.py")
GPU_TESTS += ("tests/test_optim_fused_trial.py",)


def require_gpu() -> None:
    """Exit with status 2 and the reason when this process sees no CUDA device."""
    if not torch.cuda.is_available():
        build = torch.version.cuda or "none (a CPU-only build)"
        sys.stderr.write(
            f"gpu-check needs a CUDA device, and torch.cuda.is_available() is False here (torch {torch.__version__}, "
            f"CUDA build: {build}). Run it on a machine with an NVIDIA GPU and a CUDA build of torch.\n"
        )
        raise SystemExit(2)


def run_tests(root: Path) -> dict[str, object]:
    """The GPU-relevant test files, with Triton compiled (``TRITON_INTERPRET`` unset): passed/failed/skipped."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS],
        cwd=root, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
    return {"ok": out.returncode == 0, "summary": summary, "seconds": time.perf_counter() - start}


def peak_memory(name: str, numel: int = 2**26, n_tensors: int = 8, steps: int = 3) -> dict[str, float]:
    """Bytes per parameter above the model's weights and gradients, on the GPU: at the peak (over building and
    ``steps`` steps) and after the steps."""
    from lsfused.apps.memory import OPTIMIZERS, make_params, step_all

    params = make_params(numel, n_tensors, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    opt = OPTIMIZERS[name](params)
    step_all(opt, params, steps)
    torch.cuda.synchronize()
    result = {
        "peak": (torch.cuda.max_memory_allocated() - base) / numel,
        "steady": (torch.cuda.memory_allocated() - base) / numel,
    }
    del opt, params
    torch.cuda.empty_cache()
    return result


def table(tests: dict[str, object], bench_rows: list[dict], memory_rows: dict[str, dict[str, float]]) -> str:
    """One Markdown table: the tests, then every bench row, then memory per optimizer."""
    lines = ["| check | what | result |", "|---|---|---|"]
    lines.append(f"| tests | {', '.join(GPU_TESTS)} | {tests['summary']} ({tests['seconds']:.0f} s) |")
    for r in bench_rows:
        if r["kind"] == "op":
            ratio = f", {r['ratio_to_copy']:.2f}x copy" if r.get("ratio_to_copy") else ""
            lines.append(f"| op | {r['name']} [{r['backend']}] {r['numel']} | {float(r['gbps']):.0f} GB/s{ratio} |")
        else:
            what = f"{r['name']} [{r['backend']}] {r['scenario']}"
            lines.append(f"| step | {what} | {float(r['ratio_to_fused_adam']):.2f}x fused Adam |")
    adam = memory_rows.get("adam-fused", {}).get("peak")
    for name, m in memory_rows.items():
        minus = f", {m['peak'] - adam:+.1f} vs fused Adam" if adam is not None else ""
        lines.append(f"| memory | {name} | peak {m['peak']:.1f} B/param, after steps {m['steady']:.1f}{minus} |")
    return "\n".join(lines)


def main() -> int:
    require_gpu()
    from lsfused.apps import bench
    from lsfused.apps.memory import OPTIMIZERS

    root = Path(__file__).resolve().parents[2]
    tests = run_tests(root)
    rows = bench.run(quick=True, device="cuda")
    copies = {r["numel"]: float(r["gbps"]) for r in rows if r["kind"] == "op" and r["name"] == "copy"}
    for r in rows:
        if r["kind"] == "op" and r["name"] != "copy" and copies.get(r["numel"]):
            r["ratio_to_copy"] = float(r["gbps"]) / copies[r["numel"]]
    memory_rows = {name: peak_memory(name) for name in OPTIMIZERS}
    print(f"machine: {bench.machine()}")
    print(table(tests, rows, memory_rows))
    return 0 if tests["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
