"""Opt-in autotuning of the kernels' tiles (torch_ppl/kernels/_autotune.py).

Without a GPU nothing can be timed, so the timer is replaced by one whose verdict the test
sets, and the tuner is made active on CPU tensors (the interpreter). What is checked: which
candidates it tries, that it keeps the fastest whose results agree with the rule's tiles and
drops the others, that the choice is remembered (and stored in the cache file), when it stays
off, and, end to end through every op's launchers, that tuned tiles give the untuned results.
"""
from __future__ import annotations

import json

import pytest
import torch

import torch_ppl
from helpers import DEVICE, random_labels, requires_triton
from torch_ppl import functional as PF

pytestmark = requires_triton

autotune = pytest.importorskip("torch_ppl.kernels._autotune")


def _moved_sites(defaults):
    """The sites whose kept tiles are not their rule's (``defaults``: each tuned site's rule,
    in the order they were tuned)."""
    chosen = list(autotune._CHOSEN.items())
    assert len(chosen) == len(defaults)
    return [key.split("|")[0] for (key, c), d in zip(chosen, defaults) if any(d.get(k) != v for k, v in c.items())]


@pytest.fixture
def rules(monkeypatch):
    """The rule's tiles of each site as it is tuned."""
    seen = []
    original = autotune.neighbours

    def spy(default, knobs=tuple(autotune.KNOBS)):
        seen.append(dict(default))
        return original(default, knobs)

    monkeypatch.setattr(autotune, "neighbours", spy)
    return seen


class Tuner(list):
    """The timings (ms) the timer returns, one per measurement; ``on``: whether the tuner acts."""

    on = True


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """The tuner active on any device, with a timer that returns the next of its timings on
    each measurement (1 ms once they run out), and a fresh cache file."""
    times = Tuner()
    monkeypatch.setattr(autotune, "_active", lambda device: times.on)
    monkeypatch.setattr(autotune, "_measure", lambda fn: times.pop(0) if times else 1.0)
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "tiles.json"))
    autotune.clear()
    yield times
    autotune.clear()


def test_neighbours_move_one_knob_one_step():
    default = dict(BLOCK_N=64, BLOCK_P=16, BLOCK_C=256, num_warps=8, num_stages=1, HALVES=True, BLOCK_K=0)
    got = autotune.neighbours(default)
    changes = [{k: v for k, v in c.items() if default[k] != v} for c in got]
    assert changes == [{"BLOCK_N": 32}, {"BLOCK_N": 128}, {"BLOCK_P": 32}, {"num_warps": 4}, {"num_warps": 16},
                       {"num_stages": 2}]
    assert all(c.keys() == default.keys() for c in got)
    # a value outside a knob's list (8-wide prototype tiles, the flat tiles' 0) is not moved
    assert autotune.neighbours(dict(BLOCK_P=8, BLOCK_N=0)) == []
    assert autotune.neighbours(default, knobs=("num_stages",)) == [dict(default, num_stages=2)]


def test_off_runs_the_rule_once():
    calls = []
    assert not torch_ppl.autotune_enabled()
    out = autotune.tuned("site", (1,), dict(BLOCK_N=32), lambda t: calls.append(t) or torch.ones(3), DEVICE)
    assert calls == [dict(BLOCK_N=32)] and torch.equal(out, torch.ones(3))


def test_set_autotune_switch():
    assert torch_ppl.set_autotune(True) is False
    try:
        assert torch_ppl.autotune_enabled()
        # never in deterministic mode, nor on CPU tensors, nor while compiling for a named GPU
        cuda = torch.device("cuda")
        from torch_ppl.kernels._common import CompileTarget, compile_for
        torch.use_deterministic_algorithms(True)
        try:
            assert not autotune._active(cuda)
        finally:
            torch.use_deterministic_algorithms(False)
        assert not autotune._active(torch.device("cpu"))
        with compile_for(CompileTarget(90, 132)):
            assert not autotune._active(cuda)
        if not torch.cuda.is_available():
            assert autotune._active(cuda)
    finally:
        assert torch_ppl.set_autotune(False) is True
    assert not autotune._active(torch.device("cuda"))
    with pytest.raises(TypeError, match="enabled must be a bool"):
        torch_ppl.set_autotune(1)


def test_keeps_the_fastest_that_agrees(tuner, tmp_path):
    default = dict(BLOCK_N=32, num_stages=2)
    results = {  # per candidate: its result, or an exception (does not compile here)
        (32, 2): torch.tensor([1.0, 2.0]),
        (16, 2): torch.tensor([1.0, 2.0 + 1e-6]),  # summation order: agrees
        (64, 2): torch.tensor([1.0, 2.5]),  # wrong: dropped, however fast
        (32, 1): RuntimeError("out of resources"),
        (32, 3): torch.tensor([1.0, 2.0]),
    }
    calls = []

    def run(t):
        calls.append((t["BLOCK_N"], t["num_stages"]))
        r = results[calls[-1]]
        if isinstance(r, Exception):
            raise r
        return r.clone(), torch.tensor([7])  # integer results are not compared

    # timings in the order measured: the default, then each candidate that ran and agreed
    tuner.extend([5.0, 3.0, 4.0])
    out, _ = autotune.tuned("site", ("k",), default, run, torch.device("cpu"))
    assert calls == [(32, 2), (16, 2), (64, 2), (32, 1), (32, 3)]
    assert torch.equal(out, results[(16, 2)])
    # remembered: the next call runs the choice alone, and the cache file holds it
    calls.clear()
    autotune.tuned("site", ("k",), default, run, torch.device("cpu"))
    assert calls == [(16, 2)]
    stored = json.loads((tmp_path / "tiles.json").read_text())
    assert list(stored.values()) == [dict(BLOCK_N=16, num_stages=2)]
    assert "site|cpu|triton" in next(iter(stored))
    # another process (here: a cleared memory) reads it back
    autotune.clear()
    calls.clear()
    autotune.tuned("site", ("k",), default, run, torch.device("cpu"))
    assert calls == [(16, 2)]
    # another key is tuned afresh; the rule wins when nothing is faster
    calls.clear()
    tuner.extend([1.0, 2.0, 2.0, 2.0])
    autotune.tuned("site", ("other",), default, run, torch.device("cpu"))
    assert calls[0] == (32, 2) and len(calls) == 5
    assert json.loads((tmp_path / "tiles.json").read_text())[autotune._cache_key("site", torch.device("cpu"), ("other",))] \
        == default


def test_non_finite_results_are_not_tuned(tuner):
    calls = []
    out = autotune.tuned("site", (2,), dict(BLOCK_N=32),
                         lambda t: calls.append(t) or torch.tensor([float("nan")]), torch.device("cpu"))
    assert len(calls) == 1 and torch.isnan(out).all()
    assert not autotune._CHOSEN


def test_agree():
    a = torch.randn(100)
    assert autotune._agree((a, torch.tensor(3)), (a * (1 + 1e-3), torch.tensor(4)))
    assert not autotune._agree(a, a * 1.1)
    assert not autotune._agree(a, a[:50])
    b = a.clone()
    b[3] = float("inf")
    assert autotune._agree(b, b.clone()) and not autotune._agree(b, a)


# ----------------------------------------------------------------------------- end to end
def _grads(fn, *leaves):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.float().square().sum() for o in outs).backward()
    return [o.detach() for o in outs], [t.grad for t in leaves]


def _case(seed=0, c=24, k=5, m=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, 5, 7, generator=gen).to(DEVICE)
    protos = torch.randn(k, m, c, generator=gen).to(DEVICE)
    target = random_labels((2, 5, 7), k, generator=gen)
    return x, protos, target


OPS = {
    "contrastive_loss": lambda x, w, y: PF.contrastive_loss(x, y, w, backend="triton"),
    "prototype_logits-max": lambda x, w, y: PF.prototype_logits(x, w, backend="triton"),
    "prototype_logits-lse": lambda x, w, y: PF.prototype_logits(x, w, pooling="logsumexp", backend="triton"),
    "prototype_logits_and_contrastive": lambda x, w, y: PF.prototype_logits_and_contrastive(
        x, w, y, pooling="logsumexp", backend="triton"),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_tuned_tiles_give_the_untuned_results(op, tuner, rules):
    """Every launcher's candidates run through the real kernels; the timer prefers the last
    candidate of each kernel, so results come from tiles other than the rule's."""
    x, protos, target = _case()
    fn = OPS[op]
    tuner.on = False
    expected, expected_grads = _grads(lambda a, b: fn(a, b, target), x, protos)
    tuner.on = True
    tuner.extend([float(-i) for i in range(200)])  # each measurement faster than the last
    got, grads = _grads(lambda a, b: fn(a, b, target), x, protos)
    sites = {key.split("|")[0] for key in autotune._CHOSEN}
    assert sites and all(site.startswith(op.split("-")[0] + ".") for site in sites), sites
    assert _moved_sites(rules), "every site kept its rule's tiles"
    for a, b in zip(got + grads, expected + expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_tuned_attention_gives_the_untuned_results(tuner, rules):
    gen = torch.Generator().manual_seed(1)
    c, heads, inner = 24, 2, 16
    x = torch.randn(2, c, 5, 7, generator=gen).to(DEVICE)
    protos = torch.randn(5, 7, c, generator=gen).to(DEVICE)  # 35 prototypes: three 16-wide tiles
    weights = [torch.randn(inner, c, generator=gen).to(DEVICE) * c ** -0.5 for _ in range(3)]
    out_w = torch.randn(c, inner, generator=gen).to(DEVICE) * inner ** -0.5

    def fn(x, w, wq, wk, wv, wo):
        return PF.prototype_attention(x, w, wq, wk, wv, wo, num_heads=heads, backend="triton")

    tuner.on = False
    expected, expected_grads = _grads(fn, x, protos, *weights, out_w)
    tuner.on = True
    tuner.extend([float(-i) for i in range(200)])
    got, grads = _grads(fn, x, protos, *weights, out_w)
    assert {key.split("|")[0] for key in autotune._CHOSEN} == {
        "prototype_attention.fwd", "prototype_attention.bwd_dx", "prototype_attention.bwd_dproto"}
    assert len(_moved_sites(rules)) == 3
    for a, b in zip(got + grads, expected + expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_benchmark_provider_tunes_forward_and_backward(monkeypatch, tmp_path):
    """The ``tuned`` provider of ``python -m benchmarks``: every launch of its measurement,
    backward included, sees autotuning on, and its rows record the tiles each kernel ran; other
    providers' launches see it off and record none."""
    from benchmarks import runner, shapes

    seen = []
    original = autotune.tuned

    def spy(site, key, default, run, device, knobs=tuple(autotune.KNOBS)):
        seen.append((site, torch_ppl.autotune_enabled()))
        return original(site, key, default, run, device, knobs)

    monkeypatch.setattr(autotune, "tuned", spy)
    # the tuner acts on CPU tensors when the setting is on, with a stand-in timer
    monkeypatch.setattr(autotune, "_active", lambda device: torch_ppl.autotune_enabled())
    monkeypatch.setattr(autotune, "_measure", lambda fn: 1.0)
    monkeypatch.delenv(autotune.CACHE_ENV, raising=False)
    autotune.clear()
    shape = shapes.smoke()[0]
    sites = {"contrastive_loss.fwd", "contrastive_loss.bwd_dx", "contrastive_loss.bwd_dw"}
    try:
        for provider in ("tuned", "triton"):
            seen.clear()
            done = runner.run([shape], ["contrastive_loss"], [provider], ["fwd", "fwdbwd"],
                              device=torch.device("cpu"), out=tmp_path / "r.jsonl", cpu_reps=1)
            assert [r["status"] for r in done["rows"]] == ["ok", "ok"]
            assert {site for site, _ in seen} == sites
            assert {on for _, on in seen} == {provider == "tuned"}
            for row in done["rows"]:
                if provider == "tuned":
                    assert set(row["tiles"]) == sites and all("BLOCK_N" in t for t in row["tiles"].values())
                else:
                    assert row["tiles"] is None
    finally:
        autotune.clear()
    assert not torch_ppl.autotune_enabled()


def test_agree_reads_in_chunks():
    a = torch.randn(1000)
    b = a.clone()
    b[990] += 10.0  # in the last chunk
    assert autotune._agree(a, a.clone(), chunk=64)
    assert not autotune._agree(b, a, chunk=64)
    nan, inf = a.clone(), a.clone()
    nan[5], inf[5] = float("nan"), float("inf")
    assert autotune._agree(nan, nan.clone(), chunk=64) and not autotune._agree(nan, inf, chunk=64)


def test_tuned_under_torch_compile(tuner, rules):
    """A compiled function calls the ops' bodies at run time: tuning happens there as in eager
    mode, and the compiled results are the untuned ones."""
    x, protos, target = _case(seed=2)
    fn = OPS["contrastive_loss"]
    tuner.on = False
    expected, expected_grads = _grads(lambda a, b: fn(a, b, target), x, protos)
    tuner.on = True
    tuner.extend([float(-i) for i in range(100)])
    compiled = torch.compile(lambda a, b: fn(a, b, target), backend="eager", fullgraph=True)
    got, grads = _grads(compiled, x, protos)
    assert _moved_sites(rules)
    for a, b in zip(got + grads, expected + expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
