"""CLIP-family scorers loaded from local directories through transformers: CLIP score, PickScore and HPS v2.1
(CLIP models fine-tuned on human preferences) and the LAION aesthetic predictor (CLIP ViT-L/14 + an MLP head)."""
import numpy as np
import torch
from PIL import Image

from .base import Reward


def _device(device: str) -> torch.device:
    """flowopd.models.resolve_device's rule, repeated so that rewards/ needs nothing from flowopd/."""
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                        ("cpu" if device == "auto" else device))


def preference_mlp(dim: int) -> torch.nn.Sequential:
    """The improved-aesthetic-predictor head (linear layers only, dropouts at eval), shared by the LAION
    aesthetic predictor and ImageReward; state-dict keys {0,2,4,6,7}.{weight,bias}."""
    drop = torch.nn.Dropout(0.0)
    return torch.nn.Sequential(torch.nn.Linear(dim, 1024), drop, torch.nn.Linear(1024, 128), drop,
                               torch.nn.Linear(128, 64), drop, torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a torch pickle read with weights_only (no code runs on load)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


class CLIPScore(Reward):
    """Cosine similarity of CLIP image and prompt embeddings (x logit_scale with scale=True)."""

    outputs = ("clip_score",)
    scale = False

    def __init__(self, path: str, device: str = "auto", batch_size: int = 32):
        from transformers import CLIPModel, CLIPProcessor
        self.device = _device(device)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        self.batch_size = batch_size

    @torch.no_grad()
    def embed(self, images, prompts=None):
        pil = [Image.fromarray(im) for im in images]
        inputs = self.processor(images=pil, text=prompts, return_tensors="pt", padding=prompts is not None,
                                truncation=prompts is not None).to(self.device)
        m = self.model  # projections of the pooled outputs (stable across transformers versions)
        img = m.visual_projection(m.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        img = img / img.norm(dim=-1, keepdim=True)
        if prompts is None:
            return img, None
        txt = m.text_projection(m.text_model(input_ids=inputs["input_ids"],
                                             attention_mask=inputs["attention_mask"]).pooler_output)
        return img, txt / txt.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def score(self, images, prompts, metadata):
        out = []
        for lo in range(0, len(images), self.batch_size):
            img, txt = self.embed(images[lo:lo + self.batch_size], list(prompts[lo:lo + self.batch_size]))
            s = (img * txt).sum(-1)
            out.append((self.model.logit_scale.exp() * s if self.scale else s).float().cpu().numpy())
        return {self.outputs[0]: np.concatenate(out).astype(np.float64)}


    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """The processor's preprocessing in torch, differentiable: float images (N, 3, H, W) in [0, 1] resized
        (bicubic, shortest side), centre-cropped and normalised."""
        ip = self.processor.image_processor
        h, w = images.shape[-2:]
        side = ip.size["shortest_edge"]
        size = (max(side, round(h * side / w)), side) if h >= w else (side, max(side, round(w * side / h)))
        x = torch.nn.functional.interpolate(images.float(), size=size, mode="bicubic", align_corners=False,
                                            antialias=True)
        ch, cw = ip.crop_size["height"], ip.crop_size["width"]
        top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
        x = x[..., top:top + ch, left:left + cw]
        mean, std = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in (ip.image_mean, ip.image_std))
        return (x - mean) / std

    def differentiable(self, images, prompts, metadata):
        m = self.model
        img = m.visual_projection(m.vision_model(pixel_values=self.pixel_values(images.to(self.device))).pooler_output)
        img = img / img.norm(dim=-1, keepdim=True)
        with torch.no_grad():
            text = self.processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True).to(self.device)
            txt = m.text_projection(m.text_model(**text).pooler_output)
            txt = txt / txt.norm(dim=-1, keepdim=True)
        s = (img * txt).sum(-1)
        return m.logit_scale.exp() * s if self.scale else s


class PickScore(CLIPScore):
    """PickScore_v1: logit_scale x cosine(image, prompt) of the preference-tuned CLIP-H."""

    outputs = ("pickscore",)
    scale = True


class HPSv2(CLIPScore):
    """HPS v2.1: cosine(image, prompt) of the preference-tuned open_clip ViT-H-14, the rule of hpsv2's
    `score`. `path` is a transformers directory made by `python -m rewards.convert hpsv2`."""

    outputs = ("hpsv2",)


class Aesthetic(CLIPScore):
    """LAION aesthetic predictor v2: an MLP on normalised CLIP ViT-L/14 image embeddings. `head` is the
    MLP's state dict file (.pth or .safetensors, keys layers.{0,2,4,6,7}.{weight,bias})."""

    outputs = ("aesthetic",)

    def __init__(self, path: str, head: str, device: str = "auto", batch_size: int = 32):
        super().__init__(path, device, batch_size)
        self.head = preference_mlp(self.model.config.projection_dim)
        self.head.load_state_dict({k.removeprefix("layers."): v for k, v in load_state_dict(head).items()})
        self.head.to(self.device).eval()

    @torch.no_grad()
    def score(self, images, prompts, metadata):
        out = []
        for lo in range(0, len(images), self.batch_size):
            img, _ = self.embed(images[lo:lo + self.batch_size])
            out.append(self.head(img.float()).squeeze(-1).cpu().numpy())
        return {"aesthetic": np.concatenate(out).astype(np.float64)}
