"""Checkpoints: a thin wrapper over orbax's CheckpointManager, plus exported params.

Layout of a stage folder:

    <stage_dir>/checkpoints/<step>/state   train state (sharded arrays; orbax StandardSave)
                                  /data    data-iterator state, one JSON file per process
                                  /meta    stage metadata (JSON: RM normalisation, KL, ...)
    <stage_dir>/DONE                       JSON; written once the stage has finished

Saves are asynchronous (the device->host copy happens before `save` returns, so the
state can be donated right after). Orbax writes each step into a temporary folder and
renames it when complete; a run killed mid-save leaves only a tmp folder, which is
ignored (and removed on the next start), so restore always sees the previous step.
A committed step that does not read back (a file cut short or garbled after the fact) is
skipped for the newest one that does, and moved, never deleted, to
`<stage_dir>/unreadable_checkpoints/<step>` (`restore_latest`). A save that the disk
refuses (full, read-only, I/O error) raises StorageError naming the folder, the free space
and the newest step that is saved and intact.
Restores take an abstract state whose leaves carry the target `.sharding`, so a
checkpoint saved on any mesh restores onto any other mesh or device count.

Exported params (`export_params`/`load_exported`): `<out_dir>/params` (orbax) and
`<out_dir>/model_config.json`, for other stages and users.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from instructrl.errors import InputError, StorageError, storage_error

STATE, DATA, META = "state", "data", "meta"
DONE_FILE = "DONE"
CHECKPOINTS_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable_checkpoints"  # committed steps that failed to restore, kept
PARAMS_DIR = "params"
MODEL_CONFIG_FILE = "model_config.json"

DataState = Mapping[str, Any] | bytes | None


# ------------------------------------------------------------------ data iterator state
# Each JAX process reads its own shard of the data, so each saves its own iterator state
# (orbax's JsonSave would keep only process 0's).


class DataStateHandler(ocp.CheckpointHandler):
    """Writes this process's iterator state to process_<i>-of-<n>.json."""

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        state = args.state
        if state is None:
            payload = {"kind": "none"}
        elif isinstance(state, bytes):
            payload = {"kind": "bytes", "value": base64.b64encode(state).decode("ascii")}
        elif isinstance(state, Mapping):
            payload = {"kind": "json", "value": dict(state)}
        else:
            raise TypeError(f"data_state must be a dict, bytes or None, got {type(state)}")
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (epath.Path(directory) / name).write_text(json.dumps(payload))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> DataState:
        del args
        directory = epath.Path(directory)
        path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir())
            raise ValueError(
                f"{path}: no data-iterator state for this process (found {found}); it was "
                "saved with another process count: restore with restore_data=False"
            )
        payload = json.loads(path.read_text())
        if payload["kind"] == "bytes":
            return base64.b64decode(payload["value"])
        return payload.get("value")

    def metadata(self, directory: epath.Path) -> None:
        del directory


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: DataState


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# ------------------------------------------------------------------ train checkpoints


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    data_state: DataState  # as given to save (dict or bytes), None if not saved/restored
    meta: dict[str, Any]


def _abstract_with_shardings(tree: Any) -> Any:
    """Arrays -> ShapeDtypeStruct with their sharding; every leaf must name a sharding."""

    def convert(path, x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if getattr(x, "sharding", None) is None:
            raise ValueError(
                f"abstract_state{jax.tree_util.keystr(path)}: no sharding (restore needs the "
                "target sharding of every leaf; see train_lib.abstract_train_state)"
            )
        return x

    return jax.tree_util.tree_map_with_path(convert, tree)


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # writes to an open file name no file
        e.filename = e.filename or path
        raise


def _reason(exc: BaseException) -> str:
    """One line: the innermost cause of `exc` (what failed first), its type and message."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if inner is None:
            break
        exc = inner
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def is_done(stage_dir: str) -> bool:
    """True if the stage in `stage_dir` finished (its DONE marker exists)."""
    return os.path.exists(os.path.join(stage_dir, DONE_FILE))


class Checkpointer:
    """Saves/restores (train state, data-iterator state, JSON meta) in <stage_dir>/checkpoints.

    save_interval_steps: `should_save(step)` is true every that many steps; `save(...,
    force=True)` saves regardless (end of stage, preemption). max_to_keep: older steps
    are deleted once a newer one is committed. All processes must call every method.
    """

    def __init__(
        self,
        stage_dir: str,
        *,
        save_interval_steps: int = 1000,
        max_to_keep: int | None = 3,
        async_save: bool = True,
    ):
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        self.stage_dir = os.fspath(stage_dir)
        self.directory = os.path.join(self.stage_dir, CHECKPOINTS_DIR)
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            # Every N steps, plus orbax's multi-host preemption sync point; unlike orbax's
            # default, no extra save at the first step of a run.
            save_decision_policy=policies.AnySavePolicy(
                [
                    policies.FixedIntervalPolicy(save_interval_steps),
                    policies.PreemptionCheckpointingPolicy(),
                ]
            ),
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a save cut short by a kill
        )
        self._manager = ocp.CheckpointManager(
            epath.Path(self.directory), options=options, item_names=(STATE, DATA, META)
        )
        self._saving: int | None = None  # the step of the latest save started
        self._failure: StorageError | None = None  # a save the storage refused

    def _storage_failure(self, exc: BaseException) -> StorageError | None:
        """StorageError for a save the storage refused (None: `exc` is something else)."""
        step = self._saving
        path = os.path.join(self.directory, str(step)) if step is not None else self.directory
        err = storage_error(exc, path, f"saving the checkpoint of step {step}")
        if err is None:
            return None
        intact = [s for s in self._manager.all_steps() if s != step]
        kept = f"step {max(intact)}, the newest saved, is intact" if intact else "none saved yet"
        self._failure = StorageError(f"{err}; checkpoints: {kept}")
        return self._failure

    def _guarded(self, fn, *args, **kw):
        """Runs an orbax call; a save that failed for want of storage -> StorageError."""
        if self._failure is not None:
            raise self._failure
        try:
            return fn(*args, **kw)
        except Exception as e:
            err = self._storage_failure(e)
            if err is None:
                raise
            raise err from e

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: DataState = None,
        meta: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Starts an async save of `state` at `step`; returns whether a save was started.

        data_state: this process's iterator state (dict or bytes, e.g. grain's get_state()).
        meta: JSON-serialisable stage metadata (process 0's copy is kept).
        A step that is already saved is not saved again (returns False).
        """
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(
            **{
                STATE: ocp.args.StandardSave(state),
                DATA: DataStateSave(data_state),
                META: ocp.args.JsonSave(dict(meta or {})),
            }
        )
        self._guarded(self._manager.wait_until_finished)  # a failure of the previous save
        self._saving = step
        return self._guarded(self._manager.save, step, args=args, force=force)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, step: int, abstract_state: Any, *, restore_data: bool = True) -> Restored:
        """Restores `step` onto the shardings carried by `abstract_state`'s leaves.

        abstract_state: pytree of jax.ShapeDtypeStruct(shape, dtype, sharding=...) (or
        arrays, whose sharding is used), structured like the saved state.
        restore_data=False skips the iterator state (e.g. the process count changed).
        """
        items = {
            STATE: ocp.args.StandardRestore(_abstract_with_shardings(abstract_state)),
            META: ocp.args.JsonRestore(),
        }
        if restore_data:
            items[DATA] = DataStateRestore()
        out = self._manager.restore(step, args=ocp.args.Composite(**items))
        return Restored(
            step=int(step),
            state=out[STATE],
            data_state=out[DATA] if restore_data else None,
            meta=dict(out[META] or {}),
        )

    def restore_latest(self, abstract_state: Any, *, restore_data: bool = True) -> Restored | None:
        """Restores the newest committed step that reads cleanly, or returns None if there is
        none.

        A step that fails to restore is logged with the reason and the step before it tried;
        once one restores, the newer unreadable ones are moved to
        `<stage_dir>/unreadable_checkpoints/<step>` (kept for a look, never deleted; the run
        saves those steps anew). InputError naming the folder when no step restores (e.g.
        the config changed the model since): nothing is moved then.
        """
        steps = self.all_steps()
        skipped: list[tuple[int, str]] = []
        for step in reversed(steps):
            try:
                restored, reason = self.restore(step, abstract_state, restore_data=restore_data), ""
            except Exception as e:  # any fault of the files: try the step before
                restored, reason = None, _reason(e)
            if jax.process_count() > 1:  # every process must resume from the same step
                flags = multihost_utils.process_allgather(np.int32(restored is not None))
                if restored is not None and not np.all(flags):
                    restored, reason = None, "unreadable on another process"
            if restored is not None:
                break
            logging.warning("%s/%d: cannot be read (%s); trying the step before", self.directory,
                            step, reason)  # fmt: skip
            skipped.append((step, reason))
        else:
            if not skipped:
                return None
            step, reason = skipped[0]
            tried = ", ".join(str(s) for s, _ in skipped)
            raise InputError(
                f"{self.directory}: no checkpoint can be read (steps {tried}; step {step}: "
                f"{reason}); none was moved or deleted"
            )
        if skipped:
            self._set_aside([s for s, _ in skipped], restored.step)
        return restored

    def _set_aside(self, steps: list[int], resumed: int) -> None:
        """Moves the unreadable `steps` out of orbax's folder (to UNREADABLE_DIR)."""
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("instructrl_checkpoint_set_aside_start")
        if jax.process_index() == 0:
            for step in steps:
                src = epath.Path(self.directory) / str(step)
                dst = epath.Path(self.stage_dir) / UNREADABLE_DIR / str(step)
                k = 1
                while dst.exists():
                    k += 1
                    dst = epath.Path(self.stage_dir) / UNREADABLE_DIR / f"{step}-{k}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                src.rename(dst)
                logging.warning("%s: unreadable, moved to %s (not deleted); resuming from step %d",
                                src, dst, resumed)  # fmt: skip
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("instructrl_checkpoint_set_aside_end")
        self._manager.reload()

    def wait_until_finished(self) -> None:
        self._guarded(self._manager.wait_until_finished)

    def mark_done(self, info: Mapping[str, Any] | None = None) -> None:
        """Waits for pending saves, then writes <stage_dir>/DONE (JSON) on process 0."""
        self.wait_until_finished()
        if jax.process_index() == 0:
            os.makedirs(self.stage_dir, exist_ok=True)
            record = {"time": time.time(), "latest_step": self.latest_step(), **dict(info or {})}
            _write_json_atomic(os.path.join(self.stage_dir, DONE_FILE), record)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("instructrl_checkpoint_mark_done")

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads. After a failed save (already
        raised) the same failure is not raised again."""
        try:
            if self._failure is None:
                self.wait_until_finished()
        finally:
            try:
                self._manager.close()
            except Exception as e:
                if self._failure is None:  # else: reported already, or being raised now
                    if self._storage_failure(e) is None:
                        raise
                    raise self._failure from e

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ exported params


def export_params(params: Any, model_config: Mapping[str, Any], out_dir: str) -> None:
    """Writes `params` to <out_dir>/params and `model_config` to <out_dir>/model_config.json.

    The config is written last, so its presence means the export is complete.
    Overwrites a previous export in `out_dir`.
    """
    out_dir = os.path.abspath(out_dir)
    config_path = os.path.join(out_dir, MODEL_CONFIG_FILE)
    if jax.process_index() == 0 and os.path.exists(config_path):
        os.remove(config_path)
    json.dumps(dict(model_config))  # fail before writing anything if it is not JSON
    path = epath.Path(out_dir) / PARAMS_DIR
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, params, force=True)
            ckptr.wait_until_finished()
    except Exception as e:
        err = storage_error(e, str(path), "exporting params")
        if err is None:
            raise
        raise err from e
    if jax.process_index() == 0:
        _write_json_atomic(config_path, dict(model_config))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("instructrl_export_params")


def load_exported(out_dir: str, shardings: Any = None) -> tuple[Any, dict[str, Any]]:
    """Loads what `export_params` wrote -> (params, model_config dict).

    shardings: None (every array on this process's first device), one Sharding for all
    leaves, or a pytree of Shardings matching the params.
    """
    out_dir = os.path.abspath(out_dir)
    model_config = read_model_config(out_dir)
    path = epath.Path(out_dir) / PARAMS_DIR
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.metadata(path).item_metadata.tree
            if shardings is None:
                shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            if isinstance(shardings, jax.sharding.Sharding):
                shardings = jax.tree.map(lambda _: shardings, tree)
            abstract = jax.tree.map(
                lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree, shardings
            )
            params = ckptr.restore(path, abstract)
    except Exception as e:  # a file cut short, garbled or missing
        raise InputError(f"{path}: exported params cannot be read ({_reason(e)})") from e
    return params, model_config


def read_model_config(out_dir: str) -> dict[str, Any]:
    """`<out_dir>/model_config.json` as a dict; InputError naming the file if it is
    missing (no complete export) or not a JSON object."""
    config_path = os.path.join(out_dir, MODEL_CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path}: missing (no complete export in {out_dir})")
    with open(config_path, encoding="utf-8") as f:
        try:
            model_config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            line = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
            raise InputError(f"{config_path}{line}: not valid JSON") from None
    if not isinstance(model_config, dict):
        raise InputError(f"{config_path}: not a JSON object")
    return model_config
