"""TFDS builders: our JSONL files -> versioned array_record datasets (train/validation).

    built = build_dataset("comparisons", config.data, tokenizer, data_dir=workdir + "/tfds")
    built.sources["train"]       # tfds.data_source(...): a random-access Sequence of
                                 # {"record": bytes}, the normalised record as JSON

No TensorFlow: `tfds.core.GeneratorBasedBuilder` writes array_record files (file_format=
"array_record") and `tfds.data_source` reads them back with numpy only. Each record is one
`Text` feature holding its JSON, so the builder needs no TF feature encoding and the grain
pipelines tokenise at read time (pipeline.py).

Versioning and reuse: the builder config's name is `<kind>-<hash>`, the hash covering the
content of every input file, the options that change which records are kept (validation
split, skip_invalid, length limits, tokenizer, max_responses, the chat template's text and
stop token when data.chat_template is not "none") and FORMAT_VERSION. The same
inputs find the prepared dataset and reuse it; a changed file or option gives a new name
and a fresh build beside the old one (never overwritten; delete old ones by hand). Stats of
the build (skipped/dropped/truncated counts) are stored in the dataset's metadata and logged
again on reuse.

Splits: `<kind>_validation` files when given, else a hash of the prompt (text for
pretraining) below `validation_fraction`. A split with no records is left out.

Building is not coordinated across JAX processes: each process builds into its own
data_dir, or process 0 builds into a shared one before the others call build_dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import logging as std_logging
import tempfile
from collections.abc import Sequence
from typing import Any

import ml_collections
import tensorflow_datasets as tfds
from etils import epath

from instructrl import chat_format
from instructrl.data.config import KINDS
from instructrl.data.records import LengthLimits, LoadStats, iter_records, tokenizer_fingerprint
from instructrl.errors import ConfigError, InputError

FORMAT_VERSION = "1.0.0"  # bump when the stored record encoding changes
DATASET_NAME = "instructrl_records"
_SPLITS = ("train", "validation")


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """DatasetInfo of records that live only on local disk.

    tfds calls `initialize_from_bucket` for every builder of a dataset not prepared yet; in
    tfds 4.9.10 it makes an empty `tempfile.mkdtemp("tfds")` folder, looks for pre-computed
    info on its public GCS bucket, and never removes the folder (two per build). These records
    are never on that bucket, so there is nothing to look up and no folder to leave behind.
    """

    def initialize_from_bucket(self) -> None:
        return None


class _DropTfdsChatter(std_logging.Filter):
    """tfds warnings that tell our users nothing: every builder config here is custom by
    design (named by the hash of its inputs), and a dataset being built has no info file
    yet. Any other tfds warning still shows."""

    NOISE = ("Using custom data configuration", "Variant folder")

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


@contextlib.contextmanager
def _quiet_tfds():
    """Drops tfds's chatter (above) while tfds runs, and its progress bars and prints while
    it prepares a dataset: our own log line per dataset says what was built."""
    absl_logger = std_logging.getLogger("absl")  # absl.logging logs through this logger
    noise = _DropTfdsChatter()
    absl_logger.addFilter(noise)
    try:
        yield
    finally:
        absl_logger.removeFilter(noise)


class InstructrlRecords(tfds.core.GeneratorBasedBuilder):
    """Array_record dataset of one record kind; configs are created per input hash."""

    VERSION = tfds.core.Version(FORMAT_VERSION)
    RELEASE_NOTES = {"1.0.0": "One JSON-encoded normalised record per example."}  # noqa: RUF012

    def __init__(
        self,
        *,
        staged: dict[str, str] | None = None,
        stats: LoadStats | None = None,
        inputs: dict[str, Any] | None = None,
        **kw: Any,
    ):
        self._staged = staged or {}
        self._stats = stats
        self._inputs = inputs
        super().__init__(**kw)

    # tfds 4.9.10 resolves code_path through `importlib_resources`, which it does not install
    # on Python >= 3.9 (tensorflow/datasets#11212); this file is the code path anyway.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        metadata = tfds.core.MetadataDict()
        if self._stats is not None:
            metadata["stats"] = self._stats.to_dict()
            metadata["inputs"] = self._inputs  # what the config name's hash covers
        return _LocalDatasetInfo(
            builder=self,
            description="instructrl records (normalised JSON, see instructrl/data/records.py)",
            features=tfds.features.FeaturesDict({"record": tfds.features.Text()}),
            metadata=metadata,
            disable_shuffling=True,  # keep file order: indices map back to the source lines
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        if not self._staged:
            raise InputError(f"{self.data_path}: dataset is not built and no records were staged")
        return {split: self._generate_examples(path) for split, path in self._staged.items()}

    def _generate_examples(self, path: str) -> Any:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                yield i, {"record": line.rstrip("\n")}


@dataclasses.dataclass
class BuiltDataset:
    kind: str
    path: str  # the prepared dataset's directory
    sources: dict[str, Sequence[dict[str, bytes]]]  # split -> tfds data source
    stats: LoadStats


def _expand(spec: str, key: str) -> list[str]:
    paths: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        matches = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        if not matches or not all(epath.Path(m).exists() for m in matches):
            raise ConfigError(f"config key 'data.{key}': {part} not found")
        paths.extend(matches)
    return paths


def resolve_files(kind: str, config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
    """(train files, validation files) of `kind` from config.data (see config.py)."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}")
    train = _expand(config.get(kind, ""), kind)
    validation = _expand(config.get(f"{kind}_validation", ""), f"{kind}_validation")
    if not train and config.dir:
        root = epath.Path(config.dir)
        suffixes = (".jsonl", ".txt") if kind == "pretrain" else (".jsonl",)
        single = [root / f"{kind}{s}" for s in suffixes]
        train = [str(p) for p in single if p.exists()]
        if (root / kind).is_dir():
            train += sorted(str(p) for p in (root / kind).iterdir() if p.suffix in suffixes)
        if not validation and (root / f"{kind}_validation.jsonl").exists():
            validation = [str(root / f"{kind}_validation.jsonl")]
    if not train:
        raise ConfigError(
            f"config key 'data.{kind}': no files (set it, or put {kind}.jsonl in data.dir={config.dir!r})"
        )
    return train, validation


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def length_limits(config: ml_collections.ConfigDict, tokenizer: Any) -> LengthLimits:
    """The length policy of config.data, with its chat format (data.chat_template)."""
    return LengthLimits(
        tokenizer=tokenizer,
        max_prompt_len=config.max_prompt_len,
        max_response_len=config.max_response_len,
        seq_len=config.seq_len,
        min_response_len=config.min_response_len,
        chat=chat_format.for_data(tokenizer, config),
    )


def build_inputs(
    kind: str,
    config: ml_collections.ConfigDict,
    tokenizer: Any,
    train: list[str],
    validation: list[str],
) -> dict[str, Any]:
    """Everything the built records depend on; its hash names the builder config."""
    inputs: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "train": [[p, _file_hash(p)] for p in train],
        "validation": [[p, _file_hash(p)] for p in validation],
        "validation_fraction": 0.0 if validation else float(config.validation_fraction),
        "skip_invalid": bool(config.skip_invalid),
        "max_responses": int(config.max_responses) if kind == "comparisons" else 0,
    }
    if kind != "pretrain":
        inputs["tokenizer"] = tokenizer_fingerprint(tokenizer)
        limits = length_limits(config, tokenizer)
        inputs["limits"] = {
            f.name: getattr(limits, f.name)
            for f in dataclasses.fields(limits)
            if f.name not in ("tokenizer", "chat")
        }
        chat = limits.chat.fingerprint()
        if chat is not None:  # plain records keep the names they had before templates
            inputs["chat_template"] = chat
    return inputs


def in_validation(key: str, fraction: float) -> bool:
    """Deterministic split: the first 8 bytes of sha256(key) as a fraction of 2**64."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2**64


def _stage(
    kind: str,
    config: ml_collections.ConfigDict,
    tokenizer: Any,
    train: list[str],
    validation: list[str],
    tmp: str,
) -> tuple[dict[str, str], LoadStats]:
    """Validates all records and writes one normalised JSON line per record and split."""
    stats = LoadStats(kind)
    limits = None if kind == "pretrain" else length_limits(config, tokenizer)
    kw = dict(
        skip_invalid=config.skip_invalid,
        limits=limits,
        max_responses=config.max_responses,
        stats=stats,
    )
    counts = dict.fromkeys(_SPLITS, 0)
    files = {s: open(f"{tmp}/{s}.jsonl", "w", encoding="utf-8") for s in _SPLITS}  # noqa: SIM115
    try:
        for split, paths in (("train", train), ("validation", validation)):
            for rec in iter_records(kind, paths, **kw):
                to = split
                if split == "train" and not validation:
                    key = rec.data["text"] if kind == "pretrain" else rec.data["prompt"]
                    to = "validation" if in_validation(key, config.validation_fraction) else "train"
                files[to].write(json.dumps(rec.data, ensure_ascii=False) + "\n")
                counts[to] += 1
    finally:
        for f in files.values():
            f.close()
    stats.splits = {s: n for s, n in counts.items() if n}
    if not counts["train"]:
        stats.log(kind)
        raise InputError(
            f"{', '.join(train)}: no {kind} records left for training after validation"
        )
    return {s: f"{tmp}/{s}.jsonl" for s in _SPLITS if counts[s]}, stats


def build_dataset(
    kind: str,
    config: ml_collections.ConfigDict,
    tokenizer: Any = None,
    *,
    data_dir: str | None = None,
) -> BuiltDataset:
    """Builds (or reuses) the array_record dataset of `kind` from config.data's files.

    tokenizer: needed for every kind but "pretrain" (length limits are checked at build).
    data_dir: where datasets live; defaults to config.tfds_dir.
    """
    data_dir = data_dir or config.tfds_dir
    if not data_dir:
        raise ConfigError("config key 'data.tfds_dir' is empty and no data_dir was given")
    if kind != "pretrain" and tokenizer is None:
        raise ValueError(f"build_dataset({kind!r}) needs the tokenizer (length limits)")
    train, validation = resolve_files(kind, config)
    inputs = build_inputs(kind, config, tokenizer, train, validation)
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    builder_config = tfds.core.BuilderConfig(name=f"{kind}-{digest}", description=f"{kind} records")
    common = dict(config=builder_config, data_dir=data_dir, file_format="array_record")
    with _quiet_tfds():
        builder = InstructrlRecords(**common)
        reused = builder.is_prepared()
        if reused:
            stats = LoadStats.from_dict(dict(builder.info.metadata["stats"]))
        else:
            epath.Path(data_dir).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=data_dir, prefix=".staging-") as tmp:
                staged, stats = _stage(kind, config, tokenizer, train, validation, tmp)
                new = InstructrlRecords(staged=staged, stats=stats, inputs=inputs, **common)
                # tfds prints its progress bars and a banner; keep both out of the programs'
                # output (stdout may be JSON) and the log (a failure still raises).
                with (
                    contextlib.redirect_stdout(io.StringIO()),
                    contextlib.redirect_stderr(io.StringIO()),
                ):
                    new.download_and_prepare()
        sources = tfds.data_source(
            DATASET_NAME,
            data_dir=data_dir,
            download=False,
            try_gcs=False,
            builder_kwargs={"config": builder_config, "file_format": "array_record"},
        )
    stats.log(f"{kind} ({builder.data_path}{', reused' if reused else ''})")
    return BuiltDataset(kind=kind, path=str(builder.data_path), sources=dict(sources), stats=stats)
