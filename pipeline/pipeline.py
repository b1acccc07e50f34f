"""The graft DAG: check_data -> validate -> augment -> train_head -> [converged] fine_tune
-> evaluate -> [blessed] push, with every gate a visible `dsl.If`. A head that did not
converge skips fine_tune only: its branch evaluates the head-only model and pushes it if
blessed (kfp names that branch's tasks ``evaluate-2`` and ``push-2``).

    python -m pipeline.pipeline pipeline.yaml      # compile with defaults (no image override)
    graft compile --image REGISTRY/graft:TAG -o pipeline.yaml

`build_pipeline(gpu)` returns the pipeline function: the GPU node pool is a compile-time
choice (kfp fixes task settings when the pipeline function is traced), so local runs
build it with `gpu=None` and cluster compiles with the pool's selector and toleration.

Its parameters are the run's own (``RUN_PARAMETERS``) and one per GraftConfig field, with
the field's name and default (``PIPELINE_SIGNATURE``); each step gets the settings its
component's signature names (``settings_for``), so a new field needs only its dataclass line
and the signature of the step that uses it. ``step_order()`` reads the task order off the DAG.

``build_pipeline(shards=N)`` with N > 1 fans validate, augment and the feature pass out over
N shards (components/shards.py): ``dsl.ParallelFor`` loops with parallelism N, each gathered
by a task taking ``dsl.Collected`` of the shards' artifacts; the gathered examples and
features are those of ``shards=1``, whose DAG is the one above. The shard count is part of
the DAG, so it is fixed when the pipeline is built (``DAG_SETTINGS``), not a run parameter.
"""

import dataclasses
import functools
import inspect
import json
import sys
from dataclasses import dataclass

from kfp import dsl

from components.augment import augment
from components.check_data import check_data
from components.config import DAG_SETTINGS, SETTINGS, GraftConfig, kfp_value
from components.evaluate import evaluate
from components.fine_tune import fine_tune
from components.push import push
from components.shards import (
    augment_shard,
    features_shard,
    gather_examples,
    gather_features,
    validate_gathered,
    validate_shard,
)
from components.train_head import train_head
from components.validate import validate_data

PIPELINE_NAME = "graft"
_DEFAULTS = GraftConfig()
_KEYWORD = inspect.Parameter.POSITIONAL_OR_KEYWORD


@dataclass(frozen=True)
class GpuPool:
    """Where the training steps run on a cluster."""

    accelerator_type: str = "nvidia.com/gpu"  # resource name the device plugin exposes
    accelerator_limit: int = 1  # one GPU per training step; the feature cache keeps it busy
    node_selector: tuple[str, str] = ("cloud.google.com/gke-accelerator", "nvidia-l4")
    toleration_key: str = "nvidia.com/gpu"  # GKE taints GPU pools with this key


# The run's own parameters; every GraftConfig field is a pipeline parameter too (same name,
# same default), so `--set`/`--param` reach the steps by one set of names.
RUN_PARAMETERS = (
    inspect.Parameter("data_uri", _KEYWORD, annotation=str),
    inspect.Parameter("model_repo", _KEYWORD, annotation=str),
    inspect.Parameter("model_name", _KEYWORD, annotation=str, default="graft"),
    inspect.Parameter("force", _KEYWORD, annotation=bool, default=False),
    inspect.Parameter("min_new_images", _KEYWORD, annotation=int, default=0),
    inspect.Parameter("verify_target", _KEYWORD, annotation=str, default=""),
)


def _setting_parameter(setting: dataclasses.Field) -> inspect.Parameter:
    kfp_type = {"int": int, "float": float, "str": str, "bool": bool}.get(str(setting.type), list)
    default = kfp_value(getattr(_DEFAULTS, setting.name))
    return inspect.Parameter(setting.name, _KEYWORD, annotation=kfp_type, default=default)


RUN_SETTINGS = tuple(f for f in dataclasses.fields(GraftConfig) if f.name not in DAG_SETTINGS)
PIPELINE_SIGNATURE = inspect.Signature([*RUN_PARAMETERS, *map(_setting_parameter, RUN_SETTINGS)])


def settings_for(component, parameters: dict) -> dict:
    """The pipeline parameters that are settings ``component`` takes (its signature says
    which settings a step uses); the DAG's own (``shards``) are passed as constants."""
    return {name: parameters[name] for name in component.component_spec.inputs
            if name in SETTINGS and name not in DAG_SETTINGS}  # fmt: skip


def _training_step(task: dsl.PipelineTask, gpu: GpuPool | None) -> dsl.PipelineTask:
    """CPU and memory requests for a training step, plus the GPU pool's settings if any."""
    task.set_cpu_request("2").set_memory_request("8G")
    if gpu is None:
        return task
    from kfp import kubernetes

    task.set_accelerator_type(gpu.accelerator_type).set_accelerator_limit(gpu.accelerator_limit)
    kubernetes.add_node_selector(
        task, label_key=gpu.node_selector[0], label_value=gpu.node_selector[1]
    )
    kubernetes.add_toleration(task, key=gpu.toleration_key, operator="Exists", effect="NoSchedule")
    return task


def build_pipeline(gpu: GpuPool | None = None, *, retries: bool = True, shards: int = 1):
    """The pipeline function, with training steps on ``gpu`` (None: no GPU settings).

    ``retries`` re-runs I/O-heavy steps with backoff on a cluster (a node or the bucket
    hiccups); local runs turn it off, since storage calls already retry transient errors
    and a deterministic failure should be reported at once. ``shards`` > 1 fans the data
    steps out (the module docstring).
    """
    GraftConfig(shards=shards)  # refuses a count no DAG can have, naming the setting

    def _io_heavy(task: dsl.PipelineTask) -> dsl.PipelineTask:
        if retries:
            task.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0)
        return task

    def graft_pipeline(*args, **kwargs):
        # kfp calls this with one argument per PIPELINE_SIGNATURE parameter, in order.
        p = PIPELINE_SIGNATURE.bind(*args, **kwargs).arguments
        data_uri, model_repo, model_name = p["data_uri"], p["model_repo"], p["model_name"]
        checked = _io_heavy(
            check_data(
                data_uri=data_uri,
                model_repo=model_repo,
                model_name=model_name,
                force=p["force"],
                min_new_images=p["min_new_images"],
                **settings_for(check_data, p),
            )
        ).set_caching_options(False)  # it exists to look at the bucket afresh

        with dsl.If(checked.outputs["Output"] == True, name="data-changed"):  # noqa: E712
            if shards == 1:
                validated = _io_heavy(
                    validate_data(data_uri=data_uri, model_repo=model_repo,
                                  model_name=model_name, **settings_for(validate_data, p))  # fmt: skip
                ).set_caching_options(False)  # reads the bucket, whose URI does not change
                augmented = _io_heavy(
                    augment(
                        data_uri=data_uri,
                        manifest=validated.outputs["manifest"],
                        model_repo=model_repo,  # the reuse store lives beside the versions
                        **settings_for(augment, p),
                    )
                ).set_caching_options(False)
                examples, features = augmented.outputs["examples"], {}
            else:
                examples, features = _fan_out(p, shards, gpu, _io_heavy)
            head = _training_step(
                train_head(
                    examples=examples,
                    model_repo=model_repo,  # the reuse store lives beside the versions
                    **features,
                    **settings_for(train_head, p),
                ),
                gpu,
            )

            def evaluate_and_push(model):
                """evaluate ``model``, then push it if blessed: the end of both branches."""
                evaluated = evaluate(
                    examples=examples,
                    model=model,
                    data_state=checked.outputs["data_state"],
                    model_repo=model_repo,
                    model_name=model_name,
                    **settings_for(evaluate, p),
                )
                with dsl.If(evaluated.outputs["Output"] == True, name="blessed"):  # noqa: E712
                    _io_heavy(
                        push(
                            model=model,
                            examples=examples,
                            evaluation=evaluated.outputs["evaluation"],
                            data_state=checked.outputs["data_state"],
                            model_repo=model_repo,
                            model_name=model_name,
                            verify_target=p["verify_target"],
                            **settings_for(push, p),
                        )
                    )

            # Convergence gates fine-tuning only (unfreezing layers under a head still
            # learning wrecks the pretrained features): an unconverged head is evaluated and
            # pushed if blessed. Two branches, because kfp.local (2.17) fails dsl.OneOf
            # over artifacts ("Expected 1 artifact in ArtifactSelectorSpec. Got: 2").
            with dsl.If(head.outputs["Output"] == True, name="head-converged"):  # noqa: E712
                chosen = _training_step(
                    fine_tune(
                        examples=examples,
                        head_model=head.outputs["head_model"],
                        **settings_for(fine_tune, p),
                    ),
                    gpu,
                )
                evaluate_and_push(chosen.outputs["model"])
            with dsl.Else(name="head-not-converged"):
                evaluate_and_push(head.outputs["head_model"])

    graft_pipeline.__signature__ = PIPELINE_SIGNATURE
    graft_pipeline = dsl.pipeline(
        name=PIPELINE_NAME,
        description="Transfer learning from labelled images to a TF Serving model repository.",
    )(graft_pipeline)
    return graft_pipeline


def _fan_out(p: dict, shards: int, gpu: GpuPool | None, io_heavy) -> tuple:
    """validate, augment and the feature pass over ``shards`` shards, each loop gathered;
    returns (the examples, train_head's features argument)."""
    data_uri = p["data_uri"]
    with dsl.ParallelFor(list(range(shards)), name="validate-shards", parallelism=shards) as k:
        inspected = io_heavy(
            validate_shard(
                data_uri=data_uri, shard=k, shards=shards, model_repo=p["model_repo"],
                model_name=p["model_name"], **settings_for(validate_shard, p)
            )  # fmt: skip
        ).set_caching_options(False)  # reads the bucket
    validated = io_heavy(
        validate_gathered(
            data_uri=data_uri,
            manifest_shards=dsl.Collected(inspected.outputs["manifest_shard"]),
            model_repo=p["model_repo"],
            model_name=p["model_name"],
            **settings_for(validate_gathered, p),
        )
    ).set_caching_options(False)  # lists the bucket again, to refuse a change mid-run
    manifest = validated.outputs["manifest"]
    with dsl.ParallelFor(list(range(shards)), name="augment-shards", parallelism=shards) as k:
        part = io_heavy(
            augment_shard(
                data_uri=data_uri,
                manifest=manifest,
                shard=k,
                shards=shards,
                model_repo=p["model_repo"],  # the reuse store lives beside the versions
                **settings_for(augment_shard, p),
            )  # fmt: skip
        ).set_caching_options(False)
        part_features = _training_step(
            features_shard(
                examples_shard=part.outputs["examples_shard"],
                model_repo=p["model_repo"],
                **settings_for(features_shard, p),
            ),
            gpu,
        )
    gathered = gather_examples(
        manifest=manifest,
        examples_shards=dsl.Collected(part.outputs["examples_shard"]),
        **settings_for(gather_examples, p),
    )
    features = gather_features(
        features_shards=dsl.Collected(part_features.outputs["shard_features"])
    )
    return gathered.outputs["examples"], {"features": features.outputs["features"]}


@functools.cache
def step_order(shards: int = 1) -> tuple[str, ...]:
    """Task names in the order the DAG runs them (kfp.local names each task's directory so),
    read from the pipeline itself rather than kept as a second list. A task of a fan-out
    loop is named once per shard, ``augment-shard[k]`` (kfp.local runs it in the folder
    ``for-loop-*-iteration-k/augment-shard``)."""
    spec = build_pipeline(gpu=None, retries=False, shards=shards).pipeline_spec

    def ordered(dag) -> list[str]:
        names, done = [], set()
        pending = dict(dag.tasks)
        while pending:
            ready = sorted(n for n, t in pending.items() if set(t.dependent_tasks) <= done)
            if not ready:
                raise ValueError(f"The pipeline's DAG has a cycle among {sorted(pending)}")
            for name in ready:
                task = pending.pop(name)
                done.add(name)
                inner = spec.components[task.component_ref.name]
                if not inner.HasField("dag"):
                    names.append(name)
                elif task.HasField("parameter_iterator"):
                    items = json.loads(task.parameter_iterator.items.raw)
                    names += [f"{n}[{k}]" for k in range(len(items)) for n in ordered(inner.dag)]
                else:
                    names += ordered(inner.dag)
        return names

    return tuple(ordered(spec.root.dag))


if __name__ == "__main__":
    from components.config import GRAFT_IMAGE
    from pipeline.kfp_api import compile_pipeline

    out = sys.argv[1] if len(sys.argv) > 1 else "pipeline.yaml"
    compile_pipeline(build_pipeline(GpuPool()), out, image=GRAFT_IMAGE)
