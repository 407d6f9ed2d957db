"""model.compile: the compiled transformer against eager, on CPU.

Tolerance: fp32 on both sides, but inductor fuses and reorders reductions and a padded batch may take
other GEMM blockings, which moves results by ~1e-6 relative; CFG (g = 4.5) amplifies that. Velocities
(scale ~5) agree within rtol = atol = 1e-4 (measured: 1e-5 at most); each gradient tensor within
rtol = 1e-4 and atol = 1e-4 x its largest element (measured: 1e-5 of it at most). A real fault (a wrong
adapter, padded rows reaching the output or the gradient) gives errors of order 1e-1 of the scale.

An inductor compile on 2 CPU cores takes tens of seconds per graph, so one test compiles with inductor
(through the loader; one forward+backward graph of a one-layer model) and checks values and gradients;
the cases that test dynamo's guards and velocity's padding rather than code generation (no-grad calls,
adapter switches, the detached branch) use the aot_eager backend: the same tracing, no code generation.
"""
import pytest
import torch
from torch._dynamo.utils import counters

from actors.opd_trainer import OPDTrainer
from actors.rollout import RolloutWorker
from actors.sampler import Sampler
from actors.teacher import TeacherServer
from flowopd.learner import Learner
from flowopd.models import (
    ModelBank,
    add_student_adapter,
    is_compiled,
    load_lora_state,
    load_transformer,
    lora_config,
    lora_state,
    save_random_model,
    velocity,
)
from world.tiny import make_random_adapter

TOL = {"rtol": 1e-4, "atol": 1e-4}
G = 4.5


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    return save_random_model(str(tmp_path_factory.mktemp("one_layer")), num_layers=1)


def _random_lora(model, seed: int) -> dict:
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) * 0.3 for k, v in lora_state(model).items()}


def _students(path, backend=None):
    """(eager, compiled) peft students with the same random (nonzero) LoRA; backend=None is the loaders'
    own compile (inductor)."""
    eager = add_student_adapter(load_transformer(path), lora_config(4, 8))
    compiled = load_transformer(path, compile=backend is None)
    if backend:
        compiled.compile(backend=backend, dynamic=False)
    compiled = add_student_adapter(compiled, lora_config(4, 8))
    state = _random_lora(eager, 1)
    load_lora_state(eager, state)
    load_lora_state(compiled, state)
    return eager, compiled


def _inputs(n, seed=0):
    """latents, sigma, embeds, pooled, negative embeds and pooled (random text embeddings of 24 tokens)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.rand(n, generator=g), torch.randn(n, 24, 32, generator=g),
            torch.randn(n, 64, generator=g), torch.randn(1, 24, 32, generator=g), torch.randn(1, 64, generator=g))


def _run(model, args, detach_uncond=False):
    """Velocity and LoRA gradients of a training-mode forward and backward."""
    model.train()
    model.zero_grad(set_to_none=True)
    v = velocity(model, *args, G, detach_uncond=detach_uncond)
    (v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum().backward()  # every output element weighs differently
    model.eval()
    return v.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


def _check(eager, compiled, args, detach_uncond=False):
    (v_e, g_e), (v_c, g_c) = _run(eager, args, detach_uncond), _run(compiled, args, detach_uncond)
    torch.testing.assert_close(v_c, v_e, **TOL)
    assert g_c.keys() == g_e.keys() and max(g.abs().max() for g in g_e.values()) > 1
    for k in g_e:  # a gradient sums over rows: its error scales with the tensor, not with each element
        torch.testing.assert_close(g_c[k], g_e[k], rtol=TOL["rtol"], atol=TOL["atol"] * g_e[k].abs().max(), msg=k)


def test_compiled_student_matches_eager_and_a_ragged_batch_reuses_its_bucket(one_layer):
    """Inductor, through the loader: values and gradients, for a full and a ragged batch and after a sync."""
    eager, compiled = _students(one_layer)
    assert is_compiled(compiled) and not is_compiled(eager)
    full = _inputs(6)  # CFG: 12 rows, a bucket
    _check(eager, compiled, full)
    n = graphs()
    _check(eager, compiled, _inputs(5, seed=1))  # CFG: 10 rows padded to 12, never reaching output or gradient
    new = _random_lora(eager, 2)  # a weight sync changes parameters in place: the same graph serves
    load_lora_state(eager, new)
    load_lora_state(compiled, new)
    _check(eager, compiled, full)
    assert graphs() == n


def test_adapter_switches_and_the_detached_branch_compile_a_bounded_set_of_graphs(one_layer, tmp_path):
    """aot_eager: no-grad calls as in rollouts and teachers, the reference (adapter disabled), detach_uncond
    and a teacher bank switching adapters."""
    eager, compiled = _students(one_layer, backend="aot_eager")
    full, ragged = _inputs(6), _inputs(5, seed=1)
    with torch.no_grad():
        velocity(compiled, *full, G)
        n = [graphs()]
        for _ in range(2):  # the base (adapter disabled) costs one graph for the one bucket, the first time only
            with compiled.disable_adapter(), eager.disable_adapter():
                for args in (full, ragged):
                    torch.testing.assert_close(velocity(compiled, *args, G), velocity(eager, *args, G), **TOL)
            torch.testing.assert_close(velocity(compiled, *ragged, G), velocity(eager, *ragged, G), **TOL)
            n.append(graphs())
        assert n[1] <= n[0] + 1 and n[2] == n[1]
    _check(eager, compiled, ragged, detach_uncond=True)  # a no-grad and a grad forward of 5 rows, padded to 6

    # a teacher bank: each adapter and the base are graphs of their own, and switching back costs nothing
    for name, seed in (("a", 1), ("b", 2)):
        make_random_adapter(one_layer, tmp_path / name, seed)
    specs = {"a": {"adapter": str(tmp_path / "a")}, "b": {"adapter": str(tmp_path / "b")}, "base": {}}
    base = load_transformer(one_layer)
    base.compile(backend="aot_eager", dynamic=False)
    bank = ModelBank(one_layer, specs, torch.float32, "cpu", base_module=base)
    ref = ModelBank(one_layer, specs, torch.float32, "cpu")
    with torch.no_grad():
        n = [graphs()]
        for _ in range(2):
            for name in ("a", "b", "base"):
                with bank.use(name) as m, ref.use(name) as r:
                    torch.testing.assert_close(velocity(m, *full, G), velocity(r, *full, G), **TOL)
            n.append(graphs())
        assert n[1] <= n[0] + 3 and n[2] == n[1]


def test_model_compile_reaches_the_loaders(make_config):
    cfg = make_config(**{"model.compile": True})
    assert cfg.model.compile and not make_config().model.compile
    assert is_compiled(Learner(cfg, OPDTrainer.make_objective(cfg), device="cpu").model)
    assert is_compiled(RolloutWorker(cfg, device="cpu").model)
    hosted = {"t": {"adapter": cfg.teachers["geneval_teacher"].adapter}, "full": {"transformer": cfg.model.base}}
    server = TeacherServer(cfg.model.base, hosted, batch_size=4, device="cpu", compile=True)
    sampler = Sampler(cfg.model, hosted, cfg.sampling, seed=0, batch_size=4, device="cpu")
    for bank in (server.bank, sampler.bank):
        for name in hosted:
            with bank.use(name) as m:
                assert is_compiled(m)
