"""What tests/test_fp8_fsdp.py runs under torchrun: the FP8 kinds this CPU runs, the training configs,
the plan of its runs in the suite's shared 2-rank launch (conftest.py's two_rank_launch), and `worker`, the sharding
check each rank runs (its report is checked by the test module)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.torchrun import Call, raw_config

STEPS = 4
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _rowwise_scaled_mm_on_cpu() -> bool:
    """torch <= 2.11's CPU _scaled_mm takes per-tensor scales only (rowwise runs on GPUs there)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


ROWWISE_ON_CPU = _rowwise_scaled_mm_on_cpu()
KINDS = ["storage", "tensorwise"] + (["rowwise"] if ROWWISE_ON_CPU else [])
HSDP_FP8_KIND = "tensorwise"  # the one kind the 4-rank (HSDP) worker runs: an FP8 matmul, on every CPU


def fast_section(kind: str) -> dict:
    fp8 = {"fp8_weight_storage": True} if kind == "storage" else {"fp8": kind}
    return {**fp8, "fp8_min_features": 16}  # the tiny model's linears are 32 to 192 wide


def fp8_raw(data: dict[str, str], out: Path, kind: str, ranks: int = 1, **sections) -> dict:
    # Every 2 steps a checkpoint; full activation checkpointing on (the FP8 weights are gathered
    # again for the recomputation in the backward).
    base = {
        "model": {"dtype": "bf16"},
        "fast": fast_section(kind),
        "train": {"train_steps": STEPS, "activation_checkpointing": "full"},
        "checkpoint": {"every_steps": 2},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return raw_config(data, out, ranks=ranks, **base)


def two_rank_plan(data: dict[str, str], root: Path) -> dict:
    """Every 2-rank run of tests/test_fp8_fsdp.py, in order, each in root/<name>: `worker` (`worker`
    below, on 2 ranks), `{kind}-fsdp` and `{kind}-ddp` (2 ranks x batch 1) for every kind, and
    `resumed`, the storage FSDP run resumed on 2 ranks from its checkpoint-2 (by path)."""
    (root / "worker").mkdir(parents=True, exist_ok=True)
    runs: dict = {"worker": Call("tests.fp8_runs:worker", [str(root / "worker"), data["model"], "1", *KINDS])}
    runs |= {f"{kind}-{how}": fp8_raw(data, root / f"{kind}-{how}", kind, ranks=2, parallel={"strategy": how})
             for kind in KINDS for how in ("fsdp", "ddp")}
    runs["resumed"] = fp8_raw(data, root / "resumed", "storage", ranks=2,
                              checkpoint={"resume_from": str(root / "storage-fsdp" / "checkpoint-2")})
    return runs


# --------------------------------------------------------------------------------------------
# The worker: sharding, gathering and bitwise equality with the unsharded model
# --------------------------------------------------------------------------------------------


def fp8_bytes(module: torch.nn.Module) -> int:
    """Bytes of FP8 weights this rank holds (a DTensor counts its local shard)."""
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.dtype in FP8:
            local = t.to_local() if hasattr(t, "to_local") else t
            total += local.numel() * local.element_size()
    return total


def _tiny_lora_fp8(model_path: str, kind: str) -> torch.nn.Module:
    from fastcog.fast.fp8 import convert_linears_to_fp8, convert_linears_to_fp8_storage
    from tests.runs import tiny_lora_transformer

    torch.manual_seed(0)  # the same LoRA A on every rank
    transformer = tiny_lora_transformer(model_path)
    if kind == "storage":
        convert_linears_to_fp8_storage(transformer, min_features=16)
    else:
        convert_linears_to_fp8(transformer, kind, min_features=16)
    return transformer


def _step(model: torch.nn.Module, after_forward=lambda: None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One forward and backward under the trainer's autocast; the same input on every rank."""
    g = torch.Generator().manual_seed(51)
    hidden = torch.randn(1, 3, 16, 8, 12, generator=g).to(torch.bfloat16).requires_grad_()
    text = torch.randn(1, 16, 32, generator=g).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.tensor([500]), return_dict=False)
    out = out[0]
    after_forward()
    out.float().square().mean().backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            grads[name] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
    return out.detach(), hidden.grad, grads


class GatherLog:
    """The all-gathers FSDP issues (output dtype and bytes), whichever collective this torch uses."""

    NAMES = ("all_gather_into_tensor", "all_gather_single")

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist, self.saved, self.calls = dist, {}, []

    def __enter__(self) -> GatherLog:
        for name in self.NAMES:
            if hasattr(self.dist, name):
                original = self.saved[name] = getattr(self.dist, name)

                def logged(output, *args, _original=original, **kwargs):
                    self.calls.append((str(output.dtype), output.numel() * output.element_size()))
                    return _original(output, *args, **kwargs)

                setattr(self.dist, name, logged)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.saved.items():
            setattr(self.dist, name, original)


def _stored_bytes(model: torch.nn.Module, shards: int) -> tuple[int, int]:
    """(bytes of every parameter as stored, padded as FSDP pads dim 0; the same with FP8 widened to 2)."""
    stored = widened = 0
    for p in model.parameters():
        rows = -(-p.shape[0] // shards) * shards if p.dim() else 1
        numel = rows * (p.numel() // p.shape[0] if p.dim() and p.shape[0] else 1)
        stored += numel * p.element_size()
        widened += numel * (2 if p.dtype in FP8 else p.element_size())
    return stored, widened


def worker(out_dir: str, model_path: str, replicate: int | str, *kinds: str) -> None:
    """On every rank of a torchrun launch; writes out_dir/rank<r>.json. kinds: default KINDS."""
    import torch.distributed as dist

    from fastcog.build import shard_fp8_weights
    from fastcog.config import ParallelConfig
    from fastcog.fast.fp8 import fp8_modules
    from fastcog.parallel import init_distributed, parallelize

    world, replicate, kinds = init_distributed(), int(replicate), kinds or tuple(KINDS)
    shards = world.world_size // replicate
    report: dict[str, dict] = {}
    for kind in kinds:
        # The reference: the model as one process runs it (FP8 buffers, no FSDP), eager, built the same
        # way; computed once, on rank 0, and sent to every rank. The sharded model, eager and compiled,
        # must give its output and gradients bit for bit.
        expected: list = [_step(_tiny_lora_fp8(model_path, kind)) if world.rank == 0 else None]
        dist.broadcast_object_list(expected, src=0)
        out_ref, dx_ref, grads_ref = expected[0]
        for compiled in (False, True):
            torch._dynamo.reset()
            model = _tiny_lora_fp8(model_path, kind)
            if compiled:  # as fast.compile does it: each block, before fully_shard
                for block in model.transformer_blocks:
                    block.compile(fullgraph=True, backend="aot_eager")
            whole = fp8_bytes(model)
            param_dtype = None if shard_fp8_weights(model) else torch.bfloat16  # as fastcog.build does
            par = parallelize(
                model, ParallelConfig(replicate_degree=replicate), "fsdp", world, torch.device("cpu"), param_dtype
            )
            fp8_params = {n: p for n, p in par.module.named_parameters() if p.dtype in FP8}
            r = {
                "whole": whole,
                "local": fp8_bytes(par.module),
                "fp8_buffers": [n for n, b in par.module.named_buffers() if b.dtype in FP8],
                "fp8_params": len(fp8_params),
                "fp8_params_sharded": all(
                    type(p.data).__name__ == "DTensor" and not p.requires_grad and p.to_local().dtype == p.dtype
                    for p in fp8_params.values()
                ),
                "fp8_modules": len(fp8_modules(par.module)),
            }
            seen: list[tuple[str, list[int], bool]] = []

            def record(module, args, _seen=seen):
                for name in module.fp8_weight_names:
                    w = getattr(module, name)
                    _seen.append((str(w.dtype), list(w.shape), hasattr(w, "to_local")))

            hooks = [m.register_forward_pre_hook(record) for m in fp8_modules(par.module)]
            r["stored"], r["widened"] = _stored_bytes(par.module, shards)
            # Resharded after the forward (reshard_after_forward), so gathered again for the backward:
            # every block but the last.
            r["regathered"] = sum(_stored_bytes(b, shards)[0] for b in par.module.transformer_blocks[:-1])
            with GatherLog() as log:
                out, dx, grads = _step(par.module, lambda r=r, log=log: r.setdefault("forward_calls", len(log.calls)))
            for h in hooks:
                h.remove()
            r["gathers"] = log.calls
            r["seen_in_forward"] = seen
            r["whole_shapes"] = sorted([str(p.dtype), list(p.shape)] for p in fp8_params.values())
            r["out_equal"] = torch.equal(out, out_ref)
            r["dx_equal"] = torch.equal(dx, dx_ref)
            r["grads_equal"] = grads.keys() == grads_ref.keys() and all(
                torch.equal(g, grads_ref[n]) for n, g in grads.items()
            )
            r["grads_nonzero"] = sum(bool(g.abs().sum() > 0) for g in grads.values())
            report[f"{kind}{'-compiled' if compiled else ''}"] = r
    Path(out_dir, f"rank{world.rank}.json").write_text(json.dumps(report, indent=1))
