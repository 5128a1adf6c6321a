"""Full-parameter downstream fine-tuning with a DeepSpeed engine (ZeRO 0-2, optional CPU offload):
`python -m resalign_fast.finetune --deepspeed ds_config.json`, or under `torchrun`/`deepspeed`.

The data, parameters, torch optimizer, schedule, batches and the step itself are those of
`eval.downstream` (`training_step` with `EngineUpdate`): the engine only replaces the backward
pass, clipping and the optimizer step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from resalign_fast.cli import parse_list
from resalign_fast.config import ConfigError, to_toml
from resalign_fast.eval.downstream import (
    FinetuneDiverged,
    FinetuneError,
    make_batch,
    make_optimizer,
    make_schedule,
    prepare_training,
    resolve_model_path,
    training_step,
)
from resalign_fast.threads import set_threads

# Keys filled from the finetune flags when a DeepSpeed config leaves them out or "auto".
DS_FROM_FLAGS = {
    "train_micro_batch_size_per_gpu": "train_batch_size",
    "gradient_clipping": "max_grad_norm",
}


def load_ds_config(path: str | os.PathLike, cfg) -> dict:
    """Read and complete a DeepSpeed JSON config for a `FinetuneConfig` run.

    Batch size and clipping come from the finetune flags (filled where absent or "auto", an error
    where they disagree); gradient accumulation is 1. The optimizer and schedule are the finetune
    flags' torch ones (the same as without DeepSpeed), so `optimizer` / `scheduler` sections are
    refused; so is ZeRO stage 3 (parameters partitioned: not supported by the save path).

    Raises:
        ConfigError: missing file, invalid JSON, or a key that cannot be used (named).
    """
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
            raise ConfigError(
                f"{p}: remove the '{key}' section: the finetune flags (--optimizer, "
                "--learning_rate, --lr_scheduler, ...) define it, as without "
                "DeepSpeed"
            )
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(
            f"{p}: zero_optimization.stage = {stage!r}: use 0, 1 or 2 (ZeRO 3 is not supported)"
        )
    for key, flag in DS_FROM_FLAGS.items():
        want = getattr(cfg, flag)
        if ds.get(key, "auto") == "auto":
            ds[key] = want
        elif ds[key] != want:
            raise ConfigError(
                f'{p}: {key} = {ds[key]!r} disagrees with --{flag} {want!r} (set it to "auto")'
            )
    gas = ds.setdefault("gradient_accumulation_steps", 1)
    if gas not in (1, "auto"):
        raise ConfigError(f"{p}: gradient_accumulation_steps = {gas!r}: only 1 is supported")
    ds["gradient_accumulation_steps"] = 1
    if ds.get("train_batch_size", "auto") == "auto":
        ds.pop("train_batch_size", None)
    ds.setdefault("zero_allow_untested_optimizer", True)  # the client torch optimizer
    ds.setdefault("zero_force_ds_cpu_optimizer", False)  # CPU offload with it, no DeepSpeedCPUAdam
    ds.setdefault("steps_per_print", 10**9)
    return ds


def _single_process_env() -> bool:
    """Set torch.distributed's variables for a one-process run unless a launcher did; True if set
    here."""
    if "RANK" in os.environ:
        return False
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    return True


class EngineUpdate:
    """`training_step`'s backward pass and step done by a DeepSpeed engine (it clips and steps the
    client optimizer and schedule itself)."""

    def __init__(self, engine, sched):
        self.engine, self.sched = engine, sched

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        """The engine's step; returns its global gradient norm (nan when it reports none)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]


def run_deepspeed_finetune(cfg, ds_config: str | os.PathLike) -> Path:
    """`ft_run.run` with the update done by a DeepSpeed engine (ZeRO 0-2, optional CPU offload).

    Same data, LoRA/full parameters, torch optimizer, schedule, batches and step as
    `eval.ft_run.finetune` (one process, fp32: the same weights up to the order of the clipping-norm
    sum). Each rank draws its own batches (seed + rank). Rank 0 writes output_dir/{config.toml,
    ds_config.json, log.jsonl, model/}. Launch with `torchrun`/`deepspeed` for several GPUs, or
    plainly for one process.

    Raises:
        FinetuneError: DeepSpeed missing, autocast flags (use the DeepSpeed config's bf16/fp16
            sections), an existing model/, or a non-finite loss.
        ConfigError: a bad DeepSpeed config.
    """
    from resalign_fast.eval.ft_run import check_output_dir, save_finetuned
    from resalign_fast.models.pipeline import load_model
    from resalign_fast.runs import pick_device

    try:
        import deepspeed
    except ImportError as e:
        raise FinetuneError(
            f"--deepspeed needs DeepSpeed: `DS_BUILD_OPS=0 pip install deepspeed` ({e})"
        ) from None
    ds = load_ds_config(ds_config, cfg)
    if cfg.mixed_precision != "no":
        raise FinetuneError(
            '--mixed_precision is autocast; with --deepspeed set "bf16" or '
            '"fp16" in the DeepSpeed config'
        )
    out = Path(cfg.output_dir)
    if cfg.resume:
        raise FinetuneError(
            "--resume is not supported with --deepspeed (its checkpoints are "
            "DeepSpeed's); run without --deepspeed"
        )
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
        engine, _, _, sched = deepspeed.initialize(
            model=unet,
            optimizer=opt,
            model_parameters=params,
            lr_scheduler=make_schedule(cfg, opt),
            config=ds,
        )
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.toml").write_text(to_toml(cfg))
            (out / "ds_config.json").write_text(json.dumps(ds, indent=2))
        gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * rank)
        dtype = next(engine.module.parameters()).dtype
        update = EngineUpdate(engine, sched)
        logf = open(out / "log.jsonl", "w") if rank == 0 else None
        try:
            for s in range(cfg.max_train_steps):
                engine.train()
                b = make_batch(
                    train, prior, cfg.train_batch_size, model.scheduler, gen, cfg.random_flip
                )
                try:
                    rec = {"step": s + 1, **training_step(engine, b, update, cfg, dtype)}
                except FinetuneDiverged as e:  # this path's exit status for it stays 2
                    raise FinetuneError(f"rank {rank}, step {s + 1}: {e}") from None
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
