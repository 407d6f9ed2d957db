"""RTDMD stage 2: tilt the few-step generator of AC-DMD (`pipelines.dmd`) toward rewards: SubGRPO on its
stochastic steps, and on its deterministic last step the AC-DMD loss (the fake score keeps training on the
generator's samples) plus, for a differentiable reward, reward back-propagation through the VAE. Exports the
generator's EMA adapter (`adapter/`) and the fake score (`fake_score/`).

    python -m pipelines.rtdmd --config configs/world_rtdmd.yaml [--resume] [key=value ...]
"""
import sys

from flowopd.config import RTDMDConfig
from pipelines.dmd import export
from pipelines.launch import run_job


def main(argv=None) -> int:
    return run_job(argv, __doc__, RTDMDConfig, "actors.rtdmd_trainer:RTDMDTrainer", finish=export)


if __name__ == "__main__":
    sys.exit(main())
