"""The few collective operations lengen needs across processes, through accelerate.

Under ``torchrun`` or ``accelerate launch`` every process runs the same ``lengen run``; the
accelerator knows its rank and the world size. Training: each rank takes its block of the
global batch's rows (DDP averages the gradients, so the update equals one process's on the
whole batch). Evaluation: each rank scores a contiguous block of the evaluation sequences and
:meth:`Dist.gather` reassembles them in sequence order on every rank. Only the main process
writes files and prints. With one process every operation is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    accelerator: Any = None

    @classmethod
    def of(cls, accelerator) -> "Dist":
        if accelerator is None:
            return cls()
        return cls(accelerator.process_index, accelerator.num_processes, accelerator)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def block(self, n: int) -> slice:
        """This rank's contiguous block of ``n`` items (the first ``n % world`` ranks get one
        more), so that concatenating the blocks in rank order gives the items in order."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def reduce_mean(self, values: list[float]) -> list[float]:
        """The mean over ranks of each value (one collective for all of them)."""
        if self.world == 1:
            return list(values)
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return (self.accelerator.reduce(t, reduction="sum") / self.world).tolist()

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()
