"""Validated job configuration (pydantic): YAML file + `key=value` overrides, checked before any actor starts."""
import itertools
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

# The paper's (and Flow-GRPO's) LoRA targets: every attention projection of both MMDiT streams.
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(Strict):
    """Where a group of actors runs; `resources` names custom node resources (see ray_cluster.yaml)."""
    num_gpus: float = Field(0, ge=0)
    num_cpus: float = Field(1, ge=0)
    resources: dict[str, float] = {}


class ModelConfig(Strict):
    base: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_sequence_length: int = Field(256, gt=0)
    resolution: int = Field(512, gt=0)
    compile: bool = False  # torch.compile every transformer (a GPU speed-up; see docs/gpu.md)


class StudentConfig(Strict):
    base: str | None = None  # a pipeline directory replacing model.base for the student (a fused cold start)
    init_adapter: str | None = None
    lora_rank: int = Field(32, gt=0)
    lora_alpha: float = 64
    lora_targets: list[str] = LORA_TARGETS
    lora_init: Literal["gaussian", "default"] = "gaussian"


class ModelSource(Strict):
    """A frozen model: a peft LoRA adapter on the shared base, a full transformer checkpoint, or the base."""
    adapter: str | None = None
    transformer: str | None = None
    guidance: float | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if self.adapter and self.transformer:
            raise ValueError("give either `adapter` or `transformer`, not both")
        return self


class TeacherConfig(ModelSource):
    """A teacher, served by one of the teacher pools."""
    pool: str = "default"


class PoolConfig(Resources):
    replicas: int = Field(1, gt=0)
    batch_size: int = Field(32, gt=0)
    max_restarts: int = Field(3, ge=0)


class MarConfig(Strict):
    teacher: str | None = None
    weight: float = Field(0.02, ge=0)


class SamplingConfig(Strict):
    num_steps: int = Field(10, gt=1)
    shift: float = Field(3.0, gt=0)
    noise_level: float = Field(0.7, ge=0)
    guidance: float = 4.5
    negative_prompt: str = ""
    train_timestep_fraction: float = Field(0.99, gt=0, le=1)
    # Flow-GRPO-Fast: only `sde_window_size` consecutive steps are stochastic (and trained), the rest are
    # ODE steps; the window starts anywhere in [sde_window_range[0], sde_window_range[1] - size], drawn
    # per training step. 0 = every step stochastic, the first train_timestep_fraction of them trained.
    sde_window_size: int = Field(0, ge=0)
    sde_window_range: tuple[int, int] | None = None  # default: (0, num_steps)
    # Flow-GRPO's `same_latent`: the samples of one prompt share their initial noise, so rewards within a
    # group differ only through the stochastic steps the policy gradient sees
    same_latent: bool = False
    # an explicit few-step schedule in timesteps (e.g. [1000, 750, 500, 250], shifted by `shift`), replacing
    # num_steps; and the sampler: "sde" (Flow-GRPO's SDE, noise_level a; 0 is the Euler ODE) or "cps" (RTDMD's
    # few-step sampler, noise_level = eta: the angle at which fresh noise is mixed in)
    timesteps: list[float] | None = Field(None, min_length=1)
    sampler: Literal["sde", "cps"] = "sde"

    @model_validator(mode="after")
    def _few_steps(self):
        if self.timesteps:
            t = self.timesteps
            if any(not 0 < x <= 1000 for x in t) or any(a <= b for a, b in itertools.pairwise(t)):
                raise ValueError(f"timesteps: {self.timesteps} must decrease within (0, 1000]")
            self.num_steps = len(self.timesteps)
        if self.sampler == "cps" and self.noise_level > 1:
            raise ValueError(f"noise_level: the CPS sampler's eta must lie in [0, 1], got {self.noise_level}")
        return self

    @model_validator(mode="after")
    def _window(self):
        lo, hi = self.sde_window_range or (0, self.num_steps)
        if self.sde_window_range is not None and not 0 <= lo < hi <= self.num_steps:
            raise ValueError(f"sde_window_range: {[lo, hi]} must satisfy 0 <= start < end <= num_steps "
                             f"({self.num_steps})")
        if self.sde_window_size > hi - lo:
            raise ValueError(f"sde_window_size: {self.sde_window_size} does not fit in sde_window_range {[lo, hi]}")
        return self


class DataSource(Strict):
    path: str
    format: Literal["geneval", "ocr", "pickscore", "txt", "jsonl", "parquet"]
    task: str | None = None
    weight: float = Field(1.0, gt=0)


class DataConfig(Strict):
    sources: list[DataSource] = Field(min_length=1)
    prompts_per_step: int = Field(2, gt=0)
    group_size: int = Field(24, gt=0)
    # per_prompt: every prompt draws its source by weight; alternate: each step takes all its prompts from
    # one source, cycling by integer weights (the paper's GRPO-Mix "epoch ratio", e.g. 3:1:1)
    mixing: Literal["per_prompt", "alternate"] = "per_prompt"

    @model_validator(mode="after")
    def _alternate_weights(self):
        if self.mixing == "alternate":
            for i, src in enumerate(self.sources):
                if src.weight != int(src.weight):
                    raise ValueError(f"sources[{i}].weight: alternate mixing needs integer weights")
        return self


class RolloutConfig(Resources):
    workers: int = Field(1, gt=0)
    batch_size: int = Field(8, gt=0)


class LearnerConfig(Resources):
    ranks: int = Field(1, gt=0)
    micro_batch_size: int = Field(8, gt=0)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0)
    # the learning rate over the run's optimizer steps (flowopd.learner.lr_factor): constant (Flow-GRPO), or
    # `lr_warmup` steps of linear warm-up, then a cosine decay to lr * lr_final at the last step
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_warmup: int = Field(0, ge=0)
    lr_final: float = Field(0.1, ge=0, le=1)
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # recompute each transformer block in the backward pass: activations of one block instead of all of
    # them, for about a third more learner time (a larger micro_batch_size fits)
    gradient_checkpointing: bool = False


class LossConfig(Strict):
    form: Literal["analytic", "policy_gradient"] = "analytic"
    kl_weighting: Literal["exact", "released"] = "exact"
    clip_range: float | None = None
    train_cfg: bool = True
    detach_uncond: bool = False  # the released Flow-OPD loss keeps the unconditional branch's gradient


class TrainConfig(Strict):
    steps: int = Field(100, gt=0)
    checkpoint_every: int = Field(10, gt=0)
    keep_checkpoints: int = Field(3, gt=0)
    # actor deaths (a rollout worker, a learner rank, a reward or teacher replica beyond its restarts) the job
    # recovers from by restarting every actor from the newest checkpoint; one more ends the job
    max_failures: int = Field(3, ge=0)


class LoggerConfig(Strict):
    """An experiment tracker beside metrics.jsonl (which is always written)."""
    backend: Literal["jsonl", "tensorboard", "wandb", "mlflow"] = "jsonl"
    dir: str | None = None  # TensorBoard: <dir>/<run_name> (default <output_dir>/tensorboard)
    project: str = "flow-opd"  # wandb project / MLflow experiment
    run_name: str | None = None  # default: the output directory's name
    tracking_uri: str | None = None  # MLflow


class RunConfig(Strict):
    """What every job has: a seed, where it writes, which cluster, and the base model."""
    seed: int = 0
    output_dir: str
    ray_address: str | None = None
    model: ModelConfig
    logger: LoggerConfig = LoggerConfig()

    @field_validator("output_dir")
    @classmethod
    def _output_dir_is_no_file(cls, v: str) -> str:
        if Path(v).exists() and not Path(v).is_dir():
            raise ValueError(f"{v} is an existing file, not a directory")
        return v


class JobConfig(RunConfig):
    """What every training job has besides: a student LoRA, rollouts, a learner group, data."""
    student: StudentConfig = StudentConfig()
    sampling: SamplingConfig = SamplingConfig()
    data: DataConfig
    rollout: RolloutConfig = RolloutConfig()
    learner: LearnerConfig = LearnerConfig()
    train: TrainConfig = TrainConfig()

    def needs_transitions(self) -> bool:
        """Whether rollouts must return x' and log-probs (score-function losses)."""
        return True

    def actor_groups(self) -> dict[str, tuple[Resources, int]]:
        """{config key: (what each actor asks for, how many)} for every actor group the job starts."""
        return {"rollout": (self.rollout, self.rollout.workers), "learner": (self.learner, self.learner.ranks)}

    def used_teachers(self) -> list[str]:
        """The teachers the job loads (checked before any actor starts)."""
        return []

    def reward_specs(self) -> list["RewardSpec"]:
        """The reward actors the job starts (checked before any actor starts)."""
        return []

    def task_problem(self, task: str) -> str | None:
        """Why the job cannot train on prompts of `task`, or None."""
        return None

    def plan(self) -> list[str]:
        """What the job does with the rollouts, in a line or two (printed by --check and at start-up)."""
        return []

    def student_base(self) -> str:
        return self.student.base or self.model.base

    def optimizer_steps(self) -> int:
        """The student's optimizer steps over the whole run: the length of the learning-rate schedule."""
        return self.train.steps


class RewardSpec(Resources):
    """A reward actor pool: `name` is a built-in, `module:Class`, `file.py:Class` or an entry point."""
    name: str
    label: str | None = None
    kwargs: dict = {}
    weight: float = 1.0
    tasks: list[str] | None = None
    replicas: int = Field(1, gt=0)
    batch_size: int = Field(64, gt=0)
    max_restarts: int = Field(3, ge=0)

    @property
    def key(self) -> str:
        return self.label or self.name

    def applies_to(self, task: str) -> bool:
        return self.tasks is None or task in self.tasks


def reward_groups(specs: list[RewardSpec]) -> dict[str, tuple[Resources, int]]:
    return {f"rewards.{r.key}": (r, r.replicas) for r in specs}


def unrouted(task: str, route: dict[str, str]) -> str | None:
    return None if task in route else f"has no entry under `route` (routed tasks: {sorted(route)})"


def route_line(route: dict[str, str]) -> str:
    return "route: " + ", ".join(f"{k} -> {v}" for k, v in route.items())


def check_unique_labels(field: str, specs: list[RewardSpec]) -> None:
    keys = [r.key for r in specs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{field}: labels must be unique, got {keys} (set `label`)")


class Rewarded:
    """A job trained on the scores of its `rewards` (reward actor pools): every prompt's task needs one."""

    def actor_groups(self) -> dict[str, tuple[Resources, int]]:
        return {**reward_groups(self.rewards), **super().actor_groups()}

    def reward_specs(self) -> list[RewardSpec]:
        return self.rewards

    def task_problem(self, task: str) -> str | None:
        if not any(spec.applies_to(task) for spec in self.rewards):
            return "has no reward (set `tasks` of a reward under `rewards` to include it)"
        return None

    def rewards_line(self) -> str:
        return "rewards: " + ", ".join(f"{r.key} x{r.weight:g} on {r.tasks or 'all tasks'}" for r in self.rewards)


class OPDRollout(RolloutConfig):
    # overlap: each worker streams its samples in micro-groups of at most `micro_group` samples of one task;
    # each is labelled by its teachers and its gradient accumulated by the learner ranks as soon as it
    # exists, and one optimizer step ends the step (still on-policy). Smaller micro-groups overlap more.
    # false: all rollouts, then all labels, then learning.
    overlap: bool = True
    micro_group: int | None = Field(None, gt=0)  # samples; default: rollout.batch_size

    def micro_group_samples(self) -> int:
        return self.micro_group or self.batch_size


class OPDConfig(JobConfig):
    rollout: OPDRollout = OPDRollout()
    teachers: dict[str, TeacherConfig] = Field(min_length=1)
    route: dict[str, str] = Field(min_length=1)
    mar: MarConfig = MarConfig()
    pools: dict[str, PoolConfig] = {"default": PoolConfig()}
    loss: LossConfig = LossConfig()
    monitor: list[RewardSpec] = []  # scored on the student's rollouts for reward curves; never in the loss

    def needs_transitions(self) -> bool:
        return self.loss.form == "policy_gradient"

    def reward_specs(self) -> list["RewardSpec"]:
        return self.monitor

    def task_problem(self, task: str) -> str | None:
        return unrouted(task, self.route)

    def plan(self) -> list[str]:
        return [route_line(self.route) + (f"; MAR {self.mar.teacher} (lambda {self.mar.weight})"
                                           if self.mar.teacher else "")]

    def actor_groups(self) -> dict[str, tuple[Resources, int]]:
        pools = {self.teachers[t].pool for t in self.used_teachers()}
        return {**{f"pools.{n}": (p, p.replicas) for n, p in self.pools.items() if n in pools},
                **super().actor_groups()}

    @model_validator(mode="after")
    def _references(self):
        for task, name in self.route.items():
            if name not in self.teachers:
                raise ValueError(f"route.{task}: teacher {name!r} is not defined under `teachers` "
                                 f"(defined: {sorted(self.teachers)})")
        if self.mar.teacher is not None and self.mar.teacher not in self.teachers:
            raise ValueError(f"mar.teacher: {self.mar.teacher!r} is not defined under `teachers`")
        check_unique_labels("monitor", self.monitor)
        for name, t in self.teachers.items():
            if t.pool not in self.pools:
                raise ValueError(f"teachers.{name}.pool: pool {t.pool!r} is not defined under `pools`")
        return self

    def teacher_guidance(self, name: str) -> float:
        g = self.teachers[name].guidance
        return self.sampling.guidance if g is None else g

    def used_teachers(self) -> list[str]:
        names = set(self.route.values()) | ({self.mar.teacher} if self.mar.teacher else set())
        return sorted(names)


class GRPOSettings(Strict):
    beta: float = Field(0.04, ge=0)
    clip_range: float = Field(1e-4, gt=0)
    adv_clip: float = Field(5.0, gt=0)
    minibatches: int = Field(1, gt=0)
    detach_uncond: bool = True  # Flow-GRPO's policy: no gradient through the unconditional CFG branch
    # Flow-GRPO's EMA of the exported weights: decay min((1+s)/(10+s), ema_decay) at optimizer step s,
    # applied every `ema_every` optimizer steps, starting from the initial weights; null turns it off
    ema_decay: float | None = Field(0.9, gt=0, lt=1)
    ema_every: int = Field(8, gt=0)


class GRPOData(DataConfig):
    prompts_per_step: int = Field(24, gt=0)  # x group_size 24 = Flow-GRPO's 576 samples per optimizer step


class GRPOLearner(LearnerConfig):
    lr: float = Field(3e-4, gt=0)  # Flow-GRPO's LoRA learning rate (OPD's default is 1e-4)


class ProbeConfig(Strict):
    """A fixed probe set scored while a GRPO job trains: the weights it would export (the EMA when on), sampled
    like an evaluation (ODE) on the same prompts, seeds and noise every `every` steps and at steps 0 and last,
    so held-out reward against samples is a paired curve (probe.jsonl), free of the rollout reward's noise."""
    sources: list[DataSource] = Field(min_length=1)
    every: int = Field(10, gt=0)
    max_prompts_per_source: int | None = Field(32, gt=0)  # the first N of each file: fixed, never chosen by result
    # one count, or {task: count}: a task with few prompts needs more seeds for a tight CI
    samples_per_prompt: PositiveInt | dict[str, PositiveInt] = 4
    num_steps: int | None = Field(None, gt=0)  # default: sampling.num_steps
    guidance: float | None = None  # default: sampling.guidance
    seed: int = 0

    def samples(self, task: str) -> int:
        return samples_for(self.samples_per_prompt, task, "probe.samples_per_prompt")


MIN_SAMPLES_PER_UPDATE = 256  # below this a GRPO update on a sparse reward is mostly noise


class GRPOConfig(Rewarded, JobConfig):
    """Stage 1 (one reward: a teacher) or GRPO-Mix (several rewards, weighted sum or alternating data)."""
    rewards: list[RewardSpec] = Field(min_length=1)
    grpo: GRPOSettings = GRPOSettings()
    data: GRPOData
    learner: GRPOLearner = GRPOLearner()
    export_dir: str | None = None
    probe: ProbeConfig | None = None

    def plan(self) -> list[str]:
        n = self.samples_per_update()
        return [self.rewards_line(),
                f"{n:g} samples per optimizer step (Flow-GRPO: 576)" + (
                    f"; below {MIN_SAMPLES_PER_UPDATE} a GRPO update on a sparse reward is mostly noise: raise "
                    f"data.prompts_per_step or lower grpo.minibatches" if n < MIN_SAMPLES_PER_UPDATE else "")]

    def optimizer_steps(self) -> int:
        return self.train.steps * self.grpo.minibatches

    def samples_per_update(self) -> float:
        """Samples behind each optimizer step (Flow-GRPO: 576)."""
        return self.data.prompts_per_step * self.data.group_size / self.grpo.minibatches

    @model_validator(mode="after")
    def _unique_labels(self):
        check_unique_labels("rewards", self.rewards)
        return self


class DMDSettings(Strict):
    """AC-DMD (RTDMD stage 1); defaults are the released SD3.5-M cold start's."""
    fake_update_ratio: int = Field(10, gt=0)  # fake-score updates per generator update, each on fresh samples
    consistency_weight: float = Field(0.01, ge=0)
    consistency_step: int = Field(200, gt=0)  # the consistency move goes back up to this many timesteps
    ema_decay: float | None = Field(0.99, gt=0, lt=1)  # generator EMA, updated after every fake update


class FakeScoreConfig(Strict):
    """The fake score: its own LoRA on the base (fresh, or `init_adapter`) and its own learner group."""
    init_adapter: str | None = None
    learner: LearnerConfig = LearnerConfig(lr=3e-5, weight_decay=0.0)


class DMDData(DataConfig):
    prompts_per_step: int = Field(9, gt=0)
    group_size: int = Field(1, gt=0)  # samples per prompt (distribution matching needs no groups)


CPS_FEW_STEPS = SamplingConfig(timesteps=[1000, 750, 500, 250], sampler="cps", noise_level=0.9, guidance=1.0)


class DMDConfig(JobConfig):
    """A few-step generator (the student: its LoRA, sampled with `sampling`, by default the 4-step CPS
    schedule without CFG) distilled from a frozen teacher (the real score, served by the teacher pools) by
    AC-DMD, with a fake score trained online on its samples."""
    sampling: SamplingConfig = CPS_FEW_STEPS
    data: DMDData
    learner: LearnerConfig = LearnerConfig(lr=3e-5, weight_decay=0.0)
    teachers: dict[str, TeacherConfig] = {"real": TeacherConfig(guidance=4.5)}  # default: the base model
    pools: dict[str, PoolConfig] = {"default": PoolConfig()}
    fake: FakeScoreConfig = FakeScoreConfig()
    dmd: DMDSettings = DMDSettings()
    export_dir: str | None = None

    @model_validator(mode="after")
    def _dmd(self):
        if set(self.teachers) != {"real"}:
            raise ValueError(f"teachers: distribution matching takes one teacher, named `real` (got {sorted(self.teachers)})")
        if self.teachers["real"].pool not in self.pools:
            raise ValueError(f"teachers.real.pool: pool {self.teachers['real'].pool!r} is not defined under `pools`")
        if self.sampling.sampler != "cps" or not self.sampling.timesteps:
            raise ValueError("sampling: AC-DMD trains a CPS few-step generator: set sampling.sampler: cps and "
                             "sampling.timesteps")
        return self

    def needs_transitions(self) -> bool:
        return False

    def used_teachers(self) -> list[str]:
        return ["real"]

    def teacher_guidance(self, name: str) -> float:
        g = self.teachers[name].guidance
        return self.sampling.guidance if g is None else g

    def actor_groups(self) -> dict[str, tuple[Resources, int]]:
        pool = self.teachers["real"].pool
        return {f"pools.{pool}": (self.pools[pool], self.pools[pool].replicas), **super().actor_groups(),
                "fake.learner": (self.fake.learner, self.fake.learner.ranks)}

    def plan(self) -> list[str]:
        sc, d = self.sampling, self.dmd
        return [(f"generator: {sc.num_steps}-step CPS (eta {sc.noise_level:g}) at timesteps {sc.timesteps}; real score: "
                f"the {'base' if not self.teachers['real'].adapter else 'teacher'} at guidance "
                f"{self.teacher_guidance('real'):g}; {d.fake_update_ratio} fake-score updates per generator update")]

    def fake_job(self) -> "DMDConfig":
        """This config as the fake score's learners see it: their own learner group and LoRA."""
        return self.model_copy(update={"learner": self.fake.learner, "student": self.student.model_copy(
            update={"init_adapter": self.fake.init_adapter})})


class BackpropSettings(Strict):
    """Reward back-propagation through the generator's deterministic last step (RTDMD stage 2)."""
    reward: str  # the label of a reward under `rewards` that implements `differentiable`
    margin: float = 3.0  # loss scale * relu(margin - r)
    scale: float = Field(1e-4, gt=0)


class RTDMDSettings(Strict):
    """RTDMD stage 2; defaults are the released SD3.5-M config's."""
    # SubGRPO: `train_steps` of the stochastic steps train_range[0] .. train_range[1] (inclusive) are trained
    # each step (drawn per step); the other stochastic steps draw noise shared by the samples of a prompt
    train_range: tuple[int, int] = (0, 2)
    train_steps: int = Field(2, gt=0)
    clip_range: float = Field(1e-5, gt=0)
    adv_clip: float = Field(5.0, gt=0)
    dmd_weight: float = Field(1e-3, ge=0)  # the AC-DMD loss on the deterministic last step
    backprop: BackpropSettings | None = None
    fake_updates: int = Field(1, ge=0)  # fake-score updates per step, on that step's final samples
    # Flow-GRPO's EMA schedule for the exported generator: decay min((1+s)/(10+s), ema_decay) every `ema_every`
    # optimizer steps; null turns it off
    ema_decay: float | None = Field(0.9, gt=0, lt=1)
    ema_every: int = Field(8, gt=0)


class RTDMDData(DataConfig):
    prompts_per_step: int = Field(6, gt=0)  # x group_size 24 = the released 144 samples per rank and step


class RTDMDConfig(Rewarded, DMDConfig):
    """RTDMD stage 2: the few-step generator of AC-DMD (`student.init_adapter`, its fake score
    `fake.init_adapter`) tilted toward `rewards`: SubGRPO on its stochastic steps, and on its deterministic last
    step the AC-DMD loss (weight `rtdmd.dmd_weight`) plus, optionally, reward back-propagation."""
    data: RTDMDData
    learner: LearnerConfig = LearnerConfig(lr=3e-6, weight_decay=1e-4)
    rewards: list[RewardSpec] = Field(min_length=1)
    rtdmd: RTDMDSettings = RTDMDSettings()

    @model_validator(mode="after")
    def _rtdmd(self):
        check_unique_labels("rewards", self.rewards)
        lo, hi = self.rtdmd.train_range
        last = self.sampling.num_steps - 1  # the deterministic step, to sigma 0
        if not 0 <= lo <= hi < last:
            raise ValueError(f"rtdmd.train_range: must lie within the stochastic steps 0 .. {last - 1}, got {lo} .. {hi}")
        if self.rtdmd.train_steps > hi - lo + 1:
            raise ValueError(f"rtdmd.train_steps: {self.rtdmd.train_steps} steps do not fit in train_range {lo} .. {hi}")
        bp = self.rtdmd.backprop
        if bp is not None and bp.reward not in [r.key for r in self.rewards]:
            raise ValueError(f"rtdmd.backprop.reward: {bp.reward!r} is not a reward label under `rewards` "
                             f"(labels: {[r.key for r in self.rewards]})")
        return self

    def needs_transitions(self) -> bool:
        return True

    def plan(self) -> list[str]:
        r, sc = self.rtdmd, self.sampling
        bp = r.backprop
        return [f"generator: {sc.num_steps}-step CPS (eta {sc.noise_level:g}); SubGRPO on {r.train_steps} of steps "
                f"{list(range(r.train_range[0], r.train_range[1] + 1))}; last step: AC-DMD x{r.dmd_weight:g}"
                + (f" + reward back-propagation of {bp.reward} (margin {bp.margin:g}, scale {bp.scale:g})" if bp else ""),
                self.rewards_line()]


class SamplingOverride(Strict):
    """A model's own sampler in an evaluation (a few-step generator, or the base at fewer steps)."""
    num_steps: int | None = Field(None, gt=0)
    timesteps: list[float] | None = Field(None, min_length=1)
    sampler: Literal["sde", "cps"] | None = None
    noise_level: float | None = Field(None, ge=0)


class EvalModel(ModelSource):
    """A model to evaluate; `sampling` replaces the evaluation's sampler settings for this model only."""
    sampling: SamplingOverride | None = None


class EvalSampling(SamplingConfig):
    num_steps: int = Field(40, gt=1)
    noise_level: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _every_step_alike(self):
        for key in ("sde_window_size", "same_latent"):
            if getattr(self, key):
                raise ValueError(f"{key}: evaluation samples every step alike and every sample from its own noise")
        return self


class EvalData(Strict):
    sources: list[DataSource] = Field(min_length=1)
    max_prompts_per_source: int | None = Field(None, gt=0)


class EvalConfig(RunConfig):
    """Score models on held-out prompts with fixed seeds: every model sees the same noise per prompt."""
    models: dict[str, EvalModel] = Field(min_length=1)
    data: EvalData
    # one count for every task, or {task: count} (tasks with few prompts need more seeds for a tight CI)
    samples_per_prompt: int | dict[str, int] = 4
    sampling: EvalSampling = EvalSampling()
    rewards: list[RewardSpec] = Field(min_length=1)
    rollout: RolloutConfig = RolloutConfig()
    grid_images: int = Field(16, gt=0)
    # an earlier evaluation's directory: models whose weights and settings match it are not sampled again
    reuse: str | None = None

    @model_validator(mode="after")
    def _positive_counts(self):
        counts = self.samples_per_prompt
        for task, k in (counts.items() if isinstance(counts, dict) else [("", counts)]):
            if k <= 0:
                raise ValueError(f"samples_per_prompt{'.' + task if task else ''}: must be positive, got {k}")
        return self

    def actor_groups(self) -> dict[str, tuple[Resources, int]]:
        return {**reward_groups(self.rewards), "rollout": (self.rollout, self.rollout.workers)}

    def samples_for(self, task: str) -> int:
        return samples_for(self.samples_per_prompt, task, "samples_per_prompt")


def samples_for(counts: int | dict[str, int], task: str, key: str) -> int:
    """Seeds per prompt of `task` from one count or a {task: count} mapping (`key` names it in errors)."""
    if not isinstance(counts, dict):
        return counts
    if task not in counts:
        raise ConfigError(f"{key}: no count for task {task!r} (given: {sorted(counts)})")
    return counts[task]


class MergeSettings(Strict):
    weights: dict[str, float] | None = None  # default: equal
    method: Literal["cat", "svd", "fuse", "linear"] = "cat"
    rank: int | None = Field(None, gt=0)  # svd only
    normalize: bool = True


class SFTSettings(Strict):
    samples_per_prompt: int = Field(4, gt=0)
    batch_size: int = Field(32, gt=0)  # (x_sigma, sigma) pairs per optimizer step
    sampling: EvalSampling = EvalSampling(num_steps=10)


class ColdStartConfig(JobConfig):
    """The student's starting point from the teachers: a weight-space merge or SFT on teacher samples."""
    method: Literal["merge", "sft"]
    teachers: dict[str, EvalModel] = Field(min_length=1)
    route: dict[str, str] = {}
    merge: MergeSettings = MergeSettings()
    sft: SFTSettings = SFTSettings()
    data: DataConfig | None = None
    export_dir: str | None = None

    @model_validator(mode="after")
    def _method_inputs(self):
        if self.method == "merge":
            for name, t in self.teachers.items():
                if not t.adapter:
                    raise ValueError(f"teachers.{name}: merging needs LoRA adapter teachers")
            extra = set(self.merge.weights or {}) ^ set(self.teachers)
            if self.merge.weights is not None and extra:
                raise ValueError(f"merge.weights: keys must be the teachers {sorted(self.teachers)}")
        else:
            if self.data is None or not self.route:
                raise ValueError("sft needs `data` and a `route` from task to teacher")
            for task, name in self.route.items():
                if name not in self.teachers:
                    raise ValueError(f"route.{task}: teacher {name!r} is not defined under `teachers`")
        return self

    def used_teachers(self) -> list[str]:
        return sorted(set(self.route.values()))

    def task_problem(self, task: str) -> str | None:
        return unrouted(task, self.route)

    def plan(self) -> list[str]:
        return [route_line(self.route)]

    def needs_transitions(self) -> bool:
        return False

    def output_path(self) -> str:
        default = "model" if self.method == "merge" and self.merge.method == "fuse" else "adapter"
        return self.export_dir or f"{self.output_dir}/{default}"


class ConfigError(ValueError):
    """A configuration problem, reported with the offending key, file or field."""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict; a numeric part indexes a list
    (`rewards.0.replicas=4`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        node, parts = raw, key.split(".")
        for depth, p in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"override {key!r}: {'.'.join(parts[:depth]) or '<root>'} is a list of "
                                      f"{len(node)}; {p!r} is not an index into it")
                p = int(p)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {parts[depth - 1]!r} is neither a mapping nor a list")
            if last:
                node[p] = yaml.safe_load(value)
            else:
                if isinstance(node, dict) and node.get(p) is None:
                    node[p] = {}
                node = node[p]
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict:
    """A YAML file, or a one-line ConfigError naming the file, line and column of a syntax error or a
    duplicated key."""
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: YAML error: {problem}") from None


def load_raw(path: str, overrides: list[str] = ()) -> dict:
    """The YAML mapping of a job file with `key=value` overrides applied, not yet validated."""
    p = Path(path)
    raw = read_yaml(p)
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return apply_overrides(raw, list(overrides))


def load_config(path: str, overrides: list[str] = (), cls=OPDConfig):
    return validate(cls, load_raw(path, overrides), str(path))


def validate(cls, raw: dict, where: str):
    """cls.model_validate(raw), with pydantic's errors turned into one ConfigError naming every key."""
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        lines = [f"{'.'.join(str(x) for x in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{where}: invalid configuration\n  " + "\n  ".join(lines)) from None
