"""Distributed helpers: torchrun environment, process group (gloo on CPU, NCCL on GPU), SyncBN, DDP.

A plain ``python``/``sparse-mim`` launch is a world of one process and needs no process group.

Restarts under ``torchrun --max-restarts=N``: torchrun's agent hosts one TCPStore for its workers
(``TORCHELASTIC_USE_AGENT_STORE=True``, at ``MASTER_ADDR:MASTER_PORT``) and keeps the *same* store
across restarts. torch's ``env://`` init uses it without a per-attempt prefix, so a restarted group
finds the previous group's keys there: gloo reads the dead workers' addresses ("connectFullMesh ...
Connection refused"), NCCL may read an old unique id (pytorch/pytorch#135712). The worker-side
``TORCHELASTIC_RESTART_COUNT`` is no cure on several nodes: each agent counts its own restarts.
So ``init_distributed`` first agrees on a fresh random token with the other workers of this group
(``_group_token``) and hands the process group the agent's store under that token's prefix.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from sparse_mim.engine import convert_sync_batchnorm

__all__ = ["DistInfo", "env_world_size", "init_distributed", "group_store", "shutdown", "wrap_model", "unwrap",
           "GRAD_SYNCS", "average_gradients", "all_reduce_mean", "all_reduce_max", "all_gather_objects", "barrier"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """Number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> DistInfo:
    """Join torchrun's process group if there is one; pick this process's device."""
    world = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        device_id = device if device.type == "cuda" else None
        store = group_store(rank, world)
        if store is None:  # not under torchrun's shared store: torch's env:// init is fine
            dist.init_process_group(backend, device_id=device_id)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, device_id=device_id)
    return DistInfo(rank, world, local_rank, device)


#: How long the workers of one group wait for each other to agree on their token.
GROUP_TIMEOUT = timedelta(minutes=30)


def group_store(rank: int, world: int, timeout: timedelta = GROUP_TIMEOUT) -> Optional[dist.Store]:
    """torchrun's agent store under a prefix that only this group of workers uses, or None when
    the workers do not share the agent's store (no torchrun, or ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``:
    then rank 0 hosts a fresh store each time)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                          is_master=False, timeout=timeout)
    token = _group_token(dist.PrefixStore("sparse_mim/join/", store), rank, world, timeout)
    return dist.PrefixStore(f"sparse_mim/group/{token}/", store)


def _group_token(store: dist.Store, rank: int, world: int, timeout: timedelta, poll: float = 0.01) -> str:
    """A random token that ranks ``0..world-1`` of this group of processes all return.

    ``store`` may hold any keys of earlier groups (same ranks, same store): each key a worker waits
    for contains a fresh random value it knows, so an old key is never mistaken for a new one.
    Rank r > 0 writes a fresh nonce under ``hello/<r>`` and waits for ``reply/<nonce>``; rank 0 draws
    the token, answers every nonce it sees (an old ``hello/<r>`` gets an answer nobody reads) and
    returns once each rank wrote ``ack/<token>/<r>``.
    """
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"hello/{rank}", nonce)
        token = store.get(f"reply/{nonce}").decode()  # waits up to the store's timeout
        store.set(f"ack/{token}/{rank}", "1")
        return token
    token = uuid.uuid4().hex
    answered = {}
    pending = set(range(1, world))
    deadline = time.monotonic() + timeout.total_seconds()
    while pending:
        for r in sorted(pending):
            if store.check([f"ack/{token}/{r}"]):
                pending.discard(r)
            elif store.check([f"hello/{r}"]):
                nonce = store.get(f"hello/{r}").decode()
                if answered.get(r) != nonce:
                    store.set(f"reply/{nonce}", token)
                    answered[r] = nonce
        if pending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank 0 waited {timeout} for rank(s) {sorted(pending)} of {world} to join "
                                   f"the process group (torchrun store {os.environ.get('MASTER_ADDR')}:"
                                   f"{os.environ.get('MASTER_PORT')})")
            time.sleep(poll)
    return token


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


#: How gradients are averaged over processes: ``ddp`` (torch's DDP wrapper, overlapping the
#: all-reduce with backward) or ``allreduce`` (the bare model, every gradient averaged in one flat
#: all-reduce after backward; what a CUDA-graphed encoder needs, since its backward runs as one
#: replayed graph that DDP's per-parameter hooks cannot see into).
GRAD_SYNCS = ("ddp", "allreduce")


def wrap_model(model: nn.Module, info: DistInfo, sync_bn: bool = True, grad_sync: str = "ddp") -> nn.Module:
    """Under several processes: BatchNorms synced across ranks (sparse ones stay sparse) and, with
    ``grad_sync="ddp"``, a DDP wrapper. With ``"allreduce"`` the model stays bare, its parameters and
    buffers are broadcast from rank 0 (as DDP does), and the caller averages the gradients with
    ``average_gradients`` after each backward.

    Call before building the optimizer: SyncBN conversion creates new parameter objects. Use
    ``unwrap`` to reach the model again.
    """
    if grad_sync not in GRAD_SYNCS:
        raise ValueError(f"grad_sync must be one of {', '.join(GRAD_SYNCS)}, got {grad_sync!r}")
    if not info.distributed:
        return model
    if sync_bn:
        model = convert_sync_batchnorm(model)
    if grad_sync == "allreduce":
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)
        return model
    return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)


def average_gradients(params: List[torch.Tensor]) -> None:
    """Replace each gradient by its mean over ranks: one all-reduce per dtype, outside any graph.

    A parameter without a gradient on this rank counts as a zero gradient (every rank must send the
    same tensors); it gets the mean, as under DDP. No-op in a single process."""
    if not _distributed():
        return
    world = dist.get_world_size()
    by_dtype: dict = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks (``value`` itself in a single process)."""
    if not _distributed():
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    if not _distributed():
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def all_gather_objects(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in a single process)."""
    if not _distributed():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _distributed():
        dist.barrier()
