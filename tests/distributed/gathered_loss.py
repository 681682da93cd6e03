"""Two gloo ranks compute the CELLULAR loss on their halves of one minibatch; rank 0 saves the loss and gradients.

Run by tests/test_train.py: ``python gathered_loss.py OUT_FILE``. The gradients are averaged over the ranks as DDP
does, so they can be compared with one process's gradients on the whole minibatch.
"""

import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scvi import REGISTRY_KEYS

from cellular.module import CellularModule
from cellular.train import CellularTrainingPlan

WORLD_SIZE = 2


def global_minibatch(n_cells: int = 64, n_genes: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        REGISTRY_KEYS.X_KEY: torch.rand(n_cells, n_genes, generator=generator) * 3,
        REGISTRY_KEYS.LABELS_KEY: torch.randint(0, 4, (n_cells,), generator=generator),
        REGISTRY_KEYS.BATCH_KEY: torch.randint(0, 3, (n_cells,), generator=generator),
    }


def plan(seed: int = 0) -> CellularTrainingPlan:
    torch.manual_seed(seed)
    targets = torch.rand(4, 4)
    module = CellularModule(40, 4, 3, n_latent=8, dropout_rate=0.0, centroid_targets=(targets + targets.T) / 2)
    return CellularTrainingPlan(module, lr=1e-3, weight_decay=0.0, warmup_steps=1, total_steps=10)


def run(rank: int, out_file: str, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    training_plan = plan()
    batch = global_minibatch()
    share = batch[REGISTRY_KEYS.X_KEY].shape[0] // WORLD_SIZE
    local = {key: value[rank * share : (rank + 1) * share] for key, value in batch.items()}
    loss = training_plan(local).loss
    loss.backward()
    gradients = {}
    for name, parameter in training_plan.module.named_parameters():
        grad = parameter.grad.clone()
        dist.all_reduce(grad)
        gradients[name] = grad / WORLD_SIZE
    if rank == 0:
        torch.save({"loss": loss.detach(), "gradients": gradients}, out_file)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1], sys.argv[2]), nprocs=WORLD_SIZE, join=True)
