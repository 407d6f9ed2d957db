"""RTDMD stage 1 (AC-DMD): distil a few-step generator (a LoRA on the base, 4 CPS steps by default) from the
teacher by distribution matching, with a fake score trained online; exports the generator's EMA adapter
(`adapter/`) and the fake score (`fake_score/`), which a reward-tilted second stage starts from.

    python -m pipelines.dmd --config configs/world_dmd.yaml [--resume] [key=value ...]
"""
import sys
from pathlib import Path

from flowopd.config import DMDConfig
from pipelines.grpo import export_adapter
from pipelines.launch import run_job


def export(trainer) -> dict:
    dest = Path(trainer.cfg.export_dir or Path(trainer.cfg.output_dir) / "adapter")
    out = export_adapter(trainer, str(dest))
    fake = export_adapter(trainer, str(dest.with_name("fake_score")), trainer.fake_adapter())
    return {**out, "fake_score": fake["adapter"]}


def main(argv=None) -> int:
    return run_job(argv, __doc__, DMDConfig, "actors.dmd_trainer:DMDTrainer", finish=export)


if __name__ == "__main__":
    sys.exit(main())
