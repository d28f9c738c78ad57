"""The ``cpp`` backend (C++ extension) beyond the shared op/parity tests: thread-count independence, the streaming
path for large buffers, the baseline-ISA copy, trials and absorbed counts that recompute the direction, input checks,
fallbacks when the extension is missing or broken, and an nvcc compile of the CUDA kernels.

The shared tests (test_ops.py, test_backend_parity.py) already run every op and optimizer on ``cpp`` against the
torch reference once it is available: elementwise results bit-identical, sums within 1e-12 of an fsum.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import lsfused
from lsfused import reference as ref
from lsfused.kernels import _cpp_build

CPP = lsfused.backends()["cpp"] is None
needs_cpp = pytest.mark.skipif(not CPP, reason=f"cpp backend unavailable: {lsfused.backends()['cpp']}")
HP = [0.9, 0.999, 1e-8, 1 - 0.9**3, math.sqrt(1 - 0.999**3), 1.0]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def buffers(n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.randn(n, generator=gen).to(dtype)
    w = torch.randn(n, generator=gen).to(dtype)
    v = torch.rand(n, generator=gen, dtype=sdt) * 0.01
    m = torch.randn(n, generator=gen, dtype=sdt) * 0.1
    return g, w, v, m


def pass_a(backend, g, w, v, m, ranges, mode=ref.MODE_ADAM, hp=HP):
    """Pass A on copies of the moments (Adam ``with_dm``: the gdm sum too); the sums and the written buffers."""
    out = {"w0": torch.full((g.numel(),), math.nan, dtype=v.dtype), "v": v.clone(), "m": m.clone()}
    if mode == ref.MODE_SGD:
        out["v"] = out["m"] = None
    adam = mode == ref.MODE_ADAM
    sums = lsfused._ops.direction_and_norms(
        g, w, out["w0"], out["v"], out["m"], ranges, hp * (len(ranges) // 2), mode, adam, backend
    )
    return sums, out


def assert_same_outputs(a, b):
    for key in a:
        assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key]), key


def pass_a_matching_reference(g, w, v, m, ranges, mode, hp=HP):
    """Pass A on ``cpp``, checked against the torch reference: outputs bit for bit, sums within 1e-12."""
    sums, out = pass_a("cpp", g, w, v, m, ranges, mode, hp)
    ref_sums, ref_out = pass_a("torch", g, w, v, m, ranges, mode, hp)
    assert_same_outputs(out, ref_out)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-12, atol=0)
    return sums, out


@needs_cpp
def test_auto_prefers_cpp_on_cpu():
    model = torch.nn.Linear(3, 2)
    assert lsfused.AdamSLS(model.parameters()).backend == "cpp"


@needs_cpp
def test_sums_do_not_depend_on_the_thread_count():
    n = 300_001  # ~10 chunks, several ranges, one not starting on a vector boundary
    g, w, v, m = buffers(n, torch.float32)
    ranges = [0, 100_003, 100_003, 250_000, 250_000, n]
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results[threads] = pass_a("cpp", g, w, v, m, ranges)
    finally:
        torch.set_num_threads(before)
    sums1, out1 = results[1]
    for threads in (2, 4):
        sums, out = results[threads]
        assert torch.equal(sums, sums1), f"{threads} threads"  # bit for bit
        assert_same_outputs(out, out1)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_buffers_take_the_streaming_path_bit_exactly(dtype):
    """Above 2^21 elements, Pass B, restore and SGD's Pass A stream their stores; ranges may start unaligned."""
    n = (1 << 21) + 37
    g, w, v, m = buffers(n, dtype, seed=5)
    ranges = [0, 3, 3, 1_000_001, 1_000_001, n]
    hp = HP * 3
    eta = torch.tensor([0.5, 1e-3, 0.25], dtype=torch.float64)
    for mode in (ref.MODE_SGD, ref.MODE_ADAM):
        _, out = pass_a_matching_reference(g, w, v, m, ranges, mode)
        w0, v1, m1 = out["w0"], out["v"], out["m"]
        for along_dm in (False, True) if mode == ref.MODE_ADAM else (False,):
            expected, got = w.clone(), w.clone()
            ref.trial_step(expected, w0, g, v1, m1, ranges, hp, mode, eta, along_dm)
            lsfused._ops.trial_step(got, w0, g, v1, m1, ranges, hp, mode, eta, along_dm, "cpp")
            assert torch.equal(got, expected), (mode, along_dm)
            lsfused._ops.restore(got, w0, ranges, "cpp")
            assert torch.equal(got, w)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_ranges_tails_and_weight_decay(dtype):
    sizes = [0, 1, 5, 8, 9, 17, 0, 33]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    ranges = [x for a, b in zip(offsets[:-1], offsets[1:], strict=True) for x in (a, b)]
    g, w, v, m = buffers(offsets[-1], dtype, seed=2)
    hp = HP[:5] + [1.0 - 0.01 * 0.3]  # wd_scale != 1
    for mode in (ref.MODE_SGD, ref.MODE_ADAM):
        sums, _ = pass_a_matching_reference(g, w, v, m, ranges, mode, hp)
        assert sums[0].abs().sum() == 0 and sums[6].abs().sum() == 0  # empty ranges


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_check_counts_nonfinite_and_sums_squares(dtype):
    from lsfused.kernels import cpp_ops

    g = (torch.randn(100_003) * 3).to(dtype)
    exact = math.fsum(x * x for x in g.double().tolist())
    count, sumsq = cpp_ops.grad_check(g)
    assert count == 0
    assert sumsq == pytest.approx(exact, rel=1e-13)
    threads = torch.get_num_threads()
    try:  # chunk sums are added in chunk order: the same bits with one thread
        torch.set_num_threads(1)
        assert cpp_ops.grad_check(g) == (0, sumsq)
    finally:
        torch.set_num_threads(threads)
    g[[0, 17, 50_000, 100_002]] = torch.tensor([math.inf, -math.inf, math.nan, math.nan], dtype=dtype)
    assert cpp_ops.grad_check(g)[0] == 4 == int((~torch.isfinite(g)).sum())
    assert cpp_ops.grad_check(g[:0]) == (0, 0.0)


@needs_cpp
def test_grad_check_fp64_overflow_is_not_a_nonfinite_entry():
    # Entries are counted only when the sum of squares is not finite; an fp64 square may overflow on finite entries.
    from lsfused.kernels import cpp_ops

    g = torch.full((1000,), 1e200, dtype=torch.float64)
    assert cpp_ops.grad_check(g) == (0, math.inf)
    g[999] = -math.inf
    assert cpp_ops.grad_check(g) == (1, math.inf)


# (mode, with a momentum buffer m, along dm): every direction a trial or the absorbed count recomputes.
DIRECTIONS = [
    (ref.MODE_SGD, False, False),
    (ref.MODE_ADAM, False, False),
    (ref.MODE_ADAM, True, False),
    (ref.MODE_ADAM, False, True),
    (ref.MODE_ADAM, True, True),
]


def check_trials_and_absorbed(g, w, v, m, ranges, hp, etas):
    """trial_step then absorbed_counts on ``cpp`` equal the reference's bit for bit, along every direction."""
    from lsfused.kernels import cpp_ops

    w0 = w.to(v.dtype)
    eta = torch.tensor(etas, dtype=torch.float64)
    for mode, with_m, along_dm in DIRECTIONS:
        moments = (None, None) if mode == ref.MODE_SGD else (v, m if with_m else None)
        expected, got = w.clone(), w.clone()
        ref.trial_step(expected, w0, g, *moments, ranges, hp, mode, eta, along_dm)
        cpp_ops.trial_step(got, w0, g, *moments, ranges, hp, mode, eta, along_dm)
        assert torch.equal(got, expected), (mode, with_m, along_dm)
        counts = ref.absorbed_counts(expected, w0, g, *moments, ranges, hp, mode, along_dm)
        assert torch.equal(cpp_ops.absorbed_counts(expected, w0, g, *moments, ranges, hp, mode, along_dm), counts)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 4097])
def test_trials_and_absorbed_counts_recompute_the_direction_bit_exactly(dtype, n):
    """Along d and dm (Adam with and without m, SGD), on tails of every length; an empty range; eps = 0 on the last
    range, where a zero-padded tail lane would be 0/0 = NaN (a moving element) unless masked out."""
    g, w, v, m = buffers(n, dtype, seed=n)
    g[::5] = 0.0  # dir == 0: not moving
    cut = n // 3
    ranges = [0, cut, cut, cut, cut, n]
    hp = HP + HP[:5] + [0.99] + HP[:2] + [0.0] + HP[3:]
    # a step that moves every element, one that moves none (absorbed everywhere), one in between
    check_trials_and_absorbed(g, w, v, m, ranges, hp, [0.5, 1e-3, 1e-30])
    check_trials_and_absorbed(g, w, v, m, ranges, hp, [1e-30, 1e-3, 0.25])


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_absorbed_counts_match_reference(dtype):
    from lsfused.kernels import cpp_ops

    n = 100_003
    g, w, v, m = buffers(n, dtype, seed=4)
    g[::7] = 0.0
    g[5] = math.nan
    w0 = w.to(v.dtype)
    ranges = [0, 13, 13, 13, 13, 60_000, 60_000, n]
    hp = HP * 4
    for mode, with_m, along_dm in DIRECTIONS:
        moments = (None, None) if mode == ref.MODE_SGD else (v, m if with_m else None)
        w = w0.to(dtype)
        eta = torch.tensor([1e-9, 0.5, 1e-4, 1e-30], dtype=torch.float64)
        ref.trial_step(w, w0, g, *moments, ranges, hp, mode, eta, along_dm)
        w[3] = math.nan
        got = cpp_ops.absorbed_counts(w, w0, g, *moments, ranges, hp, mode, along_dm)
        expected = ref.absorbed_counts(w, w0, g, *moments, ranges, hp, mode, along_dm)
        assert torch.equal(got, expected), (mode, with_m, along_dm)
        assert expected[:, 1].sum() > 0 and (expected[:, 1] < expected[:, 0]).any()  # both kinds occur


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_absorbed_counts_recompute_the_direction_not_g_nonzero(dtype):
    """A tiny g over a large v: g/denom underflows to 0, so the element does not move although g != 0 (fp16's range
    is too narrow for this)."""
    from lsfused.kernels import cpp_ops

    tiny, huge = (1e-300, 1e300) if dtype == torch.float64 else (1e-38, 1e30)
    n = 4097
    g, w, v, _ = buffers(n, dtype, seed=3)
    g[1::2], v[1::2] = tiny, huge
    assert (g[1::2] != 0).all()
    w0 = w.to(v.dtype)
    ranges = [0, 100, 100, n]
    hp, eta = HP * 2, torch.tensor([0.5, 1e-3], dtype=torch.float64)
    for along_dm in (False, True):  # without m: dm's source is g too
        w = w0.to(dtype)
        cpp_ops.trial_step(w, w0, g, v, None, ranges, hp, ref.MODE_ADAM, eta, along_dm)
        expected = ref.absorbed_counts(w, w0, g, v, None, ranges, hp, ref.MODE_ADAM, along_dm)
        assert expected[:, 0].tolist() == [50, (n - 100 + 1) // 2]  # the even elements only
        assert torch.equal(cpp_ops.absorbed_counts(w, w0, g, v, None, ranges, hp, ref.MODE_ADAM, along_dm), expected)
        assert torch.equal(w[1::2], w0[1::2].to(dtype))  # w0 + eta*0


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_first_trial_equals_pass_a_then_trial_step(dtype):
    """Pass A with eta (NaN: no trial on that range) writes what Pass A followed by trial_step on the other ranges
    writes, bit for bit, with the same sums; and what the reference's fused Pass A writes."""
    from lsfused.kernels import cpp_ops

    n = 4097
    g, w, v, m = buffers(n, dtype, seed=6)
    ranges = [0, 7, 7, 1000, 1000, n]
    hp = HP * 3
    eta = torch.tensor([0.5, math.nan, 1e-3], dtype=torch.float64)
    tried = [0, 7, 1000, n]
    for mode, with_m, trial_dm in DIRECTIONS:
        adam = mode == ref.MODE_ADAM
        results = []
        for how in ("fused", "then trial", "reference"):
            wr, w0 = w.clone(), torch.full((n,), math.nan, dtype=v.dtype)
            vr, mr = (v.clone(), m.clone() if with_m else None) if adam else (None, None)
            if how == "then trial":
                sums = cpp_ops.direction_and_norms(g, wr, w0, vr, mr, ranges, hp, mode, adam)
                cpp_ops.trial_step(wr, w0, g, vr, mr, tried, HP * 2, mode, eta[[0, 2]], trial_dm)
            else:
                impl = cpp_ops if how == "fused" else ref
                sums = impl.direction_and_norms(g, wr, w0, vr, mr, ranges, hp, mode, adam, eta, trial_dm)
            results.append((sums, wr, w0, vr, mr))
        (fused, unfused, reference) = results
        assert torch.equal(fused[0], unfused[0])
        torch.testing.assert_close(fused[0], reference[0], rtol=1e-12, atol=0)
        for a, b, c in zip(fused[1:], unfused[1:], reference[1:], strict=True):
            assert (a is None and b is None and c is None) or (torch.equal(a, b) and torch.equal(a, c))
        assert torch.equal(fused[1][7:1000], w[7:1000])  # the range without a trial keeps w


@needs_cpp
def test_input_checks():
    ops = torch.ops.lsfused_cpp
    g, w, v, _ = buffers(10, torch.float32)
    w0 = torch.empty(10)
    eta = torch.tensor([0.5], dtype=torch.float64)
    before = w.clone()
    with pytest.raises(RuntimeError, match="w0 must be Float"):
        ops.direction_and_norms(g, w, w0.double(), v, None, [0, 10], HP, 1)
    with pytest.raises(RuntimeError, match="not inside"):
        ops.direction_and_norms(g, w, w0, v, None, [0, 11], HP, 1)
    with pytest.raises(RuntimeError, match="pairs"):
        ops.restore(w, w0, [0])
    with pytest.raises(RuntimeError, match="hp must hold"):
        ops.direction_and_norms(g, w, w0, v, None, [0, 10], HP[:5], 1)
    with pytest.raises(RuntimeError, match="needs the second moment"):
        ops.direction_and_norms(g, w, w0, None, None, [0, 10], HP, 1)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.restore(w, torch.empty(20)[::2], [0, 10])
    with pytest.raises(ValueError, match="trial_dm needs with_dm"):
        ops.direction_and_norms(g, w, w0, v, None, [0, 10], HP, 1, False, eta, True)
    with pytest.raises(ValueError, match="SGD has no momentum direction"):
        ops.direction_and_norms(g, w, w0, None, None, [0, 10], HP, 0, True, eta)
    with pytest.raises(ValueError, match="SGD has no momentum direction"):
        ops.trial_step(w, w0, g, None, None, [0, 10], HP, 0, eta, True)
    with pytest.raises(ValueError, match="SGD has no momentum direction"):
        ops.absorbed_counts(w, w0, g, None, None, [0, 10], HP, 0, True)
    with pytest.raises(RuntimeError, match="hp must hold"):
        ops.trial_step(w, w0, g, v, None, [0, 10], HP + [0.0], 1, eta)
    with pytest.raises(RuntimeError, match="hp must hold"):
        ops.absorbed_counts(w, w0, g, v, None, [0, 5, 5, 10], HP, 1)
    with pytest.raises(RuntimeError, match="g must be Float"):
        ops.trial_step(w, w0, g.double(), v, None, [0, 10], HP, 1, eta)
    with pytest.raises(RuntimeError, match="needs the second moment"):
        ops.trial_step(w, w0, g, None, None, [0, 10], HP, 1, eta)
    with pytest.raises(RuntimeError, match="m must be a contiguous"):
        ops.trial_step(w, w0, g, v, torch.empty(5), [0, 10], HP, 1, eta, True)
    with pytest.raises(RuntimeError, match="v must be Float"):
        ops.absorbed_counts(w, w0, g, v.double(), None, [0, 10], HP, 1)
    with pytest.raises(RuntimeError, match="eta needs one entry per range"):
        ops.trial_step(w, w0, g, v, None, [0, 5, 5, 10], HP * 2, 1, eta)
    assert torch.equal(w, before)  # every check ran before anything was written


def run_python(code: str, **env) -> dict:
    """Run ``code`` in a fresh interpreter (so this process keeps its loaded extension); it prints one JSON line."""
    inherited = {k: v for k, v in os.environ.items() if k != "LSFUSED_SKIP_EXT"}  # each test says what it wants
    full_env = {**inherited, **env}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_cpp
def test_baseline_isa_copy_matches_reference_and_avx2_sums(tmp_path):
    """LSFUSED_CPU_ISA=baseline forces the SSE2 copy; its sums equal the default copy's bit for bit (8 logical lanes
    in both), and its trials and absorbed counts the reference's."""
    code = f"""
        import json, torch, lsfused
        from lsfused.kernels import cpp_ops
        import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_cpp import HP, buffers, check_trials_and_absorbed, pass_a
        assert cpp_ops.cpu_isa() == "baseline", cpp_ops.cpu_isa()
        res = {{}}
        for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            g, w, v, m = buffers(70_001, dt, seed=9)
            check_trials_and_absorbed(g, w, v, m, [0, 7, 7, 70_001], HP * 2, [0.5, 1e-3])
            sums, out = pass_a("cpp", g, w, v, m, [0, 7, 7, 70_001])
            ref_sums, ref_out = pass_a("torch", g, w, v, m, [0, 7, 7, 70_001])
            same = all(torch.equal(out[k], ref_out[k]) for k in out)
            res[str(dt)] = [same, sums.tolist()]
        print(json.dumps(res))
    """
    res = run_python(code, LSFUSED_CPU_ISA="baseline")
    for dt in DTYPES:
        same, sums = res[str(dt)]
        assert same, dt
        g, w, v, m = buffers(70_001, dt, seed=9)
        mine, _ = pass_a("cpp", g, w, v, m, [0, 7, 7, 70_001])
        assert mine.tolist() == sums, dt


FALLBACK_CHECK = """
    import json, torch, lsfused
    reason = lsfused.backends()["cpp"]
    model = torch.nn.Linear(3, 2)
    try:
        lsfused.AdamSLS(model.parameters(), backend="cpp")
        raised = None
    except ValueError as err:
        raised = str(err)
    opt = lsfused.AdamSLS(model.parameters(), backend="auto")
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    print(json.dumps({"reason": reason, "raised": raised, "auto": opt.backend, "outcome": opt.last_step.outcome}))
"""


def assert_falls_back(res, reason_part):
    assert isinstance(res["reason"], str) and reason_part in res["reason"], res["reason"]
    assert res["raised"] is not None and res["reason"] in res["raised"]
    assert res["auto"] == "torch-fast" and res["outcome"] in ("accepted", "failed", "unresolvable")


def test_skip_ext_env_falls_back_to_torch_fast():
    assert_falls_back(run_python(FALLBACK_CHECK, LSFUSED_SKIP_EXT="1"), "LSFUSED_SKIP_EXT=1")


def test_broken_build_falls_back_to_torch_fast(tmp_path):
    src = tmp_path / "csrc"
    src.mkdir()
    for name in _cpp_build.CPU_SOURCES:
        (src / name).write_text("this is not C++ @@@\n")
    env = {"LSFUSED_EXT_SOURCE_DIR": str(src), "LSFUSED_BUILD_DIR": str(tmp_path / "build")}
    assert_falls_back(run_python(FALLBACK_CHECK, **env), "could not be built")


def test_build_cache_is_keyed_on_the_sources(tmp_path):
    """Two checkouts (or versions) with different sources never share a cache directory; identical ones do."""
    from lsfused.kernels import cpp_ops

    names = _cpp_build.CPU_SOURCES
    copies = []
    for i in range(3):
        src = tmp_path / f"csrc{i}"
        shutil.copytree(_cpp_build.CSRC, src)
        copies.append(src)
    (copies[2] / "cpu_kernels.h").write_text((copies[2] / "cpu_kernels.h").read_text() + "\n// changed\n")
    dirs = [cpp_ops._build_dir(False, src, names) for src in copies]
    assert dirs[0] == dirs[1] and dirs[0] != dirs[2]
    assert cpp_ops._build_dir(False, copies[0], names) != cpp_ops._build_dir(True, copies[0], names)


def test_first_build_announces_itself_in_one_line(tmp_path):
    src = tmp_path / "csrc"
    shutil.copytree(_cpp_build.CSRC, src)
    (src / "ops.cpp").write_text("this is not C++ @@@\n")  # fails fast, after the announcement
    env = {**os.environ, "LSFUSED_EXT_SOURCE_DIR": str(src), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("LSFUSED_SKIP_EXT", None)
    env.pop("LSFUSED_BUILD_DIR", None)
    code = "import lsfused; print(lsfused.backends()['cpp'] is None)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("lsfused: compiling the C++ backend once")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert str(tmp_path / "cache" / "lsfused") in lines[0]
    assert proc.stdout.strip() == "False"


def test_missing_sources_fall_back_to_torch(tmp_path):
    env = {"LSFUSED_EXT_SOURCE_DIR": str(tmp_path / "nowhere"), "LSFUSED_BUILD_DIR": str(tmp_path / "build")}
    assert_falls_back(run_python(FALLBACK_CHECK, **env), "not found")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    """The .cu file compiles to an object against torch's headers (no GPU needed). The CPU wheel ships the c10/cuda
    headers but not the generated c10/cuda/impl/cuda_cmake_macros.h; c10's own switch skips it."""
    from torch.utils.cpp_extension import include_paths

    includes = include_paths()
    defines = []
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in includes):
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    cmd = ["nvcc", "-c", str(_cpp_build.CSRC / "cuda_kernels.cu"), "-o", str(tmp_path / "cuda_kernels.o")]
    cmd += ["-std=c++20", "-Xcompiler", "-fPIC", abi, *defines, *_cpp_build.NVCC_FLAGS]
    cmd += [f"-I{p}" for p in includes]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "cuda_kernels.o").stat().st_size > 0


def test_wheel_carries_the_sources_for_a_jit_build(tmp_path):
    """A wheel built without torch has no compiled extension; it must carry csrc/ so the cpp backend can JIT-build."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "LSFUSED_SKIP_EXT": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        str(root),
        "-w",
        str(tmp_path),
    ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("lsfused-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"lsfused/_csrc/{p.name}" for p in (root / "csrc").glob("*.cpp")} <= names
    assert not any(n.endswith(".so") for n in names)


PREBUILT_CHECK = """
    import json, torch, lsfused
    reason = lsfused.backends()["cpp"]
    print(json.dumps({"reason": reason, "libs": sorted(torch.ops.loaded_libraries), "file": lsfused.__file__}))
"""


@pytest.mark.slow
@needs_cpp
def test_wheel_built_with_torch_ships_the_extension_and_a_broken_one_is_rebuilt(tmp_path):
    """``pip wheel --no-build-isolation`` (torch importable at build time) compiles ``lsfused/_C*.so`` into the wheel
    with a stamp of its sources and torch version, and the cpp backend loads it without a JIT build. A stamp that
    does not match (sources edited, torch upgraded) and a library that does not load both lead to the JIT build,
    not to a missing backend."""
    root = Path(__file__).resolve().parents[1]
    tree = tmp_path / "tree"  # a clean copy of the tracked files: no build/ output of the checkout is reused
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, tree / name)
    env = {k: v for k, v in os.environ.items() if k != "LSFUSED_SKIP_EXT"}
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(tree)]
    subprocess.run([*cmd, "-w", str(tmp_path)], check=True, env=env, capture_output=True, timeout=900)
    (wheel,) = tmp_path.glob("lsfused-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    (lib,) = (site / "lsfused").glob("_C*.so")
    stamp = lib.with_name(lib.name + ".sources")
    assert stamp.read_text().split()[1:] == ["torch", torch.__version__]
    jit = {"PYTHONPATH": str(site), "LSFUSED_BUILD_DIR": str(tmp_path / "jit")}

    def check() -> tuple[dict, str]:  # run from tmp_path, so that the checkout's lsfused/ is not on sys.path
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(PREBUILT_CHECK)],
            env={**env, **jit},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr

    res, _ = check()
    assert res["file"].startswith(str(site)) and res["reason"] is None
    assert str(lib) in res["libs"] and not (tmp_path / "jit").exists()

    good = stamp.read_text()
    stamp.write_text(good.replace("torch", "torch 0.0.0+other", 1))  # built against another torch
    res, stderr = check()
    assert res["reason"] is None and str(lib) not in res["libs"] and "does not load" not in stderr
    assert (tmp_path / "jit" / f"{_cpp_build.NAME}.so").exists()

    stamp.write_text(good)
    lib.write_bytes(b"not a shared library")
    res, stderr = check()
    assert res["reason"] is None and str(lib) not in res["libs"]
    assert "the installed C++ extension does not load" in stderr
