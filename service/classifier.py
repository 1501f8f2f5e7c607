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

Scores are calibrated: each version's logits are divided by its manifest's temperature
(`training.calibration`; 1.0 for v0 and older versions) before the softmax, and each answer
carries the version's confidence threshold, below which the API answers `unknown`.

Trial (`Registry.trial`, `sync_trial`): a version tried beside the served one, in shadow mode
(it also classifies a share of the requests, answers none) or canary mode (it answers a share
of them); see `predict_requests`.

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
import random
import threading
import typing
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from training.calibration import MAX_TEMPERATURE, MIN_TEMPERATURE
from training.errors import DomainError
from training.imageio import DEFAULT_MAX_PIXELS, ImageError, decode_image
from training.inference import draft_size, logits, preprocess_batch
from training.registry import InvalidVersion, LoadedModel, Registry

log = logging.getLogger(__name__)

# Non-current versions one classifier keeps loaded (LRU): two is enough to compare a candidate
# with the version before it while a third model's memory is never held.
OTHER_VERSIONS = 2

# The label of an answer whose score is below its threshold (`Prediction.is_unknown`); the
# answer's `unknown` field says so, so a class that happens to be named "unknown" stays distinct.
UNKNOWN = "unknown"

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
    first; scores are calibrated softmax probabilities in [0, 1] (`temperature`);
    `batch_size`: how many images were classified in the same forward pass; `threshold`: the
    version's confidence threshold (`version_threshold`)."""

    version: str
    top_k: list[tuple[str, float]]
    batch_size: int = 1
    threshold: float = 0.0
    shadow: Prediction | None = None  # the shadow version's answer, never shown to the caller

    def is_unknown(self, min_score: float | None = None) -> bool:
        """Whether the best score is below `min_score` (the request's), else below the
        version's threshold: the answer is then `UNKNOWN`, its top-k still given."""
        return self.score < (self.threshold if min_score is None else min_score)

    @property
    def label(self) -> str:
        return self.top_k[0][0]

    @property
    def score(self) -> float:
        return self.top_k[0][1]


def temperature(manifest: dict[str, Any]) -> float:
    """The version's calibration temperature (`training.calibration`): 1.0 for a version
    published without one (v0, older versions), and clamped to the fitted range, so a
    hand-edited manifest cannot divide by zero."""
    t = (manifest.get("calibration") or {}).get("temperature")
    if not isinstance(t, int | float) or not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
        return 1.0
    return float(t)


def version_threshold(manifest: dict[str, Any]) -> float:
    """The version's confidence threshold chosen at publish; 0.0 (nothing is unknown) for a
    version without one."""
    t = (manifest.get("threshold") or {}).get("threshold")
    return float(t) if isinstance(t, int | float) and 0.0 <= t <= 1.0 else 0.0


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
        self._trial: dict[str, Any] | None = None
        self.trial_error: str | None = None
        self._random = random.Random()

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
        trial = self._trial
        return {"version": self.version, "reload_failures": self.reload_failures,
                "last_error": self.last_error, "failed_version": self._failed_version,
                "other_versions": others,
                "trial": {k: trial[k] for k in ("version", "mode", "share")} if trial else None,
                "trial_error": self.trial_error}

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
        """Serve the version CURRENT names, if it is not served already, and follow the trial
        (`sync_trial`). -> the served version.

        Safe to call from several threads; one load runs at a time, the others wait for it.
        """
        try:
            return self._sync_current(force)
        finally:
            self.sync_trial()

    def sync_trial(self) -> dict[str, Any] | None:
        """Follow `models/TRIAL` (`Registry.trial`): the version on trial is loaded and checked
        here (the reload poll or a broadcast, never a request) into the cache of other
        versions, and only then used; one that cannot be loaded is no trial for this replica
        (`trial_error` says why), so requests never wait for it or fail because of it. A trial
        of the served version itself (it was activated) is no trial. -> the trial followed."""
        trial = self.registry.trial()
        if trial is None or trial["version"] == self.version:
            self._trial, self.trial_error = None, None
            return None
        if self._trial == trial:
            return trial
        try:
            self.model_for(trial["version"])
        except DomainError as exc:
            self._trial, self.trial_error = None, f"{trial['version']}: {exc}"
            log.error("trial version %s cannot be loaded; not trying it: %s",
                      trial["version"], exc)
            return None
        self._trial, self.trial_error = trial, None
        log.info("trying %s in %s mode on %.0f%% of requests", trial["version"], trial["mode"],
                 float(trial["share"]) * 100)
        return trial

    def _sync_current(self, force: bool) -> str | None:
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
        `loaded`, else of the served model; `training.inference.draft_size`), as training's
        validation and the benchmark's in-process pipeline do."""
        loaded = loaded or self._loaded
        draft = draft_size(loaded.preset) if loaded else None
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
        # The benchmark's in-process fast path (training.inference): one float32 batch written
        # in place by the preprocessing, read by the engine without a copy.
        batch = preprocess_batch(images, loaded.preset)
        raw = logits(loaded.model, batch, self.device)
        probs = torch.softmax(raw / temperature(loaded.manifest), dim=1)
        threshold = version_threshold(loaded.manifest)
        k_max = min(max(ks), len(loaded.classes))
        scores, indices = probs.topk(k_max, dim=1)
        out = []
        for row_scores, row_idx, k in zip(scores.tolist(), indices.tolist(), ks, strict=True):
            pairs = [(loaded.classes[i], float(s)) for i, s in zip(row_idx, row_scores,
                                                                    strict=True)]
            out.append(Prediction(loaded.version, pairs[:max(1, min(k, k_max))],
                                  threshold=threshold))
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
        or an unknown version fails only its own requests.

        The trial (`sync_trial`) applies to requests that name no version, each drawn
        independently with probability `share`: in canary mode the drawn ones are answered by
        the trial version (their Prediction names it); in shadow mode they are answered by the
        served version as usual, and the trial version also classifies them, in one more
        forward pass of this batch, its answer attached as `Prediction.shadow` (kept for
        agreement and feedback accuracy, never returned to the caller). A canary whose model
        fails (removed meanwhile) is answered by the served version instead; a shadow that
        fails only loses its shadow answer."""
        trial = self._trial
        canary = shadowed = None
        routed = list(requests)
        drawn: list[int] = []
        if trial is not None:
            drawn = [i for i, (_, _, v) in enumerate(requests)
                     if v is None and self._random.random() < float(trial["share"])]
            if trial["mode"] == "canary":
                canary = trial["version"]
                for i in drawn:
                    routed[i] = (requests[i][0], requests[i][1], canary)
            else:
                shadowed = trial["version"]
        results = self._answer(routed)
        if canary is not None:
            failed = [i for i in drawn if not isinstance(results[i], Prediction)
                      and not isinstance(results[i], ImageError)]
            for i, answer in zip(failed, self._answer([requests[i] for i in failed]),
                                 strict=True):
                results[i] = answer
        if shadowed is not None:
            kept = [i for i in drawn if isinstance(results[i], Prediction)]
            try:
                shadows = self.predict_bytes([(requests[i][0], 1) for i in kept], shadowed)
            except DomainError as exc:
                log.warning("shadow %s failed: %s", shadowed, exc)
                shadows = []
            for i, shadow in zip(kept, shadows, strict=False):
                answer = results[i]
                if isinstance(shadow, Prediction) and isinstance(answer, Prediction):
                    results[i] = dataclasses.replace(answer, shadow=shadow)
        return results

    def _answer(self, requests: Sequence[Request]) -> list[Prediction | DomainError]:
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
