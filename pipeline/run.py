"""Run the graft pipeline on this machine with kfp.local, and summarise what happened.

    graft run --data /tmp/bucket/fm --model-name fm --model-repo /tmp/models --base /tmp/base.keras

Every component runs as a subprocess of this Python (kfp.local's SubprocessRunner), so a
laptop without Docker runs the same DAG, the same gates and the same artifacts as the
cluster. Outputs land under ``pipeline_root/<run>/<task>/``; tasks a gate skipped have no
directory, which is how the summary tells what ran.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.artifacts import EVALUATION_FILE
from components.config import GraftConfig, kfp_value


def _step_order(shards: int = 1) -> tuple[str, ...]:
    from pipeline.pipeline import step_order

    return step_order(shards)


@dataclass
class TaskResult:
    name: str
    succeeded: bool
    outputs: dict = field(default_factory=dict)  # parameter outputs ("Output" = return value)
    artifacts: dict = field(default_factory=dict)  # artifact name -> local path
    seconds: float | None = None  # wall time, when this process watched the task run


# Where each step that uses the reuse store records what it reused: (task, artifact, file).
REUSE_RECORDS = (
    ("augment", "examples", "spec.json"),
    ("gather-examples", "examples", "spec.json"),  # shards > 1: the augment shards' sum
    ("train-head", "head_model", "training.json"),
)


@dataclass
class RunSummary:
    run_dir: str
    tasks: dict[str, TaskResult]
    pushed_version: str | None  # the version push returned (new, or the existing identical one)
    outcome: str  # one sentence: what the run decided and why
    shards: int = 1  # the fan-out's width (components/shards.py); 1: no fan-out loops

    def ran(self) -> list[str]:
        return [name for name in _step_order(self.shards) if name in self.tasks]

    def reuse(self) -> dict[str, dict]:
        """Per step that uses the reuse store, how many images it reused and computed."""
        found = {}
        for task, artifact, name in REUSE_RECORDS:
            result = self.tasks.get(task)
            record = _json_in(result.artifacts.get(artifact), name) if result else {}
            if record.get("reuse"):
                found[task] = record["reuse"]
        return found

    def to_json(self) -> dict:
        return {
            "run_dir": self.run_dir,
            "ran": self.ran(),
            "pushed_version": self.pushed_version,
            "outcome": self.outcome,
            "reuse": self.reuse(),
            "tasks": {name: asdict(task) for name, task in self.tasks.items()},
        }


def pipeline_arguments(
    config: GraftConfig, *, data_uri: str, model_repo: str, model_name: str, **extra
) -> dict:
    """Every setting of ``config`` that is a pipeline parameter (all but the DAG's shape,
    ``shards``, which the pipeline is built with), plus the run's own arguments."""
    from components.config import DAG_SETTINGS
    from pipeline.pipeline import PIPELINE_SIGNATURE

    arguments = {k: kfp_value(v) for k, v in config.settings().items() if k not in DAG_SETTINGS}
    arguments.update(data_uri=data_uri, model_repo=model_repo, model_name=model_name, **extra)
    unknown = set(arguments) - set(PIPELINE_SIGNATURE.parameters)
    if unknown:
        raise ValueError(f"The pipeline has no parameter(s) {sorted(unknown)}")
    return arguments


class TaskClock(logging.Filter):
    """Wall time per task, from the start and finish lines kfp.local logs (it records no
    times itself). A filter on the root logger survives kfp.local swapping its handlers."""

    STARTED = re.compile(r"Executing task '([^']+)'")
    FINISHED = re.compile(r"Task '([^']+)' finished with status")

    def __init__(self):
        super().__init__()
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(record.msg))  # kfp colours the task names
        if started := self.STARTED.match(text):
            self.started[started[1]] = record.created
        elif (finished := self.FINISHED.match(text)) and finished[1] in self.started:
            self.seconds[finished[1]] = record.created - self.started[finished[1]]
        return True


def run_local(
    data_uri: str,
    model_repo: str,
    model_name: str,
    config: GraftConfig,
    *,
    pipeline_root: str | Path,
    force: bool = False,
    min_new_images: int = 0,
    image: str | None = None,
    container_env: dict | None = None,
) -> RunSummary:
    """Run the whole pipeline with kfp.local and return which steps ran and what they decided.

    With ``image``, every step runs inside that image instead of as a subprocess
    (pipeline/in_containers.py), with ``container_env`` set in each container.
    """
    from kfp import local

    from pipeline.pipeline import build_pipeline

    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = set(pipeline_root.iterdir())
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        raise_on_error=False,  # a failed step is reported in the summary, with its name
    )
    arguments = pipeline_arguments(
        config,
        data_uri=data_uri,
        model_repo=model_repo,
        model_name=model_name,
        force=force,
        min_new_images=min_new_images,
    )
    clock = TaskClock()
    logging.getLogger().addFilter(clock)
    try:
        with warnings.catch_warnings():
            # kfp.local notes that GPU/CPU requests are ignored and that graft:latest is not a
            # Python image; both are expected here (components run in this environment).
            warnings.filterwarnings("ignore", module=r"kfp\.local\..*")
            if image:
                from pipeline.in_containers import run_in_image

                run_in_image(image, arguments, config, pipeline_root, container_env or {})
            else:
                build_pipeline(gpu=None, retries=False, shards=config.shards)(**arguments)
    finally:
        logging.getLogger().removeFilter(clock)
    # Only run directories: with --image the data and model repository live here too.
    new_dirs = sorted(
        d for d in set(pipeline_root.iterdir()) - before if d.name.startswith("graft-")
    )
    if not new_dirs:
        raise RuntimeError(f"kfp.local wrote no run directory under {pipeline_root}")
    summary = summarize(new_dirs[-1])
    for name, seconds in clock.seconds.items():
        if name in summary.tasks:
            summary.tasks[name].seconds = seconds
    return summary


def _read_task(task_dir: Path) -> TaskResult:
    output_file = task_dir / "executor_output.json"
    if not output_file.exists():
        return TaskResult(task_dir.name, succeeded=False)
    executor_output = json.loads(output_file.read_text())
    artifacts = {
        name: entry["artifacts"][0]["uri"]
        for name, entry in executor_output.get("artifacts", {}).items()
        if entry.get("artifacts")
    }
    return TaskResult(task_dir.name, True, executor_output.get("parameterValues", {}), artifacts)


def _json_in(path: str | None, name: str) -> dict:
    """Read ``name`` from an artifact path that is either the JSON file or a directory holding it."""
    if not path:
        return {}
    candidate = Path(path)
    if candidate.is_dir():
        candidate = candidate / name
    try:
        return json.loads(candidate.read_text())
    except (OSError, ValueError):
        return {}


LOOP_ITERATION = re.compile(r"for-loop-\d+-iteration-(\d+)")  # kfp.local's folder of one


def summarize(run_dir: str | Path) -> RunSummary:
    """Rebuild a RunSummary from a kfp.local run directory. The tasks of a fan-out loop's
    iteration k (in ``for-loop-*-iteration-k/``) are named ``<task>[k]``."""
    run_dir = Path(run_dir)
    tasks, shards = {}, 1
    for folder in sorted(d for d in run_dir.iterdir() if d.is_dir()):
        if iteration := LOOP_ITERATION.fullmatch(folder.name):
            k = int(iteration[1])
            shards = max(shards, k + 1)
            for task_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
                task = _read_task(task_dir)
                task.name = f"{task_dir.name}[{k}]"
                tasks[task.name] = task
        else:
            tasks[folder.name] = _read_task(folder)
    pushed = _branch_task(tasks, "push")
    pushed_version = str(pushed.outputs.get("Output")) if pushed and pushed.succeeded else None
    outcome = _outcome(tasks, pushed_version, shards)
    return RunSummary(str(run_dir), tasks, pushed_version, outcome, shards)


def _outcome(tasks: dict[str, TaskResult], pushed_version: str | None, shards: int = 1) -> str:
    order = _step_order(shards)
    failed = [name for name in order if name in tasks and not tasks[name].succeeded]
    if failed:
        return f"step {failed[0]} FAILED (see its log above)"
    check = tasks.get("check-data")
    if check and check.outputs.get("Output") is False:
        state = _json_in(check.artifacts.get("data_state"), "data_state.json")
        return f"skipped training: {state.get('reason', 'data unchanged')}"
    head = tasks.get("train-head")
    unconverged = (
        " (the head-only model: the head did not converge within head_max_epochs, so "
        "fine-tuning was skipped)"
        if head and head.outputs.get("Output") is False
        else ""
    )
    evaluated = _branch_task(tasks, "evaluate")
    if evaluated and evaluated.outputs.get("Output") is False:
        evaluation = _json_in(evaluated.artifacts.get("evaluation"), EVALUATION_FILE)
        return f"not pushed: candidate not blessed ({evaluation.get('reason', 'see the evaluation report')}){unconverged}"
    if pushed_version:
        # push returns the served version when it already holds this model: nothing new landed
        state = _json_in(check.artifacts.get("data_state"), "data_state.json") if check else {}
        if str(state.get("served_version")) == pushed_version:
            return f"nothing pushed: the served version {pushed_version} already holds this model{unconverged}"
        return f"pushed version {pushed_version}{unconverged}"
    return "finished without pushing"


def _branch_task(tasks: dict[str, TaskResult], name: str) -> TaskResult | None:
    """The task ``name`` as it ran in either branch of the convergence gate: kfp names the
    head-not-converged branch's copies ``evaluate-2`` and ``push-2``."""
    return tasks.get(name) or tasks.get(f"{name}-2")


def print_summary(summary: RunSummary) -> None:
    """A per-step table on stderr: what ran, what each step returned, where its outputs are."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="graft run")
    table.add_column("step")
    table.add_column("status")
    table.add_column("returned")
    table.add_column("seconds", justify="right")
    for name in _step_order(summary.shards):
        task = summary.tasks.get(name)
        if task is None:
            table.add_row(name, "[dim]skipped by a gate[/]", "", "")
        else:
            status = "[green]ok[/]" if task.succeeded else "[red]FAILED[/]"
            seconds = "" if task.seconds is None else f"{task.seconds:.1f}"
            table.add_row(name, status, str(task.outputs.get("Output", "")), seconds)
    console = Console(stderr=True)
    console.print(table)
    for task, reuse in summary.reuse().items():
        console.print(f"{task}: {reuse['reused']} images reused, {reuse['computed']} computed "
                      f"(reuse store {reuse['store']})")  # fmt: skip
    console.print(f"outcome: {summary.outcome}")
    console.print(f"artifacts: {summary.run_dir}")
