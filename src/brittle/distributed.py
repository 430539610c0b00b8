"""Several processes (GPUs, nodes) through ``torch.distributed``, started by a standard launcher
(``accelerate launch``, ``torchrun``): no launcher of our own.

What runs where: every process runs the same stages on the same inputs. The scorer splits the calibration
examples between the processes (process ``r`` of ``w`` takes examples ``r, r + w, r + 2w, ...``) and sums the
fp32 accumulators over all processes before ``|W|`` is multiplied in (``all_reduce``), so every process ends with
the scores of all examples: the same as one process up to fp32 summation order. Process 0 alone writes a stage's
folder and manifest; the others compute into a private folder that is removed, wait for process 0 and read its
record. Fine-tuning is data parallel (:mod:`brittle.finetune.train`: each process takes its share of every
micro-batch, gradients summed before each optimiser step). Generation (:func:`brittle.evaluation.generation.generate`:
the data stage's own answers, every evaluation's answers) is split by whole batches, each seeded as in one process,
and gathered: the answers of one process. Other work (perplexity, zero-shot accuracy, statistics) is repeated by
every process. Several nodes need a run directory on a file system all of them
see.
"""

from __future__ import annotations

import os

import torch


def init_from_env() -> bool:
    """Join the process group a launcher describes (``WORLD_SIZE`` > 1 in the environment, with ``RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``), over NCCL when CUDA is available, else gloo. Returns whether this is a
    multi-process run. Idempotent."""
    if not torch.distributed.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend=backend)
    return True


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def is_main() -> bool:
    """Process 0, or the only process: the one that writes files and logs."""
    return rank() == 0


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def sum_across(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over all processes, in place (identity in a single process). gloo reduces CPU tensors, NCCL
    CUDA ones: a tensor on the other kind of device goes through a temporary copy."""
    if not active():
        return t
    backend = torch.distributed.get_backend()
    wants_cuda = backend == "nccl"
    if (t.device.type == "cuda") == wants_cuda:
        torch.distributed.all_reduce(t)
        return t
    tmp = t.to("cuda" if wants_cuda else "cpu")
    torch.distributed.all_reduce(tmp)
    t.copy_(tmp)
    return t


def gather(obj):
    """Every process's ``obj``, in process order (``[obj]`` in a single process): ``all_gather_object``."""
    if not active():
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def shard(items: list) -> list:
    """This process's share of ``items``: every ``world_size``-th item from index ``rank`` (strided, so that
    items sorted by length give every process a similar load)."""
    return items[rank()::world_size()] if active() else items


__all__ = ["init_from_env", "active", "rank", "world_size", "is_main", "barrier", "sum_across", "gather", "shard"]
