"""Every fused op on every available backend against the torch reference, plus opcheck.

Bound achieved and asserted: elementwise results are bit-identical to the reference (0 ulp) in every dtype, because
both round every operation separately (no FMA) and use a correctly rounded sqrt and division. Float64 sums match an
fsum of the same terms within 1e-12 relative. No op stores the search direction: the trials and the absorbed count
recompute it from g, v, m (``reference.direction``), so it is a function of those and the hyperparameters alone.
"""

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

import lsfused
from lsfused import _ops
from lsfused import reference as ref

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = [b for b in ("torch", "triton", "cpp") if b in lsfused.available_backends()]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# A BERT-like layer scaled down (hidden 64): q, k, v, o weights and biases, two LayerNorms, the FFN.
H = 64
BERT_LAYER = [H * H, H] * 4 + [H, H] + [H * 4 * H, 4 * H, 4 * H * H, H] + [H, H]
SIZES = {"1": [1], "7": [7], "4097": [4097], "278011": [278011], "bert_layer": BERT_LAYER}
HP = [0.9, 0.999, 1e-8, 1 - 0.9**3, math.sqrt(1 - 0.999**3), 1.0]
WIDTH = len(ref.HP_COLUMNS)
# The directions a trial can take: mode, with a momentum buffer m, along dm. Without m (betas[0] == 0) dm is
# computed from g; the rows below keep bc1 != 1 there too, so dm differs from d.
DIRECTIONS = {
    "sgd": (ref.MODE_SGD, False, False),
    "adam": (ref.MODE_ADAM, False, False),
    "adam_m": (ref.MODE_ADAM, True, False),
    "adam_dm_from_g": (ref.MODE_ADAM, False, True),
    "adam_dm": (ref.MODE_ADAM, True, True),
}


def skip_unsupported(backend, dtype):
    if backend == "triton" and INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter cannot do bf16 arithmetic (numpy has no bfloat16)")


def state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def ranges_for(sizes, per_tensor_ranges):
    """Flat ranges: one per tensor (many param groups) or one over everything (a single group)."""
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    if not per_tensor_ranges:
        return [0, offsets[-1]]
    return [x for a, b in zip(offsets[:-1], offsets[1:], strict=True) for x in (a, b)]


def inputs(sizes, dtype, seed=0):
    n = sum(sizes)
    gen = torch.Generator().manual_seed(seed)
    sdt = state_dtype(dtype)
    g = torch.randn(n, generator=gen).to(dtype)
    w = torch.randn(n, generator=gen).to(dtype)
    v = torch.rand(n, generator=gen, dtype=sdt) * 0.01
    m = torch.randn(n, generator=gen, dtype=sdt) * 0.1
    return [t.to(DEVICE) for t in (g, w, v, m)]


def hp_rows(ranges):
    """One hyperparameter row per range, different per range (step k = 3 + r), so a row mix-up shows."""
    rows = []
    for r in range(len(ranges) // 2):
        k = 3 + r
        rows += [0.9, 0.999, 1e-8 * (1 + r), 1 - 0.9**k, math.sqrt(1 - 0.999**k), 1.0]
    return rows


def run_pass_a(backend, g, w, v, m, ranges, mode, with_m=True):
    """Pass A (with the momentum direction's sum for Adam) on copies; returns the sums and the buffers it left."""
    w, v, m = w.clone(), v.clone(), (m.clone() if with_m else None)
    w0 = torch.full((g.numel(),), math.nan, dtype=v.dtype, device=g.device)
    if mode == ref.MODE_SGD:
        v, m = None, None
    hp = HP * (len(ranges) // 2)
    sums = _ops.direction_and_norms(g, w, w0, v, m, ranges, hp, mode, mode == ref.MODE_ADAM, backend)
    return sums, {"w": w, "w0": w0, "v": v, "m": m}


def pass_a_state(sizes, dtype, kind, seed=0, backend="torch"):
    """The buffers a step's Pass A leaves (on ``backend``): what the trials and the absorbed count read."""
    mode, with_m, along_dm = DIRECTIONS[kind]
    g, w, v, m = inputs(sizes, dtype, seed)
    g[::7] = 0  # elements that do not move along d
    ranges = ranges_for(sizes, per_tensor_ranges=True)
    hp = hp_rows(ranges)
    st = {"g": g, "w": w, "w0": torch.empty(g.numel(), dtype=v.dtype, device=g.device), "v": None, "m": None}
    if mode == ref.MODE_ADAM:
        st["v"], st["m"] = v, (m if with_m else None)
    with_dm = mode == ref.MODE_ADAM
    _ops.direction_and_norms(g, w, st["w0"], st["v"], st["m"], ranges, hp, mode, with_dm, backend)
    return st, ranges, hp, mode, along_dm


def state_args(st):
    return st["w0"], st["g"], st["v"], st["m"]


def expected_trial(st, ranges, hp, mode, eta, along_dm, g=None):
    """``w0 + eta*dir`` in the state dtype, cast to the parameter dtype, with ``dir = reference.direction(g, v, m)``
    on CPU copies: the trial written from its definition, with no buffer but g, v, m, w0."""
    cpu = {k: None if t is None else t.cpu() for k, t in st.items()}
    g = cpu["g"] if g is None else g.cpu()
    w = cpu["w"].clone()
    eta_s = eta.cpu().to(cpu["w0"].dtype)
    for r, (a, b) in enumerate(ref.pairs(ranges)):
        v = None if cpu["v"] is None else cpu["v"][a:b]
        m = None if cpu["m"] is None else cpu["m"][a:b]
        d = ref.direction(g[a:b].to(cpu["w0"].dtype), v, m, hp[r * WIDTH : (r + 1) * WIDTH], mode, along_dm)
        w[a:b] = (cpu["w0"][a:b] + eta_s[r] * d).to(w.dtype)
    return w.to(DEVICE)


def assert_equal_or_none(a, b, name):
    assert (a is None and b is None) or torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", [ref.MODE_SGD, ref.MODE_ADAM], ids=["sgd", "adam"])
def test_pass_a_matches_reference(backend, size, dtype, mode):
    skip_unsupported(backend, dtype)
    sizes = SIZES[size]
    g, w, v, m = inputs(sizes, dtype)
    ranges = ranges_for(sizes, per_tensor_ranges=size == "bert_layer")
    sums, out = run_pass_a(backend, g, w, v, m, ranges, mode)
    ref_sums, ref_out = run_pass_a("torch", g, w, v, m, ranges, mode)
    for key in out:
        assert_equal_or_none(ref_out[key], out[key], key)
    assert torch.equal(out["w"], w) and torch.equal(out["w0"], w.to(out["w0"].dtype))
    # Sums: fsum of the float64 terms of the directions this backend's stored values define.
    g64 = g.double().cpu()
    cpu = {k: None if t is None else t.cpu() for k, t in out.items()}
    if mode == ref.MODE_ADAM:
        denom = (ref.sqrt_rn(cpu["v"]) / HP[4] + HP[2]).double()
        s_terms = g64 * g64 / denom
    else:
        s_terms = g64 * g64
    for r, (a, b) in enumerate(ref.pairs(ranges)):
        parts = (g[a:b].cpu().to(cpu["w0"].dtype), *(None if t is None else t[a:b] for t in (cpu["v"], cpu["m"])))
        d64 = ref.direction(*parts, HP, mode, False).double()
        gdm = [0.0] if mode == ref.MODE_SGD else (g64[a:b] * ref.direction(*parts, HP, mode, True).double()).tolist()
        gr = g64[a:b]
        terms = (s_terms[a:b].tolist(), (gr * gr).tolist(), (gr * d64).tolist(), (d64 * d64).tolist(), gdm)
        got = sums[r].cpu().tolist()
        for t, x, name in zip(terms, got, ref.NORM_COLUMNS, strict=True):
            assert x == pytest.approx(math.fsum(t), rel=1e-12, abs=1e-300), name
    torch.testing.assert_close(sums.cpu(), ref_sums.cpu(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", [*BACKENDS, "torch-fast"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["sgd", "adam", "adam-momentum"])
@pytest.mark.parametrize("trial", [False, True], ids=["", "trial"])
def test_pass_a_without_all_sums_skips_only_gg_and_dd(backend, dtype, mode, trial):
    """all_sums=False (what an optimizer asks for without a recorder): the same buffers and decision sums (s, gd,
    gdm) bit for bit, and NaN in the gg and dd columns, on every backend and through both registered ops."""
    skip_unsupported(backend, dtype)
    g, w, v, m = inputs(BERT_LAYER, dtype)
    ranges = ranges_for(BERT_LAYER, per_tensor_ranges=True)
    hp = HP * (len(ranges) // 2)
    kind = ref.MODE_SGD if mode == "sgd" else ref.MODE_ADAM
    with_dm = mode == "adam-momentum"
    results = []
    for all_sums in (True, False):
        wc = w.clone()
        w0 = torch.full((g.numel(),), math.nan, dtype=v.dtype, device=g.device)
        vc, mc = (v.clone(), m.clone() if with_dm else None) if kind == ref.MODE_ADAM else (None, None)
        args = (g, wc, w0, vc, mc, ranges, hp, kind, with_dm)
        if trial:
            eta = torch.full((len(ranges) // 2,), 1e-3, dtype=torch.float64, device=g.device)
            sums = _ops.direction_norms_trial(*args, eta, with_dm, backend, all_sums)
        else:
            sums = _ops.direction_and_norms(*args, backend, all_sums)
        results.append((sums.cpu(), [wc, w0, vc, mc]))
    (full, bufs_full), (part, bufs_part) = results
    for a, b in zip(bufs_full, bufs_part, strict=True):
        assert_equal_or_none(a, b, "buffers")
    decision = [ref.NORM_COLUMNS.index(c) for c in ("s", "gd", "gdm")]
    assert torch.equal(full[:, decision], part[:, decision])
    assert (ref.NORM_COLUMNS.index("gg"), ref.NORM_COLUMNS.index("dd")) == ref.DIAGNOSTIC_COLUMNS
    assert part[:, ref.DIAGNOSTIC_COLUMNS].isnan().all() and not full.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_pass_a_is_deterministic(backend):
    g, w, v, m = inputs([278011], torch.float32)
    a, _ = run_pass_a(backend, g, w, v, m, [0, 278011], ref.MODE_ADAM)
    b, _ = run_pass_a(backend, g, w, v, m, [0, 278011], ref.MODE_ADAM)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", DIRECTIONS)
def test_trial_step_and_restore(backend, dtype, kind):
    skip_unsupported(backend, dtype)
    st, ranges, hp, mode, along_dm = pass_a_state(BERT_LAYER, dtype, kind, seed=3)
    w = st["w"].clone()
    eta = torch.linspace(1e-3, 0.5, len(ranges) // 2, dtype=torch.float64, device=DEVICE)
    expected = w.clone()
    ref.trial_step(expected, *state_args(st), ranges, hp, mode, eta, along_dm)
    for _ in range(7):
        _ops.trial_step(w, *state_args(st), ranges, hp, mode, eta, along_dm, backend)
        assert torch.equal(w, expected)
    assert not torch.equal(w, st["w"])
    _ops.restore(w, st["w0"], ranges, backend)
    assert torch.equal(w, st["w"])
    # Only the listed ranges move, with their own hyperparameter rows.
    _ops.trial_step(w, *state_args(st), ranges[2:4], hp[WIDTH : 2 * WIDTH], mode, eta[1:2], along_dm, backend)
    moved = (w != st["w"]).nonzero().flatten()
    assert moved.numel() > 0 and moved.min() >= ranges[2] and moved.max() < ranges[3]
    assert torch.equal(w[ranges[2] : ranges[3]], expected[ranges[2] : ranges[3]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", DIRECTIONS)
def test_trial_direction_is_a_function_of_g_v_m(backend, dtype, kind):
    """The cause of the lean state's bit-identity: a trial is ``w0 + eta*dir`` with ``dir`` the reference
    ``direction`` of the g, v, m that Pass A left (and the step's hyperparameters), so no direction buffer is needed.
    Run on fresh copies of those buffers, so nothing else Pass A touched is in reach."""
    skip_unsupported(backend, dtype)
    st, ranges, hp, mode, along_dm = pass_a_state([5, 4097, 33], dtype, kind, backend=backend)
    copies = {k: None if t is None else t.clone() for k, t in st.items()}
    eta = torch.tensor([0.25, 1e-3, 3.0], dtype=torch.float64, device=DEVICE)
    w = copies["w"]
    _ops.trial_step(w, *state_args(copies), ranges, hp, mode, eta, along_dm, backend)
    assert torch.equal(w, expected_trial(st, ranges, hp, mode, eta, along_dm))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", DIRECTIONS)
def test_changing_g_after_pass_a_changes_the_trial(backend, kind):
    """Why the optimizer must leave g unchanged from Pass A to the step's last trial: each trial reads g again
    (except along dm with a momentum buffer, which reads m and v only)."""
    st, ranges, hp, mode, along_dm = pass_a_state([5, 4097, 33], torch.float32, kind, backend=backend)
    eta = torch.tensor([0.25, 1e-3, 3.0], dtype=torch.float64, device=DEVICE)
    g2 = st["g"] * 2 + 1  # as if the gradient were modified (clipped, accumulated, zeroed) mid-step
    trials = []
    for g in (st["g"], g2):
        w = st["w"].clone()
        _ops.trial_step(w, st["w0"], g, st["v"], st["m"], ranges, hp, mode, eta, along_dm, backend)
        assert torch.equal(w, expected_trial(st, ranges, hp, mode, eta, along_dm, g=g))
        trials.append(w)
    reads_g = not (along_dm and st["m"] is not None)
    assert torch.equal(*trials) != reads_g


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_has_no_momentum_direction(backend):
    st, ranges, hp, mode, _ = pass_a_state([5, 33], torch.float32, "sgd", backend=backend)
    eta = torch.tensor([0.5, 0.5], dtype=torch.float64, device=DEVICE)
    with pytest.raises((ValueError, RuntimeError), match="(?i)sgd|momentum|dm"):
        _ops.trial_step(st["w"], *state_args(st), ranges, hp, mode, eta, True, backend)
    with pytest.raises((ValueError, RuntimeError), match="(?i)sgd|momentum|dm"):
        _ops.implementation(backend).absorbed_counts(st["w"], *state_args(st), ranges, hp, mode, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", DIRECTIONS)
def test_absorbed_counts(backend, dtype, kind):
    """Per range [moving, absorbed], equal to the reference's, after a trial whose steps range from far below half
    an ulp of w0 to far above (some ranges fully absorbed, some partly, some not at all)."""
    skip_unsupported(backend, dtype)
    st, ranges, hp, mode, along_dm = pass_a_state(BERT_LAYER, dtype, kind)
    r = len(ranges) // 2
    eta = torch.logspace(-17, -1, r, dtype=torch.float64, device=DEVICE)
    w = st["w"].clone()
    ref.trial_step(w, *state_args(st), ranges, hp, mode, eta, along_dm)
    expected = ref.absorbed_counts(w, *state_args(st), ranges, hp, mode, along_dm)
    got = _ops.implementation(backend).absorbed_counts(w, *state_args(st), ranges, hp, mode, along_dm)
    assert got.dtype == torch.float64 and got.shape == (r, 2)
    assert torch.equal(got, expected)
    moving, absorbed = expected.sum(0).tolist()
    assert 0 < absorbed < moving
    assert (moving < st["g"].numel()) == (not (along_dm and st["m"] is not None))  # g == 0: d == 0
    assert ((expected[:, 1] > 0) & (expected[:, 1] < expected[:, 0])).any()  # a partly absorbed range


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    sizes = [300, 5]
    ranges = ranges_for(sizes, per_tensor_ranges=True)
    g, w, v, m = inputs(sizes, torch.float32)
    w0 = torch.empty(g.numel(), device=DEVICE)
    hp = HP * 2
    torch.library.opcheck(_ops.direction_and_norms, (g, w, w0, v, m, ranges, hp, 1, True, backend))
    torch.library.opcheck(_ops.direction_and_norms, (g, w, w0, v, None, ranges, hp, 1, False, backend))
    torch.library.opcheck(_ops.direction_and_norms, (g, w, w0, None, None, ranges, hp, 0, False, backend))
    eta = torch.tensor([0.1, 0.2], dtype=torch.float64, device=DEVICE)
    w0.normal_()
    for args in ((v, m, 1, True), (v, m, 1, False), (v, None, 1, True), (None, None, 0, False)):
        vv, mm, kind, along_dm = args
        torch.library.opcheck(_ops.trial_step, (w.clone(), w0, g, vv, mm, ranges, hp, kind, eta, along_dm, backend))
    torch.library.opcheck(_ops.restore, (w.clone(), w0, ranges, backend))


_PTX_CHECK = """
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lsfused.kernels import triton_ops as T

def ptx(fn, pointers, flags):
    sig = {**pointers, "start": "i32", "n": "i32", **{k: "constexpr" for k in flags}, "BLOCK_": "constexpr"}
    src = ASTSource(fn=fn, signature=sig, constexprs={**flags, "BLOCK_": 1024})
    opts = {"enable_fp_fusion": False, "num_warps": 4}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]

text = ""
for p, s, f64 in (("fp16", "fp32", False), ("fp64", "fp64", True)):
    bufs = {"w_ptr": p, "w0_ptr": s, "g_ptr": p, "v_ptr": s, "m_ptr": s, "hp_ptr": "fp64"}
    order = ("g_ptr", "w_ptr", "w0_ptr", "v_ptr", "m_ptr", "hp_ptr", "eta_ptr", "part_ptr")
    ptrs = {k: "*" + {**bufs, "eta_ptr": "fp64", "part_ptr": "fp64"}[k] for k in order}
    flags = {"TRIAL": 2, "ADAM": True, "HAS_M": True, "WITH_DM": True, "HAS_WD": True, "IS_F64": f64}
    text += ptx(T._direction_and_norms_kernel, ptrs, flags)
    for along_dm in (False, True):
        flags = {"ADAM": True, "ALONG_DM": along_dm, "HAS_M": along_dm, "IS_F64": f64}
        ptrs = {k: "*" + t for k, t in bufs.items()}
        text += ptx(T._trial_step_kernel, {**ptrs, "eta_ptr": "*fp64"}, flags)
        text += ptx(T._absorbed_counts_kernel, {**ptrs, "part_ptr": "*i64"}, flags)
print(sorted(set(re.findall(r"\\b(?:fma|mad|div|sqrt|rcp)\\.[a-z0-9.]*f(?:32|64)\\b", text))))
"""


@pytest.mark.skipif("triton" not in lsfused.available_backends(), reason="needs triton")
def test_triton_kernels_round_every_operation():
    """Compiled for a GPU (sm_90; no GPU needed), the Triton kernels hold no FMA and only correctly rounded division
    and square root: Triton's plain fp32 ``/`` is ``div.full.f32``, up to 2 ulp off the reference's."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _PTX_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["['div.rn.f32',", "'div.rn.f64',", "'sqrt.rn.f32',", "'sqrt.rn.f64']"]
