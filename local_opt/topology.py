r"""Process groups for several nodes: synchronous inside a node, Local SGD across nodes."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch.distributed as dist

from local_opt._validate import is_int

__all__ = ["NodeGroups", "node_groups"]


class NodeGroups(NamedTuple):
    """The groups :func:`node_groups` builds, and where this rank sits in them."""

    intra: dist.ProcessGroup
    """This node's ranks (for ``DistributedDataParallel``: gradients all-reduced every step)."""
    inter: dist.ProcessGroup
    """The ranks with this rank's local rank, one per node (for ``LocalOptimizer``)."""
    node_rank: int
    local_rank: int
    num_nodes: int
    local_world_size: int


def node_groups(local_world_size: int | None = None, *, backend: str | None = None) -> NodeGroups:
    r"""Build the intra-node and inter-node process groups of a multi-node run.

    Ranks are laid out as ``torchrun`` launches them: node :math:`n` holds the global ranks
    :math:`nL, \dots, nL + L - 1` with :math:`L` = ``local_world_size``. Every node gets an
    *intra* group of its :math:`L` ranks, and every local rank :math:`i` an *inter* group of the
    ranks :math:`i, L + i, 2L + i, \dots` (one per node). Run ``DistributedDataParallel`` over
    ``intra`` (fast links, every step) and :class:`~local_opt.LocalOptimizer` over ``inter``
    (slow links, every ``sync_every`` steps). Since the replicas of a node stay identical,
    averaging local rank :math:`i` across nodes averages the nodes' models.

    A collective: call it on every rank, at the same point, after ``init_process_group``.

    Args:
        local_world_size (int, optional): ranks per node :math:`L` (default: None, torchrun's
            ``LOCAL_WORLD_SIZE`` environment variable).
        backend (str, optional): backend of the new groups (default: None, the world group's).

    Returns:
        NodeGroups: ``(intra, inter, node_rank, local_rank, num_nodes, local_world_size)``.

    Example::

        >>> # torchrun --nnodes 2 --nproc-per-node 4 ... train.py
        >>> dist.init_process_group("nccl")
        >>> groups = node_groups()
        >>> model = DDP(model.cuda(), process_group=groups.intra)
        >>> inner = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> opt = LocalOptimizer(inner, sync_every=8, module=model, process_group=groups.inter)
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("node_groups needs torch.distributed initialized (init_process_group)")
    if local_world_size is None:
        env = os.environ.get("LOCAL_WORLD_SIZE")
        if env is None:
            raise ValueError(
                "Invalid local_world_size: None and LOCAL_WORLD_SIZE is not set (not launched "
                "by torchrun); pass the number of ranks per node"
            )
        local_world_size = int(env) if env.isdigit() else env
    if not is_int(local_world_size) or local_world_size < 1:
        raise ValueError(f"Invalid local_world_size: {local_world_size!r} (expected an int >= 1)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % local_world_size:
        raise ValueError(
            f"Invalid local_world_size: {local_world_size} does not divide the world size {world}"
        )
    size = int(local_world_size)
    node, local = divmod(rank, size)
    env_local = os.environ.get("LOCAL_RANK")
    if env_local is not None and int(env_local) != local:
        raise RuntimeError(
            f"rank {rank} has LOCAL_RANK={env_local}, but node_groups lays ranks out by node "
            f"(local rank {local} with {size} ranks per node): launch with torchrun's default "
            "rank assignment"
        )
    num_nodes = world // size
    intra, _ = dist.new_subgroups_by_enumeration(
        [list(range(n * size, (n + 1) * size)) for n in range(num_nodes)], backend=backend
    )
    inter, _ = dist.new_subgroups_by_enumeration(
        [list(range(i, world, size)) for i in range(size)], backend=backend
    )
    return NodeGroups(intra, inter, node, local, num_nodes, size)
