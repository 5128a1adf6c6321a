"""The downstream fine-tuning run: the training loop, its resumable state, the saved model, and
the CLI run of `python -m resalign_fast.finetune` (the pieces it is made of: `eval.downstream`)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from resalign_fast.cli import parse_list
from resalign_fast.config import ConfigError, to_toml
from resalign_fast.eval.downstream import (
    FinetuneConfig,
    FinetuneDiverged,
    FinetuneError,
    TorchUpdate,
    load_prompt_images,
    make_batch,
    make_optimizer,
    make_schedule,
    prepare_training,
    resolve_model_path,
    training_step,
)
from resalign_fast.threads import set_threads

log = logging.getLogger("resalign_fast.finetune")

STATE = "last.pt"  # output_dir/checkpoints/last.pt: what --resume continues from


Callback = Callable[[int, torch.nn.Module], None]


@dataclass
class FinetuneResult:
    """unet: the fine-tuned UNet (with its LoRA adapter when algorithm is lora); log: one dict per
    step."""

    unet: torch.nn.Module
    log: list[dict]
    seconds: float
    out_dir: Path | None = None


def finetune(
    cfg: FinetuneConfig,
    model,
    *,
    unet: torch.nn.Module | None = None,
    callback: Callback | None = None,
    callback_steps: tuple[int, ...] = (),
    out_dir: Path | None = None,
    state: dict | None = None,
) -> FinetuneResult:
    """Fine-tune `unet` (default: model.unet, changed in place) on cfg.train_data.

    Args:
        model: the `DiffusionModel` (text encoder, VAE, scheduler; its UNet unless `unet` is given).
        callback: called as callback(step, unet) after `step` optimizer steps for every step in
            `callback_steps` (0: before training); the UNet is in eval mode during the call.
        out_dir: where log.jsonl, checkpoint folders and checkpoints/last.pt go (None: nothing is
            written).
        state: a `read_state` result to continue from (--resume); log.jsonl is cut back to its step.

    Raises:
        FinetuneDiverged: a non-finite loss, or weights that are non-finite or exploding at a save.
    """
    unet = unet if unet is not None else model.unet
    dev = next(unet.parameters()).device
    if cfg.mixed_precision == "fp16" and dev.type != "cuda":
        raise FinetuneError("--mixed_precision fp16 needs CUDA (use bf16 or no on the CPU)")
    train, prior, params = prepare_training(cfg, model, unet, dev)
    opt = make_optimizer(cfg, params)
    scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" else None
    sched = make_schedule(cfg, opt)
    update = TorchUpdate(opt, sched, params, cfg.max_grad_norm, scaler)
    gen = torch.Generator().manual_seed(cfg.seed)
    saves = set(parse_list(cfg.checkpointing_steps, int, "checkpointing_steps"))
    records, start = [], 0
    if state is not None:
        start = _load_state(state, params, opt, sched, gen, scaler)
        if out_dir is not None and (out_dir / "log.jsonl").is_file():
            lines = (out_dir / "log.jsonl").read_text().splitlines()[:start]
            records = [json.loads(x) for x in lines]
    logf = None
    if out_dir is not None:
        from resalign_fast.runs import write_atomic

        write_atomic(out_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        logf = open(out_dir / "log.jsonl", "a")
    t0 = time.time()
    try:
        for s in range(start, cfg.max_train_steps + 1):
            if s in callback_steps and callback is not None:
                unet.eval()
                callback(s, unet)
            if s in saves and out_dir is not None and s > 0:
                save_finetuned(model, unet, cfg, out_dir / f"checkpoint-{s}")
            if s == cfg.max_train_steps:
                break
            unet.train()
            batch = make_batch(
                train, prior, cfg.train_batch_size, model.scheduler, gen, cfg.random_flip
            )
            rec = {"step": s + 1, **training_step(unet, batch, update, cfg)}
            records.append(rec)
            if logf is not None:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                last = s + 1 == cfg.max_train_steps
                if cfg.checkpoint_every and ((s + 1) % cfg.checkpoint_every == 0 or last):
                    save_state(out_dir, s + 1, params, opt, sched, gen, scaler, unet)
    finally:
        if logf is not None:
            logf.close()
    unet.eval().requires_grad_(False)
    return FinetuneResult(unet, records, time.time() - t0, out_dir)


def save_state(
    out_dir: Path,
    step: int,
    params: list[torch.Tensor],
    opt,
    sched,
    gen: torch.Generator,
    scaler,
    unet: torch.nn.Module,
) -> None:
    """checkpoints/last.pt: the trainable weights, optimizer, schedule, batch RNG (and loss scaler)
    after `step` steps, written to a temporary file and renamed. Non-finite weights are not
    saved."""

    from resalign_fast.models.health import UnhealthyModel, check_weights

    try:
        check_weights(unet)
    except UnhealthyModel as e:
        raise FinetuneDiverged(
            f"step {step}: {e}; not checkpointed (try a smaller --learning_rate)"
        ) from None
    from resalign_fast.runs import save_atomic

    save_atomic(
        {
            "step": step,
            "params": [p.detach().cpu() for p in params],
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "gen": gen.get_state(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        },
        out_dir / "checkpoints" / STATE,
    )


def read_state(out_dir: Path) -> dict | None:
    """checkpoints/last.pt of a finetune run (weights-only load), or None when there is none.

    Raises:
        FinetuneError: the file exists but is not a readable finetune checkpoint (named).
    """
    path = out_dir / "checkpoints" / STATE
    if not path.is_file():
        return None
    try:
        st = torch.load(path, weights_only=True, map_location="cpu")
        if not (isinstance(st, dict) and {"step", "params", "opt", "sched", "gen"} <= set(st)):
            raise ValueError("missing step/params/opt/sched/gen")
    except Exception as e:  # unreadable or not weights-only: say which file
        raise FinetuneError(
            f"{path}: cannot read the checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    return st


def _load_state(st: dict, params, opt, sched, gen: torch.Generator, scaler) -> int:
    saved = st["params"]
    if len(saved) != len(params) or any(a.shape != b.shape for a, b in zip(saved, params)):
        raise FinetuneError("--resume: checkpoints/last.pt does not match this model and algorithm")
    with torch.no_grad():
        for p, v in zip(params, st["params"]):
            p.copy_(v)
    opt.load_state_dict(st["opt"])
    sched.load_state_dict(st["sched"])
    gen.set_state(st["gen"])
    if scaler is not None and st.get("scaler") is not None:
        scaler.load_state_dict(st["scaler"])
    return int(st["step"])


def save_finetuned(model, unet: torch.nn.Module, cfg: FinetuneConfig, out: Path) -> Path:
    """A full diffusers model folder (LoRA merged into the UNet) plus lora/ for LoRA runs.

    The merged UNet is checked first (`models.health`: finite weights below fp16's range, a finite
    and bounded output on a probe batch), and the folder is written to a temporary name and renamed
    (`runs.atomic_dir`): a broken or half-written model is never left at `out`.

    Raises:
        FinetuneDiverged: the model is non-finite or exploding; nothing is written.
    """
    from resalign_fast.export import plain_unet
    from resalign_fast.models.health import UnhealthyModel, check_unet
    from resalign_fast.models.lora import ParamSpace, lora_names
    from resalign_fast.models.pipeline import save_model
    from resalign_fast.runs import atomic_dir

    plain, space = unet, None
    if cfg.algorithm == "lora":
        space = ParamSpace(unet, lora_names(unet))
        try:
            plain = plain_unet(unet, space.values(), space)
        except ValueError as e:
            raise FinetuneError(f"LoRA merge: {e}") from None
    try:
        check_unet(plain, model)
    except UnhealthyModel as e:
        raise FinetuneDiverged(
            f"the fine-tuned model is broken: {e}; {out} not written "
            "(try a smaller --learning_rate)"
        ) from None
    with atomic_dir(out) as tmp:
        if space is not None:
            from safetensors.torch import save_file

            (tmp / "lora").mkdir(parents=True, exist_ok=True)
            weights = {
                n: p.detach().contiguous().cpu() for n, p in zip(space.names, space.values())
            }
            save_file(weights, str(tmp / "lora" / "adapter_model.safetensors"))
            (tmp / "lora" / "adapter_config.json").write_text(
                json.dumps(
                    {
                        "r": cfg.rank,
                        "lora_alpha": cfg.lora_alpha or cfg.rank,
                        "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
                    }
                )
            )
        save_model(
            model, tmp, unet=plain, extra={"resalign_fast_finetune": Path(cfg.output_dir).name}
        )
    return out


# settings a resumed finetune run may change (they do not shape the weights)
RESUME_MAY_CHANGE = {
    "resume",
    "device",
    "num_threads",
    "checkpoint_every",
    "save_model",
    "output_dir",
}


def check_output_dir(cfg: FinetuneConfig) -> dict | None:
    """Refuse to write over an earlier run; with --resume, check its settings and read its state.

    Returns:
        the state to continue from (None: start at step 0).

    Raises:
        FinetuneError: output_dir holds a finished run (model/), or an earlier run and no --resume,
            or --resume with other settings or a damaged checkpoint.
    """
    from resalign_fast.runs import changed_settings, folder_contents

    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--output_dir {out}: exists and is not a folder")
    if (out / "model").exists():
        raise FinetuneError(
            f"{out}/model exists: that run is finished; choose another "
            "--output_dir (nothing is overwritten)"
        )
    contents = folder_contents(out)
    if contents and not cfg.resume:
        raise FinetuneError(
            f"{out} exists and is not empty ({', '.join(contents[:4])}): pass "
            "--resume to continue that run, or choose another --output_dir"
        )
    if not cfg.resume or not contents:
        return None
    st = read_state(out)
    if st is None:  # nothing trained is kept: any settings may start over (config.toml rewritten)
        log.warning("--resume: no checkpoint in %s, starting from step 0", out / "checkpoints")
        return None
    try:
        changed = changed_settings(out / "config.toml", cfg, RESUME_MAY_CHANGE)
    except ConfigError as e:
        raise FinetuneError(f"--resume: {e}") from None
    if changed:
        raise FinetuneError(
            f"--resume: {out / 'config.toml'} was written with other settings "
            f"({', '.join(changed)})"
        )
    return st


def run(cfg: FinetuneConfig) -> Path:
    """The CLI run: load, fine-tune, write output_dir/{config.toml, log.jsonl, checkpoints/,
    model/}; returns output_dir. Nothing is written before the model and settings are checked."""
    from resalign_fast.models.pipeline import load_model
    from resalign_fast.runs import folder_contents, lock_folder, pick_device, write_atomic

    set_threads(cfg.num_threads)
    out = Path(cfg.output_dir)
    state = check_output_dir(cfg)
    parse_list(cfg.checkpointing_steps, int, "checkpointing_steps")
    device = pick_device(cfg.device)
    model = load_model(resolve_model_path(cfg.pretrained_model_name_or_path), device=device)
    # bad data: an error before anything is written
    load_prompt_images(cfg.train_data, model, cfg.concept, cfg.data_seed)
    lock = lock_folder(out)  # a second run into output_dir fails at once
    try:
        if folder_contents(out) and not cfg.resume:
            raise FinetuneError(
                f"{out} was filled by another run meanwhile; choose another --output_dir"
            )
        if state is None or not (out / "config.toml").is_file():  # a resumed run keeps its record
            write_atomic(out / "config.toml", to_toml(cfg))
        res = finetune(cfg, model, out_dir=out, state=state)
        if cfg.save_model:
            save_finetuned(model, res.unet, cfg, out / "model")
    finally:
        lock.close()
    last = res.log[-1]["loss"] if res.log else float("nan")
    log.info("%d steps in %.1f s, last loss %.4f", len(res.log), res.seconds, last)
    return out


__all__ = [
    "FinetuneResult",
    "finetune",
    "save_state",
    "read_state",
    "save_finetuned",
    "check_output_dir",
    "run",
]
