"""The model registry on the shared volume: versions v0, v1, ... and the CURRENT pointer.

    models/v<N>/model.safetensors   weights (state dict; never a pickle)
    models/v<N>/manifest.json       everything needed to rebuild and use the model
    models/v<N>/data.json           the (sha256, label) pairs it was trained and validated on
    models/v<N>/*.png               plots (curves, confusion matrix)
    models/.v<N>.partial/           a version being written; never read
    models/.v<N>.removed/           a version being removed by retention; never read
    models/CURRENT                  the served version's name, replaced atomically
    models/POLICY                   the promotion policy (JSON; absent: automatic)
    models/.lock                    every change of CURRENT, POLICY or the set of versions

Publishing is crash-safe: files are written into `.v<N>.partial/` and fsynced, the folder is
renamed to `v<N>` (atomic on POSIX), then CURRENT is replaced by temp + fsync + os.replace +
fsync of the folder. A reader never sees a half-written version.

One lock for every writer. CURRENT has three writers, in different processes (the API's
activate, a job's promotion in the service or in `visionloop train`, retention), so every change
of CURRENT, of POLICY and of the set of versions happens under `models/.lock`, a cross-process
`FileLock` (also exclusive between threads, and re-entrant in the thread that holds it). Readers
(`current`, `versions`, `load`, the replicas' poll) take no lock: each file they read is
replaced atomically. What the lock guarantees:
- `activate` checks the version and sets CURRENT (and the pin) in one critical section, so
  retention cannot remove it in between;
- `publish_candidate` promotes a job's candidate only if CURRENT is still the version the gate
  judged against and the policy is `automatic`; otherwise it publishes without promoting and
  says why, so a person's choice made while the job was judging stays;
- `prune` never removes CURRENT, the pinned version, their parents, or v0, as they are at the
  moment it runs.
The lock is held for file operations only (at most a publish's write and fsync), never while a
model is evaluated or loaded.

Promotion policy (`models/POLICY`, `policy()` / `set_policy()`): `automatic` (the default, and
what an absent file means): a job whose candidate passes the gate becomes CURRENT; `pinned`:
jobs publish but never promote, until the policy is set back to automatic. Activating a version
pins it unless asked not to (`activate(..., pin=False)`, which sets the policy to automatic: the
activated version serves until a job passes the gate against it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn

from training.dataset import fsync_dir, write_file_atomic
from training.errors import DomainError
from training.inference import ONNX_FILE, OnnxModule, choose_engine, onnxruntime_available
from training.model import BackboneChoice, build_model, imagenet_categories, resolve_backbone
from training.presets import EvalPreset

log = logging.getLogger(__name__)

VERSION_PATTERN = re.compile(r"^v(\d{1,9})$")
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
DATA = "data.json"
POLICY = "POLICY"
TRIAL = "TRIAL"
TRIAL_MODES = ("shadow", "canary")
FORMAT_VERSION = 1
AUTOMATIC, PINNED = "automatic", "pinned"
POLICY_MODES = (AUTOMATIC, PINNED)
UNPIN_HINT = ("PUT /v1/models/policy {\"mode\":\"automatic\"} or `visionloop unpin` lets jobs "
              "promote")


class VersionNotFound(DomainError, LookupError):
    code = "version_not_found"
    status = 404


class InvalidVersion(DomainError, ValueError):
    """A version that exists but cannot be loaded (missing or corrupt files). 409 over HTTP:
    the version is there, but in a state that cannot serve the request; the message names it."""

    code = "invalid_version"
    status = 409


class InvalidPolicy(DomainError, ValueError):
    code = "invalid_policy"
    status = 400


class InvalidTrial(DomainError, ValueError):
    """A trial that cannot be set: an unknown mode, a share outside (0, 1], the current
    version itself, or no version current to compare it with."""

    code = "invalid_trial"
    status = 400


class NoCurrentVersion(DomainError, LookupError):
    """Pinning needs a version to pin: refused while CURRENT names none (409)."""

    code = "no_current_version"
    status = 409


def version_number(version: str) -> int:
    m = VERSION_PATTERN.fullmatch(version)
    if not m:
        raise VersionNotFound(f"invalid version name {version[:64]!r}; expected v0, v1, ...")
    return int(m.group(1))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def software_versions() -> dict[str, str]:
    import torchvision

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__}
    try:
        from importlib.metadata import version

        out["visionloop"] = version("visionloop")
        out["ray"] = version("ray")
    except Exception:
        pass
    return out


@dataclass
class LoadedModel:
    """A version ready for inference: model in eval mode, its preset and class names."""

    version: str
    model: nn.Module
    preset: EvalPreset
    classes: list[str]
    manifest: dict[str, Any]


@dataclass(frozen=True)
class Activation:
    """What `Registry.activate` changed, so that `undo_activation` can put it back."""

    version: str
    previous: str | None
    previous_policy: dict[str, Any]
    policy: dict[str, Any]


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "an unknown time"


def pinned_note(policy: dict[str, Any]) -> str:
    """Why a job does not promote while the policy is pinned, and the way out."""
    by = f" by {policy['by']}" if policy.get("by") else ""
    return (f"pinned to {policy.get('version')} since {_when(policy.get('changed_at'))}{by}; "
            f"{UNPIN_HINT}")


class Registry:
    def __init__(self, home: Path | str):
        self.home = Path(home)
        self.root = self.home / "models"
        self.root.mkdir(parents=True, exist_ok=True)
        self.current_path = self.root / "CURRENT"
        self.lock = FileLock(str(self.root / ".lock"), timeout=120)

    # -- reading -------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Complete versions, oldest first."""
        out = [p.name for p in self.root.iterdir()
               if p.is_dir() and VERSION_PATTERN.fullmatch(p.name) and (p / MANIFEST).exists()]
        return sorted(out, key=version_number)

    def current(self) -> str | None:
        try:
            name = self.current_path.read_text().strip()
        except FileNotFoundError:
            return None
        return name if VERSION_PATTERN.fullmatch(name) else None

    def version_dir(self, version: str) -> Path:
        version_number(version)
        path = self.root / version
        if not (path / MANIFEST).exists():
            raise VersionNotFound(f"no such version {version!r}")
        return path

    def weights_file(self, version: str) -> tuple[Path, os.stat_result]:
        """The weights file of `version` and its stat. Raises VersionNotFound (404) for a
        version that is not there, and InvalidVersion (409, naming the version) for one whose
        weights file is gone or is not a file: the version exists but cannot be served (nor
        downloaded)."""
        path = self.version_dir(version) / WEIGHTS
        try:
            info = path.stat()
        except OSError:
            info = None
        if info is None or not stat.S_ISREG(info.st_mode):
            raise InvalidVersion(f"{version} is broken: its weights file {WEIGHTS} is missing "
                                 "from the volume; activate or train another version")
        return path, info

    def policy(self) -> dict[str, Any]:
        """The promotion policy: {"mode": "automatic" | "pinned", "version" (the pinned
        version, else None), "changed_at" (epoch seconds), "by" (who set it)}. An absent
        POLICY file is automatic. An unreadable one (edited by hand) counts as pinned to
        CURRENT, so that no job replaces a model while nobody can tell what was meant; it is
        logged, and `set_policy` rewrites it."""
        try:
            raw = json.loads((self.root / POLICY).read_text())
            mode = raw["mode"]
            if mode not in POLICY_MODES:
                raise ValueError(f"unknown mode {mode!r}")
            version = raw.get("version") if mode == PINNED else None
            return {"mode": mode, "version": version, "changed_at": raw.get("changed_at"),
                    "by": raw.get("by")}
        except FileNotFoundError:
            return {"mode": AUTOMATIC, "version": None, "changed_at": None, "by": None}
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("models/%s is unreadable (%s); treating it as pinned to CURRENT until "
                        "the policy is set again", POLICY, exc)
            return {"mode": PINNED, "version": self.current(), "changed_at": None, "by": None}

    def manifest(self, version: str) -> dict[str, Any]:
        path = self.version_dir(version) / MANIFEST
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidVersion(f"{version}: unreadable manifest: {exc}") from None

    def load(self, version: str, device: str | torch.device = "cpu", engine: str = "auto"
             ) -> LoadedModel:
        """Rebuild the model from the manifest alone and load its weights (safetensors).

        engine: "auto" runs what the manifest's `inference` record chose (ONNX Runtime on a CPU
        when it won at publish time and is installed), "eager" always runs PyTorch."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        manifest = self.manifest(version)
        self.verify_checksums(version, manifest)
        try:
            classes = list(manifest["classes"])
            model = build_model(manifest["backbone"], num_classes=len(classes), pretrained=False)
            state = load_file(str(self.version_dir(version) / WEIGHTS), device=str(device))
            model.load_state_dict(state, strict=True)
            preset = EvalPreset.from_dict(manifest["preprocessing"])
        except (KeyError, OSError, RuntimeError, ValueError, SafetensorError) as exc:
            raise InvalidVersion(f"{version}: cannot load: {type(exc).__name__}: {exc}") from None
        model.to(device).eval()
        chosen = (manifest.get("inference") or {}).get("engine", "eager")
        onnx_path = self.version_dir(version) / ONNX_FILE
        if (engine == "auto" and chosen == "onnxruntime" and torch.device(device).type == "cpu"
                and onnx_path.exists() and onnxruntime_available()):
            try:
                model = OnnxModule(onnx_path)
            except Exception as exc:  # onnxruntime raises its own types on a corrupt graph
                raise InvalidVersion(f"{version}: cannot load {ONNX_FILE}: {exc}") from None
        return LoadedModel(version, model, preset, classes, manifest)

    def verify_checksums(self, version: str, manifest: dict[str, Any]) -> None:
        """Raise InvalidVersion when a file differs from the checksum recorded at publish."""
        folder = self.version_dir(version)
        for name, expected in (manifest.get("checksums") or {}).items():
            try:
                actual = file_sha256(folder / name)
            except OSError as exc:
                raise InvalidVersion(f"{version}: cannot read {name}: {exc}") from None
            if actual != expected:
                raise InvalidVersion(f"{version}: {name} does not match its checksum in the "
                                     "manifest (corrupted or replaced on disk)")

    # -- writing -------------------------------------------------------------------------------
    def allocate(self) -> tuple[str, Path]:
        """Reserve the next version number -> (name, staging folder). Safe across processes."""
        with self.lock:
            numbers = [version_number(p.name) for p in self.root.iterdir()
                       if VERSION_PATTERN.fullmatch(p.name)]
            numbers += [int(m.group(1)) for p in self.root.iterdir()
                        if (m := re.fullmatch(r"\.v(\d+)\.partial", p.name))]
            n = max(numbers, default=-1) + 1
            staging = self.root / f".v{n}.partial"
            staging.mkdir()
            return f"v{n}", staging

    def publish(self, version: str, staging: Path, state_dict: dict[str, torch.Tensor],
                manifest: dict[str, Any], data: dict[str, Any] | None = None) -> Path:
        """Write weights + manifest (+ data list) into `staging`, fsync, rename to models/<v>
        (the rename under the lock)."""
        manifest = self._stage(version, staging, state_dict, manifest, data)
        with self.lock:
            return self._commit(version, staging, manifest)

    def _stage(self, version: str, staging: Path, state_dict: dict[str, torch.Tensor],
               manifest: dict[str, Any], data: dict[str, Any] | None) -> dict[str, Any]:
        """Weights (+ data list) into `staging`, fsynced. -> the manifest with the version,
        format and checksums of the files a loader trusts (so a flipped bit is refused, not
        served)."""
        from safetensors.torch import save_file

        contiguous = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(contiguous, str(staging / WEIGHTS))
        if data is not None:
            (staging / DATA).write_text(json.dumps(data))
        checksums = {name: file_sha256(staging / name) for name in (WEIGHTS, ONNX_FILE)
                     if (staging / name).exists()}
        for f in staging.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        return {**manifest, "version": version, "format_version": FORMAT_VERSION,
                "checksums": checksums}

    def _commit(self, version: str, staging: Path, manifest: dict[str, Any]) -> Path:
        """Hold the lock. The manifest into `staging` (fsynced), then the rename into place."""
        path = staging / MANIFEST
        path.write_text(json.dumps(manifest, indent=2, default=str))
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        fsync_dir(staging)
        final = self.root / version
        os.rename(staging, final)
        fsync_dir(self.root)
        log.info("published %s (%s)", version, final)
        return final

    def set_current(self, version: str) -> None:
        """Point CURRENT at `version` (which must exist and be complete), under the lock. The
        policy is left as it is: `activate` is the user-facing change."""
        with self.lock:
            self.version_dir(version)
            self._write_current(version)

    def _write_current(self, version: str | None) -> None:
        """Hold the lock. None removes CURRENT (no version served)."""
        if version is None:
            with contextlib.suppress(FileNotFoundError):
                self.current_path.unlink()
            fsync_dir(self.root)
        else:
            write_file_atomic(self.current_path, (version + "\n").encode())
        log.info("CURRENT -> %s", version)

    def _write_policy(self, mode: str, version: str | None, by: str) -> dict[str, Any]:
        """Hold the lock. -> the policy written."""
        policy = {"mode": mode, "version": version if mode == PINNED else None,
                  "changed_at": time.time(), "by": by}
        write_file_atomic(self.root / POLICY, json.dumps(policy).encode())
        log.info("promotion policy -> %s%s (by %s)", mode,
                 f" to {version}" if mode == PINNED else "", by)
        return policy

    def trial(self) -> dict[str, Any] | None:
        """The version on trial (`models/TRIAL`): {version, mode ("shadow": it also classifies
        a `share` of the requests the current version answers, and answers none; "canary": it
        answers a `share` of the requests that name no version), share, set_at, by}, or None.
        An unreadable file (edited by hand) counts as no trial, logged."""
        try:
            raw = json.loads((self.root / TRIAL).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("%s is unreadable, so no version is on trial: %s", TRIAL, exc)
            return None
        if (not isinstance(raw, dict) or raw.get("mode") not in TRIAL_MODES
                or not isinstance(raw.get("share"), int | float)
                or not isinstance(raw.get("version"), str)):
            log.warning("%s is malformed, so no version is on trial: %r", TRIAL, raw)
            return None
        return raw

    def set_trial(self, version: str, mode: str, share: float, by: str) -> dict[str, Any]:
        """Put `version` on trial (replacing any trial), under the lock. Raises InvalidTrial
        (400) for a mode not in TRIAL_MODES, a share outside (0, 1], the current version, or
        when no version is current; VersionNotFound (404) / InvalidVersion (409) as
        `weights_file`. -> the trial."""
        if mode not in TRIAL_MODES:
            raise InvalidTrial(f"unknown trial mode {str(mode)[:64]!r}; expected one of "
                               f"{list(TRIAL_MODES)}")
        if not 0.0 < share <= 1.0:
            raise InvalidTrial(f"share {share!r} is outside (0, 1]")
        with self.lock:
            self.weights_file(version)
            current = self.current()
            if current is None:
                raise InvalidTrial("no version is current, so there is nothing to try "
                                   f"{version} beside; activate one first")
            if version == current:
                raise InvalidTrial(f"{version} is the current version; a trial is for "
                                   "another one")
            trial = {"version": version, "mode": mode, "share": float(share),
                     "current": current, "set_at": time.time(), "by": by}
            write_file_atomic(self.root / TRIAL, json.dumps(trial).encode())
        log.info("trial: %s in %s mode on %.0f%% of requests (by %s)", version, mode,
                 share * 100, by)
        return trial

    def end_trial(self) -> dict[str, Any] | None:
        """End the trial, if any. -> the trial that ended, or None."""
        with self.lock:
            trial = self.trial()
            (self.root / TRIAL).unlink(missing_ok=True)
        if trial:
            log.info("trial of %s ended", trial["version"])
        return trial

    def set_policy(self, mode: str, by: str) -> dict[str, Any]:
        """`automatic`: jobs that pass the gate become CURRENT. `pinned`: pin the current
        version; jobs publish but never promote until the policy is automatic again.
        -> the policy. Raises InvalidPolicy for another mode, NoCurrentVersion when pinning
        with no CURRENT."""
        if mode not in POLICY_MODES:
            raise InvalidPolicy(f"unknown policy mode {str(mode)[:64]!r}; expected one of "
                                f"{list(POLICY_MODES)}")
        with self.lock:
            current = self.current()
            if mode == PINNED and current is None:
                raise NoCurrentVersion("no version is current, so there is none to pin; "
                                       "activate one first")
            return self._write_policy(mode, current, by)

    def activate(self, version: str, pin: bool = True, by: str = "api") -> Activation:
        """Serve `version`: under the lock, check it (VersionNotFound 404 for a version that
        is not there, InvalidVersion 409 for one whose weights file is gone), point CURRENT at
        it and set the policy: pinned to it (`pin`), or automatic. -> what changed, for
        `undo_activation`. The replicas pick CURRENT up by themselves; the API's activate
        also has every replica load it and undoes the activation if one cannot. Activating the
        version on trial ends the trial (its promotion by hand)."""
        with self.lock:
            self.weights_file(version)
            previous, previous_policy = self.current(), self.policy()
            trial = self.trial()
            if trial is not None and trial["version"] == version:  # promoted by hand
                (self.root / TRIAL).unlink(missing_ok=True)
                log.info("trial of %s ended: it is activated", version)
            self._write_current(version)
            policy = self._write_policy(PINNED if pin else AUTOMATIC, version, by)
        log.info("activated %s (was %s; %s)", version, previous,
                 f"pinned by {by}" if pin else f"policy automatic, by {by}")
        return Activation(version, previous, previous_policy, policy)

    def undo_activation(self, activation: Activation) -> bool:
        """Put CURRENT (and the policy, if nobody changed it since) back as they were before
        `activation`, unless CURRENT has changed since (another activate or a promotion:
        that later choice stands). -> whether CURRENT went back."""
        with self.lock:
            if self.current() != activation.version:
                return False
            previous = activation.previous
            if previous is not None and not (self.root / previous / MANIFEST).exists():
                previous = None
            self._write_current(previous)
            if self.policy() == activation.policy:
                old = activation.previous_policy
                if old["changed_at"] is None and old["mode"] == AUTOMATIC:
                    with contextlib.suppress(FileNotFoundError):
                        (self.root / POLICY).unlink()
                else:
                    write_file_atomic(self.root / POLICY, json.dumps(old).encode())
        log.info("activation of %s undone: CURRENT -> %s", activation.version, previous)
        return True

    def publish_candidate(self, version: str, staging: Path,
                          state_dict: dict[str, torch.Tensor], manifest: dict[str, Any],
                          data: dict[str, Any] | None, judged_current: str | None
                          ) -> dict[str, Any]:
        """Publish a job's candidate and promote it, or not, in one critical section.

        `manifest["promotion"]` is the gate's record: `promoted` its verdict, `reason` why;
        `judged_current` the CURRENT the gate compared against. It is promoted only if the
        gate passed, the policy is automatic and CURRENT is still `judged_current` (a person's
        activate while the job was judging stands: the candidate was not compared with what
        is served now). -> the promotion record as published in the manifest: `promoted` the
        final word, `gate_passed` the gate's, `policy` the policy at the decision, and
        `reason` followed by why a candidate that passed was not promoted."""
        record = dict(manifest["promotion"])
        passed = bool(record["promoted"])
        staged = self._stage(version, staging, state_dict, manifest, data)
        with self.lock:
            policy, current = self.policy(), self.current()
            held_back = None
            if passed and policy["mode"] == PINNED:
                held_back = f"not promoted: {pinned_note(policy)}"
            elif passed and current != judged_current:
                held_back = (f"not promoted: CURRENT changed from {judged_current} to "
                             f"{current} while this job was judged (an activate or another "
                             f"promotion); that choice stays. POST /v1/models/{version}/activate "
                             "serves this version")
            record.update(promoted=passed and held_back is None, gate_passed=passed,
                          policy=policy)
            if held_back:
                record["reason"] = f"{record['reason']}; {held_back}"
            self._commit(version, staging, {**staged, "promotion": record})
            if record["promoted"]:
                self._write_current(version)
        return record

    def update_manifest(self, version: str, /, **fields: Any) -> None:
        path = self.version_dir(version) / MANIFEST
        manifest = json.loads(path.read_text())
        manifest.update(fields)
        write_file_atomic(path, json.dumps(manifest, indent=2, default=str).encode())

    def prune(self, keep: int) -> list[str]:
        """Remove versions beyond the newest `keep`, never CURRENT, the pinned version, the
        version on trial, their parents or v0, under the lock (so CURRENT and the pin cannot
        change meanwhile). A version is first renamed to `.v<N>.removed` (atomic: readers see
        it whole or not at all), then deleted."""
        removed = []
        with self.lock:
            for leftover in self.root.glob(".v*.removed"):  # a prune killed mid-delete
                shutil.rmtree(leftover, ignore_errors=True)
            versions = self.versions()
            trial = self.trial()
            kept = {"v0", self.current(), self.policy()["version"],
                    trial["version"] if trial else None}
            protected = set(kept)
            for v in kept - {None}:
                with contextlib.suppress(VersionNotFound, InvalidVersion):
                    protected.add(self.manifest(v).get("parent"))
            for v in versions[:-keep] if keep > 0 else versions:
                if v in protected:
                    continue
                doomed = self.root / f".{v}.removed"
                os.rename(self.root / v, doomed)
                fsync_dir(self.root)
                shutil.rmtree(doomed)
                removed.append(v)
                log.info("retention: removed model version %s (keeping %d newest)", v, keep)
        return removed

    def remove_stale_partials(self, older_than_s: float = 3600) -> list[str]:
        """Leftovers of killed publishers (`.v<N>.partial`), once old enough to be dead."""
        removed = []
        now = time.time()
        for p in self.root.glob(".v*.partial"):
            if now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
                log.info("removed unfinished publish %s", p.name)
        return removed

    # -- backbone & version 0 ------------------------------------------------------------------
    def resolve_backbone(self, requested: str) -> BackboneChoice:
        """`auto` is resolved once per volume and recorded in `models/backbone.json`; later jobs
        keep that backbone until one is named explicitly."""
        if requested != "auto":
            return resolve_backbone(requested)
        record = self.root / "backbone.json"
        with self.lock:
            if record.exists():
                d = json.loads(record.read_text())
                return BackboneChoice(d["name"], d["weights_origin"],
                                      f"auto, resolved earlier on this volume: {d['reason']}")
            choice = resolve_backbone("auto", cache_dir=self.home / "cache" / "torch")
            write_file_atomic(record, json.dumps({
                "name": choice.name, "weights_origin": choice.weights_origin,
                "reason": choice.reason, "resolved_at": time.time()}).encode())
            return choice

    def ensure_v0(self, backbone: str = "auto") -> str | None:
        """Publish version 0, the backbone's own ImageNet classifier, if no version exists yet.
        -> the version published, or None when there was one already."""
        with self.lock:
            if self.versions():
                return None
        choice = self.resolve_backbone(backbone)
        model = build_model(choice.name, num_classes=None, pretrained=True,
                            cache_dir=self.home / "cache" / "torch")
        preset = EvalPreset()
        version, staging = self.allocate()
        if version != "v0":  # another process published first
            shutil.rmtree(staging)
            return None
        model.eval()
        inference = choose_engine(model, staging, preset.crop)
        manifest = {
            "inference": inference,
            "backbone": choice.name, "weights_origin": choice.weights_origin,
            "backbone_reason": choice.reason, "classes": imagenet_categories(),
            "preprocessing": preset.to_dict(), "training_config": None,
            "strategy": "pretrained", "data_fingerprint": None, "metrics": None,
            "promotion": {"promoted": True, "reason": "version 0: pretrained ImageNet classifier"},
            "parent": None, "created_at": time.time(), "software": software_versions(),
        }
        self.publish(version, staging, model.state_dict(), manifest)
        with self.lock:
            if self.current() is None:
                self._write_current(version)
        return version
