"""Cold start (paper §5.1): the student's starting point from the teachers.

    python -m pipelines.cold_start --config configs/tiny_cold_start.yaml [--force] [key=value ...]

method merge: weighted merge of the teacher LoRAs (merge.method: cat = exact, svd = exact truncated to
rank, fuse = exact merged into the base weights, linear = the released code's factor averaging); writes
a peft adapter directory (for `student.init_adapter`) or, for fuse, a model directory (for
`student.base`), with merge_report.json. method sft: flow-matching fine-tuning on samples of each task's
teacher for its own prompts; exports an adapter. A finished output is never overwritten without --force.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

from flowopd.config import ColdStartConfig, ConfigError
from pipelines.grpo import export_adapter
from pipelines.launch import load_job, run_job


def run_merge(cfg: ColdStartConfig) -> dict:
    from flowopd.merge import MergeError, merge, normalise_weights
    from flowopd.models import check_adapter_fits
    names = sorted(cfg.teachers)
    for name in names:
        try:
            check_adapter_fits(cfg.teachers[name].adapter, cfg.model.base)
        except (OSError, ValueError) as e:
            raise ConfigError(f"teachers.{name}.adapter: {e}") from None
    weights = [1.0] * len(names) if cfg.merge.weights is None else [cfg.merge.weights[n] for n in names]
    try:
        weights = normalise_weights(weights, cfg.merge.normalize)
        return merge(cfg.model.base, {n: cfg.teachers[n].adapter for n in names}, weights, cfg.merge.method,
                     cfg.output_path(), cfg.merge.rank)
    except MergeError as e:
        raise ConfigError(f"merge: {e}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--force", action="store_true", help="replace an existing finished output")
    ap.add_argument("--resume", action="store_true", help="sft: continue from the newest checkpoint")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load_job(args.config, args.overrides, ColdStartConfig)
        out = Path(cfg.output_path())
        if out.exists():
            if not args.force:
                raise ConfigError(f"{out} already holds a finished cold start; pass --force to replace it")
            shutil.rmtree(out)
        if cfg.method == "merge":
            report = run_merge(cfg)
            print(json.dumps({"output": str(out), **report}))
            return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--force"]
    return run_job(rest, __doc__, ColdStartConfig, "actors.sft_trainer:SFTTrainer",
                   finish=lambda tr: export_adapter(tr, cfg.output_path()))


if __name__ == "__main__":
    sys.exit(main())
