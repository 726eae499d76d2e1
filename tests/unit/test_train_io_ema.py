"""The training stages' shared EMA: the warm-up decay, frozen parameters left alone, the average swapped in only
inside ``applied``, and a checkpoint that restores weights, average and AdamW state exactly."""

from __future__ import annotations

import torch

from dev.toyworld.train_io import Ema


def layers() -> tuple[torch.nn.Module, list]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    return net, list(net.named_parameters())


def step(net, opt, ema, i: int) -> None:
    loss = net(torch.ones(5, 3) * (i + 1)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    ema.update(i)


def test_update_follows_the_warm_up_decay_and_skips_frozen_parameters():
    net, named = layers()
    ema = Ema(named, 0.9)
    start = {k: p.detach().clone() for k, p in named}
    named[2][1].requires_grad_(False)  # the second layer's weight is frozen
    with torch.no_grad():
        for _, p in named:
            p.add_(1.0)
    ema.update(0)  # decay min(0.9, 1/10) = 0.1: the average moves 90 % of the way
    for k, _ in named:
        if k == named[2][0]:
            assert torch.equal(ema.shadow[k], start[k])
        else:
            assert torch.allclose(ema.shadow[k], start[k] + 0.9)
    ema.update(1000)  # decay 0.9 from here on
    k = named[0][0]
    assert torch.allclose(ema.shadow[k], start[k] + 0.9 + 0.1 * 0.1)


def test_applied_swaps_the_average_in_and_back_even_on_error():
    net, named = layers()
    ema = Ema(named, 0.9)
    with torch.no_grad():
        for _, p in named:
            p.mul_(3.0)
    own = {k: p.detach().clone() for k, p in named}
    with ema.applied():
        assert all(torch.equal(p, ema.shadow[k]) for k, p in named)
    assert all(torch.equal(p, own[k]) for k, p in named)
    try:
        with ema.applied():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert all(torch.equal(p, own[k]) for k, p in named)


def test_a_checkpoint_resumes_to_the_same_weights_average_and_optimizer():
    net, named = layers()
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-2)
    ema = Ema(named, 0.99)
    for i in range(3):
        step(net, opt, ema, i)
    saved = {k: v.detach().clone() for k, v in ema.checkpoint_tensors(opt).items()}
    assert {k.split(".")[0] for k in saved} == {"w", "ema", "opt"}
    for i in range(3, 5):
        step(net, opt, ema, i)
    straight = {k: p.detach().clone() for k, p in named}, {k: v.clone() for k, v in ema.shadow.items()}

    net2, named2 = layers()
    opt2 = torch.optim.AdamW([p for _, p in named2], lr=1e-2)
    ema2 = Ema(named2, 0.99)
    ema2.load_checkpoint(saved, opt2)
    for i in range(3, 5):
        step(net2, opt2, ema2, i)
    assert all(torch.equal(p, straight[0][k]) for k, p in named2)
    assert all(torch.equal(v, straight[1][k]) for k, v in ema2.shadow.items())


def test_reset_to_weights_restarts_the_average():
    net, named = layers()
    ema = Ema(named, 0.9)
    with torch.no_grad():
        for _, p in named:
            p.fill_(2.0)
    ema.reset_to_weights()
    assert all(torch.equal(v, torch.full_like(v, 2.0)) for v in ema.shadow.values())
