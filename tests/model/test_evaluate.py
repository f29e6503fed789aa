"""The evaluation's runs report their progress, the online pass runs with the heap frozen, and
`freshrec eval` shows no bar off a terminal."""

from __future__ import annotations

import gc

import pytest

from model import datasets
from model.evaluate import STEPS_PER_CALL, examples_gone_through, frozen, hashed, online
from model.features import FeatureSpec

SPEC = FeatureSpec((), ("genre",), (), 8)


@pytest.mark.parametrize("run", [online, frozen, hashed])
def test_progress_counts_every_example_each_run_goes_through(run):
    examples = datasets.drifting_stream(n=203)
    told: list[int] = []
    run(examples, SPEC, batch_size=16, progress=told.append)
    assert sum(told) == examples_gone_through(run, len(examples))
    assert max(told) <= 16 * STEPS_PER_CALL  # told once per TensorFlow call
    assert examples_gone_through(run, len(examples)) == (101 * 2 + 102 if run is frozen else 203)


def test_the_online_pass_runs_with_the_heap_frozen_and_leaves_it_as_it_was():
    """As the flow process runs the trainer: full collections skip what the set-up made (TensorFlow's
    objects among them), which would otherwise be walked in the timed pass."""
    gc.unfreeze()  # as `frozen_heap` leaves the heap after it (another test may have frozen it)
    frozen_during: list[int] = []
    online(datasets.drifting_stream(n=203), SPEC, batch_size=16, steps_per_call=4,
           progress=lambda n: frozen_during.append(gc.get_freeze_count()))
    assert frozen_during and min(frozen_during) > 0
    assert gc.get_freeze_count() == 0


def test_eval_prints_no_progress_bar_when_not_on_a_terminal(tmp_path, capsys):
    from flows.cli import main

    assert main(["eval", "simulator", "--limit", "300", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "report:" in out
    assert "ex/s" not in err and "\r" not in err and "%|" not in err
    assert (tmp_path / "simulator" / "report.json").exists()
