"""Scale-out over torch.distributed: the k sampled fine-tuning configurations of an outer step are
spread across ranks and their hypergradients reduced explicitly (DDP does not synchronise gradients
of gradients, and the hypergradient is not a plain backward pass anyway).

    torchrun --standalone --nproc_per_node N -m resalign_fast.train [flags]

Every rank holds theta and the data, computes the shared direct gradient, and runs the configurations
``i`` with ``i % N == rank``. Each configuration draws from its own generator seeded by
(seed, step, i) (bilevel.py), so g_i does not depend on which rank computes it.

The reduction is a gather, not an all_reduce: every rank receives every g_i and sums them in
configuration order, ``((0 + g_0) + g_1) + ... + g_{k-1}``, then divides by k: exactly the operations
of the single-process loop. The result is therefore bit-identical to one process with the same seed
and configurations (fp addition is not associative, so a tree all_reduce would differ in the last
bits), and identical on every rank, so the replicas of theta never drift apart. The gather runs one
parameter tensor at a time: the transient memory is N * ceil(k/N) copies of the largest tensor of
theta, not of all of theta.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from resalign_fast.threads import set_threads


@dataclass(frozen=True)
class DistContext:
    """The process group a run uses (world_size 1: no torch.distributed at all).

    Attributes:
        rank: this process's rank. world_size: number of processes. local_rank: rank on this node.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def indices(self, k: int) -> list[int]:
        """The configuration indices (of 0..k-1) this rank computes: i % world_size == rank."""
        return list(range(self.rank, k, self.world_size))

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable, small), in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any_flag(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on some rank (for agreeing on errors)."""
        return any(self.gather_objects(bool(flag)))

    def reduce_config_grads(self, local: dict[int, list[torch.Tensor]], k: int,
                            like: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum of the k per-configuration gradients, in configuration order, on every rank.

        Args:
            local: {i: g_i} for this rank's configurations (`indices(k)`), each a list shaped like `like`.
            k: number of configurations of the step.
            like: theta's tensors (shapes, dtypes, devices of the result).

        Returns:
            [sum_i g_i[j] for each tensor j], summed as ((0 + g_0) + g_1) + ... (see the module doc).
        """
        if not self.enabled:
            total = [torch.zeros_like(p) for p in like]
            for i in range(k):
                for acc, x in zip(total, local[i]):
                    acc.add_(x)
            return total
        m = math.ceil(k / self.world_size)
        mine = self.indices(k)
        total = []
        for j, p in enumerate(like):
            send = torch.zeros((m, *p.shape), dtype=p.dtype, device=p.device)
            for slot, i in enumerate(mine):
                send[slot].copy_(local[i][j])
            recv = [torch.empty_like(send) for _ in range(self.world_size)]
            dist.all_gather(recv, send)
            acc = torch.zeros_like(p)
            for i in range(k):
                acc.add_(recv[i % self.world_size][i // self.world_size])
            total.append(acc)
        return total


_CTX: Optional[DistContext] = None


def setup(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK in the environment).

    Without those variables (a plain `python -m ...`) returns a world of one and touches nothing.
    The backend is NCCL when the run uses CUDA, gloo otherwise; on CUDA the rank's device is
    cuda:LOCAL_RANK (so `--device auto` / `cuda` pick it).
    """
    global _CTX
    if _CTX is not None:
        return _CTX
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CTX = DistContext()
        return _CTX
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    _CTX = DistContext(rank, world, local)
    return _CTX


def teardown() -> None:
    """Leave the process group (no-op for a world of one)."""
    global _CTX
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CTX = None


def context() -> DistContext:
    """The current context (a world of one before `setup`)."""
    return _CTX or DistContext()


# --- DeepSpeed: the full-parameter downstream fine-tuning (python -m resalign_fast.finetune --deepspeed) ---

# Keys this module fills from the finetune flags when a DeepSpeed config leaves them out or "auto".
DS_FROM_FLAGS = {"train_micro_batch_size_per_gpu": "train_batch_size", "gradient_clipping": "max_grad_norm"}


def load_ds_config(path: str | os.PathLike, cfg) -> dict:
    """Read and complete a DeepSpeed JSON config for a `FinetuneConfig` run.

    Batch size and clipping come from the finetune flags (filled where absent or "auto", an error
    where they disagree); gradient accumulation is 1. The optimizer and schedule are the finetune
    flags' torch ones (the same as without DeepSpeed), so `optimizer` / `scheduler` sections are
    refused; so is ZeRO stage 3 (parameters partitioned: not supported by the save path).

    Raises:
        ConfigError: missing file, invalid JSON, or a key that cannot be used (named).
    """
    import json

    from resalign_fast.config import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such DeepSpeed config file")
    try:
        ds = json.loads(p.read_text())
    except ValueError as e:
        raise ConfigError(f"{p}: not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{p}: expected a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{p}: remove the '{key}' section: the finetune flags (--optimizer, --learning_rate, "
                              f"--lr_scheduler, ...) define it, as without DeepSpeed")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"{p}: zero_optimization.stage = {stage!r}: use 0, 1 or 2 (ZeRO 3 is not supported)")
    for key, flag in DS_FROM_FLAGS.items():
        want = getattr(cfg, flag)
        if ds.get(key, "auto") == "auto":
            ds[key] = want
        elif ds[key] != want:
            raise ConfigError(f"{p}: {key} = {ds[key]!r} disagrees with --{flag} {want!r} (set it to \"auto\")")
    gas = ds.setdefault("gradient_accumulation_steps", 1)
    if gas not in (1, "auto"):
        raise ConfigError(f"{p}: gradient_accumulation_steps = {gas!r}: only 1 is supported")
    ds["gradient_accumulation_steps"] = 1
    if ds.get("train_batch_size", "auto") == "auto":
        ds.pop("train_batch_size", None)
    ds.setdefault("zero_allow_untested_optimizer", True)  # the client torch optimizer
    ds.setdefault("zero_force_ds_cpu_optimizer", False)   # CPU offload with it, no DeepSpeedCPUAdam build
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def _single_process_env() -> bool:
    """Set torch.distributed's variables for a one-process run unless a launcher did; True if set here."""
    if "RANK" in os.environ:
        return False
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return True


def run_deepspeed_finetune(cfg, ds_config: str | os.PathLike) -> Path:
    """`finetune.run` with the update done by a DeepSpeed engine (ZeRO 0-2, optional CPU offload).

    Same data, LoRA/full parameters, torch optimizer, schedule and batches as `eval.downstream.finetune`
    (one process, fp32: the same weights up to the order of the clipping-norm sum). Each rank draws
    its own batches (seed + rank). Rank 0 writes output_dir/{config.toml, ds_config.json, log.jsonl,
    model/}. Launch with `torchrun`/`deepspeed` for several GPUs, or plainly for one process.

    Raises:
        FinetuneError: DeepSpeed missing, autocast flags (use the DeepSpeed config's bf16/fp16
            sections), an existing model/, or a non-finite loss. ConfigError: a bad DeepSpeed config.
    """
    import json

    import torch.nn.functional as F

    from resalign_fast.eval.cliconf import dump_toml, parse_list
    from resalign_fast.eval.downstream import (FinetuneError, make_batch, make_optimizer, make_schedule, prepare_training,
                                               resolve_model_path, save_finetuned, check_output_dir)
    from resalign_fast.models.pipeline import load_model
    from resalign_fast.runs import pick_device

    try:
        import deepspeed
    except ImportError as e:
        raise FinetuneError(f"--deepspeed needs DeepSpeed: `DS_BUILD_OPS=0 pip install deepspeed` ({e})") from None
    ds = load_ds_config(ds_config, cfg)
    if cfg.mixed_precision != "no":
        raise FinetuneError("--mixed_precision is autocast; with --deepspeed set \"bf16\" or \"fp16\" in the DeepSpeed config")
    out = Path(cfg.output_dir)
    if cfg.resume:
        raise FinetuneError("--resume is not supported with --deepspeed (its checkpoints are DeepSpeed's); run without --deepspeed")
    check_output_dir(cfg)  # refuses an earlier run's folder
    saves = set(parse_list(cfg.checkpointing_steps, int, "checkpointing_steps"))
    set_threads(cfg.num_threads)
    own_env = _single_process_env()
    device = pick_device(cfg.device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        model = load_model(resolve_model_path(cfg.pretrained_model_name_or_path), device=device)
        unet = model.unet
        train, prior, params = prepare_training(cfg, model, unet, device)
        opt = make_optimizer(cfg, params)
        engine, _, _, sched = deepspeed.initialize(model=unet, optimizer=opt, model_parameters=params,
                                                   lr_scheduler=make_schedule(cfg, opt), config=ds)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.toml").write_text(dump_toml(cfg))
            (out / "ds_config.json").write_text(json.dumps(ds, indent=2))
        gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * rank)
        dtype = next(engine.module.parameters()).dtype
        logf = open(out / "log.jsonl", "w") if rank == 0 else None
        try:
            for s in range(cfg.max_train_steps):
                engine.train()
                b = make_batch(train, prior, cfg.train_batch_size, model.scheduler, gen, cfg.random_flip)
                pred = engine(b.x_t.to(dtype), b.t, b.emb.to(dtype)).sample.float()
                n = b.n_instance
                inst = F.mse_loss(pred[:n], b.target[:n])
                rec = {"step": s + 1, "instance_loss": inst.item()}
                loss = inst
                if pred.shape[0] > n:
                    pl = F.mse_loss(pred[n:], b.target[n:])
                    loss, rec["prior_loss"] = inst + cfg.prior_loss_weight * pl, pl.item()
                rec["loss"] = loss.item()
                if not math.isfinite(rec["loss"]):
                    raise FinetuneError(f"rank {rank}, step {s + 1}: non-finite loss {rec['loss']} (try a smaller --learning_rate)")
                engine.backward(loss)
                engine.step()
                norm = engine.get_global_grad_norm()
                rec.update(lr=sched.get_last_lr()[0], grad_norm=float(norm) if norm is not None else float("nan"))
                if logf is not None:
                    logf.write(json.dumps(rec) + "\n")
                    logf.flush()
                if rank == 0 and s + 1 in saves:
                    save_finetuned(model, engine.module, cfg, out / f"checkpoint-{s + 1}")
        finally:
            if logf is not None:
                logf.close()
        unet = engine.module.eval().requires_grad_(False)
        if rank == 0 and cfg.save_model:
            if dtype != torch.float32:
                unet.float()
            save_finetuned(model, unet, cfg, out / "model")
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if own_env:
            for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                os.environ.pop(k, None)
    return out
