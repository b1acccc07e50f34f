"""validate: a manifest of every file in the dataset, checked by a Great Expectations suite.

    graft validate --data gs://bucket/flowers --report /tmp/report

The dataset contract is class folders ``<uri>/<label>/<image>`` (JPEG/PNG), or pre-split
``<uri>/{train,val,test}/<label>/<image>`` with all three splits and every class in each,
never the two layouts mixed. Hidden files and folders, symlinks and label names that cannot
be told apart (``Cat`` and ``cat``) are refused with their paths: what validate accepts is
exactly what augment trains on and what check_data fingerprints, every file listed. Each
file is opened once: its header gives the declared size (so a decompression bomb is caught
before any pixel is decoded), then it is decoded fully, by PIL and by the decoder the
serving signature uses (common/images.py), to prove training and serving can both use it. The manifest (JSON Lines) feeds augment; the
report (JSON + HTML) names each failed expectation and the files that broke it.
"""

import contextlib
import hashlib
import html
import io
import json
import logging
import os
import threading
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kfp.dsl import HTML, Dataset, Output

from common import storage
from common.progress import Progress
from components.component import step_component
from components.config import GraftConfig

log = logging.getLogger(__name__)

SPLIT_FOLDERS = ("train", "val", "test")
REPORT_JSON = "validation_report.json"
REPORT_HTML = "validation_report.html"
MAX_FILES_NAMED = 20  # offending files listed per failed expectation


class DataValidationError(ValueError):
    """The dataset broke at least one expectation; the message names them and the files."""


@dataclass
class Failure:
    expectation: str
    description: str
    files: list[str]  # relative paths, first MAX_FILES_NAMED
    count: int  # how many rows broke it (files may be truncated)


@dataclass
class ValidationResult:
    ok: bool
    files: int
    per_label: dict[str, int]
    failures: list[Failure] = field(default_factory=list)
    expectations: list[dict] = field(default_factory=list)  # every expectation, pass or fail
    rows: list[dict] = field(default_factory=list, repr=False)  # the manifest itself

    def summary(self) -> str:
        lines = [f"{f.expectation}: {f.description}; {f.count} file(s): " + ", ".join(f.files)
                 for f in self.failures]  # fmt: skip
        return "dataset failed validation:\n  " + "\n  ".join(lines)


# --- manifest -----------------------------------------------------------------------------


def _place(relpath: str) -> tuple[str | None, str | None]:
    """(split, label) from a relative path, or (None, None) when it is at the wrong depth."""
    parts = relpath.split("/")
    if len(parts) == 3 and parts[0] in SPLIT_FOLDERS:
        return parts[0], parts[1]
    if len(parts) == 2 and parts[0] not in SPLIT_FOLDERS:
        return None, parts[0]
    return None, None


_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _header_only_limits():
    """Let PIL report a huge declared size instead of refusing to open the file, so the
    max_pixels rule (checked before any decode) names it like any other violation."""
    from PIL import Image

    with _PIL_LIMIT_LOCK:
        previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def inspect_image(data: bytes, config: GraftConfig) -> dict:
    """Header facts, then a full decode; never raises for bad bytes (the row says why)."""
    from PIL import Image

    facts = {"width": None, "height": None, "channels": None, "format": None,
             "decodable": False, "error": None}  # fmt: skip
    if not data:
        facts["error"] = "zero-byte file"
        return facts
    try:
        with _header_only_limits(), warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header: declared size, no pixels
        facts.update(width=image.width, height=image.height, format=image.format)
        facts["channels"] = len(image.getbands())
        if image.width * image.height > config.max_pixels:
            facts["error"] = (
                f"declares {image.width}x{image.height} pixels, over max_pixels="
                f"{config.max_pixels} (not decoded)"
            )
            return facts
        image.load()  # outside the lock: files decode in parallel in the storage pool
    except (OSError, SyntaxError, ValueError) as err:
        facts["error"] = f"cannot decode: {err}"
        return facts
    from common.images import check_decodable

    problem = check_decodable(data)
    if problem:
        facts["error"] = f"the serving decoder cannot decode it: {problem}"
        return facts
    facts["decodable"] = True
    return facts


# A file written this close to its inspection may change again within the same timestamp
# tick without its identity changing (git's "racy" entries): it is inspected again next time.
SETTLED_NS = 2_000_000_000
INSPECTIONS_FILE = "inspections.jsonl"  # beside a report's manifest.jsonl (graft validate)
INSPECTIONS_DIR = "inspections"  # in the reuse store, for the pipeline's validate steps


def inspections_uri(model_repo: str, model_name: str) -> str:
    """Where the pipeline keeps a model's last inspections: in the reuse store beside the
    model repository (common/reuse_store.py), not in the model's folder, which holds only
    what a push made; any run of this model on any worker finds them there."""
    from common import model_repository, reuse_store

    name = model_repository.check_model_name(model_name)
    return storage.join(model_repo, reuse_store.STORE_DIR, INSPECTIONS_DIR, f"{name}.jsonl")


def inspection_key(config: GraftConfig) -> str:
    """What an inspection depends on beyond the file's bytes: the limits that stop reading
    or decoding, and the decoders (PIL for the header, TensorFlow for the serving decode).
    An earlier inspection is reused only under the same key."""
    from importlib.metadata import version  # not `import tensorflow`: seconds, when all is reused

    return (f"max_pixels={config.max_pixels};max_file_bytes={config.max_file_bytes};"
            f"pillow={version('pillow')};tensorflow={version('tensorflow')}")  # fmt: skip


def read_inspections(uri: str) -> dict[str, dict]:
    """An inspections file by file URI (empty when there is none yet: a first run)."""
    try:
        text = storage.read_text(uri)
    except storage.StorageError:
        return {}
    entries = {}
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            entry = json.loads(line)
            entries[entry["row"]["uri"]] = entry
        except (ValueError, KeyError, TypeError):
            log.warning("%s line %d is not an inspection: ignored (that file is read again)",
                        uri, number)  # fmt: skip
    return entries


def write_inspections(uri: str, inspections: dict[str, dict]) -> None:
    storage.write_text(uri, "".join(json.dumps(inspections[k], sort_keys=True) + "\n"
                                    for k in sorted(inspections)))  # fmt: skip


def build_manifest(
    data_uri: str, config: GraftConfig, select=None, inspections: dict[str, dict] | None = None
) -> list[dict]:
    """One row per file under ``data_uri`` (or per file ``select(relpath)`` is true for: one
    shard's, components/shards.py); raises StorageError/ValueError when there is no file.

    Files are read and inspected ``config.io_concurrency`` at a time; only the rows stay.
    ``inspections`` (file URI -> an earlier inspection, ``read_inspections``) is consulted
    and brought up to date: a file's earlier row is taken as it is, without reading the
    file, when the listing gives it the same identity (storage.FileInfo: size and change
    times locally, the generation on GCS), it had settled before that inspection and
    ``inspection_key`` is unchanged. augment still checks every file's SHA-256 as it reads
    it, so a reused row can never train on other bytes. The rows are the same either way."""
    files = storage.list_files(data_uri, checksums=False, concurrency=config.io_concurrency)
    if not files:
        raise storage.StorageError(f"{data_uri} holds no files: expected <label>/<image> folders")
    if select is not None:
        files = [info for info in files if select(info.relpath)]
    key = inspection_key(config)
    known = {} if inspections is None else inspections

    def reused(info: storage.FileInfo) -> dict | None:
        entry = known.get(info.uri)
        if (entry is None or entry.get("inspected_with") != key or not info.identity
                or entry.get("identity") != info.identity
                or entry["row"].get("relpath") != info.relpath):  # fmt: skip
            return None
        if info.changed_ns is not None and info.changed_ns > entry["inspected_ns"] - SETTLED_NS:
            return None
        return dict(entry["row"])

    def inspect(info: storage.FileInfo) -> tuple[dict, dict]:
        split, label = _place(info.relpath)
        inspected_ns = time.time_ns()
        data = storage.read_bytes(info.uri) if info.size <= config.max_file_bytes else b""
        row = {"uri": info.uri, "relpath": info.relpath, "label": label, "split": split,
               "bytes": info.size, "sha256": hashlib.sha256(data).hexdigest() if data else None}  # fmt: skip
        if info.size > config.max_file_bytes:
            row.update(width=None, height=None, channels=None, format=None, decodable=False,
                       error=f"{info.size} bytes, over max_file_bytes={config.max_file_bytes}")  # fmt: skip
        else:
            row.update(inspect_image(data, config))
        return row, {"identity": info.identity, "inspected_ns": inspected_ns,
                     "inspected_with": key, "row": row}  # fmt: skip

    rows: list[dict | None] = [None if inspections is None else reused(f) for f in files]
    fresh = [index for index, row in enumerate(rows) if row is None]
    if inspections is not None:
        log.info("manifest: %d of %d files as inspected before, %d to inspect",
                 len(rows) - len(fresh), len(rows), len(fresh))  # fmt: skip
    progress = Progress(log, "manifest: inspected", len(fresh), unit="files")
    inspected = storage.map_bounded(inspect, [files[i] for i in fresh],
                                    concurrency=config.io_concurrency)  # fmt: skip
    for index, (row, entry) in zip(fresh, inspected, strict=True):
        rows[index] = row
        if inspections is not None:
            inspections[row["uri"]] = entry
        progress.advance()
    progress.done()
    if inspections is not None:  # files gone from the listing (of this shard) are forgotten
        listed = {info.uri for info in files}
        for uri in [u for u, e in inspections.items() if u not in listed and (
                select is None or select(e["row"].get("relpath", "")))]:  # fmt: skip
            del inspections[uri]
    return rows


def empty_class_folders(data_uri: str, rows: list[dict]) -> list[str]:
    """Label folders holding no file at all (only visible on local disks: object stores have
    no folders). A file is an image of its folder by where it is, whatever its name: the
    same notion every other rule uses (each listed file must decode), so a folder of
    extension-less PNGs is not empty."""
    if storage.is_gcs(data_uri):
        return []
    root = Path(data_uri)
    candidates = [p for p in root.iterdir() if p.is_dir()]
    for split in SPLIT_FOLDERS:
        if (root / split).is_dir():
            candidates.remove(root / split)
            candidates += [p for p in (root / split).iterdir() if p.is_dir()]
    holding = {folder for r in rows for folder in _folders_of(r["relpath"])}
    return sorted(rel for rel in (p.relative_to(root).as_posix() for p in candidates)
                  if rel not in holding)  # fmt: skip


def _folders_of(relpath: str) -> list[str]:
    parts = relpath.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _reserved_name_rows(rows: list[dict]) -> list[dict]:
    """Files in a class folder named train/val/test in the class-folder layout: the name is
    reserved for the pre-split layout, which needs <split>/<label>/<image>."""
    return [r for r in rows if r["label"] is None and len(r["relpath"].split("/")) == 2
            and r["relpath"].split("/")[0] in SPLIT_FOLDERS]  # fmt: skip


def _layout_failure(name: str, description: str, paths: list[str]) -> Failure:
    return Failure(name, description, sorted(paths)[:MAX_FILES_NAMED], len(paths))


def layout_failures(rows: list[dict], data_uri: str) -> list[Failure]:
    """Layouts validate could read but training could not use honestly, with their paths."""
    import unicodedata

    failures = []
    reserved = _reserved_name_rows(rows)
    if reserved:
        names = sorted({r["relpath"].split("/")[0] for r in reserved})
        failures.append(_layout_failure("expect_no_reserved_class_names",
            f"class folders are not named {', '.join(SPLIT_FOLDERS)}: those names mark the "
            f"pre-split layout (<split>/<label>/<image>); rename {', '.join(n + '/' for n in names)} "
            "(e.g. to its class name) or split the whole dataset into train/, val/, test/",
            [r["relpath"] for r in reserved]))  # fmt: skip
    hidden = [r["relpath"] for r in rows if any(p.startswith(".") for p in r["relpath"].split("/"))]
    if hidden:
        failures.append(_layout_failure("expect_no_hidden_paths",
            "no hidden files or folders (.DS_Store, ._*, .git): they are not images of a class", hidden))  # fmt: skip
    odd = [r["relpath"] for r in rows if r["label"] and (
        any(unicodedata.category(c).startswith("C") for c in r["label"]) or "\\" in r["label"])]  # fmt: skip
    if odd:
        failures.append(_layout_failure("expect_printable_labels",
            "label folder names have no control characters or backslashes", odd))  # fmt: skip
    by_key: dict[str, set[str]] = {}
    for row in rows:
        if row["label"]:
            key = unicodedata.normalize("NFC", row["label"]).casefold()
            by_key.setdefault(key, set()).add(row["label"])
    clashing = {label for labels in by_key.values() if len(labels) > 1 for label in labels}
    if clashing:
        failures.append(_layout_failure("expect_distinct_labels",
            "label names differ by more than case or Unicode normalisation",
            [r["relpath"] for r in rows if r["label"] in clashing]))  # fmt: skip
    split_rows = [r for r in rows if r["split"]]
    plain_rows = [r for r in rows if r["label"] and not r["split"]]
    if split_rows and plain_rows:
        failures.append(_layout_failure("expect_one_layout",
            f"one layout: class folders or {'/'.join(SPLIT_FOLDERS)}/<label>/ folders, not both "
            "(these files sit in class folders next to split folders)",
            [r["relpath"] for r in plain_rows]))  # fmt: skip
    if split_rows:
        present = {r["split"] for r in split_rows}
        missing = [f"{s}/ is missing" for s in SPLIT_FOLDERS if s not in present]
        if missing:
            failures.append(_layout_failure("expect_every_split",
                f"a pre-split dataset has {', '.join(SPLIT_FOLDERS)} folders (val stops training, "
                "test judges it)", missing))  # fmt: skip
        labels = sorted({r["label"] for r in split_rows if r["label"]})
        absent = [f"{split}/{label}/ has no images" for label in labels for split in SPLIT_FOLDERS
                  if split in present and not any(r["split"] == split and r["label"] == label for r in split_rows)]  # fmt: skip
        if absent:
            failures.append(_layout_failure("expect_every_class_in_every_split",
                "every class has images in every split (a class only in test cannot be learned)", absent))  # fmt: skip
    links = symlinks(data_uri)
    if links:
        failures.append(_layout_failure("expect_no_symlinks",
            "no symlinks (object stores have none, and a link can leave the dataset): copy the files in", links))  # fmt: skip
    return failures


def symlinks(data_uri: str) -> list[str]:
    """Symlinked files and folders under a local dataset (GCS has none)."""
    if storage.is_gcs(data_uri):
        return []
    root = Path(data_uri)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            if path.is_symlink():
                found.append(path.relative_to(root).as_posix())
    return found


def write_manifest(path: str | Path, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def read_manifest(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


# --- the expectation suite ----------------------------------------------------------------


def _derived_frame(rows: list[dict]):
    """The manifest as a DataFrame plus the per-row columns the set-level rules need."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame["label"] = frame["label"].astype(object)
    counts = frame.groupby("label")["relpath"].transform("count")
    frame["label_count"] = counts.fillna(0).astype(int)
    biggest = int(frame["label_count"].max() or 0)
    frame["imbalance_ratio"] = biggest / frame["label_count"].clip(lower=1)
    hashed = frame.dropna(subset=["sha256"])
    labels_per_hash = hashed.groupby("sha256")["label"].nunique()
    splits_per_hash = hashed.fillna({"split": "unsplit"}).groupby("sha256")["split"].nunique()
    frame["labels_for_content"] = frame["sha256"].map(labels_per_hash).fillna(1).astype(int)
    frame["splits_for_content"] = frame["sha256"].map(splits_per_hash).fillna(1).astype(int)
    frame["min_side"] = frame[["width", "height"]].min(axis=1)
    frame["max_side"] = frame[["width", "height"]].max(axis=1)
    frame["pixels"] = frame["width"] * frame["height"]
    reserved = {r["relpath"] for r in _reserved_name_rows(rows)}
    frame["reserved_folder"] = frame["relpath"].isin(reserved)
    return frame


def _suite(config: GraftConfig):
    """(expectation, plain-English description) pairs: the rules a trainable dataset obeys."""
    import great_expectations as gx

    E = gx.expectations
    from great_expectations.expectations.row_conditions import Column

    decoded = {"row_condition": Column("decodable") == True}  # noqa: E712  (builds a GX condition)
    return [
        (E.ExpectColumnValuesToNotBeNull(column="label", row_condition=Column("reserved_folder") == False),  # noqa: E712
         "every file sits in a <label>/ folder (or <split>/<label>/): move the files listed into one"),
        (E.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True]),
         "every file decodes as an image"),
        (E.ExpectColumnValuesToBeInSet(column="format", value_set=list(config.allowed_formats), **decoded),
         f"formats are {', '.join(config.allowed_formats)}"),
        (E.ExpectColumnValuesToBeBetween(column="bytes", min_value=1, max_value=config.max_file_bytes),
         f"files are 1..{config.max_file_bytes} bytes"),
        (E.ExpectColumnValuesToBeBetween(column="pixels", max_value=config.max_pixels),
         f"images have at most {config.max_pixels} pixels"),
        (E.ExpectColumnValuesToBeBetween(column="min_side", min_value=config.min_side, **decoded),
         f"image sides are at least {config.min_side}px"),
        (E.ExpectColumnValuesToBeBetween(column="max_side", max_value=config.max_side, **decoded),
         f"image sides are at most {config.max_side}px"),
        (E.ExpectColumnValuesToBeBetween(column="label_count", min_value=config.min_images_per_class),
         f"every class has at least {config.min_images_per_class} images"),
        (E.ExpectColumnUniqueValueCountToBeBetween(column="label", min_value=config.min_classes),
         f"there are at least {config.min_classes} classes"),
        (E.ExpectColumnValuesToBeBetween(column="labels_for_content", max_value=1),
         "no identical image under two labels"),
        (E.ExpectColumnValuesToBeBetween(column="splits_for_content", max_value=1),
         "no identical image in two splits"),
        (E.ExpectColumnValuesToBeBetween(column="imbalance_ratio", max_value=config.max_imbalance_ratio),
         f"largest/smallest class is at most {config.max_imbalance_ratio}"),
    ]  # fmt: skip


def run_suite(rows: list[dict], config: GraftConfig) -> tuple[list[dict], list[Failure]]:
    """Validate the manifest with GX; return every expectation's outcome and the failures."""
    import great_expectations as gx

    frame = _derived_frame(rows)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    batch = (
        context.data_sources.add_pandas("manifest")
        .add_dataframe_asset("files")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    suite = gx.ExpectationSuite(name="graft_dataset")
    described = _suite(config)
    for expectation, _ in described:
        suite.add_expectation(expectation)
    result = batch.validate(
        suite,
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["relpath"]},
    )
    descriptions = {e.expectation_type + str(e.column): d for e, d in described}
    outcomes, failures = [], []
    for item in result.results:
        config_ = item.expectation_config
        key = config_.type + str(config_.kwargs.get("column"))
        description = descriptions.get(key, config_.type)
        offenders = [entry["relpath"] for entry in item.result.get("unexpected_index_list") or []]
        if item.expectation_config.type == "expect_column_unique_value_count_to_be_between":
            labels = sorted({str(r["label"]) for r in rows if r["label"]})
            offenders = [f"labels found: {labels or 'none'}"] if not item.success else []
        outcomes.append({"expectation": config_.type, "column": config_.kwargs.get("column"),
                         "description": description, "success": bool(item.success),
                         "unexpected": offenders[:MAX_FILES_NAMED]})  # fmt: skip
        if not item.success:
            failures.append(
                Failure(config_.type, description, offenders[:MAX_FILES_NAMED], len(offenders))
            )
    return outcomes, failures


def validate_dataset(
    data_uri: str,
    report_dir: str | Path | None,
    config: GraftConfig,
    *,
    raise_on_failure=True,
    rows: list[dict] | None = None,
    inspections: dict[str, dict] | None = None,
) -> ValidationResult:
    """Build the manifest (or take ``rows``, the gathered shards' manifest; ``inspections``
    as build_manifest takes them), run the suite, write the report; raise
    DataValidationError on failure. Every rule runs here, over the
    whole manifest: the set-level ones (class counts, duplicates, every class in val and
    test, the layout) are only true or false of all the rows together."""
    if not storage.is_gcs(data_uri) and Path(data_uri).is_file():
        raise ValueError(
            f"Received `--data {data_uri}`: a file; expected a directory of <label>/ class folders"
        )
    if rows is None:
        rows = build_manifest(data_uri, config, inspections=inspections)
    outcomes, failures = run_suite(rows, config)
    empty = empty_class_folders(data_uri, rows)
    extra = layout_failures(rows, data_uri)
    from components.augment import classes_short_of_a_split

    short = classes_short_of_a_split(rows, config.val_fraction, config.test_fraction)
    if short:
        extra.append(Failure("expect_every_class_in_val_and_test",
            "every class has a val and a test image (early stopping and the gates judge each class)",
            short, len(short)))  # fmt: skip
    if empty:
        extra.append(Failure("expect_class_folders_not_empty",
                             "every class folder holds images: add images to it or remove it",
                             empty, len(empty)))  # fmt: skip
    for failure in extra:
        failures.append(failure)
        outcomes.append({"expectation": failure.expectation, "column": None,
                         "description": failure.description, "success": False,
                         "unexpected": failure.files})  # fmt: skip
    per_label = dict(sorted(Counter(str(r["label"]) for r in rows if r["label"]).items()))
    result = ValidationResult(not failures, len(rows), per_label, failures, outcomes, rows)
    if report_dir is not None:
        write_report(report_dir, result)
        write_manifest(Path(report_dir) / "manifest.jsonl", rows)
    if failures and raise_on_failure:
        raise DataValidationError(result.summary())
    return result


def write_report(report_dir: str | Path, result: ValidationResult) -> None:
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    payload = {k: v for k, v in asdict(result).items() if k != "rows"}
    (report_dir / REPORT_JSON).write_text(json.dumps(payload, indent=2))
    (report_dir / REPORT_HTML).write_text(render_html(result))


def render_html(result: ValidationResult) -> str:
    """A self-contained page from GX's validation outcome (no data-docs site needed)."""
    rows = "".join(
        f"<tr class={'ok' if o['success'] else 'bad'}><td>{'pass' if o['success'] else 'FAIL'}</td>"
        f"<td>{html.escape(o['description'])}</td><td><code>{html.escape(o['expectation'])}</code></td>"
        f"<td>{html.escape(', '.join(o['unexpected']))}</td></tr>"
        for o in result.expectations
    )
    labels = "".join(f"<li>{html.escape(k)}: {v}</li>" for k, v in result.per_label.items())
    verdict = "valid" if result.ok else "INVALID"
    return (
        "<!doctype html><meta charset=utf-8><title>graft validation</title>"
        "<style>body{font-family:sans-serif}.bad{background:#fdd}.ok{background:#dfd}"
        "td{padding:4px 8px;vertical-align:top}</style>"
        f"<h1>Dataset {verdict}: {result.files} files</h1><ul>{labels}</ul>"
        f"<table><tr><th></th><th>rule</th><th>expectation</th><th>offending files</th></tr>{rows}</table>"
    )


# --- KFP component ------------------------------------------------------------------------


@step_component
def validate_data(
    data_uri: str,
    manifest: Output[Dataset],
    validation_report: Output[HTML],
    model_repo: str = "",
    model_name: str = "",
    min_images_per_class: int = 5,
    min_classes: int = 2,
    min_side: int = 16,
    max_side: int = 8192,
    max_pixels: int = 40_000_000,
    max_file_bytes: int = 30_000_000,
    max_imbalance_ratio: float = 20.0,
    allowed_formats: list = ["JPEG", "PNG"],  # noqa: B006 (KFP reads the literal; never mutated)
    io_concurrency: int = 16,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
):
    """Fail the run, with a report naming the files, unless the dataset is trainable. With
    ``model_repo``, files unchanged since the model's last validate are not read again."""
    from components.config import step_config
    from components.validate import inspections_uri, publish_validation

    config = step_config(locals())
    saved = inspections_uri(model_repo, model_name) if model_repo else ""
    publish_validation(data_uri, config, manifest, validation_report, inspections_at=saved)


def publish_validation(
    data_uri: str, config, manifest, validation_report, rows=None, inspections_at: str = "",
    inspections: dict | None = None,
) -> None:  # fmt: skip
    """What validate_data (and, for the gathered shards, validate_gathered) does with its
    artifacts: the HTML report, the JSON report in the log, the manifest, or a failed run.
    ``inspections_at``: the inspections file read before (unless ``inspections`` are given,
    the shards' own) and written after, pass or fail (what a file holds is true either way)."""
    import shutil
    import tempfile

    if inspections_at and inspections is None and rows is None:
        inspections = read_inspections(inspections_at)
    report_dir = Path(tempfile.mkdtemp(prefix="graft-validate-"))
    try:
        result = validate_dataset(data_uri, report_dir, config, raise_on_failure=False,
                                  rows=rows, inspections=inspections)  # fmt: skip
        if inspections_at and inspections is not None:
            write_inspections(inspections_at, inspections)
        shutil.copyfile(report_dir / REPORT_HTML, validation_report.path)
        print((report_dir / REPORT_JSON).read_text())
        if not result.ok:
            raise RuntimeError(result.summary())
        write_manifest(manifest.path, result.rows)
        manifest.metadata.update(
            {"files": result.files, "labels": result.per_label, "settings": config.used()}
        )
    finally:
        shutil.rmtree(report_dir, ignore_errors=True)
