"""Load CogVideoX components from a local diffusers folder, and build tiny random ones.

Real weights and tiny test weights go through the same `load_components`: make-tiny writes a
complete diffusers pipeline folder (model_index.json included), so whatever loads a released
checkpoint loads a tiny one, and the diffusers pipelines can render from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastcog import dtypes
from fastcog.errors import ModelError
from fastcog.variants import (
    FULL_TRANSFORMER_CONFIGS,
    INVERT_SCALE_LATENTS,
    SNR_SHIFT_SCALE,
    VAE_SCALING,
    VAE_SPATIAL_FACTOR,
    VARIANTS,
    VariantSpec,
    detect_variant,
)

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
TORCH_DTYPES = {name: dtypes.torch_dtype(name) for name in dtypes.DTYPES}


@dataclass
class Components:
    """The loaded parts of a CogVideoX checkpoint; a part not asked for is None."""

    path: Path
    variant: VariantSpec
    transformer: Any = None
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    scheduler: Any = None


def _check_folder(path: Path, parts: tuple[str, ...]) -> None:
    if not path.is_dir():
        raise ModelError(
            f"model folder {str(path)!r} does not exist: set model.path to a local diffusers-format "
            "CogVideoX folder (or build a tiny one with `fastcog make-tiny cogvideox-5b DIR`)"
        )
    missing = [p for p in parts if not (path / p).is_dir()]
    if missing:
        raise ModelError(
            f"model folder {str(path)!r} has no {', '.join(m + '/' for m in missing)}: a diffusers "
            f"CogVideoX folder holds {', '.join(c + '/' for c in COMPONENTS)}"
        )
    for part in parts:
        sub = path / part
        if part != "tokenizer" and not any(sub.glob("*config.json")):
            raise ModelError(f"{sub} has no config file: the {part} folder is incomplete")


def read_variant(path: str | Path) -> VariantSpec:
    """Detect the variant from transformer/config.json without loading any weights."""
    path = Path(path)
    _check_folder(path, ("transformer",))
    try:
        cfg = json.loads((path / "transformer" / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read {path / 'transformer' / 'config.json'}: {err}") from None
    return detect_variant(cfg)


def meta_transformer(path: str | Path) -> torch.nn.Module:
    """The folder's transformer built from its config.json on the meta device: the module tree
    (names and layer types) exactly as loading would build it, with no weights read or allocated."""
    from diffusers import CogVideoXTransformer3DModel

    path = Path(path)
    read_variant(path)  # the folder and its config are readable and of a known variant
    cfg = json.loads((path / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        return CogVideoXTransformer3DModel.from_config(cfg)


def load_components(
    path: str | Path, dtype: str = "bf16", parts: tuple[str, ...] = COMPONENTS
) -> Components:
    """Load `parts` from a diffusers folder; model weights are stored in `dtype`.

    The scheduler keeps float64 alphas_cumprod whatever `dtype` is: the loss weight
    1 / (1 - abar) is computed from it exactly as the reference does.
    """
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel

    path = Path(path)
    _check_folder(path, parts)
    torch_dtype = TORCH_DTYPES[dtype]
    comps = Components(path=path, variant=read_variant(path))
    loaders = {
        "transformer": lambda: CogVideoXTransformer3DModel.from_pretrained(
            path, subfolder="transformer", torch_dtype=torch_dtype
        ),
        "vae": lambda: AutoencoderKLCogVideoX.from_pretrained(path, subfolder="vae", torch_dtype=torch_dtype),
        "text_encoder": lambda: T5EncoderModel.from_pretrained(
            path / "text_encoder", torch_dtype=torch_dtype
        ),
        "tokenizer": lambda: AutoTokenizer.from_pretrained(path / "tokenizer"),
        "scheduler": lambda: CogVideoXDPMScheduler.from_pretrained(path, subfolder="scheduler"),
    }
    for part in parts:
        try:
            module = loaders[part]()
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load {part} from {path / part}: {str(err).splitlines()[0]}") from None
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
        setattr(comps, part, module)
    return comps


def set_vae_memory_options(vae: Any, slicing: bool, tiling: bool) -> None:
    """data.vae_slicing / data.vae_tiling, for caching and for the per-step I2V image encode.

    Both default to on, as the reference trainer runs. Tiling changes the latents slightly once
    a frame exceeds the VAE's tile (half its configured sample size: 240 x 360 for the released
    VAEs, so 480 x 720 is tiled); slicing only bounds memory for batches of more than one clip.
    """
    (vae.enable_slicing if slicing else vae.disable_slicing)()
    (vae.enable_tiling if tiling else vae.disable_tiling)()


# --------------------------------------------------------------------------------------------
# Tiny random checkpoints
# --------------------------------------------------------------------------------------------

# A small word-piece vocabulary: enough for synthetic captions to tokenise to distinct ids.
_TINY_WORDS = (
    "a an the of and with on in red green blue yellow cyan magenta white orange purple square "
    "circle ball box moving slides drifts left right up down to from over across background "
    "gradient video clip dark light small large fast slow"
).split()


def _tiny_tokenizer(max_length: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in _TINY_WORDS]
    vocab += [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,-\u2581"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        extra_ids=0, model_max_length=max_length,
    )


def tiny_transformer_config(variant: str, height: int, width: int, frames: int) -> dict[str, Any]:
    """The variant's real transformer config with tiny widths and depth."""
    cfg = dict(FULL_TRANSFORMER_CONFIGS[variant])
    cfg.update(
        num_attention_heads=2,
        attention_head_dim=16,  # RoPE splits the head dim 4/8 * 3/8 * 3/8: 16 keeps every part even
        num_layers=2,
        time_embed_dim=32,
        text_embed_dim=32,
        max_text_seq_length=16,
        sample_height=height // VAE_SPATIAL_FACTOR,
        sample_width=width // VAE_SPATIAL_FACTOR,
        sample_frames=frames,
    )
    if cfg.get("ofs_embed_dim") is not None:
        cfg["ofs_embed_dim"] = 32
    return cfg


def tiny_vae_config(variant: str) -> dict[str, Any]:
    """A tiny VAE of the real structure (4 blocks: 8x spatial, 4x temporal compression).

    Its configured sample size sets the encode tiles to 48 x 40 px, stepped by 40 x 32 px: like
    the released VAEs' 240 x 360 tiles (stepped by 200 x 288), every tile edge falls on the 8 px
    latent grid, so tiled encoding (on by default) gives H/8 x W/8 latents at any multiple of 16,
    and the tiny frames (64 x 96 and up) are really tiled.
    """
    return dict(
        block_out_channels=(16, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=16,
        sample_height=96,
        sample_width=80,
        scaling_factor=VAE_SCALING.get(variant, 0.7),
        invert_scale_latents=variant in INVERT_SCALE_LATENTS,
    )


def make_tiny(
    variant: str, out_dir: str | Path, seed: int = 0, height: int = 64, width: int = 96, frames: int = 9,
    overwrite: bool = False,
) -> Path:
    """Write a tiny random diffusers checkpoint of `variant` (same structure, tiny sizes).

    The default sample size (64x96 px, 9 frames) is also the only resolution the 5B-I2V
    variant's learned positional embeddings accept. A folder that is not empty (it may hold a
    real checkpoint) is refused unless `overwrite`.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ModelError(f"make-tiny: {str(out)!r} is a file: choose a new folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "a checkpoint" if (out / "model_index.json").is_file() else "files"
        raise ModelError(f"make-tiny: {str(out)!r} already holds {what}: choose a new or empty folder, or pass "
                         "--overwrite to write over it")
    if variant not in VARIANTS:
        raise ModelError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    if height % 16 or width % 16 or (frames - 1) % 8:
        raise ModelError(f"make-tiny needs height/width multiples of 16 and 8N+1 frames, got {frames}x{height}x{width}")
    # Imported after the checks: a refusal should not wait seconds for diffusers' models.
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDPMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tcfg = tiny_transformer_config(variant, height, width, frames)
    transformer = CogVideoXTransformer3DModel(**tcfg)
    # Zero-initialised output projections would make every LoRA gradient vanish; diffusers
    # initialises with small random weights already, so the tiny model trains like the real one.
    vae = AutoencoderKLCogVideoX(**tiny_vae_config(variant))
    tokenizer = _tiny_tokenizer(tcfg["max_text_seq_length"])
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer), d_model=tcfg["text_embed_dim"], d_kv=16, d_ff=64, num_layers=2,
            num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
            feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        )
    )
    scheduler = CogVideoXDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
        snr_shift_scale=SNR_SHIFT_SCALE.get(variant, 1.0), timestep_spacing="trailing",
    )
    pipe_cls = CogVideoXImageToVideoPipeline if "i2v" in variant else CogVideoXPipeline
    pipe = pipe_cls(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out)
    return out
