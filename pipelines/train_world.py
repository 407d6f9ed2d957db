"""Train the world's base model and write its prompt files; the shipped assets/world/ came from

    python -m pipelines.train_world --output assets/world

The VAE and then the transformer of a "world"-preset SD3 pipeline (with its text encoders, unless
--text-encoders frozen) learn renderings of the training prompts (a fraction of them deliberately wrong), on
CPU in about an hour on 2 cores. The output is
a diffusers pipeline directory (safetensors) in <output>/base, prompt files world_<task>_<split>.jsonl,
and train_world.json with the settings and final losses. An existing output is never overwritten.
A larger base (--layers, --heads) trains in minutes on a GPU (--device cuda); its files stay on CPU.

Resumable: the trained VAE and a transformer checkpoint every --checkpoint-every steps go to
<output>/.train_world/; --resume continues from there exactly (same settings, same device), and
--time-limit MINUTES checkpoints and exits with status 3 once that much time has passed, e.g. to spread a
larger base over several sessions:

    python -m pipelines.train_world --output runs/world4 --layers 4 --heads 4 --time-limit 60
    python -m pipelines.train_world --output runs/world4 --layers 4 --heads 4 --time-limit 60 --resume
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from world.grammar import LAYOUTS

WORK_DIR = ".train_world"  # an interrupted run's VAE and transformer checkpoint
RUN_SETTINGS = ("seed", "per_task", "imperfect", "layout", "text_encoders", "vae_steps", "steps", "batch_size", "lr",
                "layers", "heads", "device")  # what a resumed run must share with the interrupted one

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="assets/world")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-task", type=int, default=4000, help="renderings per task")
    ap.add_argument("--imperfect", type=float, default=0.4, help="fraction of renderings that are wrong")
    ap.add_argument("--layout", choices=LAYOUTS, default="grid",
                    help="where composition objects go (world.grammar.render; assets/world used 'row')")
    ap.add_argument("--text-encoders", choices=("train", "frozen"), default="train",
                    help="learn the text encoders with the transformer (they then carry which character stands "
                         "where) or keep them random (assets/world did)")
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=10000, help="transformer steps")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the world preset's 3)")
    ap.add_argument("--heads", type=int, default=None,
                    help="attention heads of width 32 (default: the world preset's 3, i.e. width 96)")
    ap.add_argument("--device", default="cpu", help="where the VAE and transformer train, e.g. cuda")
    ap.add_argument("--force", action="store_true", help="replace an existing <output>/base (and start over)")
    ap.add_argument("--resume", action="store_true", help="continue the interrupted run in <output>/.train_world")
    ap.add_argument("--checkpoint-every", type=int, default=500, help="transformer steps between checkpoints")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="minutes; then checkpoint and exit with status 3 (continue with --resume)")
    args = ap.parse_args(argv)
    out = Path(args.output)
    work = out / WORK_DIR
    if (out / "base").exists() and not args.force:
        print(f"error: {out / 'base'} exists; pass --force to replace it", file=sys.stderr)
        return 2
    settings = {k: v for k, v in vars(args).items() if k in RUN_SETTINGS}
    if args.force:
        shutil.rmtree(work, ignore_errors=True)
    elif work.exists() and not args.resume:
        print(f"error: {work} holds an interrupted run; pass --resume to continue it or --force to start over",
              file=sys.stderr)
        return 2
    elif args.resume and work.exists():
        saved = json.loads((work / "settings.json").read_text())
        changed = [k for k in RUN_SETTINGS if saved.get(k) != settings[k]]
        if changed:
            k = changed[0]
            print(f"error: --{k.replace('_', '-')} is {settings[k]!r} but the interrupted run in {work} used "
                  f"{saved.get(k)!r}; resume with the same settings", file=sys.stderr)
            return 2
    import torch
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    from flowopd.models import build_random_pipeline, quiet_libraries
    from world.base_model import train_transformer, train_vae, training_images, world_records, write_prompt_files
    quiet_libraries()
    torch.manual_seed(args.seed)
    records = [r for train, _ in world_records(args.seed).values() for r in train]
    prompts, images = training_images(records, args.per_task, args.imperfect, args.seed, args.layout)
    print(f"[train_world] {len(records)} training prompts, {len(images)} renderings", file=sys.stderr)
    size = {"num_layers": args.layers} if args.layers else {}
    if args.heads:  # the text stream's width must equal the image stream's (heads x 32)
        size.update(num_attention_heads=args.heads, caption_projection_dim=32 * args.heads)
    pipe = build_random_pipeline("world", args.seed, **size)
    started = time.time()
    work.mkdir(parents=True, exist_ok=True)
    (work / "settings.json").write_text(json.dumps(settings, indent=1))
    checkpoint = work / "transformer.pt"  # this program's own file (optimizer and scheduler state): not weights only
    state = torch.load(checkpoint, weights_only=False) if checkpoint.exists() else None
    elapsed = state["minutes"] if state else 0.0

    def bar(name, steps, done=0):
        progress = tqdm(total=steps, initial=done, desc=name, mininterval=5)
        return lambda i, loss: (progress.update(1), progress.set_postfix(loss=f"{loss:.4f}", refresh=False))

    if (work / "vae.json").exists():
        pipe.vae = AutoencoderKL.from_pretrained(work / "vae", local_files_only=True)
        recon = json.loads((work / "vae.json").read_text())["reconstruction_error_levels"]
    else:
        recon = train_vae(pipe.vae, images, args.vae_steps, 32, 2e-3, args.seed, bar("vae", args.vae_steps),
                          device=args.device)
        pipe.vae.save_pretrained(work / "vae")
        (work / "vae.json").write_text(json.dumps({"reconstruction_error_levels": recon}))

    def minutes() -> float:
        return elapsed + (time.time() - started) / 60

    def save(state: dict) -> None:
        torch.save({**state, "minutes": minutes()}, work / "transformer.tmp")
        os.replace(work / "transformer.tmp", checkpoint)

    loss = train_transformer(pipe, prompts, images, args.steps, args.batch_size, args.lr, args.seed,
                             log=bar("transformer", args.steps, state["step"] if state else 0), device=args.device,
                             resume=state, checkpoint=save, checkpoint_every=args.checkpoint_every,
                             stop=lambda: args.time_limit is not None and time.time() - started > 60 * args.time_limit,
                             train_text_encoders=args.text_encoders == "train")
    if loss is None:
        step = torch.load(checkpoint, weights_only=False)["step"]
        print(f"[train_world] time limit: stopped at transformer step {step} of {args.steps}; continue with "
              f"the same command and --resume", file=sys.stderr)
        return 3
    tmp = out / ".base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    if (out / "base").exists():
        shutil.rmtree(out / "base")
    os.replace(tmp, out / "base")
    write_prompt_files(out, args.seed)
    report = {**vars(args), "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
              "training_prompts": len(records), "renderings": len(images),
              "vae_reconstruction_error_levels": recon, "final_flow_loss": loss,
              "minutes": minutes()}
    (out / "train_world.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(work)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
