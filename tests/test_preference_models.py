"""HPS v2.1 and ImageReward: checkpoints in their released layouts (open_clip; BLIP + MLP), tiny and random,
converted by `rewards.convert` and scored by the reward classes, against forward passes written here
directly on the original keys (open_clip's and BLIP's conventions, not transformers')."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BertTokenizer, CLIPConfig, CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

from rewards import make_reward
from rewards.convert import ConversionError, convert_hpsv2, main

IMAGES = np.random.default_rng(1).integers(0, 255, (3, 40, 48, 3), dtype=np.uint8)
PROMPTS = ["a red cat", "a blue dog on a red cat", "dog"]


def _ln(x, w, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], w[prefix + "weight"], w[prefix + "bias"], eps)


def _lin(x, w, prefix):
    return F.linear(x, w[prefix + "weight"], w[prefix + "bias"])


def _heads(x, n):
    return x.unflatten(-1, (n, -1)).transpose(1, 2)


def _random_state(shapes: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * (0.5 if k.endswith("bias") else 0.2) for k, s in shapes.items()}


# ---------------------------------------------------------------- HPS v2.1 (open_clip ViT, causal text)

def _openclip_shapes(cfg: CLIPConfig) -> dict:
    v, t = cfg.vision_config, cfg.text_config
    shapes = {"visual.conv1.weight": (v.hidden_size, 3, v.patch_size, v.patch_size),
              "visual.class_embedding": (v.hidden_size,),
              "visual.positional_embedding": ((v.image_size // v.patch_size) ** 2 + 1, v.hidden_size),
              "visual.proj": (v.hidden_size, cfg.projection_dim),
              "token_embedding.weight": (t.vocab_size, t.hidden_size),
              "positional_embedding": (t.max_position_embeddings, t.hidden_size),
              "text_projection": (t.hidden_size, cfg.projection_dim), "logit_scale": ()}
    for ln, width in (("visual.ln_pre.", v.hidden_size), ("visual.ln_post.", v.hidden_size),
                      ("ln_final.", t.hidden_size)):
        shapes |= {ln + "weight": (width,), ln + "bias": (width,)}
    for tower, c in (("visual.transformer", v), ("transformer", t)):
        w, m = c.hidden_size, c.intermediate_size
        for i in range(c.num_hidden_layers):
            b = f"{tower}.resblocks.{i}."
            shapes |= {b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "ln_2.weight": (w,),
                       b + "ln_2.bias": (w,), b + "attn.in_proj_weight": (3 * w, w), b + "attn.in_proj_bias": (3 * w,),
                       b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
                       b + "mlp.c_fc.weight": (m, w), b + "mlp.c_fc.bias": (m,), b + "mlp.c_proj.weight": (w, m),
                       b + "mlp.c_proj.bias": (w,)}
    return shapes


def _openclip_blocks(x, w, tower, layers, heads, mask=None):
    """open_clip's ResidualAttentionBlock: pre-LN, nn.MultiheadAttention with a fused in-projection."""
    for i in range(layers):
        b = f"{tower}.resblocks.{i}."
        h = _ln(x, w, b + "ln_1.", 1e-5)
        q, k, v = (_heads(p, heads) for p in _lin(h, w, b + "attn.in_proj_").chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        x = x + _lin(a, w, b + "attn.out_proj.")
        x = x + _lin(F.gelu(_lin(_ln(x, w, b + "ln_2.", 1e-5), w, b + "mlp.c_fc.")), w, b + "mlp.c_proj.")
    return x


def _openclip_reference(w, cfg, pixels, ids):
    """Normalised open_clip encode_image / encode_text; text pools at argmax(token id), the end token."""
    v, t = cfg.vision_config, cfg.text_config
    x = F.conv2d(pixels, w["visual.conv1.weight"], stride=v.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([w["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + w["visual.positional_embedding"]
    x = _openclip_blocks(_ln(x, w, "visual.ln_pre.", 1e-5), w, "visual.transformer", v.num_hidden_layers,
                         v.num_attention_heads)
    img = _ln(x[:, 0], w, "visual.ln_post.", 1e-5) @ w["visual.proj"]
    n = ids.shape[1]
    x = w["token_embedding.weight"][ids] + w["positional_embedding"][:n]
    causal = torch.full((n, n), float("-inf")).triu(1)
    x = _ln(_openclip_blocks(x, w, "transformer", t.num_hidden_layers, t.num_attention_heads, causal), w,
            "ln_final.", 1e-5)
    txt = x[torch.arange(len(ids)), ids.argmax(-1)] @ w["text_projection"]
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


@pytest.fixture(scope="module")
def clip_h_base(tmp_path_factory):
    """A tiny transformers CLIP directory laid out like CLIP-ViT-H-14's: end token = largest id, GELU."""
    path = tmp_path_factory.mktemp("clip_h")
    vocab = {"<|startoftext|>": 0}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    vocab["<|endoftext|>"] = len(vocab)
    eot = vocab["<|endoftext|>"]
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=20, pad_token="<|endoftext|>")
    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
                                  "num_hidden_layers": 2, "vocab_size": len(vocab), "max_position_embeddings": 20,
                                  "bos_token_id": 0, "eos_token_id": eot, "pad_token_id": eot, "hidden_act": "gelu"},
                     vision_config={"hidden_size": 24, "intermediate_size": 40, "num_attention_heads": 2,
                                    "num_hidden_layers": 2, "image_size": 32, "patch_size": 8, "hidden_act": "gelu"},
                     projection_dim=16)
    cfg.save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(path)
    return path, cfg


def test_hpsv2_conversion_matches_openclip_forward(clip_h_base, tmp_path):
    base, cfg = clip_h_base
    weights = _random_state(_openclip_shapes(cfg), seed=0)
    weights["logit_scale"] = torch.tensor(math.log(100.0))
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in weights.items()}}, ckpt)
    out = convert_hpsv2(str(ckpt), str(base), str(tmp_path / "hps"))

    hps = make_reward("hpsv2", {"path": str(out), "device": "cpu", "batch_size": 2})
    got = hps(IMAGES, PROMPTS, [{}] * 3)["hpsv2"]
    proc = CLIPProcessor.from_pretrained(base)
    pixels = proc(images=[Image.fromarray(i) for i in IMAGES], return_tensors="pt")["pixel_values"]
    ids = proc.tokenizer(PROMPTS, padding=True, return_tensors="pt")["input_ids"]
    img, txt = _openclip_reference(weights, cfg, pixels, ids)
    np.testing.assert_allclose(got, (img * txt).sum(-1).numpy(), atol=1e-5)
    assert len(set(np.round(got, 6))) == 3


def test_hpsv2_conversion_errors_name_the_problem(clip_h_base, tmp_path):
    base, cfg = clip_h_base
    weights = _random_state(_openclip_shapes(cfg), seed=0)
    ckpt = tmp_path / "extra.pt"
    torch.save({**weights, "visual.attn_pool.query": torch.zeros(3)}, ckpt)
    with pytest.raises(ConversionError, match=r"visual\.attn_pool\.query"):
        convert_hpsv2(str(ckpt), str(base), str(tmp_path / "a"))
    del weights["ln_final.bias"]
    torch.save(weights, ckpt)
    with pytest.raises(ConversionError, match="final_layer_norm.bias"):
        convert_hpsv2(str(ckpt), str(base), str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(ConversionError, match="not a transformers CLIP directory"):
        convert_hpsv2(str(ckpt), str(tmp_path), str(tmp_path / "c"))


# ---------------------------------------------------------------- ImageReward (BLIP ViT + BERT + MLP)

V_WIDTH, V_HEADS, T_WIDTH, T_HEADS, LAYERS, MAX_POS = 24, 2, 32, 4, 2, 40
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "cat", "dog", "on"]


def _blip_shapes(vocab: int) -> dict:
    vit, bert = "blip.visual_encoder.", "blip.text_encoder."
    shapes = {vit + "cls_token": (1, 1, V_WIDTH), vit + "pos_embed": (1, 17, V_WIDTH),
              vit + "patch_embed.proj.weight": (V_WIDTH, 3, 8, 8), vit + "patch_embed.proj.bias": (V_WIDTH,),
              vit + "norm.weight": (V_WIDTH,), vit + "norm.bias": (V_WIDTH,),
              bert + "embeddings.word_embeddings.weight": (vocab, T_WIDTH),
              bert + "embeddings.position_embeddings.weight": (MAX_POS, T_WIDTH),
              bert + "embeddings.LayerNorm.weight": (T_WIDTH,), bert + "embeddings.LayerNorm.bias": (T_WIDTH,),
              "blip.vision_proj.weight": (8, V_WIDTH), "blip.text_proj.weight": (8, T_WIDTH)}
    for i in range(LAYERS):
        b = f"{vit}blocks.{i}."
        for name, shape in (("norm1", (V_WIDTH,)), ("norm2", (V_WIDTH,)), ("attn.qkv", (3 * V_WIDTH, V_WIDTH)),
                            ("attn.proj", (V_WIDTH, V_WIDTH)), ("mlp.fc1", (40, V_WIDTH)), ("mlp.fc2", (V_WIDTH, 40))):
            shapes |= {f"{b}{name}.weight": shape, f"{b}{name}.bias": (shape[0],)}
        b = f"{bert}encoder.layer.{i}."
        for att, kv_width in (("attention", T_WIDTH), ("crossattention", V_WIDTH)):
            for name, shape in (("self.query", (T_WIDTH, T_WIDTH)), ("self.key", (T_WIDTH, kv_width)),
                                ("self.value", (T_WIDTH, kv_width)), ("output.dense", (T_WIDTH, T_WIDTH)),
                                ("output.LayerNorm", (T_WIDTH,))):
                shapes |= {f"{b}{att}.{name}.weight": shape, f"{b}{att}.{name}.bias": (shape[0],)}
        for name, shape in (("intermediate.dense", (48, T_WIDTH)), ("output.dense", (T_WIDTH, 48)),
                            ("output.LayerNorm", (T_WIDTH,))):
            shapes |= {f"{b}{name}.weight": shape, f"{b}{name}.bias": (shape[0],)}
    for i, shape in ((0, (1024, T_WIDTH)), (2, (128, 1024)), (4, (64, 128)), (6, (16, 64)), (7, (1, 16))):
        shapes |= {f"mlp.layers.{i}.weight": shape, f"mlp.layers.{i}.bias": (shape[0],)}
    return shapes


def _bert_attention(x, ctx, w, prefix, mask):
    q, k, v = (_heads(_lin(s, w, prefix + f"self.{n}."), T_HEADS) for s, n in ((x, "query"), (ctx, "key"),
                                                                                (ctx, "value")))
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
    return _ln(x + _lin(a, w, prefix + "output.dense."), w, prefix + "output.LayerNorm.", 1e-12)


def _imagereward_reference(w, pixels, ids, mask):
    """BLIP's timm ViT (pre-LN, eps 1e-6) then med.py's BERT (post-LN, cross-attention in every layer), the
    linear MLP on [CLS], and ImageReward's standardisation."""
    vit = "blip.visual_encoder."
    x = F.conv2d(pixels, w[vit + "patch_embed.proj.weight"], w[vit + "patch_embed.proj.bias"], stride=8)
    x = torch.cat([w[vit + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + w[vit + "pos_embed"]
    for i in range(LAYERS):
        b = f"{vit}blocks.{i}."
        q, k, v = _lin(_ln(x, w, b + "norm1.", 1e-6), w, b + "attn.qkv.").unflatten(-1, (3, V_HEADS, -1)).permute(
            2, 0, 3, 1, 4)
        x = x + _lin(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2), w, b + "attn.proj.")
        x = x + _lin(F.gelu(_lin(_ln(x, w, b + "norm2.", 1e-6), w, b + "mlp.fc1.")), w, b + "mlp.fc2.")
    image = _ln(x, w, vit + "norm.", 1e-6)
    bert = "blip.text_encoder."
    h = w[bert + "embeddings.word_embeddings.weight"][ids] + w[bert + "embeddings.position_embeddings.weight"][
        :ids.shape[1]]
    h = _ln(h, w, bert + "embeddings.LayerNorm.", 1e-12)
    keep = mask.bool()[:, None, None, :]
    for i in range(LAYERS):
        b = f"{bert}encoder.layer.{i}."
        h = _bert_attention(h, h, w, b + "attention.", keep)
        h = _bert_attention(h, image, w, b + "crossattention.", None)
        h = _ln(h + _lin(F.gelu(_lin(h, w, b + "intermediate.dense.")), w, b + "output.dense."), w,
                b + "output.LayerNorm.", 1e-12)
    r = h[:, 0]
    for i in (0, 2, 4, 6, 7):
        r = _lin(r, w, f"mlp.layers.{i}.")
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


@pytest.fixture(scope="module")
def blip_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagereward_src")
    BertTokenizer(vocab={t: i for i, t in enumerate(WORDS)}).save_pretrained(root / "bert")
    weights = _random_state(_blip_shapes(len(WORDS) + 2), seed=2)
    weights["blip.text_encoder.embeddings.position_ids"] = torch.arange(MAX_POS)[None]
    torch.save(weights, root / "ImageReward.pt")
    return root, weights


def test_imagereward_conversion_matches_blip_forward(blip_files, tmp_path):
    src, weights = blip_files
    main(["imagereward", "--checkpoint", str(src / "ImageReward.pt"), "--tokenizer", str(src / "bert"),
          "--output", str(tmp_path / "ir"), "--vision-heads", str(V_HEADS), "--text-heads", str(T_HEADS)])
    config = json.loads((tmp_path / "ir" / "config.json").read_text())
    assert config["vision_config"]["image_size"] == 32 and config["vision_config"]["layer_norm_eps"] == 1e-6
    assert config["text_config"]["encoder_hidden_size"] == V_WIDTH

    reward = make_reward("imagereward", {"path": str(tmp_path / "ir"), "device": "cpu", "batch_size": 2})
    got = reward(IMAGES, PROMPTS, [{}] * 3)["imagereward"]
    inputs = reward.inputs(IMAGES, PROMPTS)
    assert inputs["input_ids"].shape == (3, 35) and (inputs["input_ids"][:, 0] == WORDS.index("[CLS]")).all()
    want = _imagereward_reference(weights, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
    assert len(set(np.round(got, 5))) == 3


def test_imagereward_conversion_errors_and_no_overwrite(blip_files, tmp_path, capsys):
    src, weights = blip_files
    args = ["imagereward", "--checkpoint", str(src / "ImageReward.pt"), "--tokenizer", str(src / "bert"),
            "--vision-heads", str(V_HEADS), "--text-heads", str(T_HEADS)]
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("results")
    with pytest.raises(SystemExit, match="exists; pass --force"):
        main(args + ["--output", str(existing)])
    assert (existing / "keep.txt").read_text() == "results"

    small = dict(weights)
    small["blip.text_encoder.embeddings.word_embeddings.weight"] = torch.zeros(len(WORDS) + 5, T_WIDTH)
    torch.save(small, tmp_path / "vocab.pt")
    with pytest.raises(SystemExit, match=r"has 13 tokens with \[DEC\] and \[ENC\].*16"):
        main(args[:1] + ["--checkpoint", str(tmp_path / "vocab.pt")] + args[3:] + ["--output", str(existing)]
             + ["--force"])
    assert (existing / "keep.txt").read_text() == "results" and not list(tmp_path.glob("*.partial"))

    with pytest.raises(SystemExit, match="does not divide the vision width"):
        main(args[:-4] + ["--vision-heads", "5", "--output", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["imagereward", "--checkpoint", str(tmp_path / "nope.pt"), "--tokenizer", str(src / "bert"),
              "--output", str(tmp_path / "y")])

    main(args + ["--output", str(existing), "--force"])
    assert not (existing / "keep.txt").exists() and (existing / "model.safetensors").is_file()
    with pytest.raises(Exception, match="imagereward.json is missing"):
        (existing / "imagereward.json").unlink()
        make_reward("imagereward", {"path": str(existing), "device": "cpu"})
