"""Stage 1: train a teacher with Flow-GRPO on one reward, or the GRPO-Mix baseline on several, and export
the result as a peft adapter directory (usable as an OPD teacher, a cold start or for serving).

    python -m pipelines.grpo --config configs/tiny_grpo.yaml [--resume] [key=value ...]
"""
import os
import shutil
import sys
from pathlib import Path

from flowopd.config import GRPOConfig
from pipelines.launch import run_job


def export_adapter(trainer, dest: str | None = None, lora: dict | None = None) -> dict:
    """Write the final (EMA if enabled) adapter, or `lora`, to export_dir, atomically replacing an older
    export."""
    from flowopd.checkpoint import save_adapter
    dest = Path(dest or getattr(trainer.cfg, "export_dir", None) or Path(trainer.cfg.output_dir) / "adapter")
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(tmp, trainer.final_adapter() if lora is None else lora, trainer.lora_cfg)
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old{os.getpid()}")
        os.replace(dest, old)
        shutil.rmtree(old)
    os.replace(tmp, dest)
    return {"adapter": str(dest)}


def main(argv=None) -> int:
    return run_job(argv, __doc__, GRPOConfig, "actors.grpo_trainer:GRPOTrainer", finish=export_adapter)


if __name__ == "__main__":
    sys.exit(main())
