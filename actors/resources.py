"""Resource checks against the live cluster, before any actor is created (a wrong ask would hang)."""
import ray

from flowopd.config import ConfigError


def requested_resources(cfg) -> dict[str, dict[str, float]]:
    """Per config key, the total CPUs, GPUs and custom resources its actors ask for."""
    return {key: {"CPU": g.num_cpus * n, "GPU": g.num_gpus * n, **{r: v * n for r, v in g.resources.items()}}
            for key, (g, n) in cfg.actor_groups().items()}


def check_cluster_resources(cfg) -> None:
    have = ray.cluster_resources()
    asked = requested_resources(cfg)
    for res in sorted({r for a in asked.values() for r in a}):
        total = sum(a.get(res, 0) for a in asked.values())
        if total > have.get(res, 0) + 1e-9:
            parts = ", ".join(f"{k}: {a[res]:g}" for k, a in asked.items() if a.get(res))
            raise ConfigError(f"the job asks for {total:g} {res} ({parts}) but the cluster has "
                              f"{have.get(res, 0):g}; lower num_cpus, num_gpus, resources, replicas, workers or ranks")
