"""What one Train worker trains and evaluates on: `worker_data(...) -> WorkerData`.

- In memory (a 'module:function' data source): every worker loads the data set and a
  DistributedSampler gives each rank a disjoint, seeded shard, the same order again for the same
  epoch after a resume (set_epoch). Validation: each rank evaluates its slice of the split.
- Files (`data.source` names files, training/file_source.py): Ray Train hands each worker its
  shard of the "train" and "val" Ray Datasets (`get_dataset_shard`, equal row counts per worker),
  and batches stream in through a local shuffle buffer reseeded per epoch and rank. A worker holds
  a few blocks at a time, so its memory does not grow with the input. The order within an epoch
  is not reproduced after a resume (Ray Data's streaming order is not deterministic); which rows
  train and which validate is.

Both give the loop the same thing: micro-batches per epoch, train batches per epoch, and
validation batches `(x, y, counted)` where every rank yields the same number of batches (ZeRO-3
gathers parameters inside forward, a collective), padding with uncounted ones where needed.

May import: `cluster`, `training.data`, `training.file_source`; Ray inside functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from cluster.config import TandemConfig
from training.data import ArrayDataset, load_dataset, split
from training.file_source import FileSource

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class WorkerData:
    input_shape: tuple[int, ...]
    num_classes: int
    micro_batches: int  # per epoch on this rank (the same on every rank)
    train_batches: Callable[[int], Iterable[Batch]]  # epoch -> its micro-batches (x, y)
    val_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor, bool]]]  # (x, y, counted)


def worker_data(config: TandemConfig, file_source: FileSource | None, rank: int, world: int) -> WorkerData:
    if file_source is not None:
        return streamed_data(config, file_source, rank, world)
    return in_memory_data(config, rank, world)


def _too_few(config: TandemConfig, rank: int) -> ValueError:
    return ValueError(
        f"rank {rank} has fewer than data.batch_size={config.data.batch_size} training examples; lower data.batch_size or training.workers"
    )


def in_memory_data(config: TandemConfig, rank: int, world: int) -> WorkerData:
    dataset = load_dataset(config)
    train_set, val_set = split(dataset, config.data.val_fraction, config.data.seed)
    tensors = TensorDataset(torch.from_numpy(train_set.x), torch.from_numpy(train_set.y))
    sampler = DistributedSampler(tensors, num_replicas=world, rank=rank, shuffle=True, seed=config.training.seed, drop_last=True)
    loader = DataLoader(tensors, batch_size=config.data.batch_size, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise _too_few(config, rank)

    def train_batches(epoch: int) -> Iterable[Batch]:
        sampler.set_epoch(epoch)
        return loader

    return WorkerData(
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        micro_batches=len(loader),
        train_batches=train_batches,
        val_batches=lambda: _in_memory_val_batches(val_set, config.data.batch_size, rank, world),
    )


def _in_memory_val_batches(val_set: ArrayDataset, batch: int, rank: int, world: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
    """This rank's slice of the validation split; a rank whose slice is short pads with a batch
    that is not counted, so every rank runs the same number of forward passes."""
    shards = np.array_split(np.arange(len(val_set.y)), world)
    mine = shards[rank]
    for b in range(math.ceil(max(len(s) for s in shards) / batch)):
        idx = mine[b * batch : (b + 1) * batch]
        counted = len(idx) > 0
        if not counted:
            idx = shards[0][:1]
        yield torch.from_numpy(val_set.x[idx]), torch.from_numpy(val_set.y[idx]), counted


def streamed_data(config: TandemConfig, source: FileSource, rank: int, world: int) -> WorkerData:
    import ray.train

    batch = config.data.batch_size
    micro_batches = (source.train_rows - source.bad_rows) // world // batch
    if micro_batches == 0:
        raise _too_few(config, rank)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")

    def train_batches(epoch: int) -> Iterator[Batch]:
        for rows in train_shard.iter_torch_batches(
            batch_size=batch,
            drop_last=True,  # every rank gets the same rows, so the same number of full batches
            local_shuffle_buffer_size=max(8 * batch, 1024),
            local_shuffle_seed=config.training.seed * 100_003 + rank * 1009 + epoch,
            dtypes={"x": torch.float32, "y": torch.int64},
            device="cpu",
        ):
            yield rows["x"].reshape(len(rows["y"]), *source.input_shape), rows["y"]

    def val_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
        for rows in val_shard.iter_torch_batches(batch_size=batch, dtypes={"x": torch.float32, "y": torch.int64}, device="cpu"):
            yield rows["x"].reshape(len(rows["y"]), *source.input_shape), rows["y"], True

    return WorkerData(
        input_shape=source.input_shape,
        num_classes=source.num_classes,
        micro_batches=micro_batches,
        train_batches=train_batches,
        val_batches=val_batches,
    )
