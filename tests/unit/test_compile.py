"""The compiled KFP spec: tasks, gates, GPUs only on training, one image, retries, caching."""

import json

import yaml
from typer.testing import CliRunner

from pipeline.cli import app

TASKS = {"check-data", "validate-data", "augment", "train-head", "fine-tune", "evaluate", "push"}


def compile_spec(tmp_path, *flags) -> tuple[dict, dict]:
    out = tmp_path / "pipeline.yaml"
    result = CliRunner().invoke(
        app, ["compile", "--image", "registry.example/graft:1.2", "-o", str(out), *flags]
    )
    assert result.exit_code == 0, result.output
    documents = list(yaml.safe_load_all(out.read_text()))
    return documents[0], (documents[1] if len(documents) > 1 else {})


def all_tasks(spec: dict) -> dict:
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def test_compiled_pipeline_has_every_step_behind_its_gates(tmp_path):
    spec, _ = compile_spec(tmp_path)
    tasks = all_tasks(spec)
    assert TASKS <= set(tasks)
    conditions = sorted(
        t["triggerPolicy"]["condition"] for t in tasks.values() if "triggerPolicy" in t
    )
    # data changed; head converged and its else branch; blessed in each branch
    assert len(conditions) == 5
    for producer in ("check-data", "train-head", "evaluate", "evaluate-2"):
        assert any(
            f"pipelinechannel--{producer}-Output'] == true" in c and not c.startswith("!")
            for c in conditions
        ), producer
    assert "!(inputs.parameter_values['pipelinechannel--train-head-Output'] == true)" in conditions


def test_an_unconverged_head_skips_only_fine_tune(tmp_path):
    """The head-not-converged branch evaluates the head model and pushes it if blessed."""
    tasks = all_tasks(compile_spec(tmp_path)[0])
    for name in ("evaluate-2", "push-2"):  # inside the gate, the head model as a channel
        model = tasks[name]["inputs"]["artifacts"]["model"]
        assert model == {"componentInputArtifact": "pipelinechannel--train-head-head_model"}
    assert "fine-tune" not in tasks["evaluate-2"].get("dependentTasks", [])
    assert tasks["push"]["inputs"]["artifacts"]["model"] == {
        "componentInputArtifact": "pipelinechannel--fine-tune-model"
    }


def test_gpu_settings_are_on_training_steps_only_and_one_image_everywhere(tmp_path):
    spec, platform = compile_spec(
        tmp_path, "--gpu-node-selector", "pool=gpu-a", "--gpu-toleration", "gpu-taint"
    )
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example/graft:1.2"}
    gpu_steps = {
        name
        for name, e in executors.items()
        if "accelerator" in e["container"].get("resources", {})
    }
    assert gpu_steps == {"exec-train-head", "exec-fine-tune"}
    assert (
        executors["exec-train-head"]["container"]["resources"]["accelerator"]["resourceCount"]
        == "1"
    )
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == {"exec-train-head", "exec-fine-tune"}
    for executor in k8s.values():
        assert executor["nodeSelector"]["labels"] == {"pool": "gpu-a"}
        assert executor["tolerations"] == [
            {"effect": "NoSchedule", "key": "gpu-taint", "operator": "Exists"}
        ]


def test_no_gpu_drops_every_gpu_setting(tmp_path):
    spec, platform = compile_spec(tmp_path, "--no-gpu")
    executors = spec["deploymentSpec"]["executors"]
    assert not any("accelerator" in e["container"].get("resources", {}) for e in executors.values())
    assert "kubernetes" not in platform.get("platforms", {})


def test_bucket_reading_steps_skip_cache_and_io_steps_retry(tmp_path):
    spec, _ = compile_spec(tmp_path)
    tasks = all_tasks(spec)
    for name in ("check-data", "validate-data", "augment"):
        assert tasks[name]["cachingOptions"].get("enableCache", False) is False
    assert tasks["train-head"]["cachingOptions"]["enableCache"] is True
    for name in ("check-data", "validate-data", "augment", "push"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 3


def test_bad_node_selector_is_one_clear_error(tmp_path):
    result = CliRunner().invoke(
        app, ["compile", "--image", "x:1", "--gpu-node-selector", "nonsense"]
    )
    assert result.exit_code == 2
    assert "expected key=value" in result.output


def _loops(spec: dict) -> dict:
    """ParallelFor tasks (name -> task) anywhere in the spec."""
    return {name: task for name, task in all_tasks(spec).items() if "parameterIterator" in task}


def test_shards_compile_to_two_parallel_for_loops_with_that_parallelism_gathered_by_collected(
    tmp_path,
):
    spec, platform = compile_spec(tmp_path, "--shards", "4")
    loops = _loops(spec)
    assert len(loops) == 2
    inside = {}
    for name, loop in loops.items():
        assert loop["iteratorPolicy"] == {"parallelismLimit": 4}
        assert json.loads(loop["parameterIterator"]["items"]["raw"]) == [0, 1, 2, 3]
        inside[name] = set(spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"])
    assert sorted(map(sorted, inside.values())) == [["augment-shard", "features-shard"], ["validate-shard"]]  # fmt: skip
    tasks = all_tasks(spec)
    assert "validate-data" not in tasks and "augment" not in tasks
    loop_of = {task: loop for loop, names in inside.items() for task in names}
    # each gather takes the loop's collected outputs (dsl.Collected) as one list input
    for gather, key, producer, output in (
        ("validate-gathered", "manifest_shards", "validate-shard", "manifest_shard"),
        ("gather-examples", "examples_shards", "augment-shard", "examples_shard"),
        ("gather-features", "features_shards", "features-shard", "shard_features"),
    ):
        assert tasks[gather]["inputs"]["artifacts"][key]["taskOutputArtifact"] == {
            "outputArtifactKey": f"pipelinechannel--{producer}-{output}",
            "producerTask": loop_of[producer],
        }
    for shard_task in ("validate-shard", "augment-shard"):
        parameters = tasks[shard_task]["inputs"]["parameters"]
        assert parameters["shards"] == {"runtimeValue": {"constant": 4}}
        assert parameters["shard"]["componentInputParameter"].startswith(
            "pipelinechannel--loop-item"
        )
    head_inputs = tasks["train-head"]["inputs"]["artifacts"]
    assert head_inputs["features"]["taskOutputArtifact"]["producerTask"] == "gather-features"
    assert head_inputs["examples"]["taskOutputArtifact"]["producerTask"] == "gather-examples"
    gpu_executors = set(platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"])
    assert gpu_executors == {"exec-features-shard", "exec-train-head", "exec-fine-tune"}
    assert "shards" not in spec["root"]["inputDefinitions"]["parameters"]


def test_one_shard_compiles_without_a_loop_and_a_count_below_one_is_refused(tmp_path):
    assert _loops(compile_spec(tmp_path)[0]) == {}
    result = CliRunner().invoke(app, ["compile", "--image", "r/g:1", "--shards", "0"])
    assert result.exit_code == 2 and "--shards" in result.output
