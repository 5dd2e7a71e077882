"""The run directory (``sftkit.training.checkpoint``): manifests, checkpoints, best states, mask selections."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from sftkit.errors import BadInputError
from sftkit.training.checkpoint import MANIFEST, RunDirectory

MANIFEST_DATA = {"config": {"lr": 0.001, "seed": 3, "k": 1000}, "data": "sha256:abc", "lineage": None}


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.ReLU(), nn.Linear(8, 2))


def _training(seed: int = 0):
    torch.manual_seed(seed)
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, 2, 10)
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler, step: int) -> None:
    """One step with the trainer's per-step reseeding (data and dropout depend on the step only)."""
    torch.manual_seed(1000 + step)
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _assert_equal_states(actual, expected) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor)
        assert actual.dtype == expected.dtype
        assert torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            _assert_equal_states(actual[key], expected[key])
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            _assert_equal_states(a, e)
    else:
        assert actual == expected


@pytest.fixture
def run(tmp_path) -> RunDirectory:
    directory = RunDirectory(tmp_path / "run")
    assert directory.start(MANIFEST_DATA, resume=False) is False
    return directory


# ---------------------------------------------------------------------------------------------- manifest


def test_fresh_start_writes_the_manifest_and_clears_an_earlier_run(tmp_path):
    path = tmp_path / "run"
    (path / "full").mkdir(parents=True)
    (path / "full" / "best.safetensors").write_text("stale")
    (path / MANIFEST).write_text('{"config": "an earlier run"}')
    assert RunDirectory(path).start(MANIFEST_DATA, resume=False) is False
    assert _files(path) == [MANIFEST]
    assert json.loads((path / MANIFEST).read_text()) == MANIFEST_DATA


def test_a_fresh_start_refuses_a_directory_that_is_not_a_run_and_leaves_it_alone(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    (tmp_path / "file").write_text("a file")
    for path in (tmp_path / "mine", tmp_path / "file"):
        with pytest.raises(BadInputError, match="not a run directory"):
            RunDirectory(path).start(MANIFEST_DATA, resume=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
    assert (tmp_path / "file").read_text() == "a file"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert RunDirectory(empty).start(MANIFEST_DATA, resume=False) is False


def test_resume_with_the_same_manifest(run):
    assert RunDirectory(run.path).start(json.loads(json.dumps(MANIFEST_DATA)), resume=True) is True


def test_resume_compares_the_json_form_of_the_manifest(tmp_path):
    """Paths and tuples are stored as JSON (str, list): an identical run still resumes."""
    manifest = {"data": Path("/data/train.csv"), "shape": (3, 4)}
    RunDirectory(tmp_path / "run").start(manifest, resume=False)
    assert json.loads((tmp_path / "run" / MANIFEST).read_text()) == {"data": "/data/train.csv", "shape": [3, 4]}
    assert RunDirectory(tmp_path / "run").start(dict(manifest), resume=True) is True


def test_resume_refuses_a_different_manifest_and_names_what_changed(run):
    _save(run, *_training(), step=2)
    before = _files(run.path)
    changed = {**MANIFEST_DATA, "config": {**MANIFEST_DATA["config"], "lr": 0.002}, "extra": 1}
    with pytest.raises(BadInputError, match=r"started with different config, extra$"):
        RunDirectory(run.path).start(changed, resume=True)
    assert _files(run.path) == before  # a refused resume deletes nothing
    assert json.loads((run.path / MANIFEST).read_text()) == MANIFEST_DATA


def test_resume_refusal_names_only_the_keys_that_changed(tmp_path):
    RunDirectory(tmp_path / "run").start({"shape": (3, 4), "lr": 0.1}, resume=False)
    with pytest.raises(BadInputError, match=r"different lr$"):
        RunDirectory(tmp_path / "run").start({"shape": (3, 4), "lr": 0.2}, resume=True)


def test_resume_without_a_run_is_refused(tmp_path):
    with pytest.raises(BadInputError, match="nothing to resume"):
        RunDirectory(tmp_path / "run").start(MANIFEST_DATA, resume=True)
    assert not (tmp_path / "run").exists()


def test_a_reader_writes_nothing(tmp_path, run):
    """Ranks other than the main process: no file is written or removed, but they can read."""
    model, optimizer, scheduler = _training()
    progress = _save(run, model, optimizer, scheduler, step=1)
    before = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    reader = RunDirectory(run.path, writer=False)
    assert reader.start({"other": 1}, resume=False) is False
    reader.save_best("full", {"w": torch.ones(2)})
    reader.save_checkpoint("full", {"w": torch.ones(2)}, optimizer, scheduler, {"step": 9})
    reader.save_selection({"w": torch.ones(2, dtype=torch.bool)}, {})
    reader.mark_done("full", {"steps": 9})
    reader.remove()
    assert {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()} == before
    assert reader.load_checkpoint("full")[3] == progress
    fresh = RunDirectory(tmp_path / "elsewhere", writer=False)
    fresh.start(MANIFEST_DATA, resume=False)
    assert not fresh.path.exists()


# ---------------------------------------------------------------------------------------------- checkpoints


def _save(run: RunDirectory, model, optimizer, scheduler, step: int, phase: str = "full") -> dict:
    progress = {"step": step, "best": 0.5, "best_step": step, "history": [{"step": step, "loss": 1.25}]}
    run.save_checkpoint(phase, model.state_dict(), optimizer, scheduler, progress)
    return progress


def test_checkpoint_round_trip(run):
    model, optimizer, scheduler = _training()
    for step in range(3):
        _step(model, optimizer, scheduler, step)
    progress = _save(run, model, optimizer, scheduler, step=3)
    assert _files(run.path / "full") == [
        "checkpoint",
        "checkpoint/optimizer.pt",
        "checkpoint/progress.json",
        "checkpoint/scheduler.pt",
        "checkpoint/state.safetensors",
    ]
    state, optimizer_state, scheduler_state, loaded_progress = run.load_checkpoint("full")
    _assert_equal_states(state, model.state_dict())
    _assert_equal_states(optimizer_state, optimizer.state_dict())
    _assert_equal_states(scheduler_state, scheduler.state_dict())
    assert loaded_progress == progress
    assert optimizer_state["state"][0]["exp_avg"].abs().sum() > 0  # a real, non-trivial optimiser state


def test_checkpoint_keeps_dtypes_and_non_contiguous_tensors(run):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 5, generator=generator, requires_grad=True)
    state = {
        "w.t": weight.t(),  # non-contiguous, requires grad
        "half": torch.randn(4, generator=generator).half(),
        "bf16": torch.randn(4, generator=generator).bfloat16(),
        "steps": torch.tensor([1, 2**40], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }
    _, optimizer, scheduler = _training()
    run.save_checkpoint("sparse", state, optimizer, scheduler, {"step": 0})
    loaded = run.load_checkpoint("sparse")[0]
    _assert_equal_states(loaded, {name: t.detach().contiguous() for name, t in state.items()})


def test_resuming_from_a_checkpoint_continues_bit_for_bit(run):
    """Train 7 steps straight vs. 3 steps, checkpoint, reload into fresh objects, 4 more steps."""
    model, optimizer, scheduler = _training()
    for step in range(3):
        _step(model, optimizer, scheduler, step)
    _save(run, model, optimizer, scheduler, step=3)
    for step in range(3, 7):
        _step(model, optimizer, scheduler, step)

    state, optimizer_state, scheduler_state, progress = RunDirectory(run.path).load_checkpoint("full")
    resumed, resumed_optimizer, resumed_scheduler = _training(seed=1)  # other initial weights
    resumed.load_state_dict(state)
    resumed_optimizer.load_state_dict(optimizer_state)
    resumed_scheduler.load_state_dict(scheduler_state)
    for step in range(progress["step"], 7):
        _step(resumed, resumed_optimizer, resumed_scheduler, step)
    _assert_equal_states(resumed.state_dict(), model.state_dict())
    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()

    # Control: the same resume without the optimiser state ends elsewhere, so the comparison above is sensitive.
    control, control_optimizer, control_scheduler = _training(seed=1)
    control.load_state_dict(state)
    control_scheduler.load_state_dict(scheduler_state)
    for step in range(3, 7):
        _step(control, control_optimizer, control_scheduler, step)
    assert not torch.equal(control[0].weight, model[0].weight)


def test_a_new_checkpoint_replaces_the_previous_one_whole(run):
    model, optimizer, scheduler = _training()
    _save(run, model, optimizer, scheduler, step=1)
    (run.path / "full" / "checkpoint" / "leftover.txt").write_text("from the first")
    _step(model, optimizer, scheduler, 1)
    _save(run, model, optimizer, scheduler, step=2)
    assert "checkpoint/leftover.txt" not in _files(run.path / "full")
    assert [p.name for p in (run.path / "full").iterdir()] == ["checkpoint"]  # no staging or retired copy
    state, _, _, progress = run.load_checkpoint("full")
    assert progress["step"] == 2
    _assert_equal_states(state, model.state_dict())


def test_a_crash_while_checkpointing_keeps_the_previous_checkpoint(run):
    model, optimizer, scheduler = _training()
    _save(run, model, optimizer, scheduler, step=1)
    expected = {name: t.clone() for name, t in model.state_dict().items()}
    _step(model, optimizer, scheduler, 1)

    class Exploding:
        def state_dict(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint("full", model.state_dict(), optimizer, Exploding(), {"step": 2})
    assert [p.name for p in (run.path / "full").iterdir()] == ["checkpoint"]
    state, _, _, progress = run.load_checkpoint("full")
    assert progress["step"] == 1
    _assert_equal_states(state, expected)


def test_no_checkpoint_is_none(run):
    assert run.load_checkpoint("full") is None
    model, optimizer, scheduler = _training()
    _save(run, model, optimizer, scheduler, step=1)
    assert run.load_checkpoint("sparse") is None  # another phase
    (run.path / "full" / "checkpoint" / "progress.json").unlink()
    assert run.load_checkpoint("full") is None  # incomplete: progress.json is the marker


def test_a_truncated_state_file_is_refused(run):
    _save(run, *_training(), step=1)
    path = run.path / "full" / "checkpoint" / "state.safetensors"
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(BadInputError, match="damaged"):
        run.load_checkpoint("full")


def test_a_truncated_optimizer_file_is_refused(run):
    _save(run, *_training(), step=1)
    path = run.path / "full" / "checkpoint" / "optimizer.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BadInputError, match="damaged"):
        run.load_checkpoint("full")


class _Payload:
    """Unpickling this object creates a directory: proof that arbitrary code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("file", ["optimizer.pt", "scheduler.pt"])
def test_a_pickle_with_code_is_refused_without_running_it(run, tmp_path, file):
    """Optimiser and scheduler states are loaded with ``weights_only=True``."""
    _save(run, *_training(), step=1)
    marker = tmp_path / "code-ran"
    torch.save({"state": {}, "param_groups": [], "evil": _Payload(marker)}, run.path / "full" / "checkpoint" / file)
    with pytest.raises(BadInputError, match="damaged"):
        run.load_checkpoint("full")
    assert not marker.exists()
    # Control, read statically (never unpickled): the file really references the payload's callable.
    with zipfile.ZipFile(run.path / "full" / "checkpoint" / file) as archive:
        pickled = next(archive.read(name) for name in archive.namelist() if name.endswith("data.pkl"))
    assert b"mkdir" in pickled and str(marker).encode() in pickled


# ---------------------------------------------------------------------------------------------- best, done, selection


def test_best_state_round_trip_and_replacement(run):
    first = {"w": torch.arange(6.0).view(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    run.save_best("full", first)
    _assert_equal_states(run.load_best("full"), first)
    second = {"w": torch.full((2, 3), 7.0, dtype=torch.bfloat16)}
    run.save_best("full", second)
    _assert_equal_states(run.load_best("full"), second)
    assert _files(run.path / "full") == ["best.safetensors"]  # no temporary file left


def test_mark_done_records_the_summary_and_drops_the_checkpoint(run):
    model, optimizer, scheduler = _training()
    _save(run, model, optimizer, scheduler, step=4, phase="sparse")
    run.save_best("sparse", model.state_dict())
    assert run.done("sparse") is None
    summary = {"steps": 4, "best_step": 2, "macro_f1": 0.75, "history": [{"step": 2, "macro_f1": 0.75}]}
    run.mark_done("sparse", {**summary, "where": Path("/x")})
    assert run.done("sparse") == {**summary, "where": "/x"}
    assert run.load_checkpoint("sparse") is None
    assert _files(run.path / "sparse") == ["best.safetensors", "done.json"]
    assert RunDirectory(run.path, writer=False).done("sparse") == {**summary, "where": "/x"}


def test_selection_round_trip(run):
    generator = torch.Generator().manual_seed(0)
    masks = {
        "encoder.layer.0.weight": torch.rand(7, 5, generator=generator) < 0.3,
        "encoder.layer.0.bias": torch.zeros(7, dtype=torch.bool),
        "embeddings.weight": torch.ones(3, 2, 2, dtype=torch.bool),
    }
    info = {"rank_report": [{"name": "encoder.layer.0.weight", "rank": 2}], "k": 17}
    assert run.load_selection() is None
    run.save_selection(masks, info)
    assert info == {"rank_report": [{"name": "encoder.layer.0.weight", "rank": 2}], "k": 17}  # not mutated
    loaded_masks, loaded_info = RunDirectory(run.path).load_selection()
    assert loaded_info == info
    _assert_equal_states(loaded_masks, masks)
    stored = json.loads((run.path / "selection.json").read_text())
    assert stored["shapes"] == {name: list(mask.shape) for name, mask in masks.items()}


def test_remove_deletes_the_run(run):
    run.save_best("full", {"w": torch.ones(1)})
    run.remove()
    assert not run.path.exists()
    run.remove()  # twice is fine


def test_has_progress_says_whether_a_resume_would_skip_work(tmp_path):
    directory = RunDirectory(tmp_path / "run")
    directory.start(MANIFEST_DATA, resume=False)
    assert not directory.has_progress()  # only the manifest: nothing to resume
    directory.mark_done("full", {"steps": 4})
    assert directory.has_progress()
