"""Benchmark OPD steps: one machine's step split, or a simulated cluster's step against its compute bound.

    python -m pipelines.bench_opd --preset tiny            # CPU, tiny random model, local Ray
    python -m pipelines.bench_opd --preset sd35m           # one GPU, random SD3.5-Medium-size model, 512 px
    python -m pipelines.bench_opd --preset sim --gpus 1 8 16 --placement both [--compiled] [key=value ...]

tiny/sd35m print the mean split over the steps after the first (warm-up) and write bench.json to
output_dir; the target on one H100 is "other" (orchestration, transfers, waiting) at most 10% of the step.

sim runs the real actors, object store and trainer on N simulated GPUs of a local Ray (fake GPUs), with
SD3.5-Medium's tensor sizes and a transformer that costs a calibrated delay per call (flowopd.simulated);
one table row per configuration, all rows in <out>/bench.json. docs/performance.md explains the figures.
"""
import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

from flowopd.config import OPDConfig, apply_overrides
from pipelines.launch import init_ray
from pipelines.preflight import preflight

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("rollout", "label", "learn", "sync", "other")
TEACHERS = ("geneval_teacher", "ocr_teacher", "anchor")
# Colocated GPU shares: no two actors of one role fit on a GPU, and one of each does, when the teachers are
# placed first (as OPDTrainer creates them: teachers, rollout workers, then the learners' placement group).
COLOCATED_SHARE = {"pools": 0.51, "rollout": 0.25, "learner": 0.24}


def sd35m_config(root: Path) -> dict:
    """One GPU shared by a teacher server (3 LoRA teachers on one base), a rollout worker and one learner."""
    from flowopd.models import save_random_model
    from world.tiny import make_random_adapter, write_prompt_files
    if not (root / ".complete").exists():
        save_random_model(str(root / "base"), "sd35m")
        for i, name in enumerate(TEACHERS):
            make_random_adapter(str(root / "base"), root / "teachers" / name, seed=i + 1, rank=32, scale=0.3)
        write_prompt_files(root)
        (root / ".complete").touch()
    t = root / "teachers"
    return {
        "output_dir": str(root / "run"),
        "model": {"base": str(root / "base"), "dtype": "bfloat16", "max_sequence_length": 256, "resolution": 512},
        "student": {"lora_rank": 32, "lora_alpha": 64},
        "teachers": {n: {"adapter": str(t / n)} for n in TEACHERS},
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


def bench_one_machine(args) -> int:
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


# ---------------------------------------------------------------------------------------------- simulated


def sim_assets(root: Path, **transformer_config) -> Path:
    """Once: the simulated SD3.5-M pipeline (flowopd.simulated), three rank-32 LoRA teachers, prompts."""
    from flowopd.simulated import save_simulated_model
    from world.tiny import make_random_adapter, write_prompt_files
    if not (root / ".complete").exists():
        save_simulated_model(str(root / "base"), **transformer_config)
        for i, name in enumerate(TEACHERS):
            make_random_adapter(str(root / "base"), root / "teachers" / name, seed=i + 1, rank=32, scale=0.3)
        write_prompt_files(root)
        (root / ".complete").touch()
    return root


def set_simulation(base: Path, **values) -> None:
    """Write run settings (time_scale, run_dir) into the simulated transformer's config (actors load it)."""
    path = base / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}, indent=2))


def sim_config(assets: Path, out: Path, roles: dict[str, int], colocated: bool, prompts_per_worker: int,
               steps: int) -> dict:
    """OPD as sd35m_config (SD3.5-M sampling, three LoRA teachers and the MAR anchor on one base) with
    `roles` = {"rollout", "pools", "learner": actors}; each actor has a whole simulated GPU, or (colocated) a
    share of one. Teacher batches are small (8) to bound host memory: delays are linear in the batch, so
    batch sizes do not change the simulated compute."""
    t = assets / "teachers"
    gpus = {k: (COLOCATED_SHARE[k] if colocated else 1) for k in roles}
    return {
        "output_dir": str(out),
        "model": {"base": str(assets / "base"), "dtype": "float32", "max_sequence_length": 256, "resolution": 512},
        "student": {"lora_rank": 32, "lora_alpha": 64},
        "teachers": {n: {"adapter": str(t / n)} for n in TEACHERS},
        "route": {"geneval": "geneval_teacher", "ocr": "ocr_teacher"},
        "mar": {"teacher": "anchor", "weight": 0.02},
        "pools": {"default": {"replicas": roles["pools"], "num_gpus": gpus["pools"], "num_cpus": 1,
                              "batch_size": 8}},
        "sampling": {"num_steps": 10, "shift": 3.0, "noise_level": 0.7, "guidance": 4.5,
                     "train_timestep_fraction": 0.99},
        "data": {"sources": [{"path": str(assets / "geneval_train.jsonl"), "format": "geneval"},
                             {"path": str(assets / "ocr_train.txt"), "format": "ocr"}],
                 "prompts_per_step": prompts_per_worker * roles["rollout"], "group_size": 24},
        "rollout": {"workers": roles["rollout"], "num_gpus": gpus["rollout"], "num_cpus": 1, "batch_size": 24},
        "learner": {"ranks": roles["learner"], "num_gpus": gpus["learner"], "num_cpus": 1, "micro_batch_size": 8,
                    "backend": "gloo"},
        "loss": {"form": "analytic", "train_cfg": True},
        "train": {"steps": steps, "checkpoint_every": 10_000},
    }


def role_work(cfg, latency: dict, time_scale: float = 1.0) -> dict[str, float]:
    """Simulated GPU seconds per prompt, from the latency model (per sample) and the config: "rollout" runs
    every sampling step with the student's LoRA; "routed" and "mar" label every trained state ("pools" is
    both); "learner" runs forward and backward on every trained state. CFG doubles a call's batch. The
    analytic loss calls nothing else (no reference forward); compiled batch padding is not counted."""
    from flowopd.rollout import sde_schedule
    sc, lat = cfg.sampling, latency["compiled" if cfg.model.compile else "eager"]
    states = cfg.data.group_size * len(sde_schedule(sc.num_steps, sc, cfg.seed, 1)[1])

    def cfg_batch(guidance):
        return 2 if guidance != 1.0 else 1

    def label(name):
        fwd = lat["forward_lora"] if cfg.teachers[name].adapter else lat["forward"]
        return states * cfg_batch(cfg.teacher_guidance(name)) * fwd

    routed = statistics.fmean(label(n) for n in sorted(set(cfg.route.values())))
    mar = label(cfg.mar.teacher) if cfg.mar.teacher and cfg.mar.weight > 0 else 0.0
    g = sc.guidance if cfg.loss.train_cfg else 1.0
    if g == 1.0:
        learn = lat["forward_backward_lora"]
    elif cfg.loss.detach_uncond:
        learn = lat["forward_lora"] + lat["forward_backward_lora"]
    else:
        learn = 2 * lat["forward_backward_lora"]
    work = {"rollout": cfg.data.group_size * sc.num_steps * cfg_batch(sc.guidance) * lat["forward_lora"],
            "routed": routed, "mar": mar, "pools": routed + mar, "learner": states * learn}
    return {k: v * time_scale for k, v in work.items()}


def size_roles(gpus: int, work: dict[str, float]) -> dict[str, int]:
    """Disaggregated pools for `gpus` GPUs, in proportion to each role's work per prompt: of all splits
    (at least one GPU each), the one with the highest prompts per GPU-second when every role's work is
    spread evenly over its GPUs and each rollout worker takes the same number of prompts."""
    def rate(r, t):
        lo = gpus - r - t
        return r / max(work["rollout"], r * work["pools"] / t, r * work["learner"] / lo)
    r, t = max(((r, t) for r in range(1, gpus - 1) for t in range(1, gpus - r)), key=lambda rt: rate(*rt))
    return {"rollout": r, "pools": t, "learner": gpus - r - t}


def analytic_bound(roles: dict[str, int], prompts: int, work: dict[str, float], colocated: bool) -> float:
    """Simulated compute of the busiest GPU per step, each role's work spread evenly over its actors
    (a rollout worker takes whole prompts): the lower bound for a perfectly balanced schedule."""
    load = {"rollout": math.ceil(prompts / roles["rollout"]) * work["rollout"],
            "pools": prompts * work["pools"] / roles["pools"],
            "learner": prompts * work["learner"] / roles["learner"]}
    return sum(load.values()) if colocated else max(load.values())


def chain_bound(cfg, roles: dict[str, int], work: dict[str, float]) -> float:
    """A lower bound from the step's dependencies, busiest GPU aside. Phased: the phases in turn, each spread
    evenly. Overlapped (micro-groups of `rollout.micro_group_samples()` samples, each labelled whole on one
    replica per teacher and learned by every rank on its share): for each role, the earliest its work can
    start, plus its busiest actor's share in whole micro-groups, plus the least work that must follow it."""
    prompts, (r, t, lo) = cfg.data.prompts_per_step, (roles["rollout"], roles["pools"], roles["learner"])
    per_worker = math.ceil(prompts / r)
    if not cfg.rollout.overlap:
        return per_worker * work["rollout"] + prompts * work["pools"] / t + prompts * work["learner"] / lo
    size = min(cfg.rollout.micro_group_samples(), per_worker * cfg.data.group_size) / cfg.data.group_size
    groups, labels = r * math.ceil(per_worker / size), 2 if work["mar"] else 1  # size: prompts' worth
    label = size * work["pools"] / labels  # one teacher's targets for one micro-group
    labelled = label if t > 1 else size * work["pools"]  # a group's two labels run side by side on two replicas
    first, learn = size * work["rollout"], size * work["learner"] / lo
    return max(per_worker * work["rollout"] + labelled + learn,
               first + math.ceil(groups * labels / t) * label + learn,
               first + labelled + groups * learn)


def gpu_usage(run_dir: Path) -> dict[str, dict]:
    """Per simulated GPU id, from flowopd.simulated's busy logs: its processes, their simulated seconds, and
    their CPU seconds from each one's first simulated call to its last (host work, which includes this
    CPU's emulation of GPU-side tensor work such as the CFG batch's copies)."""
    usage: dict[str, dict] = {}
    for f in run_dir.glob("gpu-*.busy"):
        rows = [line.split() for line in f.read_text().splitlines()]
        u = usage.setdefault(f.name.split(".")[0].removeprefix("gpu-"), {"processes": 0, "sim_s": 0.0, "cpu_s": 0.0})
        u["processes"] += 1
        u["sim_s"] += sum(float(r[2]) for r in rows)
        u["cpu_s"] += float(rows[-1][4]) - float(rows[0][4])
    return usage


def start_ray(gpus: int, actors: int, object_store_gb: float) -> None:
    """A private local Ray with `gpus` fake GPUs (CUDA_VISIBLE_DEVICES ids for the actors; torch still sees
    none) and enough logical CPUs for one per actor. glibc keeps freed memory for reuse, as a GPU's caching
    allocator does (up to 256 MB a process): otherwise every large tensor costs fresh page faults, CPU time a
    GPU would not spend."""
    import logging

    import ray
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
           "MALLOC_MMAP_THRESHOLD_": str(1 << 40), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_gpus=gpus,
             num_cpus=2 * actors + 4, object_store_memory=int(object_store_gb * 2 ** 30),
             runtime_env={"env_vars": env}, logging_level=logging.WARNING)


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (every core, every user)."""
    import psutil
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


def memory_needed_gb(actors: int, object_store_gb: float, gb_per_actor: float) -> float:
    return actors * gb_per_actor + object_store_gb + 2.0  # + the driver and Ray's own processes


def run_sim(gpus: int, placement: str, args, assets: Path, out: Path) -> dict:
    """One configuration on a fresh local Ray; returns its table row."""
    import ray

    from actors.opd_trainer import OPDTrainer
    from actors.resources import check_cluster_resources
    from flowopd.simulated import LATENCY
    colocated = placement == "colocated"
    overrides = [*(["model.compile=true"] if args.compiled else []), *args.overrides]
    probe = OPDConfig.model_validate(apply_overrides(
        sim_config(assets, out, {"rollout": 1, "pools": 1, "learner": 1}, False, 1, args.steps), overrides))
    work = role_work(probe, LATENCY, args.time_scale)
    roles = {k: gpus for k in ("rollout", "pools", "learner")} if colocated else size_roles(gpus, work)
    raw = sim_config(assets, out, roles, colocated, args.prompts_per_worker, args.steps)
    cfg = OPDConfig.model_validate(apply_overrides(raw, overrides))
    roles = {"rollout": cfg.rollout.workers, "pools": cfg.pools["default"].replicas, "learner": cfg.learner.ranks}
    prompts = cfg.data.prompts_per_step
    row = {"gpus": gpus, "placement": placement, "roles": roles, "prompts_per_step": prompts,
           "compiled": args.compiled, "time_scale": args.time_scale, "overrides": args.overrides,
           "work_per_prompt_s": work, "analytic_bound_s": analytic_bound(roles, prompts, work, colocated),
           "chain_bound_s": chain_bound(cfg, roles, work)}
    actors = sum(roles.values())
    store_gb = min(8.0, 1.0 + 0.25 * prompts)
    need, have = memory_needed_gb(actors, store_gb, args.gb_per_actor), available_memory_gb()
    if need > have:
        print(f"skipped {placement} x{gpus}: {actors} actor processes need ~{need:.0f} GB, {have:.0f} GB "
              f"available (--gb-per-actor {args.gb_per_actor})", file=sys.stderr)
        return {**row, "skipped": f"needs ~{need:.0f} GB of memory, {have:.0f} GB available"}
    shutil.rmtree(out, ignore_errors=True)
    run_dir = out / "gpus"
    set_simulation(assets / "base", time_scale=args.time_scale, run_dir=str(run_dir.resolve()))
    sources = preflight(cfg)
    start_ray(gpus, actors, store_gb)
    try:
        check_cluster_resources(cfg)
        t0 = time.perf_counter()
        trainer = OPDTrainer(cfg, sources)
        started, cpu0 = time.perf_counter(), cpu_busy_s()
        try:
            history = trainer.run(progress=False)
            cpu = (cpu_busy_s() - cpu0) / ((time.perf_counter() - started) * os.cpu_count())
            uss = actor_memory_gb(trainer)
        finally:
            trainer.shutdown()
    finally:
        ray.shutdown()
        set_simulation(assets / "base", time_scale=1.0, run_dir=None)  # the model directory outlives the run
    steady = history[1:] or history
    step = statistics.fmean(m["time"]["total"] for m in steady)
    usage = gpu_usage(run_dir)
    busiest = max(u["sim_s"] for u in usage.values()) / len(history)

    def mean_of(key):
        values = [m[key] for m in steady if m.get(key) is not None]
        return statistics.fmean(values) if values else None
    return {**row, "startup_s": started - t0, "steps_measured": len(steady), "states_per_step": steady[0]["states"],
            "step_s": step, "time_s": {p: statistics.fmean(m["time"][p] for m in steady) for p in PARTS},
            "busiest_s": busiest, "overhead": step / busiest - 1,
            "busiest_with_host_cpu_s": max(u["sim_s"] + u["cpu_s"] for u in usage.values()) / len(history),
            "states_per_s_per_gpu": steady[0]["states"] / step / gpus,
            "driver_bytes": mean_of("driver_bytes"), "state_bytes": mean_of("state_bytes"),
            "processes_per_gpu": sorted(u["processes"] for u in usage.values()), "cpu_utilisation": cpu,
            "actor_memory_gb": uss, "overlap": cfg.rollout.overlap}


def actor_memory_gb(trainer) -> dict[str, float]:
    """Unique memory (USS) of each role's actor processes after the run: what one more actor would cost."""
    import psutil
    import ray
    pids = {"rollout": [w.pid.remote() for w in trainer.workers],
            "pools": [r.ping.remote() for r in trainer.pools.replicas["default"]],
            "learner": [r.pid.remote() for r in trainer.learners.ranks]}
    return {role: max(psutil.Process(pid).memory_full_info().uss for pid in ray.get(refs)) / 2 ** 30
            for role, refs in pids.items()}


def available_memory_gb() -> float:
    import psutil
    return psutil.virtual_memory().available / 2 ** 30


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_row(r: dict) -> None:
    roles = "{rollout}/{pools}/{learner}".format(**r["roles"])
    head = f"{r['gpus']:>4} {r['placement']:<14}{roles:>9}{r['prompts_per_step']:>4}"
    if "skipped" in r:
        print(f"{head}  skipped: {r['skipped']}")
        return
    share = r["driver_bytes"] / r["state_bytes"] if r["driver_bytes"] is not None and r["state_bytes"] else None
    print(f"{head}{r['step_s']:>8.2f}{r['busiest_s']:>8.2f}{r['overhead']:>8.1%}{r['analytic_bound_s']:>8.2f}"
          f"{r['chain_bound_s']:>8.2f}{r['busiest_with_host_cpu_s']:>8.2f}"
          f"{fmt(r['driver_bytes'] and r['driver_bytes'] / 2 ** 20, '.1f'):>9}"
          f"{fmt(r['state_bytes'] and r['state_bytes'] / 2 ** 20, '.0f'):>8}{fmt(share, '.2%'):>8}"
          f"{fmt(r.get('efficiency'), '.0%'):>6}{r['cpu_utilisation']:>6.0%}")


HEADER = (f"{'gpus':>4} {'placement':<14}{'R/T/L':>9}{'P':>4}{'step s':>8}{'busiest':>8}{'overhd':>8}{'even':>8}"
          f"{'chain':>8}{'+cpu':>8}{'drv MB':>9}{'st MB':>8}{'drv %':>8}{'eff':>6}{'cpu':>6}")


def bench_sim(args) -> int:
    """Every configuration of --gpus x --placement, one row each (bench.json is rewritten after each)."""
    default = "runs/bench_sim_assets" + ("" if args.width == 1536 else f"_w{args.width}")
    assets = sim_assets(Path(args.assets or default), width=args.width)
    out = Path(args.out)
    placements = ("disaggregated", "colocated") if args.placement == "both" else (args.placement,)
    plan = [(1, "single")] if 1 in args.gpus else []
    plan += [(n, p) for n, p in itertools.product(sorted(set(args.gpus) - {1}), placements)
             if not (p == "disaggregated" and n < 3)]
    print(HEADER, flush=True)
    rows = []
    for gpus, placement in plan:
        row = run_sim(gpus, "colocated" if placement == "single" else placement, args, assets,
                      out / f"{placement}{gpus}")
        row["placement"] = placement
        base = next((r for r in rows if r["placement"] == "single" and "skipped" not in r), None)
        if base and "skipped" not in row:
            row["efficiency"] = row["states_per_s_per_gpu"] / base["states_per_s_per_gpu"]
        rows.append(row)
        print_row(row)
        sys.stdout.flush()
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("tiny", "sd35m", "sim"), default="tiny")
    ap.add_argument("--steps", type=int, default=None, help="steps per run, the first is warm-up (6; sim: 4)")
    ap.add_argument("--assets", default=None, help="where generated models and prompts live")
    sim = ap.add_argument_group("sim")
    sim.add_argument("--gpus", type=int, nargs="+", default=[1, 8], help="simulated GPU counts (1 = baseline)")
    sim.add_argument("--placement", choices=("disaggregated", "colocated", "both"), default="disaggregated")
    sim.add_argument("--compiled", action="store_true", help="torch.compile latencies (sets model.compile)")
    sim.add_argument("--prompts-per-worker", type=int, default=1,
                     help="prompts per step per rollout worker (weak scaling: work per GPU held constant)")
    sim.add_argument("--time-scale", type=float, default=1.0,
                     help="multiply every simulated delay (>1 leaves the emulating CPUs room at many GPUs)")
    sim.add_argument("--width", type=int, default=1536,
                     help="width of the LoRA-targeted layers (SD3.5-M: 1536); smaller shrinks every LoRA")
    sim.add_argument("--gb-per-actor", type=float, default=1.2,
                     help="host memory per actor process, to skip configurations that would not fit")
    sim.add_argument("--out", default="runs/bench_sim", help="runs and bench.json")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (sim: applied to every run)")
    args = ap.parse_intermixed_args(argv)
    args.steps = args.steps or (4 if args.preset == "sim" else 6)
    return bench_sim(args) if args.preset == "sim" else bench_one_machine(args)


if __name__ == "__main__":
    sys.exit(main())
