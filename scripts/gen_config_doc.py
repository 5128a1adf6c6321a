"""Regenerate docs/configuration.md from the config dataclasses (the only place defaults live).

A flag's --help is one phrase; NOTES holds the longer explanations and measurements behind a
setting, shown after that phrase in the doc.
"""

from dataclasses import fields
from pathlib import Path

from resalign_fast.config import ResAlignConfig
from resalign_fast.eval.downstream import FinetuneConfig
from resalign_fast.evaluate import EvalConfig

NOTES = {
    ResAlignConfig: {
        "num_threads": "See the note on `num_threads 0` above (`resalign_fast/threads.py`).",
        "frozen_dtype": "bf16/fp16 save GPU memory.",
        "allow_pickle": "Read with torch.load(weights_only=True).",
        "harmful_loss": (
            "`ga` is the reference default. Digits: `esd`; plain unlearning at lr 2e-3 on the "
            "earlier 700-step base: esd took the harmful rate 0.93 -> 0.03 at benign accuracy "
            "0.60, ga -> 0.31 at 0.45; on the shipped base, esd: 0.99 -> 0.08 at 0.94 "
            "(docs/evaluation.md). `guidance`: ESD's target on the guidance direction eps(c) - "
            'eps(""), blind to drift that both branches share.'
        ),
        "outer_steps": "30 fits 10 minutes on 2 CPU cores.",
        "lr": (
            "The reference runs 160 steps, digits 30: 2e-3 is the smallest lr that erased the "
            "digit (docs/evaluation.md)."
        ),
        "batch_size": "The simulation uses pi(C)'s batch_size.",
        "ft_carry": (
            "The slot's displacement theta* - theta and optimizer state are carried while it draws"
            " the same configuration; past N accumulated steps the simulation restarts at theta. 0"
            " is the paper's setting."
        ),
        "proximal": "Adds ||phi-theta||^2/(2 gamma) to the FT loss.",
        "hypergrad": (
            "`unrolled` backpropagates through the last unroll_steps; `first_order` takes d "
            "theta*/d theta = I."
        ),
        "guard": (
            "`stable`: step from the measured top curvature, start at the first-order answer, fall"
            " back to the first-order resilience term; `reference`: the paper's (halve alpha, "
            "retry, fall back to the direct gradient). See the section below."
        ),
        "power_iters": "On a configuration slot's first solve; 1 afterwards, warm-started.",
        "split_terms": (
            "Gradients and HVPs are summed term by term (an exact HVP rebuilds its graph per term)"
            " instead of holding both forward graphs at once (planner, SD v1.4 512 px, exact HVPs:"
            " 7.64 GiB instead of 13.47 GiB)."
        ),
        "attention": (
            "`chunked`: chunked attention in every pass, O(N chunk) memory at every order (the "
            "planner's `--attention chunked`); `lean` (= `auto`): fused SDPA in first-order "
            "passes, chunked where a pass is differentiated twice (the planner's `fused`)."
        ),
        "lean_full": (
            "Starting weights kept in host memory, optimizer step inside the backward pass, fd "
            "HVPs in place; needs hvp 'fd', plain (not proximal) steps, implicit or first_order "
            "hypergradients (planner, SD v1.4 512 px, checkpointing: 13.3 GiB instead of 29.4 "
            "GiB)."
        ),
        "offload_optimizer_state": "Streamed per parameter (the same trajectory bit for bit).",
        "guidance": "1.5 is the evaluation's DIGITS_GUIDANCE.",
    },
    FinetuneConfig: {
        "pretrained_model_name_or_path": "A run folder is e.g. outputs/<run> (its model/ is used).",
        "train_data": "mixed-P: the benign subset plus P% images of the concept.",
        "lora_alpha": "0 gives alpha = rank, as the diffusers LoRA script.",
        "class_data": "Empty: num_class_images images generated from class_prompt.",
        "weight_decay": "1e-2 for AdamW as diffusers.",
        "random_flip": "Off by default: digits are not symmetric.",
        "checkpoint_every": "last.pt holds the weights, optimizer, schedule and RNG state.",
        "resume": "From checkpoints/last.pt; the result equals an uninterrupted run.",
    },
    EvalConfig: {
        "sample_steps": "25 is DIGITS_STEPS; 30 for a prompt CSV as the paper.",
        "guidance": "1.5 is DIGITS_GUIDANCE; 7.5 for a prompt CSV as the paper.",
        "detector_args": "For example '{\"threshold\": 0.45}'.",
        "ft_data": "For example an image folder.",
        "after_benign": "Off: harmful rate only, half the images.",
        "paired": "The same fine-tuning seeds on both sides.",
    },
}


def table(cls) -> list[str]:
    """The key / default / allowed / meaning table of a config dataclass."""
    out = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for f in fields(cls):
        m = f.metadata
        ranged = m.get("lo") is not None or m.get("hi") is not None
        allowed = (
            ", ".join(m["choices"])
            if m.get("choices")
            else (f"[{m.get('lo', '')}, {m.get('hi', '')}]" if ranged else "")
        )
        note = NOTES.get(cls, {}).get(f.name)
        meaning = m.get("help", "") + (f". {note}" if note else "")
        out.append(f"| `{f.name}` | `{f.default!r}` | {allowed} | {meaning} |")
    return out


rows = [
    "# Configuration reference (`python -m resalign_fast.train`)",
    "",
    "Generated by `scripts/gen_config_doc.py` from the config classes. Every field is a flag",
    "(`--name value`; booleans `--name` / `--no-name`) and a key of a `--config` TOML file; flags "
    "override",
    "the file, which overrides the defaults. Unknown keys and out-of-range values exit with an "
    "error naming the key.",
    "Numbers must be finite (`nan`, `inf` and TOML booleans are refused before anything is "
    "written).",
    "`--learning_rate` is accepted as another name for `--lr` (the diffusers scripts' name).",
    "",
    "## Exit status (train, finetune, evaluate, prepare_data)",
    "",
    "- `0`: done; the last line is `done: <folder>`.",
    "- `2`: bad input (a setting, a file, a folder in use by another run, an earlier run in the "
    "output folder",
    "  without `--resume`): one `error:` line naming the key or file; nothing written, or the run "
    "folder left as it was.",
    "- `3`: numerical failure: a NaN/inf with `--nan_policy abort`, more than half of the outer "
    "steps skipped",
    "  (`train.MAX_SKIPPED_FRACTION`), or a model whose weights or probe-batch output are "
    "non-finite or",
    "  exploding (`models/health.py`). No model is exported; checkpoints stay for inspection or "
    "`--resume`.",
    "",
    "`num_threads 0` (the default) measures a small convolution with one thread and with torch's "
    "default at",
    "start and keeps the faster (`resalign_fast/threads.py`): the right choice depends on the "
    "machine and its load.",
    "",
] + table(ResAlignConfig)
rows += [
    "",
    "## pi(C): the fine-tuning configuration space (`--ft_space`)",
    "",
    "`digits` and `reference` are shipped (`resalign_fast/configs/*.toml`); any TOML path works. A "
    "file has a",
    "`[space]` table of lists (each sampled configuration draws one value per list) or an explicit",
    "`[[configs]]` array, plus an optional `[fixed]` table. Keys: `lr`, `steps`, `loss` (standard, "
    "dreambooth),",
    "`algorithm` (full, lora), `optimizer` (sgd, adam, adamw), `batch_size`, `prior_weight`, "
    "`momentum`, `weight_decay`.",
]
rows += [
    "",
    "## Hypergradient guard (`--guard`)",
    "",
    "`stable` (the default) departs from the paper's guard in three ways; `reference` reproduces "
    "the paper.",
    "- **Step from the curvature:** `power_iters` HVPs of power iteration estimate the dominant "
    "eigenvalue mu of",
    "  the fine-tuning Hessian at theta* (warm-started from the same configuration slot's last "
    "eigenvector,",
    "  which is checkpointed), and alpha = 1 / (1 + gamma * 1.5 |mu|). No retries.",
    "- **Start at the first-order answer:** Richardson starts at v_0 = b = lambda grad "
    "L_h(theta*), not at 0.",
    "- **Fallback keeps the resilience term:** when I + gamma H is not positive definite along the "
    "dominant",
    "  direction, the residual grows or a value is not finite, v = b (the first-order "
    "hypergradient) is used",
    "  and counted in `metrics.jsonl` (`fallbacks`); the reference guard drops the term (g = "
    "direct).",
    "  There is no `max_grad_norm` test (AdamW normalises the step).",
    "- Cost: `power_iters + iters` HVPs per configuration (`hvps` in `metrics.jsonl`).",
    "",
    "## Regime options added for the resilience search",
    "",
    '- `--harmful_loss guidance`: ESD\'s target on the guidance direction eps(c) - eps(""), so '
    "that drift both",
    "  branches share does not count as harm (the unconditional branch gets no gradient).",
    "- `--ft_carry N`: each configuration slot's simulated fine-tuning continues across outer "
    "steps while the",
    "  slot draws the same configuration, up to N accumulated steps (the displacement and "
    "optimizer state are",
    "  checkpointed). `--ft_space digits_carry` is a one-configuration pi(C) made for it.",
    "- Downstream data `mixed-P` (`finetune --train_data mixed-10`): D_FT plus P% images of the "
    "concept.",
    "- `evaluate --compare ... --paired A:B --final_only --no-after_benign`: paired comparisons "
    "with 95%",
    "  intervals, fine-tuned models evaluated after the last step, harmful rate only.",
]
rows += [
    "",
    "## Downstream fine-tuning (`python -m resalign_fast.finetune`)",
    "",
    "The same mechanism (flags, `--config` TOML, errors naming the key); flag names follow",
    "the diffusers scripts. `--deepspeed JSON` runs the update with a DeepSpeed engine",
    "(docs/real_sd.md).",
    "",
]
rows += table(FinetuneConfig)
rows += [
    "",
    "## Evaluation (`python -m resalign_fast.evaluate`)",
    "",
    "Modes `--compare LABEL=PATH[,PATH] ...` and `--sweep LABEL=PATH[,PATH] ...`",
    "(docs/evaluation.md).",
    "",
]
rows += table(EvalConfig)
Path("docs/configuration.md").write_text("\n".join(rows) + "\n")
print("wrote docs/configuration.md")
