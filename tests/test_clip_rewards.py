"""CLIP score, PickScore and the LAION aesthetic head loading from tiny random models of the same
architectures saved to a temp dir, checked against direct computations with the same weights."""
import numpy as np
import torch
from transformers import CLIPModel, CLIPProcessor

from rewards import make_reward

IMAGES = np.random.default_rng(0).integers(0, 255, (3, 40, 40, 3), dtype=np.uint8)
PROMPTS = ["a red cat", "a blue dog", "a red cat"]


def _direct(path):
    model = CLIPModel.from_pretrained(path).eval()
    proc = CLIPProcessor.from_pretrained(path)
    from PIL import Image
    inputs = proc(images=[Image.fromarray(i) for i in IMAGES], text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    return model, img, (img * txt).sum(-1)


def test_clip_and_pickscore_match_direct_computation(clip_dir):
    model, _, cos = _direct(clip_dir)
    clip = make_reward("clip_score", {"path": str(clip_dir), "device": "cpu", "batch_size": 2})
    pick = make_reward("pickscore", {"path": str(clip_dir), "device": "cpu"})
    np.testing.assert_allclose(clip(IMAGES, PROMPTS, [{}] * 3)["clip_score"], cos.numpy(), atol=1e-5)
    np.testing.assert_allclose(pick(IMAGES, PROMPTS, [{}] * 3)["pickscore"],
                               (model.logit_scale.exp() * cos).detach().numpy(), rtol=1e-5)


def test_aesthetic_head_on_clip_embeddings(clip_dir):
    _, img, _ = _direct(clip_dir)
    aes = make_reward("aesthetic", {"path": str(clip_dir), "head": str(clip_dir / "head.safetensors"),
                                    "device": "cpu"})
    got = aes(IMAGES, PROMPTS, [{}] * 3)["aesthetic"]
    from safetensors.torch import load_file
    w = load_file(str(clip_dir / "head.safetensors"))
    h = img
    for i in (0, 2, 4, 6, 7):
        h = h @ w[f"layers.{i}.weight"].T + w[f"layers.{i}.bias"]
    np.testing.assert_allclose(got, h.squeeze(-1).numpy(), atol=1e-5)
    assert got[0] != got[1]
