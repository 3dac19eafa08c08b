"""Distributed training from the outside: torchrun + DDP by default, FSDP2 opt-in.

Models know nothing about parallelism (as in torchtitan): the trainer asks
`wrap_model` for the module to call, keeps the raw model for saving, and uses
`DistEnv` for rank, barriers and gradient-sync control. Under `torchrun` the
environment variables RANK / WORLD_SIZE / LOCAL_RANK select everything; without
them this is a single process and every helper is a no-op.

Memory state of stateful models (DNC, RMT/ARMT) is per rank: each rank reads
its own stream rows and carries its own state; state tensors never pass
through a collective, so nothing averages them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from memlm.types import Collectives


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls) -> DistEnv:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device = torch.device("cpu")
            backend = "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return cls(rank, world, local, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()

    def no_sync(self, model: nn.Module, last: bool):
        """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
        if self.world_size <= 1 or last:
            return contextlib.nullcontext()
        if hasattr(model, "no_sync"):  # DDP
            return model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2

            @contextlib.contextmanager
            def _fsdp_no_sync():
                model.set_requires_gradient_sync(False)
                try:
                    yield
                finally:
                    model.set_requires_gradient_sync(True)

            return _fsdp_no_sync()
        return contextlib.nullcontext()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size <= 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size


class TorchCollectives(Collectives):
    """`Collectives` over the default torch.distributed process group."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(tensor, src)
        return tensor


def attach_collectives(model: nn.Module, env: DistEnv) -> None:
    """Give a multi-process run's model its collectives and tell DDP what to leave alone.

    The model stays free of torch.distributed: it reduces through `model.collectives`
    and names its per-rank buffers in `rank_local_state()`, which become DDP's ignore
    list here (DDP would otherwise overwrite them with rank 0's copy every forward).
    """
    if env.world_size <= 1:
        return
    model.collectives = TorchCollectives(env.world_size)
    local = list(model.rank_local_state()) if hasattr(model, "rank_local_state") else []
    if local:
        model._ddp_params_and_buffers_to_ignore = local


def wrap_model(model: nn.Module, env: DistEnv, fsdp: bool = False,
               compile: bool = False) -> nn.Module:
    """The module the trainer calls: maybe compiled, then DDP- or FSDP2-wrapped."""
    wrapped: nn.Module = model
    if env.world_size > 1:
        attach_collectives(model, env)
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            # shard every block (children of the model's ModuleLists), then the root
            for module in list(model.modules()):
                if isinstance(module, nn.ModuleList):
                    for block in module:
                        fully_shard(block)
            fully_shard(model)
            wrapped = model
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            device_ids = [env.local_rank] if env.device.type == "cuda" else None
            wrapped = DDP(model, device_ids=device_ids)
    if compile:
        wrapped = torch.compile(wrapped)
    return wrapped


# ----- full (unsharded) state for checkpoints ---------------------------------------------
# Checkpoints are always written unsharded by rank 0, so a run trained with FSDP2 on N
# processes resumes on any number of processes (or none) and loads with `memlm.load`.


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """Model state dict with whole tensors (collective under FSDP: call on every rank)."""
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool):
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state,
                              fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor], fsdp: bool) -> None:
    if not fsdp:
        model.load_state_dict(state, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True,
                                                                strict=False))
