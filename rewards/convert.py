"""Convert released preference-model checkpoints into the transformers directories the scorers load, without
open_clip, timm or BLIP's code (their torchvision pins are what keep them out of this environment):

    python -m rewards.convert hpsv2 --checkpoint HPS_v2.1_compressed.pt \\
        --base /models/CLIP-ViT-H-14-laion2B-s32B-b79K --output /models/hpsv2.1
    python -m rewards.convert imagereward --checkpoint ImageReward.pt \\
        --tokenizer /models/bert-base-uncased --output /models/imagereward

HPS v2.1 is an open_clip ViT-H-14 state dict; `--base` is the transformers copy of the CLIP it was fine-tuned
from, which supplies the config and the processor. ImageReward.pt holds BLIP (ViT-L + BERT with
cross-attention) and an MLP; its config is read off the tensor shapes and the tokenizer is bert-base-uncased
plus BLIP's [DEC] and [ENC]. Every key must find a place and every parameter must be filled, so a checkpoint
of another architecture fails naming the keys. The output appears whole or not at all.
"""
import argparse
import json
import pickle
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from .clip import load_state_dict
from .imagereward import DEFAULT_SETTINGS, SETTINGS, WEIGHTS, ImageRewardModel


class ConversionError(ValueError):
    """The checkpoint, base or output is not what the conversion needs; the message names which."""


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A state dict (safetensors, or a torch pickle with tensors only), unwrapped from {"state_dict": ...} and
    DataParallel's "module." prefix."""
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"checkpoint {p} does not exist")
    try:
        state = load_state_dict(str(p))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, SafetensorError) as e:
        raise ConversionError(f"checkpoint {p} is not a loadable torch state dict: {e}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"checkpoint {p} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _rename(state: dict, rules: list[tuple[str, str]], ignore: str, what: str) -> dict[str, torch.Tensor]:
    """Apply the first matching regex rule to each key; keys matching `ignore` are dropped, others must match."""
    out, unknown = {}, []
    for key, value in state.items():
        if re.fullmatch(ignore, key):
            continue
        for pattern, target in rules:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, target, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"{what}: {len(unknown)} keys of no known place, e.g. {unknown[:5]}")
    return out


_OPENCLIP_BLOCK = [(r"ln_1\.", "layer_norm1."), (r"ln_2\.", "layer_norm2."), (r"mlp\.c_fc\.", "mlp.fc1."),
                   (r"mlp\.c_proj\.", "mlp.fc2."), (r"attn\.out_proj\.", "self_attn.out_proj.")]


def openclip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP keys to transformers CLIPModel keys: fused in-projections are split into q/k/v and the
    projection matrices (used as x @ P) are transposed into Linear weights."""
    rules = [(r"visual\.conv1\.weight", "vision_model.embeddings.patch_embedding.weight"),
             (r"visual\.class_embedding", "vision_model.embeddings.class_embedding"),
             (r"visual\.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
             (r"visual\.ln_pre\.(.*)", r"vision_model.pre_layrnorm.\1"),
             (r"visual\.ln_post\.(.*)", r"vision_model.post_layernorm.\1"),
             (r"visual\.proj", "visual_projection.weight"),
             (r"token_embedding\.weight", "text_model.embeddings.token_embedding.weight"),
             (r"positional_embedding", "text_model.embeddings.position_embedding.weight"),
             (r"ln_final\.(.*)", r"text_model.final_layer_norm.\1"),
             (r"text_projection", "text_projection.weight"),
             (r"logit_scale", "logit_scale")]
    for src, dst in ((r"visual\.transformer", "vision_model.encoder"), (r"transformer", "text_model.encoder")):
        block = src + r"\.resblocks\.(\d+)\."
        rules += [(block + p + "(.*)", dst + r".layers.\1." + t + r"\2") for p, t in _OPENCLIP_BLOCK]
        rules.append((block + r"attn\.in_proj_(weight|bias)", dst + r".layers.\1.self_attn.in_proj.\2"))
    out = {}
    for key, value in _rename(state, rules, r".*attn_mask", "open_clip checkpoint").items():
        if key.endswith("_projection.weight"):
            value = value.T.contiguous()
        if ".in_proj." in key:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                out[key.replace("in_proj", name)] = part.contiguous()
        else:
            out[key] = value
    return out


def blip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward.pt keys (BLIP's timm-style ViT, its BERT, the MLP) to ImageRewardModel keys. The text
    encoder's names are already transformers' BLIP names; projections and heads ImageReward never uses are
    dropped."""
    vit, layer = r"blip\.visual_encoder\.", r"blip\.visual_encoder\.blocks\.(\d+)\."
    rules = [(vit + r"cls_token", "vision_model.embeddings.class_embedding"),
             (vit + r"pos_embed", "vision_model.embeddings.position_embedding"),
             (vit + r"patch_embed\.proj\.(.*)", r"vision_model.embeddings.patch_embedding.\1"),
             (vit + r"norm\.(.*)", r"vision_model.post_layernorm.\1")]
    rules += [(layer + p + r"\.(.*)", r"vision_model.encoder.layers.\1." + t + r".\2")
              for p, t in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), (r"attn\.qkv", "self_attn.qkv"),
                           (r"attn\.proj", "self_attn.projection"), (r"mlp\.fc1", "mlp.fc1"),
                           (r"mlp\.fc2", "mlp.fc2"))]
    rules += [(r"blip\.text_encoder\.(.*)", r"text_encoder.\1"), (r"mlp\.layers\.(.*)", r"mlp.\1")]
    ignore = r"blip\.(?!visual_encoder\.|text_encoder\.).*|blip\.text_encoder\.(embeddings\.position_ids|pooler\..*)"
    return _rename(state, rules, ignore, "ImageReward checkpoint")


def blip_config(state: dict[str, torch.Tensor], vision_heads: int, text_heads: int):
    """BlipConfig read off the converted tensor shapes (BlipConfig sets the cross-attention width to the
    vision width); heads are not visible in shapes, so they are given."""
    from transformers import BlipConfig
    try:
        pos = state["vision_model.embeddings.position_embedding"]
        patch = state["vision_model.embeddings.patch_embedding.weight"]
        words = state["text_encoder.embeddings.word_embeddings.weight"]
        vision = {"hidden_size": pos.shape[-1], "patch_size": patch.shape[-1],
                  "image_size": round((pos.shape[1] - 1) ** 0.5) * patch.shape[-1],
                  "intermediate_size": state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                  "num_hidden_layers": _count(state, r"vision_model\.encoder\.layers\.(\d+)\."),
                  "num_attention_heads": vision_heads, "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
        text = {"vocab_size": words.shape[0], "hidden_size": words.shape[1],
                "max_position_embeddings": state["text_encoder.embeddings.position_embeddings.weight"].shape[0],
                "intermediate_size": state["text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
                "num_hidden_layers": _count(state, r"text_encoder\.encoder\.layer\.(\d+)\."),
                "num_attention_heads": text_heads,
                "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0, "is_decoder": True}
    except KeyError as e:
        raise ConversionError(f"ImageReward checkpoint has no {e.args[0]} (after renaming)") from None
    for name, cfg in (("vision", vision), ("text", text)):
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            raise ConversionError(f"--{name}-heads {cfg['num_attention_heads']} does not divide the {name} "
                                  f"width {cfg['hidden_size']}")
    return BlipConfig(vision_config=vision, text_config=text)


def _count(state: dict, pattern: str) -> int:
    return 1 + max(int(m.group(1)) for k in state if (m := re.match(pattern, k)))


def _load_strict(model: torch.nn.Module, state: dict, what: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConversionError(f"{what} does not fit the target architecture: {e}") from None


class _Output:
    """Write into a sibling `.partial` directory and move it into place only when complete, so an interrupted
    or failed conversion leaves an existing output untouched."""

    def __init__(self, output: str, force: bool):
        self.final = Path(output)
        if self.final.exists() and not force:
            raise ConversionError(f"output {self.final} exists; pass --force to replace it")
        self.partial = self.final.with_name(self.final.name + ".partial")

    def __enter__(self) -> Path:
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        return self.partial

    def __exit__(self, kind, *_):
        if kind is not None:
            shutil.rmtree(self.partial, ignore_errors=True)
            return False
        if self.final.exists():
            shutil.rmtree(self.final)
        self.partial.rename(self.final)
        return False


def convert_hpsv2(checkpoint: str, base: str, output: str, force: bool = False) -> Path:
    """HPS v2.1 (open_clip) -> a CLIPModel directory for `rewards.clip.HPSv2`."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    target = _Output(output, force)
    if not (Path(base) / "config.json").is_file():
        raise ConversionError(f"--base {base} is not a transformers CLIP directory (no config.json)")
    config = CLIPConfig.from_pretrained(base, local_files_only=True)
    processor = CLIPProcessor.from_pretrained(base, local_files_only=True)
    model = CLIPModel(config).eval()
    _load_strict(model, openclip_to_transformers(read_checkpoint(checkpoint)), f"checkpoint {checkpoint}")
    with target as out:
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return target.final


def convert_imagereward(checkpoint: str, tokenizer: str, output: str, vision_heads: int = 16,
                        text_heads: int = 12, force: bool = False) -> Path:
    """ImageReward.pt -> a directory for `rewards.imagereward.ImageReward` (defaults: ViT-L/16, BERT-base)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, CLIPImageProcessor
    target = _Output(output, force)
    state = blip_to_transformers(read_checkpoint(checkpoint))
    config = blip_config(state, vision_heads, text_heads)
    model = ImageRewardModel(config).eval()
    _load_strict(model, state, f"checkpoint {checkpoint}")
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConversionError(f"--tokenizer {tokenizer} is not a tokenizer directory: {e}") from None
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tok) != config.text_config.vocab_size:
        raise ConversionError(f"--tokenizer {tokenizer} has {len(tok)} tokens with [DEC] and [ENC]; the "
                              f"checkpoint's text encoder has {config.text_config.vocab_size}")
    size = config.vision_config.image_size
    with target as out:
        config.save_pretrained(out)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS))
        tok.save_pretrained(out)
        CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out)
        (out / SETTINGS).write_text(json.dumps(DEFAULT_SETTINGS, indent=1))
    return target.final


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rewards.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="model", required=True)
    hps = sub.add_parser("hpsv2", help="HPS v2.1 open_clip checkpoint -> transformers CLIPModel")
    hps.add_argument("--base", required=True, help="transformers CLIP-ViT-H-14 directory (config + processor)")
    ir = sub.add_parser("imagereward", help="ImageReward.pt -> BLIP + MLP directory")
    ir.add_argument("--tokenizer", required=True, help="bert-base-uncased tokenizer directory")
    ir.add_argument("--vision-heads", type=int, default=16)
    ir.add_argument("--text-heads", type=int, default=12)
    for p in (hps, ir):
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--output", required=True)
        p.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    try:
        if args.model == "hpsv2":
            out = convert_hpsv2(args.checkpoint, args.base, args.output, args.force)
        else:
            out = convert_imagereward(args.checkpoint, args.tokenizer, args.output, args.vision_heads,
                                      args.text_heads, args.force)
    except ConversionError as e:
        sys.exit(f"rewards.convert {args.model}: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
