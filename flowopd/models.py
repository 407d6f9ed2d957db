"""SD3-family models via diffusers and LoRA via peft: loading, the tiny random builder, velocity calls.

Teachers and learners need only the transformer (text embeddings travel with the rollout); rollout
workers also load the text encoders. Everything loads from local directories only.
"""
import json
import os
import pickle
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from torch.nn.parallel import DistributedDataParallel
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from .config import LORA_TARGETS
from .flow import cfg_velocity
from .simulated import SimulatedTransformer

STUDENT = "default"  # peft saves the "default" adapter as a plain adapter directory


def quiet_libraries() -> None:
    """Silence per-call progress bars and tokenizer chatter in long-lived actors."""
    import diffusers
    import transformers
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def as_tensor(a, device=None) -> torch.Tensor:
    """torch view of an array (read-only arrays from Ray's object store are copied first)."""
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        a = a.copy()
    return torch.as_tensor(a, device=device)


def resolve_device(device: str = "auto") -> torch.device:
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                        ("cpu" if device == "auto" else device))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU unless asked otherwise."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


PRESETS = {
    # CPU tests and demos: 8x8 latents (16 px), 2 layers.
    "tiny": {"transformer": {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4,
                             "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                             "joint_attention_dim": 32, "caption_projection_dim": 32,
                             "pooled_projection_dim": 64, "pos_embed_max_size": 32},
             "clip_dims": (32, 32), "t5_dim": 32, "text_layers": 2,
             "vae": {"latent_channels": 4, "block_out_channels": (8, 16), "layers_per_block": 1,
                     "norm_num_groups": 4}},
    # The one-machine world: 32 px images, 16x16x4 latents, 3 layers; trained by world.base_model.
    "world": {"transformer": {"sample_size": 16, "patch_size": 2, "in_channels": 4, "out_channels": 4,
                              "num_layers": 3, "attention_head_dim": 32, "num_attention_heads": 3,
                              "joint_attention_dim": 32, "caption_projection_dim": 96,
                              "pooled_projection_dim": 64, "pos_embed_max_size": 16},
              "clip_dims": (32, 32), "t5_dim": 32, "text_layers": 2, "clip_max_length": 48,
              # quotes and commas are tokens (real CLIP vocabularies have them): an unknown symbol would
              # read as end-of-text, whose position gives CLIP its pooled output, so a quoted string would
              # leave no trace in the pooled embedding (the first world's base, assets/world, has that flaw)
              "symbols": '",',
              "vae": {"latent_channels": 4, "block_out_channels": (16, 32), "layers_per_block": 1,
                      "norm_num_groups": 8}},
    # The SD3.5-Medium MMDiT (2.24 B parameters) for GPU benchmarks; small random text encoders with the
    # real output widths (CLIP-L 768 + CLIP-G 1280 pooled, T5 4096), which run once per prompt.
    "sd35m": {"transformer": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
                              "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24,
                              "joint_attention_dim": 4096, "caption_projection_dim": 1536,
                              "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
                              "dual_attention_layers": tuple(range(13))},
              "clip_dims": (768, 1280), "t5_dim": 4096, "text_layers": 1,
              "vae": {"latent_channels": 16, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
                      "norm_num_groups": 32}},
    # CPU cluster simulations (flowopd.simulated): SD3.5-M's tensor sizes at a delay per call; thin text
    # encoders (T5 d_ff 16) of the real widths, a thin VAE with scale 8 and 16 latent channels.
    "sim": {"transformer_class": SimulatedTransformer,
            "transformer": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
                            "num_layers": 24, "width": 1536, "joint_attention_dim": 4096,
                            "pooled_projection_dim": 2048},
            "clip_dims": (768, 1280), "t5_dim": 4096, "t5_ff": 16, "text_layers": 1,
            "vae": {"latent_channels": 16, "block_out_channels": (8, 8, 8, 8), "layers_per_block": 1,
                    "norm_num_groups": 4}},
}


def build_random_pipeline(preset: str = "tiny", seed: int = 0, **transformer_overrides) -> StableDiffusion3Pipeline:
    """A random-init SD3 pipeline of the real classes with in-memory tokenizers; runs offline.

    Presets: "tiny" (CPU; 16 px images), "sd35m" (SD3.5-Medium-size transformer, for GPU benchmarks) and "sim"
    (flowopd.simulated's stand-in at SD3.5-M's tensor sizes, for CPU cluster simulations)."""
    spec = PRESETS[preset]
    torch.manual_seed(seed)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(spec.get("symbols", ""))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    clip_len = spec.get("clip_max_length", 77)
    clip_tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=clip_len)
    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    t5_vocab += [("\u2581" + c, -1.0) for c in chars] + [(c, -2.0) for c in chars]
    t5_tok = T5Tokenizer(vocab=t5_vocab, extra_ids=0, model_max_length=512)
    layers = spec["text_layers"]

    def clip(dim):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=dim, intermediate_size=2 * dim, num_attention_heads=2, num_hidden_layers=layers,
            vocab_size=len(vocab), max_position_embeddings=clip_len, projection_dim=dim, bos_token_id=0,
            eos_token_id=1, pad_token_id=1))

    t5_dim = spec["t5_dim"]
    t5_cfg = T5Config(vocab_size=len(t5_vocab), d_model=t5_dim, d_kv=8, d_ff=spec.get("t5_ff", 2 * t5_dim),
                      num_layers=layers, num_heads=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=1)
    tcfg = {**spec["transformer"], **transformer_overrides}
    transformer = spec.get("transformer_class", SD3Transformer2DModel)(**tcfg)
    v = spec["vae"]
    n = len(v["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=v["latent_channels"],
                        block_out_channels=v["block_out_channels"], down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=v["layers_per_block"],
                        norm_num_groups=v["norm_num_groups"], sample_size=tcfg["sample_size"] * 2 ** (n - 1),
                        shift_factor=0.0609, scaling_factor=1.5305)
    c1, c2 = spec["clip_dims"]
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=clip(c1), tokenizer=clip_tok, text_encoder_2=clip(c2), tokenizer_2=clip_tok,
        text_encoder_3=T5EncoderModel(t5_cfg), tokenizer_3=t5_tok)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def load_pipeline(path: str, dtype: torch.dtype = torch.float32, device="cpu",
                  compile: bool = False) -> StableDiffusion3Pipeline:
    simulated = transformer_class(transformer_config(path)) is SimulatedTransformer  # not a diffusers class
    extra = {"transformer": load_transformer(path, dtype, device)} if simulated else {}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=dtype, local_files_only=True, **extra).to(device)
    if compile:
        compile_transformer(pipe.transformer)
    return pipe


def load_transformer(path: str, dtype: torch.dtype = torch.float32, device="cpu",
                     compile: bool = False) -> SD3Transformer2DModel:
    """The transformer of a diffusers pipeline directory, or a bare transformer directory."""
    sub = "transformer" if (Path(path) / "transformer" / "config.json").exists() else None
    cls = transformer_class(transformer_config(path))
    model = cls.from_pretrained(path, subfolder=sub, dtype=dtype, local_files_only=True)
    model = model.to(device).requires_grad_(False).eval()
    return compile_transformer(model) if compile else model


# graphs per process: dynamo counts them per code object, which all transformers of a class share (buckets
# x adapters or base x grad mode x train/eval, summed over the transformers an actor hosts)
RECOMPILE_LIMIT = 64


def compile_transformer(model: SD3Transformer2DModel) -> SD3Transformer2DModel:
    """torch.compile in place (nn.Module.compile), so that peft can still wrap the module and switch its
    adapters. Static shapes: `velocity` pads every batch to a `batch_bucket` size, so each bucket compiles
    once; each adapter, grad mode and train/eval state the module is called in adds its own graphs."""
    if model._compiled_call_impl is None:
        cfg = torch._dynamo.config  # cache_size_limit: recompile_limit's name before torch 2.6, still an alias
        cfg.cache_size_limit = max(cfg.cache_size_limit, RECOMPILE_LIMIT)
        model.compile(dynamic=False)
    return model


def is_compiled(model) -> bool:
    """Whether the transformer in `model` (bare, peft-wrapped or under DDP) was compiled in place."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return model._compiled_call_impl is not None


def batch_bucket(n: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 3 * 2^k) that is at least n: a compiled
    model sees few batch sizes, padding wastes at most a third, and 8/24/48-sample batches (16/48/96 with
    CFG) need none."""
    p = 1 << max(n - 1, 0).bit_length()
    return 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p


def transformer_config(path: str) -> dict:
    sub = Path(path) / "transformer" / "config.json"
    return json.loads((sub if sub.exists() else Path(path) / "config.json").read_text())


def transformer_class(config: dict) -> type:
    """SD3Transformer2DModel, or the CPU stand-in (flowopd.simulated) a transformer config names."""
    return SimulatedTransformer if config.get("_class_name") == SimulatedTransformer.__name__ else SD3Transformer2DModel


@torch.no_grad()
def encode_prompts(pipe: StableDiffusion3Pipeline, prompts: list[str], max_sequence_length: int):
    """(prompt_embeds, pooled) as fp32 CPU tensors, one row per prompt."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
    return embeds.float().cpu(), pooled.float().cpu()


def lora_config(rank: int, alpha: float, targets=None, init="gaussian") -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets or LORA_TARGETS),
                      init_lora_weights=init)


def add_student_adapter(transformer, config: LoraConfig, init_from: str | None = None) -> PeftModel:
    """Base + trainable LoRA named 'student' (fresh, or initialised from a peft adapter directory)."""
    if init_from:
        return PeftModel.from_pretrained(transformer, init_from, adapter_name=STUDENT, is_trainable=True)
    return get_peft_model(transformer, config, adapter_name=STUDENT)


def lora_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The student's LoRA weights (the payload of a weight sync), detached fp32 CPU copies."""
    return {k: v.detach().float().cpu().clone()
            for k, v in get_peft_model_state_dict(model, adapter_name=STUDENT).items()}


def load_lora_state(model: PeftModel, state: dict) -> None:
    result = set_peft_model_state_dict(model, {k: as_tensor(v) for k, v in state.items()},
                                       adapter_name=STUDENT)
    bad = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if bad:
        raise ValueError(f"weight sync carries keys the student does not have: {bad[:3]}")


def velocity(model, latents, sigma, embeds, pooled, neg_embeds=None, neg_pooled=None, guidance=1.0,
             autocast_dtype=None, detach_uncond: bool = False):
    """Model velocity at (latents, sigma) with classifier-free guidance in one batched forward.

    detach_uncond stops the gradient through the unconditional branch, as Flow-GRPO's policy does: the
    guided velocity's gradient is then g * d(v_cond) only."""
    use_cfg = guidance != 1.0 and neg_embeds is not None
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device).expand(latents.shape[0])
    dtype = next(model.parameters()).dtype
    ctx = (torch.autocast(latents.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext())
    bucketed = is_compiled(model)

    def forward(x, t, e, p):
        n = x.shape[0]
        if bucketed and (pad := batch_bucket(n) - n):  # copies of the last row, sliced off below
            x, t, e, p = (torch.cat([a, a[-1:].expand(pad, *a.shape[1:])]) for a in (x, t, e, p))
        with ctx:
            return model(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=e.to(dtype),
                         pooled_projections=p.to(dtype), return_dict=False)[0][:n].float()

    t = sigma * 1000
    if not use_cfg:
        return forward(latents, t, embeds, pooled)
    neg_e, neg_p = neg_embeds.expand_as(embeds), neg_pooled.expand_as(pooled)
    if detach_uncond and torch.is_grad_enabled():  # no graph for the branch that gets no gradient
        with torch.no_grad():
            v_u = forward(latents, t, neg_e, neg_p)
        return cfg_velocity(forward(latents, t, embeds, pooled), v_u, guidance)
    out = forward(torch.cat([latents, latents]), torch.cat([t, t]), torch.cat([neg_e, embeds]),
                  torch.cat([neg_p, pooled]))
    v_u, v_c = out.chunk(2)
    return cfg_velocity(v_c, v_u, guidance)


class ModelBank:
    """Several frozen models on one base: peft LoRA adapters by name, the base itself (adapter disabled)
    and full transformer checkpoints. `use(name)` is a context manager yielding the module to call."""

    def __init__(self, base: str, specs: dict[str, dict], dtype: torch.dtype, device: torch.device,
                 base_module=None, compile: bool = False):
        self.kind, self.full, self.peft = {}, {}, None
        needs_base = any(not spec.get("transformer") for spec in specs.values())
        self.base = base_module if base_module is not None else (
            load_transformer(base, dtype, device, compile) if needs_base else None)
        for name, spec in specs.items():
            if spec.get("adapter"):
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.base, spec["adapter"], adapter_name=name)
                else:
                    self.peft.load_adapter(spec["adapter"], adapter_name=name)
                self.kind[name] = "adapter"
            elif spec.get("transformer"):
                self.full[name] = load_transformer(spec["transformer"], dtype, device, compile)
                self.kind[name] = "full"
            else:
                self.kind[name] = "base"
        if self.peft is not None:
            self.peft.requires_grad_(False).eval()

    def names(self) -> list[str]:
        return sorted(self.kind)

    @contextmanager
    def use(self, name: str):
        if name not in self.kind:
            raise KeyError(f"model {name!r} is not hosted here (hosted: {self.names()})")
        kind = self.kind[name]
        if kind == "full":
            yield self.full[name]
        elif kind == "adapter":
            self.peft.set_adapter(name)
            yield self.peft
        elif self.peft is not None:
            with self.peft.disable_adapter():
                yield self.peft
        else:
            yield self.base


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> float images (N, 3, H, W) in [0, 1] through the VAE; differentiable in the latents (the
    clamp passes no gradient outside [0, 1], as in the released reward back-propagation)."""
    z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def decode_images(pipe: StableDiffusion3Pipeline, latents: torch.Tensor) -> np.ndarray:
    """Latents -> uint8 images (N, H, W, 3) through the pipeline's VAE."""
    images = decode_latents(pipe.vae, latents)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def load_vae(path: str, dtype: torch.dtype = torch.float32, device="cpu") -> AutoencoderKL:
    """The frozen VAE of a pipeline directory (for learners that decode, e.g. reward back-propagation)."""
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=dtype, local_files_only=True)
    return vae.to(device).requires_grad_(False).eval()


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # peft's two formats, preferred first


def adapter_weights_file(adapter_dir) -> Path | None:
    """The weights file of a peft adapter directory (safetensors, or the older pickled .bin)."""
    return next((Path(adapter_dir) / n for n in ADAPTER_WEIGHTS if (Path(adapter_dir) / n).exists()), None)


def _tensor_shapes(weights: Path) -> dict[str, tuple]:
    if weights.suffix == ".safetensors":
        with safe_open(str(weights), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not iterable)
    return {k: tuple(v.shape) for k, v in torch.load(weights, map_location="cpu", weights_only=True).items()}


def check_adapter_fits(adapter_dir: str, base_dir: str) -> None:
    """Fail fast, naming the path, when a peft adapter directory is missing, malformed or the wrong shape."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"adapter directory {d} does not exist")
    cfg_file, weights = d / "adapter_config.json", adapter_weights_file(d)
    if not cfg_file.exists() or weights is None:
        raise ValueError(f"{d} is not a peft adapter directory (needs adapter_config.json and "
                         f"{' or '.join(ADAPTER_WEIGHTS)})")
    try:
        adapter_cfg = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: not a JSON adapter config ({e})") from None
    peft_type = adapter_cfg.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{cfg_file}: peft_type is {peft_type!r}, only LORA adapters are supported")
    try:
        shapes = _tensor_shapes(weights)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        reason = next(iter(str(e).strip().splitlines()), "")
        raise ValueError(f"{weights}: cannot be read ({type(e).__name__}: {reason})") from None
    with torch.device("meta"):
        cfg = transformer_config(base_dir)
        base = transformer_class(cfg).from_config(cfg)
    modules = dict(base.named_modules())
    for key, shape in shapes.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        name = key.removeprefix("base_model.model.").split(".lora_")[0]
        mod = modules.get(name)
        if mod is None or not hasattr(mod, "in_features"):
            raise ValueError(f"{weights}: {key} targets {name!r}, which the base model {base_dir} lacks")
        fits = shape[1] == mod.in_features if ".lora_A." in key else shape[0] == mod.out_features
        if not fits:
            raise ValueError(f"{weights}: {key} has shape {shape}, which does not fit {name} "
                             f"({mod.in_features}->{mod.out_features}) of the base model {base_dir}")
        rank, r = (shape[0] if ".lora_A." in key else shape[1]), adapter_rank(adapter_cfg, name)
        if rank != r:
            raise ValueError(f"{weights}: {key} has rank {rank}, but {cfg_file} says r={r} for {name}")


def adapter_rank(adapter_cfg: dict, module: str) -> int:
    """The LoRA rank peft gives `module`: its `rank_pattern` entry (a pattern matching the name's end), else r."""
    for pattern, r in (adapter_cfg.get("rank_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return r
    return adapter_cfg.get("r", 8)


def save_random_model(path: str, preset: str = "tiny", seed: int = 0, **kw) -> str:
    os.makedirs(path, exist_ok=True)
    build_random_pipeline(preset, seed, **kw).save_pretrained(path)
    return path
