"""Stage 2: multi-teacher on-policy distillation with MAR.

    python -m pipelines.opd --config configs/tiny_opd.yaml [--resume] [key=value ...]
    ray job submit --working-dir . -- python -m pipelines.opd --config my.yaml

Starts a local Ray instance unless `ray_address` (or RAY_ADDRESS, as under `ray job submit`) names one.
"""
import argparse
import json
import logging
import os
import sys

import ray

from actors.opd_trainer import OPDTrainer
from actors.resources import check_cluster_resources, requested_resources
from flowopd.checkpoint import CheckpointManager
from flowopd.config import ConfigError, load_config
from flowopd.data import DataError
from flowopd.preflight import preflight
from flowopd.tiny import ensure_tiny_assets


def init_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                        "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}}
    if address:
        ray.init(address=address, runtime_env=env, logging_level=logging.WARNING)
    else:  # a private local instance on loopback
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, runtime_env=env,
                 logging_level=logging.WARNING)


def describe(cfg, sources) -> str:
    """A short plan of the job: data, routing and what each actor group asks of the cluster."""
    lines = [(f"data: {sum(len(s) for s in sources)} prompts from {len(sources)} sources; "
             f"{cfg.data.prompts_per_step} prompts x {cfg.data.group_size} samples per step"),
             "route: " + ", ".join(f"{k} -> {v}" for k, v in cfg.route.items())
             + (f"; MAR {cfg.mar.teacher} (lambda {cfg.mar.weight})" if cfg.mar.teacher else "; no MAR")]
    lines += [f"{k}: " + ", ".join(f"{v:g} {r}" for r, v in asked.items() if v)
              for k, asked in requested_resources(cfg).items()]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML job configuration")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to JSONL)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    return ap.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.tiny_assets:
            ensure_tiny_assets(cfg.tiny_assets)
        sources = preflight(cfg)
        existing = CheckpointManager(f"{cfg.output_dir}/checkpoints").latest()
        if existing is not None and not args.resume:
            raise ConfigError(f"output_dir: {existing} already exists; pass --resume to continue that run or "
                              f"choose another output_dir (nothing was changed)")
        init_ray(cfg.ray_address)
        check_cluster_resources(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(cfg, sources), file=sys.stderr)
    trainer = OPDTrainer(cfg, sources)
    if args.resume:
        step = trainer.resume()
        print(f"resumed at step {step}" if step else "no checkpoint found; starting at step 0", file=sys.stderr)
    history = trainer.run(progress=not args.no_progress)
    final = trainer.ckpt.latest()
    print(json.dumps({"final_checkpoint": str(final), "steps": trainer.step_done,
                      "last_loss": history[-1]["loss"] if history else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
