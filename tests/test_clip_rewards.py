"""CLIP score, PickScore and the LAION aesthetic head loading from tiny random models of the same
architectures saved to a temp dir, checked against direct computations with the same weights."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from rewards import make_reward


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    chars = list("abcdefghijklmnopqrstuvwxyz")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                  "num_hidden_layers": 2, "vocab_size": len(vocab), "bos_token_id": 0,
                                  "eos_token_id": 1, "pad_token_id": 1},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                    "num_hidden_layers": 2, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    CLIPModel(cfg).eval().save_pretrained(path)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    proc.save_pretrained(path)
    head = {f"layers.{i}.{p}": torch.randn(*shape) * 0.1 for i, shape_w in
            ((0, (1024, 16)), (2, (128, 1024)), (4, (64, 128)), (6, (16, 64)), (7, (1, 16)))
            for p, shape in (("weight", shape_w), ("bias", (shape_w[0],)))}
    save_file(head, str(path / "head.safetensors"))
    return path


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
