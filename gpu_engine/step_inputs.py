"""Moving a step's host arrays to the device and its results back without blocking the host."""

from __future__ import annotations

import numpy as np
import torch



def padded_tables(tables: list[list[int]], width: int | None = None) -> np.ndarray:
    """[S, width] int32 block tables, padded with block 0."""
    width = width or max(len(t) for t in tables)
    out = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return out


class InputBuilder:
    """Moves a step's host arrays to the device and its results back, without blocking the host.

    On a GPU every array goes through pinned staging buffers that are reused every other step
    (two slots: the step being prepared and the one in flight), so no step allocates pinned memory
    (cudaHostAlloc can stall the host until the GPU is idle, defeating the overlap)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffers: list[dict[torch.dtype, torch.Tensor]] = [{}, {}]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._slot = 0
        self._used: dict[torch.dtype, int] = {}

    def begin_step(self) -> None:
        """Switch to the other staging slot; its last use (two steps ago) must be finished."""
        if not self.pinned:
            return
        self._slot ^= 1
        event = self._events[self._slot]
        if event is not None:
            event.synchronize()
        self._used = {}

    def end_step(self) -> None:
        """Mark the slot busy until the GPU has done every copy enqueued so far."""
        if self.pinned:
            event = torch.cuda.Event()
            event.record()
            self._events[self._slot] = event

    def _stage(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """numel elements of this slot's pinned buffer for dtype (grown by doubling when short)."""
        buffers = self._buffers[self._slot]
        start = self._used.get(dtype, 0)
        buf = buffers.get(dtype)
        if buf is None or start + numel > buf.numel():
            if start:  # earlier views of this step live in the old buffer: keep it, start a new one
                start = 0
                self._used = {k: v for k, v in self._used.items() if k != dtype}
            size = max(1 << 16, 2 * (start + numel), 0 if buf is None else buf.numel())
            buf = buffers[dtype] = torch.empty(size, dtype=dtype, pin_memory=True)
        self._used[dtype] = start + numel
        return buf[start : start + numel]

    def upload(self, array: np.ndarray | list, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = torch.from_numpy(array) if isinstance(array, np.ndarray) else torch.tensor(array, dtype=dtype)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        if not self.pinned:
            return t.to(self.device)
        staged = self._stage(t.dtype, t.numel())
        staged.copy_(t.reshape(-1))
        return staged.to(self.device, non_blocking=True).view(t.shape)

    def download(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of a device tensor, valid once the step's event has fired."""
        if not self.pinned:
            return t
        staged = self._stage(t.dtype, t.numel()).view(t.shape)
        staged.copy_(t, non_blocking=True)
        return staged


    def upload_into(self, dst: torch.Tensor, array: np.ndarray) -> None:
        """Copy a host array into an existing device tensor of the same size (a graph's input)."""
        t = torch.from_numpy(array)
        if not self.pinned:
            dst.copy_(t.reshape(dst.shape))
            return
        staged = self._stage(t.dtype, t.numel())
        staged.copy_(t.reshape(-1))
        dst.copy_(staged.view(dst.shape), non_blocking=True)
