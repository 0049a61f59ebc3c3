"""The searched architecture as a frozen, validated, JSON round-trippable value of op *names*.

Public JSON format (version 1)::

    {"format": 1, "combine": "parallel"|"serial", "search": "synchronous"|"shared",
     "sam": [8 lists of 6 SAM op names], "cam": [8 lists of 6 CAM op names]}

Slot order: 0-3 down path shallow -> deep, 4-7 up path deep -> shallow (method.md section 2).
Edge order: that of ``ops.edge_list()``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from nas_core.search_space.ops import N_NODES, OP_TABLES, num_edges

FORMAT_VERSION = 1
# 4 down + 4 up attention slots of the depth-4 U-Net
N_SLOTS = 8
COMBINES = ("parallel", "serial")
SEARCHES = ("synchronous", "shared")
_KEYS = ("format", "combine", "search", "sam", "cam")


class GenotypeError(ValueError):
    """A genotype (or its JSON) is invalid; the message names the slot, edge, op or file."""


def _check_cells(kind: str, value: Any) -> tuple[tuple[str, ...], ...]:
    table = OP_TABLES[kind]
    n_edges = num_edges(N_NODES)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise GenotypeError(f"{kind}: expected {N_SLOTS} lists of {n_edges} op names, got {value!r}")
    if len(value) != N_SLOTS:
        raise GenotypeError(f"{kind}: expected {N_SLOTS} slots, got {len(value)}")
    out = []
    for s, slot in enumerate(value):
        if isinstance(slot, (str, bytes)) or not hasattr(slot, "__len__"):
            raise GenotypeError(f"{kind} slot {s}: expected a list of {n_edges} op names, got {slot!r}")
        if len(slot) != n_edges:
            raise GenotypeError(f"{kind} slot {s}: expected {n_edges} edges, got {len(slot)}")
        for e, name in enumerate(slot):
            # a list or dict here is not hashable: name it instead of failing with a TypeError
            if not isinstance(name, str) or name not in table:
                raise GenotypeError(
                    f"{kind} slot {s} edge {e}: unknown op {name!r}; valid: {', '.join(table)}"
                )
        out.append(tuple(slot))
    return tuple(out)


@dataclass(frozen=True)
class Genotype:
    """combine + search mode + per-slot op names for NAS-SAM (``sam``) and NAS-CAM (``cam``)."""

    combine: str
    search: str
    sam: tuple[tuple[str, ...], ...]
    cam: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if self.combine not in COMBINES:
            raise GenotypeError(f"combine: {self.combine!r} is not one of {', '.join(COMBINES)}")
        if self.search not in SEARCHES:
            raise GenotypeError(f"search: {self.search!r} is not one of {', '.join(SEARCHES)}")
        # lists are accepted and frozen into tuples so the value is hashable and immutable
        object.__setattr__(self, "sam", _check_cells("sam", self.sam))
        object.__setattr__(self, "cam", _check_cells("cam", self.cam))
        if self.search == "shared":
            for kind in ("sam", "cam"):
                cells = getattr(self, kind)
                for s, slot in enumerate(cells):
                    if slot != cells[0]:
                        raise GenotypeError(
                            f"shared genotype: {kind} slot {s} {list(slot)} differs from slot 0 {list(cells[0])}"
                        )

    # ---- JSON ----
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "combine": self.combine,
            "search": self.search,
            "sam": [list(s) for s in self.sam],
            "cam": [list(s) for s in self.cam],
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, data: str | Mapping[str, Any]) -> "Genotype":
        """Parse JSON text or an already-decoded dict in the public format."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise GenotypeError(f"genotype is not valid JSON: {exc}") from None
            except RecursionError:  # "[[[[..." deeper than the parser's stack; a genotype is 3 levels deep
                raise GenotypeError("genotype JSON is nested far too deeply (a genotype is 3 levels deep: "
                                    "an object of lists of lists of op names)") from None
        if not isinstance(data, Mapping):
            raise GenotypeError(f"genotype JSON must be an object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise GenotypeError(f"genotype: unknown key {unknown[0]!r}; valid keys: {', '.join(_KEYS)}")
        missing = [k for k in _KEYS if k not in data]
        if missing:
            raise GenotypeError(f"genotype: missing key {missing[0]!r}")
        if data["format"] != FORMAT_VERSION:
            raise GenotypeError(f"genotype: format {data['format']!r} is not supported; expected {FORMAT_VERSION}")
        return cls(combine=data["combine"], search=data["search"], sam=data["sam"], cam=data["cam"])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Genotype":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"genotype file {path} does not exist")
        try:
            return cls.from_json(path.read_text())
        except GenotypeError as exc:
            raise GenotypeError(f"genotype file {path}: {exc}") from None

    # ---- convenience ----
    @classmethod
    def uniform(cls, combine: str, search: str, sam_op: str, cam_op: str) -> "Genotype":
        """Every edge of every slot the same op (tests, smoke runs)."""
        e = num_edges(N_NODES)
        return cls(combine, search, ((sam_op,) * e,) * N_SLOTS, ((cam_op,) * e,) * N_SLOTS)

    @classmethod
    def random(cls, combine: str, search: str, seed: int) -> "Genotype":
        """A genotype drawn uniformly from the search space: per slot and edge one op of that module's
        candidates (Zero included, as the search's argmax may pick it), each with equal chance; a
        ``shared`` genotype draws one cell per module kind for all slots. The architecture control of
        Li & Talwalkar (UAI 2019) and Yu et al. (ICLR 2020); the same ``seed`` gives the same genotype
        on every machine (numpy's PCG64)."""
        import numpy as np

        rng = np.random.default_rng([int(seed), 20200904])  # a stream apart from the run's own seed use
        e = num_edges(N_NODES)
        n_cells = 1 if search == "shared" else N_SLOTS

        def draw(kind: str) -> tuple[tuple[str, ...], ...]:
            names = list(OP_TABLES[kind])
            cells = tuple(tuple(names[i] for i in rng.integers(0, len(names), size=e)) for _ in range(n_cells))
            return cells * N_SLOTS if search == "shared" else cells

        sam = draw("sam")
        return cls(combine, search, sam, draw("cam"))
