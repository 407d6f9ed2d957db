"""Score models (base, teachers, students) on held-out prompts per task, like the paper's Table 2.

    python -m pipelines.evaluate --config configs/tiny_eval.yaml [key=value ...]

ODE sampling with its own step count (paper: 40) and fixed seeds: every model sees the same noise for
the same prompt and sample. A model's own `sampling` (num_steps, timesteps, sampler, noise_level) replaces
those settings for it alone, e.g. a few-step generator with the CPS sampler beside the base at 40 steps.
Writes results.parquet (one row per image: model, prompt, task, seed and every reward output),
summary.json and summary.md (mean per model and reward over the tasks each reward applies to, plus per
task), grids/<model>/<task>.png, and index.json: a fingerprint of the settings and of each model's weights
and own sampling. With `reuse: <an earlier evaluation directory>`, models whose weights and
settings match it take their rows from there instead of being sampled again, after a spot check that
this machine reproduces a few of those scores.
"""
import argparse
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from flowopd.config import ConfigError, EvalConfig
from flowopd.data import DataError
from flowopd.hub import resolve_config
from flowopd.tracking import make_tracker
from pipelines.launch import init_ray, load_job
from pipelines.preflight import check_adapter, check_logger, check_resolution, check_reward_specs, read_sources

log = logging.getLogger("evaluate")
SPOT_CHECK = 4  # images re-sampled to confirm that reused results reproduce here
ROLLOUT_ONLY = {"sde_window_size", "sde_window_range", "same_latent"}  # training-rollout keys, unused here
# sampling keys added after evaluations were published: left out of the fingerprint at these defaults, so an
# evaluation with the classic sampler keeps its fingerprint and earlier results stay reusable
LATER_DEFAULTS = {"timesteps": None, "sampler": "sde"}


def _hash_files(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def model_fingerprint(spec: dict) -> str:
    """Identifies a model by its weights (not its path), its guidance and its own sampling, if any (base at 4
    steps is another row than base at 40)."""
    from flowopd.models import adapter_weights_file
    if spec.get("adapter"):
        weights = _hash_files([adapter_weights_file(spec["adapter"])])
    elif spec.get("transformer"):
        weights = _hash_files(Path(spec["transformer"]).rglob("*.safetensors"))
    else:
        weights = "base"
    own = {k: v for k, v in (spec.get("sampling") or {}).items() if v is not None}
    return f"{weights}/g{spec.get('guidance')}" + ("/" + json.dumps(own, sort_keys=True) if own else "")


def settings_fingerprint(cfg: EvalConfig, records) -> str:
    """Everything besides the model that decides a row: prompts, seeds, sampler, rewards, base weights."""
    sampling = {k: v for k, v in cfg.sampling.model_dump(mode="json", exclude=ROLLOUT_ONLY).items()
                if k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k]}
    doc = {"records": [(r.prompt, r.task, r.metadata, cfg.samples_for(r.task)) for r in records],
           "seed": cfg.seed, "sampling": sampling,
           "model": cfg.model.model_dump(mode="json", exclude={"base", "compile"}),  # compile: how, not what
           "base": _hash_files(Path(cfg.model.base).rglob("*.safetensors")),
           "rewards": [r.model_dump(mode="json", include={"name", "label", "kwargs", "tasks"}) for r in cfg.rewards]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reusable_rows(cfg: EvalConfig, settings: str, fingerprints: dict) -> dict[str, dict]:
    """{model name: its rows in the reused evaluation} for every model whose weights and settings match."""
    if not cfg.reuse:
        return {}
    src = Path(cfg.reuse)
    try:
        index = json.loads((src / "index.json").read_text())
        table = pq.read_table(src / "results.parquet").to_pydict()
    except (OSError, ValueError) as e:
        raise ConfigError(f"reuse: {src} is not an evaluation directory ({e})") from None
    if index["settings"] != settings:
        log.warning("reuse: %s was evaluated with other prompts, seeds, sampler, rewards or base; "
                    "sampling every model", src)
        return {}
    by_print = {fp: name for name, fp in index["models"].items()}
    models = np.asarray(table["model"])
    out = {}
    for name, fp in fingerprints.items():
        if fp in by_print:
            mine = models == by_print[fp]
            out[name] = {k: [v for v, m in zip(col, mine) if m] for k, col in table.items()}
            out[name]["model"] = [name] * int(mine.sum())
            out[name]["_from"] = by_print[fp]
    return out


def load_prompts(cfg: EvalConfig):
    return [r for recs in read_sources(cfg.data.sources) for r in recs[:cfg.data.max_prompts_per_source]]


def preflight_eval(cfg: EvalConfig):
    from actors.sampler import model_sampling
    from flowopd.models import transformer_config
    resolve_config(cfg)
    if not Path(cfg.model.base).exists():
        raise ConfigError(f"model.base: {cfg.model.base} does not exist")
    check_resolution(cfg.model.resolution, Path(cfg.model.base), transformer_config(cfg.model.base))
    check_logger(cfg)
    for name, m in cfg.models.items():
        if m.adapter:
            check_adapter(f"models.{name}.adapter", m.adapter, Path(cfg.model.base))
        elif m.transformer and not Path(m.transformer).exists():
            raise ConfigError(f"models.{name}.transformer: {m.transformer} does not exist")
        if m.sampling:
            try:
                model_sampling(cfg.sampling, m.sampling.model_dump())
            except ValueError as e:
                raise ConfigError(f"models.{name}.sampling: {e}") from None
    if cfg.reuse and not (Path(cfg.reuse) / "index.json").exists():
        raise ConfigError(f"reuse: {cfg.reuse} is not an evaluation directory (no index.json)")
    check_reward_specs(cfg.rewards)
    records = load_prompts(cfg)
    for r in records:
        cfg.samples_for(r.task)  # raises, naming the task, when samples_per_prompt has no count for it
        if not any(s.applies_to(r.task) for s in cfg.rewards):
            raise ConfigError(f"rewards: no reward applies to task {r.task!r} (prompt {r.prompt!r})")
    return records


def write_grids(folder: Path, images: np.ndarray, recs, per_task: int) -> None:
    """<task>.png: one row with the first sample of each of the task's first `per_task` prompts (the same
    seeds for every model), and <task>.json with those prompts."""
    folder.mkdir(parents=True, exist_ok=True)
    for task in sorted({r.task for r in recs}):
        first, seen = [], set()
        for i, r in enumerate(recs):
            if r.task == task and r.prompt not in seen and len(first) < per_task:
                seen.add(r.prompt)
                first.append(i)
        Image.fromarray(np.concatenate(images[first], axis=1)).save(folder / f"{task}.png")
        (folder / f"{task}.json").write_text(json.dumps({"prompts": [recs[i].prompt for i in first]}))


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


def _append(table: dict, rows: dict) -> None:
    n_before, n = len(table["model"]), len(rows["model"])
    for key, values in rows.items():
        if not key.startswith("_"):
            table.setdefault(key, [np.nan] * n_before)
            table[key] += list(values)
    for col in table.values():
        if len(col) < n_before + n:
            col += [np.nan] * n


def _score_rows(rewards, name, images, prompts, recs, sample_ids) -> dict:
    from actors.reward import RewardPools
    scores = RewardPools.collect(rewards.submit(images, prompts, [r.metadata for r in recs],
                                                [r.task for r in recs]), len(images))
    rows = {"model": [name] * len(images), "prompt": list(prompts), "task": [r.task for r in recs],
            "seed": list(sample_ids)}
    for key, outs in scores.items():
        for o, vals in outs.items():
            rows[f"{key}/{o}"] = vals.tolist()
    return rows


def _reproduces(cached: dict, fresh: dict) -> bool:
    """The fresh scores of the first images equal the cached ones (up to a flipped pixel or two)."""
    cols = [c for c in fresh if "/" in c]
    return all(np.allclose(np.asarray(fresh[c], float), np.asarray(cached[c][:len(fresh[c])], float),
                           atol=2e-3, equal_nan=True) for c in cols)


def evaluate(cfg: EvalConfig, records) -> dict:
    import ray

    from actors.reward import RewardPools
    from actors.sampler import Sampler
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rc = cfg.rollout
    models = {name: m.model_dump() for name, m in cfg.models.items()}
    settings = settings_fingerprint(cfg, records)
    fingerprints = {name: model_fingerprint(spec) for name, spec in models.items()}
    reused = reusable_rows(cfg, settings, fingerprints)
    samplers = [ray.remote(Sampler).options(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus,
                                            resources=rc.resources or None)
                .remote(cfg.model, models, cfg.sampling, cfg.seed, rc.batch_size) for _ in range(rc.workers)]
    rewards = RewardPools(cfg.rewards)
    recs = [r for r in records for _ in range(cfg.samples_for(r.task))]
    prompts = [r.prompt for r in recs]
    sample_ids = list(range(len(prompts)))
    table: dict[str, list] = {"model": [], "prompt": [], "task": [], "seed": []}
    try:
        ray.get([a.ping.remote() for a in samplers + rewards.actors()])
        if reused:  # confirm this machine reproduces the reused scores before trusting them
            name = next(iter(reused))
            n = min(SPOT_CHECK, len(prompts))
            images = ray.get(samplers[0].generate.remote(name, prompts[:n], sample_ids[:n]))
            if not _reproduces(reused[name], _score_rows(rewards, name, images, prompts[:n], recs[:n], sample_ids[:n])):
                log.warning("reuse: %s's scores do not reproduce on this machine; sampling every model", name)
                reused = {}
        for name in cfg.models:
            if name in reused:
                log.info("%s: %d rows reused from %s (model %s)", name, len(reused[name]["model"]), cfg.reuse,
                         reused[name]["_from"])
                _append(table, reused[name])
                grids = Path(cfg.reuse) / "grids" / reused[name]["_from"]
                if grids.exists():
                    shutil.copytree(grids, out / "grids" / name, dirs_exist_ok=True)
                continue
            shards = np.array_split(np.arange(len(prompts)), len(samplers))
            refs = [s.generate.remote(name, [prompts[i] for i in sh], [sample_ids[i] for i in sh])
                    for s, sh in zip(samplers, shards) if len(sh)]
            images = np.concatenate(ray.get(refs))
            _append(table, _score_rows(rewards, name, images, prompts, recs, sample_ids))
            write_grids(out / "grids" / name, images, recs, cfg.grid_images)
    finally:
        for a in samplers + rewards.actors():
            ray.kill(a)
    pq.write_table(pa.table(table), out / "results.parquet")
    (out / "index.json").write_text(json.dumps({"settings": settings, "models": fingerprints}, indent=1))
    summary = summarise(cfg, table)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary))
    track(cfg, summary, out)
    return summary


def track(cfg: EvalConfig, summary: dict, out: Path) -> None:
    """Per-task means and the sample grids in the configured experiment tracker."""
    tracker = make_tracker(cfg.logger, cfg.output_dir, config=cfg.model_dump(mode="json"))
    if tracker is None:
        return
    try:
        tracker.log({"eval": {m: s["per_task"] for m, s in summary.items()}}, 0)
        for grid in sorted(out.glob("grids/*/*.png")):
            tracker.log_image(f"grids/{grid.parent.name}/{grid.stem}", np.asarray(Image.open(grid).convert("RGB")))
    finally:
        tracker.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="key=value overrides")
    args = ap.parse_intermixed_args(argv)
    from actors.resources import check_cluster_resources
    try:
        cfg = load_job(args.config, args.overrides, EvalConfig)
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
