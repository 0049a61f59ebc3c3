"""NAS-SCAM search space: op tables, the 4-node DAG cell and the genotype value."""

from __future__ import annotations

from typing import Mapping, Sequence

from nas_core.search_space.cell import ZERO_OPS, Cell
from nas_core.search_space.genotype import N_SLOTS, Genotype, GenotypeError
from nas_core.search_space.ops import (
    CAM_OPS,
    HIDDEN_CHANNELS,
    N_NODES,
    OP_TABLES,
    SAM_OPS,
    OpSpec,
    edge_list,
    make_op,
    num_edges,
)
from nas_core.search_space.stacked import StackedCell

# the cell implementations by name (``model.impl``): the same function and state_dict, different speed
CELLS: dict[str, type[Cell]] = {cls.impl: cls for cls in (Cell, StackedCell)}
IMPLS = tuple(CELLS)


def create_cell(ops: Mapping[str, OpSpec], c_in: int, dim: int, genotype: Sequence[str] | None = None,
                zero_op: str = "paper", impl: str = "stacked") -> Cell:
    """The cell of implementation ``impl`` (see ``CELLS``); the other arguments as ``Cell``'s."""
    if impl not in CELLS:
        raise ValueError(f"impl: {impl!r} is not one of {', '.join(IMPLS)}")
    return CELLS[impl](ops, c_in, dim, genotype=genotype, zero_op=zero_op)


__all__ = [
    "CAM_OPS", "CELLS", "HIDDEN_CHANNELS", "IMPLS", "N_NODES", "N_SLOTS", "OP_TABLES", "SAM_OPS", "ZERO_OPS",
    "Cell", "Genotype", "GenotypeError", "OpSpec", "StackedCell", "create_cell", "edge_list", "make_op", "num_edges",
]
