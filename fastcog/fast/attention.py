"""fastcog's CogVideoX attention processor, with an explicit attention backend.

The math is diffusers' `CogVideoXAttnProcessor2_0` (text and video tokens concatenated,
q/k/v projections, LayerNorm on q and k per head, 3D RoPE on the video tokens of q and k,
full bidirectional attention, output projection, split back into text and video). What
changes is *which kernel* runs the attention, chosen here instead of left to SDPA's
heuristics, and that RoPE is applied out of place (a concatenation instead of diffusers'
in-place slice assignment), so torch.compile fuses norm + RoPE into one pointwise kernel
per tensor.

Shapes: hidden_states [B, N, D] video tokens, encoder_hidden_states [B, L, D] text tokens,
S = L + N; q, k, v [B, H, S, hd] for SDPA, [B, S, H, hd] for the flash-attn libraries.

Attention is about 60% of a 5B training step's FLOPs (docs/design.md), so the backend decides the
step time. `auto` picks per device: on Hopper (sm90) FlashAttention-3 when
`flash_attn_interface` is installed, else cuDNN attention; on Ampere/Ada flash-attn 2 when
installed, else SDPA's flash kernel; otherwise memory-efficient SDPA; on CPU, SDPA's own
choice. The order follows the published FA3 / cuDNN 9 results for head_dim 64;
bench/throughput.py's ablation compares the backends on the GPU at hand.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastcog.errors import ConfigError
from fastcog.fast.qkv import FLAG as QKV_FLAG
from fastcog.fast.qkv import project as qkv_project

SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
CPU_BACKENDS = ("sdpa", "math", "flash")

# The aten ops whose outputs (attention output and log-sum-exp) selective activation
# checkpointing keeps: recomputing attention in backward is the most expensive recompute.
ATTENTION_OPS = tuple(
    op
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_fused_attention_overrideable",
    )
    if (op := getattr(getattr(torch.ops.aten, name, None), "default", None)) is not None
)


@dataclass(frozen=True)
class AttentionChoice:
    backend: str
    """One of sdpa, cudnn, flash, efficient, math, fa3, flash_attn."""
    reason: str
    """Why (logged)."""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def auto_backend(major: int, where: str) -> AttentionChoice:
    """`auto` on a CUDA GPU of compute capability major.x (named `where` in the reason), with the
    attention libraries installed in this environment."""
    if major == 9 and _installed("flash_attn_interface"):
        return AttentionChoice("fa3", f"auto on {where}: FlashAttention-3 is installed")
    if major >= 9:
        return AttentionChoice("cudnn", f"auto on {where}: cuDNN attention (flash_attn_interface not installed)")
    if major == 8 and _installed("flash_attn"):
        return AttentionChoice("flash_attn", f"auto on {where}: flash-attn 2 is installed")
    if major >= 8:
        return AttentionChoice("flash", f"auto on {where}: SDPA flash kernel")
    return AttentionChoice("efficient", f"auto on {where}: memory-efficient SDPA (no flash kernel before sm80)")


def planned_backend(requested: str, capability: tuple[int, int] | None, where: str) -> AttentionChoice:
    """The kernel a run would use on a GPU of this capability, worked out without the GPU (`fastcog plan`):
    auto's choice as choose_backend makes it (the libraries it looks for: as installed here), SDPA's own
    choice as the kernel its default priority tries first (flash from sm80, for bf16 without a mask), an
    explicit backend as configured (whether it is installed is checked where the run starts)."""
    if capability is None:
        return AttentionChoice("unknown", f"{where}: compute capability unknown")
    major, minor = capability
    where = f"{where}, sm{major}{minor}"
    if requested == "auto":
        choice = auto_backend(major, where)
        return AttentionChoice(choice.backend, choice.reason + "; libraries as on this machine")
    if requested == "sdpa":
        kernel = "flash" if major >= 8 else "efficient"
        return AttentionChoice(kernel, f"sdpa on {where}: SDPA's first choice, its {kernel} kernel")
    return AttentionChoice(requested, f"configured (fast.attention={requested})")


def choose_backend(requested: str, device: torch.device) -> AttentionChoice:
    """Resolve `fast.attention` for this device; an unavailable explicit choice is an error."""
    if device.type != "cuda":
        if requested == "auto":
            return AttentionChoice("sdpa", f"auto on {device.type}: SDPA chooses")
        if requested not in CPU_BACKENDS:
            raise ConfigError(
                f"fast.attention={requested} needs a CUDA GPU; on {device.type} use auto, sdpa, flash or math"
            )
        return AttentionChoice(requested, "requested")
    major, minor = torch.cuda.get_device_capability(device)
    if requested == "auto":
        return auto_backend(major, f"{torch.cuda.get_device_name(device)}, sm{major}{minor}")
    if requested == "fa3" and not _installed("flash_attn_interface"):
        raise ConfigError(
            "fast.attention=fa3 needs FlashAttention-3 (module flash_attn_interface): install it or use auto"
        )
    if requested == "flash_attn" and not _installed("flash_attn"):
        raise ConfigError("fast.attention=flash_attn needs the flash-attn package (pip install flash-attn) or use auto")
    return AttentionChoice(requested, "requested")


def attention_function(backend: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """q, k, v [B, H, S, hd] -> out [B, H, S, hd] with the given backend."""
    if backend == "fa3":
        from flash_attn_interface import flash_attn_func as fa3

        def run(q, k, v):
            out = fa3(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE
            return out.transpose(1, 2)

        return run
    if backend == "flash_attn":
        from flash_attn import flash_attn_func as fa2

        return lambda q, k, v: fa2(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    if backend == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    kind = SDPA_BACKENDS[backend]

    def run(q, k, v):
        with sdpa_kernel([kind]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' interleaved real RoPE (use_real_unbind_dim=-1) on x [B, H, N, hd]; cos/sin [N, hd]."""
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class FastCogVideoXAttnProcessor:
    """Drop-in for CogVideoXAttnProcessor2_0 with an explicit attention backend."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.attend = attention_function(backend)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("fastcog's attention processor takes no mask (CogVideoX training passes none)")
        text_len = encoder_hidden_states.size(1)
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, seq, _ = x.shape
        if getattr(attn, QKV_FLAG, None):  # fast.fused_qkv: one GEMM for the three projections
            q, k, v = qkv_project(attn, x)
        else:
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.view(batch, seq, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            cos, sin = (t.to(q.device) for t in image_rotary_emb)
            q = torch.cat([q[:, :, :text_len], apply_rope(q[:, :, text_len:], cos, sin)], dim=2)
            if not attn.is_cross_attention:
                k = torch.cat([k[:, :, :text_len], apply_rope(k[:, :, text_len:], cos, sin)], dim=2)
        out = self.attend(q, k, v)
        out = out.transpose(1, 2).reshape(batch, seq, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, video_out = out.split([text_len, seq - text_len], dim=1)
        return video_out, encoder_out


def set_attention_backend(transformer: torch.nn.Module, backend: str) -> int:
    """Install the processor on every CogVideoX block's attention; returns how many."""
    processor = FastCogVideoXAttnProcessor(backend)
    count = 0
    for block in transformer.transformer_blocks:
        block.attn1.set_processor(processor)
        count += 1
    return count
