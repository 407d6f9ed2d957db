"""Remote scorers against real local FastAPI servers: Flow-GRPO's reward-server protocol and an
OpenAI-style chat endpoint, including servers that time out, fail or answer garbage."""
import asyncio
import io
import pickle
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from PIL import Image

from rewards import RewardError, make_reward


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _app() -> FastAPI:
    app = FastAPI()
    calls = {"flaky": 0}

    @app.post("/score")
    async def score(request: Request):
        if request.headers.get("authorization") != "Bearer k":
            return Response(status_code=401)
        data = pickle.loads(await request.body())
        means = [np.asarray(Image.open(io.BytesIO(b))).mean() / 255.0 for b in data["images"]]
        return Response(pickle.dumps({"scores": means, "strict_rewards": [float(m > 0.5) for m in means],
                                      "n_meta": [len(data["meta_datas"])] * len(means)}))

    @app.post("/geneval")
    async def geneval(request: Request):
        """The request handling of Flow-GRPO's GenEval server (reward-server's app_geneval.py and
        gen_eval.py): JPEG-only images, `meta_datas` and `only_strict` read directly, and each metadata's
        `tag` and `prompt` looked up (a missing key is a 500 with the traceback)."""
        import traceback
        try:
            data = pickle.loads(await request.body())
            images = [Image.open(io.BytesIO(d), formats=["jpeg"]) for d in data["images"]]
            metas, only_strict = data["meta_datas"], data["only_strict"]
            scores, rewards, strict = [], [], []
            for image, meta in zip(images, metas):
                tag, prompt = meta["tag"], meta["prompt"]
                ok = np.asarray(image).mean() / 255.0 > 0.5 and len(prompt) > 0
                scores.append(0.5 + 0.5 * ok if tag != "counting" else float(ok))
                strict.append(float(ok))
                rewards.append(0.0 if only_strict else float(ok))
            return Response(pickle.dumps({"scores": scores, "rewards": rewards, "strict_rewards": strict,
                                          "group_rewards": {}, "group_strict_rewards": {}}))
        except Exception:  # noqa: BLE001 - the real server answers any failure with its traceback
            return Response(traceback.format_exc().encode(), status_code=500)

    @app.post("/flaky")
    async def flaky(request: Request):
        calls["flaky"] += 1
        if calls["flaky"] <= 2:
            return Response(status_code=500)
        n = len(pickle.loads(await request.body())["images"])
        return Response(pickle.dumps({"scores": [1.0] * n}))

    @app.post("/slow")
    async def slow():
        await asyncio.sleep(1.5)
        return Response(pickle.dumps({"scores": []}))

    @app.post("/garbage")
    async def garbage():
        return Response(b"<html>not a pickle</html>")

    @app.post("/judge/v1/chat/completions")
    async def judge(body: dict):
        text = body["messages"][0]["content"][1]["text"]
        good = "cat" in text.split("Instruction:")[1]
        content = (f"<Thought>checked</Thought><QualityScore>4</QualityScore>"
                   f"<InstructionScore>{5 if good else 1}</InstructionScore><OverallScore>{4.5 if good else 1.5}"
                   f"</OverallScore>")
        return {"choices": [{"message": {"role": "assistant", "content": content}}]}

    @app.post("/unified/v1/chat/completions")
    async def unified(body: dict):
        good = "cat" in body["messages"][0]["content"][1]["text"]
        return {"choices": [{"message": {"role": "assistant",
                                         "content": f"Alignment: fine.\nFinal Score: {3.5 if good else 2}"}}]}

    @app.post("/mute/v1/chat/completions")
    async def mute(body: dict):
        return {"choices": [{"message": {"role": "assistant", "content": "I cannot score this."}}]}

    return app


@pytest.fixture(scope="module")
def url():
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(_app(), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)


IMAGES = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (0, 128, 255)])


def test_reward_server_protocol(url):
    r = make_reward("reward_server", {"url": f"{url}/score", "outputs": ["scores", "strict_rewards", "n_meta"],
                                      "api_key": "k", "batch_size": 2})
    out = r(IMAGES, ["a", "b", "c"], [{"tag": "x"}] * 3)
    np.testing.assert_allclose(out["scores"], [0, 128 / 255, 1], atol=0.02)
    assert out["strict_rewards"].tolist() == [0, 1, 1] and out["n_meta"].tolist() == [2, 2, 1]
    flaky = make_reward("reward_server", {"url": f"{url}/flaky", "retries": 3, "backoff": 0.01})
    assert flaky(IMAGES, ["a"] * 3, [{}] * 3)["scores"].tolist() == [1, 1, 1]


@pytest.mark.parametrize("path,kw,match", [
    ("slow", {"timeout": 0.3}, "ReadTimeout"),
    ("garbage", {}, "UnpicklingError|not a pickle|invalid load key"),
    ("score", {}, "401"),  # no API key
])
def test_reward_server_failures_name_the_endpoint(url, path, kw, match):
    r = make_reward("reward_server", {"url": f"{url}/{path}", "retries": 1, "backoff": 0.01, **kw})
    with pytest.raises(RewardError, match=rf"endpoint {url}/{path} failed after 2 attempts: .*({match})"):
        r(IMAGES, ["a"] * 3, [{}] * 3)


def test_chat_judge_parses_the_papers_scores(url):
    judge = make_reward("chat_judge", {"url": f"{url}/judge/v1/chat/completions", "model": "qwen3-vl"})
    out = judge(IMAGES[:2], ["a cat on a mat", "a dog"], [{}, {}])
    assert out["overall"].tolist() == [4.5, 1.5] and out["instruction"].tolist() == [5, 1]
    assert out["quality"].tolist() == [4, 4]
    mute = make_reward("chat_judge", {"url": f"{url}/mute/v1/chat/completions", "model": "m", "retries": 1,
                                      "backoff": 0.01})
    with pytest.raises(RewardError, match=r"/mute/v1/chat/completions failed after 2 attempts: .*no overall score .*OverallScore"):
        mute(IMAGES[:1], ["a cat"], [{}])


def test_chat_judge_with_its_own_answer_format(url):
    unified = make_reward("chat_judge", {"url": f"{url}/unified/v1/chat/completions", "model": "unifiedreward",
                                         "template": "Caption: {prompt}. Rate the image.",
                                         "scores": {"unifiedreward": "Final Score"},
                                         "pattern": r"{tag}:\s*([-+]?[0-9.]+)"})
    assert unified(IMAGES[:2], ["a cat", "a dog"], [{}, {}])["unifiedreward"].tolist() == [3.5, 2]
    with pytest.raises(RewardError, match="no group"):
        make_reward("chat_judge", {"url": url, "model": "m", "pattern": "{tag}"})
    with pytest.raises(RewardError, match="not a regular expression"):
        make_reward("chat_judge", {"url": url, "model": "m", "pattern": "({tag}"})


def test_geneval_server_gets_its_prompts_and_partial_credit_trains(url, tmp_path):
    """GenEval records as Flow-GRPO ships them (the prompt inside each line) reach the server with their
    prompt in the metadata; the first output, the one GRPO trains on, is the partial-credit `scores`."""
    from flowopd.data import read_source
    path = tmp_path / "train_metadata.jsonl"
    path.write_text('{"tag": "colors", "include": [{"class": "cat", "count": 1}], "prompt": "a white cat"}\n'
                    '{"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "two dogs"}\n')
    records = read_source(str(path), "geneval", None)
    r = make_reward("reward_server", {"url": f"{url}/geneval", "outputs": ["scores", "strict_rewards"],
                                      "extra": {"only_strict": True}, "retries": 0})
    images = np.stack([np.full((8, 8, 3), 250, np.uint8), np.full((8, 8, 3), 5, np.uint8)])
    out = r.score(images, [x.prompt for x in records], [x.metadata for x in records])
    assert list(out) == ["scores", "strict_rewards"]
    assert out["scores"].tolist() == [1.0, 0.0] and out["strict_rewards"].tolist() == [1.0, 0.0]
    without = make_reward("reward_server", {"url": f"{url}/geneval", "retries": 0})  # no only_strict: a 500
    with pytest.raises(RewardError, match="500"):
        without.score(images, [x.prompt for x in records], [x.metadata for x in records])
    # a pool asking for GenEval's outputs without only_strict is refused before any actor starts
    from flowopd.config import ConfigError, RewardSpec
    from pipelines.preflight import check_reward_specs
    spec = RewardSpec(name="reward_server", kwargs={"url": f"{url}/geneval", "outputs": ["scores", "strict_rewards"]})
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.kwargs: outputs \['strict_rewards'\] are GenEval's .*only_strict"):
        check_reward_specs([spec])
