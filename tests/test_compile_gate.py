"""The kernels compile for real GPUs, checked without one.

The interpreter (how every other kernel test runs here) never compiles a kernel, so a kernel
can pass all of them and still fail to compile for a GPU: a module global that is not a
``tl.constexpr`` did exactly that. These tests compile the kernels through their real launchers
for sm_90 and sm_80 at a small shape (``benchmarks/compile.py``: a stand-in Triton driver,
Triton's own ptxas, nothing launched) in a fresh process without ``TRITON_INTERPRET``, and read
the compiled code.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia", reason="this triton has no NVIDIA backend")

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import json, sys
from benchmarks import compile as gate
from benchmarks.shapes import Shape

target, ops, layout, dtype, tf32 = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[5], sys.argv[6] == "1"
# odd sizes: 2 images of 9 x 7 pixels, 48 channels, 3 classes x 3 prototypes; or B,H,W,C,K,M
sizes = tuple(map(int, sys.argv[7].split(","))) if len(sys.argv) > 7 else (2, 9, 7, 48, 3, 3)
shape = Shape("tiny", "test", *sizes)
launches = gate.compile_ops(target, shape, dtype, layout, ops, tf32=tf32)
rows = gate.analyse(launches, __import__("pathlib").Path(sys.argv[4]), gate.resolve_shape(shape, dtype),
                    gate.TARGETS[target][0])
for line in gate.predictions(rows, gate.resolve_shape(shape, dtype)):
    print(line, file=sys.stderr)
print(json.dumps(rows, default=str))
"""


def _run(tmp_path, target, ops, layout="nchw", sizes=None, dtype="bf16", tf32=False, fp_fusion_default="1"):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if fp_fusion_default is not None:
        env["TRITON_DEFAULT_FP_FUSION"] = os.environ.get("TRITON_DEFAULT_FP_FUSION", fp_fusion_default)
    extra = [",".join(map(str, sizes))] if sizes else []
    done = subprocess.run([sys.executable, "-c", _SCRIPT, target, ",".join(ops), layout, str(tmp_path), dtype,
                           "1" if tf32 else "0", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _compile(tmp_path, target, ops, *args, **kwargs):
    return _run(tmp_path, target, ops, *args, **kwargs)[0]


def _target(arch: int):
    """The stand-in GPU of ``benchmarks compile --target sm_<arch>``, with that GPU's SM count."""
    from benchmarks import compile as gate
    from torch_ppl.kernels import _common

    return _common.CompileTarget(arch, gate.TARGETS[f"sm_{arch}"][1])


def _by_kernel(rows):
    errors = [f"{r['op']}/{r['kernel']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n\n".join(errors)
    return {r["kernel"]: r for r in rows}


def test_contrastive_compiles_for_sm90(tmp_path):
    """The loss that every CUDA user with backend='auto' runs: forward and backward compile."""
    rows = _by_kernel(_compile(tmp_path, "sm_90", ["contrastive_loss"]))
    assert set(rows) == {"_contrastive_fwd_kernel", "_contrastive_bwd_dx_kernel", "_contrastive_bwd_dw_kernel"}
    assert rows["_contrastive_fwd_kernel"]["hgmma"] > 0  # Hopper tensor cores (wgmma)
    for row in rows.values():
        assert row["regs"] > 0 and row["hgmma"] + row["hmma"] > 0, row
        assert (tmp_path / row["files"][0]).read_text().startswith("//")  # the PTX
        assert (tmp_path / row["files"][1]).stat().st_size > 0  # the cubin


def test_every_launch_asks_for_fused_multiply_adds(tmp_path):
    """Triton 3.9 warns at the first kernel it compiles without ``enable_fp_fusion`` stated (its
    default turns fused multiply-adds off in 3.10, which would change every kernel's code): each
    launch states it, so a user's first call warns of nothing, and the PTX has its ``fma``."""
    rows, stderr = _run(tmp_path, "sm_90", ["prototype_logits", "contrastive_loss", "prototype_attention",
                                            "prototype_logits_and_contrastive"], layout="nhwc",
                        fp_fusion_default=None)
    rows = [r for r in rows if "error" not in r]
    assert len(rows) == 12, sorted(r["kernel"] for r in rows)
    for row in rows:
        assert row["meta"].get("enable_fp_fusion") is True, row["kernel"]
    assert "TRITON_DEFAULT_FP_FUSION" not in stderr, stderr[-2000:]
    assert "fma.rn.f32" in (tmp_path / rows[0]["files"][0]).read_text()


@pytest.mark.parametrize("target, layout", [("sm_90", "nhwc"), ("sm_80", "nchw")])
def test_every_kernel_compiles(tmp_path, target, layout):
    rows = _by_kernel(_compile(tmp_path, target, ["prototype_logits", "contrastive_loss", "prototype_attention"],
                               layout))
    assert len(rows) == 9, sorted(rows)
    for row in rows.values():  # the traffic model knows every kernel the launchers use
        assert row["model"]["bytes"] > 0 and sum(row["model"]["flops"].values()) > 0, row
        assert 0 < row["ideal_us"] < 1e6, row
    if target == "sm_80":  # no wgmma before Hopper: GEMMs lower to mma.sync
        assert all(r["hgmma"] == 0 for r in rows.values())
        assert rows["_contrastive_fwd_kernel"]["hmma"] > 0


def test_head_push_compiles_for_sm90(tmp_path):
    """The one-pass head + push: the head's forward and dx kernels with the PUSH flag and the
    joint prototype gradient compile, the forward on wgmma, and the traffic model knows them."""
    rows = _by_kernel(_compile(tmp_path, "sm_90", ["prototype_logits_and_contrastive"]))
    assert set(rows) == {"_logits_fwd_kernel", "_logits_bwd_dx_kernel", "_logits_push_bwd_dw_kernel"}
    assert rows["_logits_fwd_kernel"]["hgmma"] > 0
    for row in rows.values():
        assert row["hgmma"] + row["hmma"] > 0 and row["model"]["bytes"] > 0, row


_BAD_GLOBAL = r"""
import sys
import triton, triton.language as tl
import torch
from benchmarks import compile as gate

NEG = -1.0e30  # a plain float global: the interpreter takes it, the compiler must refuse it

@triton.jit
def kernel(out_ptr, BLOCK: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, BLOCK), tl.full((BLOCK,), NEG, tl.float32))

with gate.record_launches(90, 132) as launches:
    kernel[(1,)](torch.empty(16), BLOCK=16)
print("ERROR" if launches[0].error else "COMPILED", launches[0].error)
"""


def test_the_gate_catches_a_plain_global(tmp_path):
    """The gate can fail: a kernel reading a non-constexpr global is reported as an error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    script = tmp_path / "bad_global.py"  # triton.jit needs the kernel's source file
    script.write_text(_BAD_GLOBAL)
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.startswith("ERROR"), done.stdout
    assert "NEG" in done.stdout


@pytest.mark.parametrize("regs, warps, shared, arch, expected", [
    (128, 16, 131072, 90, 1),  # 16 warps x 128 registers fill the register file
    (120, 8, 40960, 90, 2),  # 120 -> 128 per thread in units of 256 per warp: 65536 / (8 * 32 * 128) = 2
    (150, 4, 33280, 90, 3),  # 160 per thread: 12 warps' worth of registers, 3 blocks of 4
    (64, 4, 110000, 90, 2),  # shared memory binds: 228 KB / (110000 + 1024)
    (64, 4, 110000, 80, 1),  # the A100 has 164 KB per SM
    (32, 2, 0, 90, 32),  # at most 32 blocks per SM
    (32, 2, 0, 86, 16),  # sm_86: at most 16 blocks
    (32, 16, 0, 86, 3),  # and 48 warps per SM
    (64, 4, 40000, 86, 2),  # and 100 KB of shared memory per SM
])
def test_blocks_per_sm(regs, warps, shared, arch, expected):
    from benchmarks import compile as gate

    assert gate.blocks_per_sm(regs, warps, shared, arch) == expected


def test_waves():
    from benchmarks import compile as gate

    assert gate.waves(264, 1, 132) == (2.0, 1.0)
    waves, fill = gate.waves(266, 1, 132)  # two programs in a third wave of their own
    assert waves == pytest.approx(266 / 132) and fill == pytest.approx(266 / 396)


@pytest.mark.parametrize("units, expected", [
    (2, 132),  # the head's and the push's dW at voc: 264 programs, two full waves
    (24, 11),  # the push's dW at ade: 264
    (7, 54),  # the pull's prototype gradient at voc: 378 of 396 slots in three waves (38 splits ran 2.02 waves)
    (94, 7),  # and at ade: 658 of 660 (3 splits ran 282 programs, 2.14 waves)
])
def test_pixel_splits_at_the_benchmark_shapes(units, expected):
    import torch

    from torch_ppl.kernels import _common

    with _common.compile_for(_common.CompileTarget(90, 132)):
        assert _common.pixel_splits(torch.device("cpu"), units, 10_000) == expected


@pytest.mark.parametrize("units", [1, 2, 7, 24, 94, 131, 133, 300, 1000])
@pytest.mark.parametrize("num_sms", [108, 132])
def test_pixel_splits_fill_whole_waves(units, num_sms):
    """The prototype-gradient grids (units x splits programs of equal length) fill at least two
    waves where the pixel tiles allow, and end on a last wave at least 95 % full where a split
    of up to eight waves can; otherwise on the fullest such split."""
    import torch

    from torch_ppl.kernels import _common

    def fill(programs):
        return programs / (-(-programs // num_sms) * num_sms)

    with _common.compile_for(_common.CompileTarget(90, num_sms)):
        for pixel_tiles in (1, 3, 50, 10_000):
            splits = _common.pixel_splits(torch.device("cpu"), units, pixel_tiles)
            assert 1 <= splits <= pixel_tiles
            if pixel_tiles < 10_000:
                continue
            assert units * splits >= 2 * num_sms
            allowed = range(-(-2 * num_sms // units), max(1, -(-8 * num_sms // units)) + 1)
            best = max(fill(units * s) for s in allowed)
            assert fill(units * splits) >= min(0.95, best), (units, splits)
    # the interpreter: two splits, so that the tests combine partials
    assert _common.pixel_splits(torch.device("cpu"), 7, 50) == 2


def test_head_variants_compile(tmp_path):
    """The head's kernels that the benchmarks' max pooling with a fixed scale never launches:
    logsumexp's prototype gradient (the joint kernel without the push), and dx recomputing the
    similarities for a learnable scale."""
    from benchmarks import compile as gate

    rows = _compile(tmp_path, "sm_90", list(gate.HEAD_VARIANTS))
    kernels = {(r["op"], r["kernel"]) for r in rows}
    assert ("prototype_logits-lse-scale", "_logits_push_bwd_dw_kernel") in kernels
    assert ("prototype_logits-mean-scale", "_logits_bwd_dw_kernel") in kernels
    errors = [f"{r['op']}/{r['kernel']}: {r['error']}" for r in rows if "error" in r]
    assert not errors and len(rows) == 6, errors or rows


@pytest.mark.parametrize("arch, dtype, layout, lse_push, expected", [
    (90, "bfloat16", "nchw", False, (128, True, False)),  # up to 256 channels: 128 prototypes, transposed
    (90, "bfloat16", "nchw", True, (64, True, True)),  # the push beside logsumexp pooling spilled with them
    (90, "bfloat16", "nhwc", True, (128, True, False)),  # channels-last features did not
    (100, "bfloat16", "nchw", True, (128, True, False)),  # nor did sm_100 (accumulator in tensor memory)
    (90, "float16", "nchw", False, (64, False, False)),  # float16: 64 prototypes, the plain similarity
    (90, "float16", "nchw", True, (64, True, False)),  # transposed beside logsumexp pooling
])
def test_one_pass_prototype_gradient_tiles(arch, dtype, layout, lse_push, expected):
    import torch

    from torch_ppl.kernels import _common, similarity

    stride = 1 if layout == "nhwc" else 129 * 129
    with _common.compile_for(_common.CompileTarget(arch, 132)):
        cfg = similarity._joint_dw_config(torch.device("cpu"), 256, getattr(torch, dtype), stride, lse_push=lse_push)
    assert (cfg["BLOCK_P"], cfg["S_TRANSPOSED"], cfg["OPAQUE_X"]) == expected


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_one_pass_heaviest_branches_compile_without_spilling(tmp_path, layout):
    """The head + push in one op with logsumexp pooling, the nearest positive and a learnable
    scale (the benchmarks' op takes max pooling, all positives and a fixed scale): its dx and
    prototype gradient take those branches and compile without spilling at 256 channels."""
    from benchmarks import compile as gate

    (op,) = gate.ONE_PASS_VARIANTS
    assert op not in gate.DEFAULT_OPS
    rows = _by_kernel(_compile(tmp_path, "sm_90", [op], layout=layout, sizes=(2, 9, 7, 256, 5, 4)))
    assert set(rows) == {"_logits_fwd_kernel", "_logits_bwd_dx_kernel", "_logits_push_bwd_dw_kernel"}
    for kernel in ("_logits_bwd_dx_kernel", "_logits_push_bwd_dw_kernel"):
        meta = rows[kernel]["meta"]
        assert meta["POOL"] == 1 and meta["NEAREST"] and meta["PUSH"], meta
    assert rows["_logits_bwd_dx_kernel"]["meta"]["NEED_DSCALE"]
    assert rows["_logits_bwd_dx_kernel"]["meta"]["BLOCK_N"] == 64
    for row in rows.values():
        assert row["stack"] == 0, row


def test_attention_with_exclude_and_layer_scale_compiles(tmp_path):
    """The attention as PPLHead runs it in training (each pixel's own class hidden, a layer
    scale): the three kernels take those branches, and compile without spilling."""
    from benchmarks import compile as gate

    rows = _by_kernel(_compile(tmp_path, "sm_90", list(gate.ATTENTION_VARIANTS)))
    assert set(rows) == {"_attention_fwd_kernel", "_attention_bwd_dx_kernel", "_attention_bwd_dproto_kernel"}
    for row in rows.values():
        assert row["meta"]["HAS_EXCLUDE"] and row["meta"]["HAS_GAMMA"], row["meta"]
        assert row["stack"] == 0, row
    # d(gamma) comes from the prototype-gradient kernel's dVt, not from a GEMM in dx
    assert not rows["_attention_bwd_dx_kernel"]["meta"]["NEED_GREAD"]


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_attention_prototype_gradient_tiles_widen_below_256_channels(tmp_path, layout):
    """The attention's prototype-gradient kernel reads ``x`` and the output gradient once per
    prototype tile, and its two ``BLOCK_P x C`` float32 accumulators bound the tile: at 128
    channels they hold 64 prototypes, half the re-reads of 32, and compile without spilling
    with Triton 3.9 (32 spilled 8 to 16 bytes per thread for channels-last features; Triton 3.8
    spilled 144 to 264 bytes with 64 and keeps 32)."""
    import triton

    from benchmarks import compile as gate

    ops = ["prototype_attention", *gate.ATTENTION_VARIANTS]
    rows = [r for r in _compile(tmp_path, "sm_90", ops, layout, (2, 17, 17, 128, 21, 10))
            if r["kernel"] == "_attention_bwd_dproto_kernel"]
    assert len(rows) == 2
    newest = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 9)
    for row in rows:
        assert row["meta"]["BLOCK_P"] == (64 if newest else 32), row["meta"]
        if newest:
            assert row["stack"] == 0, row


def test_unaligned_channel_strides_do_not_spill(tmp_path):
    """NCHW features of an odd H x W: the channel stride has no 16-element alignment, so each
    thread's element offsets are distinct, and the compiler held them across the pixel-tile
    loop of the prototype-gradient kernels. At 512 channels that spilled 256 bytes per thread
    in the attention's and 128 in the push's; recomputed per tile (``OPAQUE_X``), nothing."""
    ops = ["contrastive_loss", "prototype_attention"]
    sizes = (2, 17, 17, 512, 21, 10)  # 289-pixel images: a channel stride of 289
    nchw = _by_kernel(_compile(tmp_path / "nchw", "sm_90", ops, "nchw", sizes))
    for kernel in ("_contrastive_bwd_dw_kernel", "_attention_bwd_dproto_kernel"):
        row = nchw[kernel]
        assert row["meta"]["OPAQUE_X"], row["meta"]
        assert row["stack"] == 0, row
    assert nchw["_attention_bwd_dproto_kernel"]["meta"]["OPAQUE_G"]
    # channels-last features (channel stride 1, contiguous channels) keep their vector loads
    nhwc = _by_kernel(_compile(tmp_path / "nhwc", "sm_90", ops, "nhwc", sizes))
    assert not nhwc["_contrastive_bwd_dw_kernel"]["meta"]["OPAQUE_X"]
    assert not nhwc["_attention_bwd_dproto_kernel"]["meta"]["OPAQUE_X"]


def test_one_prototype_per_class_fits_99_kb_of_shared_memory(tmp_path):
    """M = 1 (which Triton specialises, unrolling the loop over m): the head's two-stage forward
    asked for 104 KB at 512 channels, more than the 99 KB a block may use on sm_86, sm_89 and
    sm_120 (RTX 30/40/50 series, A10, L4): a launch failure. One stage there."""
    rows = _by_kernel(_compile(tmp_path, "sm_86", ["prototype_logits"], "nchw", (2, 17, 17, 512, 19, 1)))
    assert rows["_logits_fwd_kernel"]["stages"] == 1, rows["_logits_fwd_kernel"]


def test_float32_features_follow_pytorchs_tf32_setting(tmp_path):
    """float32 features multiply exactly on the CUDA cores by default, as PyTorch's float32
    matmuls do; with ``torch.backends.cuda.matmul.allow_tf32`` every op's GEMMs run on the tensor
    cores in TF32, as PyTorch's then do, without spilling."""
    ops = ["prototype_logits", "contrastive_loss", "prototype_attention", "prototype_logits_and_contrastive"]
    exact = _by_kernel(_compile(tmp_path / "ieee", "sm_90", ops, dtype="fp32"))
    tf32 = _by_kernel(_compile(tmp_path / "tf32", "sm_90", ops, dtype="fp32", tf32=True))
    assert set(exact) == set(tf32) and len(tf32) == 11, sorted(tf32)
    for name in tf32:
        assert exact[name]["hgmma"] + exact[name]["hmma"] == 0, exact[name]
        assert tf32[name]["hgmma"] + tf32[name]["hmma"] > 0, tf32[name]
        assert tf32[name]["stack"] == 0, tf32[name]


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_gemm_precision_of_each_feature_dtype(allow_tf32):
    """What each op passes its kernels as ``tl.dot`` precision: float32 features follow
    ``torch.backends.cuda.matmul.allow_tf32``; 16-bit features do not depend on it."""
    import torch

    from torch_ppl.kernels import attention, contrastive, similarity

    fp32 = "tf32" if allow_tf32 else "ieee"
    was = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        def head(dtype):
            cfg = similarity._Config(torch.device("cpu"), 48, 3, 3, dtype)
            return cfg.precision, cfg.grad_precision

        assert head(torch.float32) == (fp32, fp32)
        assert head(torch.bfloat16)[1] == head(torch.float16)[1] == "tf32"
        assert contrastive._input_precision(torch.float32, 512) == fp32
        assert contrastive._input_precision(torch.float32, 720) == "ieee"  # TF32 spilled there
        assert contrastive._input_precision(torch.float16, 256) == "ieee"  # its exact fp32 dW GEMM
        assert attention._dot_precision(torch.float32) == fp32
        assert attention._dot_precision(torch.bfloat16) == "tf32"
        assert attention._dot_precision(torch.float16) == "tf32x3"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was


def test_class_tiles_pad_least_and_stay_at_most_32():
    """The head's class tile: 64 classes spilled 190 to 360 bytes per thread in the forward at
    K = 60 on sm_90, and never pads less than 32."""
    from torch_ppl.kernels.similarity import _class_tile

    assert {k: _class_tile(k) for k in (1, 3, 19, 21, 33, 60, 64, 100, 120, 150, 171)} == {
        1: 16, 3: 16, 19: 32, 21: 32, 33: 16, 60: 32, 64: 32, 100: 16, 120: 32, 150: 32, 171: 16}


def test_opaque_stride_only_for_unaligned_gpu_strides():
    import torch

    from torch_ppl.kernels import _common

    cpu = torch.device("cpu")
    assert not _common.opaque_stride(cpu, 289, 512)  # the interpreter runs no PTX
    with _common.compile_for(_common.CompileTarget(90, 132)):
        assert _common.opaque_stride(cpu, 289, 512) and _common.opaque_stride(cpu, 129 * 129, 384)
        assert not _common.opaque_stride(cpu, 129 * 129, 256)  # narrower rows hold few offsets
        assert not _common.opaque_stride(cpu, 1, 512)  # channels-last: contiguous channels
        assert not _common.opaque_stride(cpu, 128 * 128, 512)  # aligned: vector loads
        assert not _common.opaque_stride(cpu, 2 ** 31 + 1, 512)  # a 64-bit stride


def test_blackwell_targets_compile(tmp_path):
    """sm_100 (B200): the head's forward GEMM lowers to tcgen05 (counted as such); sm_120 (RTX 50
    series, 99 KB per block): every kernel of the head and the attention compiles and fits."""
    rows = _by_kernel(_compile(tmp_path / "sm_100", "sm_100", ["prototype_logits", "prototype_logits_and_contrastive"]))
    assert rows["_logits_fwd_kernel"]["tcgen05"] > 0, rows["_logits_fwd_kernel"]
    assert rows["_logits_bwd_dw_kernel"]["tcgen05"] > 0, rows["_logits_bwd_dw_kernel"]
    # the one-pass prototype gradient takes Hopper's transposed 128-prototype tile there
    joint = rows["_logits_push_bwd_dw_kernel"]
    assert joint["tcgen05"] > 0 and joint["meta"]["S_TRANSPOSED"] and joint["meta"]["BLOCK_P"] == 128, joint
    assert all(row["hgmma"] == 0 for row in rows.values())  # no Hopper wgmma on Blackwell
    rows = _by_kernel(_compile(tmp_path / "sm_120", "sm_120", ["prototype_logits", "prototype_attention"]))
    assert len(rows) == 6 and all(row["regs"] > 0 for row in rows.values()), rows


def test_max_stack_flags_spilling_kernels():
    from benchmarks import compile as gate

    rows = [dict(kernel="a", stack=0), dict(kernel="b", stack=8), dict(kernel="c", stack=440),
            dict(kernel="d", error="compile error")]
    assert [r["kernel"] for r in gate.over_stack(rows, 0)] == ["b", "c"]
    assert [r["kernel"] for r in gate.over_stack(rows, 8)] == ["c"]
    assert gate.over_stack(rows, None) == []


def test_wide_features_compile_only_the_ops_that_take_them():
    from benchmarks import compile as gate

    from torch_ppl import _backend

    widest = _backend.MAX_TRITON_CHANNELS
    ops = list(gate.OPS) + list(gate.VARIANTS)
    assert gate.fitting_ops(ops, 512) == (ops, [])
    c = widest["prototype_attention"] + 1
    fits, skipped = gate.fitting_ops(ops, c)
    assert skipped == [op for op in ops if widest[gate.base_op(op)] < c]
    assert "prototype_attention" in skipped and "prototype_attention-exclude-scale" in skipped
    assert "prototype_logits-lse-scale" in fits
    assert gate.fitting_ops(ops, max(widest.values()) + 1) == ([], ops)
    # a GPU whose blocks may use 99 KB of shared memory (the sm_86 target) takes the attention
    # up to 256 channels only
    small = gate.SHARED_LIMIT[gate.TARGETS["sm_86"][0]]
    assert gate.fitting_ops(ops, 256, small) == (ops, [])
    attention = ["prototype_attention", "prototype_attention-exclude-scale"]
    assert gate.fitting_ops(ops, 512, small) == ([op for op in ops if op not in attention], attention)
    shape = gate.resolve_shape("voc", "fp16", channels=720)
    assert (shape.C, shape.name, shape.N) == (720, "voc-C720", gate.resolve_shape("voc", "fp16").N)


def test_shape_options_replace_the_named_shapes_sizes():
    from benchmarks import compile as gate

    voc = gate.resolve_shape("voc", "bf16")
    shape = gate.resolve_shape("ade", "bf16", classes=60, protos_per_class=5, size=129)
    assert (shape.C, shape.K, shape.M, shape.P, shape.H, shape.W, shape.B) == (512, 60, 5, 300, 129, 129, 16)
    assert shape.name == "ade-K60-M5-S129"
    # a size equal to the shape's own changes nothing
    assert gate.resolve_shape("voc", "bf16", size=voc.H) == voc
    dot = gate.resolve_shape("voc", "bf16", similarity="dot")
    assert (dot.similarity, dot.name, voc.similarity) == ("dot", "voc-dot", "cosine")


@pytest.mark.parametrize("option", ["--channels", "--classes", "--protos-per-class", "--size"])
@pytest.mark.parametrize("bad", ["0", "-3", "wide"])
def test_shape_options_must_be_positive_ints(option, bad, capsys):
    import argparse

    from benchmarks import compile as gate

    parser = argparse.ArgumentParser()
    gate.add_arguments(parser)
    assert getattr(parser.parse_args([option, "720"]), option[2:].replace("-", "_")) == 720
    with pytest.raises(SystemExit):
        parser.parse_args([option, bad])
    assert f"argument {option}: expected a positive integer, got '{bad}'" in capsys.readouterr().err


_TRAP = r"""
import sys
from pathlib import Path
import triton, triton.language as tl
import torch
from benchmarks import compile as gate

@triton.jit
def kernel(a_ptr, b_ptr, out_ptr, K, N: tl.constexpr):
    # two 64 x N fp32 accumulators of tcgen05 MMAs (Blackwell keeps them in tensor memory)
    rows, kk, cols = tl.arange(0, 64), tl.arange(0, 32), tl.arange(0, N)
    acc0 = tl.zeros((64, N), tl.float32)
    acc1 = tl.zeros((64, N), tl.float32)
    for k0 in range(0, K, 32):
        a = (tl.load(a_ptr + rows[:, None] * K + k0 + kk[None, :]) * 2.0).to(tl.bfloat16)
        acc0 = tl.dot(a, tl.load(b_ptr + (k0 + kk)[:, None] * N + cols[None, :]), acc0)
        acc1 = tl.dot(a, tl.load(b_ptr + K * N + (k0 + kk)[:, None] * N + cols[None, :]), acc1)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc0 + acc1)

for n in (128, 256):
    with gate.record_launches(100, 148) as launches:
        kernel[(1,)](torch.empty(64, 64, dtype=torch.bfloat16), torch.empty(2, 64, n, dtype=torch.bfloat16),
                     torch.empty(64, n), 64, N=n, num_warps=8)
    row, = gate.analyse(launches, Path(sys.argv[1]) / str(n), arch=100)
    print(n, row["traps"], row.get("error", "COMPILED"))
"""


def test_the_gate_catches_a_kernel_compiled_to_a_trap(tmp_path):
    """Triton 3.8 and 3.9 compile this kernel for sm_100 with 256 columns per accumulator (512 of
    tensor memory, and its operand) into a lone ``trap``, and raise nothing: the gate reports it.
    With 128 columns it compiles to tcgen05 MMAs, and passes."""
    import triton

    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 8):
        pytest.skip("older Tritons lower this kernel")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = tmp_path / "trap.py"
    script.write_text(_TRAP)
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    fits, traps = done.stdout.strip().splitlines()[-2:]
    assert fits == "128 0 COMPILED", fits
    assert traps.startswith("256 1 compiles to code that traps"), traps


@pytest.mark.parametrize("arch, dtype, channels, block_n, block_p, reload", [
    (80, "bfloat16", 512, 32, 0, False),  # an A100 with bf16 features: the wider tile, which compiles clean
    (80, "float16", 512, 32, 16, True),  # float16 (which spilled 40 to 88 bytes with it): flat tiles, rows reloaded
    (86, "bfloat16", 512, 32, 16, True),  # so do both 16-bit types on the other sm_8x GPUs
    (86, "float16", 512, 32, 16, True),
    (120, "bfloat16", 512, 16, 0, False),  # the RTX 50 series spilled with them
    (90, "bfloat16", 256, 64, 16, True),  # sm_90, bf16: 64 pixels, flat prototype tiles, rows reloaded
    (90, "bfloat16", 512, 32, 32, True),  # at 512 channels 32 pixels, 32 prototypes
    (90, "bfloat16", 64, 32, 0, False),  # and with 32-channel halves
    (90, "float16", 512, 32, 16, True),  # float16 at 512 channels: 16 wide
    (90, "float16", 256, 64, 16, True),  # so does float16 up to 256 channels
    (100, "bfloat16", 256, 64, 16, False),  # sm_100 (tcgen05, Triton 3.8 or newer): the rows held
    (100, "float16", 512, 32, 16, True),
    (90, "float32", 512, 16, 0, False),  # float32 features keep 16 pixels (and their channel chunks)
    (80, "bfloat16", 1024, 16, 0, False),  # wider features keep the narrow tiles
    (80, "bfloat16", 256, 32, 0, False),  # up to 256 channels every GPU takes 32 pixels or more
])
def test_one_pass_dx_pixel_tile(arch, dtype, channels, block_n, block_p, reload):
    """The one-pass head + push's dx tile, which the compile gate checks for spills: 32 pixels
    only where they compiled without spilling, 64 with flat 16-prototype tiles on sm_90 and
    sm_100 for 16-bit features up to 256 channels, and flat tiles for 16-bit features at 257 to 512
    channels, with the rows loaded again at the end where holding them spilled."""
    import torch

    from torch_ppl.kernels import _common, head_push

    with _common.compile_for(_target(arch)):
        cfg = head_push._config(torch.device("cpu"), channels, 150, 10, getattr(torch, dtype))
    chunk = 64 if dtype == "float32" else 0
    assert (cfg.bwd_block_n, cfg.dx_block_p, cfg.dx_s_chunk) == (block_n, block_p, chunk)
    assert cfg.reload_x == reload
    if block_n == 32 and channels > 256:  # with 16-class tiles and two stages, or flat ones and one
        assert cfg.num_stages == (1 if block_p else 2) and (block_p or cfg.block_k == 16)


@pytest.mark.parametrize("arch, dtype, channels, expected, reload", [
    (90, "bfloat16", 256, (64, 16, 0, 2), True),  # 64 pixels, flat tiles of 16, the rows loaded again
    (90, "bfloat16", 512, (32, 32, 0, 2), True),  # at 512 channels 32 pixels, 32 prototypes
    (90, "float16", 512, (32, 16, 0, 2), True),  # float16 at 512 channels: 16 wide
    (90, "float16", 256, (64, 16, 0, 2), True),  # float16 as bfloat16
    (86, "float16", 256, (16, 0, 0, 1), False),  # class tiles elsewhere
    (90, "bfloat16", 64, (16, 0, 0, 1), False),
    (90, "float32", 512, (16, 0, 64, 1), False),
    (80, "bfloat16", 256, (16, 0, 0, 1), False),
    (80, "bfloat16", 512, (16, 0, 0, 1), False),
    (100, "bfloat16", 256, (64, 16, 0, 2), False),  # sm_100 (tcgen05) as sm_90, the rows held
    (100, "bfloat16", 512, (32, 32, 0, 2), True),
    (90, "bfloat16", 1024, (16, 0, 0, 1), False),  # wider features keep the narrow tiles
])
def test_logsumexp_dx_tiles(arch, dtype, channels, expected, reload):
    """The head's dx with logsumexp pooling (pixels, flat prototype tile, channel chunk,
    stages): 64 pixels against flat tiles on sm_90 for 16-bit features of 128 to 256 channels,
    32 pixels for 16-bit features at 257 to 512 with the rows loaded again at the end, where they compiled without
    spilling."""
    import torch

    from torch_ppl.kernels import _common, similarity

    with _common.compile_for(_target(arch)):
        cfg = similarity._Config(torch.device("cpu"), channels, 21, 10, getattr(torch, dtype))
    got = (cfg.recompute_block_n, cfg.dx_block_p, cfg.dx_s_chunk, cfg.recompute_stages)
    assert got == expected
    assert cfg.reload_x == reload


@pytest.mark.parametrize("arch, dtype, triton_version, channel_stride, stages", [
    (100, "bfloat16", (3, 8), 129 * 129, 1),  # the opaque stride of an odd H x W: one stage
    (90, "float32", (3, 8), 129 * 129, 1),
    (90, "float32", (3, 3), 129 * 129, 1),
    (100, "bfloat16", (3, 8), 128 * 128, 2),  # an aligned stride keeps two
    (100, "bfloat16", (3, 8), 1, 2),  # and so do channels-last features
    (100, "bfloat16", (3, 9), 129 * 129, 2),  # Triton 3.9 compiles the opaque stride in a pipelined loop
    (90, "float32", (3, 9), 129 * 129, 2),
])
def test_head_prototype_gradient_stages_with_older_tritons(monkeypatch, arch, dtype, triton_version,
                                                           channel_stride, stages):
    """512 channels: Triton 3.3 to 3.8 failed to compile the head's prototype gradient with an
    unaligned NCHW channel stride for sm_90 with fp32 features, and 3.4 to 3.8 for sm_100 with
    16-bit ones ("pipeliner doesn't know how to predicate this op": the opaque stride's inline
    PTX in a two-stage loop). CI compiles those cases with 3.3 to 3.8."""
    import torch

    from torch_ppl.kernels import _common, similarity

    monkeypatch.setattr(similarity, "TRITON_VERSION", triton_version)
    with _common.compile_for(_target(arch)):
        cfg = similarity._Config(torch.device("cpu"), 512, 150, 10, getattr(torch, dtype), channel_stride)
    assert cfg.dw_stages == stages


@pytest.mark.parametrize("arch, m, dtype, stages", [
    (100, 1, "bfloat16", 1),  # one prototype per class on sm_100: one stage
    (100, 1, "float16", 1),
    (100, 10, "bfloat16", 2),
    (100, 1, "float32", 2),
    (90, 1, "bfloat16", 2),
])
def test_head_dx_stages_with_one_prototype_per_class(arch, m, dtype, stages):
    """The head's dx for max and mean pooling (channel slices): with one prototype per class,
    which Triton specialises, two stages spilled 32 to 488 bytes per thread on sm_100 for
    16-bit features; CI holds that case to no spills."""
    import torch

    from torch_ppl.kernels import _common, similarity

    with _common.compile_for(_target(arch)):
        cfg = similarity._Config(torch.device("cpu"), 256, 19, m, getattr(torch, dtype), 129 * 129)
    assert cfg.slice_stages == stages


# Three GEMMs as Triton 3.9 writes them in TTGIR (abridged): a wgmma tile of 128 rows on two
# warpgroups, and a chained pair on mma.sync whose layout puts 8 warps side by side, 8 columns
# each, so the 32 x 16 tile is computed four times over; and a batched (3-D) mma.sync GEMM.
_TTGIR = """\
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 32, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [1, 8], instrShape = [16, 8]}>
#mma2 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [2, 4, 1], instrShape = [1, 16, 8]}>
    %s = ttng.warp_group_dot %x, %w, %c {isAsync = true} : !ttg.memdesc<128x256xbf16, #shared, #smem> * !ttg.memdesc<256x32xbf16, #shared1, #smem> -> tensor<128x32xf32, #mma> loc(#loc1)
    %z = tt.dot %a, %b, %c0, inputPrecision = tf32 : tensor<32x512xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma1, kWidth = 4}>> * tensor<512x16xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma1, kWidth = 4}>> -> tensor<32x16xf32, #mma1> loc(#loc2)
    %dx = tt.dot %d, %e, %c1, inputPrecision = tf32 : tensor<32x16xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma1, kWidth = 4}>> * tensor<16x512xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma1, kWidth = 4}>> -> tensor<32x512xf32, #mma1> loc(#loc3)
    %o = tt.dot %f, %g, %c2, inputPrecision = tf32 : tensor<2x64x128xf32, #ttg.dot_op<{opIdx = 0, parent = #mma2, kWidth = 1}>> * tensor<2x128x8xf32, #ttg.dot_op<{opIdx = 1, parent = #mma2, kWidth = 1}>> -> tensor<2x64x8xf32, #mma2> loc(#loc4)
"""


def test_mma_tiles_find_warps_that_repeat_work():
    from benchmarks import compile as gate

    tiles = gate.mma_tiles(_TTGIR)
    assert [(t["tile"], t["k"], t["replicated"]) for t in tiles] == [
        ([128, 32], 256, 1), ([32, 16], 512, 4), ([32, 512], 16, 1), ([2, 64, 8], 128, 1)]
    # the work issued over the work needed, each GEMM weighted by its multiply-adds
    macs = [128 * 32 * 256, 32 * 16 * 512, 32 * 512 * 16, 2 * 64 * 8 * 128]
    assert gate.mma_replication(tiles) == pytest.approx((sum(macs) + 3 * macs[1]) / sum(macs))
    assert gate.mma_replication(tiles[:1]) == gate.mma_replication([]) == 1.0


def test_the_table_and_the_model_show_repeated_mma_work(tmp_path):
    """The push's dx at 512 channels: its z GEMM feeds the dx GEMM, so both take a layout of 8
    warps side by side, and a z tile narrower than 64 prototypes is computed more than once.
    The compile table names it and the traffic model charges it."""
    from benchmarks import compile as gate

    rows = _by_kernel(_compile(tmp_path, "sm_90", ["contrastive_loss"], sizes=(2, 8, 8, 512, 7, 10)))
    dx = rows["_contrastive_bwd_dx_kernel"]
    assert dx["stack"] == 0
    # 32 prototypes per tile: the 32 x 32 z tile twice over, the 32 x 512 dx tile once
    assert sorted((t["tile"], t["replicated"]) for t in dx["mma_tiles"]) == [([32, 32], 2), ([32, 512], 1)]
    assert dx["mma_replication"] == pytest.approx(1.5)
    assert dx["model"]["mma_replication"] == dx["mma_replication"]
    assert "**repeated work**: 32×32 tile 2×; 1.50× in all" in gate._tensor_cores(dx)
    assert rows["_contrastive_fwd_kernel"]["mma_replication"] == 1.0


@pytest.mark.parametrize("arch, triton_version, tile", [
    (90, (3, 9), (32, 32, 1)),  # 32 prototypes, one stage: the z tile computed twice over
    (80, (3, 8), (32, 32, 1)),
    (90, (3, 6), (32, 32, 1)),  # clean on sm_90 from Triton 3.6
    # Triton 3.6 and 3.7: each other GPU takes the tile that spilled less there
    (80, (3, 6), (32, 32, 1)),
    (86, (3, 6), (32, 16, 3)),
    (80, (3, 7), (32, 16, 3)),
    (120, (3, 7), (32, 32, 1)),
    (90, (3, 5), (16, 64, 2)),  # before 3.6 every wider tile spilled
])
def test_push_dx_tile_at_512_channels(monkeypatch, arch, triton_version, tile):
    """The push's dx tile at 512 channels, (pixels, prototypes, stages), where it compiled
    without spilling with each Triton release (the compile gate checks the newest two)."""
    import torch

    from torch_ppl.kernels import _common, contrastive

    monkeypatch.setattr(contrastive, "TRITON_VERSION", triton_version)
    monkeypatch.setattr(_common, "TRITON_VERSION", triton_version)  # warpgroup_mma
    with _common.compile_for(_common.CompileTarget(arch, 132)):
        dx, _ = contrastive._bwd_configs(torch.device("cpu"), 16384, 1500, 512, torch.bfloat16)
    assert (dx["BLOCK_N"], dx["BLOCK_P"], dx["num_stages"]) == tile


@pytest.mark.parametrize("arch, triton_version, channels, dtype, stride, tile", [
    (90, (3, 9), 256, "bfloat16", 16641, (64, 64, True)),  # NCHW: wgmma, channel halves
    (90, (3, 9), 256, "bfloat16", 1, (128, 32, True)),  # channels_last: 128 pixels
    (90, (3, 6), 96, "float16", 16384, (64, 64, True)),
    (90, (3, 5), 256, "bfloat16", 16641, (32, 64, False)),  # 3.5 spilled 16 bytes with the halves
    (90, (3, 9), 200, "bfloat16", 1, (32, 64, False)),  # rows misaligned for asynchronous copies
    (90, (3, 9), 256, "float32", 1, (16, 32, False)),  # CUDA-core GEMMs, chunked z
    (80, (3, 9), 256, "bfloat16", 1, (32, 64, False)),  # no wgmma
    (100, (3, 9), 256, "bfloat16", 1, (64, 64, True)),  # sm_100 (tcgen05): 64 pixels in halves
    (100, (3, 7), 256, "bfloat16", 1, (32, 64, False)),  # not verified before Triton 3.8
])
def test_push_dx_tile_up_to_256_channels(monkeypatch, arch, triton_version, channels, dtype, stride, tile):
    """The push's dx at up to 256 channels: 64 pixels in channel halves (128 for channels_last
    features) where they compiled without spilling (sm_90, 16-bit features, a channel count
    that is a multiple of 16)."""
    import torch

    from torch_ppl.kernels import _common, contrastive

    monkeypatch.setattr(contrastive, "TRITON_VERSION", triton_version)
    monkeypatch.setattr(_common, "TRITON_VERSION", triton_version)  # warpgroup_mma
    with _common.compile_for(_common.CompileTarget(arch, 132)):
        dx, _ = contrastive._bwd_configs(torch.device("cpu"), 16641, 210, channels, getattr(torch, dtype), stride)
    assert (dx["BLOCK_N"], dx["BLOCK_P"], dx.get("HALVES", False)) == tile


@pytest.mark.parametrize("arch, triton_version, channels, dtype, protos, form", [
    (90, (3, 9), 256, "bfloat16", 210, (128, 8, True)),  # all of dW's GEMMs on wgmma
    (90, (3, 4), 256, "bfloat16", 210, (128, 8, True)),
    (90, (3, 3), 256, "bfloat16", 210, (128, 16, False)),  # 3.3 spilled more with it
    (90, (3, 9), 256, "bfloat16", 40, (64, 16, False)),  # 64 prototypes: rows repeated, spilled
    (90, (3, 9), 512, "bfloat16", 1500, (64, 8, False)),  # 128 x 512 does not fit
    (90, (3, 9), 256, "float16", 210, (64, 8, False)),  # fp32 dW operands
    (80, (3, 9), 256, "bfloat16", 210, (64, 8, False)),  # no wgmma
    (100, (3, 9), 256, "bfloat16", 210, (128, 8, True)),  # sm_100: on tcgen05
    (100, (3, 8), 256, "bfloat16", 210, (64, 8, False)),  # which spilled with Triton 3.8
])
def test_push_dw_transposed_z(monkeypatch, arch, triton_version, channels, dtype, protos, form):
    """The push's prototype gradient (prototypes, warps, z GEMM transposed): 128 prototypes as
    the rows of a wgmma on sm_90 (tcgen05 on sm_100) for bfloat16 features up to 256 channels,
    where that compiled without spilling."""
    import torch

    from torch_ppl.kernels import _common, contrastive

    monkeypatch.setattr(contrastive, "TRITON_VERSION", triton_version)
    monkeypatch.setattr(_common, "TRITON_VERSION", triton_version)  # warpgroup_mma
    with _common.compile_for(_common.CompileTarget(arch, 132)):
        _, dw = contrastive._bwd_configs(torch.device("cpu"), 16641, protos, channels, getattr(torch, dtype), 1)
    assert (dw["BLOCK_P"], dw["num_warps"], dw.get("S_TRANSPOSED", False)) == form
