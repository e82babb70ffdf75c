"""The run folder: one run at a time, never mixed with another, resumed only from a state that checks out.

A run folder (``cfg.run.resolved_run_dir()``) belongs to one run. The rules, applied by :func:`open_run`
before any image is decoded and enforced for every task:

* **Lock.** The main process holds an exclusive ``flock`` on ``<run_dir>/.lock`` for the whole run; a second
  run into the same folder is refused at once (the OS drops the lock if the process dies).
* **Fresh run over an earlier one.** If the folder already holds a run (``config.yaml``, ``metrics.jsonl``,
  ``state/``) or the model file ``--out`` exists, a new run is refused with how to continue (``--resume``) or
  start over (``--overwrite``, which removes the earlier run's files once the new run has started).
* **Resume.** The saved state must check out (``trainer_state.json`` parses with the known fields; every file
  listed in its manifest is there with its recorded size and hash), and the config may differ from the run's
  saved ``config.yaml`` only in keys that are safe to change (:data:`RESUME_SAFE_KEYS`).
* **Nothing is written until the run starts.** :meth:`RunFolder.start` (called by the engine once data, models
  and state are loaded) clears an overwritten run, writes ``config.yaml`` and the task's run files, and trims
  ``metrics.jsonl`` to the resumed epoch. A run that fails before that leaves the folder as it was.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from animeai.checkpoint import file_sha256
from animeai.config import (
    ConfigError,
    flag_name,
    flatten_dict,
    from_dict,
    iter_leaves,
    save_config,
    to_dict,
    with_overrides,
)

STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"
LOCK_FILE = ".lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "split.json", STATE_DIR, f"{STATE_DIR}.tmp", f"{STATE_DIR}.old")

# Keys a resumed run may change: they do not alter what the saved weights, optimizer state, schedule and data
# split mean. Everything else (architecture, image size, data, batch size, learning rate, seed ...) is fixed.
# run.out / run.run_dir may change when a run (folder + model file) was moved: the best model file must then be
# at the new --out (checked on resume).
RESUME_SAFE_KEYS = frozenset({
    "run.epochs", "run.progress", "run.resume", "run.overwrite", "run.cpu", "run.mixed_precision",
    "run.nonfinite", "run.eval_every", "run.save_every", "run.out", "run.run_dir", "data.num_workers", "data.strict",
    "data.manifest",
})


class RunError(ValueError):
    """A run folder that cannot be used as asked (locked, holds another run, damaged state, unsafe change)."""


class TrainingDiverged(RunError):
    """The training loss or the weights became NaN/inf."""


def _fix_hint(run_dir: Path) -> str:
    return (f"start fresh with --overwrite (removes {run_dir}'s earlier run), or restore {run_dir / STATE_DIR} "
            "from a backup")


# ------------------------------------------------------------------------------------------ state checks


def state_manifest(state_dir: Path) -> dict[str, dict[str, Any]]:
    """``{relative file: {"size", "sha256"}}`` of everything in a saved state folder (but the trainer state)."""
    out = {}
    for p in sorted(state_dir.rglob("*")):
        if p.is_file() and p.name != TRAINER_STATE:
            out[p.relative_to(state_dir).as_posix()] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return out


def read_trainer_state(state_dir: Path, fields: Mapping[str, type]) -> dict[str, Any]:
    """Parse and check ``trainer_state.json`` and the state files it lists; raise ``RunError`` naming the file."""
    state_dir = Path(state_dir)
    run_dir = state_dir.parent
    path = state_dir / TRAINER_STATE
    if not state_dir.is_dir():
        raise RunError(f"cannot resume: no saved state folder {state_dir} (no completed epoch yet?); "
                       "train without --resume first")
    if not path.is_file():
        raise RunError(f"cannot resume from {state_dir}: {TRAINER_STATE} is missing; {_fix_hint(run_dir)}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"cannot resume: {path} is damaged (not valid JSON: {exc}); {_fix_hint(run_dir)}") from None
    if not isinstance(data, dict):
        raise RunError(f"cannot resume: {path} is damaged (not a JSON object); {_fix_hint(run_dir)}")
    unknown = sorted(set(data) - set(fields))
    missing = sorted(set(fields) - set(data) - {"files"})
    if unknown or missing:
        what = "; ".join(filter(None, [unknown and f"unknown key(s) {', '.join(unknown)}",
                                       missing and f"missing key(s) {', '.join(missing)}"]))
        raise RunError(f"cannot resume: {path} is damaged ({what}); {_fix_hint(run_dir)}")
    for key, tp in fields.items():
        value = data.get(key)
        if value is None:
            continue
        ok = isinstance(value, tp) and not (tp in (int, float) and isinstance(value, bool))
        if tp is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or (tp is int and value < 0):
            raise RunError(f"cannot resume: {path} is damaged (key '{key}' = {value!r} is not a valid "
                           f"{tp.__name__}); {_fix_hint(run_dir)}")
    for rel, info in (data.get("files") or {}).items():
        f = state_dir / rel
        if not isinstance(info, dict) or not f.is_file():
            raise RunError(f"cannot resume: {f} is missing from the saved state; {_fix_hint(run_dir)}")
        size = f.stat().st_size
        if size != info.get("size"):
            raise RunError(f"cannot resume: {f} is damaged ({size} bytes, the state saved {info.get('size')}; "
                           f"truncated or replaced?); {_fix_hint(run_dir)}")
        if info.get("sha256") and file_sha256(f) != info["sha256"]:
            raise RunError(f"cannot resume: {f} is damaged (its content changed since it was saved); "
                           f"{_fix_hint(run_dir)}")
    return data


# ------------------------------------------------------------------------------------------ config on resume


def load_run_config(cfg_cls: type, run_dir: Path) -> Any:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunError(f"cannot resume: {path} not found (no run in {run_dir}); train without --resume first")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return from_dict(cfg_cls, data if isinstance(data, dict) else {"?": data})
    except (yaml.YAMLError, UnicodeDecodeError, ConfigError) as exc:
        raise RunError(f"cannot resume: the run's config {path} is damaged ({exc}); {_fix_hint(Path(run_dir))}") \
            from None


def resume_config(cfg_cls: type, overrides: Mapping[str, Any], extra_safe: Iterable[str] = ()) -> Any:
    """The config of a resumed run: the run's saved ``config.yaml`` + the dotted ``overrides`` given now.

    The run folder is found from the overrides' ``run.run_dir`` / ``run.out`` (else the defaults). Overrides of
    keys outside :data:`RESUME_SAFE_KEYS` (and ``extra_safe``: the task's ``resume_safe_keys``) that change a saved
    value are refused by :func:`check_resume_config`."""
    probe = with_overrides(cfg_cls(), overrides)  # every given value is checked before the saved run is read
    run_dir = probe.run.resolved_run_dir()
    saved = load_run_config(cfg_cls, run_dir)
    cfg = with_overrides(saved, {**overrides, "run.resume": True, "run.overwrite": False})
    check_resume_config(saved, cfg, run_dir, extra_safe)
    return cfg


def check_resume_config(saved: Any, cfg: Any, run_dir: Path, extra_safe: Iterable[str] = ()) -> None:
    safe = RESUME_SAFE_KEYS | set(extra_safe)
    old, new = flatten_dict(to_dict(saved)), flatten_dict(to_dict(cfg))
    flags = {dotted: flag_name(dotted, f) for dotted, f, _ in iter_leaves(type(cfg))}
    changed = [k for k in new if k not in safe and k in old and old[k] != new[k]]
    if changed:
        what = ", ".join(f"--{flags.get(k, k)} (run: {old[k]!r}, now: {new[k]!r})" for k in changed)
        raise RunError(f"cannot change on --resume: {what}. The run in {run_dir} was trained with the saved values; "
                       "resume without these flags, or start a new run with --overwrite (or another --out)")


# ------------------------------------------------------------------------------------------ the folder


class RunFolder:
    """The run folder of one run, locked for its duration (main process); see the module docstring."""

    def __init__(self, run_dir: Path, out: Path, *, main: bool = True):
        self.run_dir, self.out, self.main = Path(run_dir), Path(out), main
        self._lock_fd: int | None = None
        self._created = False
        self.started = False

    # -- checks before anything is written
    def preflight(self, *, resume: bool, overwrite: bool) -> None:
        out, run_dir = self.out, self.run_dir
        if out.is_dir():
            raise RunError(f"--out {out} is a folder; give the model file's path, e.g. {out / 'model.pth'}")
        for parent in out.parents:
            if parent.exists() and not parent.is_dir():
                raise RunError(f"--out {out}: {parent} is a file, not a folder")
        if run_dir.exists() and not run_dir.is_dir():
            raise RunError(f"run folder {run_dir} is a file, not a folder (set --run-dir)")
        if not self.main:
            return
        self._lock()
        if resume or overwrite:
            return
        earlier = [name for name in RUN_FILES if (run_dir / name).exists()]
        if earlier or out.exists():
            held = f"{run_dir} holds an earlier run ({', '.join(earlier)})" if earlier else f"{out} exists"
            raise RunError(f"{held}. Continue it with --resume, or start over with --overwrite (replaces the earlier "
                           "run and its model file), or choose another --out / --run-dir")

    def _lock(self) -> None:
        if not self.run_dir.exists():
            self.run_dir.mkdir(parents=True)
            self._created = True
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = ""
            try:
                holder = f" (process {int((self.run_dir / LOCK_FILE).read_text().strip())})"
            except (OSError, ValueError):
                pass
            raise RunError(f"another run is using {self.run_dir}{holder}; wait for it to finish, or give this run "
                           "another --out / --run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    # -- the run has started: now the folder may change
    def start(self, cfg: Any, *, overwrite: bool, resumed_epoch: int | None, run_files: Mapping[str, str]) -> None:
        self.started = True
        if not self.main:
            return
        if overwrite:
            for name in RUN_FILES:
                p = self.run_dir / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            if self.out.is_file():
                self.out.unlink()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        for name, text in run_files.items():
            (self.run_dir / name).write_text(text, encoding="utf-8")
        metrics = self.run_dir / "metrics.jsonl"
        if resumed_epoch is not None and metrics.is_file():
            # Lines of epochs after the resumed state (written before a crash) would be duplicated: drop them.
            keep = []
            for line in metrics.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line).get("epoch", 0)) <= resumed_epoch:
                        keep.append(line)
                except (ValueError, AttributeError, TypeError):
                    continue
            metrics.write_text("".join(x + "\n" for x in keep), encoding="utf-8")

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            if self._created and not self.started:
                # Nothing of this run was written: leave no trace of the folder either.
                (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
                try:
                    self.run_dir.rmdir()
                except OSError:
                    pass


def trainer_state_fields(cls: type) -> dict[str, type]:
    """Field name -> expected JSON type for a TrainerState dataclass."""
    kinds = {"int": int, "float": float, "dict": dict, "str": str, "list": list}
    out = {}
    for f in dataclasses.fields(cls):
        t = str(f.type).replace("typing.", "")
        base = t.split("[")[0].split(" |")[0].strip()
        out[f.name] = kinds.get(base, object)
    return out
