"""Tiny SD3 models, peft teachers on one shared base, full-checkpoint teachers and adapter checks."""
import numpy as np
import pytest
import torch
from peft import PeftModel

from actors.teacher import TeacherServer
from flowopd.models import (
    build_random_pipeline,
    check_adapter_fits,
    encode_prompts,
    load_pipeline,
    load_transformer,
    velocity,
)
from world.tiny import make_random_adapter


def _inputs(assets, n=3):
    pipe = load_pipeline(str(assets / "base"))
    e, p = encode_prompts(pipe, ["a red cube", 'a sign "ab"', "a cat"][:n], 16)
    ne, npool = encode_prompts(pipe, [""], 16)
    x = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return x, e, p, ne, npool


def test_saved_tiny_model_reloads_identically(tmp_path):
    pipe = build_random_pipeline("tiny", seed=5)
    pipe.save_pretrained(tmp_path)
    again = load_pipeline(str(tmp_path))
    e, p = encode_prompts(pipe, ["a red cube"], 16)
    e2, p2 = encode_prompts(again, ["a red cube"], 16)
    assert torch.equal(e, e2) and torch.equal(p, p2)
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(velocity(pipe.transformer, x, 0.5, e, p), velocity(load_transformer(str(tmp_path)), x, 0.5, e, p))


def test_teacher_server_hosts_adapters_base_and_full_checkpoints(tiny_assets, tmp_path):
    x, e, p, ne, npool = _inputs(tiny_assets)
    base_dir = str(tiny_assets / "base")
    full = PeftModel.from_pretrained(load_transformer(base_dir), str(tiny_assets / "teachers" / "ocr_teacher"))
    full.merge_and_unload().save_pretrained(tmp_path / "ocr_full")
    server = TeacherServer(base_dir, {
        "geneval_teacher": {"adapter": str(tiny_assets / "teachers" / "geneval_teacher")},
        "ocr_teacher": {"adapter": str(tiny_assets / "teachers" / "ocr_teacher")},
        "base": {}, "ocr_full": {"transformer": str(tmp_path / "ocr_full")}}, batch_size=2)
    text = {"embeds": e.numpy(), "pooled": p.numpy(), "neg_embeds": ne.numpy(), "neg_pooled": npool.numpy()}
    sigma, pidx = np.full(3, 0.6, np.float32), np.arange(3)
    got = {t: server.velocity(t, x.numpy(), sigma, pidx, text, 4.5) for t in
           ("geneval_teacher", "ocr_teacher", "base", "ocr_full", "geneval_teacher")}
    for name in ("geneval_teacher", "ocr_teacher"):
        ref = PeftModel.from_pretrained(load_transformer(base_dir), str(tiny_assets / "teachers" / name))
        want = velocity(ref, x, 0.6, e, p, ne, npool, 4.5).numpy()
        np.testing.assert_allclose(got[name], want, atol=1e-5)
    np.testing.assert_allclose(got["base"], velocity(load_transformer(base_dir), x, 0.6, e, p, ne, npool, 4.5),
                               atol=1e-5)
    np.testing.assert_allclose(got["ocr_full"], got["ocr_teacher"], atol=1e-4)
    assert np.abs(got["geneval_teacher"] - got["ocr_teacher"]).mean() > 10 * np.abs(
        got["ocr_full"] - got["ocr_teacher"]).mean()


def test_adapter_checks_name_the_problem(tiny_assets, tmp_path):
    base = str(tiny_assets / "base")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_adapter_fits(str(tmp_path / "missing"), base)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a peft adapter directory"):
        check_adapter_fits(str(tmp_path / "empty"), base)
    other = tmp_path / "other_base"
    build_random_pipeline("tiny", attention_head_dim=8, caption_projection_dim=16).save_pretrained(other)
    make_random_adapter(str(other), tmp_path / "wrong_shape", seed=0)
    with pytest.raises(ValueError, match="does not fit"):
        check_adapter_fits(str(tmp_path / "wrong_shape"), base)
    check_adapter_fits(str(tiny_assets / "teachers" / "anchor"), base)


def test_pickled_adapters_are_accepted(tiny_assets, tmp_path):
    """peft's older adapter_model.bin loads and checks like the safetensors file, to the same velocity."""
    base = str(tiny_assets / "base")
    model = PeftModel.from_pretrained(load_transformer(base), str(tiny_assets / "teachers" / "ocr_teacher"))
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").exists()
    check_adapter_fits(str(tmp_path / "bin"), base)
    x, e, p, *_ = _inputs(tiny_assets)
    again = PeftModel.from_pretrained(load_transformer(base), str(tmp_path / "bin"))
    with torch.no_grad():
        assert torch.allclose(velocity(again, x, 0.5, e, p), velocity(model, x, 0.5, e, p), atol=1e-6)


@pytest.mark.parametrize("detach", [True, False])
def test_detached_unconditional_branch_gets_no_gradient(tiny_assets, detach):
    """With detach_uncond the LoRA gradient of the guided velocity is g times that of the conditional
    velocity alone (computed by a separate forward without CFG); without it the unconditional branch adds
    (1 - g) times its own gradient."""
    from flowopd.models import add_student_adapter, lora_config

    x, e, p, ne, npool = _inputs(tiny_assets)
    model = add_student_adapter(load_transformer(str(tiny_assets / "base")), lora_config(4, 8))
    params = [q for q in model.parameters() if q.requires_grad]
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    g = 4.5

    def grads(fn):
        for q in params:
            q.grad = None
        (fn() * probe).sum().backward()
        return torch.cat([q.grad.flatten() for q in params])

    guided = grads(lambda: velocity(model, x, 0.6, e, p, ne, npool, g, detach_uncond=detach))
    cond = grads(lambda: velocity(model, x, 0.6, e, p))
    uncond = grads(lambda: velocity(model, x, 0.6, ne.expand_as(e), npool.expand_as(p)))
    want = g * cond if detach else g * cond + (1 - g) * uncond
    assert torch.allclose(guided, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())
    assert uncond.abs().max() > 0  # the unconditional branch does depend on the LoRA weights
