"""A stand-in for the SD3 transformer whose forward and backward cost a calibrated delay instead of GPU time.

It lets the real actors, object store and trainer run at SD3.5-Medium tensor sizes on a CPU machine: the
output has the latents' shape and depends on the inputs and on the LoRA weights (so losses and gradients
are real), and each call sleeps for batch x per-sample latency. Processes on the same simulated GPU (the id
Ray puts in CUDA_VISIBLE_DEVICES) take turns through a file lock, as kernels on one GPU would, and log
their busy intervals so a benchmark can measure the busiest GPU. No Ray import: this is model code.
"""
import fcntl
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from peft.tuners.lora import LoraLayer
from torch import nn

log = logging.getLogger(__name__)

# Per-sample seconds of the SD3.5-Medium MMDiT at 512 px (1024 image + 333 text tokens), bf16, measured on
# one H100. torch.compile gave no LoRA forward figure: it is the compiled forward scaled by 10.4 / 9.5.
LATENCY = {
    "eager": {"forward": 9.5e-3, "forward_lora": 10.4e-3, "forward_backward_lora": 33e-3},
    "compiled": {"forward": 5.5e-3, "forward_lora": 5.5e-3 * 10.4 / 9.5, "forward_backward_lora": 16.6e-3},
}
# The Linear layers peft targets (flowopd.config.LORA_TARGETS); SD3's last block has no to_add_out.
PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


class ThinLinear(nn.Linear):
    """A square projection of the real width with a diagonal weight: peft sizes its LoRA factors from
    in_features/out_features (so adapters, weight syncs and gradients have SD3.5-M's sizes) while the base
    weight costs `width` numbers, not width^2."""

    def __init__(self, width: int):
        nn.Module.__init__(self)
        self.in_features = self.out_features = width
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class SimAttention(nn.Module):
    def __init__(self, width: int, context_out: bool):
        super().__init__()
        for name in PROJECTIONS:
            setattr(self, name, ThinLinear(width))
        self.to_out = nn.ModuleList([ThinLinear(width)])
        self.to_add_out = ThinLinear(width) if context_out else None


class SimBlock(nn.Module):
    def __init__(self, width: int, context_out: bool):
        super().__init__()
        self.attn = SimAttention(width, context_out)


class _Delay(torch.autograd.Function):
    """Identity whose forward and backward each take their simulated time on the model's GPU."""

    @staticmethod
    def forward(ctx, x, gpu, forward_s, backward_s):
        gpu.run(forward_s, "forward")
        ctx.gpu, ctx.backward_s = gpu, backward_s
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.gpu.run(ctx.backward_s, "backward")
        return grad, None, None, None


class SimulatedGPU:
    """The simulated GPU of this process: CUDA_VISIBLE_DEVICES' first id (Ray sets it for actors with
    num_gpus > 0; fractional asks share an id), else a private one. With a run directory, busy time is
    serialised per GPU by an fcntl lock and logged as "start end seconds kind cpu" lines: wall clock, the
    simulated seconds, and the process's CPU seconds so far (the host work around the simulated calls)."""

    def __init__(self, run_dir: str | None):
        ids = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        self.id = ids or f"private{os.getpid()}"
        self.run_dir = Path(run_dir) if run_dir else None
        if self.run_dir:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _exclusive(self):
        if self.run_dir is None:
            yield
            return
        with open(self.run_dir / f"gpu-{self.id}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def run(self, seconds: float, kind: str) -> None:
        if seconds <= 0:
            return
        with self._exclusive():
            start = time.time()
            time.sleep(seconds)
            end = time.time()
        if self.run_dir is not None:
            with open(self.run_dir / f"gpu-{self.id}.{os.getpid()}.busy", "a") as f:
                f.write(f"{start:.6f} {end:.6f} {seconds:.6f} {kind} {time.process_time():.3f}\n")


class SimulatedTransformer(ModelMixin, ConfigMixin):
    """Called like diffusers' SD3Transformer2DModel (as flowopd.models.velocity does).

    latency: {"eager"|"compiled": {"forward", "forward_lora", "forward_backward_lora": seconds per sample}},
    the compiled set once `compile()` was called (model.compile); time_scale multiplies every delay (>1
    leaves the emulating CPUs more room); run_dir is where the processes of one run share GPU locks and
    busy logs (None: no lock, no log)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, sample_size: int = 128, patch_size: int = 2, in_channels: int = 16, out_channels: int = 16,
                 num_layers: int = 24, width: int = 1536, joint_attention_dim: int = 4096,
                 pooled_projection_dim: int = 2048, latency: dict | None = None, time_scale: float = 1.0,
                 run_dir: str | None = None):
        super().__init__()
        if latency is None:
            self.register_to_config(latency=LATENCY)
        self.transformer_blocks = nn.ModuleList([SimBlock(width, i < num_layers - 1) for i in range(num_layers)])
        self.context_embedder = nn.Linear(joint_attention_dim, out_channels)
        self.pooled_embedder = nn.Linear(pooled_projection_dim, out_channels)
        self.proj_out = nn.Conv2d(in_channels, out_channels, 1)
        self.register_buffer("probe", torch.randn(width) / width ** 0.5, persistent=False)
        self.gpu = SimulatedGPU(run_dir)

    def enable_gradient_checkpointing(self, *args, **kwargs) -> None:
        """No activations to recompute, and the latency model has no figure for it: learner time stays
        that of training without checkpointing."""
        log.warning("SimulatedTransformer: gradient checkpointing is not simulated (no extra learner time)")

    def compile(self, *args, **kwargs) -> None:
        """Take the compiled latency figures instead of compiling (torch.compile of the stand-in would cost
        CPU minutes and say nothing of the GPU); `is_compiled` then holds, so `velocity` pads batches to
        bucket sizes and the padding costs time, as with a compiled model on a GPU."""
        self._compiled_call_impl = self._call_impl

    def projections(self) -> list[nn.Module]:
        """The LoRA-targeted layers as the model holds them now (peft wraps them in place)."""
        return [m for blk in self.transformer_blocks for m in (*(getattr(blk.attn, n) for n in PROJECTIONS),
                                                                 blk.attn.to_out[0], blk.attn.to_add_out)
                if m is not None]

    def lora_terms(self, probe: torch.Tensor) -> list[torch.Tensor]:
        """One scalar per LoRA a forward applies (peft layers' active adapters, unless disabled or merged: a
        merged LoRA lives in the base weight and costs nothing extra): scaling * mean(B A probe), the LoRA
        path of peft's forward on one probe row, computed directly (calling 191 peft layers costs 20 ms)."""
        return [m.scaling[a] * (m.lora_B[a].weight.mean(0) @ (m.lora_A[a].weight @ probe))
                for m in self.projections() if isinstance(m, LoraLayer) and not m.disable_adapters and not m.merged
                for a in m.active_adapters if a in m.lora_A]

    def delays(self, batch: int, lora: bool) -> tuple[float, float]:
        """(forward, backward) seconds for a batch; backward is what training adds on top of the forward."""
        lat = self.config.latency["eager" if self._compiled_call_impl is None else "compiled"]
        fwd = lat["forward_lora" if lora else "forward"]
        scale = batch * self.config.time_scale
        return fwd * scale, (lat["forward_backward_lora"] - lat["forward_lora"]) * scale

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                return_dict: bool = True, **unused):
        x = hidden_states
        n = x.shape[0]
        terms = self.lora_terms(self.probe.to(x.dtype))
        lora = torch.stack(terms).mean() if terms else 0.0  # carries the LoRA gradient
        cond = self.context_embedder(encoder_hidden_states[:, 0]) + self.pooled_embedder(pooled_projections)
        t = timestep.to(x.dtype).view(n, 1, 1, 1) / 1000
        out = self.proj_out(x) * (1 + lora) * (1 - t) + cond[:, :, None, None]
        out = _Delay.apply(out, self.gpu, *self.delays(n, bool(terms)))
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def save_simulated_model(path: str, seed: int = 0, **transformer_config) -> str:
    """A diffusers pipeline directory: the simulated transformer, text encoders of the real output widths
    (thin, so encoding costs next to nothing) and a tiny VAE with SD3's 8x scale and 16 latent channels."""
    from .models import save_random_model
    return save_random_model(path, "sim", seed, **transformer_config)
