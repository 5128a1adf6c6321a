"""Downstream fine-tuning: `python -m resalign_fast.finetune [--config ft.toml] [--flag value ...]`.

Fine-tunes any model the project produces (a train run's `outputs/<run>/model/` or the run folder, a
diffusers folder, a .safetensors file) or the embedded base ("digits") the way users do, following
the diffusers scripts (train_text_to_image, train_dreambooth, their LoRA variants). Writes
output_dir/config.toml, log.jsonl (one line per step: loss, instance_loss, prior_loss, lr,
grad_norm), checkpoints/last.pt (for --resume, every --checkpoint_every steps) and model/ (a
diffusers folder; LoRA runs also get model/lora/). See `eval/downstream.py` and `eval/ft_run.py`.

An existing, non-empty --output_dir is refused unless --resume continues the run in it (same
settings; the result equals an uninterrupted run). Every save (model/, checkpoint-<step>/) first
checks the model: finite weights and a finite, bounded output on a probe batch; model/ is written
to a temporary folder and renamed, so it is complete or absent.

Exit status: 0 done; 2 bad input (one `error:` line, nothing written); 3 numerical failure (a
non-finite loss, or non-finite / exploding weights or outputs: nothing saved).

Examples:
    python -m resalign_fast.finetune --pretrained_model_name_or_path outputs/resalign-7-s0 \\
        --output_dir outputs/ft
    python -m resalign_fast.finetune --algorithm lora --rank 8 --learning_rate 1e-4 \\
        --train_data benign-all
    python -m resalign_fast.finetune --deepspeed examples/ds_config.json \\
        --train_data data/benign  # ZeRO 2
    python -m resalign_fast.finetune --loss dreambooth --train_data digit-3 \\
        --instance_prompt "a sks digit" --class_prompt "a handwritten digit" --prior_loss_weight 1
"""

from __future__ import annotations

import logging
import sys

from resalign_fast.cli import parse_dataclass
from resalign_fast.config import ConfigError
from resalign_fast.data.sets import DataError
from resalign_fast.eval.downstream import FinetuneConfig, FinetuneDiverged, FinetuneError
from resalign_fast.eval.ft_run import run
from resalign_fast.models.pipeline import ModelError
from resalign_fast.runs import RunError, exit_status


def _deepspeed_flag(p) -> None:
    p.add_argument(
        "--deepspeed",
        default=None,
        metavar="JSON",
        help="run the update with a DeepSpeed engine of this config (docs/real_sd.md)",
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit status 0 done, 2 bad input, 3 numerical failure (nothing saved)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def body():
        cfg, ns = parse_dataclass(
            FinetuneConfig,
            argv,
            description=__doc__,
            extra=_deepspeed_flag,
            prog="python -m resalign_fast.finetune",
        )
        if ns.deepspeed:
            from resalign_fast.eval.deepspeed_ft import run_deepspeed_finetune

            return run_deepspeed_finetune(cfg, ns.deepspeed)
        return run(cfg)

    bad_input = (ConfigError, DataError, FinetuneError, ModelError, RunError, FileNotFoundError)
    return exit_status(body, bad_input, numerical=(FinetuneDiverged,))


if __name__ == "__main__":
    sys.exit(main())
