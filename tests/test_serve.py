"""A real local Ray Serve instance with the tiny model: concurrency, determinism, auth, bounds, a responsive
event loop during sampling, and the OpenAPI document checked against the live server by schemathesis."""
import base64
import socket
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest
import ray
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from ray import serve
from schemathesis import GenerationMode

from deploy.serve import ServeConfig, build_app, main
from flowopd.config import ModelConfig, load_config, read_yaml
from pipelines.launch import init_ray
from pipelines.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
KEY = "s3cret"
SLOW_STEPS = 300  # the server's max_steps: 3 images at this many steps sample for seconds on the tiny model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_assets):
    cfg = ServeConfig.model_validate({
        "model": {"base": str(tiny_assets / "base"), "max_sequence_length": 16, "resolution": 16},
        "models": {"base": {}, "ocr_teacher": {"adapter": str(tiny_assets / "teachers" / "ocr_teacher")}},
        "sampling": {"num_steps": 6}, "api_key": KEY, "num_cpus": 0.5, "port": _free_port(),
        "limits": {"max_images": 3, "max_steps": SLOW_STEPS, "max_size": 32, "max_pixels": 3 * 16 * 16}})
    init_ray(None)
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.port})
    serve.run(build_app(cfg), name="flowopd", route_prefix="/")
    yield f"http://127.0.0.1:{cfg.port}"
    serve.shutdown()
    ray.shutdown()


AUTH = {"Authorization": f"Bearer {KEY}"}


def _gen(url, body, headers=AUTH):
    return requests.post(f"{url}/v1/generate", json=body, headers=headers, timeout=120)


def _health(url) -> dict:
    return requests.get(f"{url}/health", timeout=30).json()


def test_concurrent_requests_are_all_answered_and_seeds_are_reproducible(server):
    bodies = [{"prompt": f"a red cube {i}", "seed": i, "num_images": 1 + i % 2} for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda b: _gen(server, b), bodies))
    assert [r.status_code for r in replies] == [200] * 6
    for b, r in zip(bodies, replies):
        body = r.json()
        assert body["seeds"] == [b["seed"] + k for k in range(b["num_images"])]
        assert len(body["images"]) == b["num_images"]
        assert base64.b64decode(body["images"][0])[:8] == b"\x89PNG\r\n\x1a\n"
    one = _gen(server, {"prompt": "a sign", "seed": 7, "format": "png"})
    two = _gen(server, {"prompt": "a sign", "seed": 7, "format": "png"})
    other = _gen(server, {"prompt": "a sign", "seed": 8, "format": "png"})
    teacher = _gen(server, {"prompt": "a sign", "seed": 7, "format": "png", "model": "ocr_teacher"})
    assert one.headers["content-type"] == "image/png" and one.headers["X-Seed"] == "7"
    assert one.content == two.content and one.content != other.content and one.content != teacher.content


def test_auth_bounds_and_errors_keep_the_server_serving(server):
    assert _health(server) == {"status": "ok", "generating": 0}
    assert _gen(server, {"prompt": "x"}, headers={}).status_code == 401
    assert _gen(server, {"prompt": "x"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert _gen(server, {"prompt": 7, "seed": False}, headers={}).status_code == 401
    assert requests.get(f"{server}/v1/models", timeout=30).status_code == 401
    assert requests.get(f"{server}/v1/models", headers=AUTH, timeout=30).json()["models"] == ["base", "ocr_teacher"]
    for bad in ({"prompt": ""}, {"prompt": "x" * 600}, {"prompt": "x", "steps": 500}, {"prompt": "x", "size": 8},
                {"prompt": "x", "num_images": 9}, {"prompt": "x", "size": 18}, {"prompt": "x", "seed": -1},
                {"prompt": "x", "num_images": 2, "format": "png"}, {"prompt": "x", "seed": False},
                {"prompt": "x", "steps": "4"}, {"prompt": "x", "steps": 4.5}, {"prompt": 7},
                {"prompt": "x", "guidance": True}, {"prompt": "x", "sede": 3}, {"prompt": "x", "num_images": 3, "size": 32},
                {"prompt": "x", "size": 28}):
        reply = _gen(server, bad)
        assert reply.status_code == 422, bad
        assert reply.json()["detail"][0]["loc"][0] == "body", bad
    # JSON Schema's integer includes 4.0; the largest size for 2 images within max_pixels (768) is 16
    assert _gen(server, {"prompt": "x", "steps": 4.0, "num_images": 2.0, "size": 16, "seed": 2}).status_code == 200
    assert _gen(server, {"prompt": "x", "size": 24, "format": "png", "seed": 3}).status_code == 200
    assert _gen(server, {"prompt": "x", "model": "nope"}).json()["detail"][0]["loc"] == ["body", "model"]
    assert _gen(server, {"prompt": "still here", "seed": 1, "guidance": 4}).status_code == 200


def test_health_answers_while_a_batch_is_generating(server):
    """Sampling runs in a worker thread, so the replica's event loop answers /health mid-batch."""
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_gen, server, {"prompt": "a slow one", "num_images": 3, "steps": SLOW_STEPS})
        generating = 0
        while not generating and not wait([slow], timeout=0.02).done:
            generating = _health(server)["generating"]
        assert generating == 3, "/health never answered while the batch was sampling"
        assert slow.result().status_code == 200
    assert _health(server)["generating"] == 0


def test_every_status_code_is_documented(server):
    paths = requests.get(f"{server}/openapi.json", timeout=30).json()["paths"]
    answers = {(path, method): set(op["responses"]) for path, ops in paths.items() for method, op in ops.items()}
    assert answers == {("/health", "get"): {"200"}, ("/v1/models", "get"): {"200", "401"},
                       ("/v1/generate", "post"): {"200", "400", "401", "422"}}
    assert all(r["description"] for ops in paths.values() for op in ops.values() for r in op["responses"].values())


def _fuzz(op, mode: GenerationMode) -> int:
    """Run schemathesis' checks on generated requests to one operation; returns how many it sent."""
    sent = 0

    @given(op.as_strategy(mode))
    @settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    def check(case):
        nonlocal sent
        sent += 1
        case.call_and_validate(headers=AUTH)

    check()
    return sent


def test_the_live_server_keeps_to_its_openapi_document(server):
    """Every request the schema allows is served (positive data, 2xx) and every one it forbids is refused
    (negative data, 4xx, where an operation takes input): the schema states each rule the server enforces."""
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    sent = {}
    for op in (result.ok() for result in schema.get_all_operations()):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[:1 + (op.method == "post")]:
            sent[op.label, mode.value] = _fuzz(op, mode)
    assert len(sent) == 4 and all(sent.values()), sent


def test_health_answers_at_once_with_fifty_requests_in_flight(server):
    """Every request is admitted to the replica (waiting for a batch there, not queued in front of it), so
    /health is answered by the replica's event loop while nearly all of 50 generate requests are unanswered."""
    with ThreadPoolExecutor(50) as pool:
        jobs = [pool.submit(_gen, server, {"prompt": f"busy {i}", "seed": i, "steps": 40}) for i in range(50)]
        while _health(server)["generating"] == 0:
            pass
        start = time.perf_counter()
        assert _health(server)["status"] == "ok"
        latency = time.perf_counter() - start
        unanswered = sum(not j.done() for j in jobs)
        assert unanswered >= 40, f"/health waited for {50 - unanswered} of 50 generate requests"
        assert all(j.result().status_code == 200 for j in jobs)
    print(f"/health with 50 requests in flight: {latency * 1000:.0f} ms")


def test_demo_serve_config_serves_what_the_demo_trains():
    """configs/demo_serve.yaml names the demo's base, student and teachers and samples like its evaluation;
    the adapters exist only once the demo has run, which `python -m deploy.serve` checks at launch."""
    cfg = load_config(str(ROOT / "configs" / "demo_serve.yaml"), cls=ServeConfig)
    recipe = Recipe(read_yaml(ROOT / "configs" / "demo.yaml"))
    evaluated = recipe.stages["evaluate"]
    assert cfg.model == ModelConfig.model_validate(recipe.defaults["model"])
    assert cfg.sampling == evaluated.sampling
    assert set(cfg.models) == {"base", "opd", *recipe.teachers} and cfg.default_model == "opd"
    assert {n: m.adapter for n, m in cfg.models.items()} == {n: evaluated.models[n].adapter for n in cfg.models}


def test_launch_names_a_missing_adapter(capsys):
    assert main(["--config", str(ROOT / "configs" / "demo_serve.yaml"), "models.opd.adapter=runs/demo/nowhere/adapter"]) == 2
    assert "models.opd.adapter: runs/demo/nowhere/adapter" in capsys.readouterr().err
