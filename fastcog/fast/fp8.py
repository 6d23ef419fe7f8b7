"""FP8 for the frozen base linears: FP8 matmuls (``fast.fp8``) or FP8 weight storage (``fast.fp8_weight_storage``).

Math. ``q(t) = sat(t * s)`` in an FP8 format, ``s = fmax / amax(t)`` (fmax = 448 for e4m3, 57344 for
e5m2; amax clamped to >= 1e-12), and ``t ~ q(t) / s``. ``torch._scaled_mm(a, b, 1/s_a, 1/s_b)``
multiplies FP8 operands with fp32 accumulation and applies the inverse scales in the epilogue::

    x  [M, K]  (any leading dims flattened into M, any strides)    W [N, K] frozen    b [N]

    forward    y  = (q(x) @ q(W).T) / (s_x s_W) + b                [M, N]   nothing saved but the FP8 weight
    backward   dx = (q(dy) @ q(W^T).T) / (s_dy s_Wt)                [M, K]   (= dy @ W)
               db = sum_M dy                                       only when b requires grad
               dW                                                  never: the weight is frozen, no such GEMM

Recipes (the scaling of torchao.float8's recipes of the same names, without the weight-gradient GEMM):

* ``tensorwise``: one scale per tensor. x and W in e4m3, dy in e5m2 (two more exponent bits of range
  for gradients; ``_scaled_mm``/cuBLAS accept the e5m2 x e4m3 pair, only e5m2 x e5m2 is refused).
* ``rowwise``: one scale per row of the left operand ([M, 1]) and per column of the right one ([1, N]),
  every scale rounded down to a power of two (exact rescaling), everything in e4m3 (the CUTLASS
  rowwise kernel of ``_scaled_mm`` takes e4m3 only, as torchao uses it). The GEMM writes bf16 (the only
  rowwise output some CUDA builds accept); an fp16 model gets it cast back.

Weights are quantised ONCE, at conversion: ``q(W)`` [N, K] for the forward and ``q(W^T)`` [K, N], a separately
scaled contiguous copy, for the backward. ``_scaled_mm`` wants its second operand column-major, i.e. ``q(W).t()``
/ ``q(W^T).t()`` views of row-major copies. The two FP8 copies take the memory of the one bf16 weight they
replace; the high-precision weight is dropped. Under the rowwise recipe the copies differ beyond a transpose
(each is scaled along its non-contracted dim).

Shapes. ``_scaled_mm`` on CUDA needs K and N multiples of 16 (M is free), row-major ``a`` and
column-major ``b``; the converter only takes linears whose in and out features are multiples of 16
(the backward swaps the roles of in and out), activations are quantised into fresh row-major tensors.

The storage variant keeps ``q(W)`` (e4m3, power-of-two scale per output row) and widens it to the
compute dtype for a plain ``F.linear``; a custom op (``fastcog::fp8_storage_linear``) with its own
backward widens again for dx, so autograd never holds a full-size bf16 weight between forward and
backward. Widening is exact: e4m3 values and power-of-two scales are representable in bf16/fp16.

State. The FP8 weights and their scales are non-persistent buffers: not in the state_dict (the frozen
weights come from the pretrained checkpoint; trainable names such as peft's ``lora_A`` are unchanged),
moved by ``.to(device)``, but also widened by ``.to(dtype)`` (so never cast a converted model). peft's
merge / unmerge cannot reach them. FSDP2 shards Parameters only, so before ``fully_shard``
``fastcog.parallel`` calls :meth:`~_FrozenFp8Base.weights_as_parameters`: the FP8 weights (not the
scales) become frozen Parameters, the same tensors, and are sharded, gathered as FP8 bytes and freed
like any other frozen weight; frozen, they stay out of the optimizer and of checkpoints (which skip
frozen parameters), so a resume converts the pretrained weights again, exactly as at the start.

Dtypes. The compute dtype is the autocast dtype when autocast is on, else x's dtype when it is bf16 or
fp16, else the dtype the weight had (an fp32 x is cast to it and the result cast back to fp32).

NaN / inf. A non-finite activation or gradient makes its scale non-finite, so the output is NaN where
that scale applies (all of it under tensorwise, the affected rows under rowwise): never silence.
A non-finite frozen weight is refused at conversion.

Why an autograd.Function for the FP8 matmul and not an opaque custom op: everything inside is aten ops
with meta kernels (``_scaled_mm`` included), so torch.compile traces it (fullgraph, no graph break),
and inductor sees the activation quantisation (abs, amax, scale, cast): it can fuse it with the kernel
that produces x, and linears reading the same x (q, k, v) quantise it once (checked on CPU with
inductor's partitioner: one amax for three linears). Inside an opaque op each linear would pay its own
unfused quantisation passes (~5 bytes of traffic per activation element each). The storage variant is
a custom op because there the guarantee about what is saved for backward matters more than fusion.
As in torchao, the forward GEMM uses ``_scaled_mm``'s fast accumulation, the dx GEMM does not.

Accuracy (SQNR against fp64, random bf16 data, CPU): forward 27.5-29.5 dB (both recipes), dx 24-25 dB
tensorwise (e5m2 gradients) and 28.5-29.5 dB rowwise, storage variant 32-33 dB; plain bf16 ~55 dB.
Forward and dx are bitwise equal to torchao.float8's Float8Linear with the same recipe.

Not measured on a GPU: speed and memory on H100/H200, how much of the quantisation
inductor fuses there, and the effect of fast accumulation at K = 12,288 (tests marked ``gpu`` check
the SQNR at the 5B shapes when a GPU is present).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RECIPES",
    "Fp8Linear",
    "Fp8StorageLinear",
    "convert_linears_to_fp8",
    "convert_linears_to_fp8_storage",
    "fp8_modules",
    "quantize",
]

RECIPES = ("tensorwise", "rowwise")
E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
_AMAX_EPS = 1e-12  # as torchao: an all-zero tensor (row) gets a finite scale and quantises to zeros
_HALF = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- quantisation


def _amax_to_scale(amax: torch.Tensor, fp8_dtype: torch.dtype, pow2: bool) -> torch.Tensor:
    """fmax / amax in fp32; the division in fp64 so eager and compiled code agree (as torchao)."""
    scale = (torch.finfo(fp8_dtype).max / amax.double().clamp(min=_AMAX_EPS)).float()
    if pow2:  # rounding down keeps amax * scale <= fmax, and 1 / scale is exact
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return scale


def quantize(t: torch.Tensor, fp8_dtype: torch.dtype, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """t [R, C] -> (q [R, C] row-major fp8, inv_scale) with ``t ~ q * inv_scale``.

    inv_scale is fp32, ``[]`` (one per tensor) or ``[R, 1]`` (one per row, a power of two).
    """
    amax = t.abs().amax(dim=1, keepdim=True) if rowwise else t.abs().amax()
    scale = _amax_to_scale(amax, fp8_dtype, pow2=rowwise)
    fmax = torch.finfo(fp8_dtype).max
    # Saturate explicitly: eager casts in torch <= 2.11 turn overflow into NaN (e4m3fn has no inf).
    q = (t.float() * scale).clamp(-fmax, fmax).to(fp8_dtype).contiguous()
    return q, scale.reciprocal()


def _scaled_matmul(
    a: torch.Tensor, a_fp8: torch.dtype, b: torch.Tensor, b_inv: torch.Tensor, rowwise: bool, fast_accum: bool
) -> torch.Tensor:
    """``a @ B.T`` for high-precision a [M, K] and a quantised B given as b [N, K] fp8 (row-major).

    b_inv is B's inverse scale: ``[]`` or ``[1, N]``. The result is in a's dtype.
    """
    aq, a_inv = quantize(a, a_fp8, rowwise)
    # Autocast off for the GEMM: eager autocast casts _scaled_mm's fp32 scales to bf16 (8-bit
    # mantissa), which scaled every tensorwise output by a wrong factor (up to 0.4%; rowwise scales
    # are powers of two, exact in bf16). Compiled code did not cast, so eager and compiled differed
    # (max 0.0625 on a 64x64 layer); tests/test_fp8.py checks eager == compiled == no autocast.
    with torch.autocast(a.device.type, enabled=False) if _autocast_on(a.device.type) else contextlib.nullcontext():
        out = torch._scaled_mm(
            aq,
            b.t(),  # column-major view, as _scaled_mm requires
            scale_a=a_inv,
            scale_b=b_inv,
            out_dtype=torch.bfloat16 if rowwise else a.dtype,
            use_fast_accum=fast_accum,
        )
    # Never a no-op ``.to``: under torch.compile in torch 2.11, an autograd.Function whose forward
    # returns ``t.to(t.dtype)`` (t itself) gets a zero gradient (dx == 0, seen on CPU with aot_eager
    # and inductor; torch 2.13 is fine). tests/test_fp8.py's compile test catches it on 2.11.
    return out if out.dtype == a.dtype else out.to(a.dtype)


class _Fp8LinearFn(torch.autograd.Function):
    """y = x @ W.T with quantised x and W; backward dx only (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, w, w_inv, wt, wt_inv, rowwise: bool):  # type: ignore[override]
        # Only the FP8 weight copy for dx is saved (a buffer: no new memory); x is not needed.
        ctx.save_for_backward(wt, wt_inv)
        ctx.rowwise = rowwise
        # torchao's choice: fast (lower-precision) accumulation for the output GEMM only.
        return _scaled_matmul(x, E4M3, w, w_inv, rowwise, fast_accum=True)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        wt, wt_inv = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            grad_fp8 = E4M3 if ctx.rowwise else E5M2
            dx = _scaled_matmul(dy, grad_fp8, wt, wt_inv, ctx.rowwise, fast_accum=False)
        return dx, None, None, None, None, None


# --------------------------------------------------------------------------- storage op


def _widen(weight: torch.Tensor, inv_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Exact in bf16/fp16 (power-of-two scales), so multiplying in the compute dtype loses nothing.
    return weight.to(dtype) * inv_scale.to(dtype)


@torch.library.custom_op("fastcog::fp8_storage_linear", mutates_args=())
def fp8_storage_linear(x: torch.Tensor, weight: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ widen(weight [N, K] e4m3, inv_scale [N, 1]).T -> [..., N] in x's dtype."""
    return F.linear(x, _widen(weight, inv_scale, x.dtype))


@fp8_storage_linear.register_fake
def _(x, weight, inv_scale):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("fastcog::fp8_storage_linear_dx", mutates_args=())
def fp8_storage_linear_dx(dy: torch.Tensor, weight: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """dy [..., N] @ widen(weight [N, K], inv_scale) -> [..., K] in dy's dtype."""
    return torch.matmul(dy, _widen(weight, inv_scale, dy.dtype))


@fp8_storage_linear_dx.register_fake
def _(dy, weight, inv_scale):
    return dy.new_empty(*dy.shape[:-1], weight.shape[1])


def _storage_setup_context(ctx, inputs, output) -> None:
    _, weight, inv_scale = inputs
    ctx.save_for_backward(weight, inv_scale)  # the FP8 weight, never its widened copy


def _storage_backward(ctx, dy):
    weight, inv_scale = ctx.saved_tensors
    dx = fp8_storage_linear_dx(dy, weight, inv_scale) if ctx.needs_input_grad[0] else None
    return dx, None, None


fp8_storage_linear.register_autograd(_storage_backward, setup_context=_storage_setup_context)


# --------------------------------------------------------------------------- modules


def _autocast_on(device_type: str) -> bool:
    # The meta device (`fastcog plan`) has no autocast state to ask or to turn off.
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _compute_dtype(x: torch.Tensor, default: torch.dtype) -> torch.dtype:
    if _autocast_on(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.dtype in _HALF else default


def _frozen_weight(linear: nn.Linear, what: str) -> torch.Tensor:
    w = linear.weight
    if w.requires_grad:
        raise ValueError(f"{what} is for frozen linears: this weight requires grad")
    if not w.is_meta and not bool(torch.isfinite(w).all()):
        raise ValueError(f"{what}: the frozen weight {tuple(w.shape)} has NaN or inf values")
    return w.detach()


class _FrozenFp8Base(nn.Module):
    """Shared bits: features, bias (kept as the same Parameter), compute dtype, output dtype rule."""

    fp8_weight_names: tuple[str, ...] = ()
    """The FP8 weight tensors (buffers, or frozen Parameters after :meth:`weights_as_parameters`)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        dtype = linear.weight.dtype
        self.compute_dtype = dtype if dtype in _HALF else torch.bfloat16
        # The same Parameter object: its name, requires_grad and any optimizer reference are unchanged.
        self.bias = linear.bias

    def _finish(self, y: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y if _autocast_on(x.device.type) else y.to(x.dtype)

    def weights_as_parameters(self) -> None:
        """Re-register the FP8 weights as frozen Parameters (the same tensors, not copied), for FSDP2.

        FSDP2 shards Parameters only: as buffers every rank would keep the whole FP8 weights. As
        frozen Parameters they are sharded with the rest of their FSDP unit and all-gathered for its
        forward and backward, and, being frozen, still left out of checkpoints
        (``ignore_frozen_params``) and of the optimizer. The forward reads them by the same names.
        The scales stay replicated buffers: 4 bytes per tensor or per row (0.13% of the weight bytes
        at 5B's 3072 features), and ``[]`` / ``[1, N]`` have no dim 0 for FSDP to split. Idempotent.
        """
        for name in self.fp8_weight_names:
            if name in self._buffers:
                tensor = self._buffers[name]
                delattr(self, name)  # out of _buffers and the non-persistent set
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


class Fp8Linear(_FrozenFp8Base):
    """A frozen nn.Linear whose matmuls run in FP8 (``recipe``: tensorwise or rowwise); dx only.

    Buffers (not saved in the state_dict; the frozen weight comes from the pretrained checkpoint):
    ``weight_fp8`` [out, in] e4m3 and ``weight_t_fp8`` [in, out] e4m3, with inverse scales
    ``weight_inv_scale`` / ``weight_t_inv_scale`` (``[]`` tensorwise, ``[1, out]`` / ``[1, in]`` rowwise).
    """

    fp8_weight_names = ("weight_fp8", "weight_t_fp8")

    def __init__(self, linear: nn.Linear, recipe: str = "tensorwise") -> None:
        if recipe not in RECIPES:
            raise ValueError(f"fp8 recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
        if linear.in_features % 16 or linear.out_features % 16:
            raise ValueError(f"Fp8Linear needs in/out features that are multiples of 16, got "
                             f"{linear.in_features} -> {linear.out_features}")
        super().__init__(linear)
        self.recipe = recipe
        rowwise = recipe == "rowwise"
        with torch.no_grad():
            w = _frozen_weight(linear, "Fp8Linear")
            wq, w_inv = quantize(w, E4M3, rowwise)
            if rowwise:  # W^T gets its own scales, along its rows (= W's columns)
                wtq, wt_inv = quantize(w.t(), E4M3, rowwise)
                w_inv, wt_inv = w_inv.reshape(1, -1), wt_inv.reshape(1, -1)
            else:
                # A separate scalar: dynamo refuses an autograd.Function given one tensor twice.
                wtq, wt_inv = wq.t().contiguous(), w_inv.clone()
        self.register_buffer("weight_fp8", wq, persistent=False)
        self.register_buffer("weight_inv_scale", w_inv, persistent=False)
        self.register_buffer("weight_t_fp8", wtq, persistent=False)
        self.register_buffer("weight_t_inv_scale", wt_inv, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x, self.compute_dtype)
        x2d = x.to(dtype).reshape(-1, self.in_features)
        y = _Fp8LinearFn.apply(
            x2d, self.weight_fp8, self.weight_inv_scale, self.weight_t_fp8, self.weight_t_inv_scale,
            self.recipe == "rowwise",
        )
        return self._finish(y.reshape(*x.shape[:-1], self.out_features), x, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, recipe={self.recipe}")


class Fp8StorageLinear(_FrozenFp8Base):
    """A frozen nn.Linear stored as e4m3 with a power-of-two scale per output row, widened at use.

    Buffers (not in the state_dict): ``weight_fp8`` [out, in] e4m3, ``weight_inv_scale`` [out, 1] fp32.
    About half the bytes of a bf16 weight; the matmul itself is the ordinary high-precision one.
    """

    fp8_weight_names = ("weight_fp8",)

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        with torch.no_grad():
            wq, w_inv = quantize(_frozen_weight(linear, "Fp8StorageLinear"), E4M3, rowwise=True)
        self.register_buffer("weight_fp8", wq, persistent=False)
        self.register_buffer("weight_inv_scale", w_inv, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x, self.compute_dtype)
        y = fp8_storage_linear(x.to(dtype), self.weight_fp8, self.weight_inv_scale)
        return self._finish(y, x, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def fp8_modules(module: nn.Module) -> list[_FrozenFp8Base]:
    """The Fp8Linear / Fp8StorageLinear modules under ``module`` (itself included), each once."""
    return [m for m in module.modules() if isinstance(m, _FrozenFp8Base)]


# --------------------------------------------------------------------------- conversion


def _is_lora_adapter(name: str) -> bool:
    # peft keeps adapters under lora_A / lora_B (ModuleDicts keyed by adapter name): trainable, never FP8.
    return any(part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B") for part in name.split("."))


def _convert(module: nn.Module, make, min_features: int, multiple_of_16: bool) -> list[str]:
    """Replace every eligible frozen nn.Linear under ``module`` by ``make(linear)``; return their names.

    Eligible: exactly nn.Linear (subclasses such as MultiheadAttention's out_proj are read through
    ``.weight`` by their owners), weight frozen, not a LoRA adapter, in and out features >= min_features
    (and multiples of 16 when ``multiple_of_16``). A module reachable under several names is converted
    once and replaced everywhere. peft's ``lora.Linear`` wrappers are not nn.Linear: their
    ``base_layer`` is converted and the wrapper keeps adding the LoRA term.
    """
    converted: dict[int, nn.Module] = {}
    names: list[str] = []
    for name, child in list(module.named_modules(remove_duplicate=False)):
        if name == "" or type(child) is not nn.Linear or _is_lora_adapter(name):
            continue
        if child.weight.requires_grad or min(child.in_features, child.out_features) < min_features:
            continue
        if multiple_of_16 and (child.in_features % 16 or child.out_features % 16):
            continue
        if id(child) not in converted:
            converted[id(child)] = make(child)
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name), attr, converted[id(child)])
        names.append(name)
    return names


def convert_linears_to_fp8(module: nn.Module, recipe: str, min_features: int) -> list[str]:
    """Swap the frozen nn.Linear layers of ``module`` for :class:`Fp8Linear` in place; return their names.

    Only linears with in and out features >= ``min_features`` and multiples of 16. Call it after LoRA
    injection (peft must see plain nn.Linear base layers) and before compile / FSDP; do not cast the
    model's dtype afterwards (``.to(dtype)`` would widen the FP8 buffers).
    """
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    return _convert(module, lambda lin: Fp8Linear(lin, recipe), min_features, multiple_of_16=True)


def convert_linears_to_fp8_storage(module: nn.Module, min_features: int) -> list[str]:
    """Swap the frozen nn.Linear layers of ``module`` (in and out >= ``min_features``) for
    :class:`Fp8StorageLinear` in place; return their names. Same calling rules as convert_linears_to_fp8."""
    return _convert(module, Fp8StorageLinear, min_features, multiple_of_16=False)
