"""The world's base model: the "world" preset of the real SD3 classes, trained on one CPU.

Two phases, both plain PyTorch: the VAE learns to reconstruct 32 px renderings (its latent statistics
then set the pipeline's shift and scaling factors), and the transformer learns them by rectified-flow
matching with SD3's logit-normal timestep density and prompt dropout for classifier-free guidance, with the
text encoders learning beside it (random frozen encoders leave the transformer unable to bind a character
to its position: measured in the README).
The training images mix exact renderings with controlled mistakes (`grammar.render_imperfect`), so the
base model is decent but leaves headroom on every task.
"""
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from flowopd.models import encode_prompts

from .grammar import (
    composition_prompts,
    render,
    render_imperfect,
    split,
    style_prompts,
    text_prompts,
    unseen_recombinations,
    write_jsonl,
)

MAX_SEQUENCE_LENGTH = 40
TASKS = ("composition", "text", "style")


def world_records(seed: int = 0) -> dict[str, tuple[list[dict], list[dict]]]:
    """{task: (train, test)}: whole prompts held out, so test combinations are never seen in training."""
    grammar = {"composition": composition_prompts(), "text": text_prompts(), "style": style_prompts()}
    return {task: split(records, seed=seed) for task, records in grammar.items()}


def write_prompt_files(root: Path, seed: int = 0) -> dict[str, Path]:
    """world_<task>_<split>.jsonl with prompt, task and metadata, readable by `format: jsonl` sources, and
    world_unseen.jsonl: held-out prompts that recombine nothing seen in training (`unseen_recombinations`)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    records = world_records(seed)
    for task, parts in records.items():
        for name, recs in zip(("train", "test"), parts):
            path = paths[f"{task}_{name}"] = root / f"world_{task}_{name}.jsonl"
            write_jsonl(path, recs)
    paths["unseen"] = root / "world_unseen.jsonl"
    write_jsonl(paths["unseen"], unseen_recombinations([r for train, _ in records.values() for r in train], seed=seed))
    return paths


def training_images(records: list[dict], per_task: int, imperfect: float, seed: int, layout: str = "grid"):
    """(prompts, uint8 images): `per_task` renderings of each task, spread evenly over its prompts (so a
    task with few prompts is not drowned out), a fraction `imperfect` of them wrong."""
    rng = np.random.default_rng(seed)
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    prompts, images = [], []
    for recs in by_task.values():
        for i in range(per_task):
            record = recs[i % len(recs)]
            wrong = rng.random() < imperfect
            images.append(render_imperfect(record, rng, layout) if wrong else render(record, rng, layout))
            prompts.append(record["prompt"])
    return prompts, np.stack(images)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _schedule(opt, steps: int, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(i, steps) / steps)))


def train_vae(vae, images: np.ndarray, steps: int, batch_size: int, lr: float, seed: int,
              log: Callable[[int, float], None] = lambda i, loss: None, device: str = "cpu") -> float:
    """L1 reconstruction (ink pixels weigh 10x the white background, or small shapes lose their colour)
    + a small KL, then set shift/scaling so latents have zero mean and unit variance.
    Returns the final mean absolute reconstruction error in pixel levels (0-255). Random draws come from a
    CPU generator on every device, so where it trains changes a run only by float rounding."""
    g = torch.Generator().manual_seed(seed)
    pixels = to_pixels(images).to(device)
    vae.to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = _schedule(opt, steps, warmup=max(1, steps // 20))
    for i in range(steps):
        x = pixels[torch.randint(len(pixels), (batch_size,), generator=g).to(device)]
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample(generator=g)).sample
        ink = 1 + 9 * (x < 0.95).any(1, keepdim=True).float()
        loss = (ink * (recon - x).abs()).mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log(i, loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(pixels[j:j + 256]).latent_dist.mode() for j in range(0, len(pixels), 256)])
        vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1.0 / z.std().item())
        recon = torch.cat([vae.decode(z[j:j + 256]).sample for j in range(0, min(len(z), 1024), 256)])
    error = float((recon.clamp(-1, 1) - pixels[:len(recon)]).abs().mean() * 127.5)
    vae.to("cpu")
    return error


@torch.no_grad()
def encode_latents(vae, images: np.ndarray) -> torch.Tensor:
    pixels = to_pixels(images).to(vae.device)
    z = torch.cat([vae.encode(pixels[j:j + 256]).latent_dist.mode() for j in range(0, len(pixels), 256)])
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def train_transformer(pipe, prompts: list[str], images: np.ndarray, steps: int, batch_size: int, lr: float,
                      seed: int, cond_dropout: float = 0.1,
                      log: Callable[[int, float], None] = lambda i, loss: None, device: str = "cpu",
                      resume: dict | None = None, checkpoint: Callable[[dict], None] | None = None,
                      checkpoint_every: int = 500, stop: Callable[[], bool] = lambda: False,
                      train_text_encoders: bool = False) -> float | None:
    """Rectified flow: x_s = (1 - s) x0 + s eps, target eps - x0, s = sigmoid(N(0, 1)) as in SD3.
    Returns the mean loss over the last tenth of the steps. Every `checkpoint_every` steps, and when `stop()`
    turns true, `checkpoint` gets the training state: passed back as `resume`, it continues the run exactly
    (same device). Returns None when it stopped before the last step.

    With `train_text_encoders` the three text encoders learn with the transformer (each batch's prompts
    encoded with gradients), so they can carry what the image needs, e.g. which character stands where."""
    g = torch.Generator().manual_seed(seed)
    latents = encode_latents(pipe.vae, images).to(device)
    unique = sorted(set(prompts)) + [""]
    embeds, pooled = (t.to(device) for t in encode_prompts(pipe, unique, MAX_SEQUENCE_LENGTH))
    index = {p: i for i, p in enumerate(unique)}
    prompt_ids = torch.tensor([index[p] for p in prompts])
    model = pipe.transformer.to(device).train().requires_grad_(True)
    encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3] if train_text_encoders else []
    for enc in encoders:
        enc.to(device).train().requires_grad_(True)
    params = [p for m in [model, *encoders] for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = _schedule(opt, steps, warmup=max(1, steps // 20))
    tail, start = [], 0
    if resume is not None:
        for enc, state in zip(encoders, resume.get("encoders", [])):
            enc.load_state_dict(state)
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        g.set_state(resume["generator"])
        tail, start = list(resume["tail"]), resume["step"]
    for i in range(start, steps):
        idx = torch.randint(len(latents), (batch_size,), generator=g)
        ids = prompt_ids[idx].clone()
        ids[torch.rand(batch_size, generator=g) < cond_dropout] = len(unique) - 1
        x0, ids = latents[idx.to(device)], ids.to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        s = torch.sigmoid(torch.randn(batch_size, generator=g)).view(-1, 1, 1, 1).to(device)
        if encoders:  # this batch's prompts through the encoders, with gradients
            used, where = torch.unique(ids, return_inverse=True)
            e, p = pipe.encode_prompt(prompt=[unique[i] for i in used.tolist()], prompt_2=None, prompt_3=None,
                                      do_classifier_free_guidance=False, device=device,
                                      max_sequence_length=MAX_SEQUENCE_LENGTH)[::2]
            cond, cond_pooled = e[where], p[where]
        else:
            cond, cond_pooled = embeds[ids], pooled[ids]
        v = model(hidden_states=(1 - s) * x0 + s * noise, timestep=s.flatten() * 1000,
                  encoder_hidden_states=cond, pooled_projections=cond_pooled, return_dict=False)[0]
        loss = ((v - (noise - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        log(i, loss.item())
        if i >= steps - max(1, steps // 10):
            tail.append(loss.item())
        done = i + 1
        if checkpoint is not None and done < steps and (done % checkpoint_every == 0 or stop()):
            checkpoint({"step": done, "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "generator": g.get_state(), "tail": tail,
                        "encoders": [enc.state_dict() for enc in encoders]})
            if stop():
                for m in [model, *encoders]:
                    m.to("cpu")
                return None
    for m in [model, *encoders]:
        m.to("cpu").eval().requires_grad_(False)
    return float(np.mean(tail))
