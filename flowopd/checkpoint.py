"""Atomic, resumable checkpoints: the student as a peft adapter directory, AdamW state, trainer state.

A checkpoint is written into a temporary directory and renamed into place, and `latest` is replaced
atomically afterwards, so a crash at any point leaves the previous checkpoint intact and findable.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"
STUDENT_DIR = "student"  # the trained adapter inside a checkpoint: a plain peft adapter directory


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_adapter(path: Path, lora: dict, config: LoraConfig) -> None:
    """A plain peft adapter directory (adapter_config.json + adapter_model.safetensors)."""
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    save_numpy({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in lora.items()},
               str(path / "adapter_model.safetensors"))


def _flatten_optimizer(state: dict):
    tensors, meta = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for idx, st in state["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                meta["scalars"][f"{idx}.{k}"] = v
    return tensors, meta


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        _, idx, k = key.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


class CheckpointManager:
    def __init__(self, root: str, keep: int = 3):
        self.root = Path(root)
        self.keep = keep

    def save(self, step: int, lora: dict, lora_cfg: LoraConfig, optimizer: dict, trainer_state: dict,
             extra_adapters: dict | None = None, extra_optimizers: dict | None = None) -> Path:
        """extra_adapters: further LoRA states of the same shape (e.g. an EMA, a fake score), saved as sibling
        adapters; extra_optimizers: the optimizer states of further trained models, by name."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(tmp / STUDENT_DIR, lora, lora_cfg)
        for name, state in (extra_adapters or {}).items():
            save_adapter(tmp / name, state, lora_cfg)
        for name, state in {"": optimizer, **(extra_optimizers or {})}.items():
            tensors, meta = _flatten_optimizer(state)
            stem = f"optimizer_{name}" if name else "optimizer"
            save_file(tensors, str(tmp / f"{stem}.safetensors"))
            write_json_atomic(tmp / f"{stem}.json", meta)
        write_json_atomic(tmp / STATE_FILE, {**trainer_state, "step": step})
        _fsync_dir(tmp)
        if final.exists():  # left by a run that went further before this one resumed from earlier
            stale = self.root / f".stale-{final.name}-{os.getpid()}"
            os.replace(final, stale)
            shutil.rmtree(stale)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        write_json_atomic(self.root / "latest", {"step": step, "dir": final.name})
        self._prune()
        return final

    def complete(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step_*") if (p / STATE_FILE).exists())

    def _prune(self) -> None:
        for p in self.complete()[:-self.keep]:
            shutil.rmtree(p, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (trusting `latest` only if it points at a complete one)."""
        try:
            d = self.root / json.loads((self.root / "latest").read_text())["dir"]
            if (d / STATE_FILE).exists():
                return d
        except (OSError, ValueError, KeyError):
            pass
        done = self.complete()
        return done[-1] if done else None

    @staticmethod
    def load(path: Path) -> dict:
        adapters = {d.name: {k: v.numpy() for k, v in load_file(str(d / "adapter_model.safetensors")).items()}
                    for d in path.iterdir() if (d / "adapter_model.safetensors").exists()}
        lora = adapters.pop(STUDENT_DIR)
        optimizers = {f.stem.removeprefix("optimizer").removeprefix("_"): _unflatten_optimizer(
            load_file(str(f)), json.loads(f.with_suffix(".json").read_text())) for f in path.glob("optimizer*.safetensors")}
        return {"lora": lora, "optimizer": optimizers.pop(""), "extra": adapters, "extra_optimizers": optimizers,
                "trainer_state": json.loads((path / STATE_FILE).read_text())}
