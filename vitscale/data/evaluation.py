"""The evaluation stream: one pass over the shards, eval transform, every sample on exactly one rank."""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import signal
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitscale.data.tario import ShardError, image_and_label, iter_shard, label_ext
from vitscale.data.transforms import DEFAULT_MAX_PIXELS, EvalTransform, decode

log = logging.getLogger("vitscale.data")


def worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decode/resize per sample; workers already run in parallel
    # Preemption signals reach every process of a job (scancel, Slurm, the deepspeed launcher's process-tree
    # terminate): the trainer answers them with a checkpoint at the next step boundary, but a worker killed by one
    # first stopped the rank ("worker killed") without it. Workers end with the trainer, whatever ends it: see
    # _end_leftover_workers.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


@atexit.register
def _end_leftover_workers() -> None:
    """At exit, SIGKILL the DataLoader workers still alive (a run ending on an uncaught error keeps its loader, and
    so its workers, referenced by the traceback). multiprocessing's own exit hook SIGTERMs daemonic children and
    then joins them, and the workers ignore SIGTERM (worker_init): the join never returned. Registered after
    multiprocessing's hook, so it runs before it."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


class _EvalStream(IterableDataset):
    """One pass; sample i of the concatenated shards goes to rank i % world_size, then to that rank's worker
    j % num_workers (j = index among the rank's samples). Shards are streamed, never held whole."""

    def __init__(self, urls, batch_size, img_size, rank, world_size, label_key="cls",
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, view: EvalTransform = EvalTransform()):
        self.urls, self.batch_size, self.img_size, self.view = list(urls), batch_size, img_size, view
        self.rank, self.world_size, self.label_key, self.max_pixels = rank, world_size, label_key, max_pixels

    def _mine(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        i = j = 0
        for url in self.urls:
            for sample in iter_shard(url, label_ext(self.label_key)):
                if isinstance(sample, ShardError):
                    log.warning("vitscale.data: eval shard %s unreadable after %d samples: %s", url, sample.read,
                                sample.message)
                    continue
                mine = i % self.world_size == self.rank
                i += 1
                if mine:
                    j += 1
                    if (j - 1) % nw == wid:
                        yield sample

    def __iter__(self):
        buf = []
        for sample in self._mine():
            try:
                data, label = image_and_label(sample, self.label_key)
                img = self.view(decode(data, self.max_pixels), self.img_size)
            except Exception as e:
                log.warning("vitscale.data: skipping bad eval sample %s in %s: %s", sample["__key__"],
                            sample["__url__"], e)
                continue
            buf.append((sample["__key__"], img, label))
            if len(buf) == self.batch_size:
                yield self._collate(buf)
                buf = []
        if buf:
            yield self._collate(buf)

    @staticmethod
    def _collate(items):
        keys, imgs, labels = zip(*items)
        return {"image": torch.stack(imgs), "label": torch.tensor(labels, dtype=torch.int64), "key": list(keys)}


def build_eval_loader(urls: Sequence[str], *, batch_size: int, img_size: int, rank: int, world_size: int,
                      num_workers: int = 0, label_key: str = "cls",
                      max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, view: EvalTransform = EvalTransform()
                      ) -> DataLoader:
    """Finite, one pass, eval transform; across ranks every sample is visited exactly once. Batches as in
    training without ``stream`` (the last one may be smaller; a rank may get none)."""
    urls = list(urls)
    if not urls:
        raise ValueError("no evaluation shards")
    if batch_size < 1:  # 0 never filled a batch: the whole split came as one, at the end
        raise ValueError(f"evaluation batch size must be >= 1, got {batch_size}")
    label_ext(label_key)
    stream = _EvalStream(urls, batch_size, img_size, rank, world_size, label_key, max_pixels, view)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      pin_memory=torch.cuda.is_available(), worker_init_fn=worker_init,
                      generator=torch.Generator().manual_seed(0))
