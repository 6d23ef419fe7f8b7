"""`fastcog plan`: what a config needs on a GPU, worked out on any machine, with no weights.

The transformer is built from `model.path`'s transformer/config.json on the meta device and made
trainable as `fastcog train` makes it (fastcog.build.make_trainable: adapters, SFT, FP8); then
fastcog.plan estimates each rank's memory, the same estimate `activation_checkpointing: auto`
uses. FLOPs come from fastcog.flops, rates from fastcog.gpus' tables: the predicted step time puts
attention at the published rate of the backend the run would use and the other FLOPs at the datasheet
peak; with every FLOP at the peak it is a lower bound. Both, and the MFU, are labelled as estimates.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastcog import plan as planning
from fastcog.config import Config
from fastcog.errors import ConfigError
from fastcog.fast import checkpointing as ac
from fastcog.fast.attention import AttentionChoice, planned_backend
from fastcog.gpus import AttentionRate, GpuSpec, attention_rate
from fastcog.plan import MemoryPlan

# Switches that lower the peak, tried one at a time on a config that does not fit. Ordered by what
# each usually adds to a step's time, least first (a judgement from what each does, not a
# measurement): 8-bit optimizer state (the same elementwise step), FP8 weight storage (one
# dequantizing pass per weight use), full recompute (one more forward), offload (that, and the
# block inputs over PCIe), the optimizer on the CPU (gradients and weights over PCIe, a CPU step).
REMEDIES: tuple[tuple[str, str, Any], ...] = (
    ("optim", "name", "adamw8bit"),
    ("fast", "fp8_weight_storage", True),
    ("train", "activation_checkpointing", "full"),
    ("train", "activation_checkpointing", "offload"),
    ("optim", "cpu_offload", True),
)


@dataclass(frozen=True)
class Plan:
    gpu: GpuSpec
    nproc: int
    strategy: str
    tokens_per_sample: int
    memory: MemoryPlan
    capacity_bytes: int
    policy: str
    """What `train.activation_checkpointing` is, or what `auto` picks."""
    model_flops_per_step: float
    executed_flops_per_step: float
    """With the chosen policy's recompute, per rank."""
    variant: str
    comm_bytes_per_step: int
    """Bytes each rank receives in collectives per optimizer step (ring algorithms; 0 on one GPU)."""

    @property
    def fits(self) -> bool:
        return self.memory.peak(self.policy) <= self.capacity_bytes

    fp8_flops_per_step: float = 0.0
    """Of executed_flops_per_step, the frozen linears' FP8 GEMMs (fast.fp8), at the FP8 rate."""

    @property
    def step_time_lower_bound_s(self) -> float:
        """Every executed FLOP at the datasheet peak: FP8 GEMMs at the FP8 rate, the rest at bf16."""
        fp8 = self.fp8_flops_per_step if self.gpu.fp8_flops else 0.0
        return (self.executed_flops_per_step - fp8) / self.gpu.bf16_flops + (
            fp8 / self.gpu.fp8_flops if fp8 else 0.0)

    attention: AttentionChoice = AttentionChoice("unknown", "not planned")
    """The attention kernel the run would use on this GPU (fastcog.fast.attention.planned_backend)."""
    attention_flops_per_step: tuple[float, float] = (0.0, 0.0)
    """Of executed_flops_per_step, attention's forward (with its recompute) and backward FLOPs."""

    @property
    def attention_rate(self) -> AttentionRate | None:
        return attention_rate(self.gpu, self.attention.backend)

    @property
    def step_time_s(self) -> float:
        """The predicted step time (an estimate): as the lower bound, but attention at its backend's
        published rate (at the peak where there is none). Communication and overheads are not in it."""
        rate = self.attention_rate
        if rate is None:
            return self.step_time_lower_bound_s
        forward, backward = self.attention_flops_per_step
        peak = self.gpu.bf16_flops
        return (self.step_time_lower_bound_s + forward * (1 / rate.forward_flops - 1 / peak)
                + backward * (1 / rate.backward_flops - 1 / peak))

    @property
    def mfu(self) -> float:
        """Predicted MFU (an estimate): each GPU's share of the model FLOPs per predicted step time, over
        the dense bf16 peak (as fastcog.flops computes the measured one)."""
        return self.model_flops_per_step / self.nproc / (self.step_time_s * self.gpu.bf16_flops)


def largest_bucket_tokens(cfg: Config, variant: Any) -> int:
    """Video tokens of one sample of the largest bucket (as the trainer sizes `auto`)."""
    from fastcog.flops import video_tokens
    from fastcog.variants import VAE_SPATIAL_FACTOR

    buckets = [tuple(b) for b in cfg.data.buckets] or [(cfg.data.num_frames, cfg.data.height, cfg.data.width)]
    t = variant.temporal_compression_ratio
    return max(video_tokens(torch.Size([0, (f - 1) // t + 1, h // VAE_SPATIAL_FACTOR, w // VAE_SPATIAL_FACTOR]),
                            variant) for f, h, w in buckets)


def architecture(cfg: Config, variant_name: str | None) -> dict[str, Any]:
    """The transformer's config: model.path's transformer/config.json when it exists, else the released
    checkpoint's (fastcog.variants), so a run can be planned before the weights are downloaded."""
    from fastcog.models import read_variant
    from fastcog.variants import FULL_TRANSFORMER_CONFIGS

    config_file = Path(cfg.model.path) / "transformer" / "config.json"
    if config_file.is_file():
        read_variant(cfg.model.path)  # the folder and its config are readable and of a known variant
        return json.loads(config_file.read_text())
    name = variant_name or (cfg.model.variant if cfg.model.variant != "auto" else None)
    if name is None:
        raise ConfigError(f"model.path={cfg.model.path!r} has no transformer/config.json: pass --variant (one of "
                          f"{', '.join(FULL_TRANSFORMER_CONFIGS)}) to plan with the released checkpoint's architecture")
    return dict(FULL_TRANSFORMER_CONFIGS[name])


def weightless_transformer(transformer_config: dict[str, Any], cfg: Config) -> torch.nn.Module:
    """A transformer of this architecture on the meta device (no weights read or allocated), made
    trainable and FP8-converted as `fastcog train` builds it (fastcog.build)."""
    from diffusers import CogVideoXTransformer3DModel

    from fastcog.build import convert_fp8, make_trainable

    with torch.device("meta"):
        transformer = CogVideoXTransformer3DModel.from_config(transformer_config)
    transformer = make_trainable(transformer, cfg)
    convert_fp8(transformer, cfg)
    return transformer


def make_plan(cfg: Config, gpu: GpuSpec, nproc: int = 1, strategy: str = "fsdp", variant_name: str | None = None,
              transformer_config: dict[str, Any] | None = None) -> Plan:
    """The plan of `cfg` on `nproc` GPUs of kind `gpu` (strategy fsdp or ddp when nproc > 1), for the
    architecture `transformer_config` when given (else `architecture(cfg, variant_name)`)."""
    from fastcog.flops import (
        attention_flops_per_sample,
        executed_flops_per_sample,
        forward_flops,
        transformer_flops_per_sample,
    )
    from fastcog.variants import detect_variant

    transformer = weightless_transformer(transformer_config or architecture(cfg, variant_name), cfg)
    variant = detect_variant(dict(transformer.config))
    tokens = largest_bucket_tokens(cfg, variant)
    shards = nproc // cfg.parallel.replicate_degree if nproc > 1 and strategy == "fsdp" else 1
    memory = planning.memory_plan(transformer, cfg, tokens, shards, torch.device("meta"), for_gpu=True)
    capacity = gpu.memory_bytes - int(cfg.fast.memory_margin_gb * 2**30)
    policy = cfg.train.activation_checkpointing
    if policy == "auto":
        policy = memory.choose_policy(capacity)
    lora = cfg.model.training_type == "lora"
    flops_args = (transformer.config, tokens, cfg.lora.rank if lora else None, cfg.lora.target_modules if lora else (),
                  not lora)
    samples = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    comm = communication_bytes(memory, nproc, strategy, cfg.train.gradient_accumulation_steps,
                               cfg.parallel.reshard_after_forward)
    # FP8 runs the frozen linears' forward and input-gradient GEMMs (and their recompute).
    fp8 = 0.0
    if lora and cfg.fast.fp8 != "none":
        linear = forward_flops(*flops_args[:4]).linear
        fp8 = linear * (2 + (policy != "none")) * samples
    attention = tuple(f * samples for f in attention_flops_per_sample(transformer.config, tokens, policy))
    return Plan(gpu, nproc, strategy if nproc > 1 else "none", tokens, memory, capacity, policy,
                transformer_flops_per_sample(*flops_args) * samples * nproc,
                executed_flops_per_sample(*flops_args, policy=policy) * samples, variant.name, comm, fp8,
                planned_backend(cfg.fast.attention, gpu.capability, gpu.key), attention)


def communication_bytes(m: MemoryPlan, nproc: int, strategy: str, accumulation: int, reshard: bool) -> int:
    """Per rank and step. FSDP2: every weight all-gathered for each micro-batch's forward and, when
    resharded after it, again for its backward; the fp32 gradients reduce-scattered once (the last
    micro-batch). DDP: the gradients all-reduced once (reduce-scatter + all-gather)."""
    if nproc < 2:
        return 0
    part = (nproc - 1) / nproc
    weights = (m.frozen_bytes + m.trainable_bytes) * m.shards
    grads = m.gradient_bytes * m.shards
    if strategy == "fsdp":
        return round(weights * part * accumulation * (2 if reshard else 1) + grads * part)
    return round(2 * grads * part)


def remedies(cfg: Config, plan: Plan) -> list[tuple[str, int]]:
    """For a config that does not fit: each switch of REMEDIES not already set that lowers the peak,
    and the bytes it saves, cheapest first (REMEDIES' order)."""
    out = []
    for section, key, value in REMEDIES:
        if getattr(getattr(cfg, section), key) == value:
            continue
        changed = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{key: value})})
        other = make_plan(changed, plan.gpu, plan.nproc, plan.strategy, plan.variant)
        saving = plan.memory.peak(plan.policy) - other.memory.peak(other.policy)
        if saving > 0:
            out.append((f"{section}.{key}={value}", saving))
    return out


def _gb(n: float) -> str:
    return f"{n / 1e9:7.2f} GB"


def lines(cfg: Config, plan: Plan, fixes: list[tuple[str, int]]) -> list[str]:
    m, g = plan.memory, plan.gpu
    where = f"{plan.nproc} x {g.key}" + (f" ({plan.strategy}, {m.shards} shard(s))" if plan.nproc > 1 else "")
    out = [
        f"fastcog plan: {plan.variant} ({cfg.model.path}) on {where}, {plan.tokens_per_sample} video tokens x batch "
        f"{cfg.train.batch_size} (largest bucket)",
        f"  parameters     {m.frozen_params / 1e9:.3f} B frozen values, {m.trainable_params / 1e6:.1f} M trainable",
        "  per GPU",
        f"    frozen weights   {_gb(m.frozen_bytes)}   (as stored: {cfg.model.dtype}, FP8 where converted)",
        f"    trainable        {_gb(m.trainable_bytes)}   (fp32)",
        f"    gradients        {_gb(m.gradient_bytes)}   (fp32)",
        f"    optimizer state  {_gb(m.optimizer_bytes)}   ({cfg.optim.name}"
        + (", offloaded to the CPU" if cfg.optim.cpu_offload else "") + ")",
    ]
    for p in ac.POLICIES:
        mark = " <- " + ("auto picks this" if cfg.train.activation_checkpointing == "auto" else "configured") \
            if p == plan.policy else ""
        out.append(f"    activations {p:<9} {_gb(m.activations.peak(p))}   peak {_gb(m.peak(p))}{mark}")
    verdict = "fits" if plan.fits else "does NOT fit"
    out.append(f"  {verdict}: peak {_gb(m.peak(plan.policy)).strip()} of {_gb(plan.capacity_bytes).strip()} usable "
               f"({g.memory_bytes / 1e9:.0f} GB less fast.memory_margin_gb={cfg.fast.memory_margin_gb})")
    if fixes:
        out.append("  switches that lower the peak, the cheapest in step time first:")
    for switch, saving in fixes:
        out.append(f"    --set {switch}: saves {_gb(saving).strip()}")
    if m.activations.host_bytes(plan.policy):
        out.append(f"  host memory    {_gb(m.activations.host_bytes(plan.policy)).strip()} per GPU of block inputs "
                   "(offload; pinned on a GPU host)")
    out += [
        *([f"  communication  {_gb(plan.comm_bytes_per_step).strip()} received per GPU per step"]
          if plan.nproc > 1 else []),
        f"  FLOPs per step  {plan.model_flops_per_step / 1e12:.1f} TFLOP model (all GPUs), "
        f"{plan.executed_flops_per_step / 1e12:.1f} TFLOP executed per GPU with {plan.policy} recompute, of which "
        f"attention {plan.attention_flops_per_step[0] / 1e12:.1f} forward + "
        f"{plan.attention_flops_per_step[1] / 1e12:.1f} backward",
        f"  attention       {plan.attention.backend} ({plan.attention.reason})",
        f"                  {_rate_words(plan)}",
        f"  step time       ~{plan.step_time_s:.2f} s per step predicted (an estimate until a run measures it: "
        f"attention at that rate, the other FLOPs at the {g.key} datasheet peak, bf16 {g.bf16_flops / 1e12:.0f} "
        "TFLOP/s" + (f", FP8 {g.fp8_flops / 1e12:.0f} for the {plan.fp8_flops_per_step / 1e12:.0f} TFLOP of FP8 GEMMs"
                     if plan.fp8_flops_per_step and g.fp8_flops else "")
        + "; nothing else is counted: elementwise kernels, the optimizer step"
        + (", communication" if plan.nproc > 1 else "") + ", data loading)",
        f"                  >= {plan.step_time_lower_bound_s:.2f} s lower bound (every executed FLOP at the peak)",
        f"  MFU             ~{plan.mfu:.0%} predicted (an estimate: model FLOPs per GPU / (predicted step time x bf16 "
        "peak))",
    ]
    return out


def _rate_words(plan: Plan) -> str:
    rate = plan.attention_rate
    if rate is None:
        return f"no published rate for it on {plan.gpu.key}: taken at the dense bf16 peak, an optimistic assumption"
    return (f"fwd {rate.forward_flops / 1e12:.0f} / bwd {rate.backward_flops / 1e12:.0f} TFLOP/s, "
            + (f"derived: {rate.derived}; " if rate.derived else "published: ")
            + f"{rate.source}, {rate.setting}")


def as_json(cfg: Config, plan: Plan, fixes: list[tuple[str, int]]) -> dict[str, Any]:
    m = plan.memory
    return {
        "model_path": cfg.model.path, "variant": plan.variant, "gpu": plan.gpu.key, "nproc": plan.nproc,
        "strategy": plan.strategy,
        "shards": m.shards, "tokens_per_sample": plan.tokens_per_sample, "batch_size": cfg.train.batch_size,
        "frozen_params": m.frozen_params, "trainable_params": m.trainable_params,
        "bytes": {"frozen_weights": m.frozen_bytes, "trainable_weights": m.trainable_bytes,
                  "gradients": m.gradient_bytes, "optimizer_state": m.optimizer_bytes,
                  "activations": {p: m.activations.peak(p) for p in ac.POLICIES},
                  "peak": {p: m.peak(p) for p in ac.POLICIES},
                  "host": m.activations.host_bytes(plan.policy)},
        "capacity_bytes": plan.capacity_bytes, "policy": plan.policy, "fits": plan.fits,
        "remedies": [{"set": s, "saves_bytes": b} for s, b in fixes],
        "model_flops_per_step": plan.model_flops_per_step,
        "executed_flops_per_step_per_gpu": plan.executed_flops_per_step,
        "attention_flops_per_step_per_gpu": dict(zip(("forward", "backward"), plan.attention_flops_per_step)),
        "attention": {"backend": plan.attention.backend, "why": plan.attention.reason,
                      "rate": dataclasses.asdict(rate) if (rate := plan.attention_rate) else None},
        "step_time_s": plan.step_time_s, "mfu": plan.mfu,
        "step_time_lower_bound_s": plan.step_time_lower_bound_s,
        "communication_bytes_per_step": plan.comm_bytes_per_step,
        "estimate": "memory: fake-tensor estimate; step_time_s and mfu: predicted, attention at its backend's "
                    "published rate (attention.rate; the dense bf16 peak where null), the other FLOPs at the datasheet "
                    "peak, no communication; step_time_lower_bound_s: every executed FLOP at the datasheet peak",
    }


def fit_verdict(cfg: Config, plan: Plan) -> tuple[str, str]:
    """("fits" | "tight" | "too big", a line) for a plan made on the device's GPU (its real memory)."""
    gpu = plan.gpu
    peak, policy = plan.memory.peak(plan.policy), plan.policy
    if peak <= plan.capacity_bytes:
        return "fits", f"fit check: estimated peak {_gb(peak).strip()} of {_gb(gpu.memory_bytes).strip()}"
    if peak <= gpu.memory_bytes:
        total = _gb(gpu.memory_bytes).strip()
        return "tight", (f"fit check: the estimated peak {_gb(peak).strip()} ({policy} checkpointing) leaves less "
                         f"than fast.memory_margin_gb={cfg.fast.memory_margin_gb} GiB of {total} free: the estimate "
                         "has no room for error")
    short = peak - gpu.memory_bytes
    fixes = remedies(cfg, plan)
    enough = [f for f in fixes if f[1] >= short]
    most = max(fixes, key=lambda f: f[1], default=None)
    fix = (f"--set {enough[0][0]} saves {_gb(enough[0][1]).strip()}" if enough else
           "no single switch is enough" + (f" (the most: --set {most[0]}, {_gb(most[1]).strip()})" if most else ""))
    return "too big", (f"the estimated peak is {_gb(peak).strip()} per GPU ({policy} checkpointing), "
                       f"{_gb(short).strip()} more than this GPU's {_gb(gpu.memory_bytes).strip()}: {fix}; "
                       "`fastcog plan` shows the breakdown (fast.fit_check=false starts anyway)")


def this_gpu(device: torch.device) -> GpuSpec:
    """The device's entry of fastcog.gpus (or a bare one for an unknown GPU), with its real memory."""
    from fastcog.gpus import gpu_by_device_name

    name = torch.cuda.get_device_name(device)
    total = torch.cuda.get_device_properties(device).total_memory
    known = gpu_by_device_name(name) or GpuSpec("this-gpu", name, total, float("nan"), None, float("nan"), "torch")
    return dataclasses.replace(known, memory_bytes=total, capability=torch.cuda.get_device_capability(device))


def auto_strategy(cfg: Config, gpu: GpuSpec | None, nproc: int, ddp_plan: Plan | None = None
                  ) -> tuple[str, str, Plan | None]:
    """parallel.strategy=auto with several ranks: (strategy, why, the DDP plan when one was made). LoRA
    trains with DDP when the replicated model fits the GPU: FSDP2 gathers every frozen weight again at
    every step, which DDP never does. Full fine-tuning, HSDP, and runs with no GPU to plan against use
    FSDP2. ddp_plan: the DDP plan when it is already made."""
    if cfg.model.training_type != "lora":
        return "fsdp", "full fine-tuning: weights, gradients and optimizer state are sharded", None
    if cfg.parallel.replicate_degree > 1:
        return "fsdp", f"parallel.replicate_degree={cfg.parallel.replicate_degree} (HSDP)", None
    if gpu is None:
        return "fsdp", "no GPU memory to plan DDP against", None
    plan = ddp_plan or make_plan(cfg, gpu, nproc, "ddp")
    peak, usable = _gb(plan.memory.peak(plan.policy)).strip(), _gb(plan.capacity_bytes).strip()
    if plan.fits:
        return "ddp", (f"LoRA and the replicated model fits (estimated peak {peak} of {usable} usable): DDP "
                       "does not gather the frozen weights every step as FSDP2 does"), plan
    return "fsdp", f"LoRA, but the replicated model does not fit (estimated peak {peak}): sharded with FSDP2", plan


@dataclass(frozen=True)
class RunCheck:
    """check_run's answer."""

    strategy: str
    strategy_choice: str | None = None
    """`parallel.strategy: auto`'s choice and why ("auto chose ddp: ..."); None when not auto."""
    warnings: tuple[str, ...] = ()
    """To print at once: a config that fits only without headroom."""


def check_run(cfg: Config, device: torch.device, nproc: int, strategy: str) -> RunCheck:
    """Before any weight is loaded: `parallel.strategy: auto`'s choice (several ranks), then, on a GPU,
    the fit check: raise when the config cannot fit, warn when it fits only without headroom. Each
    plan is made once."""
    gpu = this_gpu(device) if device.type == "cuda" else None
    choice, plan = None, None
    if cfg.parallel.strategy == "auto" and strategy == "fsdp":
        strategy, why, plan = auto_strategy(cfg, gpu, nproc)
        choice = f"auto chose {strategy}: {why}"
    if gpu is None or not cfg.fast.fit_check:
        return RunCheck(strategy, choice)
    if plan is None or plan.strategy != strategy:
        plan = make_plan(cfg, gpu, nproc, strategy)
    verdict, line = fit_verdict(cfg, plan)
    if verdict == "too big":
        raise ConfigError(line)
    return RunCheck(strategy, choice, (f"fastcog: warning: {line}",) if verdict == "tight" else ())
