"""Drift on real data: Fashion-MNIST through the shipped base's embeddings, as served.

The model is the shipped base + a head for classes 1,3,5,7,9, exported as push exports it;
requests go through `graft serve --request-log` and `graft watch --on-drift`'s monitor.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.drift import TARGET, Embedder, blur, brighter, export_fashion_model, fashion
from components import drift
from components.check_data import Fingerprint
from components.drift import DriftConfig, DriftDetector, DriftMonitor, read_alarms
from pipeline.watch import watch


@pytest.fixture(scope="module")
def fashion_export(tmp_path_factory) -> Path:
    return export_fashion_model(tmp_path_factory.mktemp("fashion"))


@pytest.fixture(scope="module")
def embed(fashion_export):
    return Embedder(fashion_export)


@pytest.fixture(scope="module")
def images():
    train, train_labels = fashion("train")
    test, test_labels = fashion("test")
    rng = np.random.default_rng(0)
    normal = test[np.isin(test_labels, TARGET)]
    return {
        "reference": train[
            rng.choice(np.flatnonzero(np.isin(train_labels, TARGET)), 1000, replace=False)
        ],  # fmt: skip
        "normal": normal[rng.permutation(len(normal))],
        "bag": test[test_labels == 8],
    }


@pytest.fixture(scope="module")
def reference(embed, images):
    return embed(images["reference"])


def _alarm_after(detector, embeddings) -> int | None:
    for start in range(0, len(embeddings), detector.config.step):
        if detector.add(embeddings[start : start + detector.config.step]) is not None:
            return start + detector.config.step
    return None


def test_unshifted_held_out_traffic_raises_no_alarm(embed, images, reference):
    detector = DriftDetector(reference, DriftConfig())
    assert _alarm_after(detector, embed(images["normal"][:2000])) is None
    assert detector.tests == 18


@pytest.mark.parametrize("shift", ["blur", "brightness", "unseen_class"])
def test_each_shift_is_detected_within_500_logged_requests(shift, embed, images, reference):
    detector = DriftDetector(reference, DriftConfig())
    onset = embed(images["normal"][:300])
    assert _alarm_after(detector, onset) is None
    traffic = images["normal"][2000:2500].copy()
    if shift == "blur":
        traffic = blur(traffic)
    elif shift == "brightness":
        traffic = brighter(traffic)
    else:
        rows = np.random.default_rng(1).random(len(traffic)) < 0.2
        traffic[rows] = images["bag"][: rows.sum()]
    at = _alarm_after(detector, embed(traffic))
    assert at is not None and at <= 500, f"{shift}: alarm after {at} requests"


def test_push_stores_reference_embeddings_of_training_originals_only(fashion_export, tmp_path):
    from components import examples
    from components.push import _drift_reference

    train, labels = fashion("train")
    picked = [i for i in range(200) if labels[i] in TARGET][:30]
    records = [(train[i][..., None], TARGET.index(labels[i]), 0, f"s{i}") for i in picked]
    records += [(255 - train[i][..., None], TARGET.index(labels[i]), 1, f"s{i}") for i in picked]
    examples_dir = tmp_path / "examples"
    examples.write_split(examples_dir, "train", records)
    examples.write_metadata(examples_dir, [f"c{c}" for c in TARGET],
                            {"image_size": 28, "channels": 1, "views": 1})  # fmt: skip
    export = tmp_path / "export"
    import shutil

    shutil.copytree(fashion_export, export)
    info = _drift_reference(export, examples_dir)
    stored = np.load(export / drift.REFERENCE_FILE)
    assert stored.shape == (30, 448) and info["count"] == 30  # the views are not in it
    per_label = json.loads((export / drift.REFERENCE_INFO_FILE).read_text())["per_label"]
    assert per_label == {f"c{c}": n for c in TARGET if (n := int((labels[picked] == c).sum()))}
    originals = Embedder(export)(np.stack([train[i] for i in picked]))
    np.testing.assert_allclose(np.sort(stored.sum(1)), np.sort(originals.sum(1)), rtol=1e-4)


def test_logged_blurred_requests_start_one_retrain_recorded_in_the_repository(
    fashion_export, images, tmp_path
):
    import shutil

    from components.datasets import encode_png
    from serving.client import PredictClient
    from serving.server import ModelServer

    repo, logs = tmp_path / "repo", tmp_path / "logs"
    version = repo / "fashion" / "1"
    shutil.copytree(fashion_export, version)
    pngs = [encode_png(i) for i in images["reference"]]
    drift.write_reference(version, pngs, {"source": "test"})

    server = ModelServer(str(repo), "fashion", request_log=str(logs))
    port = server.start(0)
    try:
        client = PredictClient(f"127.0.0.1:{port}")
        blurred = [encode_png(i) for i in blur(images["normal"][:600])]
        for start in range(0, 600, 10):  # 60 requests of 10 images: 600 logged images
            client.predict_images("fashion", blurred[start : start + 10])
    finally:
        server.stop(1)

    retrains: list[Fingerprint] = []

    def run_watch():
        watch("unused", every_seconds=0, trigger=lambda fp: pytest.fail("no new data"),
              max_polls=3, sleep=lambda _: None, last_triggered="d",
              fingerprint=lambda _: Fingerprint("d", 1),
              drift=DriftMonitor(str(repo), "fashion", str(logs)).check,
              on_drift=retrains.append)  # fmt: skip

    run_watch()
    assert len(retrains) == 1  # 600 drifted images, tested 4 times: one alarm
    (alarm,) = read_alarms(str(repo / "fashion"))
    assert alarm["version"] == 1 and alarm["p_value"] < DriftConfig.alpha
    assert alarm["reference_images"] == 1000 and alarm["window_requests"] == 300
    assert "MMD" in alarm["reason"]
    run_watch()  # a restarted watcher reads the same log: the recorded alarm stands
    assert len(retrains) == 1 and len(read_alarms(str(repo / "fashion"))) == 1
