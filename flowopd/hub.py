"""Hugging Face Hub ids wherever a config names a model directory: `owner/name` (or `hf://owner/name/sub/dir`
for a folder inside a repo) is fetched once through the Hub cache (huggingface_hub.snapshot_download) and
replaced by its local snapshot, in the driver, before any actor starts; actors only ever see local paths.
With HF_HUB_OFFLINE=1 the cache alone answers. A local path that exists always wins over an id."""
import os
import re
from pathlib import Path

from .config import ConfigError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(ConfigError):
    """An id that is neither a local path, nor reachable, nor cached."""


def is_hub_id(value: str) -> bool:
    return value.startswith("hf://") or (REPO_ID.match(value) is not None and not Path(value).exists())


def resolve(value: str, key: str) -> str:
    """`value` itself when it is a local path (or not a Hub id), else the local snapshot of the repo."""
    if not isinstance(value, str) or not is_hub_id(value):
        return value
    repo, _, sub = value.removeprefix("hf://").partition("/")
    name, _, rest = sub.partition("/")
    repo_id = f"{repo}/{name}"
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        local = snapshot_download(repo_id, allow_patterns=[f"{rest}/*"] if rest else None, local_files_only=offline)
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HFValidationError, OSError) as e:
        why = "not in the Hub cache (HF_HUB_OFFLINE is set)" if offline else f"not reachable ({type(e).__name__})"
        raise HubError(f"{key}: {value!r} is not a local path, and the Hub repo {repo_id!r} is {why}") from None
    path = Path(local) / rest
    if not path.exists():
        raise HubError(f"{key}: {value!r}: the Hub repo {repo_id!r} has no folder {rest!r}")
    return str(path)


def resolve_config(cfg) -> None:
    """Replace every Hub id in a validated job config by its local snapshot (in place): the base model,
    the student's base and initial adapter, teachers and evaluated models, and reward model paths
    (reward `kwargs` whose name ends in `path`)."""
    cfg.model.base = resolve(cfg.model.base, "model.base")
    student = getattr(cfg, "student", None)
    if student is not None:
        for k in ("base", "init_adapter"):
            if getattr(student, k):
                setattr(student, k, resolve(getattr(student, k), f"student.{k}"))
    for section in ("teachers", "models"):
        for name, spec in (getattr(cfg, section, None) or {}).items():
            for k in ("adapter", "transformer"):
                if getattr(spec, k, None):
                    setattr(spec, k, resolve(getattr(spec, k), f"{section}.{name}.{k}"))
    for section in ("rewards", "monitor"):
        for i, spec in enumerate(getattr(cfg, section, None) or []):
            for k, v in spec.kwargs.items():
                if k.endswith("path") and isinstance(v, str):
                    spec.kwargs[k] = resolve(v, f"{section}[{i}].kwargs.{k}")
