"""validate reads only what changed (issue 25): a file whose listing identity is the one an
earlier inspection recorded is not read again, locally and on the GCS emulator, and the
manifest is the one a cold validate writes."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from common import storage
from components import datasets, validate
from components.config import GraftConfig, with_overrides
from components.validate import build_manifest, read_inspections, write_inspections

CONFIG = GraftConfig(min_images_per_class=5)


@pytest.fixture
def settled(monkeypatch):
    """Files count as settled at once (the default waits SETTLED_NS after their last write)."""
    monkeypatch.setattr(validate, "SETTLED_NS", 0)


@pytest.fixture
def reads(monkeypatch):
    """The image URIs storage.read_bytes is asked for, in order (not the inspections file)."""
    asked = []
    real = storage.read_bytes

    def counting(uri):
        if not str(uri).endswith(".jsonl"):
            asked.append(str(uri))
        return real(uri)

    monkeypatch.setattr(storage, "read_bytes", counting)
    return asked


def _data(root: Path) -> Path:
    datasets.write_synthetic_dataset(str(root), num_classes=2, per_class=8, size=16, seed=1)
    return root


def test_unchanged_files_are_not_read_again_and_the_rows_equal_a_cold_validates(
    tmp_path, settled, reads
):
    data = _data(tmp_path / "data")
    inspections: dict = {}
    cold = build_manifest(str(data), CONFIG, inspections=inspections)
    assert len(reads) == 16 and len(inspections) == 16
    reads.clear()
    again = build_manifest(str(data), CONFIG, inspections=inspections)
    assert reads == [] and again == cold

    changed = sorted((data / "class_0").iterdir())[3]
    other = sorted((data / "class_1").iterdir())[0].read_bytes()
    changed.write_bytes(other)  # another image, written after the inspection
    new = datasets.synthetic_images(num_classes=2, per_class=1, size=16, seed=9)["class_1"][0]
    (data / "class_1" / "new.png").write_bytes(datasets.encode_png(new))
    sorted((data / "class_1").iterdir())[1].unlink()
    reads.clear()
    after = build_manifest(str(data), CONFIG, inspections=inspections)
    assert sorted(reads) == sorted([str(changed), str(data / "class_1" / "new.png")])
    assert after == build_manifest(str(data), CONFIG)  # what a cold validate finds
    assert set(inspections) == {row["uri"] for row in after}  # the removed file forgotten


def test_a_file_rewritten_just_before_its_inspection_is_read_again(tmp_path, reads):
    """Within SETTLED_NS of a write the file's timestamps may not move on the next write:
    such an inspection is not trusted next time (git's racy entries)."""
    data = _data(tmp_path / "data")
    inspections: dict = {}
    build_manifest(str(data), CONFIG, inspections=inspections)  # written a moment ago
    reads.clear()
    build_manifest(str(data), CONFIG, inspections=inspections)
    assert len(reads) == 16


def test_changing_an_inspection_limit_or_the_decoder_reads_everything_again(
    tmp_path, settled, reads, monkeypatch
):
    data = _data(tmp_path / "data")
    inspections: dict = {}
    build_manifest(str(data), CONFIG, inspections=inspections)
    for config in (with_overrides(CONFIG, ["max_pixels=1000"]),
                   with_overrides(CONFIG, ["max_file_bytes=100000"])):  # fmt: skip
        reads.clear()
        build_manifest(str(data), config, inspections=dict(inspections))
        assert len(reads) == 16, config
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",  # a new serving decoder
                        lambda name: "9.9.9" if name == "tensorflow" else real(name))  # fmt: skip
    reads.clear()
    build_manifest(str(data), CONFIG, inspections=inspections)
    assert len(reads) == 16
    reads.clear()
    build_manifest(str(data), with_overrides(CONFIG, ["min_side=2"]), inspections=inspections)
    assert reads == []  # a rule of the suite, not of the inspection: nothing to read


def test_an_unreadable_inspections_line_is_ignored_and_that_file_read_again(
    tmp_path, settled, reads
):
    data = _data(tmp_path / "data")
    inspections: dict = {}
    build_manifest(str(data), CONFIG, inspections=inspections)
    saved = tmp_path / "inspections.jsonl"
    write_inspections(str(saved), inspections)
    lines = saved.read_text().splitlines()
    saved.write_text("\n".join(["{not json"] + lines[1:]) + "\n")
    reads.clear()
    build_manifest(str(data), CONFIG, inspections=read_inspections(str(saved)))
    assert len(reads) == 1
    assert read_inspections(str(tmp_path / "none.jsonl")) == {}


def test_an_overwritten_object_with_the_same_bytes_is_read_again_on_gcs(gcs, reads):
    """GCS identity is the generation: a rewrite is a new one even with equal bytes."""
    images = datasets.synthetic_images(num_classes=1, per_class=12, size=16, seed=2)["class_0"]
    for i, image in enumerate(images):
        storage.write_bytes(f"{gcs}/data/c{i % 2}/{i}.png", datasets.encode_png(image))
    inspections: dict = {}
    first = build_manifest(f"{gcs}/data", CONFIG, inspections=inspections)
    assert len(reads) == 12
    reads.clear()
    assert build_manifest(f"{gcs}/data", CONFIG, inspections=inspections) == first
    assert reads == []  # GCS: no settling wait, the generation is exact
    storage.write_bytes(f"{gcs}/data/c0/0.png", datasets.encode_png(images[0]))
    reads.clear()
    assert build_manifest(f"{gcs}/data", CONFIG, inspections=inspections) == first
    assert reads == [f"{gcs}/data/c0/0.png"]


def test_graft_validate_report_reads_only_what_changed_since_the_last_report(
    tmp_path, settled, reads
):
    from pipeline.cli import app

    data = tmp_path / "data"
    datasets.export_fashion_mnist(str(data), classes=[1, 3, 5], per_class=6, seed=6)
    report = tmp_path / "report"
    runner = CliRunner()
    first = runner.invoke(app, ["validate", "--data", str(data), "--report", str(report)])
    assert first.exit_code == 0, first.output
    assert len(reads) == 18 and (report / validate.INSPECTIONS_FILE).is_file()
    manifest = (report / "manifest.jsonl").read_text()
    reads.clear()
    again = runner.invoke(app, ["validate", "--data", str(data), "--report", str(report)])
    assert again.exit_code == 0, again.output
    assert reads == [] and "18 unchanged since the last report" in " ".join(again.output.split())
    assert (report / "manifest.jsonl").read_text() == manifest
    fresh = runner.invoke(app, ["validate", "--data", str(data), "--report", str(report),
                                "--fresh"])  # fmt: skip
    assert fresh.exit_code == 0 and len(reads) == 18 and "unchanged" not in fresh.output


def test_the_pipelines_validate_steps_keep_the_inspections_beside_the_model(
    tmp_path, settled, reads
):
    """validate_data, and validate_shard + validate_gathered for a fan-out, as a run calls
    them: the second run reads no unchanged file, and both ways keep the same inspections."""
    from kfp.dsl import HTML, Dataset

    from components.shards import validate_gathered, validate_shard
    from components.validate import inspections_uri, validate_data

    data = tmp_path / "data"
    datasets.export_fashion_mnist(str(data), classes=[1, 3, 5], per_class=6, seed=6)
    repo = str(tmp_path / "repo")

    def one_step(run: int) -> str:
        manifest = Dataset(uri=str(tmp_path / f"manifest-{run}.jsonl"))
        validate_data.python_func(data_uri=str(data), manifest=manifest,
                                  validation_report=HTML(uri=str(tmp_path / f"r{run}.html")),
                                  model_repo=repo, model_name="m")  # fmt: skip
        return Path(manifest.path).read_text()

    def fan_out(run: int) -> str:
        parts = []
        for k in range(3):
            part = Dataset(uri=str(tmp_path / f"shard-{run}-{k}"))
            validate_shard.python_func(data_uri=str(data), shard=k, shards=3,
                                       manifest_shard=part, model_repo=repo, model_name="m")  # fmt: skip
            parts.append(part)
        manifest = Dataset(uri=str(tmp_path / f"gathered-{run}.jsonl"))
        validate_gathered.python_func(data_uri=str(data), manifest_shards=parts,
                                      manifest=manifest,
                                      validation_report=HTML(uri=str(tmp_path / f"g{run}.html")),
                                      model_repo=repo, model_name="m")  # fmt: skip
        return Path(manifest.path).read_text()

    first = one_step(0)
    assert len(reads) == 18
    saved = read_inspections(inspections_uri(repo, "m"))
    assert set(saved) == {str(p) for p in data.rglob("*.png")}
    reads.clear()
    assert one_step(1) == first and reads == []
    assert fan_out(2) == first and reads == []  # the shards read the same inspections
    assert read_inspections(inspections_uri(repo, "m")) == saved
