"""NAS-SCAM search space: op tables, the 4-node DAG cell and the genotype value."""

from nas_core.search_space.cell import IMPLS, ZERO_OPS, Cell
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

__all__ = [
    "CAM_OPS", "HIDDEN_CHANNELS", "IMPLS", "N_NODES", "N_SLOTS", "OP_TABLES", "SAM_OPS", "ZERO_OPS",
    "Cell", "Genotype", "GenotypeError", "OpSpec", "edge_list", "make_op", "num_edges",
]
