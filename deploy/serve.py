"""Serve the trained student (and, by model id, any teacher adapter on the same base) with Ray Serve.

    python -m deploy.serve --config configs/tiny_serve.yaml          # blocks; Ctrl-C stops it
    serve run deploy.serve:app_from_env                              # with FLOWOPD_SERVE_CONFIG=my.yaml

Endpoints: GET /health, GET /v1/models, POST /v1/generate (JSON: prompt, model, num_images, steps,
guidance, seed, size, format = "base64" | "png"), OpenAPI docs at /docs. Concurrent requests are batched
per replica; every field is bounded by `limits`; with `api_key` set, /v1/* need `Authorization: Bearer`.
"""
import argparse
import base64
import io
import os
import secrets
import sys
import time
from typing import Literal

import numpy as np
from fastapi import FastAPI, Header, HTTPException, Response
from PIL import Image
from pydantic import BaseModel, Field, create_model
from ray import serve

from actors.sampler import Sampler
from flowopd.config import EvalModel, EvalSampling, ModelConfig, Strict, load_config


class Limits(Strict):
    max_prompt_chars: int = Field(512, gt=0)
    max_images: int = Field(4, gt=0)
    max_steps: int = Field(50, gt=1)
    min_size: int = Field(16, gt=0)
    max_size: int = Field(1024, gt=0)
    max_pixels: int = Field(4 * 1024 * 1024, gt=0)  # num_images x size^2 per request


class ServeConfig(Strict):
    model: ModelConfig
    models: dict[str, EvalModel] = Field(min_length=1)
    default_model: str | None = None
    sampling: EvalSampling = EvalSampling(num_steps=28)
    limits: Limits = Limits()
    api_key: str | None = None
    api_key_env: str | None = None  # read the key from this environment variable instead
    replicas: int = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)
    num_cpus: float = Field(1, ge=0)
    max_batch_size: int = Field(8, gt=0)
    batch_wait_s: float = Field(0.05, ge=0)
    host: str = "127.0.0.1"
    port: int = 8000

    def key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else self.api_key


def request_model(cfg: ServeConfig, default_model: str) -> type[BaseModel]:
    """The generate request, with bounds from the config (violations are 422s)."""
    lim = cfg.limits
    return create_model(
        "GenerateRequest",
        prompt=(str, Field(min_length=1, max_length=lim.max_prompt_chars)),
        model=(str, default_model),
        num_images=(int, Field(1, ge=1, le=lim.max_images)),
        steps=(int, Field(cfg.sampling.num_steps, ge=2, le=lim.max_steps)),
        guidance=(float | None, Field(None, ge=0, le=30)),
        seed=(int | None, Field(None, ge=0, lt=2 ** 63)),
        size=(int, Field(cfg.model.resolution, ge=lim.min_size, le=lim.max_size)),
        format=(Literal["base64", "png"], "base64"),
    )


def build_app(cfg: ServeConfig):
    default_model = cfg.default_model or next(iter(cfg.models))
    if default_model not in cfg.models:
        raise ValueError(f"default_model: {default_model!r} is not under `models`")
    Request = request_model(cfg, default_model)
    api = FastAPI(title="Flow-OPD image generation", version="1")

    @serve.deployment(num_replicas=cfg.replicas,
                      ray_actor_options={"num_gpus": cfg.num_gpus, "num_cpus": cfg.num_cpus})
    @serve.ingress(api)
    class ImageService:
        def __init__(self):
            self.key = cfg.key()
            models = {n: m.model_dump() for n, m in cfg.models.items()}
            self.sampler = Sampler(cfg.model, models, cfg.sampling, seed=0, batch_size=cfg.max_batch_size)
            self.patch = self.sampler.pipe.vae_scale_factor * self.sampler.pipe.transformer.config.patch_size

        def _auth(self, authorization: str | None) -> None:
            if self.key is None:
                return
            if not authorization or not authorization.startswith("Bearer "):
                raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
            if not secrets.compare_digest(authorization.removeprefix("Bearer "), self.key):
                raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})

        @api.get("/health")
        def health(self) -> dict:
            return {"status": "ok"}

        @api.get("/v1/models")
        def models(self, authorization: str | None = Header(None)) -> dict:
            self._auth(authorization)
            return {"models": sorted(cfg.models), "default": default_model}

        @api.post("/v1/generate")
        async def generate(self, req: Request, authorization: str | None = Header(None)):
            self._auth(authorization)
            if req.model not in cfg.models:
                raise HTTPException(404, f"unknown model {req.model!r}; see /v1/models")
            if req.size % self.patch:
                raise HTTPException(422, f"size must be a multiple of {self.patch}")
            if req.num_images * req.size ** 2 > cfg.limits.max_pixels:
                raise HTTPException(413, f"num_images x size^2 exceeds {cfg.limits.max_pixels} pixels")
            if req.format == "png" and req.num_images != 1:
                raise HTTPException(422, "format png returns one image: set num_images to 1 or use base64")
            seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(6), "big")
            start = time.perf_counter()
            images = await self.batched(req.model_dump() | {"seed": seed})
            seeds = [seed + i for i in range(req.num_images)]
            if req.format == "png":
                return Response(png(images[0]), media_type="image/png", headers={"X-Seed": str(seed)})
            return {"model": req.model, "seeds": seeds, "images": [base64.b64encode(png(im)).decode() for im in images],
                    "seconds": round(time.perf_counter() - start, 3)}

        @serve.batch(max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_wait_s)
        async def batched(self, reqs: list[dict]) -> list[np.ndarray]:
            """Concurrent requests with the same model and settings run as one sampler batch."""
            out: list = [None] * len(reqs)
            groups: dict[tuple, list[int]] = {}
            for i, r in enumerate(reqs):
                groups.setdefault((r["model"], r["steps"], r["guidance"], r["size"]), []).append(i)
            for (model, steps, guidance, size), idx in groups.items():
                prompts = [reqs[i]["prompt"] for i in idx for _ in range(reqs[i]["num_images"])]
                # each image's noise depends only on its own seed (request seed + index), not on the batch
                seeds = [reqs[i]["seed"] + k for i in idx for k in range(reqs[i]["num_images"])]
                images = self.sampler.generate(model, prompts, seeds, steps=steps, guidance=guidance,
                                               resolution=size, seed=0)
                pos = 0
                for i in idx:
                    n = reqs[i]["num_images"]
                    out[i] = images[pos:pos + n]
                    pos += n
            return out

    return ImageService.bind()


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def app_from_env():
    """Entry point for `serve run deploy.serve:app_from_env` (config path in FLOWOPD_SERVE_CONFIG)."""
    return build_app(load_config(os.environ["FLOWOPD_SERVE_CONFIG"], cls=ServeConfig))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides, ServeConfig)
    from pipelines.launch import init_ray
    init_ray(None)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name="flowopd", route_prefix="/", blocking=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
