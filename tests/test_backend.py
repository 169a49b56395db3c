"""Backend dispatch (docs/api.md, Backends): auto / reference / triton, TORCH_PPL_BACKEND, TRITON_INTERPRET.

Nothing here runs a Triton kernel: only the choice is tested.
"""
from __future__ import annotations

import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

import torch_ppl.functional as PF
from torch_ppl import MultiPrototypeClassifier, PPLAttention, PushPullLoss, _backend, reference

ENV = "TORCH_PPL_BACKEND"
X = torch.randn(2, 4, 3, 3)
PROTOS = torch.randn(3, 2, 4)
TARGET = torch.randint(0, 3, (2, 3, 3))


H100 = ((9, 0), 227 * 1024)  # what gpu_properties reports: capability, shared memory per block


@pytest.fixture
def clean_env(monkeypatch):
    """No override, no interpreter: the state of a user's CPU machine; "CUDA" tensors
    (fake_cuda_tensor) are on an H100."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_backend, "gpu_properties", lambda device: H100)
    return monkeypatch


def fake_cuda_tensor():
    """Just what ``resolve`` reads of a tensor: where it lives."""
    return SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))


def test_auto_is_reference_on_cpu(clean_env):
    assert _backend.resolve("auto", X, PROTOS, None) == "reference"
    clean_env.setenv("TRITON_INTERPRET", "1")  # the interpreter does not make auto pick triton
    assert _backend.resolve("auto", X, PROTOS) == "reference"


def test_auto_is_triton_on_cuda_when_triton_imports(clean_env):
    clean_env.setattr(_backend, "triton_available", lambda: True)
    assert _backend.resolve("auto", fake_cuda_tensor(), fake_cuda_tensor(), None) == "triton"
    assert _backend.resolve("auto", fake_cuda_tensor(), X) == "reference"  # not all on CUDA
    clean_env.setattr(_backend, "triton_available", lambda: False)
    assert _backend.resolve("auto", fake_cuda_tensor()) == "reference"


def test_explicit_choices(clean_env):
    assert _backend.resolve("reference", X) == "reference"
    clean_env.setattr(_backend, "triton_available", lambda: True)
    assert _backend.resolve("triton", fake_cuda_tensor()) == "triton"


@pytest.mark.parametrize("interpret", [None, "0", ""])
def test_triton_on_cpu_without_interpreter_raises(clean_env, interpret):
    if interpret is not None:
        clean_env.setenv("TRITON_INTERPRET", interpret)
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors \(or TRITON_INTERPRET=1"):
        _backend.resolve("triton", X, PROTOS, op="prototype_logits")
    with pytest.raises(ValueError, match="prototype_logits: backend='triton'"):
        PF.prototype_logits(X, PROTOS, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        MultiPrototypeClassifier(4, 3, backend="triton")(X)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        PPLAttention(4, backend="triton")(X, PROTOS)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        PushPullLoss(ce_weight=0.0, backend="triton")(None, X, TARGET, PROTOS)


def test_features_wider_than_the_kernels_take_auto_to_reference(clean_env):
    clean_env.setattr(_backend, "triton_available", lambda: True)
    for op, widest in _backend.MAX_TRITON_CHANNELS.items():
        assert _backend.resolve("auto", fake_cuda_tensor(), op=op, channels=widest) == "triton"
        assert _backend.resolve("auto", fake_cuda_tensor(), op=op, channels=widest + 1) == "reference"
        assert _backend.resolve("triton", fake_cuda_tensor(), op=op, channels=widest) == "triton"
        with pytest.raises(ValueError, match=rf"{op}: backend='triton' takes features of at most "
                                             rf"{widest} channels .*got {widest + 1}"):
            _backend.resolve("triton", fake_cuda_tensor(), op=op, channels=widest + 1)
    # the push inside push_pull_loss runs the contrastive kernels: their limit, the caller's name
    widest = _backend.MAX_TRITON_CHANNELS["contrastive_loss"]
    with pytest.raises(ValueError, match=rf"push_pull_loss: .* at most {widest} channels"):
        _backend.resolve("triton", fake_cuda_tensor(), op="push_pull_loss", kernel="contrastive_loss",
                         channels=widest + 1)


@pytest.mark.parametrize("gpu", [((8, 6), 99 * 1024), ((8, 9), 99 * 1024), ((12, 0), 99 * 1024)],
                         ids=["sm_86", "sm_89", "sm_120"])
def test_gpus_with_less_shared_memory_take_narrower_attention(clean_env, gpu):
    """RTX 30/40/50-class GPUs let a block use 99 KB of shared memory, where the attention's
    tiles fit up to 256 channels; the other ops take as wide features as on an A100."""
    clean_env.setattr(_backend, "triton_available", lambda: True)
    clean_env.setattr(_backend, "gpu_properties", lambda device: gpu)
    small = _backend.MAX_TRITON_CHANNELS_SMALL_SHARED
    assert small["prototype_attention"] == 256
    for op, widest in small.items():
        assert widest <= _backend.MAX_TRITON_CHANNELS[op]
        assert _backend.resolve("auto", fake_cuda_tensor(), op=op, channels=widest) == "triton"
        assert _backend.resolve("auto", fake_cuda_tensor(), op=op, channels=widest + 1) == "reference"
    with pytest.raises(ValueError, match=r"prototype_attention: backend='triton' takes features of at most 256 "
                                         r"channels on a GPU whose blocks may use 99 KB of shared memory .*got 512"):
        _backend.resolve("triton", fake_cuda_tensor(), op="prototype_attention", channels=512)


@pytest.mark.parametrize("capability", [(7, 0), (7, 5)], ids=["V100", "T4"])
def test_gpus_older_than_sm_80_run_the_reference(clean_env, capability):
    clean_env.setattr(_backend, "triton_available", lambda: True)
    clean_env.setattr(_backend, "gpu_properties", lambda device: (capability, 96 * 1024))
    assert _backend.resolve("auto", fake_cuda_tensor(), op="prototype_logits", channels=256) == "reference"
    with pytest.raises(ValueError, match=rf"prototype_logits: backend='triton' needs a GPU of compute capability "
                                         rf"8\.0 or newer .*{capability[0]}\.{capability[1]}"):
        _backend.resolve("triton", fake_cuda_tensor(), op="prototype_logits", channels=256)


def test_gpu_properties_of_the_compile_target(clean_env):
    """Inside compile_for the launchers see the named GPU, its shared memory given or the
    data-centre part's of its architecture."""
    clean_env.undo()
    clean_env.setattr(_backend, "COMPILE_TARGET", SimpleNamespace(arch=86, num_sms=84, shared=99 * 1024))
    assert _backend.gpu_properties(torch.device("cpu")) == ((8, 6), 99 * 1024)
    clean_env.setattr(_backend, "COMPILE_TARGET", SimpleNamespace(arch=90, num_sms=132, shared=None))
    assert _backend.gpu_properties(torch.device("cpu")) == ((9, 0), 227 * 1024)


def test_every_entry_point_refuses_too_wide_features_for_triton_before_a_launch(clean_env):
    """On the interpreter, so that only the width is wrong: each op names it, and no kernel runs."""
    clean_env.setenv("TRITON_INTERPRET", "1")
    clean_env.setattr(_backend, "triton_available", lambda: True)

    def case(op):
        c = _backend.MAX_TRITON_CHANNELS[op] + 1
        return torch.randn(1, c, 2, 2), torch.randn(3, 2, c), torch.randint(0, 3, (1, 2, 2))

    def match(op):
        return f"{op}: backend='triton' takes features of at most {_backend.MAX_TRITON_CHANNELS[op]} channels"

    x, protos, target = case("prototype_logits")
    with pytest.raises(ValueError, match=match("prototype_logits")):
        PF.prototype_logits(x, protos, backend="triton")
    assert PF.prototype_logits(x, protos).shape == (1, 3, 2, 2)  # auto: the reference
    x, protos, target = case("contrastive_loss")
    with pytest.raises(ValueError, match=match("contrastive_loss")):
        PF.contrastive_loss(x, target, protos, backend="triton")
    with pytest.raises(ValueError, match="push_pull_loss: backend='triton' takes features of at most"):
        PF.push_pull_loss(None, x, target, protos, ce_weight=0.0, backend="triton")
    x, protos, target = case("prototype_logits_and_contrastive")
    with pytest.raises(ValueError, match=match("prototype_logits_and_contrastive")):
        PF.prototype_logits_and_contrastive(x, protos, target, backend="triton")
    x, protos, target = case("prototype_attention")
    with pytest.raises(ValueError, match=match("prototype_attention")):
        PPLAttention(x.shape[1], backend="triton")(x, protos)


def test_triton_on_cpu_with_interpreter_resolves(clean_env):
    clean_env.setenv("TRITON_INTERPRET", "1")
    clean_env.setattr(_backend, "triton_available", lambda: True)
    assert _backend.resolve("triton", X, PROTOS) == "triton"


def fresh_triton_probe(monkeypatch):
    """Forget what the process found out about Triton, so the next call probes again."""
    monkeypatch.setattr(_backend, "_TRITON_CHECKED", False)
    monkeypatch.setattr(_backend, "_TRITON_PROBLEM", None)


def test_triton_missing_raises_runtime_error(clean_env):
    fresh_triton_probe(clean_env)
    clean_env.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    assert not _backend.triton_available()
    assert _backend.resolve("auto", fake_cuda_tensor()) == "reference"
    with pytest.raises(RuntimeError, match="needs the triton package"):
        _backend.resolve("triton", fake_cuda_tensor())


def test_triton_older_than_the_kernels_take_warns_once_and_runs_the_reference(clean_env):
    """Triton 3.2 (torch 2.6's) aborts in its compiler on the kernels: a CUDA user with it gets
    the reference under "auto", told once why, and a clear error for backend="triton"."""
    fresh_triton_probe(clean_env)
    clean_env.setitem(sys.modules, "triton", SimpleNamespace(__version__="3.2.0"))
    with pytest.warns(RuntimeWarning, match=r"triton >= 3\.3 .*triton 3\.2\.0 is installed"):
        assert _backend.resolve("auto", fake_cuda_tensor()) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert _backend.resolve("auto", fake_cuda_tensor()) == "reference"
        with pytest.raises(RuntimeError, match=r"backend='triton' needs triton >= 3\.3 .*3\.2\.0"):
            _backend.resolve("triton", fake_cuda_tensor())


@pytest.mark.parametrize("version", ["3.3.0", "3.3.1", "3.10.0", "3.4.0+git5389ed7", "4.0.0rc1"])
def test_triton_from_the_oldest_the_kernels_take_is_accepted(clean_env, version):
    fresh_triton_probe(clean_env)
    clean_env.setitem(sys.modules, "triton", SimpleNamespace(__version__=version))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.triton_available()
        assert _backend.resolve("auto", fake_cuda_tensor()) == "triton"


@pytest.mark.parametrize("value", ["reference", " reference "])
def test_env_override_of_auto(clean_env, value):
    clean_env.setenv(ENV, value)
    clean_env.setattr(_backend, "triton_available", lambda: True)
    assert _backend.resolve("auto", fake_cuda_tensor()) == "reference"


def test_env_triton_on_cpu_raises_and_explicit_backend_wins(clean_env):
    clean_env.setenv(ENV, "triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        PF.contrastive_loss(X, TARGET, PROTOS)  # backend="auto" follows the environment
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        MultiPrototypeClassifier(4, 3)(X)
    # an explicit backend is not overridden
    expected = PF.contrastive_loss(X, TARGET, PROTOS, backend="reference")
    clean_env.delenv(ENV)
    torch.testing.assert_close(PF.contrastive_loss(X, TARGET, PROTOS), expected, rtol=0, atol=0)


@pytest.mark.parametrize("value", ["auto", ""])
def test_env_auto_or_empty_is_no_override(clean_env, value):
    clean_env.setenv(ENV, value)
    assert _backend.resolve("auto", X) == "reference"
    clean_env.setattr(_backend, "triton_available", lambda: True)
    assert _backend.resolve("auto", fake_cuda_tensor()) == "triton"


@pytest.mark.parametrize("value", ["cuda", "Triton", "ref"])
def test_env_bad_value_raises(clean_env, value):
    clean_env.setenv(ENV, value)
    with pytest.raises(ValueError, match=f"environment variable {ENV} must be one of .*got '{value}'"):
        _backend.resolve("auto", X)
    with pytest.raises(ValueError, match=ENV):
        PF.prototype_logits(X, PROTOS)
    # only "auto" reads the environment
    PF.prototype_logits(X, PROTOS, backend="reference")


@pytest.mark.parametrize("backend, exc", [("cuda", ValueError), ("", ValueError), (None, TypeError), (1, TypeError)])
def test_bad_backend_argument(clean_env, backend, exc):
    with pytest.raises(exc, match="backend must be"):
        _backend.resolve(backend, X)
    with pytest.raises(exc, match="backend must be"):
        PF.prototype_similarity(X, PROTOS, backend=backend)
    with pytest.raises(exc, match="backend must be"):
        PushPullLoss(backend=backend)


@pytest.mark.parametrize("op", ["prototype_logits", "contrastive_loss", "prototype_attention"])
def test_reference_implementation_is_the_reference_module(op):
    assert _backend.implementation(op, "reference") is getattr(reference, op)


def test_modules_pass_their_backend_through(clean_env, monkeypatch):
    """The module's ``backend`` reaches the dispatcher (recorded, then the reference runs)."""
    seen = []
    real = _backend.resolve

    def spy(backend, *tensors, op="", channels=None, kernel=None):
        seen.append((op, backend))
        return real("reference", *tensors, op=op)

    monkeypatch.setattr(_backend, "resolve", spy)
    head = MultiPrototypeClassifier(4, 3, backend="triton")
    PPLAttention(4, backend="triton")(X, head.prototypes)
    PushPullLoss(backend="triton")(head(X), X, TARGET, head.prototypes)
    assert seen == [("prototype_attention", "triton"), ("prototype_logits", "triton"),
                    ("push_pull_loss", "triton")]
