"""`graft rollout init|status|promote`: the history shown, refusals as one `error:` line."""

from typer.testing import CliRunner

from common import model_repository as repository
from pipeline.cli import app
from serving import rollout
from tests.rollout_models import export_behaving


def _graft(*args):
    return CliRunner().invoke(app, list(args))


def test_init_serves_the_newest_version_and_status_shows_the_history(tmp_path):
    export_behaving(tmp_path / "fm" / "7", "good")
    done = _graft("rollout", "init", "--model-repo", str(tmp_path), "--model-name", "fm")
    assert done.exit_code == 0, done.output
    assert "version 7, stable=7" in done.output
    text = (tmp_path / "fm" / rollout.CONFIG_FILE).read_text()
    assert text == rollout.model_config_text("fm", str((tmp_path / "fm").resolve()), [7],
                                             {"stable": 7})  # fmt: skip
    shown = _graft("rollout", "status", "--model-repo", str(tmp_path), "--model-name", "fm")
    assert shown.exit_code == 0
    assert "promoted" in shown.output and "stable=7 canary=7  graft rollout init" in shown.output


def test_status_before_any_rollout_says_so(tmp_path):
    shown = _graft("rollout", "status", "--model-repo", str(tmp_path), "--model-name", "fm")
    assert shown.exit_code == 0 and "no rollout recorded for fm" in shown.output


def test_init_without_a_version_and_promote_without_a_rollout_are_one_line_errors(tmp_path):
    init = _graft("rollout", "init", "--model-repo", str(tmp_path), "--model-name", "fm")
    assert init.exit_code == 2 and init.output.count("error:") == 1
    assert "No complete version of fm" in init.output and "Traceback" not in init.output
    promote = _graft("rollout", "promote", "--model-repo", str(tmp_path), "--model-name", "fm",
                     "--target", "127.0.0.1:1")  # fmt: skip
    assert promote.exit_code == 2 and "No rollout is in progress" in promote.output


def test_a_rejected_version_is_no_version_to_the_repository(tmp_path):
    root = str(tmp_path / "fm")
    for version in (1, 2):
        export_behaving(tmp_path / "fm" / str(version), "good")
    repository.reject_version(root, 2, {"reason": "rolled back"})
    assert repository.complete_versions(root) == [1]
    assert repository.served_version(str(tmp_path), "fm") == 1
    assert repository.versions(root) == [1, 2]  # still there, its number still taken
    assert repository.read_rejection(root, 2) == {"reason": "rolled back"}
