"""SFT cold start (paper §5.1): each task's teacher samples its own prompts once (ODE, fixed seeds); the
student then learns them by flow matching, x_s = (1 - s) x0 + s eps with target v = eps - x0, at the
sampling schedule's sigmas. The generated set is cached in output_dir/sft_data, so a resume reuses it."""
import json

import numpy as np
import ray
from safetensors.numpy import load_file, save_file

from flowopd.flow import schedule_sigmas
from flowopd.objectives import FlowMatchingSFT

from .sampler import Sampler
from .trainer import Trainer


class SFTTrainer(Trainer):
    name = "sft"
    uses_rollouts = False

    @staticmethod
    def make_objective(cfg) -> FlowMatchingSFT:
        return FlowMatchingSFT(cfg.sampling.num_steps)

    def start_services(self) -> dict[str, list]:
        self.data = self._load_or_generate()
        self.sigmas = schedule_sigmas(self.cfg.sampling.num_steps, self.cfg.sampling.shift, self.cfg.sampling.timesteps).numpy()
        return {}

    def _load_or_generate(self) -> dict:
        path = self.out / "sft_data"
        if (path / "tasks.json").exists():
            data = load_file(str(path / "data.safetensors"))
            data["task"] = np.asarray(json.loads((path / "tasks.json").read_text()))
            return data
        cfg, rc = self.cfg, self.cfg.rollout
        records = [r for src in self.sources for r in src]
        k = cfg.sft.samples_per_prompt
        models = {n: cfg.teachers[n].model_dump() for n in cfg.used_teachers()}
        samplers = [ray.remote(Sampler).options(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus,
                                                resources=rc.resources or None)
                    .remote(cfg.model, models, cfg.sft.sampling, cfg.seed, rc.batch_size) for _ in range(rc.workers)]
        try:
            x0, prompt_idx = [], []
            for name in models:
                mine = [i for i, r in enumerate(records) if cfg.route[r.task] == name]
                ids = np.repeat(mine, k)
                shards = np.array_split(np.arange(len(ids)), len(samplers))
                refs = [s.generate.remote(name, [records[ids[i]].prompt for i in sh], (ids[sh] * k + sh % k).tolist(),
                                          False) for s, sh in zip(samplers, shards) if len(sh)]
                x0 += ray.get(refs)
                prompt_idx.append(ids)
            embeds, pooled = ray.get(samplers[0].encode.remote([r.prompt for r in records]))
            neg_e, neg_p = ray.get(samplers[0].encode.remote([cfg.sampling.negative_prompt]))
        finally:
            for s in samplers:
                ray.kill(s)
        data = {"x0": np.concatenate(x0).astype(np.float32), "prompt_idx": np.concatenate(prompt_idx),
                "embeds": embeds.numpy(), "pooled": pooled.numpy(), "neg_embeds": neg_e.numpy(),
                "neg_pooled": neg_p.numpy()}
        tmp = self.out / ".sft_data.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(data, str(tmp / "data.safetensors"))
        (tmp / "tasks.json").write_text(json.dumps([r.task for r in records]))
        tmp.replace(path)
        data["task"] = np.asarray([r.task for r in records])
        return data

    def train_step(self) -> dict:
        cfg, d = self.cfg, self.data
        step = self.step_done + 1
        timer = self.start_step()
        rng = np.random.default_rng([cfg.seed, step])  # the whole batch follows from (seed, step)
        idx = rng.choice(len(d["x0"]), size=cfg.sft.batch_size, replace=len(d["x0"]) < cfg.sft.batch_size)
        j = rng.integers(0, cfg.sampling.num_steps, size=len(idx))
        x0 = d["x0"][idx]
        eps = rng.standard_normal(x0.shape).astype(np.float32)
        s = self.sigmas[j].reshape(-1, *([1] * (x0.ndim - 1)))
        batch = {"x": ((1 - s) * x0 + s * eps).astype(np.float32), "v_task": eps - x0, "step_idx": j,
                 "prompt_idx": d["prompt_idx"][idx], "x_next": None, "logp_old": None, "v_mar": None, "adv": None,
                 **{k: d[k] for k in ("embeds", "pooled", "neg_embeds", "neg_pooled")}}
        results = self.learn(batch, timer)
        self.step_done = step
        loss = np.concatenate([r["task_loss"] for r in results])
        tasks = d["task"][batch["prompt_idx"]]
        t = self.end_step(timer)
        return {"step": step, "loss": float(loss.mean()), "grad_norm": results[0]["grad_norm"], "time": t,
                "loss_per_task": {k: float(loss[tasks == k].mean()) for k in sorted(set(tasks))},
                "states": len(idx), "states_per_s": len(idx) / t["total"]}
