"""``sftkit.tuning.tune``: each trial is exactly the composed model, and the search finds what it should."""

from __future__ import annotations

import hashlib

import pytest
from merge_helpers import random_sfts

from sftkit.compose import compose
from sftkit.errors import BadInputError
from sftkit.params import encoder_of
from sftkit.tuning import GRID_LIMIT, Space, tune


@pytest.fixture(scope="module")
def sfts(tiny_base):
    return random_sfts(tiny_base)  # a task SFT and two language SFTs with overlapping, conflicting entries


def _digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _distance_to(target):
    """A score peaking (at 0) exactly on ``target``'s encoder: the search must find the weights that built it."""
    wanted = {name: p.detach().clone() for name, p in encoder_of(target).named_parameters()}

    def score(model) -> float:
        return -sum(float((p.detach() - wanted[n]).abs().sum()) for n, p in encoder_of(model).named_parameters())

    return score


def test_every_trial_scores_exactly_what_compose_builds(tiny_base, sfts):
    """Apply, score, revert: each trial's model is bit for bit ``compose`` with the trial's values."""
    seen: list[str] = []

    def score(model) -> float:
        seen.append(_digest(model))
        return float(len(seen) % 3)

    space = Space(weights=(0.0, 0.5), densities=(0.3, 1.0))
    result = tune(str(tiny_base), sfts, score, space, weights=[1.0, 1.0, 0.7], merge="ties")
    assert result.search == "grid" and result.tuned == (1, 2)
    assert [(t.weights, t.density) for t in result.trials] == [((1.0, 1.0, 0.7), 1.0)] + [
        ((1.0, w1, w2), d) for w1 in (0.0, 0.5) for w2 in (0.0, 0.5) for d in (0.3, 1.0)
    ]  # the composition as given first, then the grid
    for trial, digest in zip(result.trials, seen, strict=True):
        model = compose(str(tiny_base), sfts, list(trial.weights), merge="ties", density=trial.density)
        assert _digest(model) == digest, trial
    assert len(set(seen)) == len(seen)  # the trials really differ
    assert result.best == result.trials[1]  # the first of the highest scores (2.0)


def test_grid_search_recovers_the_weights_and_density_of_a_known_model(tiny_base, sfts):
    target = compose(str(tiny_base), sfts, [1.0, 0.25, 0.75], merge="dare-ties", density=0.6, merge_seed=2)
    result = tune(str(tiny_base), sfts, _distance_to(target), merge="dare-ties", merge_seed=2)
    assert result.search == "coordinate"  # 5 × 5 × 5 > GRID_LIMIT
    assert (result.best.weights, result.best.density, result.best.score) == ((1.0, 0.25, 0.75), 0.6, 0.0)
    assert len(result.trials) == len({(t.weights, t.density) for t in result.trials})  # nothing scored twice
    assert len(result.trials) < 5**3  # coordinate search really is cheaper than the grid

    target = compose(str(tiny_base), sfts, [1.0, 0.5, 0.0])
    result = tune(str(tiny_base), sfts, _distance_to(target))
    assert result.search == "grid" and len(result.trials) == 25 <= GRID_LIMIT  # (1, 1, 1) is in the grid
    assert (result.best.weights, result.best.density, result.best.score) == ((1.0, 0.5, 0.0), None, 0.0)


def test_a_fixed_density_is_not_searched(tiny_base, sfts):
    result = tune(str(tiny_base), sfts[:2], lambda model: 0.0, merge="ties", density=0.4)
    assert {t.density for t in result.trials} == {0.4} and len(result.trials) == 5
    # All scores equal: the composition as given (w 1) stays, not the grid's first point (w 0).
    assert result.best.weights == (1.0, 1.0)


def test_bad_tuning_input(tiny_base, sfts):
    with pytest.raises(BadInputError, match="give at least one language SFT"):
        tune(str(tiny_base), sfts[:1], lambda model: 0.0)
    with pytest.raises(BadInputError, match=r"candidate densities must be in \(0, 1\]"):
        tune(str(tiny_base), sfts, lambda model: 0.0, merge="ties", space=Space(densities=(0.0, 1.0)))
    with pytest.raises(BadInputError, match="the search must be one of"):
        tune(str(tiny_base), sfts, lambda model: 0.0, space=Space(search="random"))
    with pytest.raises(BadInputError, match=r"tune takes compose's keywords .*, not weight$"):
        tune(str(tiny_base), sfts, lambda model: 0.0, weight=[1.0, 1.0, 1.0])
