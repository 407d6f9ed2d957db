"""Cold-start merges of teacher LoRAs (paper §5.1) with peft, and their error against the exact merge.

Exact merging is in weight space: dW = sum_k w_k dW_k with dW_k = (alpha_k / r_k) B_k A_k.
* cat:    exact, as a LoRA of rank sum_k r_k (peft `add_weighted_adapter(..., "cat")`).
* svd:    the exact dW truncated back to rank `rank` by SVD (peft "svd").
* fuse:   the exact dW merged into the base weights: a full model directory, on which the student then
          trains a fresh LoRA.
* linear: the released Flow-OPD code's factor averaging, (sum_k w_k B_k)(sum_k w_k A_k): not dW in
          general; kept for comparison (needs equal ranks, alphas and targets).
"""
import json
import os
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel

from .models import load_transformer

MERGED = "merged"


class MergeError(ValueError):
    """Teachers that cannot be merged the way asked, with the reason."""


def normalise_weights(weights: list[float], normalize: bool = True) -> list[float]:
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise MergeError(f"merge weights must be non-negative with a positive sum, got {weights}")
    total = sum(weights)
    return [w / total for w in weights] if normalize else list(weights)


def load_teachers(base: str, adapters: dict[str, str]) -> PeftModel:
    names = list(adapters)
    model = PeftModel.from_pretrained(load_transformer(base), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model


def lora_layers(model: PeftModel) -> dict:
    return {name: m for name, m in model.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")}


@torch.no_grad()
def delta(model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    """The dense weight update of one adapter, per module (modules it does not target are absent)."""
    return {name: m.get_delta_weight(adapter).float() for name, m in lora_layers(model).items()
            if adapter in m.lora_A}


def exact_delta(model: PeftModel, names: list[str], weights: list[float]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for name, w in zip(names, weights):
        for mod, d in delta(model, name).items():
            total[mod] = total.get(mod, 0) + w * d
    return total


def relative_error(approx: dict, exact: dict) -> float:
    """||approx - exact||_F / ||exact||_F over every module."""
    num = sum(float(((approx.get(k, 0) - v) ** 2).sum()) for k, v in exact.items())
    den = sum(float((v ** 2).sum()) for v in exact.values())
    return (num / den) ** 0.5 if den else 0.0


@torch.no_grad()
def factor_average(model: PeftModel, names: list[str], weights: list[float]) -> None:
    """The released code's merge: average the A and B factors separately into a new adapter."""
    cfgs = [model.peft_config[n] for n in names]
    if len({c.r for c in cfgs}) > 1 or len({c.lora_alpha for c in cfgs}) > 1:
        raise MergeError(f"factor averaging needs equal ranks and alphas, got r={[c.r for c in cfgs]}, "
                         f"alpha={[c.lora_alpha for c in cfgs]}; use method cat, svd or fuse")
    if len({frozenset(c.target_modules) for c in cfgs}) > 1:
        raise MergeError("factor averaging needs the same target modules in every teacher; use cat, svd or fuse")
    model.add_adapter(MERGED, LoraConfig(r=cfgs[0].r, lora_alpha=cfgs[0].lora_alpha,
                                         target_modules=list(cfgs[0].target_modules), init_lora_weights=False))
    for m in lora_layers(model).values():
        if MERGED in m.lora_A:
            m.lora_A[MERGED].weight.copy_(sum(w * m.lora_A[n].weight for n, w in zip(names, weights)))
            m.lora_B[MERGED].weight.copy_(sum(w * m.lora_B[n].weight for n, w in zip(names, weights)))


def merge(base: str, adapters: dict[str, str], weights: list[float], method: str, out: str,
          rank: int | None = None) -> dict:
    """Merge into `out` (a peft adapter directory, or for `fuse` a full model directory); returns a report
    with the relative error of the merged update against the exact weighted sum."""
    names = list(adapters)
    model = load_teachers(base, adapters)
    exact = exact_delta(model, names, weights)
    if method in ("cat", "svd", "fuse"):
        model.add_weighted_adapter(names, weights, MERGED, combination_type="svd" if method == "svd" else "cat",
                                   svd_rank=rank)
    elif method == "linear":
        factor_average(model, names, weights)
    else:
        raise MergeError(f"unknown merge method {method!r} (cat, svd, fuse, linear)")
    report = {"method": method, "weights": dict(zip(names, weights)),
              "relative_error": relative_error(delta(model, MERGED), exact), "rank": model.peft_config[MERGED].r}
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if method == "fuse":
        model.set_adapter(MERGED)
        fused = model.merge_and_unload(adapter_names=[MERGED])
        link_pipeline(base, tmp, fused)
    else:
        for n in names:
            model.delete_adapter(n)
        model.save_pretrained(str(tmp / "_peft"), selected_adapters=[MERGED])
        os.replace(tmp / "_peft" / MERGED, tmp / "adapter")
        shutil.rmtree(tmp / "_peft")
        for f in (tmp / "adapter").iterdir():
            os.replace(f, tmp / f.name)
        (tmp / "adapter").rmdir()
    (tmp / "merge_report.json").write_text(json.dumps(report, indent=1))
    os.replace(tmp, out)
    return report


def link_pipeline(base: str, out: Path, transformer) -> None:
    """A diffusers pipeline directory holding `transformer`, with every other component linked to `base`."""
    out.mkdir(parents=True)
    for item in Path(base).iterdir():
        if item.name != "transformer":
            os.symlink(item.resolve(), out / item.name)
    transformer.save_pretrained(str(out / "transformer"))
