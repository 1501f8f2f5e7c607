"""Temperature scaling, ECE, the threshold rule and PSI (`training.calibration`) on made sets,
and the held-out records a publish writes (`training.pipeline.answer_quality`) from a real
network's logits on real images."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.support.images import noisy_picture
from tests.support.service import BACKBONE
from training.calibration import (
    CONFIDENCE_EDGES,
    ECE_BINS,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    calibrate,
    choose_threshold,
    confidence_counts,
    expected_calibration_error,
    fit_temperature,
    psi,
    reference,
)
from training.dataset import Item
from training.model import build_model
from training.pipeline import answer_quality, held_out_logits
from training.presets import EvalPreset


def made_set(n: int, classes: int, accuracy: float, scale: float, seed: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) logits whose arg-max is right `accuracy` of the time, the winning logit `scale`
    above the rest: a large scale with a modest accuracy is an overconfident model."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    right = torch.rand(n, generator=g) < accuracy
    wrong = (labels + torch.randint(1, classes, (n,), generator=g)) % classes
    predicted = torch.where(right, labels, wrong)
    logits = torch.randn(n, classes, generator=g) * 0.3
    logits[torch.arange(n), predicted] += scale
    return logits, labels


def test_calibration_lowers_ece_of_an_overconfident_model() -> None:
    logits, labels = made_set(2000, 5, accuracy=0.7, scale=8.0, seed=0)
    record = calibrate(logits, labels)
    print(f"\noverconfident made set (2000 images, 5 classes, 70% right): T="
          f"{record['temperature']:.3f}, ECE({ECE_BINS} bins) {record['ece_before']:.4f} -> "
          f"{record['ece_after']:.4f}, NLL {record['nll_before']:.4f} -> "
          f"{record['nll_after']:.4f}")
    assert record["temperature"] > 2.0  # softened
    assert record["ece_before"] > 0.25 and record["ece_after"] < 0.05
    assert record["nll_after"] < record["nll_before"]
    assert record["fitted_on"] == "test" and record["count"] == 2000
    # the arg-max (hence accuracy and the gate) does not move
    assert torch.equal((logits / record["temperature"]).argmax(1), logits.argmax(1))


def test_underconfident_model_is_sharpened() -> None:
    logits, labels = made_set(2000, 5, accuracy=0.95, scale=0.8, seed=1)
    record = calibrate(logits, labels)
    print(f"\nunderconfident made set (95% right): T={record['temperature']:.3f}, ECE "
          f"{record['ece_before']:.4f} -> {record['ece_after']:.4f}")
    assert record["temperature"] < 1.0
    assert record["ece_after"] < record["ece_before"] / 2


def test_temperature_is_the_nll_minimum_and_bounded() -> None:
    logits, labels = made_set(500, 4, accuracy=0.8, scale=5.0, seed=2)
    t = fit_temperature(logits, labels)

    def nll(temp: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits.double() / temp, labels))

    assert nll(t) <= min(nll(t * 0.97), nll(t * 1.03))
    # every answer right with a margin: the NLL falls as T shrinks until it is 0 in double
    # precision; the search stays in bounds
    perfect = torch.eye(3).repeat(10, 1) * 5
    assert MIN_TEMPERATURE <= fit_temperature(perfect, torch.arange(3).repeat(10)) < 0.2
    # every answer wrong: softer and softer; bounded above
    assert fit_temperature(perfect, (torch.arange(3).repeat(10) + 1) % 3) == pytest.approx(
        MAX_TEMPERATURE, rel=1e-3)
    assert fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 1.0


def test_ece_by_hand() -> None:
    # two images at confidence 0.9 (one right), one at 0.6 (right): bins 13 and 9 of 15
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1])
    expected = 2 / 3 * abs(0.5 - 0.9) + 1 / 3 * abs(1.0 - 0.6)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    assert expected_calibration_error(torch.tensor([[1.0, 0.0]]), torch.tensor([0])) == 0.0
    assert expected_calibration_error(torch.zeros(0, 2), torch.zeros(0)) == 0.0


def test_threshold_is_the_smallest_reaching_the_target() -> None:
    conf = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4]
    ok = [True, True, True, True, False, True, False, False]
    record = choose_threshold(conf, ok, target=0.8)
    # top 6 are 5/6 = 0.833 right; top 7 are 5/7 = 0.714: the threshold is 0.6
    assert record["threshold"] == 0.6 and record["reached"]
    assert record["accepted_share"] == 6 / 8
    assert record["accepted_precision"] == pytest.approx(5 / 6)
    assert "precision 0.8" in record["rule"]
    # all answers together reach it: nothing is unknown
    assert choose_threshold(conf, [True] * 8, target=0.9)["threshold"] == 0.0
    # ties are accepted together: 0.9 twice, one right, one wrong
    tied = choose_threshold([0.9, 0.9, 0.5], [True, False, True], target=0.6)
    assert tied["threshold"] == 0.0 and tied["accepted_precision"] == pytest.approx(2 / 3)
    # unreachable: the most precise threshold, said so
    none = choose_threshold([0.9, 0.8, 0.7], [False, True, False], target=0.9)
    assert not none["reached"] and none["threshold"] == 0.8
    assert none["accepted_precision"] == 0.5
    assert choose_threshold([], [], 0.9)["count"] == 0


def test_psi_and_reference() -> None:
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    shifted = psi([0.5, 0.5], [0.9, 0.1])
    assert shifted == pytest.approx(0.4 * math.log(0.9 / 0.5) + (-0.4) * math.log(0.1 / 0.5))
    assert psi([0.5, 0.5, 0.0], [0.5, 0.4, 0.1]) > shifted / 10  # an empty bin is finite
    assert confidence_counts([0.0, 0.05, 0.95, 1.0, 0.5]) == [2, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    ref = reference(["a", "b"], [0, 0, 1, 0], [0.95, 0.85, 0.55, 1.0])
    assert ref["label_shares"] == {"a": 0.75, "b": 0.25}
    assert ref["confidence_edges"] == list(CONFIDENCE_EDGES)
    assert sum(ref["confidence_shares"]) == pytest.approx(1.0)


def test_answer_quality_on_a_real_network(tmp_path: Path) -> None:
    """Real images of two colours, a real (random-head) network: the logits have the split's
    shape, and the records are consistent with them."""
    items = []
    for k, (label, colour) in enumerate([("red", (220, 20, 20)), ("blue", (20, 20, 220))]):
        for seed in range(6):
            path = tmp_path / f"{label}{seed}.png"
            noisy_picture(colour, seed + 10 * k).save(path)
            items.append(Item(sha256=f"{k}{seed}".ljust(64, "0"), label=label, path=path))
    torch.manual_seed(0)
    model = build_model(BACKBONE, num_classes=2, pretrained=False).eval()
    classes = ["blue", "red"]
    logits, labels = held_out_logits(model, EvalPreset.for_size(64), items,
                                     {c: i for i, c in enumerate(classes)})
    assert logits.shape == (12, 2) and labels.tolist() == [1] * 6 + [0] * 6
    quality = answer_quality(classes, logits, labels)
    cal, thr, ref = quality["calibration"], quality["threshold"], quality["reference"]
    assert MIN_TEMPERATURE <= cal["temperature"] <= MAX_TEMPERATURE and cal["count"] == 12
    assert cal["nll_after"] <= cal["nll_before"] + 1e-9
    assert 0.0 <= thr["threshold"] <= 1.0 and thr["count"] == 12
    assert set(ref["label_shares"]) == set(classes) and ref["count"] == 12
