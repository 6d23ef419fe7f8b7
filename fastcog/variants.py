"""The five CogVideoX variants and what differs between them.

Everything the objective needs (input channels, RoPE, temporal patching, ofs, VAE scaling) is
read from the checkpoint's own configs; the variant id is *detected* from them, never assumed
from a name, so a fine-tuned or re-saved checkpoint is recognised by what it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fastcog.errors import ModelError

VARIANTS = (
    "cogvideox-2b",
    "cogvideox-5b",
    "cogvideox-5b-i2v",
    "cogvideox1.5-5b",
    "cogvideox1.5-5b-i2v",
)
VariantName = Literal[VARIANTS]  # type: ignore[valid-type]


@dataclass(frozen=True)
class VariantSpec:
    """What the training objective must know about a checkpoint (all read from its configs)."""

    name: str
    is_i2v: bool
    """Image-to-video: the transformer takes 2 x latent channels (noisy video + image latents)."""
    latent_channels: int
    use_rope: bool
    patch_size: int
    patch_size_t: int | None
    """CogVideoX 1.5 patches time in pairs; the objective pads latent frames to a multiple."""
    uses_ofs: bool
    """1.5-I2V has an ofs embedding; the reference passes ofs = 2.0."""
    attention_head_dim: int
    max_text_seq_length: int
    text_embed_dim: int
    learned_positional_embeddings: bool
    """5B-I2V: learned embeddings fix the trainable resolution to the checkpoint's sample size."""
    sample_frames: int
    sample_height: int
    sample_width: int
    temporal_compression_ratio: int


def detect_variant(transformer_config: dict[str, Any]) -> VariantSpec:
    """Identify the variant from a transformer config (a dict or a diffusers FrozenDict)."""
    cfg = dict(transformer_config)
    try:
        in_ch = int(cfg["in_channels"])
        out_ch = int(cfg.get("out_channels") or in_ch)
    except KeyError as err:
        raise ModelError(f"transformer config has no {err.args[0]!r}: is this a CogVideoX transformer?") from None
    is_i2v = in_ch == 2 * out_ch
    if not is_i2v and in_ch != out_ch:
        raise ModelError(
            f"transformer in_channels={in_ch}, out_channels={out_ch}: not a CogVideoX T2V (equal) "
            "or I2V (in = 2 x out) transformer"
        )
    patch_t = cfg.get("patch_size_t")
    use_rope = bool(cfg.get("use_rotary_positional_embeddings", False))
    uses_ofs = cfg.get("ofs_embed_dim") is not None
    if patch_t is not None:
        name = "cogvideox1.5-5b-i2v" if is_i2v else "cogvideox1.5-5b"
    elif is_i2v:
        name = "cogvideox-5b-i2v"
    elif use_rope:
        name = "cogvideox-5b"
    else:
        name = "cogvideox-2b"
    return VariantSpec(
        name=name,
        is_i2v=is_i2v,
        latent_channels=out_ch,
        use_rope=use_rope,
        patch_size=int(cfg.get("patch_size", 2)),
        patch_size_t=None if patch_t is None else int(patch_t),
        uses_ofs=uses_ofs,
        attention_head_dim=int(cfg.get("attention_head_dim", 64)),
        max_text_seq_length=int(cfg.get("max_text_seq_length", 226)),
        text_embed_dim=int(cfg.get("text_embed_dim", 4096)),
        learned_positional_embeddings=bool(cfg.get("use_learned_positional_embeddings", False)),
        sample_frames=int(cfg.get("sample_frames", 49)),
        sample_height=int(cfg.get("sample_height", 60)),
        sample_width=int(cfg.get("sample_width", 90)),
        temporal_compression_ratio=int(cfg.get("temporal_compression_ratio", 4)),
    )


# Full-size transformer configs of the released checkpoints (used by make-tiny to keep the
# structure and by the benchmark to build real-size models with random weights).
FULL_TRANSFORMER_CONFIGS: dict[str, dict[str, Any]] = {
    "cogvideox-2b": dict(
        num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, num_layers=30,
        use_rotary_positional_embeddings=False,
    ),
    "cogvideox-5b": dict(
        num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, num_layers=42,
        use_rotary_positional_embeddings=True,
    ),
    "cogvideox-5b-i2v": dict(
        num_attention_heads=48, attention_head_dim=64, in_channels=32, out_channels=16, num_layers=42,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True,
    ),
    "cogvideox1.5-5b": dict(
        num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, num_layers=42,
        use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False,
        sample_height=300, sample_width=300, sample_frames=81,
    ),
    "cogvideox1.5-5b-i2v": dict(
        num_attention_heads=48, attention_head_dim=64, in_channels=32, out_channels=16, num_layers=42,
        use_rotary_positional_embeddings=True, patch_size_t=2, patch_bias=False, ofs_embed_dim=512,
        sample_height=300, sample_width=300, sample_frames=81,
    ),
}

# Scheduler and VAE settings that differ per variant (the rest are shared).
SNR_SHIFT_SCALE = {"cogvideox-2b": 3.0}  # 1.0 for the 5B family
VAE_SCALING = {"cogvideox-2b": 1.15258426}  # 0.7 for the 5B family
# Pixels per latent cell along height and width: every CogVideoX VAE has 4 blocks, 2 ** (4 - 1).
VAE_SPATIAL_FACTOR = 8
INVERT_SCALE_LATENTS = {"cogvideox1.5-5b", "cogvideox1.5-5b-i2v"}
