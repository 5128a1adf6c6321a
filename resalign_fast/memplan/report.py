"""The planner's human-readable report: a table in GiB, failures as footnotes, the summary."""

from __future__ import annotations

from resalign_fast.memplan.recipes import HVP_BACKENDS

GIB = 2**30
PAPER_PEAK_GB = 56  # ResAlign paper: "peak 56 GB" on one A100 (GB = 1e9 bytes assumed)


def max_peak(peaks: list[dict], algo: str | None = None) -> int | None:
    """Largest peak over configurations (of `algo`); None when any of them failed."""
    vals = [p["peak"] for p in peaks if algo is None or p["config"].startswith(algo + "-")]
    return None if not vals or any(v is None for v in vals) else max(vals)


def _short(config: str) -> str:
    algo, optim, loss = config.split("-")
    return f"{algo[0].upper()}/{optim}" + ("/db" if loss == "dreambooth" else "")


def _gib(v: int | None) -> str:
    return "n/a" if v is None else f"{v / GIB:.2f}"


# known causes of a failed trace, by a piece of torch's message: (piece, what it means)
REASONS = (
    (
        "saved tensor hooks",
        "forward-mode (jvp) HVPs cannot run under activation recomputation: torch's "
        "checkpointing relies on saved-tensor hooks, which forward AD does not support",
    ),
    (
        "meta tensor",
        "the step reads tensor values, which the planner's meta tensors do not hold (a gap in the "
        "planner, not a memory limit)",
    ),
    ("out of memory", "the trace itself ran out of host memory"),
)


def readable(error: str) -> str:
    """A failed trace's footnote: the reason in words when it is a known one, then torch's own
    text."""
    raw = " ".join(error.split())
    raw = raw if len(raw) <= 160 else raw[:157] + "..."
    for piece, why in REASONS:
        if piece in error.lower():
            return f"{why} (torch: {raw})"
    return raw


def format_table(out: dict) -> str:
    """The human-readable report: a table in GiB, failures as footnotes, then the summary."""
    rows = out["rows"]
    names = [_short(p["config"]) for p in rows[0]["configs"]] if rows else []
    w = max([len("recipe")] + [len(r["recipe"]["name"]) for r in rows])
    lines = [
        f"Estimated peak GPU memory (GiB) of one outer step: {out['model']}, {out['resolution']} "
        f"px, "
        f"batch {out['batch']}, K={out['iters']}, the trainer's step"
        + (f" (guard {out['guard']})" if out.get("guard") else "")
        + f" ({out['target']} kernels, {out['block']} B blocks)",
        "",
    ]
    head = (
        f"{'recipe':<{w}} "
        + " ".join(f"{n:>{max(len(n), 6)}}" for n in names)
        + "  max-lora  max-all"
    )
    lines += [head, "-" * len(head)]
    notes: list[str] = []
    for r in rows:
        cells = []
        for p in r["configs"]:
            cell = _gib(p["peak"])
            if p["peak"] is None:
                note = readable(p["error"])
                if note not in notes:
                    notes.append(note)
                cell += f"[{notes.index(note) + 1}]"
            cells.append(f"{cell:>{max(len(_short(p['config'])), 6)}}")
        lines.append(
            f"{r['recipe']['name']:<{w}} "
            + " ".join(cells)
            + f"  {_gib(max_peak(r['configs'], 'lora')):>8}  {_gib(max_peak(r['configs'])):>7}"
        )
    lines += [
        "columns: L = LoRA, F = full-parameter fine-tuning; sgd/adam; db = DreamBooth (two forward "
        "passes)"
    ]
    lines += [f"[{i + 1}] {n}" for i, n in enumerate(notes)]
    s = out["summary"]
    lines.append("")
    traced = [p["config"] for p in rows[0]["configs"]] if rows else []
    scope = "LoRA configs" if s.get("complete", True) else "traced LoRA configs"
    if "reference" in s and "ratio_to_paper" in s["reference"]:
        ref = s["reference"]
        lines.append(
            f"reference recipe: {ref['max_bytes'] / 1e9:.1f} GB ({_gib(ref['max_bytes'])} GiB) at "
            f"its "
            f"largest configuration; the paper reports {PAPER_PEAK_GB} GB: ratio "
            f"{ref['ratio_to_paper']:.2f} "
            f"(gap {(ref['ratio_to_paper'] - 1) * 100:+.0f}%). LoRA configurations only: "
            f"{_gib(ref['max_lora_bytes'])} GiB."
        )
    elif "reference" in s:
        lines.append(
            f"reference recipe: {_gib(s['reference']['max_bytes'])} GiB at most over the traced "
            f"configurations ({', '.join(traced)}); trace --configs all to compare with the paper"
        )
    ref_l = _gib(s["reference"]["max_lora_bytes"]) if "reference" in s else "n/a"
    ref_a = _gib(s["reference"]["max_bytes"]) if "reference" in s else "n/a"
    for hvp in HVP_BACKENDS:
        b = s.get(f"best_lora_{hvp}")
        if b:
            tgt = ""
            if b["target_gib"] is not None and b["meets"] is not None:
                tgt = f", target <= {b['target_gib']:g} GiB: " + (
                    "met" if b["meets"] else "NOT met"
                )
            lines.append(
                f"{scope}, {hvp} HVPs: best {b['recipe']} {_gib(b['bytes'])} GiB "
                f"(reference {ref_l}){tgt}"
            )
    if "best_whole" in s:
        b = s["best_whole"]
        lines.append(
            f"all configs incl. full-parameter: best {b['recipe']} {_gib(b['bytes'])} GiB "
            f"(reference {ref_a}), target <= {b['target_gib']:g} GiB: "
            f"{'met' if b['meets'] else 'NOT met'}"
        )
    lines.append(f"traced in {out['seconds']:.0f} s")
    return "\n".join(lines)
