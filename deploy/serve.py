"""Serve the trained student (and, by model id, any teacher adapter on the same base) with Ray Serve.

    python -m deploy.serve --config configs/tiny_serve.yaml          # blocks; Ctrl-C stops it
    serve run deploy.serve:app_from_env                              # with FLOWOPD_SERVE_CONFIG=my.yaml

Endpoints: GET /health, GET /v1/models, POST /v1/generate (JSON: prompt, model, num_images, steps,
guidance, seed, size, format = "base64" | "png"), OpenAPI docs at /docs listing every status each route
answers. Concurrent requests are batched per replica and sampled off the event loop, so /health answers
during a batch; request fields are strictly typed (no coercion, unknown keys rejected) and bounded by
`limits`; with `api_key` set, /v1/* need `Authorization: Bearer`. Every local path in the config must
exist at launch.
"""
import argparse
import asyncio
import base64
import io
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, create_model, field_validator
from ray import serve

from actors.sampler import Sampler
from flowopd.config import ConfigError, EvalModel, EvalSampling, ModelConfig, Strict, load_config
from flowopd.hub import resolve_config
from flowopd.models import transformer_config
from pipelines.preflight import check_adapter, check_resolution, pixel_multiple


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
    # requests a replica holds at once, sampling or waiting for a batch; Serve queues the rest in front of the
    # replica, where a GET /health would wait behind them
    max_ongoing_requests: int = Field(256, gt=0)
    batch_wait_s: float = Field(0.05, ge=0)
    host: str = "127.0.0.1"
    port: int = 8000

    def key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else self.api_key


class Error(BaseModel):
    detail: str


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationFailed(BaseModel):
    """FastAPI's 422 body."""
    detail: list[FieldError]


class Health(BaseModel):
    status: Literal["ok"]
    generating: int = Field(description="images the answering replica is sampling right now")


class ModelList(BaseModel):
    models: list[str]
    default: str


class Generated(BaseModel):
    model: str
    seeds: list[int]
    images: list[str] = Field(description="base64 PNGs, one per seed")
    seconds: float


def integral(value):
    """JSON Schema's `integer` includes 4.0, so a strict int field takes a float with no fraction (and still
    rejects "4", 4.5 and booleans)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**bounds):
    """A strict int field with its bounds; the bounds come before the validator, or pydantic's JSON schema
    writes them under names no schema reader knows (`ge` rather than `minimum`) inside an Optional."""
    return Annotated[int, Field(**bounds), BeforeValidator(integral)]


def largest_side(pixels: int, images: int, multiple: int) -> int:
    """The largest image side, a multiple of `multiple`, with images x side^2 within `pixels`."""
    side = math.isqrt(pixels // images)
    return side - side % multiple


def request_model(cfg: ServeConfig, default_model: str, multiple: int) -> type[BaseModel]:
    """The generate request, with bounds from the config. Strict, so `"seed": false` or `"steps": "4"` is a
    422 rather than silently coerced, and an unknown (e.g. misspelt) key is a 422 rather than ignored. The
    rules that join two fields (png returns one image; num_images x size^2 within max_pixels) are validated
    here too and stated in the JSON schema as if/then clauses, so every request the schema allows is served."""
    lim = cfg.limits
    rules = [{"if": {"properties": {"format": {"const": "png"}}, "required": ["format"]},
              "then": {"properties": {"num_images": {"const": 1}}}}]
    for n in range(1, lim.max_images + 1):
        side = largest_side(lim.max_pixels, n, multiple)
        if side < lim.max_size:  # an absent num_images is 1, so that clause also applies without the key
            rules.append({"if": {"properties": {"num_images": {"const": n}}} | ({"required": ["num_images"]} if n > 1 else {}),
                          "then": {"properties": {"size": {"maximum": side}}}
                          | ({"required": ["size"]} if cfg.model.resolution > side else {})})

    def size_within_pixels(size: int, info: ValidationInfo) -> int:
        images = info.data.get("num_images", 1)
        if images * size ** 2 > lim.max_pixels:
            raise ValueError(f"num_images x size^2 is over {lim.max_pixels} pixels: at most size "
                             f"{largest_side(lim.max_pixels, images, multiple)} for {images} image(s)")
        return size

    def png_is_one_image(fmt: str, info: ValidationInfo) -> str:
        if fmt == "png" and info.data.get("num_images", 1) != 1:
            raise ValueError("format png returns one image: set num_images to 1 or use base64")
        return fmt

    return create_model(
        "GenerateRequest",
        __config__=ConfigDict(strict=True, extra="forbid", json_schema_extra={"allOf": rules}),
        __validators__={"size_within_pixels": field_validator("size")(size_within_pixels),
                        "png_is_one_image": field_validator("format")(png_is_one_image)},
        prompt=(str, Field(min_length=1, max_length=lim.max_prompt_chars)),
        model=(Literal[tuple(cfg.models)], default_model),
        num_images=(integer(ge=1, le=lim.max_images), 1),
        steps=(integer(ge=2, le=lim.max_steps), cfg.sampling.num_steps),
        guidance=(float | None, Field(None, ge=0, le=30)),
        seed=(integer(ge=0, lt=2 ** 63) | None, None),
        size=(integer(ge=lim.min_size, le=lim.max_size, multiple_of=multiple),
              Field(cfg.model.resolution, validate_default=True)),
        format=(Literal["base64", "png"], Field("base64", validate_default=True)),
    )


def size_multiple(cfg: ServeConfig) -> int:
    """The base's pixel multiple, after checking that the limits leave every num_images a servable size."""
    multiple = pixel_multiple(Path(cfg.model.base), transformer_config(cfg.model.base))
    check_resolution(cfg.model.resolution, Path(cfg.model.base), transformer_config(cfg.model.base))
    lim = cfg.limits
    smallest = -(-lim.min_size // multiple) * multiple
    if smallest > lim.max_size:
        raise ConfigError(f"limits: no size between min_size {lim.min_size} and max_size {lim.max_size} is a "
                          f"multiple of {multiple} (VAE scale x patch size of {cfg.model.base})")
    if lim.max_images * smallest ** 2 > lim.max_pixels:
        raise ConfigError(f"limits.max_pixels: {lim.max_pixels} cannot hold max_images {lim.max_images} images of "
                          f"the smallest size {smallest}")
    return multiple


def build_app(cfg: ServeConfig):
    default_model = cfg.default_model or next(iter(cfg.models))
    if default_model not in cfg.models:
        raise ConfigError(f"default_model: {default_model!r} is not under `models`")
    Request = request_model(cfg, default_model, size_multiple(cfg))
    api = FastAPI(title="Flow-OPD image generation", version="1")
    bearer = HTTPBearer(auto_error=False, description="the server's API key (`api_key` or `api_key_env`)")

    def authorize(token: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        """A dependency, so it runs before body validation: a caller without the key never sees a 422."""
        key = cfg.key()
        if key is None:
            return
        if token is None:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(token.credentials, key):
            raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})

    keyed = cfg.api_key is not None or cfg.api_key_env is not None
    auth = [Depends(authorize)] if keyed else []
    unauthorized = {401: {"model": Error, "description": "missing or wrong `Authorization: Bearer <key>`"}} if keyed else {}
    generate_answers = unauthorized | {
        200: {"content": {"image/png": {}}, "description": "base64 PNGs with their seeds, or with format png "
                                                           "one raw PNG (its seed in the X-Seed header)"},
        400: {"model": Error, "description": "a body that cannot be decoded (not UTF-8)"},
        422: {"model": ValidationFailed, "description": "a missing, unknown, mistyped or out-of-bounds field (an "
                                                        "unknown model among them), or a broken joint rule the "
                                                        "schema states (num_images x size^2 within max_pixels; "
                                                        "format png with one image)"},
    }

    @serve.deployment(num_replicas=cfg.replicas, max_ongoing_requests=cfg.max_ongoing_requests,
                      ray_actor_options={"num_gpus": cfg.num_gpus, "num_cpus": cfg.num_cpus})
    @serve.ingress(api)
    class ImageService:
        def __init__(self):
            models = {n: m.model_dump() for n, m in cfg.models.items()}
            self.sampler = Sampler(cfg.model, models, cfg.sampling, seed=0, batch_size=cfg.max_batch_size)
            self.generating = 0

        @api.get("/health")
        async def health(self) -> Health:
            return Health(status="ok", generating=self.generating)

        @api.get("/v1/models", dependencies=auth, responses=unauthorized)
        def models(self) -> ModelList:
            return ModelList(models=sorted(cfg.models), default=default_model)

        @api.post("/v1/generate", dependencies=auth, response_model=Generated, responses=generate_answers)
        async def generate(self, req: Request):
            seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(6), "big")
            start = time.perf_counter()
            images = await self.batched(req.model_dump() | {"seed": seed})
            seeds = [seed + i for i in range(req.num_images)]
            if req.format == "png":
                return Response(png(images[0]), media_type="image/png", headers={"X-Seed": str(seed)})
            return Generated(model=req.model, seeds=seeds, images=[base64.b64encode(png(im)).decode() for im in images],
                             seconds=round(time.perf_counter() - start, 3))

        @serve.batch(max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_wait_s)
        async def batched(self, reqs: list[dict]) -> list[np.ndarray]:
            """Concurrent requests with the same model and settings run as one sampler batch, in a worker
            thread so the event loop keeps answering (/health, new requests joining the next batch)."""
            out: list = [None] * len(reqs)
            groups: dict[tuple, list[int]] = {}
            for i, r in enumerate(reqs):
                groups.setdefault((r["model"], r["steps"], r["guidance"], r["size"]), []).append(i)
            for (model, steps, guidance, size), idx in groups.items():
                prompts = [reqs[i]["prompt"] for i in idx for _ in range(reqs[i]["num_images"])]
                # each image's noise depends only on its own seed (request seed + index), not on the batch
                seeds = [reqs[i]["seed"] + k for i in idx for k in range(reqs[i]["num_images"])]
                self.generating += len(prompts)
                try:
                    images = await asyncio.to_thread(self.sampler.generate, model, prompts, seeds, steps=steps,
                                                     guidance=guidance, resolution=size, seed=0)
                finally:
                    self.generating -= len(prompts)
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


def check_paths(cfg: ServeConfig) -> None:
    """Name every missing base or adapter before Ray starts, instead of a replica failing to load it."""
    paths = {"model.base": cfg.model.base} | {f"models.{name}.{k}": path for name, m in cfg.models.items()
                                              for k in ("adapter", "transformer") if (path := getattr(m, k))}
    missing = [f"{key}: {path}" for key, path in paths.items() if not Path(path).exists()]
    if missing:
        raise ConfigError("these paths do not exist (train or export them first):\n  " + "\n  ".join(missing))
    for name, m in cfg.models.items():
        if m.adapter:
            check_adapter(f"models.{name}.adapter", m.adapter, Path(cfg.model.base))


def app_from_env():
    """Entry point for `serve run deploy.serve:app_from_env` (config path in FLOWOPD_SERVE_CONFIG)."""
    return build_app(load_config(os.environ["FLOWOPD_SERVE_CONFIG"], cls=ServeConfig))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, ServeConfig)
        resolve_config(cfg)
        check_paths(cfg)
        size_multiple(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pipelines.launch import init_ray
    init_ray(None)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name="flowopd", route_prefix="/", blocking=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
