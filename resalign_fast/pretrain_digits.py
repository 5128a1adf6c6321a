"""Pretrain the embedded digits model: `python -m resalign_fast.pretrain_digits`.

Trains the small UNet of `models.pipeline.DIGITS_UNET_CONFIG` on the train split of the bundled
digits (standard denoising loss, 10% caption dropout for classifier-free guidance, EMA weights),
then writes a diffusers folder with a manifest that records how it was made and the fraction of
generated digits that the held-out classifier reads as the prompted digit. Seeded and resumable.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from resalign_fast.data.digits import all_captions, captioned_set, digits_split
from resalign_fast.eval.evaluators import DIGITS_GUIDANCE, DIGITS_STEPS
from resalign_fast.models.pipeline import DIGITS_MODEL_DIR, build_digits_model, save_model
from resalign_fast.models.sampling import generate, image_grid, save_png


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="probability of an empty caption")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DIGITS_MODEL_DIR)
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("outputs/pretrain_digits.ckpt.pt"),
        help="resumable training state, written every --checkpoint-every steps",
    )
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument(
        "--eval-per-digit", type=int, default=100, help="generated images per digit for the report"
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=DIGITS_GUIDANCE,
        help="classifier-free guidance of the report (the evaluation's, see eval/evaluators.py)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (the manifest records which)")
    p.add_argument(
        "--text-lr",
        type=float,
        default=1e-3,
        help="learning rate of the text encoder, trained jointly here and frozen afterwards "
        "(0 keeps it at its random init: conditioning then fails, 44%% accuracy after 5000 steps)",
    )
    p.add_argument("--sample-steps", type=int, default=DIGITS_STEPS)
    return p.parse_args(argv)


def evaluate_digits(
    model, unet, per_digit: int, guidance: float, steps: int, seed: int = 123
) -> dict:
    """Fraction of generated digits the held-out classifier reads as the prompted digit."""
    from resalign_fast.eval.classifier import load_classifier

    clf = load_classifier()
    prompts, labels = [], []
    for d in range(10):
        caps = all_captions(d)
        prompts += [caps[i % len(caps)] for i in range(per_digit)]
        labels += [d] * per_digit
    imgs = generate(
        model, prompts, steps=steps, guidance=guidance, seed=seed, batch_size=250, unet=unet
    )
    pred = clf(imgs).argmax(1)
    y = torch.tensor(labels)
    per = {str(d): (pred[y == d] == d).float().mean().item() for d in range(10)}
    return {"accuracy": (pred == y).float().mean().item(), "per_digit": per, "images": imgs}


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    model = build_digits_model(a.seed).to(a.device)
    unet = model.unet.train()
    text = model.text_encoder.train().requires_grad_(a.text_lr > 0)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_text = copy.deepcopy(text).eval().requires_grad_(False)
    images, labels = digits_split("train", int(unet.config.sample_size))
    images = images.to(a.device)
    data = [captioned_set(images, labels, seed=s) for s in range(6)]
    prompts = sorted({p for d in data for p in d.prompts})
    tok = model.tokenizer(
        prompts + [""],
        padding="max_length",
        truncation=True,
        max_length=model.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.to(a.device)
    index = {p: i for i, p in enumerate(prompts + [""])}
    caps = torch.stack([torch.tensor([index[p] for p in d.prompts]) for d in data]).to(
        a.device
    )  # (6, N)
    groups = [{"params": list(unet.parameters()), "lr": a.lr}]
    if a.text_lr > 0:
        groups.append({"params": list(text.parameters()), "lr": a.text_lr})
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / 200)
            * 0.5
            * (1 + torch.cos(torch.tensor(torch.pi * s / a.steps)).item())
        ),
    )
    g = torch.Generator().manual_seed(a.seed)
    start = 0
    if a.checkpoint.is_file():
        st = torch.load(a.checkpoint, weights_only=True, map_location=a.device)
        unet.load_state_dict(st["unet"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        text.load_state_dict(st["text"])
        ema_text.load_state_dict(st["ema_text"])
        sched.load_state_dict(st["sched"])
        g.set_state(st["gen"].cpu())
        start = st["step"]
        print(f"resumed from {a.checkpoint} at step {start}")
    alphas = model.scheduler.alphas_cumprod.to(a.device)
    t0, loss_sum = time.time(), torch.zeros((), device=a.device)
    for step in range(start, a.steps):
        idx = torch.randint(0, len(labels), (a.batch_size,), generator=g).to(a.device)
        which = torch.randint(0, caps.shape[0], (a.batch_size,), generator=g).to(a.device)
        cap = caps[which, idx]
        drop = (torch.rand(a.batch_size, generator=g) < a.cfg_dropout).to(a.device)
        cap = torch.where(drop, torch.full_like(cap, index[""]), cap)
        x0 = images[idx]
        x0 = (
            torch.roll(
                x0, shifts=tuple(torch.randint(-1, 2, (2,), generator=g).tolist()), dims=(2, 3)
            )
            if step % 2
            else x0
        )
        t = torch.randint(0, len(alphas), (a.batch_size,), generator=g).to(a.device)
        noise = torch.randn(x0.shape, generator=g).to(a.device)
        ab = alphas[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        loss = F.mse_loss(unet(xt, t, text(tok[cap])[0]).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g_ in groups for p in g_["params"]], 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(a.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(
                list(ema.parameters()) + list(ema_text.parameters()),
                list(unet.parameters()) + list(text.parameters()),
                1 - d,
            )
            loss_sum += loss.detach()
        if (step + 1) % 100 == 0:
            print(
                f"step {step + 1}/{a.steps} loss {loss_sum.item() / 100:.4f} "
                f"{time.time() - t0:.0f}s",
                flush=True,
            )
            loss_sum.zero_()
        if (step + 1) % a.checkpoint_every == 0 or step + 1 == a.steps:
            a.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = a.checkpoint.with_suffix(".tmp")
            torch.save(
                {
                    "unet": unet.state_dict(),
                    "ema": ema.state_dict(),
                    "opt": opt.state_dict(),
                    "text": text.state_dict(),
                    "ema_text": ema_text.state_dict(),
                    "sched": sched.state_dict(),
                    "gen": g.get_state(),
                    "step": step + 1,
                },
                tmp,
            )
            tmp.replace(a.checkpoint)
    model.text_encoder = ema_text
    model._emb_cache.clear()
    ev = evaluate_digits(model, ema, a.eval_per_digit, a.guidance, a.sample_steps)
    model.to("cpu")
    ema.to("cpu")
    manifest = {
        "command": "python -m resalign_fast.pretrain_digits "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": a.seed,
        "steps": a.steps,
        "batch_size": a.batch_size,
        "lr": a.lr,
        "text_lr": a.text_lr,
        "ema": a.ema,
        "cfg_dropout": a.cfg_dropout,
        "train_images": len(labels),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if str(a.device).startswith("cuda") else "cpu",
        "train_seconds_this_process": round(time.time() - t0, 1),
        "resumed_from_step": start,
        "eval": {
            "guidance": a.guidance,
            "sample_steps": a.sample_steps,
            "per_digit_images": a.eval_per_digit,
            "classifier_accuracy_on_generated": ev["accuracy"],
            "per_digit": ev["per_digit"],
        },
    }
    save_model(model, a.out, unet=ema, extra={"resalign_fast_manifest": manifest})
    (a.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    save_png(
        image_grid(ev["images"][:: a.eval_per_digit // 10 or 1][:100], nrow=10),
        a.out / "samples.png",
    )
    print(json.dumps(manifest["eval"], indent=2))


if __name__ == "__main__":
    main()
