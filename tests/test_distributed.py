"""FSDP2 (``fully_shard``) with gloo on 2 CPU processes.

Two layouts train and must equal one process on the full batch: :class:`PPLHead` sharded as
its own unit with the loss computed in its forward, and the three separate modules in one unit
with the loss computed after the forward (``reshard_after_forward=False``). Three layouts
cannot work (a sharded parameter is read outside its unit's forward) and must raise
torch_ppl's ``TypeError`` naming the fix, not torch's "mixed torch.Tensor and DTensor".

All cases run in one pair of processes, since start-up dominates the time.
"""
from __future__ import annotations

import datetime

import pytest
import torch
from torch import nn

from torch_ppl import MultiPrototypeClassifier, PPLAttention, PPLHead, PushPullLoss

C, K, M = 8, 3, 2
STEPS = 2

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


class HeadNet(nn.Module):
    """A backbone conv and a :class:`PPLHead`; ``forward(img, target, weight)`` returns the
    head's ``(logits, features, loss)``."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, C, 3, stride=2, padding=1)
        self.head = PPLHead(C, K, M, num_heads=2, backend="reference")

    def forward(self, img, target=None, weight=None):
        return self.head(self.backbone(img), target, weight)


class PullAndHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.pull = PPLAttention(C, num_heads=2, backend="reference")
        self.head = MultiPrototypeClassifier(C, K, M, backend="reference")

    def forward(self, x):
        f = self.pull(x, self.head.prototypes)
        return self.head(f), f


class ThreeModuleNet(nn.Module):
    """The pull and the classifier in a submodule ``ppl`` (an FSDP unit of its own below the
    root: the root unit is never resharded after forward); ``forward`` returns
    ``(logits, features)`` and the caller computes the loss."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, C, 3, stride=2, padding=1)
        self.ppl = PullAndHead()

    def forward(self, img):
        return self.ppl(self.backbone(img))


def _batch():
    """4 images whose two halves hold the same number of valid pixels: ``"mean"`` divides per
    rank and FSDP averages the ranks' gradients, equal to the full batch exactly then."""
    g = torch.Generator().manual_seed(5)
    img = torch.randn(4, 3, 8, 8, generator=g)
    y = torch.randint(0, K, (4, 8, 8), generator=g)
    y = y.masked_fill(torch.rand(4, 8, 8, generator=g) < 0.2, 255)
    y[2:] = torch.where(y[:2] == 255, 255, torch.where(y[2:] == 255, 0, y[2:]))
    w = (torch.rand(4, 8, 8, generator=g) >= 0.3).float()
    return img, y, w


def _loss_inside(model, img, y, w):
    return model(img, y, w).loss


def _loss_outside(model, img, y, w):
    logits, f = model(img)
    return PushPullLoss()(logits, f, y, model.ppl.head.prototypes, weight=w)


def _train(model, loss_fn, img, y, w):
    """``STEPS`` SGD steps; the full gradients of every step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    grads = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, img, y, w).backward()
        step = {}
        for name, p in model.named_parameters():
            assert p.grad is not None, f"{name} got no gradient"
            g = p.grad
            step[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
        grads.append(step)
        opt.step()
    return grads


def _expect_clear_error(run, *needles):
    with pytest.raises(TypeError) as info:
        run()
    message = str(info.value)
    assert "mixed torch.Tensor and DTensor" not in message
    for needle in needles:
        assert needle in message, message


def _fsdp_worker(rank: int, world: int, rendezvous: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    # A file rendezvous, not a TCP port: a port picked free here can be taken by a test running
    # beside this one before the store binds it. A short timeout: a collective that hangs fails
    # the test instead of stalling CI.
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=120))
    try:
        img, y, w = _batch()
        half = slice(2 * rank, 2 * rank + 2)

        def equal_to_one_process(build, shard, loss_fn):
            torch.manual_seed(0)
            expected = _train(build(), loss_fn, img, y, w)
            torch.manual_seed(0)
            model = build()
            shard(model)
            got = _train(model, loss_fn, img[half], y[half], w[half])
            for step in range(STEPS):
                assert set(got[step]) == set(expected[step])
                for name, g in expected[step].items():
                    assert g.abs().sum() > 0, f"step {step}: {name} has an all-zero gradient"
                    torch.testing.assert_close(got[step][name], g, rtol=1e-4, atol=1e-6,
                                               msg=lambda m, s=step, n=name: f"rank {rank} step {s} {n}: {m}")

        # 1. PPLHead as its own unit, the loss inside its forward.
        def shard_head_then_model(model):
            fully_shard(model.head)
            fully_shard(model)

        equal_to_one_process(HeadNet, shard_head_then_model, _loss_inside)

        # 2. Pull and classifier in one unit, the loss after its forward: keep the unit gathered.
        def shard_ppl_kept_gathered(model):
            fully_shard(model.ppl, reshard_after_forward=False)
            fully_shard(model)

        equal_to_one_process(ThreeModuleNet, shard_ppl_kept_gathered, _loss_outside)

        # 3. ... and with the default resharding the loss meets the sharded prototypes.
        model = ThreeModuleNet()
        fully_shard(model.ppl)
        fully_shard(model)
        _expect_clear_error(lambda: _loss_outside(model, img[half], y[half], w[half]),
                            "push_pull_loss: prototypes is a DTensor", "reshard_after_forward=False", "PPLHead")

        # 4. Only the classifier sharded: the pull reads its prototypes outside its forward.
        model = ThreeModuleNet()
        fully_shard(model.ppl.head)
        _expect_clear_error(lambda: model(img[half]), "prototype_attention: prototypes is a DTensor")

        # 5. PPLHead.loss after the forward, default resharding.
        model = HeadNet()
        fully_shard(model.head)
        fully_shard(model)
        logits = model(img[half])
        _expect_clear_error(lambda: model.head.loss(logits, y[half]), "prototypes is a DTensor")
    finally:
        # every rank past its last collective before any tears its connections down: a rank
        # that destroyed its group while the other still used it aborted it (gloo: "terminate
        # called without an active exception") on a loaded machine
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def test_fsdp2_two_processes_match_one_process_or_raise_a_clear_error(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    torch.multiprocessing.spawn(_fsdp_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)
