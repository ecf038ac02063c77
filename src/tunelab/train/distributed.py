"""Data parallelism on torch's own engine: which strategy a run uses, and what each needs.

A launch with several processes (``torchrun``, ``accelerate launch``, or ``tunelab train
--nproc-per-node N``, which re-launches itself under torchrun) trains one model:

- ``ddp``: every rank holds the whole model; gradients are averaged (torch's
  ``DistributedDataParallel``);
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) shards parameters, gradients and
  optimizer state over the ranks, each decoder layer a unit, then the root; it works on CPU
  with gloo too, which is why tunelab applies it itself rather than through accelerate's
  plugin (accelerate silently skips that plugin without a GPU);
- ``deepspeed``: accelerate's ``DeepSpeedPlugin`` with the user's ``train.deepspeed`` JSON (GPU only).

Data: one optimizer step reads ``train.grad_accum x world size`` micro-batches of the one
deterministic order (:class:`tunelab.train.batches.MicroBatches`); rank ``r`` trains on the
micro-batches ``r, r + W, ...`` of them (``RunTrainer.next_batch``). So ``N`` processes with
``grad_accum: g/N`` read exactly the examples one process with ``grad_accum: g`` reads, in
the same steps, and the token-level normalisation of the batch loop (units summed over the
ranks) keeps the gradient the same. The order continues across epochs, so no rank is ever
without a micro-batch at an epoch's end, and every rank runs the same collectives.

Checkpoints under FSDP are gathered into full tensors (on rank 0, in CPU memory) and written
in the ordinary safetensors + JSON checkpoint, not with ``torch.distributed.checkpoint``:
DCP's reader unpickles its ``.metadata`` file (``FileSystemReader.read_metadata`` calls
``pickle.load``), and nothing read from a run directory may execute code.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tunelab.errors import ConfigError
from tunelab.methods.base import trainable_state
from tunelab.models.blocks import decoder_blocks

if TYPE_CHECKING:
    from tunelab.config import RunConfig

Strategy = Literal["single", "ddp", "fsdp", "deepspeed"]

#: Methods whose trainable weights live in ordinary parameters of the model's layers, which
#: FSDP2 can shard: full and freeze fine-tuning, the LoRA family, IA3 and the bottleneck adapters.
FSDP_METHODS = frozenset({"full", "freeze", "lora", "dora", "rslora", "loraplus", "pissa", "ia3",
                          "houlsby", "pfeiffer", "parallel", "adapter_fusion"})
#: Why the other methods are refused under FSDP (one reason per family).
_FSDP_REFUSALS = {
    "qlora": "its base weights are bitsandbytes 4-bit tensors, which FSDP2 cannot shard",
    "adalora": "its rank allocator reads and masks whole LoRA matrices between steps, which FSDP2 holds sharded",
}
_VIRTUAL_TOKENS = "its virtual tokens are passed to the layers as cached keys/values from outside them, a path " \
                  "FSDP2 does not shard or gather"
#: Stages whose step samples with ``generate``: each rank's answers end at different lengths, so ranks
#: would run different numbers of forward passes, and FSDP2's per-layer all-gathers would wait forever.
_ROLLOUT_STAGES = ("ppo", "grpo")


def world_size() -> int:
    """Processes in this launch, as the launcher (torchrun, accelerate, MPI) declares it; 1 alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_strategy(cfg: "RunConfig", processes: int | None = None) -> Strategy:
    """``train.distributed`` for this launch: ``auto`` is ddp with several processes, single with one.

    deepspeed stays deepspeed with one process (ZeRO-offload helps a single GPU too); ddp and
    fsdp with one process run as a single process."""
    processes = world_size() if processes is None else processes
    chosen = cfg.train.distributed
    if chosen == "deepspeed":
        return "deepspeed"
    if processes <= 1:
        return "single"
    return "ddp" if chosen == "auto" else chosen


def check_distributed(cfg: "RunConfig", processes: int | None = None) -> Strategy:
    """Refuse a distributed setting that cannot work, before anything is loaded; return the strategy."""
    processes = world_size() if processes is None else processes
    strategy = resolve_strategy(cfg, processes)
    if cfg.train.deepspeed is not None and strategy != "deepspeed":
        raise ConfigError(f"train.deepspeed is set ({cfg.train.deepspeed}) but train.distributed is "
                          f"'{cfg.train.distributed}': the DeepSpeed config is only read with train.distributed="
                          "deepspeed. Set train.distributed=deepspeed, or remove train.deepspeed.")
    if strategy == "deepspeed":
        _check_deepspeed(cfg)
    if strategy == "fsdp":
        _check_fsdp(cfg)
    return strategy


def _check_deepspeed(cfg: "RunConfig") -> None:
    """The DeepSpeed path is thin (accelerate's plugin) and what it cannot do yet is refused:
    checkpoints (ZeRO partitions the optimizer state over the ranks, and tunelab's checkpoint
    holds one rank's) and ZeRO-3 (the final save would write partitioned weights)."""
    path = cfg.train.deepspeed
    if path is None:
        raise ConfigError("train.distributed=deepspeed needs train.deepspeed: the path of a DeepSpeed JSON config "
                          "(examples/distributed/ds_zero2.json is one). Set it.")
    try:
        with open(path, encoding="utf-8") as handle:
            settings = json.load(handle)
        stage = int((settings.get("zero_optimization") or {}).get("stage", 0))
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise ConfigError(f"train.deepspeed: {path} cannot be read as a DeepSpeed JSON config ({err}). Set it to "
                          "such a file (examples/distributed/ds_zero2.json is one).") from None
    if stage >= 3:
        raise ConfigError(f"train.deepspeed: {path} asks for ZeRO stage {stage}; tunelab's final save does not "
                          "gather ZeRO-3's partitioned weights yet. Use stage 1 or 2, or train.distributed=fsdp "
                          "(FSDP2 shards the weights too, and its saves are gathered).")
    if cfg.train.grad_accum != 1:
        raise ConfigError(f"train.grad_accum={cfg.train.grad_accum} with train.distributed=deepspeed: DeepSpeed's "
                          "engine steps the optimizer after every backward pass that ends its own accumulation, "
                          "which tunelab leaves at 1. Set train.grad_accum=1 and raise train.batch_size (or add "
                          "processes) for a larger batch.")
    if cfg.train.save_every is not None:
        raise ConfigError("train.save_every does not work with train.distributed=deepspeed yet: ZeRO partitions "
                          "the optimizer state over the ranks, and a tunelab checkpoint holds whole states. Set "
                          "train.save_every=null, or use train.distributed=fsdp or ddp to checkpoint.")
    if not torch.cuda.is_available():
        raise ConfigError("train.distributed=deepspeed needs a GPU: DeepSpeed's ZeRO engine runs on CUDA devices "
                          "only, and this machine has none. Use train.distributed=fsdp (FSDP2 shards "
                          "parameters, gradients and optimizer state like ZeRO-3, and runs on CPU) or ddp.")


def deepspeed_plugin(cfg: "RunConfig") -> Any:
    """accelerate's DeepSpeedPlugin for ``train.deepspeed``, its ``"auto"`` entries filled from the
    run: one micro-batch of ``train.batch_size`` per optimizer step, clipping at ``train.max_grad_norm``."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config=cfg.train.deepspeed, gradient_accumulation_steps=1,
                             gradient_clipping=cfg.train.max_grad_norm or 0.0)
    if plugin.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    return plugin


def _check_fsdp(cfg: "RunConfig") -> None:
    method = cfg.method.type
    if cfg.stage in _ROLLOUT_STAGES:
        raise ConfigError(f"train.distributed=fsdp cannot run stage {cfg.stage}: its rollouts sample with generate, "
                          "and answers of different lengths make ranks run different numbers of forward passes, "
                          "so FSDP's per-layer all-gathers would wait on each other forever. Use "
                          "train.distributed=ddp for this stage.")
    if cfg.model.quantization != "none" and method in FSDP_METHODS:
        raise ConfigError(f"train.distributed=fsdp cannot shard a quantized base (model.quantization="
                          f"{cfg.model.quantization}): bitsandbytes weights are not ordinary tensors. Set "
                          "model.quantization=none, or use train.distributed=ddp.")
    if method not in FSDP_METHODS:
        reason = _FSDP_REFUSALS.get(method, _VIRTUAL_TOKENS)
        raise ConfigError(f"train.distributed=fsdp cannot train method '{method}': {reason}. Use train.distributed="
                          f"ddp for it, or one of the methods FSDP shards: {', '.join(sorted(FSDP_METHODS))}.")


def check_world_for_data(per_epoch: int, cfg: "RunConfig", processes: int) -> None:
    """A launch needs at least one micro-batch per rank in an epoch; with fewer, every step would
    read some examples twice (the order wraps into the next epoch within one step)."""
    if processes > 1 and per_epoch < processes:
        raise ConfigError(f"this launch has {processes} processes but the training data makes only {per_epoch} "
                          f"micro-batch(es) of train.batch_size={cfg.train.batch_size} per epoch: each rank needs "
                          "at least one. Lower train.batch_size, launch fewer processes, or add data.")


# --------------------------------------------------------------------------------- models

class AttributeDDP(DistributedDataParallel):
    """DDP that answers attribute lookups it does not know with the wrapped model's.

    The objectives call ``model.get_output_embeddings()`` and read ``model.config`` on the
    model they train (see ``models.forward``); through this wrapper they work unchanged,
    while the forward pass still goes through DDP, which gradient averaging needs."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def shard_model(model: nn.Module, device: torch.device, mixed_precision: str) -> nn.Module:
    """FSDP2 in place: each decoder layer a unit (its parameters gathered just for its own forward
    and backward), then the root for the embeddings, the head and anything outside the layers."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    # Mixed precision: all-gather every parameter in the compute dtype (a LoRA adapter in fp32
    # beside a bf16 base would otherwise be a group of mixed dtypes), reduce gradients in fp32.
    policy = MixedPrecisionPolicy(param_dtype=dtypes[mixed_precision], reduce_dtype=torch.float32) \
        if mixed_precision in dtypes else MixedPrecisionPolicy()
    # FSDP2 warns that the root returns a view (the hidden states the objectives read with the
    # head bypassed, see models.forward): a view is only unsafe under in-place ops, which no
    # objective applies to the model's output.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for layer in decoder_blocks(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def wrap_model(model: nn.Module, strategy: Strategy, device: torch.device, mixed_precision: str) -> nn.Module:
    """The model as the strategy trains it (before the optimizer is built: FSDP replaces parameters)."""
    if strategy == "ddp":
        return AttributeDDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        return shard_model(model, device, mixed_precision)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on micro-batches before the
    last of a step: accumulation is local, one exchange per step."""
    if sync:
        yield
        return
    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
        return
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is None:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)


def norm_value(norm: torch.Tensor) -> float:
    """A gradient norm as a number: under FSDP2 torch's clip returns the norm of the whole
    gradient as a DTensor (the same on every rank)."""
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


# --------------------------------------------------------------------------------- state

def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """:func:`~tunelab.methods.base.trainable_state` with whole tensors in CPU memory (gathered
    from the shards under FSDP2: every rank must call it)."""
    return {name: _full(tensor).cpu() for name, tensor in trainable_state(model).items()}


def load_full_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into ``model``'s parameters; under FSDP2 each rank keeps its shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            param = params[name]
            if isinstance(param, DTensor):
                tensor = distribute_tensor(tensor.to(param.device, param.dtype), param.device_mesh, param.placements)
            param.copy_(tensor)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state with whole tensors, keyed by parameter name, in CPU memory (all ranks call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, _inner(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of :func:`full_optimizer_state`: each rank keeps the shards of its parameters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, _inner(optimizer), state, options=StateDictOptions(full_state_dict=True))


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """accelerate's ``AcceleratedOptimizer`` holds the torch optimizer the state-dict helpers read."""
    return getattr(optimizer, "optimizer", optimizer)


def gather_for_save(model: nn.Module, main: bool) -> None:
    """Replace FSDP2's shards by whole parameters on the main process, so the method's own
    ``save`` (PEFT, transformers, adapters) writes a normal ``adapter/`` or ``model/``.

    Every rank takes part in the gathers; afterwards the model is for saving only. Shared
    parameters (tied embeddings) stay shared."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for module in model.modules():  # the root stays gathered after a forward; a sharded state's
        if isinstance(module, FSDPModule):  # state_dict hook is then a no-op, and keeps these parameters
            module.reshard()
    whole: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if not isinstance(param, DTensor):
                continue
            if id(param) not in whole:
                whole[id(param)] = nn.Parameter(param.full_tensor().detach(), requires_grad=param.requires_grad)
            if main:
                module._parameters[name] = whole[id(param)]


def _several() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, processes in the group); (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if _several() else (0, 1)


def per_rank(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (each rank's RNG state for a checkpoint); ``[value]`` alone.

    Sent between this launch's own processes, never read from a file."""
    if not _several():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def agree(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over every rank (one all-reduce); unchanged in a single process."""
    if not _several():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
