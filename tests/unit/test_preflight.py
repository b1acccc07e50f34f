"""Issue 23 classes 3-5: what can be known before a run is checked before it, at every entry
point (run, watch, submit, schedule, validate, pretrain, serve, predict, data), and errors a
user can fix (no credentials, an unwritable output, a missing dataset) end as one line."""

import pytest

from common import model_repository, storage
from components import backbones
from components.config import GraftConfig
from serving.server import parse_policy
from tests.conftest import free_port
from tests.kfp_recorder import KfpRecorder
from tests.unit.test_cli_refusals import refused
from tests.unit.test_config import gray_base


@pytest.fixture
def dataset(tmp_path):
    from components.datasets import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "d", num_classes=2, per_class=5, size=16, seed=0)
    return tmp_path / "d"


@pytest.fixture
def base(tmp_path):
    return gray_base(tmp_path / "gray.keras")


# --- class 4: a model name is one safe path segment, everywhere -------------------------------


@pytest.mark.parametrize("name", ["../escaped", "a/b", "..", ".", "", ".hidden", "a\\b", "x" * 256])
def test_a_model_name_that_is_not_one_safe_folder_is_refused(name):
    with pytest.raises(model_repository.ModelRepositoryError, match="a model name is one folder"):
        model_repository.model_root("/repo", name)


@pytest.mark.parametrize("name", ["graft", "fm-v2", "my_model.1", "A9"])
def test_a_plain_model_name_is_one_folder_under_the_repository(name):
    assert model_repository.model_root("/repo", name) == f"/repo/{name}"


def test_run_with_an_escaping_model_name_stops_before_anything_is_written(tmp_path, dataset, base):
    message = refused("run", "--data", dataset, "--model-repo", tmp_path / "r", "--base", base,
                      "--model-name", "../escaped")  # fmt: skip
    assert "Received `model_name='../escaped'`: a model name is one folder" in message
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "r").exists()


def test_watch_serve_and_submit_refuse_an_escaping_model_name(tmp_path, dataset, base):
    expected = "a model name is one folder under the model repository"
    assert expected in refused("watch", "--data", dataset, "--model-repo", tmp_path / "r",
                               "--base", base, "--model-name", "../x", "--max-polls", "1")  # fmt: skip
    assert expected in refused("serve", "--model-repo", tmp_path, "--model-name", "../x")
    with KfpRecorder() as kfp:
        assert expected in refused("submit", "--host", kfp.url, "--image", "r/g:1",
                                   "--param", "model_name=../x")  # fmt: skip
        assert expected in refused("watch", "--data", dataset, "--host", kfp.url,
                                   "--model-name", "../x", "--max-polls", "1")  # fmt: skip
        assert kfp.requests == []


# --- class 4: version policies read as TF Serving reads them ----------------------------------


@pytest.mark.parametrize(
    "policy, parsed",
    [("latest:1", ("latest", [1])), ("latest", ("latest", [1])), ("latest:3", ("latest", [3])),
     ("latest:0", ("latest", [1])),  # TF Serving: max(N, 1)
     ("specific:4,2", ("specific", [4, 2])), ("specific:0", ("specific", [0]))],
)  # fmt: skip
def test_version_policies_parse_as_tf_serving_reads_them(policy, parsed):
    assert parse_policy(policy) == parsed


@pytest.mark.parametrize(
    "policy", ["specific:", "specific", "latest:", "latest:-1", "specific:1,,2", "specific:x",
               "newest:1", "latest:1,2"],
)  # fmt: skip
def test_a_version_policy_naming_no_version_is_refused(policy, tmp_path):
    with pytest.raises(ValueError, match="expected latest:N, specific:V1,V2 or all"):
        parse_policy(policy)
    assert "expected latest:N, specific:V1,V2 or all" in refused(
        "serve", "--model-repo", tmp_path, "--model-name", "m", "--versions", policy
    )


# --- class 4: inputs exist and outputs are writable before any work ---------------------------


def test_run_on_a_missing_dataset_stops_at_start_with_one_line(tmp_path, base):
    message = refused("run", "--data", tmp_path / "nope", "--model-repo", tmp_path / "r",
                      "--base", base, "--pipeline-root", tmp_path / "runs")  # fmt: skip
    assert f"Received `--data {tmp_path / 'nope'}`: no such directory" in message
    assert not (tmp_path / "runs").exists()


def test_watch_on_missing_data_or_an_unwritable_repository_exits_2(tmp_path, dataset, base):
    assert "no such directory" in refused(
        "watch", "--data", tmp_path / "nope", "--model-repo", tmp_path / "r", "--base", base,
        "--max-polls", "1",
    )  # fmt: skip
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert "Cannot write to the model repository" in refused(
        "watch", "--data", dataset, "--model-repo", blocker / "r", "--base", base,
        "--max-polls", "1",
    )  # fmt: skip


def test_pretrain_to_an_unwritable_place_stops_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    message = refused("pretrain", "--out", blocker / "base.keras", "--per-class", "5",
                      "--epochs", "1")  # fmt: skip
    assert f"Received `--out {blocker / 'base.keras'}`: cannot write there" in message


def test_validate_with_an_unwritable_report_stops_before_reading_the_data(tmp_path, dataset):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    message = refused("validate", "--data", dataset, "--report", blocker / "report")
    assert f"Received `--report {blocker / 'report'}`: cannot write there" in message


# --- class 3: what needs the base is checked against the base, at start -----------------------


def test_fine_tune_from_a_layer_the_base_lacks_is_refused_naming_its_layers(tmp_path, base):
    message = refused("run", "--data", tmp_path, "--model-repo", tmp_path / "r", "--base", base,
                      "--set", "fine_tune_from_layer=no_such_layer")  # fmt: skip
    assert "`fine_tune_from_layer='no_such_layer'`: the base" in message
    assert "its layers with weights, bottom to top: top_conv" in message


def test_fine_tune_from_a_layer_the_base_has_is_kept(base):
    from pipeline.settings import run_settings

    resolved = run_settings(["fine_tune_from_layer=top_conv"], base=base)
    assert resolved.config.fine_tune_from_layer == "top_conv"


def test_an_application_base_below_its_smallest_input_is_refused():
    with pytest.raises(ValueError, match="take images of at least 32x32"):
        backbones.check_base_settings(GraftConfig(image_size=16, weights="none"))


def test_a_weights_file_is_refused_for_a_keras_base_and_when_missing(tmp_path, base):
    with pytest.raises(ValueError, match="cannot apply to the base"):
        backbones.check_base_settings(GraftConfig(base=base, channels=1, weights="w.h5"))
    with pytest.raises(ValueError, match="`weights=.*missing.h5`: no such file"):
        backbones.check_base_settings(GraftConfig(weights=str(tmp_path / "missing.h5")))


def test_the_default_base_offline_is_refused_at_start_with_the_fix(tmp_path, dataset, monkeypatch):
    # No network: the weights' origin is a closed loopback port; Keras' cache is empty.
    monkeypatch.setattr(backbones, "KERAS_WEIGHTS_ORIGIN", f"http://127.0.0.1:{free_port()}/")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    (tmp_path / "keras").mkdir()
    message = refused("run", "--data", dataset, "--model-repo", tmp_path / "r",
                      "--pipeline-root", tmp_path / "runs")  # fmt: skip
    assert "The base mobilenet_v2 needs its imagenet weights" in message
    assert "give --base a .keras base" in message and "pre-download the weights" in message
    assert not (tmp_path / "runs").exists()


def test_cached_imagenet_weights_need_no_network(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "KERAS_WEIGHTS_ORIGIN", f"http://127.0.0.1:{free_port()}/")
    _, name = backbones.imagenet_weights("mobilenet_v2", 96)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / name).write_bytes(b"cached")
    backbones.check_weights_available(GraftConfig(), keras_home=str(tmp_path))  # no raise
    with pytest.raises(ValueError, match="resnet50_weights_tf_dim_ordering_tf_kernels_notop"):
        backbones.check_weights_available(GraftConfig(base="resnet50"), keras_home=str(tmp_path))


@pytest.mark.parametrize(
    "base, size, module, constant",
    [("mobilenet_v2", 96, "mobilenet_v2", "BASE_WEIGHT_PATH"),
     ("mobilenet_v2", 100, "mobilenet_v2", "BASE_WEIGHT_PATH"),
     ("resnet50", 96, "resnet", "BASE_WEIGHTS_PATH"),
     ("vgg16", 96, "vgg16", "WEIGHTS_PATH_NO_TOP"),
     ("efficientnet_b0", 96, "efficientnet", "BASE_WEIGHTS_PATH")],
)  # fmt: skip
def test_imagenet_weight_urls_are_the_ones_keras_downloads(base, size, module, constant):
    import importlib

    keras_url = getattr(importlib.import_module(f"keras.src.applications.{module}"), constant)
    url, name = backbones.imagenet_weights(base, size)
    assert url.startswith(keras_url.rsplit("/", 1)[0] + "/") and url.endswith("/" + name)
    if base == "mobilenet_v2":
        assert name.endswith(f"_1.0_{size if size == 96 else 224}_no_top.h5")


@pytest.mark.parametrize("command", [["submit"], ["schedule", "create"]])
@pytest.mark.parametrize(
    "setting, message",
    [("seed=-1", "`seed=-1`: expected 0..2147483647"),
     ("base=bogus_net", "`base='bogus_net'`"),
     ("fine_tune_from_layer=no_such_layer", "`fine_tune_from_layer='no_such_layer'`: the base")],
)  # fmt: skip
def test_submit_and_schedule_refuse_what_cannot_run_before_any_request(
    command, setting, message, base
):
    extra = ["--param", f"base={base}"] if "layer" in setting else []
    with KfpRecorder() as kfp:
        assert message in refused(*command, "--host", kfp.url, "--image", "r/g:1",
                                  "--param", setting, *extra)  # fmt: skip
        assert kfp.requests == []


# --- class 5: gs:// without credentials: one line, exit 2, at start ---------------------------


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no gcloud config either
    storage._client.cache_clear()
    yield
    storage._client.cache_clear()


@pytest.mark.parametrize(
    "args",
    [["validate", "--data", "gs://b/d"],
     ["validate", "--data", "{dataset}", "--report", "gs://b/report"],
     ["data", "synthetic", "--out", "gs://b/d"],
     ["data", "fashion-mnist", "--out", "gs://b/d", "--per-class", "1"],
     ["pretrain", "--out", "gs://b/base.keras", "--per-class", "5", "--epochs", "1"],
     ["run", "--data", "{dataset}", "--model-repo", "{tmp}/r", "--base", "gs://b/base.keras"],
     ["run", "--data", "gs://b/d", "--model-repo", "{tmp}/r", "--base", "{base}"],
     ["run", "--data", "{dataset}", "--model-repo", "gs://b/models", "--base", "{base}"],
     ["watch", "--data", "gs://b/d", "--model-repo", "{tmp}/r", "--base", "{base}", "--max-polls", "1"],
     ["serve", "--model-repo", "gs://b/models", "--model-name", "m", "--port", "0"],
     ["predict", "--model", "m", "gs://b/x.png"]],
    ids=lambda a: " ".join(a[:2]) + " " + next(x for x in a if x.startswith("gs://")),
)  # fmt: skip
def test_gs_uris_without_credentials_end_in_one_line_with_the_fix(
    args, no_credentials, tmp_path, dataset, base
):
    args = [a.format(dataset=dataset, tmp=tmp_path, base=base) for a in args]
    message = refused(*args)
    assert "No usable Google Cloud credentials for gs://" in message
    assert "gcloud auth application-default login" in message
    assert "GOOGLE_APPLICATION_CREDENTIALS" in message and "STORAGE_EMULATOR_HOST" in message
