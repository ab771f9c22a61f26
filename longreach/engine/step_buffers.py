"""Persistent step inputs: tensors the engine fills in place every step instead of building them from lists.

Two pieces, as in vLLM's GPU input batch:
- `Staging`: named flat buffers reused across steps. A layout fills a host view (pinned memory on CUDA) and asks
  for the same values on the device, one asynchronous copy into a device buffer that is also reused. Before the
  host views are written again, the previous step's copies are waited for (a CUDA event), so a copy never reads
  half-rewritten memory. On CPU the host view *is* the device tensor: nothing is copied.
- `BlockTableRows`: every running request's block table as one row of a persistent int32 table. A row is only
  appended to when its request's table grows (one new block every `block_size` decoded tokens), so a decode
  step costs O(batch), not O(batch x blocks held), on the host. Rows are freed when the KV manager frees the
  request's blocks (finish, abort, preemption); a row whose request's table was replaced is rebuilt.

Buffers (and the table's rows and columns) grow by doubling when a step needs more; they never shrink.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from longreach.kvcache.block_pool import KVCacheManager


class Staging:
    """Named flat host (pinned on CUDA) and device buffers, reused every step. Host buffers are filled through
    numpy views (a numpy slice costs far less than a tensor op on the host)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.copies = self.device.type != "cpu"
        self.host: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
        self.dev: dict[str, torch.Tensor] = {}
        self._copied = None  # a CUDA event after the last step's copies
        self._views: dict[str, tuple] = {}  # name -> (buffer, shape, its host view), reused while unchanged

    def begin(self) -> None:
        """Called before a step writes host views: the previous step's copies have read them by then."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def array(self, name: str, n: int, dtype: torch.dtype) -> np.ndarray:
        """The first `n` elements of host buffer `name`, as a writable numpy view (contents stale)."""
        entry = self.host.get(name)
        if entry is None or entry[0].numel() < n or entry[0].dtype != dtype:
            size = max(n, 2 * entry[0].numel() if entry is not None else 0, 16)
            pin = self.copies and torch.cuda.is_available()
            with torch.inference_mode(False):  # written in place in and out of inference mode
                buf = torch.empty(size, dtype=dtype, pin_memory=pin)
            entry = self.host[name] = (buf, buf.numpy())
        return entry[1][:n]

    def host_view(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous host tensor of `shape`, the front of buffer `name` (its contents are stale)."""
        n = math.prod(shape)
        self.array(name, n, dtype)
        return self.host[name][0][:n].view(shape)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The front of host buffer `name` (already filled through `array`) as a tensor of `shape`, on the
        device: the host memory itself on CPU, else copied into the reused device buffer `name`."""
        buf = self.host[name][0]
        cached = self._views.get(name)
        if cached is not None and cached[0] is buf and cached[1] == shape:
            host = cached[2]  # the same view as last step: slicing a tensor costs more than this lookup
        else:
            host = buf[: math.prod(shape)].view(shape)
            self._views[name] = (buf, shape, host)
        if not self.copies:
            return host
        n = host.numel()
        dev = self.dev.get(name)
        if dev is None or dev.numel() < n or dev.dtype != buf.dtype:
            with torch.inference_mode(False):
                dev = self.dev[name] = torch.empty(buf.numel(), dtype=buf.dtype, device=self.device)
        out = dev[:n].view(shape)
        out.copy_(host, non_blocking=True)
        return out

    def to_device(self, name: str, host: torch.Tensor) -> torch.Tensor:
        """`host` (a view from `host_view` of buffer `name`) on the device."""
        return self.tensor(name, tuple(host.shape))

    def end(self) -> None:
        """Called once a step's copies are enqueued."""
        if self.copies and self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()


class BlockTableRows:
    """Running requests' block tables as rows of one persistent int32 host table (see the module docstring)."""

    def __init__(self, kv_manager: KVCacheManager, num_rows: int = 16):
        self.kv = kv_manager
        self._set_table(torch.zeros(num_rows, 16, dtype=torch.int32))
        self.row_of: dict[str, int] = {}
        self.num_synced = [0] * num_rows  # table entries written per row
        self.source: list[list | None] = [None] * num_rows  # the KV manager's list each row mirrors
        self.free_rows = list(range(num_rows - 1, -1, -1))
        previous = kv_manager.on_free
        if previous is None:
            kv_manager.on_free = self.release
        else:  # chain: the KV manager calls one hook

            def on_free(request_id: str) -> None:
                previous(request_id)
                self.release(request_id)

            kv_manager.on_free = on_free

    def release(self, request_id: str) -> None:
        row = self.row_of.pop(request_id, None)
        if row is not None:
            self.num_synced[row], self.source[row] = 0, None
            self.free_rows.append(row)

    def _row(self, request_id: str) -> int:
        row = self.row_of.get(request_id)
        if row is None:
            if not self.free_rows:
                self._add_rows()
            row = self.row_of[request_id] = self.free_rows.pop()
        return row

    def sync(self, request_ids: list[str]) -> tuple[list[int], int]:
        """Rows of these requests, each brought up to date with its block table; and the widest table."""
        rows, width = [], 1
        for request_id in request_ids:
            row = self._row(request_id)
            blocks = self.kv.tables[request_id]
            start = self.num_synced[row] if self.source[row] is blocks else 0
            if len(blocks) < start:
                start = 0
            if len(blocks) > start:
                if len(blocks) > self.table.shape[1]:
                    self._widen(len(blocks))
                self.array[row, start : len(blocks)] = [
                    0 if b is None else b.block_id for b in blocks[start:]
                ]
            self.num_synced[row], self.source[row] = len(blocks), blocks
            rows.append(row)
            width = max(width, len(blocks))
        return rows, width

    def _add_rows(self) -> None:
        num_rows, width = self.table.shape
        with torch.inference_mode(False):
            self._set_table(torch.cat([self.table, torch.zeros(num_rows, width, dtype=torch.int32)]))
        self.num_synced += [0] * num_rows
        self.source += [None] * num_rows
        self.free_rows = list(range(2 * num_rows - 1, num_rows - 1, -1)) + self.free_rows

    def _widen(self, width: int) -> None:
        with torch.inference_mode(False):
            new = torch.zeros(self.table.shape[0], max(width, 2 * self.table.shape[1]), dtype=torch.int32)
            new[:, : self.table.shape[1]] = self.table
        self._set_table(new)

    def _set_table(self, table: torch.Tensor) -> None:
        self.table, self.array = table, table.numpy()  # (rows, width) int32 and its numpy view
