"""The graft DAG: check_data -> validate -> augment -> train_head -> [converged] fine_tune
-> evaluate -> [blessed] push, with every gate a visible `dsl.If`.

    python -m pipeline.pipeline pipeline.yaml      # compile with defaults (no image override)
    graft compile --image REGISTRY/graft:TAG -o pipeline.yaml

`build_pipeline(gpu)` returns the pipeline function: the GPU node pool is a compile-time
choice (kfp fixes task settings when the pipeline function is traced), so local runs
build it with `gpu=None` and cluster compiles with the pool's selector and toleration.
"""

import sys
from dataclasses import dataclass

from kfp import dsl

from components.augment import augment
from components.check_data import check_data
from components.config import GraftConfig
from components.evaluate import evaluate
from components.fine_tune import fine_tune
from components.push import push
from components.train_head import train_head
from components.validate import validate_data

PIPELINE_NAME = "graft"
TRAINING_TASKS = ("train-head", "fine-tune")  # the only tasks that ask for GPUs
_DEFAULTS = GraftConfig()


@dataclass(frozen=True)
class GpuPool:
    """Where the training steps run on a cluster."""

    accelerator_type: str = "nvidia.com/gpu"  # resource name the device plugin exposes
    accelerator_limit: int = 1  # one GPU per training step; the feature cache keeps it busy
    node_selector: tuple[str, str] = ("cloud.google.com/gke-accelerator", "nvidia-l4")
    toleration_key: str = "nvidia.com/gpu"  # GKE taints GPU pools with this key


def _on_gpu(task: dsl.PipelineTask, gpu: GpuPool | None) -> dsl.PipelineTask:
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


def build_pipeline(gpu: GpuPool | None = None, *, retries: bool = True):
    """The pipeline function, with training steps on ``gpu`` (None: no GPU settings).

    ``retries`` re-runs I/O-heavy steps with backoff on a cluster (a node or the bucket
    hiccups); local runs turn it off, since storage calls already retry transient errors
    and a deterministic failure should be reported at once.
    """

    def _io_heavy(task: dsl.PipelineTask) -> dsl.PipelineTask:
        if retries:
            task.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0)
        return task

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Transfer learning from labelled images to a TF Serving model repository.",
    )
    def graft_pipeline(
        data_uri: str,
        model_repo: str,
        model_name: str = "graft",
        base: str = _DEFAULTS.base,
        weights: str = _DEFAULTS.weights,
        image_size: int = _DEFAULTS.image_size,
        channels: int = _DEFAULTS.channels,
        views: int = _DEFAULTS.views,
        val_fraction: float = _DEFAULTS.val_fraction,
        test_fraction: float = _DEFAULTS.test_fraction,
        seed: int = _DEFAULTS.seed,
        min_images_per_class: int = _DEFAULTS.min_images_per_class,
        max_imbalance_ratio: float = _DEFAULTS.max_imbalance_ratio,
        io_concurrency: int = _DEFAULTS.io_concurrency,
        head_hidden_units: int = _DEFAULTS.head_hidden_units,
        dropout: float = _DEFAULTS.dropout,
        batch_size: int = _DEFAULTS.batch_size,
        head_learning_rate: float = _DEFAULTS.head_learning_rate,
        head_max_epochs: int = _DEFAULTS.head_max_epochs,
        patience: int = _DEFAULTS.patience,
        min_delta: float = _DEFAULTS.min_delta,
        fine_tune_layers: int = _DEFAULTS.fine_tune_layers,
        fine_tune_from_layer: str = _DEFAULTS.fine_tune_from_layer,
        fine_tune_learning_rate: float = _DEFAULTS.fine_tune_learning_rate,
        fine_tune_max_epochs: int = _DEFAULTS.fine_tune_max_epochs,
        scratch_baseline: bool = _DEFAULTS.scratch_baseline,
        top_k: int = _DEFAULTS.top_k,
        bless_min_accuracy: float = _DEFAULTS.bless_min_accuracy,
        bless_tolerance: float = _DEFAULTS.bless_tolerance,
        bless_class_tolerance: float = _DEFAULTS.bless_class_tolerance,
        force: bool = False,
        min_new_images: int = 0,
        verify_target: str = "",
    ):
        checked = _io_heavy(
            check_data(
                data_uri=data_uri,
                model_repo=model_repo,
                model_name=model_name,
                force=force,
                min_new_images=min_new_images,
            )
        ).set_caching_options(False)  # it exists to look at the bucket afresh

        with dsl.If(checked.outputs["Output"] == True, name="data-changed"):  # noqa: E712
            validated = _io_heavy(
                validate_data(
                    data_uri=data_uri,
                    min_images_per_class=min_images_per_class,
                    max_imbalance_ratio=max_imbalance_ratio,
                    io_concurrency=io_concurrency,
                )
            ).set_caching_options(False)  # reads the bucket, whose URI does not change
            augmented = _io_heavy(
                augment(
                    data_uri=data_uri,
                    manifest=validated.outputs["manifest"],
                    image_size=image_size,
                    channels=channels,
                    views=views,
                    val_fraction=val_fraction,
                    test_fraction=test_fraction,
                    seed=seed,
                    io_concurrency=io_concurrency,
                )
            ).set_caching_options(False)
            head = _on_gpu(
                train_head(
                    examples=augmented.outputs["examples"],
                    base=base,
                    weights=weights,
                    head_hidden_units=head_hidden_units,
                    dropout=dropout,
                    batch_size=batch_size,
                    head_learning_rate=head_learning_rate,
                    head_max_epochs=head_max_epochs,
                    patience=patience,
                    min_delta=min_delta,
                    seed=seed,
                    scratch_baseline=scratch_baseline,
                ),
                gpu,
            )

            with dsl.If(head.outputs["Output"] == True, name="head-converged"):  # noqa: E712
                tuned = _on_gpu(
                    fine_tune(
                        examples=augmented.outputs["examples"],
                        head_model=head.outputs["head_model"],
                        fine_tune_layers=fine_tune_layers,
                        fine_tune_from_layer=fine_tune_from_layer,
                        fine_tune_learning_rate=fine_tune_learning_rate,
                        fine_tune_max_epochs=fine_tune_max_epochs,
                        patience=patience,
                        batch_size=batch_size,
                        seed=seed,
                    ),
                    gpu,
                )
                evaluated = evaluate(
                    examples=augmented.outputs["examples"],
                    model=tuned.outputs["finetuned_model"],
                    model_repo=model_repo,
                    model_name=model_name,
                    top_k=top_k,
                    bless_min_accuracy=bless_min_accuracy,
                    bless_tolerance=bless_tolerance,
                    bless_class_tolerance=bless_class_tolerance,
                )

                with dsl.If(evaluated.outputs["Output"] == True, name="blessed"):  # noqa: E712
                    _io_heavy(
                        push(
                            model=tuned.outputs["finetuned_model"],
                            examples=augmented.outputs["examples"],
                            evaluation=evaluated.outputs["evaluation"],
                            data_state=checked.outputs["data_state"],
                            model_repo=model_repo,
                            model_name=model_name,
                            top_k=top_k,
                            verify_target=verify_target,
                        )
                    )

    return graft_pipeline


if __name__ == "__main__":
    from components.config import GRAFT_IMAGE
    from pipeline.kfp_api import compile_pipeline

    out = sys.argv[1] if len(sys.argv) > 1 else "pipeline.yaml"
    compile_pipeline(build_pipeline(GpuPool()), out, image=GRAFT_IMAGE)
