"""A run's settings as the CLI builds them: GraftConfig defaults, then what the base carries,
then the user's `--set`/`--param` values; checked against the base before anything runs.

    graft run --data D --base base.keras --model-repo R               # the base's settings
    graft run --data D --base base.keras --model-repo R --set views=2 # one deliberate change
    graft submit --host H --image I --param data_uri=gs://b/d --param base=gs://b/base.keras

Local runs (`graft run`, `graft watch`) pass every setting to the pipeline; cluster runs
(`graft submit`, `graft schedule create`, `graft watch --host`) pass the run's own
parameters and every setting that is not a GraftConfig default, by the same names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from components.config import (
    DAG_SETTINGS,
    SETTINGS,
    GraftConfig,
    kfp_value,
    resolve,
    split_assignment,
    with_overrides,
)


@dataclass(frozen=True)
class RunSettings:
    config: GraftConfig
    sources: dict[str, str]  # setting -> "default", "base" or the flag that set it
    note: str = ""  # why the base could not be read here, if it could not

    def changed(self) -> dict:
        """The settings that are not GraftConfig defaults, as KFP parameter values."""
        return {
            name: kfp_value(getattr(self.config, name))
            for name in SETTINGS
            if self.sources[name] != "default" and name not in DAG_SETTINGS
        }


def run_settings(
    overrides: list[str] | dict, *, base: str | None = None, label: str = "--set", remote=False
) -> RunSettings:
    """Defaults < the base's settings < ``overrides``; refuses a contradiction with the base.

    ``remote``: the base may not be readable from here (a bucket only the cluster reaches);
    then the run's first step checks it, and ``note`` says so."""
    from common.storage import StorageError
    from components.backbones import BaseFacts, base_facts, check_base_settings

    changes = (
        dict(overrides) if isinstance(overrides, dict) else dict(map(split_assignment, overrides))
    )
    with_overrides(GraftConfig(), changes)  # unknown keys and untypeable values fail here
    if base and "base" in changes:
        raise ValueError(f"Received --base {base} and base={changes['base']}: give the base once")
    if base:
        changes["base"] = base
    base_uri = changes.get("base", GraftConfig().base)
    note = ""
    try:
        facts = base_facts(base_uri)
    except (StorageError, FileNotFoundError) as err:
        if not remote:
            raise
        facts, note = (
            BaseFacts(),
            f"could not read the base here ({err}); the run's first step checks it",
        )
    config, sources = resolve(facts.settings(), changes, override_label=label)
    if base:
        sources["base"] = "--base"
    check_base_settings(config, facts, readable=not note)
    return RunSettings(config, sources, note)


def preflight_local(
    data_uri: str, model_repo: str, model_name: str, config: GraftConfig, *, probe_repository=True
) -> None:
    """What a local run (`graft run`, `graft watch`) needs before its first step, checked in
    seconds: a safe model name, a dataset that exists, a repository it can write (unless a
    container probes it as its own user: ``probe_repository=False``), the base's weights."""
    from common import model_repository
    from components.backbones import check_weights_available

    model_repository.check_model_name(model_name)
    check_dataset_exists(data_uri)
    if probe_repository:
        model_repository.check_writable(model_repo, model_name)
    check_weights_available(config, keras_home=os.environ.get("KERAS_HOME"))


def check_dataset_exists(data_uri: str) -> None:
    """Refuse a dataset URI with nothing under it (a typo, a missing mount, an empty prefix)."""
    from common import storage

    if storage.is_gcs(data_uri):
        storage.check_credentials()
        if not storage.is_dir(data_uri):
            raise FileNotFoundError(
                f"Received `--data {data_uri}`: no objects under that prefix; expected "
                "<label>/<image> class folders there (check the bucket and the path)"
            )
        return
    path = Path(data_uri)
    if not path.exists():
        raise FileNotFoundError(
            f"Received `--data {data_uri}`: no such directory; expected a directory of "
            "<label>/ class folders (write one with `graft data synthetic --out DIR`)"
        )
    if not path.is_dir():
        raise ValueError(
            f"Received `--data {data_uri}`: a file; expected a directory of <label>/ class folders"
        )


def cluster_parameters(
    assignments: list[str] | None, *, label: str = "--param"
) -> tuple[dict, RunSettings]:
    """``key=value`` strings -> (pipeline parameters, the settings among them). A key that is
    neither a run parameter nor a setting is refused, naming it."""
    from pipeline.pipeline import RUN_PARAMETERS

    run_types = {p.name: p.annotation for p in RUN_PARAMETERS}
    run_params, settings = {}, {}
    for text in assignments or []:
        key, value = split_assignment(text, label=label)
        if key in run_types:
            run_params[key] = _typed_run_parameter(key, value, run_types[key])
        elif key in DAG_SETTINGS:
            raise ValueError(
                f"Received `{label} {text}`: `{key}` is the pipeline's shape, fixed when it is "
                f"compiled, not a run parameter: `graft compile --{key} {value}`"
            )
        elif key in SETTINGS:
            settings[key] = value
        else:
            known = ", ".join([*run_types, *SETTINGS])
            raise ValueError(f"Unknown parameter `{key}` in `{label} {text}`. Known: {known}")
    if "model_name" in run_params:
        from common.model_repository import check_model_name

        check_model_name(run_params["model_name"])
    resolved = run_settings(settings, label=label, remote=True)
    return {**run_params, **resolved.changed()}, resolved


def _typed_run_parameter(key: str, value: str, kind: type):
    if kind is bool:
        if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
            raise ValueError(f"Received `{key}={value}`: expected true or false")
        return value.lower() in {"true", "1", "yes"}
    try:
        return kind(value)
    except ValueError as err:
        raise ValueError(f"Received `{key}={value}`: expected a {kind.__name__}") from err


def check_writable_output(flag: str, uri: str, *, folder: bool = False) -> None:
    """Write and remove a probe where ``uri`` (a file, or a ``folder``) will be written, so
    an unwritable output or missing credentials stop a command before its work, not after."""
    import uuid

    from common import storage

    if storage.is_gcs(uri):
        storage.check_credentials()
    probe_name = f".graft-probe-{uuid.uuid4().hex}"
    probe = storage.join(uri, probe_name) if folder else f"{uri}{probe_name}"
    try:
        storage.write_bytes(probe, b"graft write probe\n")
        storage.delete_file(probe)
    except OSError as err:
        raise storage.StorageError(
            f"Received `{flag} {uri}`: cannot write there ({err.strerror or err}); "
            "give a writable location"
        ) from None
    except Exception as err:  # google.api_core errors: 403, 404 bucket, ...
        if not err.__class__.__module__.startswith("google."):
            raise
        raise storage.StorageError(
            f"Received `{flag} {uri}`: cannot write there ({err}); check the bucket exists "
            "and that this account may create objects in it"
        ) from None
