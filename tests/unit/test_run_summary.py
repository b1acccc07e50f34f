"""The local run summary's per-step wall time, read from kfp.local's own task log lines."""

import json
import logging

from kfp.local import logging_utils

from pipeline.run import RunSummary, TaskClock, TaskResult, print_summary
from pipeline.run import _outcome as summarize_tasks


def record(message: str, created: float) -> logging.LogRecord:
    entry = logging.LogRecord("root", logging.INFO, __file__, 1, message, None, None)
    entry.created = created
    return entry


def test_task_clock_times_each_task_from_kfp_locals_start_and_finish_lines():
    clock = TaskClock()
    name = logging_utils.format_task_name("train-head")  # coloured, exactly as kfp.local logs it
    success = logging_utils.format_status(logging_utils.status.Status.SUCCESS)
    clock.filter(record(f"Executing task {name}", 100.0))
    clock.filter(record("Streamed logs:\n", 100.5))
    clock.filter(record(f"Task {name} finished with status {success}", 142.25))
    assert clock.seconds == {"train-head": 42.25}


def test_the_summary_table_shows_each_steps_seconds(capsys):
    tasks = {"augment": TaskResult("augment", True, seconds=12.34),
             "train-head": TaskResult("train-head", True, {"Output": True}, seconds=88.0)}  # fmt: skip
    print_summary(RunSummary("/runs/x", tasks, None, "finished without pushing"))
    table = capsys.readouterr().err
    assert "seconds" in table and "12.3" in table and "88.0" in table


def _tasks(tmp_path, served_version, pushed: str) -> dict:
    state = tmp_path / "data_state.json"
    state.write_text(json.dumps({"served_version": served_version, "train": True}))
    check = TaskResult("check-data", True, {"Output": True}, {"data_state": str(state)})
    evaluate = TaskResult("evaluate", True, {"Output": True})
    return {
        "check-data": check,
        "evaluate": evaluate,
        "push": TaskResult("push", True, {"Output": pushed}),
    }


def test_the_outcome_says_nothing_was_pushed_when_push_returned_the_served_version(tmp_path):
    summary = summarize_tasks(_tasks(tmp_path, 7, "7"), "7")
    assert summary == "nothing pushed: the served version 7 already holds this model"
    assert summarize_tasks(_tasks(tmp_path, 7, "9"), "9") == "pushed version 9"
    assert summarize_tasks(_tasks(tmp_path, None, "9"), "9") == "pushed version 9"


def test_the_summary_says_how_many_images_each_step_reused_and_computed(tmp_path, capsys):
    from components import datasets
    from components.augment import augment_dataset, store_for
    from components.config import GraftConfig

    config = GraftConfig(image_size=16, views=1, val_fraction=0.2, test_fraction=0.2)
    datasets.write_synthetic_dataset(str(tmp_path / "data"), num_classes=2, per_class=10, size=16, seed=0)  # fmt: skip
    store = store_for(str(tmp_path / "repo"), config)
    augment_dataset(str(tmp_path / "data"), tmp_path / "cold", config, store=store)
    augment_dataset(str(tmp_path / "data"), tmp_path / "examples", config, store=store)
    head = tmp_path / "head"
    head.mkdir()
    (head / "training.json").write_text(json.dumps({"reuse": {"reused": 12, "computed": 3, "evicted": 0, "store": store.uri}}))  # fmt: skip
    tasks = {"augment": TaskResult("augment", True, artifacts={"examples": str(tmp_path / "examples")}),
             "train-head": TaskResult("train-head", True, {"Output": True}, {"head_model": str(head)})}  # fmt: skip
    summary = RunSummary("/runs/x", tasks, None, "finished without pushing")
    assert {t: (r["reused"], r["computed"]) for t, r in summary.to_json()["reuse"].items()} == {
        "augment": (20, 0), "train-head": (12, 3)}  # fmt: skip
    print_summary(summary)
    err = capsys.readouterr().err
    assert "augment: 20 images reused, 0 computed" in err
    assert "train-head: 12 images reused, 3 computed" in err
