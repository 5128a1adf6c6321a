import torch

from resalign_fast.objectives import (
    denoising_loss,
    esd_target,
    ga_loss,
    make_noisy_batch,
    sigmoid_ramp,
    target_loss,
)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 1, 8, 8, generator=g)
    alphas = torch.linspace(0.99, 0.01, 1000)
    return x0, alphas, make_noisy_batch(x0, torch.randn(4, 3, 5, generator=g), alphas, g)


def test_noisy_batch_is_the_forward_process():
    x0, alphas, b = _batch()
    ab = alphas[b.t].view(-1, 1, 1, 1)
    assert torch.allclose(b.x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * b.noise)
    assert torch.equal(b.x_t, _batch()[2].x_t)  # seeded


def test_losses_closed_form():
    _, _, b = _batch()
    eps = torch.randn_like(b.noise)
    mse = ((eps - b.noise) ** 2).mean()
    assert torch.allclose(denoising_loss(eps, b), mse) and torch.allclose(ga_loss(eps, b), -mse)
    b.target = torch.zeros_like(eps)
    assert torch.allclose(target_loss(eps, b), (eps**2).mean())


def test_esd_target_formula():
    _, _, b = _batch()
    w = torch.randn(5)

    def eps0(x, t, emb):  # a fake "model" depending on x and the prompt embedding
        return x * emb.mean(dim=(1, 2)).view(-1, 1, 1, 1) + (emb @ w).mean()

    u = torch.randn(1, 3, 5)
    tgt = esd_target(eps0, b, u, eta=2.0)
    e_u, e_c = eps0(b.x_t, b.t, u.expand_as(b.emb)), eps0(b.x_t, b.t, b.emb)
    assert torch.allclose(tgt, e_u - 2.0 * (e_c - e_u))


def test_sigmoid_ramp():
    assert sigmoid_ramp(0, 100, 1.6, 2.0) == 1.6 and sigmoid_ramp(49, 100, 1.6, 2.0) == 1.6
    vals = [sigmoid_ramp(s, 100, 1.6, 2.0) for s in range(100)]
    assert all(a <= b for a, b in zip(vals, vals[1:])) and abs(vals[-1] - 2.0) < 0.01


def test_guidance_loss_is_blind_to_common_drift_and_moves_only_the_conditional_branch():
    from resalign_fast.objectives import NoisyBatch, guidance_loss, guidance_target

    g = torch.Generator().manual_seed(3)
    x, emb, u = (
        torch.randn(2, 1, 4, 4, generator=g),
        torch.randn(2, 3, 5, generator=g),
        torch.randn(1, 3, 5, generator=g),
    )
    w = torch.randn(5, generator=g)

    def eps0(x_t, t, e):  # a stand-in "model": the prompt enters through a linear read-out
        return x_t * (1 + (e @ w).mean(1).view(-1, 1, 1, 1))

    b = NoisyBatch(x, torch.zeros(2, dtype=torch.long), emb, torch.zeros_like(x))
    b.target = guidance_target(eps0, b, u, eta=1.0)
    e_c, e_u = eps0(x, b.t, emb), eps0(x, b.t, u.expand_as(emb))
    assert torch.allclose(b.target, -(e_c - e_u))
    base = guidance_loss(e_c, e_u, b)
    assert torch.allclose(
        base, ((2 * (e_c - e_u)) ** 2).mean()
    )  # the original model: (1 + eta)^2 ||g0||^2
    drift = torch.randn(x.shape, generator=g)
    assert torch.allclose(guidance_loss(e_c + drift, e_u + drift, b), base)  # shared drift cancels
    # the unconditional branch gets no gradient
    eu = e_u.clone().requires_grad_(True)
    ec = e_c.clone().requires_grad_(True)
    guidance_loss(ec, eu, b).backward()
    assert eu.grad is None and ec.grad is not None and ec.grad.abs().sum() > 0
