"""Tiny assets for CPU runs and tests: a random SD3 base, random LoRA teachers, prompts in Flow-GRPO formats.

The teachers are random but fixed (seeded), so they are clearly different velocity fields to distil.
"""
from pathlib import Path

import torch
from peft import get_peft_model

from flowopd.models import load_transformer, lora_config, save_random_model

from .grammar import write_jsonl

TEACHERS = {"geneval_teacher": 1, "ocr_teacher": 2, "anchor": 3}
GENEVAL = [("counting", "three red cubes"), ("colors", "a blue ball"), ("position", "a cat left of a dog"),
           ("two_object", "a cup and a book"), ("color_attr", "a green car and a red bus"),
           ("single_object", "a photo of a clock")]
OCR = ['a sign that says "open"', 'a poster with the text "sale 50"', 'a mug printed with "hello"',
       'a label reading "abc"', 'a banner that says "flow"', 'a note with "opd 2"']


def make_random_adapter(base: str, out: Path, seed: int, rank: int = 4, scale: float = 0.5) -> None:
    """A LoRA with random A and B (both nonzero), so the teacher differs from the base."""
    torch.manual_seed(seed)
    model = get_peft_model(load_transformer(base), lora_config(rank, rank, init=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * scale / p.shape[1] ** 0.5)
    model.save_pretrained(str(out))


def write_prompt_files(root: Path) -> None:
    """geneval_train.jsonl (Flow-GRPO GenEval metadata) and ocr_train.txt (quoted target text)."""
    write_jsonl(root / "geneval_train.jsonl", [{"tag": tag, "include": [{"class": prompt.split()[-1], "count": 1}],
                                                "prompt": prompt} for tag, prompt in GENEVAL])
    (root / "ocr_train.txt").write_text("\n".join(OCR) + "\n")


def ensure_tiny_assets(root: str) -> Path:
    """Create (once) base/, teachers/<name>/ and prompts under root; return root."""
    root = Path(root)
    done = root / ".complete"
    if done.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    save_random_model(str(base))
    for name, seed in TEACHERS.items():
        make_random_adapter(str(base), root / "teachers" / name, seed, scale=0.3 if name == "anchor" else 0.6)
    write_prompt_files(root)
    done.touch()
    return root
