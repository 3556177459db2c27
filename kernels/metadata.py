"""Per-step attention metadata shared by every backend."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Where a step's new tokens live and what each sequence attends to.

    The step's new tokens are a flat batch: sequence ``i`` owns rows
    ``query_start_loc[i]:query_start_loc[i+1]``, which are the last ``query_len``
    positions of its ``seq_len``-token context. Its K/V for all ``seq_len`` tokens are
    found through ``block_tables[i]`` once this step's K/V have been written to
    ``slot_mapping`` (``block_id * block_size + offset`` per new token).
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int
    block_tables_cpu: list[list[int]] = field(default_factory=list)
    _runs: dict[int, list[tuple[int, int]]] = field(default_factory=dict, repr=False)

    def block_runs(self, seq: int) -> list[tuple[int, int]]:
        """Sequence ``seq``'s blocks as runs of consecutive ids: (first id, count).

        Backends read a long run in place as one strided view instead of gathering
        its blocks; computed once per step and shared by every layer.
        """
        runs = self._runs.get(seq)
        if runs is None:
            needed = -(-self.seq_lens_cpu[seq] // self.block_size)
            table = np.asarray(self.block_tables_cpu[seq][:needed], dtype=np.int64)
            breaks = np.flatnonzero(np.diff(table) != 1) + 1
            starts = np.concatenate(([0], breaks))
            ends = np.concatenate((breaks, [len(table)]))
            runs = [(int(table[a]), int(b - a)) for a, b in zip(starts, ends, strict=True)]
            self._runs[seq] = runs
        return runs

    @property
    def num_seqs(self) -> int:
        """Sequences in this step."""
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        """True when every sequence brings exactly one new token."""
        return all(n == 1 for n in self.query_lens_cpu)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Build the tensors for a step from per-sequence Python lists."""
        tables = [list(t) for t in block_tables]  # the step's own copy, unpadded
        slots = _slot_mapping(query_lens, seq_lens, tables, block_size)
        width = max((len(t) for t in tables), default=0)
        padded = np.zeros((len(tables), width), dtype=np.int32)
        for row, table in zip(padded, tables, strict=True):
            row[: len(table)] = table  # one C-level copy per sequence, not per block id
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.from_numpy(padded).to(device),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
            block_size=block_size,
            block_tables_cpu=tables,
        )


def _slot_mapping(
    query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], block_size: int
) -> list[int]:
    slots: list[int] = []
    for n, total, table in zip(query_lens, seq_lens, block_tables, strict=True):
        if len(table) * block_size < total:
            raise ValueError(f"block table of {len(table)} blocks cannot hold {total} tokens")
        for pos in range(total - n, total):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    return slots
