"""``lsfused bench``: microbenchmarks of the fused ops and of whole optimizer steps, against baselines measured in
the same run. Results are appended to a CSV (one row per measurement) and can be plotted.

Times are optimizer-side only: gradients are set before a step and the closure returns a precomputed loss, so the
forward/backward cost is excluded. A step "with 3 backtracks" rejects its first three trials (the closure returns
inf) and accepts the fourth.

Each step row also gives the bytes per parameter that the step's fused ops move (``bytes_per_element``, counted by
``ByteCounter`` from the buffers and ranges each op touches, reads and writes), and ``floor x``, that over fused
Adam's 28 B: the ratio the step would have if both ran at the same bandwidth.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import lsfused
from lsfused import _ops
from lsfused.apps.baselines import PaperStyleAdamSLS
from lsfused.reference import MODE_ADAM, MODE_SGD, pairs

CSV_FIELDS = [
    "kind",
    "name",
    "backend",
    "scenario",
    "numel",
    "n_tensors",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "gbps",
    "ratio_to_fused_adam",
    "bytes_per_element",
    "machine",
    "torch",
    "lsfused",
    "date",
]

# bert-base-uncased with a 2-class head: 109.5M parameters in 201 tensors.
_H, _L, _FF = 768, 12, 3072
BERT_BASE = (
    [(30522, _H), (512, _H), (2, _H), (_H,), (_H,)]
    + [
        s
        for _ in range(_L)
        for s in [(_H, _H), (_H,)] * 4 + [(_H,), (_H,), (_FF, _H), (_FF,), (_H, _FF), (_H,), (_H,), (_H,)]
    ]
    + [(_H, _H), (_H,), (2, _H), (2,)]
)
# A small model: about 1M parameters in 20 tensors.
SMALL = [(512, 256), (256,)] * 6 + [(256, 512), (512,)] * 2 + [(10, 512), (10,)] * 2 + [(1000,), (1000,)] * 2

# Bytes moved per element by each op of the op table (fp32, beta1 = 0): Pass A reads g, w, v and writes v, w0;
# Pass B reads w0, g, v (the direction is recomputed) and writes w; restore reads w0 and writes w.
OP_BYTES = {"pass_a": 20, "pass_b": 16, "restore": 8}


def _nbytes(t, n: int) -> int:
    return 0 if t is None else n * t.element_size()


def _spans(ranges: list[int]) -> list[int]:
    return [b - a for a, b in pairs(ranges)]


class ByteCounter:
    """Wraps an optimizer's backend and adds up the bytes each fused op reads and writes, from the buffers and
    ranges it is given (an element read and written counts twice): the step's memory traffic, its floor."""

    def __init__(self, ops):
        self._ops, self.bytes = ops, 0

    def direction_and_norms(self, g, w, w0, v, m, ranges, hp, mode, with_dm=False, eta=None, trial_dm=False,
                            all_sums=True):  # fmt: skip
        etas = [math.nan] * (len(ranges) // 2) if eta is None else eta.tolist()
        for n, e in zip(_spans(ranges), etas, strict=True):
            moved = _nbytes(g, n) + _nbytes(w, n) + 2 * _nbytes(v, n) + 2 * _nbytes(m, n) + _nbytes(w0, n)
            self.bytes += moved + (0 if math.isnan(e) else _nbytes(w, n))  # the fused first trial writes w
        return self._ops.direction_and_norms(g, w, w0, v, m, ranges, hp, mode, with_dm, eta, trial_dm, all_sums)

    @staticmethod
    def _direction_bytes(g, v, m, n, mode, along_dm) -> int:
        """What recomputing the direction reads: g and v (d), m and v (dm; g when there is no m), g (SGD)."""
        if mode == MODE_SGD:
            return _nbytes(g, n)
        return _nbytes(v, n) + (_nbytes(m if m is not None else g, n) if along_dm else _nbytes(g, n))

    def trial_step(self, w, w0, g, v, m, ranges, hp, mode, eta, along_dm=False):
        self.bytes += sum(
            _nbytes(w, n) + _nbytes(w0, n) + self._direction_bytes(g, v, m, n, mode, along_dm) for n in _spans(ranges)
        )
        return self._ops.trial_step(w, w0, g, v, m, ranges, hp, mode, eta, along_dm)

    def restore(self, w, w0, ranges):
        self.bytes += sum(_nbytes(w, n) + _nbytes(w0, n) for n in _spans(ranges))
        return self._ops.restore(w, w0, ranges)

    def absorbed_counts(self, w, w0, g, v, m, ranges, hp, mode, along_dm=False):
        self.bytes += sum(
            _nbytes(w, n) + _nbytes(w0, n) + self._direction_bytes(g, v, m, n, mode, along_dm) for n in _spans(ranges)
        )
        return self._ops.absorbed_counts(w, w0, g, v, m, ranges, hp, mode, along_dm)

    def grad_check(self, g):  # non-finite count and squared norm: one read of g
        self.bytes += _nbytes(g, g.numel())
        return self._ops.grad_check(g)

    def scale_(self, g, factor):  # unscaling or clipping: g read and written
        self.bytes += 2 * _nbytes(g, g.numel())
        return self._ops.scale_(g, factor)

    def __getattr__(self, name):
        return getattr(self._ops, name)


def step_bytes_per_element(opt, step: Callable[[], object]) -> float:
    """Bytes per parameter that one call of ``step`` moves through the fused ops of ``opt`` (runs it once more)."""
    counter = ByteCounter(opt._ops)
    opt._ops = counter
    try:
        step()
    finally:
        opt._ops = counter._ops
    return counter.bytes / sum(b.numel for b in opt._buckets)


# torch Adam(fused=True) reads g, w, m, v and writes w, m, v: 7 fp32 buffers.
FUSED_ADAM_BYTES = 28.0


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


# One INFO record per measurement, so a long run shows where it is (``lsfused bench`` prints them on stderr).
log = logging.getLogger(__name__)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, float, float]:
    """(median, p20, p80) of ``fn``'s wall time in milliseconds."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def _backends(device: torch.device) -> list[str]:
    available = lsfused.available_backends()
    if device.type == "cpu":
        # Triton on CPU is only its interpreter: a correctness tool, not a backend to time.
        available = [b for b in available if b != "triton"]
    return available


def bench_ops(sizes: list[int], device: torch.device, repeats: int) -> list[dict]:
    rows = []
    for n in sizes:
        rows += _bench_ops_at(n, device, repeats)
        gc.collect()
    return rows


def _copy_roofline(n: int, device: torch.device, repeats: int) -> dict:
    """A torch copy of 2 x 10 B/element (Pass A reads 12 and writes 8): the roofline."""
    src = torch.empty(n * 5 // 2, device=device)
    dst = torch.empty_like(src)
    med, p20, p80 = timeit(lambda: dst.copy_(src), repeats)
    gbps = 2 * src.numel() * 4 / med / 1e6
    return dict(kind="op", name="copy", backend="torch", numel=n, median_ms=med, p20_ms=p20, p80_ms=p80, gbps=gbps)


def _bench_ops_at(n: int, device: torch.device, repeats: int) -> list[dict]:
    g, w, v = (torch.randn(n, device=device) for _ in range(3))
    v = v.abs()
    w0 = torch.empty_like(w)
    ranges, hp = [0, n], [0.0, 0.999, 1e-8, 1.0, math.sqrt(1 - 0.999**10), 1.0]
    eta = torch.tensor([1e-3], dtype=torch.float64, device=device)
    rows = [_copy_roofline(n, device, repeats)]
    for backend in _backends(device):
        ops = {  # Pass A as an optimizer runs it: without the sums only a recorder reads (all_sums=False)
            "pass_a": lambda b=backend: _ops.direction_and_norms(
                g, w, w0, v, None, ranges, hp, MODE_ADAM, False, b, False
            ),
            "pass_b": lambda b=backend: _ops.trial_step(w, w0, g, v, None, ranges, hp, MODE_ADAM, eta, False, b),
            "restore": lambda b=backend: _ops.restore(w, w0, ranges, b),
        }
        for name, fn in ops.items():
            med, p20, p80 = timeit(fn, repeats)
            log.info("%s [%s] n=%d: %.3f ms", name, backend, n, med)
            rows.append(
                dict(
                    kind="op",
                    name=name,
                    backend=backend,
                    numel=n,
                    median_ms=med,
                    p20_ms=p20,
                    p80_ms=p80,
                    gbps=OP_BYTES[name] * n / med / 1e6,
                )
            )
    return rows


def _make_params(shapes, device) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).mul_(0.02).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).mul_(1e-3).to(device)
    return params


class _Script:
    """A closure that rejects the first ``rejections`` trials of every step (inf), then accepts."""

    def __init__(self, rejections: int):
        self.rejections, self.calls = rejections, 0
        self.loss, self._reject, self._accept = torch.tensor(1.0), torch.tensor(math.inf), torch.tensor(-1e9)

    def reset(self) -> None:
        self.calls = 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self._reject if self.calls <= self.rejections else self._accept


def _lsfused_step(opt, script):
    def run():
        script.reset()
        for group in opt.param_groups:  # start every timed step from the same step size
            group["step_size"] = group["init_step_size"]
        with opt.step_rng():  # the scripted loss is deterministic: no re-evaluation of f(w0) (see step())
            loss = script.loss
        opt.step(script, loss=loss)

    return run


def timeit_against(fn: Callable[[], object], ref: Callable[[], object], repeats: int) -> tuple[float, ...]:
    """``timeit`` of ``fn``, plus the median time of ``ref`` measured in a block right before and right after it (the
    mean of the two): a ratio to that survives the drift of a shared machine, which moves measurements taken
    minutes apart by tens of percent."""
    before = timeit(ref, repeats)[0]
    med, p20, p80 = timeit(fn, repeats)
    after = timeit(ref, repeats)[0]
    return med, p20, p80, (before + after) / 2


def bench_steps(name: str, shapes, device: torch.device, repeats: int) -> list[dict]:
    """Step times; ``ratio_to_fused_adam`` divides each by a torch ``Adam(fused=True)`` step on a parameter list of
    the same shapes, timed in blocks right before and after it (``timeit_against``)."""
    numel = sum(math.prod(s) for s in shapes)
    rows = []
    ref_params = _make_params(shapes, device)
    ref = torch.optim.Adam(ref_params, lr=1e-3, fused=True)

    def add(opt_name, backend, scenario, fn, nbytes=math.nan):
        med, p20, p80, ref_med = timeit_against(fn, ref.step, repeats)
        log.info(
            "%s [%s] %s/%s: %.2f ms, %.2fx fused Adam, %.0f B/element",
            opt_name,
            backend,
            name,
            scenario,
            med,
            med / ref_med,
            nbytes,
        )
        rows.append(
            dict(
                kind="step",
                name=opt_name,
                backend=backend,
                scenario=f"{name}/{scenario}",
                numel=numel,
                n_tensors=len(shapes),
                median_ms=med,
                p20_ms=p20,
                p80_ms=p80,
                ratio_to_fused_adam=med / ref_med,
                bytes_per_element=nbytes,
            )
        )

    for variant, kwargs in (
        ("for-loop", {"foreach": False}),
        ("foreach", {"foreach": True}),
        ("fused", {"fused": True}),
    ):
        params = _make_params(shapes, device)
        opt = torch.optim.Adam(params, lr=1e-3, **kwargs)
        add(f"Adam ({variant})", "torch", "step", opt.step, FUSED_ADAM_BYTES if variant == "fused" else math.nan)
        del opt, params
        gc.collect()
    for rejections, scenario in ((0, "accepted"), (3, "3 backtracks")):
        params = _make_params(shapes, device)
        baseline = PaperStyleAdamSLS(params)
        script = _Script(rejections)

        def paper_step(baseline=baseline, script=script):
            script.reset()
            baseline.state["step_size"] = 0.1
            baseline.step(script, script.loss)

        add("paper-style ADAMSLS", "torch", scenario, paper_step)
        del baseline, params
        gc.collect()
        for backend in _backends(device):
            for opt_name in ("AdamSLS b1=0", "AdamSLS", "PLASLS", "SaLSa"):
                params = _make_params(shapes, device)
                if opt_name == "PLASLS":
                    k = max(1, len(params) // 10)
                    opt = lsfused.PLASLS([params[i : i + k] for i in range(0, len(params), k)], backend=backend)
                elif opt_name == "SaLSa":
                    opt = lsfused.SaLSa(params, backend=backend, speed_up=False)
                elif opt_name == "AdamSLS b1=0":  # no momentum: an accepted first trial is Pass A alone
                    opt = lsfused.AdamSLS(params, betas=(0.0, 0.999), backend=backend)
                else:  # the default: searched along d, applied along the momentum direction dm (authors' code)
                    opt = lsfused.AdamSLS(params, backend=backend)
                step = _lsfused_step(opt, _Script(rejections))
                add(opt_name, backend, scenario, step, step_bytes_per_element(opt, step))
                if rejections == 0 and backend == _backends(device)[0]:
                    rows.append(_memory_row(opt_name, backend, name, numel, opt))
                del opt, params
                gc.collect()
    rows += _baseline_memory_rows(name, numel, shapes, device)
    return rows


def _memory(name: str, backend: str, scenario: str, numel: int, bytes_per_param: float) -> dict:
    nan = float("nan")
    return dict(kind="memory", name=name, backend=backend, scenario=scenario, numel=numel, median_ms=nan, gbps=nan,
                ratio_to_fused_adam=bytes_per_param)  # fmt: skip


def _memory_row(opt_name, backend, scenario, numel, opt) -> dict:
    """Optimizer state (w0, v, m) per parameter; grads and weights are not counted."""
    extra = sum(t.numel() * t.element_size() for b in opt._buckets for t in (b.w0, b.v, b.m) if t is not None)
    return _memory(opt_name, backend, scenario, numel, extra / numel)


def _baseline_memory_rows(scenario, numel, shapes, device) -> list[dict]:
    """Adam keeps m and v (8 B); the paper-style step holds a parameter copy, a grad copy, v and the preconditioner
    (16 B) at its peak."""
    return [
        _memory("Adam (fused)", "torch", scenario, numel, 8.0),
        _memory("paper-style ADAMSLS", "torch", scenario, numel, 16.0),
    ]


def append_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    if not new:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != CSV_FIELDS:  # written by an older version: rewrite it with today's columns
                old = list(reader)
                with path.open("w", newline="") as out:
                    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
                    writer.writeheader()
                    writer.writerows({k: r.get(k) or "" for k in CSV_FIELDS} for r in old)
    stamp = dict(
        machine=machine(),
        torch=torch.__version__,
        lsfused=lsfused.__version__,
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in CSV_FIELDS} | stamp)


def format_rows(rows: list[dict]) -> str:
    lines = []
    ops = [r for r in rows if r["kind"] == "op"]
    if ops:
        lines.append(f"{'op':<9}{'backend':<11}{'numel':>11}{'median ms':>11}{'GB/s':>8}{'of copy':>9}")
        copy = {r["numel"]: r["gbps"] for r in ops if r["name"] == "copy"}
        for r in ops:
            share = r["gbps"] / copy[r["numel"]]
            lines.append(
                f"{r['name']:<9}{r['backend']:<11}{r['numel']:>11}{r['median_ms']:>11.3f}{r['gbps']:>8.2f}{share:>9.0%}"
            )
    steps = [r for r in rows if r["kind"] == "step"]
    if steps:
        lines.append("")
        lines.append(
            f"{'optimizer':<22}{'backend':<11}{'scenario':<22}{'median ms':>11}{'x fused Adam':>14}{'B/elem':>8}"
            f"{'floor x':>9}"
        )
        for r in steps:
            nbytes = r.get("bytes_per_element", math.nan)
            lines.append(
                f"{r['name']:<22}{r['backend']:<11}{r['scenario']:<22}{r['median_ms']:>11.2f}"
                f"{r['ratio_to_fused_adam']:>14.2f}{nbytes:>8.0f}{nbytes / FUSED_ADAM_BYTES:>9.2f}"
            )
    mem = [r for r in rows if r["kind"] == "memory"]
    if mem:
        lines.append("")
        lines.append("optimizer state + scratch, bytes per parameter (fp32):")
        for r in mem:
            lines.append(f"  {r['name']:<22}{r['ratio_to_fused_adam']:>5.1f}")
    return "\n".join(lines)


def run(quick: bool = False, csv_path: Path | None = None, device: str | None = None) -> list[dict]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if quick:
        rows = bench_ops([10**4, 10**6], dev, repeats=5)
        rows += bench_steps("small", SMALL, dev, repeats=5)
    else:
        rows = bench_ops([10**4, 10**5, 10**6, 10**7, 10**8], dev, repeats=9)
        rows += bench_steps("small", SMALL, dev, repeats=21)
        rows += bench_steps("bert-base", BERT_BASE, dev, repeats=7)
    if csv_path is not None:
        append_csv(rows, csv_path)
    return rows


def plot(csv_path: Path, out_dir: Path) -> list[Path]:
    """Figures from the newest run of each machine in the CSV: op bandwidth vs size, and step times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for mach in sorted({r["machine"] for r in rows}):
        mine = [r for r in rows if r["machine"] == mach]
        last = max(r["date"] for r in mine)
        run_rows = [r for r in mine if r["date"] == last]
        slug = "".join(ch if ch.isalnum() else "_" for ch in mach)[:40]
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        ax = axes[0]
        for key in sorted({(r["name"], r["backend"]) for r in run_rows if r["kind"] == "op"}):
            pts = sorted(
                (int(r["numel"]), float(r["gbps"]))
                for r in run_rows
                if r["kind"] == "op" and (r["name"], r["backend"]) == key
            )
            style = "k--" if key[0] == "copy" else "-o"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{key[0]} ({key[1]})", ms=3)
        ax.set_xscale("log")
        ax.set_xlabel("elements")
        ax.set_ylabel("GB/s")
        ax.set_title("fused ops vs copy bandwidth")
        ax.legend(fontsize=7)
        ax = axes[1]
        steps = [r for r in run_rows if r["kind"] == "step"]
        labels = [f"{r['name']} [{r['backend']}] {r['scenario']}" for r in steps]
        ax.barh(range(len(steps)), [float(r["ratio_to_fused_adam"]) for r in steps])
        ax.set_yticks(range(len(steps)), labels, fontsize=6)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("step time / torch Adam(fused=True)")
        ax.set_title("optimizer step (forward/backward excluded)")
        fig.suptitle(mach, fontsize=9)
        fig.tight_layout()
        path = out_dir / f"bench_{slug}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
