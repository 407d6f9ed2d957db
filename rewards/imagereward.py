"""ImageReward (Xu et al. 2023): BLIP's image-grounded text encoder reads the prompt while cross-attending to
the ViT's patch features; an MLP on its [CLS] feature is the reward, standardised by the published mean and
std. The model is transformers' BLIP modules, loaded from a directory that `python -m rewards.convert
imagereward` writes from the released ImageReward.pt."""
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import Reward, RewardError
from .clip import _device, preference_mlp

WEIGHTS = "model.safetensors"
SETTINGS = "imagereward.json"
# ImageReward-v1.0's standardisation (ImageReward.py) and its prompt length.
DEFAULT_SETTINGS = {"mean": 0.16717362830052426, "std": 1.0333394966054072, "max_length": 35}


class ImageRewardModel(torch.nn.Module):
    """BLIP ViT + BERT with cross-attention in every layer + the preference MLP; returns raw rewards."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.mlp = preference_mlp(config.text_config.hidden_size)

    def forward(self, pixel_values, input_ids, attention_mask):
        image = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                                 encoder_attention_mask=image_mask).last_hidden_state
        return self.mlp(text[:, 0].float()).squeeze(-1)


def load_model(path: str) -> tuple[ImageRewardModel, dict]:
    """The model (eval mode) and its settings; errors name the directory and the keys that did not fit."""
    from safetensors.torch import load_file
    from transformers import BlipConfig
    root = Path(path)
    for name in ("config.json", WEIGHTS, SETTINGS):
        if not (root / name).is_file():
            raise RewardError(f"imagereward: {root / name} is missing; write the directory with "
                              "`python -m rewards.convert imagereward`")
    model = ImageRewardModel(BlipConfig.from_pretrained(str(root), local_files_only=True))
    missing, unexpected = model.load_state_dict(load_file(str(root / WEIGHTS)), strict=False)
    if missing or unexpected:
        raise RewardError(f"imagereward: {root / WEIGHTS} does not fit config.json: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    settings = {**DEFAULT_SETTINGS, **json.loads((root / SETTINGS).read_text())}
    return model.eval(), settings


class ImageReward(Reward):
    """(MLP(BLIP(image, prompt)[CLS]) − mean) / std, ImageReward-v1.0's `score`."""

    outputs = ("imagereward",)

    def __init__(self, path: str, device: str = "auto", batch_size: int = 32):
        from transformers import AutoTokenizer, CLIPImageProcessor
        self.device = _device(device)
        model, self.settings = load_model(path)
        self.model = model.to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        self.batch_size = batch_size

    def inputs(self, images, prompts) -> dict[str, torch.Tensor]:
        """Pixel values (resize shortest edge, centre crop, CLIP normalisation) and [CLS]-first token ids."""
        pixels = self.processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]
        text = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                              max_length=self.settings["max_length"], return_tensors="pt")
        return {"pixel_values": pixels.to(self.device), "input_ids": text["input_ids"].to(self.device),
                "attention_mask": text["attention_mask"].to(self.device)}

    @torch.no_grad()
    def score(self, images, prompts, metadata):
        out = []
        for lo in range(0, len(images), self.batch_size):
            raw = self.model(**self.inputs(images[lo:lo + self.batch_size], prompts[lo:lo + self.batch_size]))
            out.append(((raw - self.settings["mean"]) / self.settings["std"]).cpu().numpy())
        return {"imagereward": np.concatenate(out).astype(np.float64)}
