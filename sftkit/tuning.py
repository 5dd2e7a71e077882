"""Tune a composition's language-SFT weights (and a merge's density D) on a small labelled dev set.

Every trial applies the plan's SFTs to one θ0 in memory, scores it and reverts them. Reverting is exact in
sftkit (``SparseFineTuning.revert`` restores the overwritten entries bit for bit), so each trial scores
exactly the model ``compose`` builds with its values, and no directory is written per trial. The score is
the caller's (``sftkit.training.scorer`` reads and tokenises the dev set once): composition and
training stay separate jobs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sftkit.compose import prepare
from sftkit.composition_plan import Part, Plan, plan
from sftkit.errors import BadInputError
from sftkit.merging import Merge
from sftkit.sft import SparseFineTuning

SEARCHES = ("auto", "grid", "coordinate")
GRID_LIMIT = 36  # ``auto`` runs the full grid up to this many trials, coordinate search beyond


@dataclass(frozen=True)
class Space:
    """Where to search: the candidates of each language-SFT weight and of D, and how.

    The defaults span "no language SFT" (0) to the plain sum (1) and D from a fifth to all of the entries;
    ``rounds`` bounds coordinate search (each round tries every candidate of every coordinate in turn).
    """

    weights: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    densities: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
    search: str = "auto"
    rounds: int = 3

    def check(self) -> None:
        if self.search not in SEARCHES:
            raise BadInputError(f"the search must be one of {', '.join(SEARCHES)}, not {self.search!r}")
        if not self.weights or not self.densities:
            raise BadInputError("give at least one candidate weight and one candidate density to tune")
        for density in self.densities:
            if not 0 < density <= 1:
                raise BadInputError(f"candidate densities must be in (0, 1], not {density:g}")
        if self.rounds < 1:
            raise BadInputError(f"coordinate search needs at least one round, not {self.rounds}")


@dataclass(frozen=True)
class Trial:
    """One point tried: every SFT's weight (the plan's order), D (``None`` when the method has none), its score."""

    weights: tuple[float, ...]
    density: float | None
    score: float

    def record(self) -> dict[str, Any]:
        return {"weights": list(self.weights), "density": self.density, "score": self.score}


@dataclass(frozen=True)
class Tuning:
    """What ``tune`` tried, in order, and which SFTs' weights it searched (positions in the plan)."""

    trials: tuple[Trial, ...]
    tuned: tuple[int, ...]
    search: str
    space: Space

    @property
    def best(self) -> Trial:
        """The highest score; among equals, the first tried."""
        return max(self.trials, key=lambda trial: trial.score)

    def record(self, dev: str, metric: str, references: Sequence[str]) -> dict[str, Any]:
        """What ``sftkit_compose.json`` keeps under ``tuning``: the dev set, the search, every trial and the choice."""
        best = self.best
        return {
            "dev": dev,
            "metric": metric,
            "search": self.search,
            "tuned": [references[i] for i in self.tuned],
            "candidate_weights": list(self.space.weights),
            "candidate_densities": list(self.space.densities) if best.density is not None else None,
            "chosen": {"weights": list(best.weights), "density": best.density},
            "score": best.score,
            "trials": [trial.record() for trial in self.trials],
        }


# ``compose``'s keywords, which ``tune`` takes as they are: it searches a composition ``compose`` would build.
COMPOSE_KEYWORDS = (
    "weights",
    "head",
    "head_from",
    "references",
    "revision",
    "merge",
    "density",
    "merge_seed",
    "normalize",
)


def tune(
    base: str | Any,
    sfts: Sequence[SparseFineTuning],
    score: Callable[[Any], float],
    space: Space | None = None,
    on_trial: Callable[[Trial, int, int], None] | None = None,
    **composition: Any,
) -> Tuning:
    """Search the language SFTs' weights (and D, unless ``density`` fixes it) for the best ``score(model)``.

    ``composition``: ``compose``'s keywords. Its ``weights`` fix the other SFTs' weights (task, extras; default 1)
    and start coordinate search; the language SFTs are those of kind ``language`` that bring no head.
    ``on_trial(trial, done, total)`` follows the search (``total`` is an upper bound for coordinate search,
    which skips points it has tried).
    """
    unknown = sorted(set(composition) - set(COMPOSE_KEYWORDS))
    if unknown:
        raise BadInputError(f"tune takes compose's keywords ({', '.join(COMPOSE_KEYWORDS)}), not {', '.join(unknown)}")
    space = space or Space()
    space.check()
    given = {key: composition.get(key) for key in ("merge", "density", "merge_seed", "normalize")}
    settings = Merge.of(given["merge"] or "sum", given["density"], given["merge_seed"], given["normalize"])
    where = {key: composition.get(key) for key in ("head", "head_from", "references")}

    def planned(weights: Sequence[float] | None, density: float | None) -> Plan:
        merge = replace(settings, density=density) if density is not None else settings
        return plan(sfts, weights, where["head"], where["head_from"], where["references"], merge)

    start = planned(composition.get("weights"), None)
    tuned = tuple(i for i, part in enumerate(start.parts) if _is_language(part, start))
    if not tuned:
        raise BadInputError("tuning searches the language SFTs' weights: give at least one language SFT (--lang)")
    searches_density = settings.spec.sparsify is not None and given["density"] is None
    densities = space.densities if searches_density else (settings.density,)
    model, _ = prepare(base, start, composition.get("revision"))
    trials: list[Trial] = []
    seen: dict[tuple[tuple[float, ...], float | None], float] = {}

    def run(point: tuple[tuple[float, ...], float | None], total: int) -> float:
        if point not in seen:
            seen[point] = _score(model, planned(*point), score)
            trials.append(Trial(*point, seen[point]))
            if on_trial:
                on_trial(trials[-1], len(trials), total)
        return seen[point]

    # The composition as given comes first: the earliest of equal scores wins, so the search leaves it only for
    # a strictly better one (a 100-row dev set often scores neighbours the same).
    given_point = (tuple(part.weight for part in start.parts), max(densities) if densities[0] is not None else None)
    grid = [
        (_with(given_point[0], tuned, values[:-1]), values[-1])
        for values in itertools.product(*[space.weights] * len(tuned), densities)
    ]
    search = space.search if space.search != "auto" else ("grid" if len(grid) <= GRID_LIMIT else "coordinate")
    if search == "grid":
        total = len({given_point, *grid})
        for point in (given_point, *grid):
            run(point, total)
    else:
        _coordinate_search(run, given_point, tuned, space, densities)
    return Tuning(tuple(trials), tuned, search, space)


def _coordinate_search(
    run: Callable[[tuple[tuple[float, ...], float | None], int], float],
    point: tuple[tuple[float, ...], float | None],
    tuned: tuple[int, ...],
    space: Space,
    densities: tuple[float | None, ...],
) -> None:
    """Coordinate ascent from ``point`` (the given weights, the largest D): each coordinate in turn takes its best
    candidate with the others held, until a round moves nothing or ``space.rounds`` are done."""
    coordinates = [(i, space.weights) for i in tuned] + ([(None, densities)] if len(densities) > 1 else [])
    total = 1 + space.rounds * sum(len(candidates) for _, candidates in coordinates)
    best = run(point, total)
    for _ in range(space.rounds):
        moved = False
        for position, candidates in coordinates:
            for value in candidates:
                weights, at = point
                candidate = (weights, value) if position is None else (_with(list(weights), (position,), (value,)), at)
                found = run(candidate, total)
                if found > best:
                    best, point, moved = found, candidate, True
        if not moved:
            return


def _with(weights: Sequence[float], positions: Sequence[int], values: Sequence[float]) -> tuple[float, ...]:
    chosen = list(weights)
    for position, value in zip(positions, values, strict=True):
        chosen[position] = float(value)
    return tuple(chosen)


def _is_language(part: Part, composition: Plan) -> bool:
    return part.sft.metadata.kind == "language" and part is not composition.head_part


def _score(model: Any, composition: Plan, score: Callable[[Any], float]) -> float:
    """Apply the plan's SFTs, score, revert them in reverse order: ``model`` is θ0 again, bit for bit."""
    applied = composition.applied()
    for sft, scale, with_head in applied:
        sft.apply(model, scale=scale, with_head=with_head)
    try:
        return float(score(model))
    finally:
        for sft, _, _ in reversed(applied):
            sft.revert(model)
