"""CPU smoke test of the benchmark suite: the plumbing and the result schema, never speed.

Runs every op with every provider that can run on the CPU at tiny shapes (torch.compile with
the "eager" backend: Dynamo tracing without Inductor's C++ build, to stay within budget),
checks that providers that cannot run are recorded with a reason instead of crashing, that
the outside tools compute what the reference computes, the bytes/FLOPs models, the CSV, the
resume, and that the plot script writes PNGs.
"""
from __future__ import annotations

import csv
import json

import pytest
import torch

from benchmarks import __main__ as cli
from benchmarks import plots, providers, roofline, runner, shapes

PASSES = roofline.PASSES


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on a shared CPU: one intra-op thread is faster and steadier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def grid(tmp_path_factory, one_thread):
    """Every op and provider at the tiny shape, at its M=1 dot-product twin the loss only
    (where Liger and CCE apply; the other ops there would only repeat the first shape), and at
    its two-head twin the attention only (where its two forms compete)."""
    out = tmp_path_factory.mktemp("bench") / "smoke.jsonl"
    main, m1, h2 = shapes.smoke()
    kwargs = dict(device=torch.device("cpu"), out=out, compile_backend="eager", cpu_reps=1, log=lambda *_: None)
    parts = [runner.run([main], **kwargs), runner.run([m1], ops=["contrastive_loss"], **kwargs),
             runner.run([h2], ops=["prototype_attention"], **kwargs)]
    return out, dict(rows=[r for part in parts for r in part["rows"]], complete=all(p["complete"] for p in parts))


def _rows(grid):
    return runner.read_rows(grid[0])


def test_smoke_grid(grid, tmp_path):
    """One test over the one grid run: under pytest-xdist a module fixture runs once per
    worker, so checks spread over several tests could pay for the grid twice."""
    _rows_follow_the_schema(grid)
    _every_applicable_cell_has_one_row(grid)
    _cpu_providers_run_and_agree_with_the_reference(grid)
    _providers_that_cannot_run_say_why(grid)
    _resume_and_csv(grid, tmp_path)
    _plots_write_pngs(grid, tmp_path)


def _rows_follow_the_schema(grid):
    out, done = grid
    rows = _rows(grid)
    assert done["complete"] and rows == done["rows"]
    for r in rows:
        assert tuple(r) == runner.FIELDS
        assert r["status"] in runner.STATUSES
        assert r["op"] in roofline.OPS and r["provider"] in providers.PROVIDERS and r["pass"] in PASSES
        assert r["device"].startswith("cpu") and r["torch_version"] == torch.__version__
        assert r["triton_version"] and r["commit"] and r["dtype"] == "x=bf16,W=fp32"
        shape = next(s for s in shapes.smoke() if s.name == r["shape"])
        assert r["dims"] == shape.dims() and r["group"] == "smoke"
        assert (r["bytes"], r["flops"]) == roofline.work(r["op"], shape, r["pass"])
        if r["status"] == "ok":
            assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
            assert r["achieved_gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
            assert r["achieved_tflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e12)
            # an unknown device (the CPU) has no roofline; no CUDA, no memory figure
            assert r["roofline_fraction"] is None and r["bound"] is None and r["peak_mem_bytes"] is None
            assert r["reason"] == ""
        else:
            assert r["reason"] and r["median_ms"] is None


def _every_applicable_cell_has_one_row(grid):
    rows = _rows(grid)
    keys = [(r["shape"], r["op"], r["provider"], r["pass"]) for r in rows]
    assert len(keys) == len(set(keys))
    main, m1, h2 = shapes.smoke()
    expected = {(s.name, op, prov, p)
                for s, ops in ((main, roofline.OPS), (m1, ["contrastive_loss"]), (h2, ["prototype_attention"]))
                for op in ops for prov in providers.PROVIDERS if providers.applies(prov, op, s) for p in PASSES}
    assert set(keys) == expected
    # the outside tools only where they compute the same thing
    assert {(s, o) for s, o, p, _ in keys if p == "sdpa"} == {("smoke", "prototype_attention"),
                                                            ("smoke-h2", "prototype_attention")}
    assert {(s, o) for s, o, p, _ in keys if p in ("fast-form", "projected-form")} == {
        ("smoke-h2", "prototype_attention")}
    assert {(s, o) for s, o, p, _ in keys if p in ("liger", "cce")} == {("smoke-m1dot", "contrastive_loss")}


HAS_LIGER = providers._has("liger_kernel")


def _cpu_providers_run_and_agree_with_the_reference(grid):
    rows = _rows(grid)
    by = {(r["shape"], r["op"], r["provider"], r["pass"]): r for r in rows}
    for (shape, op, prov, p), r in by.items():
        if prov in ("reference", "compile", "sdpa", "fast-form", "projected-form") or (prov == "liger" and HAS_LIGER):
            assert r["status"] == "ok", (shape, op, prov, p, r["reason"])
        if prov == "liger" and not HAS_LIGER:
            assert r["status"] == "unavailable" and "pip install liger-kernel" in r["reason"]
    for (shape, op, prov, p), r in by.items():
        if r["status"] != "ok":
            continue
        ref = by[(shape, op, "reference", p)]
        if prov == "reference":
            assert r["fwd_max_abs_err"] == 0.0
        elif prov == "compile":  # the same fp32 math, traced
            assert r["fwd_max_abs_err"] < 1e-3, (shape, op, prov)
        else:  # bf16 somewhere inside (sdpa, liger; triton's tiles): bf16-sized errors on logits up to 10
            assert r["fwd_max_abs_err"] < 0.1, (shape, op, prov)
        assert ref["status"] == "ok"


def _providers_that_cannot_run_say_why(grid):
    for r in _rows(grid):
        if r["provider"] == "cce":  # its kernels need CUDA; the test extra does not install it
            assert r["status"] == "unavailable"
            assert "CUDA" in r["reason"] or "pip install cut-cross-entropy" in r["reason"], r["reason"]
        if r["provider"] == "triton":  # torch_ppl's kernels: run under TRITON_INTERPRET once they exist
            assert r["status"] in ("ok", "unavailable")
            if r["status"] == "unavailable":
                assert "Triton kernel" in r["reason"] or "triton" in r["reason"]
        assert r["status"] != "error", r


def test_sdpa_computes_the_attention():
    """The SDPA composition is PPLAttention's math (up to bf16)."""
    for shape in shapes.smoke():
        problem = providers.make_problem(shape, torch.device("cpu"), seed=3)
        attn_ref = providers.prototype_attention(problem, "reference").float()
        attn_sdpa = providers.sdpa_attention(problem).float()
        torch.testing.assert_close(attn_sdpa, attn_ref, rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(not HAS_LIGER, reason="liger-kernel is not installed")
def test_liger_computes_the_m1_dot_loss():
    """Liger's fused linear CE is torch_ppl's contrastive loss at M=1, dot, temperature 1."""
    shape = shapes.smoke()[1]  # M = 1, dot product, temperature 1
    problem = providers.make_problem(shape, torch.device("cpu"), seed=3)
    ref = providers.contrastive_loss(problem, "reference")
    liger = providers.build("liger", "contrastive_loss", problem)()
    torch.testing.assert_close(liger.float(), ref, rtol=1e-4, atol=1e-4)
    ref_grad = torch.autograd.grad(ref, [problem.x, problem.prototypes])
    liger_grad = torch.autograd.grad(liger, [problem.x, problem.prototypes])
    for a, b in zip(liger_grad, ref_grad):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_failures_are_recorded_not_raised(tmp_path, monkeypatch):
    failures = {"prototype_logits": NotImplementedError("no kernel yet"),
                "contrastive_loss": RuntimeError("CUDA out of memory. Tried to allocate 1 GiB"),
                "prototype_attention": KeyError("boom")}

    def broken(provider, op, problem, compile_backend="inductor"):
        def fn():
            raise failures[op]
        return fn

    monkeypatch.setattr(providers, "build", broken)
    done = runner.run(shapes.smoke()[:1], ops=list(failures), providers=["reference"], passes=["fwd"],
                      device=torch.device("cpu"), out=tmp_path / "r.jsonl", log=lambda *_: None)
    status = {r["op"]: (r["status"], r["reason"]) for r in done["rows"]}
    assert status["prototype_logits"] == ("unavailable", "no kernel yet")
    assert status["contrastive_loss"][0] == "skipped" and "out of memory" in status["contrastive_loss"][1]
    assert status["prototype_attention"] == ("error", "KeyError: 'boom'")


def _resume_and_csv(grid, tmp_path):
    out, _ = grid
    again = runner.run(shapes.smoke()[:1], device=torch.device("cpu"), out=out, compile_backend="eager",
                       cpu_reps=1, log=lambda *_: None)
    assert again["rows"] == [] and again["complete"]
    rows = _rows(grid)
    runner.write_csv(rows, tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == runner.FIELDS and len(table) == len(rows)
    assert json.loads(table[0]["dims"]) == rows[0]["dims"]


def test_resume_after_a_killed_run(tmp_path):
    out = tmp_path / "r.jsonl"
    kwargs = dict(ops=["prototype_logits"], providers=["reference"], passes=["fwd", "bwd"],
                  device=torch.device("cpu"), out=out, cpu_reps=1, log=lambda *_: None)
    first = runner.run(shapes.smoke()[:1], **kwargs)["rows"]
    text = out.read_text()
    out.write_text(text[: len(text) - 40])  # the last row cut off mid-line
    assert runner.read_rows(out) == first[:1]
    again = runner.run(shapes.smoke()[:1], **kwargs)["rows"]
    assert [r["pass"] for r in again] == ["bwd"]
    assert [r["pass"] for r in runner.read_rows(out)] == ["fwd", "bwd"]


def test_providers_run_when_the_reference_does_not_fit(tmp_path, monkeypatch):
    original = providers.OPS["prototype_logits"]

    def oom_without_grad(problem, backend):
        if not torch.is_grad_enabled():  # the reference forward of the accuracy check
            raise RuntimeError("CUDA out of memory. Tried to allocate 40 GiB")
        return original(problem, backend)

    monkeypatch.setitem(providers.OPS, "prototype_logits", oom_without_grad)
    done = runner.run(shapes.smoke()[:1], ops=["prototype_logits"], providers=["reference"], passes=["fwd"],
                      device=torch.device("cpu"), out=None, cpu_reps=1, log=lambda *_: None)
    (row,) = done["rows"]
    assert row["status"] == "ok" and row["fwd_max_abs_err"] is None


def test_time_budget_stops_cleanly(tmp_path):
    done = runner.run(shapes.smoke(), ops=["prototype_logits"], providers=["reference"],
                      device=torch.device("cpu"), out=tmp_path / "r.jsonl", time_budget_s=0.0, log=lambda *_: None)
    assert not done["complete"] and done["rows"] == []


def _plots_write_pngs(grid, tmp_path):
    rows = _rows(grid)
    # plus a synthetic sweep with memory figures, as a GPU run would write
    sweep = []
    for i, shape in enumerate(shapes.sweep_n()[:3]):
        for prov, ms in (("reference", 4.0 * (i + 1)), ("triton", 1.0 * (i + 1))):
            row = dict(rows[0], op="contrastive_loss", provider=prov, shape=shape.name, group="sweep-N",
                       dims=shape.dims(), status="ok", median_ms=ms, peak_mem_bytes=2**20 * (i + 1))
            row["pass"] = "fwdbwd"
            sweep.append(row)
    paths = plots.plot(rows + sweep, tmp_path / "plots")
    names = {p.name for p in paths}
    assert "contrastive_loss_sweep-N_fwdbwd.png" in names and "ppl_step_smoke_fwdbwd.png" in names
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_roofline_models_and_peaks():
    s = shapes.Shape("t", "smoke", 2, 3, 5, 8, 4, 3)  # N = 30, C = 8, K = 4, P = 12
    n, c, p, k = 30, 8, 12, 4
    assert roofline.work("prototype_logits", s, "fwd") == (n * c * 2 + p * c * 4 + n * k * 4, 2 * n * p * c)
    assert roofline.work("contrastive_loss", s, "bwd")[1] == 6 * n * p * c
    fwd, bwd, both = (roofline.work("ppl_step", s, x) for x in PASSES)
    assert both == (fwd[0] + bwd[0], fwd[1] + bwd[1])
    assert roofline.device_peak("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert roofline.device_peak("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert roofline.device_peak("NVIDIA H200").name == "H200 SXM"
    assert roofline.device_peak("cpu (x86_64)") is None
    assert roofline.device_peak("cpu", 1e12, 1e14).bandwidth == 1e12
    peak = roofline.DevicePeak("toy", bandwidth=1e12, tensor_flops=1e15, source="test")
    # 1 GB at 1 TB/s = 1 ms ideal, 1e9 FLOP at 1 PFLOP/s = 1 us: memory-bound; measured 4 ms
    r = roofline.rates(10**9, 10**9, 4.0, peak)
    assert r["bound"] == "memory" and r["roofline_fraction"] == pytest.approx(0.25)
    assert r["achieved_gbps"] == pytest.approx(250.0) and r["achieved_tflops"] == pytest.approx(0.25)
    r = roofline.rates(10, 10**13, 20.0, peak)
    assert r["bound"] == "compute" and r["roofline_fraction"] == pytest.approx(0.5)


def test_kernel_model_charges_each_programs_pass_over_the_prototypes_to_l2():
    """A pixel-tiled kernel streams every prototype through every program: its L2 traffic is
    its HBM traffic plus the prototype side once per further program, so doubling the pixel
    tile (half the programs) halves that part; a kernel that tiles the prototypes reads each
    tile once and re-reads ``x``, which its HBM traffic already counts. The ideal time takes
    the L2 bound where it is the largest."""
    s = shapes.Shape("t", "smoke", 2, 8, 8, 64, 10, 3, feature_dtype=torch.bfloat16)  # N = 128, P = 30
    c, p = 64, 30
    meta = {"BLOCK_P": 16}
    small, large = (roofline.kernel_work("_contrastive_fwd_kernel", (g,), meta, s) for g in (8, 4))
    assert small["bytes"] == large["bytes"]
    assert small["l2_bytes"] == small["bytes"] + 7 * p * c * 2
    assert large["l2_bytes"] - large["bytes"] == 3 * p * c * 2
    att = roofline.kernel_work("_attention_fwd_kernel", (8,), {"BLOCK_P": 16, "DOT_PREC": "tf32"}, s)
    assert att["l2_bytes"] - att["bytes"] == 7 * 2 * p * c * 4  # float32 Kt and Vt, one head
    # two programs per pixel tile, each with all of Kt and half of Vt, forming every score
    split = roofline.kernel_work("_attention_fwd_kernel", (16,), {"BLOCK_P": 16, "DOT_PREC": "tf32",
                                                                  "OUT_SPLIT": True}, s)
    assert split["l2_bytes"] - split["bytes"] == 15 * 3 * p * c * 4 // 2
    assert sum(split["flops"].values()) == 1.5 * sum(att["flops"].values())
    # the whole-channel forward: the scores as two bf16 products (Kt's halves, the same bytes),
    # a Vt in TF32; its time equals the TF32 scores' (twice the FLOPs at twice the rate)
    rows = roofline.kernel_work("_attention_fwd_kernel", (8,), {"BLOCK_P": 16, "DOT_PREC": "tf32", "ROWS": True}, s)
    assert rows["flops"] == {"16-bit": 2 * 2 * 128 * 32 * c, "tf32": 2 * 128 * 32 * c}
    assert att["flops"] == {"tf32": 2 * 2 * 128 * 32 * c}
    assert rows["l2_bytes"] == att["l2_bytes"] and rows["bytes"] == att["bytes"]
    both = roofline.kernel_work("_attention_fwd_kernel", (16,), {"BLOCK_P": 16, "DOT_PREC": "tf32", "ROWS": True,
                                                                  "OUT_SPLIT": True}, s)
    assert both["flops"] == {"16-bit": 2 * rows["flops"]["16-bit"], "tf32": rows["flops"]["tf32"]}
    dw = roofline.kernel_work("_contrastive_bwd_dw_kernel", (2, 3), meta, s)
    assert dw["l2_bytes"] == dw["bytes"] > dw["bytes_once"]
    # the push's dx in channel halves reads x again from L2 for cosine's normalisation backward
    dx = roofline.kernel_work("_contrastive_bwd_dx_kernel", (2,), dict(meta, COSINE=True), s)
    halves = roofline.kernel_work("_contrastive_bwd_dx_kernel", (2,), dict(meta, COSINE=True, HALVES=True), s)
    assert halves["bytes"] == dx["bytes"] == 2 * 128 * c * 2 + p * c * 2 + 128 * 24
    assert halves["l2_bytes"] - dx["l2_bytes"] == 128 * c * 2
    # the head's sliced dx (cosine, max pooling): x, dx, g, the logits, the winners, inv and
    # bf16 Ŵ cross HBM once; each program streams all of Ŵ, and g (read for R, then once per
    # slice of 16 channels: 5 reads) and the winners (4) come again from L2
    n, k = 128, 10
    sliced = roofline.kernel_work("_logits_bwd_dx_slice_kernel", (4,),
                                  {"BLOCK_K": 16, "BLOCK_C": 16, "COSINE": True, "POOL": 0}, s)
    assert sliced["bytes"] == 2 * n * c * 2 + 2 * n * k * 4 + n * k + n * 4 + p * c * 2
    assert sliced["l2_bytes"] == sliced["bytes"] + 3 * p * c * 2 + 4 * n * k * 4 + 3 * n * k
    assert sliced["flops"] == {"16-bit": 2 * n * 16 * 3 * c}  # K = 10 padded to a 16-class tile
    # channel chunks read from memory (S_CHUNK, Z_CHUNK) read x and the prototype tile again
    # for every tile they pair them with (float32 features: 4-byte elements)
    s32 = shapes.Shape("t", "smoke", 2, 8, 8, 64, 10, 3, feature_dtype=torch.float32)
    head = {"BLOCK_P": 16, "POOL": 1, "PUSH": True, "COSINE": True}
    held, chunked = (roofline.kernel_work("_logits_bwd_dx_kernel", (8,), dict(head, S_CHUNK=chunk), s32)
                     for chunk in (0, 16))
    assert chunked["bytes"] == held["bytes"]
    # two prototype tiles and the norms' pass over x; all of Ŵ twice per program, not once
    assert chunked["l2_bytes"] - held["l2_bytes"] == (2 + 1) * n * c * 4 + 7 * p * c * 4
    # the rows loaded again at the end (RELOAD_X) cross L2 once more, not HBM
    reloaded = roofline.kernel_work("_logits_bwd_dx_kernel", (8,), dict(head, S_CHUNK=0, RELOAD_X=True), s32)
    assert reloaded["bytes"] == held["bytes"] and reloaded["l2_bytes"] - held["l2_bytes"] == n * c * 4
    dw_meta = {"BLOCK_P": 16, "BLOCK_N": 16}
    held, chunked = (roofline.kernel_work("_contrastive_bwd_dw_kernel", (2, 3), dict(dw_meta, Z_CHUNK=chunk), s32)
                     for chunk in (0, 16))
    # x once more per prototype tile, and each program's tile of Ŵ once per 16-pixel tile
    assert chunked["l2_bytes"] - held["l2_bytes"] == 2 * n * c * 4 + 8 * 32 * c * 4
    dx_meta = {"BLOCK_P": 16}
    held, chunked = (roofline.kernel_work("_contrastive_bwd_dx_kernel", (8,), dict(dx_meta, Z_CHUNK=chunk), s32)
                     for chunk in (0, 16))
    assert chunked["l2_bytes"] - held["l2_bytes"] == 2 * n * c * 4 + 7 * p * c * 4
    peak = roofline.DevicePeak("toy", bandwidth=1e12, tensor_flops=1e15, source="test")
    l2_bound = dict(bytes=10**9, bytes_once=10**9, l2_bytes=10**11, flops={"16-bit": 10})
    assert roofline.ideal_seconds(l2_bound, peak) == pytest.approx(10**11 / roofline.H100_L2_BANDWIDTH)
    hbm_bound = dict(l2_bound, l2_bytes=10**9)
    assert roofline.ideal_seconds(hbm_bound, peak) == pytest.approx(1e-3)
    # FLOP-bound: tensor-core work that warps repeat costs its time; CUDA-core FLOPs do not
    # take the factor (no MMA layout)
    flop_bound = dict(bytes=0, bytes_once=0, l2_bytes=0, flops={"16-bit": 10**12, "ieee": 67 * 10**9})
    base = roofline.ideal_seconds(flop_bound, peak)
    assert base == pytest.approx(1e-3 + 1e-3)
    assert roofline.ideal_seconds(dict(flop_bound, mma_replication=2.5), peak) == pytest.approx(2.5e-3 + 1e-3)


def test_headline_shapes_are_the_documented_table():
    table = {s.name: (s.B, s.H, s.W, s.C, s.K, s.M) for s in shapes.headline()}
    assert table == {"voc": (16, 129, 129, 256, 21, 10), "cityscapes": (8, 201, 201, 256, 19, 10),
                     "ade": (16, 128, 128, 512, 150, 10), "voc-fullres": (16, 513, 513, 256, 21, 10)}
    assert all(s.feature_dtype == torch.bfloat16 and s.prototype_dtype == torch.float32 for s in shapes.headline())
    assert all(s.M == 1 and s.similarity == "dot" and s.temperature == 1.0 for s in shapes.m1_dot())
    with pytest.raises(ValueError, match="unknown shape set"):
        shapes.get(["nope"])


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    if not torch.cuda.is_available():
        assert cli.main(["gpu"]) == 2
        # CPU timings must not land among the committed GPU results
        assert cli.main(["run", "--shapes", "smoke", "--out", str(runner.RESULTS_DIR / "cpu.jsonl")]) == 2
        assert not (runner.RESULTS_DIR / "cpu.jsonl").exists()
    out = tmp_path / "r.jsonl"
    assert cli.main(["run", "--shapes", "smoke", "--ops", "prototype_logits", "--providers", "reference",
                     "--passes", "fwd", "--out", str(out)]) == 0
    assert len(runner.read_rows(out)) == len(shapes.smoke()) and out.with_suffix(".csv").exists()
    out.with_suffix(".csv").unlink()
    assert cli.main(["plot", str(out), "--pass", "fwd"]) == 0
    assert out.with_suffix(".csv").exists()
    assert (tmp_path / "r" / "prototype_logits_smoke_fwd.png").exists()
    assert "complete" in capsys.readouterr().out


def test_gpu_command_plan(monkeypatch):
    """`gpu` writes to results/<device>.jsonl: the headline shapes first, then the M=1 shapes,
    then the sweeps forward+backward, then the attention's two forms with eight heads, then the
    autotuned kernels (only there), within the default time budget."""
    seen = {}
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli.runner, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(cli, "_run", lambda args, out, plan=None: seen.update(args=args, out=out, plan=plan) or 1)
    assert cli.main(["gpu"]) == 1
    assert seen["out"] == runner.RESULTS_DIR / "nvidia-h100-80gb-hbm3.jsonl"
    headline, m1, sweeps, heads, tuned = seen["plan"]
    untuned = [p for p in providers.PROVIDERS if p != "tuned"]
    assert headline == cli.Step(["headline"], list(PASSES), providers=untuned)
    assert m1.sets == ["m1-dot"] and m1.passes == list(PASSES) and "contrastive_loss" in m1.ops
    assert m1.providers == untuned
    assert sweeps.sets == ["sweep-N", "sweep-P"] and sweeps.passes == ["fwdbwd"]
    assert "triton" in sweeps.providers and "compile" not in sweeps.providers and "tuned" not in sweeps.providers
    assert heads.sets == ["heads"] and heads.ops == ["prototype_attention"] and heads.providers == untuned
    assert tuned == cli.Step(["headline"], ["fwdbwd"], providers=["tuned"])
    assert 0 < seen["args"].time_budget < 600
    assert cli.main(["gpu", "--shapes", "headline"]) == 1
    assert seen["plan"] is None and seen["args"].passes == list(PASSES)


def test_plan_steps_limit_ops_and_providers(tmp_path):
    import argparse

    args = argparse.Namespace(ops=list(roofline.OPS), providers=["reference", "sdpa"], time_budget=None,
                              no_resume=False, compile_backend="eager", warmup_ms=25.0, rep_ms=100.0,
                              peak_bandwidth=None, peak_flops=None)
    out = tmp_path / "r.jsonl"
    plan = [cli.Step(["smoke"], ["fwd"], ops=["contrastive_loss", "prototype_attention"], providers=["sdpa", "liger"]),
            cli.Step(["smoke"], ["bwd"], ops=["prototype_logits"])]
    assert cli._run(args, out, plan) == 0
    cells = sorted((r["op"], r["provider"], r["pass"]) for r in runner.read_rows(out))
    # three smoke shapes; sdpa only where it applies (the attention); liger was not asked for
    # on the command line
    assert cells == sorted([("prototype_attention", "sdpa", "fwd")] * 3
                           + [("prototype_logits", "reference", "bwd")] * 3)
