"""The model registry on the shared volume: versions v0, v1, ... and the CURRENT pointer.

    models/v<N>/model.safetensors   weights (state dict; never a pickle)
    models/v<N>/manifest.json       everything needed to rebuild and use the model
    models/v<N>/data.json           the (sha256, label) pairs it was trained and validated on
    models/v<N>/*.png               plots (curves, confusion matrix)
    models/.v<N>.partial/           a version being written; never read
    models/CURRENT                  the served version's name, replaced atomically
    models/.lock                    version numbers are allocated under this lock

Publishing is crash-safe: files are written into `.v<N>.partial/` and fsynced, the folder is
renamed to `v<N>` (atomic on POSIX), then CURRENT is replaced by temp + fsync + os.replace +
fsync of the folder. A reader never sees a half-written version.
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
FORMAT_VERSION = 1


class VersionNotFound(DomainError, LookupError):
    code = "version_not_found"
    status = 404


class InvalidVersion(DomainError, ValueError):
    """A version that exists but cannot be loaded (missing or corrupt files). 409 over HTTP:
    the version is there, but in a state that cannot serve the request; the message names it."""

    code = "invalid_version"
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
        """Write weights + manifest (+ data list) into `staging`, fsync, rename to models/<v>."""
        from safetensors.torch import save_file

        contiguous = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(contiguous, str(staging / WEIGHTS))
        if data is not None:
            (staging / DATA).write_text(json.dumps(data))
        # Checksums of the files a loader trusts, so a flipped bit is refused, not served.
        checksums = {name: file_sha256(staging / name) for name in (WEIGHTS, ONNX_FILE)
                     if (staging / name).exists()}
        manifest = {**manifest, "version": version, "format_version": FORMAT_VERSION,
                    "checksums": checksums}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        for f in staging.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(staging)
        final = self.root / version
        os.rename(staging, final)
        fsync_dir(self.root)
        log.info("published %s (%s)", version, final)
        return final

    def set_current(self, version: str) -> None:
        self.version_dir(version)  # must exist and be complete
        write_file_atomic(self.current_path, (version + "\n").encode())
        log.info("CURRENT -> %s", version)

    def update_manifest(self, version: str, /, **fields: Any) -> None:
        path = self.version_dir(version) / MANIFEST
        manifest = json.loads(path.read_text())
        manifest.update(fields)
        write_file_atomic(path, json.dumps(manifest, indent=2, default=str).encode())

    def prune(self, keep: int) -> list[str]:
        """Remove versions beyond the newest `keep`, never CURRENT, its parent or v0."""
        versions = self.versions()
        current = self.current()
        protected = {"v0", current}
        if current:
            with contextlib.suppress(VersionNotFound, InvalidVersion):
                protected.add(self.manifest(current).get("parent"))
        removed = []
        for v in versions[:-keep] if keep > 0 else versions:
            if v in protected:
                continue
            shutil.rmtree(self.root / v)
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
        if self.current() is None:
            self.set_current(version)
        return version
