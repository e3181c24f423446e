"""The MoE CUDA kernels against the float64 reference of Qwen3's MoE block (GPU only).

Inputs are fresh random draws on every run (seeded from the OS; the seed is printed on failure).
Outputs are poisoned with NaN first, so an unwritten element fails. Tolerances are stated in units of
the activation dtype's machine epsilon (eps = 2^-7 for bf16, 2^-10 for fp16): the kernels round three
times to that dtype (the SwiGLU product h, each expert's output, the combined output) and accumulate in
fp32, so the expected norm-wise error is about one unit roundoff (eps/2).
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

NORM_TOL_EPS = 2.0  # ||out - ref|| / ||ref|| <= 2 eps
ELEM_TOL_EPS = (1.0, 6.0)  # |out - ref| <= 1 eps |ref| + 6 eps rms(ref)


@pytest.fixture(scope="module")
def kmoe():
    from qwen3_compile.kernels import moe

    moe.load_library()  # compile once for this GPU, outside the timed tests
    return moe


@pytest.fixture
def gen():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator(device="cuda").manual_seed(seed)


def make_weights(gen, E, H, inter, dtype, wkind):
    """bf16/fp16 weights, int8 with per-channel scales (fp32 or fp16), or int4 with per-group scales
    ("int4_g<G>_<f32s|f16s>": packed two a byte, groups of G input channels)."""
    gu = torch.randn(E, 2 * inter, H, generator=gen, device="cuda") / H**0.5
    dn = torch.randn(E, H, inter, generator=gen, device="cuda") / inter**0.5
    if wkind == "float":
        return gu.to(dtype), dn.to(dtype), None, None
    from qwen3_compile.kernels.moe import quantize_int4, quantize_int8

    sdt = torch.float32 if wkind.endswith("f32s") else torch.float16
    if wkind.startswith("int4"):
        group = int(wkind.split("_")[1][1:])
        gq, gs = quantize_int4(gu, group, sdt)
        dq, ds = quantize_int4(dn, group, sdt)
        return gq, dq, gs, ds
    gq, gs = quantize_int8(gu, sdt)
    dq, ds = quantize_int8(dn, sdt)
    return gq, dq, gs, ds


def check_close(out, ref, dtype, what=""):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), f"{what}: unwritten (NaN) or non-finite elements"
    eps = torch.finfo(dtype).eps
    o, r = out.double(), ref.double()
    rms = r.pow(2).mean().sqrt()
    rel = (o - r).norm() / r.norm()
    assert rel <= NORM_TOL_EPS * eps, f"{what}: norm-wise error {rel:.3e} > {NORM_TOL_EPS} eps ({eps:.2e})"
    bound = ELEM_TOL_EPS[0] * eps * r.abs() + ELEM_TOL_EPS[1] * eps * rms
    excess = ((o - r).abs() - bound).max()
    assert excess <= 0, f"{what}: element error exceeds its bound by {excess:.3e} (rms {rms:.3e})"
    return rel.item()


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def expect_path(kmoe, x, logits, gu, k, gs, path):
    """The kernel that runs, by the measured rule: AUTO takes GEMV at or below 4 pairs an expert; AUTO and
    "mma" take wgmma at about 96 or more tokens an expert on SM 9.0 (16-bit or INT4 weights), else mma.sync;
    "gemv" and "mma_sync" are taken as asked; "wgmma" is refused off SM 9.0 and with INT8 weights. Returns
    False when the case cannot run on this GPU."""
    int8 = gu.dtype == torch.int8
    T, E = x.shape[0], logits.shape[1]
    if path == "wgmma" and (int8 or not HOPPER):
        with pytest.raises(kmoe.QmoeError, match="unsupported"):
            kmoe.resolve_path(x, logits, gu, k, gs, path)
        return False
    if path in ("gemv", "mma_sync"):
        want = path
    elif path == "auto" and T * k <= 4 * E:
        want = "gemv"
    else:
        preferred = path == "wgmma" or T * k >= 96 * E
        want = "wgmma" if HOPPER and not int8 and preferred else "mma_sync"
    assert kmoe.resolve_path(x, logits, gu, k, gs, path) == want
    return True


def run_case(kmoe, gen, T, E, k, dtype, wkind, path, H=256, inter=192, logits=None, normalize=True):
    x = torch.randn(T, H, generator=gen, device="cuda").to(dtype)
    if logits is None:
        logits = torch.randn(T, E, generator=gen, device="cuda")
    gu, dn, gs, ds = make_weights(gen, E, H, inter, dtype, wkind)
    if not expect_path(kmoe, x, logits, gu, k, gs, path):
        return None, None, None
    out = torch.full((T, H), float("nan"), dtype=dtype, device="cuda")
    got, routing = kmoe.moe_forward(
        x, logits, gu, dn, k, normalize, gs, ds, path=path, out=out, return_routing=True
    )
    ref = kmoe.moe_reference(x, logits, gu, dn, k, normalize, gs, ds)
    rel = check_close(got, ref, dtype, f"T={T} E={E} k={k} {dtype} {wkind} {path}")
    # Bitwise deterministic: a second call gives the same bits.
    again = torch.full_like(out, float("nan"))
    kmoe.moe_forward(x, logits, gu, dn, k, normalize, gs, ds, path=path, out=again)
    assert torch.equal(got, again), "two runs differ"
    return got, routing, rel


@pytest.mark.parametrize("path", ["auto", "gemv", "mma", "mma_sync", "wgmma"])
@pytest.mark.parametrize("wkind", ["float", "int8_f32s", "int8_f16s"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("E", [16, 128])
@pytest.mark.parametrize("T", [1, 7, 64, 2048])
def test_forward_matches_reference(kmoe, gen, T, E, k, dtype, wkind, path):
    run_case(kmoe, gen, T, E, k, dtype, wkind, path)


@pytest.mark.parametrize("pdl", ["1", "0"])
@pytest.mark.parametrize("path", ["gemv", "mma_sync", "wgmma"])
@pytest.mark.parametrize("T", [1, 64, 2048])
def test_qwen3_30b_a3b_shapes(kmoe, gen, monkeypatch, T, path, pdl):
    monkeypatch.setenv("QMOE_PDL", pdl)  # programmatic dependent launch on and off
    run_case(kmoe, gen, T, 128, 8, torch.bfloat16, "float", path, H=2048, inter=768)


@pytest.mark.parametrize(
    ("dtype", "wkind"), [(torch.float16, "float"), (torch.bfloat16, "int4_g128_f16s")], ids=["fp16", "int4"]
)
@pytest.mark.parametrize("rows", ["128", "256"])
@pytest.mark.parametrize("tile", ["64", "128", "192", "256"])
def test_wgmma_tile_configs(kmoe, gen, monkeypatch, tile, rows, dtype, wkind):
    # Every token-tile width with 128 and 256 weight rows a block (256-token tiles always use 128 rows), for
    # 16-bit and INT4 weights; 1500 tokens put 60-140 tokens on an expert, so the narrow tiles split experts.
    monkeypatch.setenv("QMOE_WG_TILE", tile)
    monkeypatch.setenv("QMOE_WG_ROWS", rows)
    run_case(kmoe, gen, 1500, 128, 8, dtype, wkind, "wgmma", H=2048, inter=768)


@pytest.mark.parametrize("path", ["gemv", "mma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_int8_qwen3_30b_a3b_shapes(kmoe, gen, dtype, path):
    run_case(kmoe, gen, 300, 128, 8, dtype, "int8_f16s", path, H=2048, inter=768)


# INT4 weight-only (W4A16), groups of G input channels: AUTO (the GEMV path's kernels at decode, the
# tensor-core kernels at prefill), the GEMV path and the mma.sync kernel, against the float64 reference
# with the int4-dequantized weights. I = 256 so that G = 128 divides it.
@pytest.mark.parametrize("path", ["auto", "gemv", "mma_sync"])
@pytest.mark.parametrize("wkind", ["int4_g32_f32s", "int4_g32_f16s", "int4_g128_f32s", "int4_g128_f16s"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("E", [16, 128])
@pytest.mark.parametrize("T", [1, 7, 64, 2048])
def test_int4_forward_matches_reference(kmoe, gen, T, E, k, dtype, wkind, path):
    run_case(kmoe, gen, T, E, k, dtype, wkind, path, H=256, inter=256)


@pytest.mark.parametrize("wkind", ["int4_g32_f16s", "int4_g64_f32s", "int4_g128_f16s", "int4_g128_f32s"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T", [1, 7, 64, 2048])
def test_int4_qwen3_30b_a3b_shapes(kmoe, gen, T, dtype, wkind):
    run_case(kmoe, gen, T, 128, 8, dtype, wkind, "auto", H=2048, inter=768)


@pytest.mark.parametrize("wkind", ["int4_g32_f16s", "int4_g128_f32s"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T", [64, 2048])
def test_int4_mma_sync_qwen3_30b_a3b_shapes(kmoe, gen, T, dtype, wkind):
    run_case(kmoe, gen, T, 128, 8, dtype, wkind, "mma_sync", H=2048, inter=768)


# INT4 on the wgmma kernel (AUTO's choice at about 96 or more tokens an expert on SM 9.0): nibbles staged,
# widened in shared memory with the group scale folded in. E=16, k=2 puts about T/8 tokens on an expert:
# T=1, 7, 300 give 64-token tiles with fewer tokens than that (partial tiles), 800 and 1200 128- and
# 192-token tiles, 3000 256-token tiles and more than 256 tokens an expert (a full tile and a partial
# one). H=256: 256 weight rows a block; H=384: 128.
@pytest.mark.parametrize("wkind", ["int4_g32_f32s", "int4_g64_f16s", "int4_g128_f32s", "int4_g128_f16s"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("H", [256, 384])
@pytest.mark.parametrize("T", [1, 7, 300, 800, 1200, 3000])
def test_int4_wgmma_matches_reference(kmoe, gen, T, H, dtype, wkind):
    run_case(kmoe, gen, T, 16, 2, dtype, wkind, "wgmma", H=H, inter=256)


@pytest.mark.parametrize("wkind", ["int4_g32_f16s", "int4_g64_f32s", "int4_g128_f16s", "int4_g128_f32s"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T", [512, 2048])
def test_int4_wgmma_qwen3_30b_a3b_shapes(kmoe, gen, T, dtype, wkind):
    run_case(kmoe, gen, T, 128, 8, dtype, wkind, "wgmma", H=2048, inter=768)


# QMOE_WGMMA_FENCE_PER_SHAPE (built as a variant library) moves wgmma.fence from before the kernel's shape
# switch into each shape's asm block: fences order, they compute nothing, so every output bit must match.
@pytest.mark.skipif(not HOPPER, reason="wgmma: SM 9.0")
@pytest.mark.parametrize(
    ("dtype", "wkind"),
    [(torch.bfloat16, "float"), (torch.float16, "float"), (torch.bfloat16, "int4_g128_f16s")],
    ids=["bf16", "fp16", "int4"],
)
@pytest.mark.parametrize("T", [300, 2048])
def test_wgmma_fence_per_shape_same_bits(kmoe, gen, T, dtype, wkind):
    from qwen3_compile.kernels.build import build_library

    variant = str(build_library(archs=("90",), defines=("QMOE_WGMMA_FENCE_PER_SHAPE",)).path)
    E, k, H, inter = 128, 8, 2048, 768
    x = torch.randn(T, H, generator=gen, device="cuda").to(dtype)
    logits = torch.randn(T, E, generator=gen, device="cuda")
    gu, dn, gs, ds = make_weights(gen, E, H, inter, dtype, wkind)
    base = kmoe.moe_forward(x, logits, gu, dn, k, True, gs, ds, path="wgmma")
    other = kmoe.moe_forward(x, logits, gu, dn, k, True, gs, ds, path="wgmma", library=variant)
    check_close(other, kmoe.moe_reference(x, logits, gu, dn, k, True, gs, ds), dtype, "fence per shape")
    assert torch.equal(base, other), "the fence placement changed the result"


def test_wgmma_takes_int4_not_int8(kmoe, gen):
    """Forcing wgmma runs INT4 weights on SM 9.0 (refused elsewhere) and refuses INT8 weights everywhere; at 8
    tokens an expert AUTO takes GEMV and MMA mma.sync for INT4 as for 16-bit weights."""
    T, E, k, H, inter = 64, 16, 2, 256, 256
    x = torch.randn(T, H, generator=gen, device="cuda").to(torch.bfloat16)
    logits = torch.randn(T, E, generator=gen, device="cuda")
    gu, dn, gs, ds = make_weights(gen, E, H, inter, torch.bfloat16, "int4_g128_f32s")
    for path in ("auto", "mma", "wgmma"):
        assert expect_path(kmoe, x, logits, gu, k, gs, path) == (path != "wgmma" or HOPPER)
    if not HOPPER:
        with pytest.raises(kmoe.QmoeError, match="unsupported"):
            kmoe.moe_forward(x, logits, gu, dn, k, True, gs, ds, path="wgmma")
    gu8, dn8, gs8, ds8 = make_weights(gen, E, H, inter, torch.bfloat16, "int8_f16s")
    assert not expect_path(kmoe, x, logits, gu8, k, gs8, "wgmma")  # resolve_path: unsupported
    with pytest.raises(kmoe.QmoeError, match="unsupported"):
        kmoe.moe_forward(x, logits, gu8, dn8, k, True, gs8, ds8, path="wgmma")


def test_int4_refuses_groups_that_do_not_divide(kmoe, gen):
    T, E, k, H, inter = 7, 16, 2, 256, 192  # G = 128 does not divide I = 192
    x = torch.randn(T, H, generator=gen, device="cuda").to(torch.bfloat16)
    logits = torch.randn(T, E, generator=gen, device="cuda")
    gu, dn, gs, ds = make_weights(gen, E, H, inter, torch.bfloat16, "int4_g64_f32s")
    gq, gs128 = kmoe.quantize_int4(torch.randn(E, 2 * inter, H, generator=gen, device="cuda"), 128)
    with pytest.raises(kmoe.QmoeError, match="unsupported"):  # the group size is read from gate_up's scales
        kmoe.moe_forward(x, logits, gq, dn, k, True, gs128, ds)
    out = kmoe.moe_forward(x, logits, gu, dn, k, True, gs, ds)  # G = 64 divides both: runs
    check_close(out, kmoe.moe_reference(x, logits, gu, dn, k, True, gs, ds), torch.bfloat16, "int4 g64")


@pytest.mark.parametrize(("H", "inter"), [(128, 64), (384, 320), (512, 128), (768, 256)])
def test_other_shapes(kmoe, gen, H, inter):
    for path in ("gemv", "mma_sync", "wgmma"):
        run_case(kmoe, gen, 1000, 16, 4, torch.bfloat16, "float", path, H=H, inter=inter)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("ldtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("T", "E", "k"), [(1, 16, 2), (333, 128, 8), (2048, 128, 8), (64, 256, 8)])
def test_router_matches_torch(kmoe, gen, T, E, k, ldtype, normalize):
    logits = (3 * torch.randn(T, E, generator=gen, device="cuda")).to(ldtype)
    ids, w = kmoe.moe_route(logits, k, normalize)
    rids, rw = kmoe.route_reference(logits, k, normalize)
    top = logits.float().sort(-1, descending=True).values[:, : k + 1]
    untied = (top[:, 1:] != top[:, :-1]).all(-1)  # bf16/fp16 logits can tie; the ties test covers those
    assert torch.equal(ids.long()[untied], rids[untied]), "expert ids differ from torch.topk"
    assert torch.equal(ids.long().sort(-1).values, rids.sort(-1).values), "selected sets differ"
    torch.testing.assert_close(w, rw, rtol=8 * torch.finfo(torch.float32).eps, atol=1e-7)


@pytest.mark.parametrize(("E", "k"), [(16, 2), (128, 8)])
def test_router_ties_follow_torch_topk(kmoe, gen, E, k):
    T = 512
    # Few distinct values: most rows have ties straddling the k-th place.
    logits = torch.randint(0, 3, (T, E), generator=gen, device="cuda").float()
    logits[0] = 1.0  # all equal
    ids, w = kmoe.moe_route(logits, k, True)
    probs = torch.softmax(logits, -1)
    tids = torch.topk(probs, k, -1).indices
    # The selected set is what changes the output; compare it with torch.topk on the same (CUDA) device.
    same_set = torch.equal(ids.long().sort(-1).values, tids.sort(-1).values)
    assert same_set, "selected set differs from torch.topk"
    # Within the set: descending probability, lower index first among equals.
    p_sel = probs.gather(1, ids.long())
    assert (p_sel[:, :-1] >= p_sel[:, 1:]).all()
    eq = p_sel[:, :-1] == p_sel[:, 1:]
    assert (ids[:, :-1][eq] < ids[:, 1:][eq]).all()
    assert torch.equal(ids[0].long().cpu(), torch.arange(k))
    torch.testing.assert_close(w[0], torch.full((k,), 1.0 / k, device="cuda"))


@pytest.mark.parametrize("path", ["gemv", "mma_sync", "wgmma"])
def test_experts_without_tokens(kmoe, gen, path):
    T, E, k = 64, 128, 2
    logits = torch.randn(T, E, generator=gen, device="cuda")
    logits[:, 1::2] = -1e4  # odd experts never chosen
    _, routing, _ = run_case(kmoe, gen, T, E, k, torch.bfloat16, "float", path, logits=logits)
    if routing is None:
        pytest.skip(f"{path} does not run on this GPU (refusal checked)")
    counts = routing.expert_offsets.diff()
    assert (counts[1::2] == 0).all() and counts.sum() == T * k


@pytest.mark.parametrize("wkind", ["float", "int8_f32s"])
@pytest.mark.parametrize("path", ["gemv", "mma_sync", "wgmma"])
@pytest.mark.parametrize("T", [7, 255, 257, 2048])
def test_all_tokens_to_one_expert(kmoe, gen, T, path, wkind):
    """One expert with every token. On the wgmma path: tiles of exactly 256 tokens (2048), a full tile and a
    1-token tile (257), a tile with 15 padded token columns (255)."""
    E, k = 128, 2
    logits = torch.randn(T, E, generator=gen, device="cuda")
    logits[:, 77] += 100.0  # every token's first choice is expert 77
    _, routing, _ = run_case(kmoe, gen, T, E, k, torch.bfloat16, wkind, path, logits=logits)
    if routing is None:
        pytest.skip(f"{path} cannot run {wkind} weights here (its refusal was checked)")
    assert routing.expert_offsets.diff()[77].item() == T


@pytest.mark.parametrize(
    ("T", "E", "k"), [(7, 16, 2), (64, 256, 8), (65, 16, 2), (2048, 128, 8), (3000, 128, 8), (301, 256, 32)]
)
@pytest.mark.parametrize("dispatch", ["default", "single-block", "grid-wide"])
def test_dispatch_is_a_stable_permutation(kmoe, gen, monkeypatch, T, E, k, dispatch):
    # default: one fused block up to 64 tokens, the three grid-wide kernels above; the knobs force either.
    if dispatch == "single-block":
        monkeypatch.setenv("QMOE_DISPATCH", "1")
    if dispatch == "grid-wide":
        monkeypatch.setenv("QMOE_FUSED_ROUTER_MAX", "0")
    _, routing, _ = run_case(kmoe, gen, T, E, k, torch.bfloat16, "float", "auto")
    ids = routing.topk_ids.long().flatten()
    perm = routing.permuted_pairs.long()
    offsets = routing.expert_offsets.long()
    assert torch.equal(perm.sort().values, torch.arange(T * k, device="cuda"))
    counts = torch.bincount(ids, minlength=E)
    assert torch.equal(offsets, torch.cat([offsets.new_zeros(1), counts.cumsum(0)]))
    assert torch.equal(ids[perm], ids.sort(stable=True).values)
    assert torch.equal(perm, ids.sort(stable=True).indices)  # (token, slot) order kept within an expert


@pytest.mark.parametrize("variant", ["default", "down-groups-1"])
@pytest.mark.parametrize("ldtype", [torch.float32, torch.bfloat16], ids=["f32logits", "bf16logits"])
@pytest.mark.parametrize("wkind", ["float", "int8_f32s", "int8_f16s", "int4_g32_f32s", "int4_g64_f16s"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("E", "k"), [(16, 2), (16, 3), (128, 8), (128, 32), (256, 5)])
def test_single_token_path(kmoe, gen, monkeypatch, E, k, dtype, wkind, ldtype, variant):
    """T=1 takes its own two kernels (routing inside them, combine fused into down): within tolerance of the
    float64 reference, and the same bits and routing outputs as the general GEMV path (QMOE_TOKEN1=0): same
    roundings, same summation order. Both down-kernel block shapes (1 or 2 row groups a block)."""
    env = {"default": {}, "down-groups-1": {"QMOE_T1_DOWN_GROUPS": "1"}}[variant]
    single_token_against_general(kmoe, gen, monkeypatch, E, k, dtype, wkind, ldtype, env, H=384, inter=320)


def single_token_against_general(kmoe, gen, monkeypatch, E, k, dtype, wkind, ldtype, env, H, inter):
    x = torch.randn(1, H, generator=gen, device="cuda").to(dtype)
    logits = (2 * torch.randn(1, E, generator=gen, device="cuda")).to(ldtype)
    gu, dn, gs, ds = make_weights(gen, E, H, inter, dtype, wkind)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    results = {}
    for name, token1 in (("fast", env.get("QMOE_TOKEN1", "1")), ("general", "0")):
        monkeypatch.setenv("QMOE_TOKEN1", token1)
        out = torch.full((1, H), float("nan"), dtype=dtype, device="cuda")
        results[name] = kmoe.moe_forward(
            x, logits, gu, dn, k, True, gs, ds, path="gemv", out=out, return_routing=True
        )
    general, r0 = results["general"]
    fast, r1 = results["fast"]
    check_close(fast, kmoe.moe_reference(x, logits, gu, dn, k, True, gs, ds), dtype, f"token1 {env}")
    assert torch.equal(fast, general), "single-token path differs from the general GEMV path"
    for name in ("topk_ids", "topk_weights", "expert_offsets", "permuted_pairs"):
        assert torch.equal(getattr(r1, name), getattr(r0, name)), name


# INT4 in groups of 128 on the tensor cores (the GEMV path's decode kernels for G = 128, single-token and
# general; QMOE_I4_MMA=1 set explicitly so the tests keep covering them if the default changes): the float64
# reference, and the same bits on both T=1 paths.
@pytest.mark.parametrize("wkind", ["int4_g128_f32s", "int4_g128_f16s"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("E", "k"), [(16, 2), (128, 8), (128, 32), (256, 5)])
@pytest.mark.parametrize("T", [1, 7, 64, 300])
def test_int4_tensor_core_decode(kmoe, gen, monkeypatch, T, E, k, dtype, wkind):
    monkeypatch.setenv("QMOE_I4_MMA", "1")
    run_case(kmoe, gen, T, E, k, dtype, wkind, "gemv", H=384, inter=256)


@pytest.mark.parametrize("ldtype", [torch.float32, torch.bfloat16], ids=["f32logits", "bf16logits"])
@pytest.mark.parametrize("wkind", ["int4_g128_f32s", "int4_g128_f16s"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("E", "k"), [(16, 2), (16, 3), (128, 8), (128, 32), (256, 5)])
def test_int4_tensor_core_single_token_path(kmoe, gen, monkeypatch, E, k, dtype, wkind, ldtype):
    env = {"QMOE_I4_MMA": "1"}
    single_token_against_general(kmoe, gen, monkeypatch, E, k, dtype, wkind, ldtype, env, H=384, inter=256)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T", [1, 4, 16, 64])
def test_int4_tensor_core_qwen3_30b_a3b_shapes(kmoe, gen, monkeypatch, T, dtype):
    monkeypatch.setenv("QMOE_I4_MMA", "1")
    run_case(kmoe, gen, T, 128, 8, dtype, "int4_g128_f16s", "auto", H=2048, inter=768)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T", [1, 4, 16, 64])
def test_int4_cuda_core_gemv_opt_out(kmoe, gen, monkeypatch, T, dtype):
    # QMOE_I4_MMA=0 keeps the CUDA-core GEMV kernels for groups of 128 (the benchmark's comparison row).
    monkeypatch.setenv("QMOE_I4_MMA", "0")
    run_case(kmoe, gen, T, 128, 8, dtype, "int4_g128_f16s", "auto", H=2048, inter=768)


@pytest.mark.parametrize("wkind", ["float", "int8_f16s", "int4_g128_f16s"])
def test_single_token_graph_replay_qwen3_30b_a3b_shape(kmoe, gen, monkeypatch, wkind):
    """The T=1 kernels at the 30B-A3B layer: the general GEMV path's bits, eagerly and replayed from a CUDA
    graph (how decode runs them), and the same bits on every replay."""
    E, k, H, inter = 128, 8, 2048, 768
    env = {"QMOE_TOKEN1": "1"}
    single_token_against_general(
        kmoe, gen, monkeypatch, E, k, torch.bfloat16, wkind, torch.float32, env, H, inter
    )
    x = torch.randn(1, H, generator=gen, device="cuda").to(torch.bfloat16)
    logits = 2 * torch.randn(1, E, generator=gen, device="cuda")
    gu, dn, gs, ds = make_weights(gen, E, H, inter, torch.bfloat16, wkind)
    monkeypatch.setenv("QMOE_TOKEN1", "0")
    general = kmoe.moe_forward(x, logits, gu, dn, k, True, gs, ds, path="gemv")
    monkeypatch.setenv("QMOE_TOKEN1", "1")
    out = torch.full((1, H), float("nan"), dtype=torch.bfloat16, device="cuda")
    kmoe.moe_forward(x, logits, gu, dn, k, True, gs, ds, path="gemv", out=out)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kmoe.moe_forward(x, logits, gu, dn, k, True, gs, ds, path="gemv", out=out)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, general), "T=1 kernels replayed from a CUDA graph"


@pytest.mark.parametrize("pdl", ["1", "0"])
@pytest.mark.parametrize("token1", ["1", "0"])
def test_single_token_qwen3_30b_a3b_shape(kmoe, gen, monkeypatch, token1, pdl):
    monkeypatch.setenv("QMOE_TOKEN1", token1)
    monkeypatch.setenv("QMOE_PDL", pdl)
    run_case(kmoe, gen, 1, 128, 8, torch.bfloat16, "float", "auto", H=2048, inter=768)
