"""Experiment trackers beside metrics.jsonl: TensorBoard, wandb or MLflow, each imported only when chosen.

Keys are flattened with "/" (`loss/task`, `loss/mar`, `time/rollout`, `reward/<task>`, `loss_step/<j>`);
non-numeric values are left to the JSONL file. A resumed job purges what a lost run logged after its
checkpoint (TensorBoard), or continues the same run (wandb, MLflow), so the curves stay one line.
"""
import importlib.util
import math
from pathlib import Path

import numpy as np

BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # backend -> package
RENAME = {"loss": "loss/total", "task_loss": "loss/task", "mar_loss": "loss/mar", "reward_per_task": "reward",
          "loss_per_teacher": "loss_teacher", "loss_per_task": "loss_task", "loss_per_step": "loss_step",
          "rewards": "reward_output"}


def flatten(metrics: dict) -> dict[str, float]:
    """One metrics line as {"a/b": float}: nested dicts and lists joined with "/", finite numbers only."""
    out: dict[str, float] = {}

    def walk(key: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{key}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{key}/{i}", v)
        elif isinstance(value, (bool, int, float, np.number)) and math.isfinite(float(value)):
            out[key] = float(value)

    for k, v in metrics.items():
        if k != "step":
            walk(RENAME.get(k, k), v)
    return out


def missing_backend(backend: str) -> str | None:
    """The package a backend needs when it is not installed (checked before any actor starts)."""
    package = BACKENDS.get(backend)
    return package if package and importlib.util.find_spec(package) is None else None


class Tracker:
    """One run of one job in the chosen backend."""

    def __init__(self, cfg, output_dir: str, resume_step: int = 0, config: dict | None = None):
        self.backend = cfg.backend
        out = Path(output_dir)
        name = cfg.run_name or out.name
        if self.backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            log_dir = Path(cfg.dir) / name if cfg.dir else out / "tensorboard"
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step + 1)
        elif self.backend == "wandb":
            import wandb
            run_id = (out / "wandb_run_id")
            rid = run_id.read_text().strip() if run_id.exists() else wandb.util.generate_id()
            out.mkdir(parents=True, exist_ok=True)
            run_id.write_text(rid)
            self.run = wandb.init(project=cfg.project, name=name, id=rid, resume="allow", dir=str(out),
                                  config=config)
        else:
            import mlflow
            self.mlflow = mlflow
            if cfg.tracking_uri:
                mlflow.set_tracking_uri(cfg.tracking_uri)
            mlflow.set_experiment(cfg.project)
            run_id = out / "mlflow_run_id"
            rid = run_id.read_text().strip() if run_id.exists() else None
            self.run = mlflow.start_run(run_id=rid, run_name=None if rid else name)
            out.mkdir(parents=True, exist_ok=True)
            run_id.write_text(self.run.info.run_id)

    def log(self, metrics: dict, step: int) -> None:
        flat = flatten(metrics)
        if self.backend == "tensorboard":
            for k, v in flat.items():
                self.writer.add_scalar(k, v, step)
        elif self.backend == "wandb":
            self.run.log(flat, step=step)
        else:
            self.mlflow.log_metrics(flat, step=step)

    def log_image(self, tag: str, image: np.ndarray, step: int = 0) -> None:
        """An HxWx3 uint8 image (e.g. an evaluation grid)."""
        if self.backend == "tensorboard":
            self.writer.add_image(tag, image, step, dataformats="HWC")
        elif self.backend == "wandb":
            import wandb
            self.run.log({tag: wandb.Image(image)}, step=step)
        else:
            self.mlflow.log_image(image, f"{tag}.png")

    def close(self) -> None:
        if self.backend == "tensorboard":
            self.writer.close()
        elif self.backend == "wandb":
            self.run.finish()
        else:
            self.mlflow.end_run()


def make_tracker(cfg, output_dir: str, resume_step: int = 0, config: dict | None = None) -> Tracker | None:
    """A tracker for the `logger:` block, or None for the JSONL default."""
    if cfg is None or cfg.backend == "jsonl":
        return None
    return Tracker(cfg, output_dir, resume_step, config)
