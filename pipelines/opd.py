"""Stage 2: multi-teacher on-policy distillation with MAR.

    python -m pipelines.opd --config configs/tiny_opd.yaml [--resume] [key=value ...]
    ray job submit --working-dir . -- python -m pipelines.opd --config my.yaml

Starts a local Ray instance unless `ray_address` (or RAY_ADDRESS, as under `ray job submit`) names one.
"""
import sys

from flowopd.config import OPDConfig
from pipelines.launch import run_job


def main(argv=None) -> int:
    return run_job(argv, __doc__, OPDConfig, "actors.opd_trainer:OPDTrainer")


if __name__ == "__main__":
    sys.exit(main())
