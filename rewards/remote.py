"""Rewards computed by remote services: Flow-GRPO's reward-server protocol (so users keep their mmdet
GenEval, DeQA or UnifiedReward servers) and OpenAI-compatible chat-completions endpoints (VLM judges).
Both batch, time out, retry with exponential backoff, send an optional Bearer key, and fail with an error
naming the endpoint. Reward-server responses are pickles: point these only at servers you trust."""
import base64
import io
import os
import pickle
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
from PIL import Image

from .base import Reward, RewardError

# The paper's Qwen-VL score prompt (appendix, Fig. 6), adapted from Flow-GRPO.
QWENVL_TEMPLATE = """[ROLE]
You are a professional visual verification assistant. Evaluate the generated image based on the provided \
instruction across three specific dimensions.
[CRITERIA] 1. Aesthetic Quality 1-2 (Low): Blurry, poor lighting, or chaotic composition. 3 (Fair): In focus, \
adequate lighting, but lacks creativity. 4-5 (High): Sharp, vibrant colors, masterful composition and impact. \
2. Instruction Following 1-2 (Low): Ignores or contradicts the instruction; misses key elements. 3 (Fair): \
Partially follows, but distorts some important elements. 4-5 (High): Faithful representation of all elements \
in the prompt. 3. Overall Score (Priority: Alignment >> Aesthetics)
The overall score must primarily reflect Instruction Following. A fair image that perfectly follows the prompt \
scores higher than a beautiful image that misses it.
[EXECUTION RULES] Strictness: Be rigorous; required details must be explicitly supported. Reasoning: You MUST \
analyze keyword-by-keyword in the <Thought> tag. Output: Provide the analysis first, then the scores in XML tags.
[INPUT DATA]
Instruction: {prompt}
[OUTPUT FORMAT]
<Thought> [Detailed analysis of quality and adherence] </Thought>
<QualityScore>X</QualityScore>
<InstructionScore>Y</InstructionScore>
<OverallScore>Z</OverallScore>"""
QWENVL_SCORES = {"overall": "OverallScore", "quality": "QualityScore", "instruction": "InstructionScore"}
XML_SCORE = r"<{tag}>\s*([-+]?\d+(?:\.\d+)?)\s*</{tag}>"


def encode_image(image: np.ndarray, fmt: str = "JPEG", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).convert("RGB").save(buf, format=fmt, quality=quality)
    return buf.getvalue()


class _Remote(Reward):
    def __init__(self, url: str, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0,
                 api_key: str | None = None, api_key_env: str | None = None, batch_size: int = 64):
        self.url, self.timeout, self.retries, self.backoff, self.batch_size = url, timeout, retries, backoff, batch_size
        key = os.environ.get(api_key_env) if api_key_env else api_key
        self.session = requests.Session()
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def _with_retries(self, fn):
        """fn() until it succeeds; timeouts, connection errors, HTTP errors and unparsable answers are retried."""
        last = None
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except (requests.RequestException, ValueError, KeyError, TypeError, pickle.UnpicklingError,
                    EOFError) as e:
                last = e
                if attempt < self.retries:
                    time.sleep(self.backoff * 2 ** attempt)
        raise RewardError(f"endpoint {self.url} failed after {self.retries + 1} attempts: "
                          f"{type(last).__name__}: {last}")


class RewardServer(_Remote):
    """Flow-GRPO's reward-server protocol: POST a pickled {"images": [JPEG bytes], "prompts": [...],
    "meta_datas": [...], **extra}; the answer is a pickled dict whose `outputs` keys hold per-image lists
    (GenEval: scores = partial credit, rewards, strict_rewards; others: scores or outputs). Each metadata
    dict carries its prompt, as Flow-GRPO's GenEval records do and its GenEval server requires; GenEval
    also requires `extra: {only_strict: ...}`."""

    GENEVAL_OUTPUTS = ("strict_rewards", "group_rewards", "group_strict_rewards")  # only GenEval's server

    def __init__(self, url: str, outputs=("scores",), extra: dict | None = None, **kw):
        super().__init__(url, **kw)
        self.outputs = tuple(outputs)
        self.extra = extra or {}

    @classmethod
    def check_kwargs(cls, outputs=("scores",), extra: dict | None = None, **kw) -> None:
        geneval = [o for o in outputs if o in cls.GENEVAL_OUTPUTS]
        if geneval and "only_strict" not in (extra or {}):
            raise ValueError(f"outputs {geneval} are GenEval's reward server's, which answers every request "
                             f"without `extra: {{only_strict: ...}}` with an error: add it (true or false)")

    def _post(self, payload: bytes, n: int) -> dict:
        r = self.session.post(self.url, data=payload, timeout=self.timeout)
        r.raise_for_status()
        data = pickle.loads(r.content)
        out = {k: np.asarray(data[k], dtype=np.float64).reshape(-1) for k in self.outputs}
        bad = [k for k, v in out.items() if len(v) != n]
        if bad:
            raise ValueError(f"answer has the wrong number of values for {bad}")
        return out

    def score(self, images, prompts, metadata):
        parts = []
        for lo in range(0, len(images), self.batch_size):
            sl = slice(lo, lo + self.batch_size)
            metas = [{"prompt": p, **m} for p, m in zip(prompts[sl], metadata[sl])]
            payload = pickle.dumps({"images": [encode_image(im) for im in images[sl]], "prompts": list(prompts[sl]),
                                    "meta_datas": metas, **self.extra})
            n = len(images[sl])
            parts.append(self._with_retries(lambda p=payload, n=n: self._post(p, n)))
        return {k: np.concatenate([p[k] for p in parts]) for k in self.outputs}


class ChatJudge(_Remote):
    """A VLM judge behind an OpenAI-compatible /chat/completions endpoint: one request per image (sent
    concurrently) with `template` (which may use {prompt}). `scores` maps each output to a tag, and `pattern`
    (where {tag} stands for it) finds the number, its first group, in the answer: by default inside an XML
    tag; judges that answer "Final Score: 3.5" (UnifiedReward) use `pattern: "{tag}:\\s*([-+]?[0-9.]+)"`.
    Defaults: the paper's Qwen-VL score prompt and its three scores."""

    def __init__(self, url: str, model: str, template: str = QWENVL_TEMPLATE, scores: dict | None = None,
                 pattern: str = XML_SCORE, max_tokens: int = 1024, temperature: float = 0.0, concurrency: int = 8,
                 **kw):
        super().__init__(url, **kw)
        self.model, self.template, self.max_tokens, self.temperature = model, template, max_tokens, temperature
        self.patterns = {}
        for name, tag in dict(scores or QWENVL_SCORES).items():
            try:
                self.patterns[name] = re.compile(pattern.replace("{tag}", re.escape(tag)))
            except re.error as e:
                raise RewardError(f"chat_judge: pattern {pattern!r} is not a regular expression: {e}") from None
            if self.patterns[name].groups < 1:
                raise RewardError(f"chat_judge: pattern {pattern!r} has no group to capture the score")
        self.outputs = tuple(self.patterns)
        self.concurrency = concurrency

    def _ask(self, image: np.ndarray, prompt: str) -> dict:
        data_url = "data:image/png;base64," + base64.b64encode(encode_image(image, "PNG")).decode()
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_url}},
                    {"type": "text", "text": self.template.replace("{prompt}", prompt)}]}]}
        r = self.session.post(self.url, json=body, timeout=self.timeout)
        r.raise_for_status()
        text = r.json()["choices"][0]["message"]["content"]
        out = {}
        for name, regex in self.patterns.items():
            m = regex.search(text)
            try:
                out[name] = float(m.group(1))
            except (AttributeError, TypeError, ValueError):
                raise ValueError(f"no {name} score matching {regex.pattern!r} in the answer: {text[:200]!r}") from None
        return out

    def score(self, images, prompts, metadata):
        with ThreadPoolExecutor(self.concurrency) as pool:
            answers = list(pool.map(lambda ip: self._with_retries(lambda: self._ask(*ip)), zip(images, prompts)))
        return {name: np.asarray([a[name] for a in answers]) for name in self.outputs}
