"""Packs: runs that train together as one batched model.

A PackSpec is a pack's members, each listed once, and what they share: every key of
`RunSpec.pack_key()` (dataset, architecture, batch size, epochs, ...). It is checked once,
when it is made (from a plan, a pack file or a list of specs); the trainer, the engine
and the cost model take it as it is and read the shared keys off it (`pack.batch_size`)
rather than off one member. Learning rate, momentum, weight decay, label noise, seed and
Theorem 1's sampling stay per member (`pack[k]`, or iterate).

A pack's id is a hash of its members' run_ids, so a pack file names exactly the runs it
trains, in any order.
"""
from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence, overload

from rankbias.core.families import LayerTable
from rankbias.core.spec import PACK_KEYS, RunSpec, SpecError


def pack_id(specs: Iterable[RunSpec]) -> str:
    """The id of the pack of these runs (in any order)."""
    ids = sorted(s.run_id for s in specs)
    return hashlib.sha256(",".join(ids).encode()).hexdigest()[:12]


class PackSpec(Sequence[RunSpec]):
    """The members of one pack, checked to train as one: each run listed once (a run
    listed twice would train as two members into one run directory), all sharing
    `RunSpec.pack_key()`. `where` names the pack's source in the error."""

    def __init__(self, members: Iterable[RunSpec], where: str = "pack"):
        members = tuple(members)
        if not members:
            raise SpecError(f"{where}: the pack has no runs; a pack has at least one")
        first: dict[str, int] = {}
        for i, s in enumerate(members):
            if s.run_id in first:
                raise SpecError(f"{where}: run {s.run_id} is listed twice (runs {first[s.run_id]} and {i}); "
                                "a pack lists each run once")
            first[s.run_id] = i
        differ = [k for k in PACK_KEYS if len({getattr(s, k) for s in members}) > 1]
        if differ:
            raise SpecError(f"{where}: the runs of a pack must share {', '.join(PACK_KEYS)}; "
                            f"{', '.join(differ)} {'differs' if len(differ) == 1 else 'differ'}, so they cannot train as one pack")
        self.members: tuple[RunSpec, ...] = members
        self._shared = members[0]

    @classmethod
    def of(cls, specs: Iterable[RunSpec], where: str = "pack") -> PackSpec:
        """`specs` as a PackSpec: itself if it is one (checked when made), else checked now."""
        return specs if isinstance(specs, PackSpec) else cls(specs, where)

    # -- the members ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.members)

    @overload
    def __getitem__(self, i: int) -> RunSpec: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[RunSpec, ...]: ...

    def __getitem__(self, i):
        return self.members[i]

    def __iter__(self) -> Iterator[RunSpec]:
        return iter(self.members)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PackSpec) and self.members == other.members

    def __hash__(self) -> int:
        return hash(self.members)

    def __repr__(self) -> str:
        return f"PackSpec({self.id}: {len(self)} x {self.model} on {self.dataset})"

    @property
    def run_ids(self) -> list[str]:
        return [s.run_id for s in self.members]

    @cached_property
    def id(self) -> str:
        return pack_id(self.members)

    # -- what the members share ----------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        """A key of RunSpec.pack_key(), which every member has equal."""
        if name in PACK_KEYS:
            return getattr(self._shared, name)
        raise AttributeError(f"PackSpec has no attribute {name!r} (the keys its members share: "
                             f"{', '.join(PACK_KEYS)}; per-member values are read off pack[k])")

    @property
    def model(self) -> str:
        return self._shared.model

    def sizes(self) -> tuple[int, int]:
        """(train, test) examples every member sees (RunSpec.sizes)."""
        return self._shared.sizes()

    def layer_table(self) -> LayerTable:
        return self._shared.layer_table()

    def steps_per_epoch(self, n: int | None = None) -> int:
        return self._shared.steps_per_epoch(n)

    def check_batches(self, n: int) -> None:
        self._shared.check_batches(n)

    @property
    def steps(self) -> int:
        """Optimiser steps the pack runs: epochs * steps_per_epoch, which its members share."""
        return self.epochs * self.steps_per_epoch()

    @property
    def theory_batch_sizes(self) -> tuple[int, ...]:
        """Every B* any member measures Theorem 1 at, ascending."""
        return tuple(sorted({b for s in self.members for b in s.theory_batch_sizes}))

    @property
    def theory_batches(self) -> int:
        """The most Theorem 1 batches any member draws at each B*."""
        return max(s.theory_batches for s in self.members)


def make_packs(specs: Iterable[RunSpec], max_pack: int = 64) -> list[PackSpec]:
    """Deduplicate runs by run_id and group them into packs of at most `max_pack`: runs
    with equal `RunSpec.pack_key()`, in run_id order."""
    unique = {s.run_id: s for s in specs}
    groups: dict[tuple, list[RunSpec]] = {}
    for s in sorted(unique.values(), key=lambda s: s.run_id):
        groups.setdefault(s.pack_key(), []).append(s)
    packs = []
    for key in sorted(groups, key=repr):
        members = groups[key]
        for i in range(0, len(members), max_pack):
            packs.append(PackSpec(members[i:i + max_pack], "make_packs"))
    return packs


def load_pack(path: str | Path) -> PackSpec:
    """Read a pack file: JSON or YAML, either a list of specs or {"runs": [...]}."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"pack file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml
        raw = yaml.safe_load(text)
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"pack file {path}: not valid JSON ({e})") from None
    if isinstance(raw, Mapping):
        if "runs" not in raw:
            raise SpecError(f"pack file {path}: expected a list of run specs or a mapping with key 'runs'")
        raw = raw["runs"]
    if not isinstance(raw, list) or not raw:
        raise SpecError(f"pack file {path}: expected a non-empty list of run specs")
    specs = []
    for i, r in enumerate(raw):
        try:
            specs.append(RunSpec.from_dict(r))
        except SpecError as e:
            raise SpecError(f"pack file {path}, run {i}: {e}") from None
    return PackSpec(specs, f"pack file {path}")

