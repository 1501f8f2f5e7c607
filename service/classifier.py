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

Other versions (`predict_bytes(..., version="v3")`, `POST /v1/predict?version=v3`): the
replica loads a named version itself (no second Serve hop, no other deployment), checked like a
reload, and keeps at most `other_versions` of them (default `OTHER_VERSIONS`, 2) besides the
served one, least recently used first out, so comparing two versions on the same images does
not reload each time. A version's files never change once published (the checksums are
checked at load), so a cached model stays valid; a version removed by retention is answered
404 even while it is still cached. A name that cannot exist, or a version that is not on the
volume, raises VersionNotFound (404); one that cannot be loaded or checked, InvalidVersion
(409), every time it is asked for (nothing about the served model changes). Loads of other
versions run one at a time; when CURRENT moves to a version already cached, the swap takes it
from the cache.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import typing
from collections import OrderedDict
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

# Non-current versions one classifier keeps loaded (LRU): two is enough to compare a candidate
# with the version before it while a third model's memory is never held.
OTHER_VERSIONS = 2

# One request for `predict_requests`: (image bytes, top_k, version or None for the served one).
Request = tuple[bytes, int, str | None]


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
                 max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = None,
                 other_versions: int = OTHER_VERSIONS):
        """`threads`: torch intra-op threads for this process (None leaves torch's default,
        which is every core: too many when several replicas and training share a machine).
        `other_versions`: how many non-current versions stay loaded for named predictions
        (0: loaded for each call)."""
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
        self.other_versions = max(0, other_versions)
        self._others: OrderedDict[str, LoadedModel] = OrderedDict()
        self._others_lock = threading.Lock()  # guards `_others` (held for dict operations only)
        self._loading_lock = threading.Lock()  # one load of another version at a time

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
        """`other_versions`: the non-current versions loaded for named predictions, least
        recently used first."""
        with self._others_lock:
            others = list(self._others)
        return {"version": self.version, "reload_failures": self.reload_failures,
                "last_error": self.last_error, "failed_version": self._failed_version,
                "other_versions": others}

    def model_for(self, version: str | None) -> LoadedModel:
        """The model that answers for `version`: the served one for None or its own name;
        otherwise that version, from the cache of other versions or loaded and checked now.
        Raises ModelNotLoaded (None before any model is served), VersionNotFound (404: a
        malformed name, or a version not on the volume) or InvalidVersion (409: it cannot be
        loaded or checked)."""
        loaded = self._loaded
        if version is None:
            if loaded is None:
                raise ModelNotLoaded("no model is loaded yet")
            return loaded
        if loaded is not None and loaded.version == version:
            return loaded
        self.registry.version_dir(version)  # 404 for a malformed or absent (removed) version
        hit = self._cached(version)
        if hit is not None:
            return hit
        with self._loading_lock:
            hit = self._cached(version)  # loaded by another thread while this one waited
            if hit is not None:
                return hit
            new = self.load_checked(version)
            if self.other_versions:
                with self._others_lock:
                    self._others[version] = new
                    while len(self._others) > self.other_versions:
                        evicted, _ = self._others.popitem(last=False)
                        log.info("unloaded model %s (kept %d other versions)", evicted,
                                 self.other_versions)
            log.info("loaded model %s for named predictions (serving %s)", version, self.version)
            return new

    def _cached(self, version: str) -> LoadedModel | None:
        with self._others_lock:
            hit = self._others.get(version)
            if hit is not None:
                self._others.move_to_end(version)
            return hit

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
            with self._others_lock:
                new_cached = self._others.pop(wanted, None)  # loaded and checked already
            try:
                new = new_cached or self.load_checked(wanted)
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
    def decode(self, data: bytes, loaded: LoadedModel | None = None) -> Image.Image:
        """Untrusted bytes -> RGB image (raises ImageError subclasses; see training.imageio).
        JPEGs are decoded at a reduced scale that still covers the preset's resize (of
        `loaded`, else of the served model)."""
        loaded = loaded or self._loaded
        draft = loaded.preset.resize if loaded else None
        return decode_image(data, self.max_pixels, draft_size=draft)

    def predict(self, images: Sequence[Image.Image], top_k: int | Sequence[int] = 5,
                version: str | None = None) -> list[Prediction]:
        """RGB images -> one Prediction each, all computed by the same model version: the
        served one, or `version` (`model_for`).

        `top_k`: one number for all, or one per image; capped at the number of classes.
        """
        loaded = self.model_for(version)  # read once: this call finishes on this model
        return self._classify(loaded, images, top_k)

    def _classify(self, loaded: LoadedModel, images: Sequence[Image.Image],
                  top_k: int | Sequence[int]) -> list[Prediction]:
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

    def predict_bytes(self, items: Sequence[tuple[bytes, int]], version: str | None = None
                      ) -> list[Prediction | ImageError]:
        """(bytes, top_k) pairs -> per item its Prediction, or the ImageError that refused it
        (returned, not raised: one bad image fails only itself; the good ones are classified
        together in one batch), by the served model or `version`. Raises what `model_for`
        raises (ModelNotLoaded, VersionNotFound, InvalidVersion) when there are items."""
        if not items:
            return []
        loaded = self.model_for(version)
        decoded: list[Image.Image] = []
        slots: list[int] = []
        results: list[Prediction | ImageError | None] = [None] * len(items)
        for i, (data, _) in enumerate(items):
            try:
                decoded.append(self.decode(data, loaded))
                slots.append(i)
            except ImageError as exc:
                results[i] = exc
        if decoded:
            preds = self._classify(loaded, decoded, [items[i][1] for i in slots])
            for i, p in zip(slots, preds, strict=True):
                results[i] = dataclasses.replace(p, batch_size=len(decoded))
        assert all(r is not None for r in results)  # every slot is a prediction or an error
        return typing.cast(list[Prediction | ImageError], results)

    def predict_requests(self, requests: Sequence[Request]) -> list[Prediction | DomainError]:
        """(bytes, top_k, version) requests (a `@serve.batch` batch) -> per request its
        Prediction or the DomainError that refused it, never raised: requests are grouped by
        version and each group is one forward pass (batched per version), so a refused image
        or an unknown version fails only its own requests."""
        results: list[Prediction | DomainError | None] = [None] * len(requests)
        groups: dict[str | None, list[int]] = {}
        for i, (_, _, version) in enumerate(requests):
            groups.setdefault(version, []).append(i)
        for version, slots in groups.items():
            try:
                answers: list[Prediction | ImageError] | list[DomainError] = self.predict_bytes(
                    [(requests[i][0], requests[i][1]) for i in slots], version)
            except DomainError as exc:  # one instance per request: each is raised on its own
                answers = [copy.copy(exc) for _ in slots]
            for i, answer in zip(slots, answers, strict=True):
                results[i] = answer
        return typing.cast(list[Prediction | DomainError], results)
