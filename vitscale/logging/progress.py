"""The progress bar of ``train.progress`` (rank 0 only): steps done, the last logged loss and images per second."""
from __future__ import annotations

from typing import Optional

from tqdm import tqdm


class Progress:
    """A tqdm bar over the run's optimizer steps, or nothing when disabled (other ranks, ``train.progress=false``)."""

    def __init__(self, enabled: bool, total: int, initial: int, name: str):
        self.bar = tqdm(total=total, initial=initial, desc=name, dynamic_ncols=True) if enabled else None

    def update(self, step: int, record: Optional[dict] = None) -> None:
        """Move to ``step`` (back, after a rollback to a checkpoint) and show ``record``'s loss and rate."""
        if self.bar is None:
            return
        if record is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['samples_per_s']:.0f}")
        if step < self.bar.n:  # a rollback went back to the checkpoint's step
            self.bar.n = step
            self.bar.refresh()
        else:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
