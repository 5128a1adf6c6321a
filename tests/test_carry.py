"""ft_carry: a configuration slot's simulated fine-tuning continues across outer steps, restarts at
its horizon, and an interrupted run resumes it exactly."""

import json

import torch
from tiny import train_args

from resalign_fast import train


def _space(tmp_path):
    p = tmp_path / "one.toml"
    p.write_text(
        '[[configs]]\nlr = 1e-3\nsteps = 2\nalgorithm = "full"\noptimizer = '
        '"adamw"\n[fixed]\nbatch_size = 2\n'
    )
    return p


def _args(model_dir, space, out, name, steps, *extra):
    return train_args(
        model_dir,
        space,
        out,
        name,
        *extra,
        outer_steps=steps,
        checkpoint_every=2,
        iters=2,
        lr="1e-2",
        ft_carry=4,
        hypergrad="first_order",
    )


def test_carry_continues_restarts_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    space = _space(tmp_path)
    assert train.main(_args(tiny_model_dir, space, tmp_path, "straight", 3)) == 0
    ck = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    # 2 steps at outer step 0, continued to 4 at step 1, restarted (4 + 2 > 4) at step 2
    assert ck["carry"]["0"]["steps"] == 2 and ck["carry"]["0"]["opt_step"] == 2
    # the carried displacement is that of the restarted 2-step simulation, not zero
    assert sum(float(d.abs().sum()) for d in ck["carry"]["0"]["delta"]) > 0
    # without carry, the same run differs (the carried start changes theta*)
    assert train.main(_args(tiny_model_dir, space, tmp_path, "fresh", 3, "--ft_carry", "0")) == 0
    fresh = torch.load(tmp_path / "fresh" / "checkpoints" / "last.pt", weights_only=True)
    assert not all(torch.equal(a, b) for a, b in zip(ck["theta"], fresh["theta"]))
    # interrupted in outer step 2 (after the checkpoint of steps 0-1), then --resume: the same theta
    # bit
    # for bit (the carry is checkpointed)
    from resalign_fast.bilevel import ResAlign

    step = ResAlign.step

    def interrupted(self, s):
        if s == 2:
            raise KeyboardInterrupt
        return step(self, s)

    monkeypatch.setattr(ResAlign, "step", interrupted)
    try:
        train.main(_args(tiny_model_dir, space, tmp_path, "split", 3))
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(ResAlign, "step", step)
    assert (
        torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    )
    assert train.main(_args(tiny_model_dir, space, tmp_path, "split", 3, "--resume")) == 0
    res = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(ck["theta"], res["theta"]))
    m_a = [
        json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    ]
    m_b = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [m["recovered"] for m in m_a] == [m["recovered"] for m in m_b]
