"""Resilience comparison: models x downstream fine-tuning configurations x seeds, evaluated along
the fine-tuning run; and the lr x steps sweep.

Every cell (model, configuration, fine-tuning seed) is one fine-tuning run of a fresh copy of the
model's UNet, evaluated after each of the configuration's `eval_steps` (one run serves every step);
the model before fine-tuning is evaluated once. Each result is cached as a JSON file under
`<out>/cells/`, keyed by everything that determines it (model weights' path, size and mtime, the
fine-tuning settings, the seed, the evaluator's settings), so an interrupted comparison resumes and
finished cells are reused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from resalign_fast.config import ConfigError, from_dict, load_toml
from resalign_fast.eval.downstream import FinetuneConfig, resolve_model_path
from resalign_fast.eval.ft_run import finetune
from resalign_fast.eval.metrics import mean_sem

log = logging.getLogger("resalign_fast.evaluate")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class DownstreamSpec:
    """One downstream configuration: name, finetune overrides, evaluation steps, inside pi(C) or
    not."""

    name: str
    overrides: dict
    eval_steps: tuple[int, ...]
    in_pi: bool | None = None


def load_downstream(name_or_path: str, select: tuple[str, ...] = ()) -> list[DownstreamSpec]:
    """Read [[configs]] from a TOML file or a shipped name ("digits"); keep `select` names if given.

    Raises:
        ConfigError: missing name/eval_steps, a bad finetune key or value, an unknown selected name.
    """
    p = Path(name_or_path)
    if not p.suffix:
        p = CONFIG_DIR / f"downstream_{name_or_path}.toml"
    d = load_toml(p)
    specs = []
    for i, c in enumerate(d.get("configs", [])):
        c = dict(c)
        name, steps, in_pi = c.pop("name", None), c.pop("eval_steps", None), c.pop("in_pi", None)
        if not name or not steps or not all(isinstance(s, int) and s > 0 for s in steps):
            raise ConfigError(f"{p}: configs[{i}] needs a name and eval_steps (positive integers)")
        from_dict(c, source=f"{p}: {name}", cls=FinetuneConfig)  # validate now, not mid-run
        specs.append(DownstreamSpec(name, c, tuple(sorted(set(steps))), in_pi))
    if not specs:
        raise ConfigError(f"{p}: no [[configs]]")
    if select:
        unknown = sorted(set(select) - {s.name for s in specs})
        if unknown:
            raise ConfigError(
                f"{p}: unknown configuration(s) {unknown}; have {[s.name for s in specs]}"
            )
        specs = [s for s in specs if s.name in select]
    return specs


def parse_groups(items: list[str]) -> dict[str, list[str]]:
    """["original=digits", "plain=a,b", "outputs/run"] -> {"original": ["digits"], "plain": ["a",
    "b"], "run": [...]}."""
    groups: dict[str, list[str]] = {}
    for it in items:
        label, _, paths = it.partition("=") if "=" in it else (Path(it.rstrip("/")).name, "", it)
        if not label or not paths:
            raise ConfigError(f"--compare item {it!r}: expected LABEL=PATH[,PATH...] or PATH")
        groups.setdefault(label, []).extend(x for x in paths.split(",") if x)
    return groups


def model_id(path: str) -> dict:
    """What identifies a model's weights: resolved path, and size + mtime of its UNet weights."""
    from resalign_fast.models.pipeline import DEFAULT_MODEL, DIGITS_MODEL_DIR

    p = Path(DIGITS_MODEL_DIR if path == DEFAULT_MODEL else resolve_model_path(path))
    w = p / "unet" / "diffusion_pytorch_model.safetensors"
    st = w.stat() if w.is_file() else None
    return {
        "path": str(p.resolve()),
        "size": st.st_size if st else 0,
        "mtime": int(st.st_mtime) if st else 0,
    }


class CellCache:
    """JSON results under `root`, one file per key (a dict), written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: dict) -> Path:
        return self.root / (
            hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + ".json"
        )

    def get(self, key: dict) -> dict | None:
        p = self._path(key)
        return json.loads(p.read_text())["result"] if p.is_file() else None

    def put(self, key: dict, result: dict) -> None:
        p = self._path(key)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "result": result}, indent=1))
        tmp.replace(p)


# finetune settings that manage a run but leave its result unchanged: not part of a cell's cache key
RUN_FIELDS = ("output_dir", "device", "num_threads", "checkpoint_every", "resume")


def ft_config(
    spec: DownstreamSpec, seed: int, base: FinetuneConfig, last_step: int | None = None
) -> FinetuneConfig:
    """The finetune settings of one cell (no model saved; the run lasts until the last eval
    step)."""
    d = dict(
        spec.overrides,
        seed=seed,
        max_train_steps=last_step or max(spec.eval_steps),
        save_model=False,
        checkpointing_steps="",
    )  # a cell is a throwaway run: no checkpoints
    return from_dict(d, base=base, source=spec.name)


class Runner:
    """Loads each model once and runs cached cells on fresh copies of its UNet."""

    def __init__(
        self, evaluator, out_dir: Path, base: FinetuneConfig, device: torch.device, after=None
    ) -> None:
        """after: the evaluator of fine-tuned models (default `evaluator`; e.g. harmful rate
        only)."""
        self.ev, self.base, self.device = evaluator, base, device
        self.after = after or evaluator
        self.cache = CellCache(Path(out_dir) / "cells")
        self._model, self._model_path = None, None

    def model(self, path: str):
        from resalign_fast.models.pipeline import load_model

        if self._model_path != path:
            self._model = load_model(resolve_model_path(path), device=self.device)
            self._model.unet.eval().requires_grad_(False)
            self._model_path = path
        return self._model

    def before(self, path: str) -> dict:
        """The model's metrics before any fine-tuning (cached)."""
        key = {"model": model_id(path), "eval": self.ev.settings(), "cell": "before"}
        res = self.cache.get(key)
        if res is None:
            t0 = time.time()
            res = self.ev.evaluate(self.model(path))
            log.info(
                "%s before fine-tuning: harmful %.3f (%.0f s)",
                path,
                res["harmful_rate"],
                time.time() - t0,
            )
            self.cache.put(key, res)
        return res

    def cell(
        self, path: str, spec: DownstreamSpec, seed: int, steps: tuple[int, ...] | None = None
    ) -> dict[str, dict]:
        """{step: metrics} after fine-tuning a copy of the model with `spec` and `seed` (cached)."""
        steps = steps or spec.eval_steps
        cfg = ft_config(spec, seed, self.base, max(steps))
        key = {
            "model": model_id(path),
            "eval": self.after.settings(),
            "ft": {k: v for k, v in vars(cfg).items() if k not in RUN_FIELDS},
            "steps": list(steps),
        }
        res = self.cache.get(key)
        if res is not None:
            return res
        model, t0, res = self.model(path), time.time(), {}

        def on_step(s: int, unet: torch.nn.Module) -> None:
            res[str(s)] = self.after.evaluate(model, unet)

        unet = copy.deepcopy(model.unet)
        out = finetune(cfg, model, unet=unet, callback=on_step, callback_steps=tuple(steps))
        res["_final_loss"] = out.log[-1]["loss"] if out.log else None
        res["_seconds"] = round(time.time() - t0, 1)
        log.info(
            "%s %s seed %d: harmful %s (%.0f s)",
            path,
            spec.name,
            seed,
            [round(res[str(s)]["harmful_rate"], 3) for s in steps],
            time.time() - t0,
        )
        del unet
        self.cache.put(key, res)
        return res


def run_compare(
    groups: dict[str, list[str]], specs: list[DownstreamSpec], seeds: list[int], runner: Runner
) -> dict:
    """Every (group, model, spec, seed) cell. Returns the raw results:
    {group: {model: {"before": metrics, "after": {spec: {seed: {step: metrics}}}}}}."""
    raw: dict = {}
    for label, paths in groups.items():
        for path in paths:
            entry = raw.setdefault(label, {}).setdefault(
                path, {"before": runner.before(path), "after": {}}
            )
            for spec in specs:
                for seed in seeds:
                    entry["after"].setdefault(spec.name, {})[str(seed)] = runner.cell(
                        path, spec, seed
                    )
    return raw


def paired(
    raw: dict,
    specs: list[DownstreamSpec],
    a: str,
    b: str,
    n_images: int,
    metric: str = "harmful_rate",
) -> dict:
    """Group a against group b, pair by pair: model i of a with model i of b (give both groups'
    models in the same seed order), each fine-tuning seed with itself. {spec: {"before": stats,
    "after": stats}} with `metrics.paired_stats` of the metric before fine-tuning (per model) and
    after the last step.

    Raises:
        ConfigError: a group is missing or the groups hold different numbers of models.
    """
    from resalign_fast.eval.metrics import paired_stats

    if a not in raw or b not in raw:
        raise ConfigError(
            f"paired: groups {a!r} and {b!r} must both be compared (have {sorted(raw)})"
        )
    ma, mb = list(raw[a].values()), list(raw[b].values())
    if len(ma) != len(mb):
        raise ConfigError(
            f"paired: {a!r} has {len(ma)} models and {b!r} {len(mb)}: pair them one to one"
        )
    out = {}
    for spec in specs:
        last = str(max(spec.eval_steps))
        xs, ys = [], []
        for ea, eb in zip(ma, mb):
            for seed, cell in ea["after"][spec.name].items():
                xs.append(cell[last][metric])
                ys.append(eb["after"][spec.name][seed][last][metric])
        entry = {
            "after": paired_stats(xs, ys, n_images) if len(xs) >= 2 else None,
            "a_after": xs,
            "b_after": ys,
        }
        if len(ma) >= 2:
            entry["before"] = paired_stats(
                [e["before"][metric] for e in ma], [e["before"][metric] for e in mb], n_images
            )
        out[spec.name] = entry
    return out


def _stat(per_model: list[list[float]]) -> dict:
    """Mean over all values; SE across model means when there are >= 2 models, else across seeds."""
    flat = [v for vs in per_model for v in vs]
    m, _, n = mean_sem(flat)
    if len(per_model) >= 2:
        _, se, _ = mean_sem([sum(vs) / len(vs) for vs in per_model])
    else:
        _, se, _ = mean_sem(flat)
    return {"mean": m, "sem": se, "n": n, "n_models": len(per_model)}


METRICS = ("harmful_rate", "benign_accuracy", "fd")


def summarize(raw: dict, specs: list[DownstreamSpec]) -> dict:
    """{group: {spec: {step: {metric: {"mean", "sem", "n", "n_models"}}}}}; step "0" is before
    fine-tuning."""
    out: dict = {}
    for label, models in raw.items():
        for spec in specs:
            rows = out.setdefault(label, {}).setdefault(spec.name, {})
            for step in (0,) + spec.eval_steps:
                for metric in METRICS:
                    per_model = []
                    for entry in models.values():
                        if step == 0:
                            vals = [entry["before"].get(metric)]
                        else:
                            vals = [
                                cell[str(step)].get(metric)
                                for cell in entry["after"][spec.name].values()
                            ]
                        vals = [v for v in vals if v is not None]
                        if vals:
                            per_model.append(vals)
                    if per_model:
                        rows.setdefault(str(step), {})[metric] = _stat(per_model)
    return out


def run_sweep(
    groups: dict[str, list[str]],
    lrs: list[float],
    steps: list[int],
    algorithms: list[str],
    seeds: list[int],
    runner: Runner,
    overrides: dict,
) -> dict:
    """Harmful rate over lr x steps (x algorithm): {group: {algorithm: {lr: {step: {"mean", "sem",
    "n"}}}}}.

    One fine-tuning run per (model, algorithm, lr, seed) serves every step count.
    """
    out: dict = {}
    for label, paths in groups.items():
        for alg in algorithms:
            for lr in lrs:
                vals: dict[int, list[list[float]]] = {s: [] for s in steps}
                for path in paths:
                    spec = DownstreamSpec(
                        f"sweep-{alg}-{lr:g}",
                        dict(overrides, algorithm=alg, learning_rate=lr),
                        tuple(steps),
                    )
                    per_seed = [runner.cell(path, spec, seed) for seed in seeds]
                    for s in steps:
                        vals[s].append([c[str(s)]["harmful_rate"] for c in per_seed])
                out.setdefault(label, {}).setdefault(alg, {})[f"{lr:g}"] = {
                    str(s): _stat(v) for s, v in vals.items()
                }
            before = [[runner.before(p)["harmful_rate"]] for p in paths]
            out[label].setdefault("_before", _stat(before))
    return out


__all__ = [
    "DownstreamSpec",
    "load_downstream",
    "parse_groups",
    "Runner",
    "run_compare",
    "summarize",
    "run_sweep",
    "paired",
    "CellCache",
    "ft_config",
]
