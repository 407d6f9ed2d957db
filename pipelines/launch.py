"""What the training jobs share: Ray start-up, the command line, pre-flight checks, resume and run."""
import argparse
import json
import logging
import os
import sys

import ray

from actors.resources import check_cluster_resources, requested_resources
from flowopd.checkpoint import CheckpointManager
from flowopd.config import MIN_SAMPLES_PER_UPDATE, ConfigError, load_config
from flowopd.data import DataError
from flowopd.tiny import ensure_tiny_assets
from pipelines.preflight import preflight


def setup_logging() -> None:
    """One format for every pipeline's status lines: `[component] message` on stderr."""
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stderr, force=True)


def init_ray(address: str | None) -> None:
    """Join `address` (or RAY_ADDRESS, as under `ray job submit`), else start a private local instance."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                        "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}}
    if address:
        ray.init(address=address, runtime_env=env, logging_level=logging.WARNING)
    else:
        # "local" always starts a private instance: never attach to (or wait for) a cluster recorded by an
        # earlier `ray start` that may be dead
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, runtime_env=env,
                 logging_level=logging.WARNING)


def describe(cfg, sources) -> str:
    """A short plan of the job: data, who labels or scores what, and what each actor group asks for."""
    lines = [(f"data: {sum(len(s) for s in sources)} prompts from {len(sources)} sources ({cfg.data.mixing}); "
              f"{cfg.data.prompts_per_step} prompts x {cfg.data.group_size} samples per step")]
    if hasattr(cfg, "route"):
        mar = getattr(cfg, "mar", None)
        lines.append("route: " + ", ".join(f"{k} -> {v}" for k, v in cfg.route.items())
                     + (f"; MAR {mar.teacher} (lambda {mar.weight})" if mar and mar.teacher else ""))
    else:
        lines.append("rewards: " + ", ".join(f"{r.key} x{r.weight:g} on {r.tasks or 'all tasks'}" for r in cfg.rewards))
        n = cfg.samples_per_update()
        lines.append(f"{n:g} samples per optimizer step (Flow-GRPO: 576)" + (
            f"; below {MIN_SAMPLES_PER_UPDATE} a GRPO update on a sparse reward is mostly noise: raise "
            f"data.prompts_per_step or lower grpo.minibatches" if n < MIN_SAMPLES_PER_UPDATE else ""))
    lines += [f"{k}: " + ", ".join(f"{v:g} {r}" for r, v in asked.items() if v)
              for k, asked in requested_resources(cfg).items()]
    return "\n".join(lines)


def parse_args(doc: str, argv=None):
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML job configuration")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to JSONL)")
    ap.add_argument("--check", action="store_true",
                    help="validate the config, its files and Hub ids, print the plan and stop (no Ray, no GPU)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    return ap.parse_intermixed_args(argv)


def run_job(argv, doc: str, config_cls, trainer_cls, finish=None) -> int:
    """Validate everything, then train (resuming on request); `finish(trainer)` runs after the last step."""
    args = parse_args(doc, argv)
    try:
        cfg = load_config(args.config, args.overrides, config_cls)
        if cfg.tiny_assets:
            ensure_tiny_assets(cfg.tiny_assets)
        sources = preflight(cfg)
        if args.check:
            print(describe(cfg, sources), file=sys.stderr)
            return 0
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
    print(json.dumps(train(cfg, sources, trainer_cls, args.resume, not args.no_progress, finish)))
    return 0


def train(cfg, sources, trainer_cls, resume: bool, progress: bool = True, finish=None) -> dict:
    """Run one training job to its last step (from its newest checkpoint when resuming), release its
    actors, and return a summary (plus whatever `finish(trainer)` adds)."""
    trainer = trainer_cls(cfg, sources)
    try:
        if resume:
            step = trainer.resume()
            print(f"resumed at step {step}" if step else "no checkpoint found; starting at step 0", file=sys.stderr)
        history = trainer.run(progress=progress)
        summary = {"final_checkpoint": str(trainer.ckpt.latest()), "steps": trainer.step_done,
                   "last_loss": history[-1]["loss"] if history else None}
        if finish is not None:
            summary.update(finish(trainer))
        return summary
    finally:
        trainer.shutdown()
