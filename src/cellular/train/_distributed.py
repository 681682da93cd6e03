"""Gathering a minibatch across distributed ranks, with gradients, for the contrastive terms."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from cellular.dataloaders import distributed_world


class _GatherWithGradient(torch.autograd.Function):
    """``all_gather`` whose backward hands every rank the summed gradient of its own rows.

    Implemented with ``all_reduce`` (supported by every backend, gloo included) rather than reduce-scatter.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        world_size, rank = distributed_world()
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def _gather_plain(tensor: Tensor) -> Tensor:
    world_size, _ = distributed_world()
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_minibatch(z: Tensor, labels: Tensor, batches: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The global minibatch: every rank's embeddings (with gradients), labels and batches, in rank order.

    Every rank then computes the same loss on the same global minibatch. The backward pass sums each row's gradient
    over the ranks (``N`` identical copies of the global loss's gradient) and DDP averages parameter gradients over
    the ranks, so ``N`` processes follow exactly the gradient of the one-process loss on the concatenated minibatch.
    Outside distributed training (or with one rank) the inputs are returned unchanged.

    Parameters
    ----------
    z
        This rank's ``(n, n_latent)`` embeddings; every rank must hold the same ``n``.
    labels, batches
        This rank's label and batch codes.
    """
    world_size, _ = distributed_world()
    if world_size == 1:
        return z, labels, batches
    return _GatherWithGradient.apply(z), _gather_plain(labels), _gather_plain(batches)
