"""The checkpoint directory's rules, in one process with a stand-in engine (fast): pruning counts only
complete checkpoints and never removes the newest one; a re-save of a tag writes beside it and
swaps; a save that dies at any phase leaves the previous complete checkpoint in charge."""
import json
import os

import pytest

from wpn_dist.app import checkpoint
from wpn_dist.app.hooks import Hooks


class FakeEngine:
    """Writes what DeepSpeed would: one model-states file per save, its content the given value."""

    def __init__(self, value: str):
        self.value = value

    def save_checkpoint(self, root, tag, save_latest):
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        with open(os.path.join(root, tag, "mp_rank_00_model_states.pt"), "w") as f:
            f.write(self.value)


class DieAt(Hooks):
    def __init__(self, phase):
        self.phase = phase

    def during_save(self, step, phase):
        if phase == self.phase:
            raise RuntimeError(f"died at {phase}")


def content(run, tag):
    return open(os.path.join(checkpoint.checkpoint_root(str(run)), tag, "mp_rank_00_model_states.pt")).read()


def test_pruning_keeps_the_newest_complete_checkpoint_over_a_broken_newer_one(tmp_path):
    """The reported case: a save killed at step 6, a resume from step 3, a new save at step 4 with
    --keep_checkpoints 1. Before, pruning counted the broken step 6 and deleted the new step 4."""
    checkpoint.save(FakeEngine("3"), str(tmp_path), 3, {}, keep=0)
    root = checkpoint.checkpoint_root(str(tmp_path))
    os.makedirs(os.path.join(root, "step00000006"))  # a broken checkpoint under its final name (older layout)
    checkpoint.save(FakeEngine("4"), str(tmp_path), 4, {}, keep=1)
    assert sorted(t for t in os.listdir(root) if t.startswith("step")) == ["step00000004"]
    assert checkpoint.newest_complete(str(tmp_path)).endswith("step00000004")


def test_default_keep_leaves_two_complete_checkpoints(tmp_path):
    for step in (3, 6, 9):
        checkpoint.save(FakeEngine(str(step)), str(tmp_path), step, {}, keep=2)
    root = checkpoint.checkpoint_root(str(tmp_path))
    assert sorted(t for t in os.listdir(root) if t.startswith("step")) == ["step00000006", "step00000009"]


@pytest.mark.parametrize("phase", ["shards_written", "manifest_written", "renamed"])
def test_a_resave_that_dies_keeps_a_complete_checkpoint_of_the_tag(phase, tmp_path):
    checkpoint.save(FakeEngine("first"), str(tmp_path), 5, {}, keep=2)
    with pytest.raises(RuntimeError):
        checkpoint.save(FakeEngine("second"), str(tmp_path), 5, {}, keep=2, hooks=DieAt(phase))
    newest = checkpoint.newest_complete(str(tmp_path))
    assert newest is not None and checkpoint.problem_with(newest) is None
    # Until the rename the old one is in place; after it, the new one is.
    assert content(tmp_path, "step00000005") == ("second" if phase == "renamed" else "first")
    checkpoint.save(FakeEngine("third"), str(tmp_path), 5, {}, keep=2)
    assert content(tmp_path, "step00000005") == "third"
    assert [t for t in os.listdir(checkpoint.checkpoint_root(str(tmp_path))) if t.startswith("step")] == ["step00000005"]


def test_manifest_lists_every_file_and_latest_names_the_tag(tmp_path):
    directory = checkpoint.save(FakeEngine("x"), str(tmp_path), 7, {"step": 7}, keep=2)
    manifest = json.load(open(os.path.join(directory, checkpoint.MANIFEST)))
    assert set(manifest["files"]) == {"mp_rank_00_model_states.pt", "rank00000_state.pt"}
    assert open(os.path.join(checkpoint.checkpoint_root(str(tmp_path)), "latest")).read() == "step00000007"


def test_each_rank_fsyncs_the_files_it_wrote():
    assert checkpoint._written_by("zero_pp_rank_1_mp_rank_00_optim_states.pt", 1)
    assert not checkpoint._written_by("zero_pp_rank_1_mp_rank_00_optim_states.pt", 0)
    assert checkpoint._written_by("rank00003_state.pt", 3)
    assert checkpoint._written_by("mp_rank_00_model_states.pt", 0)
    assert not checkpoint._written_by("mp_rank_00_model_states.pt", 2)


def test_a_swap_that_died_between_its_renames_still_has_its_checkpoint(tmp_path):
    checkpoint.save(FakeEngine("old"), str(tmp_path), 5, {}, keep=2)
    root = checkpoint.checkpoint_root(str(tmp_path))
    final = os.path.join(root, "step00000005")
    os.replace(final, final + checkpoint.REPLACED)  # the first rename of a re-save, then death
    assert checkpoint.newest_complete(str(tmp_path)) == final + checkpoint.REPLACED
    checkpoint.save(FakeEngine("new"), str(tmp_path), 5, {}, keep=1)
    assert checkpoint.newest_complete(str(tmp_path)) == final and content(tmp_path, "step00000005") == "new"
