"""The fan-out under kfp.local: shards=4 runs ParallelFor loops gathered with Collected, and
its manifest, examples and features are shards=1's, byte for byte."""

import hashlib
import json
from pathlib import Path

import pytest

from components import datasets
from pipeline.run import run_local
from tests.integration.conftest import tiny_config

pytestmark = pytest.mark.slow


def _digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}  # fmt: skip


def test_four_shards_under_kfp_local_give_one_shards_manifest_examples_and_features(
    tmp_path, tiny_base
):
    from components import training
    from components.backbones import build_base
    from components.train_head import cached_features

    bucket = str(tmp_path / "bucket")
    # a seed whose content-hash split gives every class val and test images
    datasets.write_synthetic_dataset(bucket, num_classes=3, per_class=20, size=32, seed=1)
    one = run_local(bucket, str(tmp_path / "m1"), "tiny", tiny_config(tiny_base),
                    pipeline_root=tmp_path / "runs1")  # fmt: skip
    four = run_local(bucket, str(tmp_path / "m4"), "tiny", tiny_config(tiny_base, "shards=4"),
                     pipeline_root=tmp_path / "runs4")  # fmt: skip

    assert one.ran()[:4] == ["check-data", "validate-data", "augment", "train-head"]
    assert four.shards == 4
    assert four.ran()[:6] == ["check-data", "validate-shard[0]", "validate-shard[1]",
                              "validate-shard[2]", "validate-shard[3]", "validate-gathered"]  # fmt: skip
    assert {f"{t}[{k}]" for t in ("augment-shard", "features-shard") for k in range(4)} <= set(four.ran())  # fmt: skip
    assert four.pushed_version is not None, four.outcome

    def artifact(summary, task, name):
        return summary.tasks[task].artifacts[name]

    manifest_one = Path(artifact(one, "validate-data", "manifest")).read_bytes()
    manifest_four = Path(artifact(four, "validate-gathered", "manifest")).read_bytes()
    assert manifest_four == manifest_one and len(manifest_one.splitlines()) == 60
    examples_one = artifact(one, "augment", "examples")
    examples_four = artifact(four, "gather-examples", "examples")
    digests_four, digests_one = _digests(examples_four), _digests(examples_one)
    assert len(digests_one) == 6  # 3 splits, labels, spec, test sources
    assert {k: v for k, v in digests_four.items() if k != "spec.json"} == {
        k: v for k, v in digests_one.items() if k != "spec.json"}  # fmt: skip
    # spec.json too, but for the reuse store's URI (each run's is beside its own repository)
    spec_four, spec_one = (json.loads(Path(d, "spec.json").read_text()) for d in (examples_four, examples_one))  # fmt: skip
    store_four, store_one = spec_four["reuse"].pop("store"), spec_one["reuse"].pop("store")
    assert spec_four == spec_one and (store_four, store_one) == (str(tmp_path / "m4" / ".graft-reuse"), str(tmp_path / "m1" / ".graft-reuse"))  # fmt: skip

    # the gathered feature shards are the ones train_head writes over shards=1's examples
    gathered = _digests(artifact(four, "gather-features", "features"))
    config = tiny_config(tiny_base)
    with training.training_setup(config.precision, config.replicas) as setup:
        base = build_base(config.base, image_size=32, channels=3, weights=config.weights)
        base.trainable = False
        made = cached_features(base, examples_one, tmp_path / "expected", policy=setup.policy)
    expected = _digests(tmp_path / "expected")
    assert made["counts"]["train"] > 0 and set(expected) == {"train-00000.tfrecord", "val-00000.tfrecord"}  # fmt: skip
    assert {k: v for k, v in gathered.items() if k.endswith(".tfrecord")} == expected

    # train_head trained on the gathered features: the same head, epoch for epoch
    def head_record(summary):
        return json.loads(Path(artifact(summary, "train-head", "head_model"), "training.json").read_text())  # fmt: skip

    assert head_record(four)["history"] == head_record(one)["history"]
    # each run its own reuse store (m1, m4): both computed every image; the summary says so
    assert four.reuse()["gather-examples"]["computed"] == one.reuse()["augment"]["computed"] == 60
    reuse_four, reuse_one = four.reuse()["train-head"], one.reuse()["train-head"]
    assert (reuse_four["reused"], reuse_four["computed"]) == (reuse_one["reused"], reuse_one["computed"])  # fmt: skip
    assert reuse_one["computed"] > 0
