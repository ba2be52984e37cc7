"""Checkpoints: directories of safetensors plus optimizer and trainer state, written atomically.

Layout of `RUN/checkpoints/step_00001000/`:
  weights/                  weights, EMA and optimizer state: torch.distributed.checkpoint shards in safetensors,
                            one file per rank (iomm.checkpointing.weights)
  state.json, config.yaml   step, LR schedule, counters, data position, the run's config
  manifest.json             size and sha256 of every file; written last: no manifest, no checkpoint
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

CHECKPOINTS_DIR = "checkpoints"  # in a run directory
MANIFEST = "manifest.json"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    pass


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path) -> None:
    entries = {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(root)}
    (root / MANIFEST).write_text(json.dumps(entries, indent=1), encoding="utf-8")


def verify(root: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    manifest = root / MANIFEST
    if not manifest.is_file():
        return "no manifest (incomplete write)"
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))
    except ValueError:
        return "manifest is not valid JSON"
    if not isinstance(entries, dict) or not entries:
        return "manifest lists no files"
    for name, entry in entries.items():
        path = root / name
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str)):
            return f"manifest entry for {name} is malformed"
        if ".." in Path(name).parts or Path(name).is_absolute():
            return f"manifest names a file outside the checkpoint: {name}"
        try:
            if not path.is_file():
                return f"missing file {name}"
            if path.stat().st_size != entry["size"]:
                return f"{name} has {path.stat().st_size} bytes, manifest says {entry['size']}"
            if _sha256(path) != entry["sha256"]:
                return f"{name} does not match its sha256"
        except OSError as err:
            return f"cannot read {name}: {err.strerror or err}"
    return None


class Group(Protocol):
    """The ranks that save together (iomm.training.distributed.Distributed)."""

    @property
    def main(self) -> bool: ...

    def gather(self, value: Any) -> list[Any]: ...


class OneProcess:
    main = True

    def gather(self, value: Any) -> list[Any]:
        return [value]


def _reason(err: BaseException) -> str:
    # A full disk shows as OSError from Python, SafetensorError from safetensors.
    return err.strerror if isinstance(err, OSError) and err.strerror else str(err) or type(err).__name__


def _on_every_rank(group: Group, action: Callable[[], None] | None) -> None:
    """Runs `action` where given; raises on every rank when it failed on any (the gather is the barrier)."""
    error = None
    if action is not None:
        try:
            action()
        except Exception as err:  # noqa: BLE001 - every rank must learn of it, whatever it is
            error = err
    reasons = group.gather(None if error is None else _reason(error))
    if error is not None:
        raise error
    failed = [f"rank {rank}: {why}" for rank, why in enumerate(reasons) if why is not None]
    if failed:
        raise CheckpointError("; ".join(failed))


def save_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None], *, keep_last: int,
                    keep_every: int = 0, group: Group | None = None) -> Path:
    """Every rank of `group` calls this; `write(tmp_dir)` fills a temporary directory on each (every rank its
    own files), and the main rank renames it into place once its manifest is written.

    On any failure on any rank (a full disk included) the temporary directory is removed, the previous
    checkpoints are untouched, and every rank raises a CheckpointError that says what happened. Temporary
    directories left by a save that was killed are removed first.
    """
    group = group or OneProcess()
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / checkpoint_name(step)
    tmp = root / f"{TMP_PREFIX}{checkpoint_name(step)}"

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a save that was killed: never a checkpoint
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()

    def publish() -> None:
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    try:
        _on_every_rank(group, prepare if group.main else None)
        _on_every_rank(group, lambda: write(tmp))
        _on_every_rank(group, publish if group.main else None)
    except BaseException as err:
        if group.main:
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, Exception):  # Ctrl-C, SystemExit: clean up, then let it through
            raise
        raise CheckpointError(f"could not save checkpoint {final}: {_reason(err)} ({_free_space(root)}); "
                              f"the previous checkpoint is intact") from err
    if group.main:
        _prune(root, keep_last, keep_every)
    return final


def _free_space(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:,.0f} MiB free on that disk"
    except OSError:
        return "free space unknown"


def _prune(root: Path, keep_last: int, keep_every: int) -> None:
    steps = sorted(_step_of(p) for p in root.glob(f"{PREFIX}*") if _step_of(p) is not None)
    for step in steps[:-keep_last] if keep_last > 0 else []:
        if keep_every and step % keep_every == 0:
            continue
        shutil.rmtree(root / checkpoint_name(step), ignore_errors=True)


def _step_of(path: Path) -> int | None:
    digits = path.name[len(PREFIX):]
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


def latest_checkpoint(run_dir: Path, log: Any = print) -> Path | None:
    """The newest intact checkpoint; damaged ones are reported by name and passed over."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    candidates = sorted((p for p in root.glob(f"{PREFIX}*") if _step_of(p) is not None), key=_step_of, reverse=True)
    for path in candidates:
        problem = verify(path)
        if problem is None:
            return path
        log(f"warning: skipping damaged checkpoint {path}: {problem}")
    return None


def run_relative_name(checkpoint: Path) -> str:
    """`RUN/checkpoints/step_X`: the checkpoint inside its run, named by the run's name only (no local path);
    a checkpoint outside a run's layout by its own name."""
    checkpoint = checkpoint.resolve()
    if checkpoint.parent.name != CHECKPOINTS_DIR:
        return checkpoint.name
    return checkpoint.relative_to(checkpoint.parent.parent.parent).as_posix()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest intact checkpoint)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        problem = verify(path)
        if problem:
            raise CheckpointError(f"{path}: damaged checkpoint: {problem}")
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: no intact checkpoint found (expected a checkpoint dir or a run dir "
                              f"with checkpoints/{PREFIX}*)")
    return found
