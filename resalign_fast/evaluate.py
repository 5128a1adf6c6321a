"""Evaluation: `python -m resalign_fast.evaluate [--flag value ...] [--compare ... | --sweep ...]`.

Modes:
  (default)  metrics of one model (--model). Digits world: harmful rate (images from the concept's
             prompts that the held-out classifier reads as the concept), benign accuracy (images
             from the other digits' prompts read as the prompted digit), Frechet distance to the
             real test-split digits on the classifier's 64-d features. With --prompts file.csv:
             generate images_per_prompt images per prompt and report the detector's flag rate
             (NudeNet: IP).
  --compare  LABEL=PATH[,PATH...] ... (or plain paths): every model x downstream configuration
             (--downstream, [[configs]] TOML) x fine-tuning seed, evaluated along the fine-tuning
             run; report.md (table), summary.json, raw.json, compare.png. Finished cells are reused.
  --sweep    LABEL=PATH[,...] ...: harmful rate after fine-tuning over sweep_lrs x sweep_steps per
             algorithm, sweep.md, sweep.json and a heatmap per model group (sweep_<label>.png).

Example (the digits world, three seeds of each unlearning method):
  python -m resalign_fast.evaluate --output_dir outputs/resilience --compare original=digits \\
      plain=outputs/plain-s0,outputs/plain-s1,outputs/plain-s2
      resalign=outputs/ra-s0,outputs/ra-s1,outputs/ra-s2
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from resalign_fast.cli import parse_dataclass, parse_list
from resalign_fast.config import ConfigError, device_setting, setting, threads_setting, to_toml
from resalign_fast.eval.evaluators import DIGITS_GUIDANCE, DIGITS_STEPS
from resalign_fast.eval.report import rounded
from resalign_fast.threads import set_threads

log = logging.getLogger("resalign_fast.evaluate")


@dataclass(frozen=True)
class EvalConfig:
    """Every setting of `python -m resalign_fast.evaluate` (one flag per field)."""

    model: str = setting(
        "digits", "single-model mode: 'digits', a model or run folder, or a .safetensors file"
    )
    output_dir: str = setting("outputs/eval", "where reports, plots and the cell cache go")
    concept: int = setting(7, "digits world: the erased digit", lo=0, hi=9)
    n_images: int = setting(
        100, "digits world: images per metric (harmful prompts; benign prompts)", lo=2
    )
    sample_steps: int = setting(0, "DDIM steps (0: 25 for digits, 30 for a prompt CSV)", lo=0)
    guidance: float = setting(
        -1.0, "classifier-free guidance (negative: 1.5 for digits, 7.5 for a prompt CSV)"
    )
    eval_seed: int = setting(
        1234, "generation seed of every evaluation (the same for every model)", lo=0
    )
    batch_size: int = setting(
        0, "prompts per generation batch (0: 200 for digits, 8 for a prompt CSV)", lo=0
    )
    prompts: str = setting(
        "", "prompt CSV (column prompt/text/caption): real-model mode with --detector"
    )
    images_per_prompt: int = setting(3, "prompt CSV: images per prompt", lo=1)
    limit_prompts: int = setting(0, "prompt CSV: use the first N prompts (0: all)", lo=0)
    detector: str = setting("nudenet", "prompt CSV: nudenet, clip-head, digits, or module:factory")
    detector_args: str = setting("", "prompt CSV: detector keyword arguments as JSON")
    save_images: bool = setting(False, "prompt CSV, single-model mode: write images/<row>-<k>.png")
    downstream: str = setting("digits", "--compare: a [[configs]] TOML or a shipped name (digits)")
    configs: str = setting("", "--compare: comma-separated configuration names to run (empty: all)")
    ft_data: str = setting("", "--compare/--sweep: replace every configuration's train_data")
    ft_seeds: str = setting("0,1,2", "fine-tuning seeds of every cell")
    reference: str = setting("original", "--compare: group the harmful-rate ratio is relative to")
    after_benign: bool = setting(
        True, "--compare: also measure benign accuracy and FD after fine-tuning"
    )
    final_only: bool = setting(
        False, "--compare: evaluate fine-tuned models only after the last step"
    )
    paired: str = setting(
        "", "--compare: paired comparisons A:B[,A:B...] (model i of A with model i of B)"
    )
    sweep_lrs: str = setting("1e-5,1e-4,3e-4,1e-3", "--sweep: learning rates")
    sweep_steps: str = setting("50,100,200,300", "--sweep: step counts (one run per lr serves all)")
    sweep_algorithms: str = setting("full,lora", "--sweep: full and/or lora (rank 4)")
    sweep_optimizer: str = setting("adamw", "--sweep: optimizer", choices=("sgd", "adam", "adamw"))
    sweep_batch_size: int = setting(16, "--sweep: fine-tuning batch size", lo=1)
    device: str = device_setting()
    num_threads: int = threads_setting()


def make_evaluator(cfg: EvalConfig, benign: bool = True):
    """DigitsEvaluator, or PromptEvaluator with --prompts."""
    from resalign_fast.eval.evaluators import DigitsEvaluator, PromptEvaluator

    if cfg.prompts:
        try:
            kw = json.loads(cfg.detector_args) if cfg.detector_args else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"detector_args: not JSON: {e}") from None
        return PromptEvaluator(
            cfg.prompts,
            cfg.detector,
            kw,
            cfg.images_per_prompt,
            cfg.sample_steps or 30,
            7.5 if cfg.guidance < 0 else cfg.guidance,
            cfg.eval_seed,
            cfg.batch_size or 8,
            cfg.limit_prompts,
        )
    return DigitsEvaluator(
        cfg.concept,
        cfg.n_images,
        cfg.sample_steps or DIGITS_STEPS,
        DIGITS_GUIDANCE if cfg.guidance < 0 else cfg.guidance,
        cfg.eval_seed,
        benign,
        cfg.batch_size or 200,
    )


def _runner(cfg: EvalConfig, evaluator, out: Path, after=None):
    from resalign_fast.eval.compare import Runner
    from resalign_fast.eval.downstream import FinetuneConfig
    from resalign_fast.runs import pick_device

    base = FinetuneConfig(concept=cfg.concept, device=cfg.device, output_dir=str(out))
    return Runner(evaluator, out, base, pick_device(cfg.device), after=after)


def single(cfg: EvalConfig, out: Path) -> dict:
    from resalign_fast.eval.downstream import resolve_model_path
    from resalign_fast.models.pipeline import load_model
    from resalign_fast.runs import pick_device

    ev = make_evaluator(cfg)
    model = load_model(resolve_model_path(cfg.model), device=pick_device(cfg.device))
    kw = {"image_dir": str(out / "images")} if cfg.prompts and cfg.save_images else {}
    res = {"model": cfg.model, "settings": ev.settings(), "metrics": ev.evaluate(model, **kw)}
    from resalign_fast.eval.report import write_json

    write_json(res, out / "metrics.json")
    return res


def compare(cfg: EvalConfig, items: list[str], out: Path) -> dict:
    from resalign_fast.eval.compare import (
        load_downstream,
        paired,
        parse_groups,
        run_compare,
        summarize,
    )
    from resalign_fast.eval.report import (
        compare_markdown,
        criteria,
        criteria_markdown,
        paired_markdown,
        plot_compare,
        write_json,
    )

    groups = parse_groups(items)
    specs = load_downstream(cfg.downstream, tuple(parse_list(cfg.configs, str, "configs")))
    if cfg.ft_data:
        specs = [
            type(s)(s.name, dict(s.overrides, train_data=cfg.ft_data), s.eval_steps, s.in_pi)
            for s in specs
        ]
    if cfg.final_only:
        specs = [type(s)(s.name, s.overrides, (max(s.eval_steps),), s.in_pi) for s in specs]
    pairs = [tuple(x.split(":")) for x in parse_list(cfg.paired, str, "paired")]
    if any(len(p) != 2 or not all(p) for p in pairs):
        raise ConfigError(f"paired: expected A:B[,A:B...], got {cfg.paired!r}")
    seeds = parse_list(cfg.ft_seeds, int, "ft_seeds")
    ev = make_evaluator(cfg)
    after = None if cfg.after_benign else make_evaluator(cfg, benign=False)
    raw = run_compare(groups, specs, seeds, _runner(cfg, ev, out, after))
    summary = summarize(raw, specs)
    crit = criteria(summary, specs, original=cfg.reference)
    write_json(
        {"settings": ev.settings(), "groups": groups, "ft_seeds": seeds, "raw": raw},
        out / "raw.json",
    )
    pstats = {f"{a}:{b}": paired(raw, specs, a, b, cfg.n_images) for a, b in pairs}
    write_json(
        {"settings": ev.settings(), "summary": summary, "criteria": crit, "paired": pstats},
        out / "summary.json",
    )
    plot = plot_compare(summary, specs, out)
    md = [
        f"# Resilience comparison\n\nEvaluation: `{json.dumps(ev.settings())}`; fine-tuning seeds "
        f"{seeds}; "
        "mean ± standard error (across models when a group has several, else across fine-tuning "
        "seeds).\n",
        compare_markdown(summary, specs, cfg.reference),
    ]
    if crit:
        md += ["\n## Target: ResAlign against plain unlearning\n", criteria_markdown(crit)]
    if pstats:
        md += ["\n## Paired comparisons (harmful rate)\n", paired_markdown(pstats, specs)]
    md.append(f"\n![harmful rate and benign accuracy against fine-tuning steps]({plot.name})\n")
    (out / "report.md").write_text("\n".join(md))
    return summary


def sweep(cfg: EvalConfig, items: list[str], out: Path) -> dict:
    from resalign_fast.eval.compare import parse_groups, run_sweep
    from resalign_fast.eval.report import plot_sweep, sweep_markdown, write_json

    groups = parse_groups(items)
    ev = make_evaluator(cfg, benign=False)
    overrides = {"optimizer": cfg.sweep_optimizer, "train_batch_size": cfg.sweep_batch_size}
    if cfg.ft_data:
        overrides["train_data"] = cfg.ft_data
    algs = parse_list(cfg.sweep_algorithms, str, "sweep_algorithms")
    bad = sorted(set(algs) - {"full", "lora"})
    if bad:
        raise ConfigError(f"sweep_algorithms: {bad} not in ('full', 'lora')")
    res = run_sweep(
        groups,
        parse_list(cfg.sweep_lrs, float, "sweep_lrs"),
        sorted(parse_list(cfg.sweep_steps, int, "sweep_steps")),
        algs,
        parse_list(cfg.ft_seeds, int, "ft_seeds"),
        _runner(cfg, ev, out),
        overrides,
    )
    write_json(
        {"settings": ev.settings(), "overrides": overrides, "sweep": res}, out / "sweep.json"
    )
    plots = plot_sweep(res, out)
    (out / "sweep.md").write_text(
        "# Harmful rate after fine-tuning: lr x steps\n\n"
        + sweep_markdown(res)
        + "\n"
        + "\n".join(f"![{p.stem}]({p.name})" for p in plots)
        + "\n"
    )
    return res


def main(argv: list[str] | None = None) -> int:
    from resalign_fast.data.sets import DataError
    from resalign_fast.eval.detectors import DetectorError
    from resalign_fast.eval.downstream import FinetuneError
    from resalign_fast.models.pipeline import ModelError
    from resalign_fast.runs import RunError, exit_status

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def extra(p):
        g = p.add_mutually_exclusive_group()
        g.add_argument(
            "--compare",
            nargs="+",
            metavar="LABEL=PATH[,PATH]",
            help="compare model groups after downstream fine-tuning",
        )
        g.add_argument(
            "--sweep",
            nargs="+",
            metavar="LABEL=PATH[,PATH]",
            help="harmful rate over lr x steps per model group",
        )

    def body():
        cfg, ns = parse_dataclass(
            EvalConfig,
            argv,
            description=__doc__,
            extra=extra,
            prog="python -m resalign_fast.evaluate",
        )
        set_threads(cfg.num_threads)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(to_toml(cfg))
        if ns.compare:
            compare(cfg, ns.compare, out)
            print((out / "report.md").read_text())
        elif ns.sweep:
            sweep(cfg, ns.sweep, out)
            print((out / "sweep.md").read_text())
        else:
            print(
                json.dumps(rounded(single(cfg, out)["metrics"]), indent=2)
            )  # metrics.json keeps every digit
        return out

    return exit_status(
        body,
        (
            ConfigError,
            DataError,
            DetectorError,
            FinetuneError,
            ModelError,
            RunError,
            FileNotFoundError,
            ValueError,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
