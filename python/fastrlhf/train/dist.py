"""Several processes on PyTorch's own engine: torch.distributed + DistributedDataParallel (docs/distributed.md).

    torchrun --nproc_per_node 2 -m fastrlhf sft --config configs/sft_arithmetic.toml

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT; `setup` joins that process group (nccl for
CUDA, gloo for the CPU) and every helper here then works across the ranks. Without those variables (or
with WORLD_SIZE=1) no process group is made, and every helper is the identity on one process: a run is
the same, to the bit, as one that never imported this module."""

from __future__ import annotations

import gc
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from fastrlhf.io import checkpoint


def launched() -> bool:
    """True in a process torchrun started with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto", threads: int = 0) -> torch.device:
    """This rank's device for train.device ('auto', 'cpu', 'cuda'), joining torchrun's process group on
    the first call. Under torchrun a CUDA device is always cuda:LOCAL_RANK (one GPU per process)."""
    if threads:
        torch.set_num_threads(threads)
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise ValueError(
            f"train.device={device} but no CUDA device is usable here (torch {torch.__version__}); "
            "use train.device=cpu or auto"
        )
    if not launched():
        return torch.device("cuda" if device == "auto" and cuda else ("cpu" if device == "auto" else device))
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if cuda else "gloo", device_id=dev if cuda else None)
    return dev


def active() -> bool:
    """True when there is a process group of more than one rank."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that logs, prints and writes checkpoints."""
    return rank() == 0


def barrier() -> None:
    if active():
        tdist.barrier()


def cleanup() -> None:
    """Leave the process group (end of a command); a no-op without one. Drop every DDP-wrapped model
    first: a DDP wrapper that outlives this call destroys the group when it dies, holding the GIL, while
    gloo's worker thread may need the GIL to free a finished collective's tensors, and the process hangs
    (pytorch#56297). gc.collect() frees the wrappers only cyclic garbage still holds."""
    if tdist.is_available() and tdist.is_initialized():
        gc.collect()
        tdist.destroy_process_group()


def _comm_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if tdist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def all_sum(x: Tensor) -> Tensor:
    """x summed over the ranks (a new tensor on x's device); x itself on one process."""
    if not active():
        return x
    y = x.detach().to(_comm_device(), copy=True)
    tdist.all_reduce(y)
    return y.to(x.device)


def all_max(x: Tensor) -> Tensor:
    if not active():
        return x
    y = x.detach().to(_comm_device(), copy=True)
    tdist.all_reduce(y, op=tdist.ReduceOp.MAX)
    return y.to(x.device)


def gather_cat(parts: list[Tensor]) -> Tensor:
    """torch.cat(parts) of every rank, in rank order, on the CPU (for evaluation results of any length);
    torch.cat(parts) on one process. A rank may hold no parts."""
    if not active():
        return torch.cat(parts)
    everyone: list[list[Tensor] | None] = [None] * world_size()
    tdist.all_gather_object(everyone, [p.cpu() for p in parts])
    return torch.cat([p for rank_parts in everyone for p in rank_parts or []])


def any_rank(flag: bool) -> bool:
    """True when flag is True on some rank: a decision every rank must take alike (stop at a deadline)."""
    return bool(all_max(torch.tensor(float(flag)))) if active() else flag


def mean_floats(values: dict[str, float], maxed: tuple[str, ...] = ()) -> dict[str, float]:
    """Each value averaged over the ranks (max for the keys in `maxed`) in two small all-reduces;
    the dict itself on one process. Means of per-rank means are global means when the ranks hold equal
    shares (the trainers make sure of it)."""
    if not active():
        return values
    keys = list(values)
    x = torch.tensor([values[k] for k in keys], dtype=torch.float64)  # (K,)
    mean, top = all_sum(x) / world_size(), all_max(x)
    return {k: float(top[i] if k in maxed else mean[i]) for i, k in enumerate(keys)}


def mean_float(x: float) -> float:
    return mean_floats({"x": x})["x"]


def save_checkpoint(run_dir: str | Path, step: int, **kwargs: Any) -> Path:
    """io.checkpoint.save_checkpoint under torchrun: every rank calls this, rank 0 writes (the weights are
    the same on every rank, and so are the RNG streams that resume needs, see docs/distributed.md), and
    the others go on (and may read the checkpoint) only once it is complete."""
    if is_main():
        checkpoint.save_checkpoint(run_dir, step, **kwargs)
    barrier()
    return Path(run_dir) / f"step_{step:07d}"


def from_main(make: Callable[[], Any]) -> Any:
    """make() run on rank 0 and sent (pickled) to the others: for results that need not be identical
    when made twice (a trained tokenizer); make() itself on one process."""
    if not active():
        return make()
    box = [make() if is_main() else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def check_divides(name: str, n: int) -> None:
    """ValueError unless every rank can take an equal share of n items."""
    if n % world_size():
        raise ValueError(f"{name} ({n}) must be a multiple of the number of processes ({world_size()})")


def shard(n: int) -> slice:
    """This rank's rows [r * n / W, (r + 1) * n / W) of a global batch of n (check_divides first)."""
    b = n // world_size()
    return slice(rank() * b, (rank() + 1) * b)


def stream_seed(seed: int, stream: str, step: int) -> int:
    """A seed for random stream `stream` at `step` on this rank: a resumed run re-derives the same one."""
    digest = hashlib.sha256(f"{seed}/{stream}/{step}/{rank()}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def wrap(model: nn.Module) -> nn.Module:
    """The model wrapped in DistributedDataParallel (gradients averaged over the ranks in backward,
    weights broadcast from rank 0 now); the model itself on one process. Call the wrapper's forward."""
    if not active():
        return model
    dev = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)


class _Call(nn.Module):
    """forward(fn, *args) = fn(*args): lets DDP wrap a computation that is not one module's forward (several
    submodules, methods such as GPT.hidden) so that its backward still averages the gradients."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


def wrap_call(module: nn.Module) -> Callable[..., Any]:
    """call(fn, *args) that runs fn(*args) (which must use `module`'s parameters) as one DDP forward;
    a plain call on one process."""
    if not active():
        return lambda fn, *args: fn(*args)
    # no device_ids: the arguments are already on the device, DDP need not copy them (nor the closure's)
    return DistributedDataParallel(_Call(module))
