"""The config path: GraftConfig -> pipeline parameters -> each step, one name and one default
per setting; a base's settings under the user's; contradictions refused before any step."""

import dataclasses
import json
import zipfile

import pytest
import yaml
from typer.testing import CliRunner

from components.augment import augment
from components.backbones import base_facts, check_base_settings, record_settings
from components.check_data import check_data
from components.config import (
    DAG_SETTINGS,
    SETTINGS,
    GraftConfig,
    kfp_value,
    resolve,
    step_config,
    with_overrides,
)
from components.evaluate import evaluate
from components.fine_tune import fine_tune
from components.push import push
from components.shards import (
    augment_shard,
    features_shard,
    gather_examples,
    validate_gathered,
    validate_shard,
)
from components.train_head import train_head
from components.validate import validate_data
from pipeline.cli import app
from pipeline.pipeline import PIPELINE_SIGNATURE, RUN_PARAMETERS, step_order
from pipeline.settings import cluster_parameters, run_settings
from pipeline.watch import submit_trigger
from tests.kfp_recorder import KfpRecorder

COMPONENTS = (check_data, validate_data, augment, train_head, fine_tune, evaluate, push)
# the steps of the fan-out (shards > 1): they take `shards` as a constant of the DAG
FAN_OUT = (validate_shard, validate_gathered, augment_shard, gather_examples, features_shard)
RUN_SETTINGS = set(SETTINGS) - set(DAG_SETTINGS)
DEFAULTS = GraftConfig()


def settings_taken(component) -> dict:
    return {n: s for n, s in component.component_spec.inputs.items() if n in RUN_SETTINGS}


def gray_base(path, *, size=None) -> str:
    """A small .keras base taking 1-channel images (of any size, or ``size`` x ``size``)."""
    import keras

    inputs = keras.Input((size, size, 1), name="pixels")
    x = keras.layers.Conv2D(4, 3, name="top_conv")(inputs)
    keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x)).save(path)
    return str(path)


# --- one default per setting ---------------------------------------------------------------


@pytest.mark.parametrize("component", COMPONENTS + FAN_OUT, ids=lambda c: c.name)
def test_component_defaults_are_the_graftconfig_defaults(component):
    taken = settings_taken(component)
    assert taken, f"{component.name} takes no setting"
    for name, spec in taken.items():
        assert spec.default == kfp_value(getattr(DEFAULTS, name)), name


def test_every_setting_is_taken_by_at_least_one_step():
    taken = set().union(*(settings_taken(c) for c in COMPONENTS))
    assert taken == RUN_SETTINGS
    assert DAG_SETTINGS == ("shards",)  # the pipeline is built with it (test_compile.py)


def test_pipeline_parameters_are_the_run_parameters_and_every_setting_but_the_dags_shape():
    parameters = PIPELINE_SIGNATURE.parameters
    run_settings_ = [name for name in SETTINGS if name not in DAG_SETTINGS]
    assert list(parameters) == [p.name for p in RUN_PARAMETERS] + run_settings_
    assert "shards" not in parameters
    for name in run_settings_:
        assert parameters[name].default == kfp_value(getattr(DEFAULTS, name)), name


# --- every setting reaches the step that takes it in the compiled spec ------------------------


def compiled(tmp_path) -> dict:
    out = tmp_path / "pipeline.yaml"
    result = CliRunner().invoke(app, ["compile", "--image", "reg/graft:1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return next(yaml.safe_load_all(out.read_text()))


def test_compiled_spec_declares_every_setting_with_the_graftconfig_default(tmp_path):
    declared = compiled(tmp_path)["root"]["inputDefinitions"]["parameters"]
    assert set(declared) & set(SETTINGS) == RUN_SETTINGS
    for name in RUN_SETTINGS:
        assert declared[name]["defaultValue"] == kfp_value(getattr(DEFAULTS, name)), name
    assert declared["allowed_formats"]["parameterType"] == "LIST"


def test_compiled_spec_wires_each_setting_from_its_pipeline_parameter_into_every_step_taking_it(
    tmp_path,
):
    spec = compiled(tmp_path)
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    by_name = {c.name: c for c in COMPONENTS}
    reached = set()
    for task_name in step_order():
        wired = tasks[task_name]["inputs"]["parameters"]
        for name in settings_taken(by_name[task_name.removesuffix("-2")]):  # both branches
            # Inside a gate's sub-DAG a pipeline parameter arrives as pipelinechannel--<name>.
            assert wired[name]["componentInputParameter"] in {name, f"pipelinechannel--{name}"}
            reached.add(name)
    assert reached == RUN_SETTINGS


def test_step_order_is_read_off_the_dag():
    assert step_order() == (
        "check-data", "validate-data", "augment", "train-head", "fine-tune", "evaluate", "push",
        "evaluate-2", "push-2",  # the head-not-converged branch
    )  # fmt: skip


# --- a step reads only what it was given ------------------------------------------------------


def test_a_step_cannot_read_a_setting_it_was_not_given():
    config = step_config({"image_size": 28, "examples": object()})
    assert config.image_size == 28
    with pytest.raises(AttributeError, match="not given the setting `min_side`"):
        _ = config.min_side


def test_step_config_types_kfp_values_and_records_what_the_step_read():
    config = step_config({"allowed_formats": ["PNG"], "views": 2, "seed": 7})
    assert config.allowed_formats == ("PNG",)
    assert config.views == 2
    assert config.used() == {"allowed_formats": ["PNG"], "views": 2}
    assert config.settings() == {"allowed_formats": ("PNG",), "views": 2, "seed": 7}


def test_with_overrides_refuses_an_unknown_setting_naming_it():
    with pytest.raises(ValueError, match="Unknown setting `min_sides`"):
        with_overrides(GraftConfig(), ["min_sides=3"])


# --- the base carries its settings -----------------------------------------------------------


def test_settings_come_from_defaults_then_the_base_then_set():
    config, sources = resolve({"image_size": 28, "patience": 10}, ["patience=4", "views=2"])
    assert (config.image_size, config.patience, config.views, config.seed) == (28, 4, 2, 0)
    assert sources["image_size"] == "base"
    assert sources["patience"] == sources["views"] == "--set"
    assert sources["seed"] == "default"


def test_a_base_tells_the_channels_its_input_fixes_and_the_settings_recorded_with_it(tmp_path):
    import keras

    path = gray_base(tmp_path / "gray.keras")
    record_settings(path, {"image_size": 28, "patience": 10})
    facts = base_facts(path)
    assert facts.fixed == {"channels": 1}
    assert facts.settings() == {"channels": 1, "image_size": 28, "patience": 10}
    assert keras.models.load_model(path).input_shape == (
        None,
        None,
        None,
        1,
    )  # Keras still reads it


def test_a_base_with_a_fixed_input_size_fixes_image_size(tmp_path):
    facts = base_facts(gray_base(tmp_path / "g32.keras", size=32))
    assert facts.fixed == {"channels": 1, "image_size": 32}
    assert base_facts("mobilenet_v2").settings() == {}  # built for any size and channels


def test_a_setting_that_contradicts_the_base_is_refused_with_the_fix(tmp_path):
    path = gray_base(tmp_path / "g32.keras", size=32)
    config = with_overrides(GraftConfig(), {"base": path, "channels": 3, "image_size": 64})
    with pytest.raises(ValueError) as caught:
        check_base_settings(config)
    assert "takes 1-channel images but `channels=3`: set channels=1" in str(caught.value)
    assert "takes 32x32 images but `image_size=64`: set image_size=32" in str(caught.value)


def test_run_settings_start_from_the_base_and_keep_the_users_changes(tmp_path):
    path = gray_base(tmp_path / "gray.keras")
    record_settings(path, {"image_size": 28, "views": 4})
    resolved = run_settings(["views=2"], base=path)
    assert (resolved.config.channels, resolved.config.image_size, resolved.config.views) == (
        1,
        28,
        2,
    )
    assert resolved.changed() == {"base": path, "channels": 1, "image_size": 28, "views": 2}


# --- the CLI: same names everywhere, refused before anything runs ----------------------------


def test_run_refuses_a_contradicting_set_before_any_step_runs(tmp_path):
    base = gray_base(tmp_path / "gray.keras")
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, [
        "run", "--data", str(tmp_path / "no-data-needed"), "--model-repo", str(tmp_path / "m"),
        "--base", base, "--set", "channels=3", "--pipeline-root", str(runs),
    ])  # fmt: skip
    assert result.exit_code == 2
    assert "set channels=1" in result.output
    assert "Traceback" not in result.output
    assert not runs.exists()  # kfp.local never started: no step did any work


def test_run_refuses_an_unknown_setting_naming_it(tmp_path):
    result = CliRunner().invoke(app, [
        "run", "--data", str(tmp_path), "--model-repo", str(tmp_path / "m"), "--set", "minside=3",
    ])  # fmt: skip
    assert result.exit_code == 2
    assert "Unknown setting `minside`" in result.output


def test_validate_refuses_a_setting_validation_does_not_use(tmp_path):
    result = CliRunner().invoke(app, ["validate", "--data", str(tmp_path), "--set", "views=2"])
    assert result.exit_code == 2
    assert "validation does not use `views`" in result.output


def test_validate_set_min_side_takes_effect(tmp_path):
    from components import datasets

    datasets.write_synthetic_dataset(
        str(tmp_path / "d"), num_classes=2, per_class=6, size=32, seed=3
    )
    ok = CliRunner().invoke(app, ["validate", "--data", str(tmp_path / "d")])
    assert ok.exit_code == 0, ok.output
    small = CliRunner().invoke(
        app, ["validate", "--data", str(tmp_path / "d"), "--set", "min_side=33"]
    )
    assert small.exit_code == 2
    assert "min_side" in small.output


def test_cluster_parameters_take_settings_by_their_names_typed_and_refuse_unknown_keys():
    params, resolved = cluster_parameters(
        ["data_uri=gs://b/d", "force=true", "min_side=32", "allowed_formats=PNG", "seed=3"]
    )
    assert params == {
        "data_uri": "gs://b/d", "force": True, "min_side": 32, "allowed_formats": ["PNG"], "seed": 3,
    }  # fmt: skip
    assert resolved.sources["min_side"] == "--param"
    with pytest.raises(ValueError, match="Unknown parameter `min_sides`"):
        cluster_parameters(["min_sides=32"])
    with pytest.raises(ValueError, match="expected an int"):
        cluster_parameters(["min_side=big"])


def test_shards_is_refused_as_a_run_parameter_and_named_as_a_compile_option():
    with pytest.raises(
        ValueError, match=r"`shards` is the pipeline's shape.*graft compile --shards 4"
    ):
        cluster_parameters(["shards=4"])


def test_submit_sends_the_bases_settings_under_the_users(tmp_path):
    base = gray_base(tmp_path / "gray.keras")
    record_settings(base, {"image_size": 28, "patience": 10})
    package = tmp_path / "pipeline.yaml"
    assert (
        CliRunner().invoke(app, ["compile", "--image", "r/g:1", "-o", str(package)]).exit_code == 0
    )
    with KfpRecorder() as kfp:
        result = CliRunner().invoke(app, [
            "submit", "--host", kfp.url, "--package", str(package), "--param", "data_uri=gs://b/d",
            "--param", f"base={base}", "--set", "patience=4", "--param", "max_pixels=1000000",
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
        (run,) = kfp.posts("/runs")
    assert run["body"]["runtime_config"]["parameters"] == {
        "data_uri": "gs://b/d", "base": base, "channels": 1, "image_size": 28, "patience": 4,
        "max_pixels": 1000000,
    }  # fmt: skip
    assert "from base: image_size=28, channels=1" in result.output


def test_submit_refuses_a_contradicting_param_before_any_request(tmp_path):
    base = gray_base(tmp_path / "gray.keras")
    with KfpRecorder() as kfp:
        result = CliRunner().invoke(app, [
            "submit", "--host", kfp.url, "--image", "r/g:1", "--param", f"base={base}",
            "--param", "channels=3",
        ])  # fmt: skip
        assert kfp.requests == []
    assert result.exit_code == 2
    assert "set channels=1" in result.output


def test_watch_host_submits_with_the_settings_given(tmp_path):
    package = tmp_path / "pipeline.yaml"
    assert (
        CliRunner().invoke(app, ["compile", "--image", "r/g:1", "-o", str(package)]).exit_code == 0
    )
    params, _ = cluster_parameters(["min_side=40", "views=2"], label="--set")
    with KfpRecorder() as kfp:
        trigger = submit_trigger(kfp.url, str(package), "gs://b/d", "m", "gs://b/r", params)
        trigger(type("Fp", (), {"digest": "ab" * 32, "count": 3})())
        (run,) = kfp.posts("/runs")
    assert run["body"]["runtime_config"]["parameters"] == {
        "min_side": 40, "views": 2, "data_uri": "gs://b/d", "model_name": "m", "model_repo": "gs://b/r",
    }  # fmt: skip


def test_pretrained_settings_are_settings_graftconfig_knows():
    from components.pretrain import PRETRAINED_SETTINGS

    config = with_overrides(GraftConfig(), PRETRAINED_SETTINGS)
    assert {k: getattr(config, k) for k in PRETRAINED_SETTINGS} == PRETRAINED_SETTINGS


def test_recorded_settings_live_inside_the_keras_file(tmp_path):
    path = gray_base(tmp_path / "gray.keras")
    record_settings(path, {"views": 2})
    with zipfile.ZipFile(path) as archive:
        assert json.loads(archive.read("graft_settings.json")) == {"views": 2}
    with pytest.raises(ValueError, match="already records"):
        record_settings(path, {"views": 3})


def test_graftconfig_settings_is_every_field():
    assert list(GraftConfig().settings()) == [f.name for f in dataclasses.fields(GraftConfig)]


def test_a_base_recording_a_setting_this_graft_does_not_know_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"does not know: \['views_v2'\]"):
        resolve({"views_v2": 3}, [])


# --- issue 23 class 3: every setting checked for what its step needs -------------------------

CANNOT_WORK = [
    ("seed=-1", "`seed=-1`: expected 0..2147483647"),
    ("seed=1e20", "`seed=1e20`: expected an int"),
    ("seed=4294967296", "`seed=4294967296`: expected 0..2147483647"),
    ("head_hidden_units=-5", "`head_hidden_units=-5`: expected >= 0"),
    ("val_fraction=0", "`val_fraction=0.0`: expected in (0, 1): early stopping needs"),
    ("test_fraction=0", "`test_fraction=0.0`: expected in (0, 1): evaluate"),
    ("allowed_formats=", "`allowed_formats=()`: expected one or more of JPEG, PNG, GIF, BMP"),
    ("allowed_formats=png", "`allowed_formats=('png',)`: expected one or more of JPEG"),
    ("allowed_formats=TIFF", "`allowed_formats=('TIFF',)`"),
    ("head_learning_rate=inf", "`head_learning_rate=inf`: expected a finite number"),
    ("head_learning_rate=0", "`head_learning_rate=0.0`: expected > 0"),
    ("min_delta=nan", "`min_delta=nan`: expected a finite number"),
    ("min_delta=-1", "`min_delta=-1.0`: expected >= 0"),
    ("dropout=nan", "`dropout=nan`: expected a finite number"),
    ("bless_min_accuracy=-inf", "`bless_min_accuracy=-inf`: expected a finite number"),
    ("base=bogus_net", "`base='bogus_net'`: expected a keras.applications name"),
    ("base=base.KERAS", "`base='base.KERAS'`: expected a keras.applications name"),
    ("base=.keras", "`base='.keras'`"),
    ("weights=imagenett", "`weights='imagenett'`: expected imagenet, none, or a weights file"),
]


@pytest.mark.parametrize("assignment, message", CANNOT_WORK, ids=[a for a, _ in CANNOT_WORK])
def test_a_setting_no_step_can_work_with_is_refused_naming_it(assignment, message):
    with pytest.raises(ValueError, match="Received .*") as err:
        with_overrides(DEFAULTS, [assignment])
    assert message in str(err.value)


def test_values_that_can_work_are_kept_and_typed():
    config = with_overrides(
        DEFAULTS, ["seed=2147483647", "allowed_formats=PNG,GIF", "weights=w.weights.h5"]
    )
    assert (config.seed, config.allowed_formats, config.weights) == (
        2147483647, ("PNG", "GIF"), "w.weights.h5",
    )  # fmt: skip
    assert GraftConfig(dropout=0).dropout == 0.0 and isinstance(
        GraftConfig(dropout=0).dropout, float
    )


@pytest.mark.parametrize(
    "recorded, message",
    [
        ({"image_size": [28]}, "`image_size=[28]` (list): expected an int"),
        ({"image_size": None}, "`image_size=None` (NoneType): expected an int"),
        ({"patience": 1.5}, "`patience=1.5` (float): expected an int"),
        ({"patience": True}, "`patience=True` (bool): expected an int"),
        ({"scratch_baseline": 1}, "`scratch_baseline=1` (int): expected true or false"),
        ({"allowed_formats": {"PNG": 1}}, "(dict): expected a list of strings"),
        ({"allowed_formats": [1]}, "`allowed_formats=[1]` (list): expected a list of strings"),
        ({"min_delta": [0.1]}, "`min_delta=[0.1]` (list): expected a number"),
        ({"min_delta": float("nan")}, "`min_delta=nan`: expected a finite number"),
        ({"base": 3}, "`base=3` (int): expected a string"),
    ],
)
def test_a_bases_recorded_settings_of_the_wrong_type_are_refused_naming_the_file(
    tmp_path, recorded, message
):
    base = gray_base(tmp_path / "gray.keras")
    record_settings(base, recorded)
    with pytest.raises(ValueError) as err:
        run_settings([], base=base)
    assert "graft_settings.json inside the .keras file" in str(err.value)
    assert message in str(err.value)


def test_submit_refuses_a_setting_that_cannot_work_before_any_request(tmp_path):
    with KfpRecorder() as kfp:
        result = CliRunner().invoke(app, [
            "submit", "--host", kfp.url, "--image", "r/g:1", "--param", "data_uri=gs://b/d",
            "--param", "min_delta=nan",
        ])  # fmt: skip
        assert kfp.requests == []
    assert result.exit_code == 2, result.output
    assert "`min_delta=nan`: expected a finite number" in result.output
