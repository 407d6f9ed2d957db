"""Benchmark one OPD step, split into rollout, labelling, learning, weight sync and everything else.

    python -m pipelines.bench_opd --preset tiny            # CPU, tiny random model, local Ray
    python -m pipelines.bench_opd --preset sd35m           # one GPU, random SD3.5-Medium-size model, 512 px

Prints the mean split over the steps after the first (warm-up) and writes bench.json to output_dir.
The target on one H100 is "other" (orchestration, transfers, waiting) at most 10% of the step.
"""
import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import yaml

from flowopd.config import OPDConfig, apply_overrides
from pipelines.launch import init_ray
from pipelines.preflight import preflight

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("rollout", "label", "learn", "sync", "other")


def sd35m_config(root: Path) -> dict:
    """One GPU shared by a teacher server (3 LoRA teachers on one base), a rollout worker and one learner."""
    from flowopd.models import save_random_model
    from world.tiny import make_random_adapter, write_prompt_files
    if not (root / ".complete").exists():
        save_random_model(str(root / "base"), "sd35m")
        for i, name in enumerate(("geneval_teacher", "ocr_teacher", "anchor")):
            make_random_adapter(str(root / "base"), root / "teachers" / name, seed=i + 1, rank=32, scale=0.3)
        write_prompt_files(root)
        (root / ".complete").touch()
    t = root / "teachers"
    return {
        "output_dir": str(root / "run"),
        "model": {"base": str(root / "base"), "dtype": "bfloat16", "max_sequence_length": 256, "resolution": 512},
        "student": {"lora_rank": 32, "lora_alpha": 64},
        "teachers": {n: {"adapter": str(t / n)} for n in ("geneval_teacher", "ocr_teacher", "anchor")},
        "route": {"geneval": "geneval_teacher", "ocr": "ocr_teacher"},
        "mar": {"teacher": "anchor", "weight": 0.02},
        "pools": {"default": {"replicas": 1, "num_gpus": 0.25, "num_cpus": 1, "batch_size": 48}},
        "data": {"sources": [{"path": str(root / "geneval_train.jsonl"), "format": "geneval"},
                             {"path": str(root / "ocr_train.txt"), "format": "ocr"}],
                 "prompts_per_step": 1, "group_size": 24},
        "rollout": {"workers": 1, "num_gpus": 0.25, "num_cpus": 1, "batch_size": 24},
        "learner": {"ranks": 1, "num_gpus": 0.5, "num_cpus": 1, "micro_batch_size": 8},
        "train": {"steps": 4, "checkpoint_every": 10_000},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("tiny", "sd35m"), default="tiny")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--assets", default=None, help="where generated models and prompts live")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_intermixed_args(argv)
    from actors.opd_trainer import OPDTrainer
    from actors.resources import check_cluster_resources
    from world.tiny import ensure_tiny_assets
    if args.preset == "tiny":
        assets = ensure_tiny_assets(args.assets or "runs/tiny_assets")
        raw = yaml.safe_load((ROOT / "configs" / "tiny_opd.yaml").read_text())
        raw = yaml.safe_load(yaml.safe_dump(raw).replace("runs/tiny_assets", str(assets)))
        raw.pop("tiny_assets", None)  # built just above, at --assets
        raw["output_dir"] = "runs/bench_tiny"
    else:
        raw = sd35m_config(Path(args.assets or "runs/bench_sd35m"))
    raw = apply_overrides(raw, [f"train.steps={args.steps}", *args.overrides])
    cfg = OPDConfig.model_validate(raw)
    out = Path(cfg.output_dir)
    shutil.rmtree(out, ignore_errors=True)  # a benchmark always starts fresh
    sources = preflight(cfg)
    init_ray(cfg.ray_address)
    check_cluster_resources(cfg)
    trainer = OPDTrainer(cfg, sources)
    try:
        history = trainer.run(progress=False)
    finally:
        trainer.shutdown()
    steady = history[1:] or history
    med = {p: statistics.fmean(m["time"][p] for m in steady) for p in PARTS}
    total = statistics.fmean(m["time"]["total"] for m in steady)
    report = {"preset": args.preset, "steps_measured": len(steady), "states_per_step": steady[0]["states"],
              "mean_s": med, "mean_total_s": total,
              "share": {p: med[p] / total for p in PARTS},
              "states_per_s": statistics.median(m["states_per_s"] for m in steady),
              "teacher_queries_per_s": statistics.median(m["teacher_queries_per_s"] for m in steady)}
    print(f"{'part':<10}{'mean s':>10}{'share':>8}")
    for p in PARTS:
        print(f"{p:<10}{med[p]:>10.3f}{med[p] / total:>8.1%}")
    print(f"{'total':<10}{total:>10.3f}   states/step {report['states_per_step']}, "
          f"{report['states_per_s']:.1f} states/s")
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
