"""The inner spaces of the simulation and their pullbacks, on a tiny UNet with LoRA theta (fp64)."""

import pytest
import torch
from tiny import tiny_unet_config

from resalign_fast.data.encoded import EncodedSet
from resalign_fast.inner.configs import FTConfig
from resalign_fast.inner.simulate import (
    ft_batch,
    ft_loss,
    inner_problem,
    optim_spec,
    simulate_finetune,
)
from resalign_fast.models.lora import ParamSpace, add_lora, lora_names


@pytest.fixture
def setup():
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config()).double()
    unet.set_attn_processor(AttnProcessor())
    add_lora(unet, rank=2, alpha=2.0)
    space = ParamSpace(unet, lora_names(unet))
    with torch.no_grad():  # a non-zero theta so that the merge is not trivial
        for p in space.values():
            p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(0)
    data = EncodedSet(
        torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64),
        torch.randn(6, 4, 8, generator=g, dtype=torch.float64),
        ["p"] * 6,
    )
    return unet, space, data


def test_full_config_pullback_is_the_vjp_of_the_merge(setup):
    unet, space, _ = setup
    theta = [p.detach().clone() for p in space.values()]
    prob = inner_problem(space, "lora", "full", theta)
    assert not prob.space.adapters and prob.space.numel() > space.numel()
    # the merged model equals the adapted model
    x, t, e = (
        torch.randn(2, 1, 8, 8, dtype=torch.float64),
        torch.tensor([3, 500]),
        torch.randn(2, 4, 8, dtype=torch.float64),
    )
    assert torch.allclose(
        prob.space.eps(prob.phi0(theta), x, t, e), space.eps(theta, x, t, e), atol=1e-10
    )
    v = [torch.randn_like(p) for p in prob.phi0(theta)]
    u = [torch.randn_like(p) for p in theta]
    pb = prob.pullback(v)
    eps = 1e-5

    def inner(th):
        return sum((a * b).sum() for a, b in zip(prob.phi0(th), v))

    fd = (
        inner([a + eps * b for a, b in zip(theta, u)])
        - inner([a - eps * b for a, b in zip(theta, u)])
    ) / (2 * eps)
    assert torch.allclose(sum((a * b).sum() for a, b in zip(pb, u)), fd, rtol=1e-7)


def test_lora_config_is_the_identity(setup):
    _, space, _ = setup
    theta = [p.detach().clone() for p in space.values()]
    prob = inner_problem(space, "lora", "lora", theta)
    v = [torch.randn_like(p) for p in theta]
    assert prob.space is space and all(torch.equal(a, b) for a, b in zip(prob.pullback(v), v))


def test_simulated_sgd_is_plain_gradient_descent(setup):
    _, space, data = setup
    theta = [p.detach().clone() for p in space.values()]
    cfg = FTConfig(lr=1e-2, steps=3, optimizer="sgd", algorithm="lora", batch_size=3)
    alphas = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    out = simulate_finetune(space, theta, cfg, data, data, alphas, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    phi = [p.clone().requires_grad_(True) for p in theta]
    for _ in range(3):
        loss = ft_loss(space, phi, cfg, ft_batch(cfg, data, data, alphas, g))
        grads = torch.autograd.grad(loss, phi)
        phi = [(p - 1e-2 * gr).detach().requires_grad_(True) for p, gr in zip(phi, grads)]
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(out, phi))
    assert any(not torch.equal(a, b) for a, b in zip(out, theta))


def test_proximal_variant_stays_closer(setup):
    _, space, data = setup
    theta = [p.detach().clone() for p in space.values()]
    cfg = FTConfig(lr=0.5, steps=4, optimizer="sgd", algorithm="lora", batch_size=3)
    alphas = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)

    def dist(gamma):
        out = simulate_finetune(
            space,
            theta,
            cfg,
            data,
            data,
            alphas,
            torch.Generator().manual_seed(2),
            proximal_gamma=gamma,
        )
        return sum(((a - b) ** 2).sum() for a, b in zip(out, theta)).sqrt()

    assert dist(0.5) < dist(None)


def test_dreambooth_loss_uses_two_batches(setup):
    _, space, data = setup
    theta = [p.detach().clone() for p in space.values()]
    alphas = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    std = FTConfig(loss="standard", batch_size=2, algorithm="lora")
    db = FTConfig(loss="dreambooth", batch_size=2, algorithm="lora", prior_weight=0.5)
    b_std = ft_batch(std, data, data, alphas, torch.Generator().manual_seed(3))
    b_db = ft_batch(db, data, data, alphas, torch.Generator().manual_seed(3))
    assert b_std[1] is None and b_db[1] is not None
    inst = ft_loss(space, theta, std, (b_db[0], None))
    prior = ft_loss(space, theta, std, (b_db[1], None))
    assert torch.allclose(ft_loss(space, theta, db, b_db), inst + 0.5 * prior)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_inplace_simulation_matches_simulate_finetune(setup, optimizer):
    """Optimizer-in-backward on the UNet's own weights (lean_full) follows simulate_finetune's
    trajectory, DreamBooth terms split there; host_backup/restore give the weights back exactly."""
    from resalign_fast.inner.inplace import host_backup, restore, simulate_inplace

    unet, space, data = setup
    theta = [p.detach().clone() for p in space.values()]
    prob = inner_problem(space, "lora", "full", theta)
    cfg = FTConfig(
        lr=1e-2, steps=3, optimizer=optimizer, algorithm="full", loss="dreambooth", batch_size=2
    )
    alphas = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    phi0 = [p.detach().clone() for p in prob.phi0(theta)]
    ref = simulate_finetune(
        prob.space,
        phi0,
        cfg,
        data,
        data,
        alphas,
        torch.Generator().manual_seed(4),
        split_terms=True,
    )
    params = prob.space.values()
    before = [p.detach().clone() for p in params]
    backup = host_backup(params)
    with torch.no_grad():
        for p, x in zip(params, phi0):
            p.copy_(x)
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(4)
    simulate_inplace(
        params,
        lambda: ft_loss(prob.space, params, cfg, ft_batch(cfg, data, data, alphas, g)),
        optim_spec(cfg),
        cfg.steps,
    )
    err = max(float((a.detach() - b).abs().max()) for a, b in zip(params, ref))
    assert err < 1e-12 and any(not torch.equal(a, b) for a, b in zip(ref, phi0)), err
    assert all(p.grad is None for p in params)
    restore(params, backup)
    assert backup == [] and all(torch.equal(p, b) for p, b in zip(params, before))
