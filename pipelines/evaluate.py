"""Score models (base, teachers, students) on held-out prompts per task, like the paper's Table 2.

    python -m pipelines.evaluate --config configs/tiny_eval.yaml [key=value ...]

ODE sampling with its own step count (paper: 40) and fixed seeds: every model sees the same noise for
the same prompt and sample. Writes results.parquet (one row per image: model, prompt, task, seed and
every reward output), summary.json and summary.md (mean per model and reward over the tasks each reward
applies to, plus per task), and grids/<model>/<task>.png.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image

from actors.resources import check_cluster_resources
from actors.reward import RewardPools
from actors.sampler import Sampler
from flowopd.config import ConfigError, EvalConfig, load_config
from flowopd.data import DataError
from flowopd.models import check_adapter_fits
from flowopd.preflight import check_reward_specs, read_sources
from flowopd.tiny import ensure_tiny_assets
from pipelines.launch import init_ray


def load_prompts(cfg: EvalConfig):
    return [r for recs in read_sources(cfg.data.sources) for r in recs[:cfg.data.max_prompts_per_source]]


def preflight_eval(cfg: EvalConfig):
    if not Path(cfg.model.base).exists():
        raise ConfigError(f"model.base: {cfg.model.base} does not exist")
    for name, m in cfg.models.items():
        if m.adapter:
            try:
                check_adapter_fits(m.adapter, cfg.model.base)
            except (OSError, ValueError) as e:
                raise ConfigError(f"models.{name}.adapter: {e}") from None
        elif m.transformer and not Path(m.transformer).exists():
            raise ConfigError(f"models.{name}.transformer: {m.transformer} does not exist")
    check_reward_specs(cfg.rewards)
    records = load_prompts(cfg)
    for r in records:
        if not any(s.applies_to(r.task) for s in cfg.rewards):
            raise ConfigError(f"rewards: no reward applies to task {r.task!r} (prompt {r.prompt!r})")
    return records


def image_grid(images: np.ndarray, cols: int = 4) -> Image.Image:
    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    grid = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, im in enumerate(images):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
    return Image.fromarray(grid)


def summarise(cfg: EvalConfig, table: dict) -> dict:
    """{model: {reward/output: mean over images of the tasks that reward applies to}, per task too}."""
    models, tasks = np.asarray(table["model"]), np.asarray(table["task"])
    summary = {}
    for name in cfg.models:
        row, per_task = {}, {}
        for spec in cfg.rewards:
            for col in [c for c in table if c.startswith(spec.key + "/")]:
                vals = np.asarray(table[col], dtype=np.float64)
                mine = (models == name) & np.isfinite(vals)
                if mine.any():
                    row[col] = float(vals[mine].mean())
                for t in sorted(set(tasks[mine])):
                    per_task.setdefault(t, {})[col] = float(vals[mine & (tasks == t)].mean())
        summary[name] = {"mean": row, "per_task": per_task}
    return summary


def markdown(summary: dict) -> str:
    cols = sorted({c for s in summary.values() for c in s["mean"]})
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, s in summary.items():
        lines.append(f"| {name} | " + " | ".join(f"{s['mean'][c]:.4f}" if c in s["mean"] else "" for c in cols)
                     + " |")
    return "\n".join(lines) + "\n"


def evaluate(cfg: EvalConfig, records) -> dict:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rc = cfg.rollout
    models = {name: m.model_dump() for name, m in cfg.models.items()}
    samplers = [ray.remote(Sampler).options(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus,
                                            resources=rc.resources or None)
                .remote(cfg.model, models, cfg.sampling, cfg.seed, rc.batch_size) for _ in range(rc.workers)]
    rewards = RewardPools(cfg.rewards)
    try:
        ray.get([a.ping.remote() for a in samplers + rewards.actors()])
        k = cfg.samples_per_prompt
        prompts = [r.prompt for r in records for _ in range(k)]
        sample_ids = list(range(len(prompts)))
        shards = np.array_split(np.arange(len(prompts)), len(samplers))
        table: dict[str, list] = {"model": [], "prompt": [], "task": [], "seed": []}
        for name in cfg.models:
            refs = [s.generate.remote(name, [prompts[i] for i in sh], [sample_ids[i] for i in sh])
                    for s, sh in zip(samplers, shards) if len(sh)]
            images = np.concatenate(ray.get(refs))
            recs = [r for r in records for _ in range(k)]
            scores = RewardPools.collect(rewards.submit(images, prompts, [r.metadata for r in recs],
                                                        [r.task for r in recs]), len(images))
            table["model"] += [name] * len(images)
            table["prompt"] += prompts
            table["task"] += [r.task for r in recs]
            table["seed"] += sample_ids
            for key, outs in scores.items():
                for o, vals in outs.items():
                    table.setdefault(f"{key}/{o}", [np.nan] * (len(table["model"]) - len(images)))
                    table[f"{key}/{o}"] += vals.tolist()
            for task in sorted({r.task for r in recs}):
                idx = [i for i, r in enumerate(recs) if r.task == task][:cfg.grid_images]
                (out / "grids" / name).mkdir(parents=True, exist_ok=True)
                image_grid(images[idx]).save(out / "grids" / name / f"{task}.png")
    finally:
        for a in samplers + rewards.actors():
            ray.kill(a)
    pq.write_table(pa.table(table), out / "results.parquet")
    summary = summarise(cfg, table)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="key=value overrides")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, EvalConfig)
        if cfg.tiny_assets:
            ensure_tiny_assets(cfg.tiny_assets)
        records = preflight_eval(cfg)
        init_ray(cfg.ray_address)
        check_cluster_resources(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = evaluate(cfg, records)
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
