"""A real local Ray Serve instance with the tiny model: concurrency, determinism, auth and bounds."""
import base64
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import requests
from ray import serve

from deploy.serve import ServeConfig, build_app
from pipelines.launch import init_ray

KEY = "s3cret"


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
        "limits": {"max_images": 3, "max_size": 32, "max_pixels": 3 * 16 * 16}})
    init_ray(None)
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.port})
    serve.run(build_app(cfg), name="flowopd", route_prefix="/")
    yield f"http://127.0.0.1:{cfg.port}"
    serve.shutdown()
    ray.shutdown()


AUTH = {"Authorization": f"Bearer {KEY}"}


def _gen(url, body, headers=AUTH):
    return requests.post(f"{url}/v1/generate", json=body, headers=headers, timeout=120)


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
    assert requests.get(f"{server}/health", timeout=30).json() == {"status": "ok"}
    assert _gen(server, {"prompt": "x"}, headers={}).status_code == 401
    assert _gen(server, {"prompt": "x"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert requests.get(f"{server}/v1/models", timeout=30).status_code == 401
    assert requests.get(f"{server}/v1/models", headers=AUTH, timeout=30).json()["models"] == ["base", "ocr_teacher"]
    for bad in ({"prompt": ""}, {"prompt": "x" * 600}, {"prompt": "x", "steps": 500}, {"prompt": "x", "size": 8},
                {"prompt": "x", "num_images": 9}, {"prompt": "x", "size": 18}, {"prompt": "x", "seed": -1}, {"prompt": "x", "num_images": 2, "format": "png"}):
        assert _gen(server, bad).status_code == 422, bad
    assert _gen(server, {"prompt": "x", "num_images": 3, "size": 32}).status_code == 413
    assert _gen(server, {"prompt": "x", "model": "nope"}).status_code == 404
    assert _gen(server, {"prompt": "still here", "seed": 1}).status_code == 200
    assert requests.get(f"{server}/openapi.json", timeout=30).json()["paths"]["/v1/generate"]
