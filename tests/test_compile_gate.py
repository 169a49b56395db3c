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

target, ops, layout = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
# odd sizes: 2 images of 9 x 7 pixels, 48 channels, 3 classes x 3 prototypes
shape = Shape("tiny", "test", 2, 9, 7, 48, 3, 3)
launches = gate.compile_ops(target, shape, "bf16", layout, ops)
rows = gate.analyse(launches, __import__("pathlib").Path(sys.argv[4]), gate.resolve_shape(shape, "bf16"),
                    gate.TARGETS[target][0])
for line in gate.predictions(rows, gate.resolve_shape(shape, "bf16")):
    print(line, file=sys.stderr)
print(json.dumps(rows, default=str))
"""


def _compile(tmp_path, target, ops, layout="nchw"):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _SCRIPT, target, ",".join(ops), layout, str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


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
