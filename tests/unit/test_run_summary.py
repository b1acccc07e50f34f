"""The local run summary's per-step wall time, read from kfp.local's own task log lines."""

import logging

from kfp.local import logging_utils

from pipeline.run import RunSummary, TaskClock, TaskResult, print_summary


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
