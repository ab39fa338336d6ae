"""Quick start: Local SGD with adaptive batch sizes on scikit-learn's digits (no download).

    python examples/quickstart.py                                           # one process
    torchrun --standalone --nproc_per_node 2 examples/quickstart.py         # two workers

Prints one line per rank: rounds, final batch size, test accuracy and a parameter checksum
(the same on every rank: the models are averaged once more at the end).
"""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from local_opt import LocalOptimizer, VarianceTest
from samplers import AdaptiveBatchSampler


def load_data(device: torch.device) -> tuple[TensorDataset, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's 8x8 digits, shuffled once: 1500 training samples, 297 test samples."""
    digits = load_digits()
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(0))
    x = (torch.tensor(digits.data, dtype=torch.float32)[order] / 16).to(device)
    y = torch.tensor(digits.target)[order].to(device)
    return TensorDataset(x[:1500], y[:1500]), (x[1500:], y[1500:])


if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: join the other workers
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
device = torch.device("cpu")
if torch.cuda.is_available():
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)

dataset, (test_x, test_y) = load_data(device)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
opt = LocalOptimizer(inner, sync_every=8, module=model)  # averages the models every 8 steps
sampler = AdaptiveBatchSampler(dataset, batch_size=16, max_batch_size=256)  # per worker
loader = DataLoader(dataset, batch_sampler=sampler)
# library defaults, no tuning; optimizer=opt: the learning rate follows the batch size
test = VarianceTest(model, F.cross_entropy, optimizer=opt, max_batch_size=256)

for epoch in range(10):
    sampler.set_epoch(epoch)
    for x, y in loader:
        opt.zero_grad()
        with test.capture(active=opt.will_sync) as cap:  # statistics from this step's backward
            F.cross_entropy(model(x), y).backward()
        opt.step()  # a local step; every 8th also averages the models (a round)
        if opt.synced:  # a round just ended: pooled over the workers, the same size everywhere
            sampler.set_batch_size(test.suggest_from_capture(cap, sampler.batch_size))
opt.sync()  # one more round, so that every worker ends with the averaged model

with torch.no_grad():
    accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
checksum = sum(p.double().sum().item() for p in model.parameters())
rank = dist.get_rank() if dist.is_initialized() else 0
print(f"rank {rank}: rounds {opt.num_syncs}, batch size {sampler.batch_size}, "
      f"test accuracy {accuracy:.3f}, checksum {checksum:.10f}")
if dist.is_initialized():
    dist.destroy_process_group()
