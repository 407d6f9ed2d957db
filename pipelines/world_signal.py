"""Signal checks of a world base before hours of RL go into it (world/signal.py says what each measures):

    python -m pipelines.world_signal --world assets/world2 --out assets/world2/signal.json

For each task: the base's reward on training and held-out prompts (ODE, 95% CIs over seeds), the VAE's
ceiling, the within-group reward spread by window of stochastic sampling steps with the fraction of
zero-spread groups, and for text how often the characters come out right but in the wrong order. The prompt
subsets are the first --prompts of each file (fixed, never chosen by result); a few minutes on 2 cores.
"""
import argparse
import json
import sys
from pathlib import Path

TASKS = ("composition", "text", "style")
WINDOWS = {"steps 0-2": [0, 1, 2], "steps 3-5": [3, 4, 5], "steps 6-9": [6, 7, 8, 9]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="assets/world2", help="a train_world output: base/ and the prompt files")
    ap.add_argument("--layout", default=None, help="the renderings' layout (default: from train_world.json)")
    ap.add_argument("--shape-rule", default="template", help="world_composition's shape_rule")
    ap.add_argument("--prompts", type=int, default=32, help="prompts per task and split")
    ap.add_argument("--seeds", type=int, default=4, help="ODE samples per prompt for the fit")
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--groups", type=int, default=16, help="prompts per task for the group signal")
    ap.add_argument("--noise-level", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="a JSON file for the numbers (default: print only)")
    args = ap.parse_args(argv)
    world = Path(args.world)
    files = {(t, s): world / f"world_{t}_{s}.jsonl" for t in TASKS for s in ("train", "test")}
    missing = [str(p) for p in [world / "base" / "model_index.json", *files.values()] if not p.exists()]
    if missing:
        print(f"error: {world} is not a train_world output: {missing[0]} is missing", file=sys.stderr)
        return 2
    layout = args.layout or json.loads((world / "train_world.json").read_text()).get("layout", "row")

    import torch

    from flowopd.models import load_pipeline, quiet_libraries
    from rewards import make_reward
    from world import signal
    quiet_libraries()
    torch.manual_seed(args.seed)
    pipe = load_pipeline(str(world / "base"))
    rewards = {"composition": make_reward("world_composition", {"shape_rule": args.shape_rule}),
               "text": make_reward("world_text"), "style": make_reward("world_style")}
    report = {"world": str(world), "layout": layout, "shape_rule": args.shape_rule, "tasks": {}}
    for task in TASKS:
        recs = {s: [json.loads(line) for line in files[task, s].read_text().splitlines()][:args.prompts]
                for s in ("train", "test")}
        reward = rewards[task]
        row = {f"fit_{s}": vars(signal.fit(pipe, reward, recs[s], args.seeds, args.seed)) for s in recs}
        row["vae_ceiling"] = signal.vae_ceiling(pipe.vae, reward, recs["test"], layout)
        row["groups"] = signal.group_signal(pipe, reward, recs["train"][:args.groups], args.group_size, args.seed,
                                            WINDOWS, args.noise_level)
        if task == "text":
            row["text_errors"] = signal.text_errors(recs["test"], signal.sample(pipe, recs["test"], args.seeds,
                                                                                args.seed))
        report["tasks"][task] = row
        print(f"[world_signal] {task} done", file=sys.stderr)
    print(markdown(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


def markdown(report: dict) -> str:
    lines = [f"world {report['world']} (layout {report['layout']}, shape rule {report['shape_rule']})", "",
             "| task | train fit | held-out fit | VAE ceiling | " + " | ".join(
                 f"std / zero-std, {w}" for w in [*WINDOWS, "all steps, own noise"]) + " |",
             "|---" * (4 + len(WINDOWS) + 1) + "|"]
    for task, row in report["tasks"].items():
        fits = [f"{r['mean']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]" for r in (row["fit_train"], row["fit_test"])]
        groups = [f"{g['mean_group_std']:.3f} / {g['zero_std']:.2f}" for g in row["groups"].values()]
        lines.append(f"| {task} | {' | '.join(fits)} | {row['vae_ceiling']:.3f} | {' | '.join(groups)} |")
    if "text" in report["tasks"]:
        errors = report["tasks"]["text"]["text_errors"]
        lines += ["", "text readings (held-out): " + ", ".join(f"{k} {v:.2f}" for k, v in errors.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
