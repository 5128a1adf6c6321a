"""Scale-out on CPU with gloo and 2 processes: the configuration reduction is bit-identical to the
one-process sum, and `torchrun -m resalign_fast.train` ends with the same weights as one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tiny import train_args

from resalign_fast import train
from resalign_fast.distributed import DistContext

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

WORKER = r"""
import sys, torch
from resalign_fast import distributed
ctx = distributed.setup("cpu")
like = [torch.zeros(3, 5), torch.zeros(7)]
def g(i):  # magnitudes 1 .. 1e9: a different summation order changes the last bits
    gen = torch.Generator().manual_seed(100 + i)
    return [torch.randn(p.shape, generator=gen) * 10.0 ** (3 * (i % 4)) for p in like]
for k in (1, 2, 5):
    got = ctx.reduce_config_grads({i: g(i) for i in ctx.indices(k)}, k, like)
    want = DistContextOne().reduce_config_grads({i: g(i) for i in range(k)}, k, like)
    seq = [sum((g(i)[j] for i in range(k)), torch.zeros_like(p)) for j, p in enumerate(like)]
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(got, want, seq)), k
assert ctx.gather_objects(ctx.rank) == [0, 1] and ctx.any_flag(ctx.rank == 1)
distributed.teardown()
print("OK", ctx.rank)
""".replace("DistContextOne()", "distributed.DistContext()")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_indices_cover_every_config_once():
    for world in (1, 2, 3):
        for k in (1, 2, 3, 5):
            got = sorted(i for r in range(world) for i in DistContext(r, world).indices(k))
            assert got == list(range(k))


def test_gloo_reduction_is_bit_identical_to_sequential_sum():
    env = dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER],
            cwd=ROOT,
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"OK {r}" in out, err[-3000:]


def _args(model_dir, ft_space, out, name):
    return train_args(
        model_dir, ft_space, out, name, outer_steps=2, configs_per_step=3, iters=2, lr="1e-2"
    )


def test_torchrun_two_ranks_match_one_process(tiny_model_dir, tiny_ft_space, tmp_path):
    # k = 3 configurations over 2 ranks (uneven: rank 0 runs configs 0 and 2, rank 1 config 1)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "-m",
        "resalign_fast.train",
        *_args(tiny_model_dir, tiny_ft_space, tmp_path, "two"),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert (
        train.main(_args(tiny_model_dir, tiny_ft_space, tmp_path, "one")) == 0
    )  # meanwhile, one process
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("done:") == 1  # rank 0 alone reports and writes
    one, two = tmp_path / "one", tmp_path / "two"
    a = torch.load(one / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(two / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 2
    assert all(torch.equal(x, y) for x, y in zip(a["theta"], b["theta"]))
    assert not all(torch.equal(x, y) for x, y in zip(a["theta"], _initial_theta(tiny_model_dir)))
    ua = load_file(str(one / "model/unet/diffusion_pytorch_model.safetensors"))
    ub = load_file(str(two / "model/unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(ua[k], ub[k]) for k in ua)
    ma, mb = (
        [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)
    )
    for m in ma + mb:
        m.pop("seconds"), m.pop("peak_memory_bytes")
    assert ma == mb and all(len(m["configs"]) == 3 and len(m["recovered"]) == 3 for m in ma)


def _initial_theta(model_dir):
    """theta before training: the LoRA init of a run with seed 0 (B = 0, A random)."""
    from resalign_fast.models.lora import add_lora, lora_names
    from resalign_fast.models.pipeline import load_model

    torch.manual_seed(0)
    unet = load_model(model_dir).unet
    add_lora(unet, 4, 4.0)
    p = dict(unet.named_parameters())
    return [p[n] for n in lora_names(unet)]
