"""The classifier: the served model version, batch prediction and hot reload. Plain Python.

`Classifier` knows nothing of Ray or HTTP (a GPU benchmark machine imports it without Ray);
`service.deployments.IngressDeployment` holds one per API replica.

Hot reload (`sync`): when `models/CURRENT` names a version other than the one served, the new
version is loaded fully, checked (a forward pass on a dummy batch must give one finite score per
class), and only then does one reference assignment swap it in. A prediction reads that
reference once, so a request that started on the old model finishes on it, and every result
names the version that computed it. A version that fails to load or check is logged, counted
(`reload_failures`) and remembered, and the old model keeps serving; it is retried only when
CURRENT changes again or `sync(force=True)` is called.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from training.errors import DomainError
from training.imageio import DEFAULT_MAX_PIXELS, ImageError, decode_image
from training.registry import InvalidVersion, LoadedModel, Registry

log = logging.getLogger(__name__)


class ModelNotLoaded(DomainError, RuntimeError):
    code = "model_not_loaded"
    status = 503
    headers = {"Retry-After": "1"}


class ModelCheckFailed(InvalidVersion):
    """A version loaded but its check forward pass failed."""


@dataclass(frozen=True)
class Prediction:
    """One image's answer: the version that computed it and its top-k (label, score), best
    first; scores are softmax probabilities in [0, 1]; `batch_size`: how many images were
    classified in the same forward pass."""

    version: str
    top_k: list[tuple[str, float]]
    batch_size: int = 1

    @property
    def label(self) -> str:
        return self.top_k[0][0]

    @property
    def score(self) -> float:
        return self.top_k[0][1]


class Classifier:
    def __init__(self, home: Path | str, device: str = "cpu",
                 max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = None):
        """`threads`: torch intra-op threads for this process (None leaves torch's default,
        which is every core: too many when several replicas and training share a machine)."""
        self.registry = Registry(home)
        self.device = torch.device(device)
        self.max_pixels = max_pixels
        if threads is not None:
            torch.set_num_threads(threads)
        self._loaded: LoadedModel | None = None
        self._sync_lock = threading.Lock()
        self._failed_version: str | None = None
        self.reload_failures = 0
        self.last_error: str | None = None

    # -- state ---------------------------------------------------------------------------------
    @property
    def version(self) -> str | None:
        loaded = self._loaded
        return loaded.version if loaded else None

    @property
    def loaded(self) -> LoadedModel:
        loaded = self._loaded
        if loaded is None:
            raise ModelNotLoaded("no model is loaded yet")
        return loaded

    def status(self) -> dict[str, Any]:
        return {"version": self.version, "reload_failures": self.reload_failures,
                "last_error": self.last_error, "failed_version": self._failed_version}

    # -- reload --------------------------------------------------------------------------------
    def sync(self, force: bool = False) -> str | None:
        """Serve the version CURRENT names, if it is not served already. -> the served version.

        Safe to call from several threads; one load runs at a time, the others wait for it.
        """
        with self._sync_lock:
            wanted = self.registry.current()
            if wanted is None or wanted == self.version:
                if wanted is not None:  # CURRENT is back on what we serve: old failure is moot
                    self._failed_version, self.last_error = None, None
                return self.version
            if wanted == self._failed_version and not force:
                return self.version
            try:
                new = self.load_checked(wanted)
            except Exception as exc:  # any failure (e.g. SafetensorError) keeps the old model
                self.reload_failures += 1
                self._failed_version = wanted
                self.last_error = f"{wanted}: {exc}"
                log.error("model %s failed to load; still serving %s: %s",
                          wanted, self.version, exc)
                return self.version
            old = self.version
            self._loaded = new  # the swap: one reference
            self._failed_version = None
            self.last_error = None
            log.info("now serving model %s (was %s)", new.version, old)
            return new.version

    def load_checked(self, version: str) -> LoadedModel:
        """Load `version` and check it on a dummy batch; raise InvalidVersion if it is unusable."""
        loaded = self.registry.load(version, device=self.device)
        crop = loaded.preset.crop
        dummy = torch.zeros(2, 3, crop, crop, device=self.device)
        with torch.inference_mode():
            out = loaded.model(dummy)
        if tuple(out.shape) != (2, len(loaded.classes)):
            raise ModelCheckFailed(f"{version}: check forward gave shape {tuple(out.shape)}, "
                                   f"expected (2, {len(loaded.classes)})")
        if not torch.isfinite(out).all():
            raise ModelCheckFailed(f"{version}: check forward gave non-finite scores")
        return loaded

    # -- prediction ----------------------------------------------------------------------------
    def decode(self, data: bytes) -> Image.Image:
        """Untrusted bytes -> RGB image (raises ImageError subclasses; see training.imageio).
        JPEGs are decoded at a reduced scale that still covers the preset's resize."""
        loaded = self._loaded
        draft = loaded.preset.resize if loaded else None
        return decode_image(data, self.max_pixels, draft_size=draft)

    def predict(self, images: Sequence[Image.Image], top_k: int | Sequence[int] = 5
                ) -> list[Prediction]:
        """RGB images -> one Prediction each, all computed by the same model version.

        `top_k`: one number for all, or one per image; capped at the number of classes.
        """
        loaded = self.loaded  # read once: this call finishes on this model whatever happens
        if not images:
            return []
        ks = [top_k] * len(images) if isinstance(top_k, int) else list(top_k)
        batch = torch.stack([loaded.preset(img) for img in images]).to(self.device)
        with torch.inference_mode():
            probs = torch.softmax(loaded.model(batch).float(), dim=1)
        k_max = min(max(ks), len(loaded.classes))
        scores, indices = probs.topk(k_max, dim=1)
        out = []
        for row_scores, row_idx, k in zip(scores.tolist(), indices.tolist(), ks, strict=True):
            pairs = [(loaded.classes[i], float(s)) for i, s in zip(row_idx, row_scores,
                                                                    strict=True)]
            out.append(Prediction(loaded.version, pairs[:max(1, min(k, k_max))]))
        return out

    def predict_bytes(self, items: Sequence[tuple[bytes, int]]) -> list[Prediction | ImageError]:
        """(bytes, top_k) pairs -> per item its Prediction, or the ImageError that refused it
        (returned, not raised: one bad image fails only itself; the good ones are classified
        together in one batch). Raises ModelNotLoaded before any model is loaded."""
        decoded: list[Image.Image] = []
        slots: list[int] = []
        results: list[Prediction | ImageError | None] = [None] * len(items)
        for i, (data, _) in enumerate(items):
            try:
                decoded.append(self.decode(data))
                slots.append(i)
            except ImageError as exc:
                results[i] = exc
        if decoded:
            preds = self.predict(decoded, [items[i][1] for i in slots])
            for i, p in zip(slots, preds, strict=True):
                results[i] = dataclasses.replace(p, batch_size=len(decoded))
        assert all(r is not None for r in results)  # every slot is a prediction or an error
        return typing.cast(list[Prediction | ImageError], results)
