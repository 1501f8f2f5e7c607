"""Calibrated scores, the confidence threshold and the reference distributions for drift, all
fitted at publish on the held-out split's logits.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017): one scalar
T > 0 divides the logits before the softmax; T is the value that minimises the negative
log-likelihood of the held-out labels. T does not change the arg-max, so accuracy, the
confusion matrix and the promotion gate are unchanged; only the scores move. A model trained
with label smoothing, or fine-tuned on a small set, is usually over- or under-confident, and
T corrects the whole scale at once.

Why the test split, which also judges the gate: the workers' validation logits are not at hand
in `publish` (they stay on the Ray Train workers), and the validation split already chose the
best epoch. Fitting here is acceptable because (1) T cannot change any decision the gate takes
(the gate compares accuracies, and T keeps every arg-max), so no information leaks into
promotion; (2) one scalar fitted by likelihood has almost no capacity to overfit even on a few
dozen images. The one cost is that `ece_after` is measured on the split T was fitted on, so it
is optimistic; the record says so (`fitted_on: "test"`), and `ece_before` is unbiased. The same
holds for the threshold (`choose_threshold`): chosen and measured on the test split.

ECE: expected calibration error with `ECE_BINS` (15) equal-width bins of top-1 confidence over
[0, 1] (the binning of Guo et al.): sum over bins of |accuracy - mean confidence| weighted by
the bin's share of images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

ECE_BINS = 15
# Temperature search interval (T in [1/20, 20]): wider than any model seen needs, and bounded
# so that a degenerate split (every answer right) cannot drive T to 0.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
# The threshold rule's target: accepted answers (score >= threshold) on the held-out split are
# right at least this often.
TARGET_PRECISION = 0.9
# Confidence bins of the drift reference and of live traffic: ten equal-width bins over [0, 1].
CONFIDENCE_EDGES = tuple(round(i / 10, 1) for i in range(11))


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` ((N,) int64) under softmax(`logits` / T)
    ((N, C) float)."""
    return float(torch.nn.functional.cross_entropy(logits.double() / temperature,
                                                   labels.long()))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] minimising `nll`: a golden-section search
    on beta = 1/T, where the NLL is convex (log-sum-exp of a linear function of beta minus a
    linear term), so the bounded 1-D search finds the global minimum without a learning
    rate. 1.0 for an empty split."""
    if logits.shape[0] == 0:
        return 1.0
    z, y = logits.double(), labels.long()

    def loss(beta: float) -> float:
        return float(torch.nn.functional.cross_entropy(z * beta, y))

    lo, hi = 1 / MAX_TEMPERATURE, 1 / MIN_TEMPERATURE
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(100):
        if hi - lo < 1e-6:
            break
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return 1.0 / ((lo + hi) / 2)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor,
                               bins: int = ECE_BINS) -> float:
    """ECE of (N, C) probabilities against (N,) labels, `bins` equal-width confidence bins
    (a confidence of exactly 1.0 falls in the last). 0.0 for an empty split."""
    n = probs.shape[0]
    if n == 0:
        return 0.0
    conf, pred = probs.double().max(dim=1)
    correct = (pred == labels.long()).double()
    index = torch.clamp((conf * bins).long(), max=bins - 1)
    total = 0.0
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        if count:
            total += count / n * abs(float(correct[mask].mean()) - float(conf[mask].mean()))
    return total


def calibrate(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """The manifest's `calibration` record for held-out (N, C) logits and (N,) labels."""
    t = fit_temperature(logits, labels)
    before = torch.softmax(logits.double(), dim=1)
    after = torch.softmax(logits.double() / t, dim=1)
    return {"method": "temperature_scaling", "temperature": t, "fitted_on": "test",
            "count": int(logits.shape[0]), "ece_bins": ECE_BINS,
            "ece_before": expected_calibration_error(before, labels),
            "ece_after": expected_calibration_error(after, labels),
            "nll_before": nll(logits, labels) if len(labels) else None,
            "nll_after": nll(logits, labels, t) if len(labels) else None}


def choose_threshold(confidences: Sequence[float], correct: Sequence[bool],
                     target: float = TARGET_PRECISION) -> dict[str, Any]:
    """The manifest's `threshold` record: the smallest threshold t (among the held-out
    calibrated top-1 confidences, and 0) such that the answers scoring >= t are right at least
    `target` of the time. The smallest such t keeps the most answers; 0.0 when every answer
    together already reaches the target (nothing is `unknown`). When no t reaches it, the t
    with the highest precision (the smallest among equals), and `reached` is false."""
    pairs = sorted(zip(confidences, correct, strict=True), key=lambda p: -p[0])
    n = len(pairs)
    rule = (f"smallest threshold whose accepted held-out answers (calibrated score >= "
            f"threshold) reach precision {target}")
    if n == 0:
        return {"threshold": 0.0, "rule": rule, "target_precision": target, "reached": False,
                "accepted_share": None, "accepted_precision": None, "count": 0}
    # Accepting the top i+1 answers means threshold = their lowest confidence; equal
    # confidences are accepted together, so only the last of a run of ties is a candidate.
    best: tuple[float, float, int] | None = None  # (precision, threshold, accepted)
    chosen: tuple[float, float, int] | None = None
    right = 0
    for i, (conf, ok) in enumerate(pairs):
        right += bool(ok)
        if i + 1 < n and pairs[i + 1][0] == conf:
            continue
        precision = right / (i + 1)
        if best is None or precision >= best[0]:
            best = (precision, conf, i + 1)
        if precision + 1e-12 >= target:
            chosen = (precision, conf, i + 1)
    reached = chosen is not None
    precision, threshold, accepted = chosen if chosen is not None else best  # type: ignore[misc]
    if accepted == n:
        threshold = 0.0
    return {"threshold": float(threshold), "rule": rule, "target_precision": target,
            "reached": reached, "accepted_share": accepted / n,
            "accepted_precision": precision, "count": n}


def confidence_counts(confidences: Sequence[float]) -> list[int]:
    """How many confidences fall in each of the ten `CONFIDENCE_EDGES` bins (1.0 in the last)."""
    counts = [0] * (len(CONFIDENCE_EDGES) - 1)
    for c in confidences:
        counts[min(len(counts) - 1, max(0, int(float(c) * len(counts))))] += 1
    return counts


def reference(classes: Sequence[str], predicted: Sequence[int],
              confidences: Sequence[float]) -> dict[str, Any]:
    """The manifest's `reference` record: on the held-out split, the share of each predicted
    label and of each confidence bin (calibrated scores), what live traffic is compared with."""
    n = len(predicted)
    label_counts = [0] * len(classes)
    for p in predicted:
        label_counts[p] += 1
    return {"split": "test", "count": n,
            "label_shares": {c: (k / n if n else 0.0) for c, k in zip(classes, label_counts,
                                                                       strict=True)},
            "confidence_edges": list(CONFIDENCE_EDGES),
            "confidence_shares": [k / n if n else 0.0 for k in confidence_counts(confidences)]}


def psi(expected: Sequence[float], actual: Sequence[float], floor: float = 1e-4) -> float:
    """Population stability index of two distributions over the same bins (shares summing to
    1): sum (a - e) * ln(a / e), each share floored at `floor` so an empty bin counts as rare
    rather than infinite. 0 for equal distributions; it is the symmetrised Kullback-Leibler
    divergence, so it grows with the shift and does not grow with the sample size."""
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, floor), max(a, floor)
        total += (a - e) * math.log(a / e)
    return total


def drift(ref: dict[str, Any], labels: Sequence[str], scores: Sequence[float],
          threshold: float, min_count: int) -> dict[str, Any]:
    """Live answers of a version (its own best labels, `unknown` or not, and their calibrated
    scores, newest window) against its `reference` record -> the `drift` block.

    The test: the population stability index (`psi`) of the predicted-label shares, and of the
    ten confidence-bin shares; `score` is the larger of the two. PSI rather than a chi-square
    or KS p-value: a p-value on thousands of live answers flags differences too small to
    matter, and on a few dozen misses large ones; PSI measures the size of the shift, on the
    same scale whatever the counts, and has conventional readings (below 0.1 stable, 0.1-0.25
    a moderate shift, above 0.25 a major one), hence the default threshold of 0.25. A label the
    reference never predicted counts as a floored bin (a new label is a large shift, never an
    infinite one). `drifted` is None (not judged) below `min_count` live answers: PSI over a
    handful of answers is noise."""
    n = len(labels)
    classes = list((ref.get("label_shares") or {}).keys())
    live_labels = {c: 0 for c in classes}
    other = 0
    for label in labels:
        if label in live_labels:
            live_labels[label] += 1
        else:
            other += 1
    expected_labels = [float(ref["label_shares"][c]) for c in classes] + [0.0]
    actual_labels = [(live_labels[c] / n if n else 0.0) for c in classes] + [
        other / n if n else 0.0]
    expected_conf = [float(x) for x in ref.get("confidence_shares") or []]
    actual_conf = [k / n if n else 0.0 for k in confidence_counts(scores)]
    judged = n >= min_count and bool(classes) and len(expected_conf) == len(actual_conf)
    label_psi = psi(expected_labels, actual_labels) if judged else None
    confidence_psi = psi(expected_conf, actual_conf) if judged else None
    score = max(label_psi or 0.0, confidence_psi or 0.0) if judged else None
    return {"test": "population stability index (labels; confidence in ten bins)",
            "count": n, "min_count": min_count, "threshold": threshold,
            "label_psi": label_psi, "confidence_psi": confidence_psi, "score": score,
            "drifted": (score > threshold) if score is not None else None,
            "reference_count": ref.get("count"),
            "live": {"label_shares": {c: (k / n if n else 0.0)
                                      for c, k in live_labels.items()},
                     "other_share": other / n if n else 0.0,
                     "confidence_shares": actual_conf}}
