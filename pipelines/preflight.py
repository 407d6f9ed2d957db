"""Checks that run before any actor starts: files, adapters, routes, data. Each error names its key.

The model libraries are imported by the checks that read models, not with this module, which every
pipeline imports."""
import inspect
import json
from pathlib import Path

from flowopd.config import ConfigError, JobConfig
from flowopd.data import DataError, PromptRecord, read_source
from flowopd.hub import resolve_config
from flowopd.tracking import missing_backend


def check_logger(cfg) -> None:
    package = missing_backend(cfg.logger.backend)
    if package:
        raise ConfigError(f"logger.backend: {cfg.logger.backend} needs the {package!r} package (pip install {package})")


def preflight(cfg: JobConfig) -> list[list[PromptRecord]]:
    """Validate everything that can be checked without a cluster; returns the prompt records per source.
    Hub ids in the config are replaced by their local snapshots first."""
    from flowopd.models import transformer_config
    from flowopd.rollout import sde_schedule
    check_logger(cfg)
    resolve_config(cfg)
    base = Path(cfg.model.base)
    if not base.exists():
        raise ConfigError(f"model.base: {base} does not exist")
    try:
        tcfg = transformer_config(str(base))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.base: {base} is not a diffusers SD3 directory ({e})") from None
    check_resolution(cfg.model.resolution, base, tcfg)
    if cfg.student.base:
        sb = Path(cfg.student.base)
        try:
            same = transformer_config(str(sb)).get("num_layers") == tcfg.get("num_layers")
        except OSError:
            raise ConfigError(f"student.base: {sb} is not a diffusers SD3 directory") from None
        if not same:
            raise ConfigError(f"student.base: {sb} has another architecture than model.base {base}")
    if cfg.student.init_adapter:
        check_adapter("student.init_adapter", cfg.student.init_adapter, Path(cfg.student_base()))
    _check_teachers(cfg, base, tcfg)
    fake = getattr(cfg, "fake", None)  # distribution matching's fake score
    if fake is not None and fake.init_adapter:
        check_adapter("fake.init_adapter", fake.init_adapter, base)
    check_reward_specs(cfg.reward_specs())
    backprop = getattr(getattr(cfg, "rtdmd", None), "backprop", None)
    if backprop is not None:
        _check_differentiable(backprop.reward, next(r for r in cfg.reward_specs() if r.key == backprop.reward))
    sources = read_sources(cfg.data.sources)
    probe = getattr(cfg, "probe", None)
    if probe is not None:
        _check_probe(cfg, read_sources(probe.sources, "probe.sources"))
    for i, (src, records) in enumerate(zip(cfg.data.sources, sources)):
        for r in records:
            problem = cfg.task_problem(r.task)
            if problem:
                raise ConfigError(f"data.sources[{i}] ({src.path}): task {r.task!r} of prompt {r.prompt!r} {problem}")
    sc = cfg.sampling
    states = cfg.data.prompts_per_step * cfg.data.group_size * len(sde_schedule(sc.num_steps, sc, cfg.seed, 1)[1])
    if states < cfg.learner.ranks:
        raise ConfigError(f"learner.ranks: {cfg.learner.ranks} ranks but only {states} states per step")
    if cfg.needs_transitions() and sc.noise_level == 0:
        raise ConfigError("sampling.noise_level: this loss needs SDE rollouts (noise_level > 0) for its log-probs")
    return sources


def pixel_multiple(base: Path, tcfg: dict) -> int:
    """Image sides must be a multiple of this to map to whole latent patches: the VAE's downscale times the
    transformer's patch size (1, no constraint known, where the base has no VAE config)."""
    vae_file = base / "vae" / "config.json"
    if not vae_file.exists():
        return 1
    return 2 ** (len(json.loads(vae_file.read_text())["block_out_channels"]) - 1) * tcfg.get("patch_size", 1)


def check_resolution(resolution: int, base: Path, tcfg: dict) -> None:
    scale = pixel_multiple(base, tcfg)
    if resolution % scale:
        raise ConfigError(f"model.resolution: {resolution} is not a multiple of {scale} (VAE scale x patch size "
                          f"of {base}); use e.g. {max(scale, resolution // scale * scale)}")


def read_sources(specs, key: str = "data.sources") -> list[list[PromptRecord]]:
    """The records of every configured source; a bad file is reported under its `<key>[i]` key."""
    out = []
    for i, src in enumerate(specs):
        try:
            out.append(read_source(src.path, src.format, src.task))
        except DataError as e:
            raise ConfigError(f"{key}[{i}]: {e}") from None
    return out


def _check_probe(cfg, sources: list[list[PromptRecord]]) -> None:
    """Every probe prompt is of a task some reward scores (else its reward would be NaN throughout) and has a
    seed count."""
    for i, records in enumerate(sources):
        for r in records:
            cfg.probe.samples(r.task)
            problem = cfg.task_problem(r.task)
            if problem:
                raise ConfigError(f"probe.sources[{i}]: task {r.task!r} of prompt {r.prompt!r} {problem}")


def check_reward_specs(specs) -> None:
    """Every reward resolves to a class that accepts its kwargs (nothing is instantiated here)."""
    from rewards.registry import RewardError, load_reward_class
    for i, spec in enumerate(specs):
        try:
            cls = load_reward_class(spec.name)
        except RewardError as e:
            raise ConfigError(f"rewards[{i}].name: {e}") from None
        try:
            inspect.signature(cls).bind(**spec.kwargs)
        except TypeError as e:
            raise ConfigError(f"rewards[{i}].kwargs: {e} (reward {spec.name!r})") from None
        try:
            getattr(cls, "check_kwargs", lambda **kw: None)(**spec.kwargs)
        except ValueError as e:
            raise ConfigError(f"rewards[{i}].kwargs: {e} (reward {spec.name!r})") from None


def _check_differentiable(label: str, spec) -> None:
    from rewards.base import Reward
    from rewards.registry import load_reward_class
    if load_reward_class(spec.name).differentiable is Reward.differentiable:
        raise ConfigError(f"rtdmd.backprop.reward: reward {label!r} ({spec.name}) has no differentiable form; "
                          "back-propagation needs one (built in: brightness, world_style, clip_score, pickscore, hpsv2)")


def _check_teachers(cfg, base: Path, tcfg: dict) -> None:
    from flowopd.models import transformer_config
    for name in cfg.used_teachers():
        t = cfg.teachers[name]
        if t.adapter:
            check_adapter(f"teachers.{name}.adapter", t.adapter, base)
        elif t.transformer:
            p = Path(t.transformer)
            try:
                other = transformer_config(str(p))
            except OSError:
                raise ConfigError(f"teachers.{name}.transformer: {p} holds no transformer config.json") from None
            keys = ("in_channels", "num_layers", "patch_size", "joint_attention_dim", "pooled_projection_dim")
            diff = [k for k in keys if other.get(k) != tcfg.get(k)]
            if diff:
                raise ConfigError(f"teachers.{name}.transformer: {p} differs from the base model in {diff}: "
                                  f"OPD needs teachers of the student's architecture")


def check_adapter(key: str, path: str, base: Path) -> None:
    from flowopd.models import check_adapter_fits
    try:
        check_adapter_fits(path, str(base))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None
