"""Tiny random checkpoints of every variant, loading, variant detection and model errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastcog.errors import ModelError
from fastcog.models import COMPONENTS, load_components, make_tiny, read_variant
from fastcog.variants import VARIANTS

# What each variant must be detected as: (is_i2v, patch_size_t, uses_ofs, use_rope, learned_pos_emb).
EXPECTED = {
    "cogvideox-2b": (False, None, False, False, False),
    "cogvideox-5b": (False, None, False, True, False),
    "cogvideox-5b-i2v": (True, None, False, True, True),
    "cogvideox1.5-5b": (False, 2, False, True, False),
    "cogvideox1.5-5b-i2v": (True, 2, True, True, False),
}

TRANSFORMER_WEIGHTS = Path("transformer") / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny checkpoint per variant (seed 0), built once for this module."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {v: make_tiny(v, root / v.replace(".", "_"), seed=0) for v in VARIANTS}


def test_expected_table_covers_every_variant() -> None:
    assert set(EXPECTED) == set(VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_make_tiny_writes_a_complete_diffusers_folder(tiny: dict[str, Path], variant: str) -> None:
    path = tiny[variant]
    for part in COMPONENTS:
        assert (path / part).is_dir(), f"{part}/ missing"
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == ("CogVideoXImageToVideoPipeline" if "i2v" in variant else "CogVideoXPipeline")
    assert set(COMPONENTS) <= set(index)


@pytest.mark.parametrize("variant", VARIANTS)
def test_load_components_and_detect_variant(tiny: dict[str, Path], variant: str) -> None:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXTransformer3DModel
    from transformers import PreTrainedTokenizerBase, T5EncoderModel

    comps = load_components(tiny[variant], "bf16")
    assert isinstance(comps.transformer, CogVideoXTransformer3DModel)
    assert isinstance(comps.vae, AutoencoderKLCogVideoX)
    assert isinstance(comps.text_encoder, T5EncoderModel)
    assert isinstance(comps.tokenizer, PreTrainedTokenizerBase)
    assert isinstance(comps.scheduler, CogVideoXDPMScheduler)

    v = comps.variant
    assert v.name == variant
    assert (v.is_i2v, v.patch_size_t, v.uses_ofs, v.use_rope, v.learned_positional_embeddings) == EXPECTED[variant]
    assert v.latent_channels == 16
    assert comps.transformer.config.in_channels == (32 if v.is_i2v else 16)
    assert read_variant(tiny[variant]) == v  # config-only detection agrees with the full load
    assert v.max_text_seq_length == comps.transformer.config.max_text_seq_length
    assert v.text_embed_dim == comps.text_encoder.config.d_model

    # Weights are stored in the requested dtype; frozen and in eval mode.
    for name in ("transformer", "vae", "text_encoder"):
        module = getattr(comps, name)
        dtypes = {p.dtype for p in module.parameters()}
        assert dtypes == {torch.bfloat16}, f"{name}: {dtypes}"
        assert not any(p.requires_grad for p in module.parameters()), name
        assert not module.training, name
    # The scheduler's abar stays float64 whatever the model dtype.
    assert comps.scheduler.alphas_cumprod.dtype == torch.float64


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_load_components_other_dtypes_and_parts(tiny: dict[str, Path], dtype: str) -> None:
    expected = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    comps = load_components(tiny["cogvideox-5b"], dtype, parts=("transformer", "scheduler"))
    assert {p.dtype for p in comps.transformer.parameters()} == {expected}
    assert comps.scheduler.alphas_cumprod.dtype == torch.float64
    assert comps.vae is None and comps.text_encoder is None and comps.tokenizer is None


def test_make_tiny_is_deterministic(tiny: dict[str, Path], tmp_path: Path) -> None:
    first = load_file(tiny["cogvideox-5b"] / TRANSFORMER_WEIGHTS)
    again = make_tiny("cogvideox-5b", tmp_path / "again", seed=0)
    second = load_file(again / TRANSFORMER_WEIGHTS)
    assert first.keys() == second.keys() and len(first) > 0
    for key in first:
        assert torch.equal(first[key], second[key]), key
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(tiny["cogvideox-5b"] / part), load_file(again / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    # The seed is actually used: a different seed gives different weights.
    other = load_file(make_tiny("cogvideox-5b", tmp_path / "other", seed=1) / TRANSFORMER_WEIGHTS)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].numel() > 1)


def test_make_tiny_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown variant"):
        make_tiny("cogvideox-9b", tmp_path / "x")
    with pytest.raises(ModelError, match="8N\\+1"):
        make_tiny("cogvideox-5b", tmp_path / "y", frames=10)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_missing_folder_is_a_model_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    for call in (lambda: load_components(missing), lambda: read_variant(missing)):
        with pytest.raises(ModelError) as err:
            call()
        msg = str(err.value)
        assert str(missing) in msg
        assert "model.path" in msg and "make-tiny" in msg


def test_folder_without_vae_names_it(tiny: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny["cogvideox-5b"], broken, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(ModelError) as err:
        load_components(broken)
    msg = str(err.value)
    assert "vae/" in msg and str(broken) in msg
    assert "transformer/" not in msg.split("holds")[0]  # only the missing part is named as missing
    # Parts that are present still load on their own.
    assert load_components(broken, "fp32", parts=("transformer",)).transformer is not None


def test_folder_without_config_file(tiny: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny["cogvideox-5b"], broken)
    (broken / "transformer" / "config.json").unlink()
    with pytest.raises(ModelError, match="transformer.*no config file"):
        read_variant(broken)


def test_tiny_tokenizer_pads_to_max_text_seq_length(tiny: dict[str, Path]) -> None:
    comps = load_components(tiny["cogvideox-5b"], "fp32", parts=("tokenizer", "text_encoder"))
    n = comps.variant.max_text_seq_length
    tok = comps.tokenizer
    short = tok("a red ball", padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
    long = tok(" ".join(["a red ball moving left"] * 20), padding="max_length", max_length=n, truncation=True,
               return_tensors="pt").input_ids
    assert short.shape == long.shape == (1, n)
    assert (short[0, -1] == tok.pad_token_id) and (short[0] == tok.pad_token_id).sum() < n
    assert (long[0] != tok.pad_token_id).all()  # truncated, not padded
    # Known words tokenise to distinct ids, so different captions give different embeddings.
    other = tok("a blue box", padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
    assert not torch.equal(short, other)
    emb = comps.text_encoder(short).last_hidden_state
    assert emb.shape == (1, n, comps.variant.text_embed_dim)


@pytest.mark.parametrize("variant", ["cogvideox-2b", "cogvideox-5b"])
def test_tiny_scheduler_matches_the_reference(tiny: dict[str, Path], variant: str) -> None:
    sched = load_components(tiny[variant], "fp32", parts=("scheduler",)).scheduler
    abar = sched.alphas_cumprod
    assert abar.dtype == torch.float64 and abar.shape == (1000,)
    assert abar[999].item() == 0.0
    assert sched.config.prediction_type == "v_prediction"
    assert sched.config.rescale_betas_zero_snr is True
    s = 3.0 if variant == "cogvideox-2b" else 1.0
    assert sched.config.snr_shift_scale == s

    # scaled_linear 0.00085..0.012, the SNR shift abar / (s + (1 - s) abar), then the
    # zero-terminal-SNR rescale, in the order diffusers' CogVideoXDPMScheduler applies them
    # (docs/reference.md, "Scheduler and objective"; for s = 1 the order does not matter).
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar0 = torch.cumprod(1 - betas, 0)
    abar0 = abar0 / (s + (1 - s) * abar0)
    sqrt_abar = abar0.sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    want = ((sqrt_abar - last) * first / (first - last)) ** 2
    torch.testing.assert_close(abar, want, rtol=1e-10, atol=1e-12)
    assert torch.all(abar[1:] <= abar[:-1])  # monotonically decreasing noise level
