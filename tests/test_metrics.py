"""Metrics on hand-made masks with known answers."""

import numpy as np
import pytest

from engine.metrics import (
    SetMetrics,
    best_threshold,
    dice_score,
    iou_score,
    threshold_sweep,
)


def square(size: int, y: int, x: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[y : y + side, x : x + side] = 1
    return mask


def test_dice_iou_overlap() -> None:
    a, b = square(10, 0, 0, 4), square(10, 2, 0, 4)  # 16 px each, 8 px overlap
    assert dice_score(a, b) == pytest.approx(2 * 8 / 32)
    assert iou_score(a, b) == pytest.approx(8 / 24)


def test_empty_cases() -> None:
    empty, full = np.zeros((5, 5)), np.ones((5, 5))
    assert dice_score(empty, empty) == 1.0
    assert iou_score(empty, empty) == 1.0
    assert dice_score(empty, full) == 0.0
    assert iou_score(full, empty) == 0.0


def test_set_metrics_pixel_totals_and_rates() -> None:
    metrics = SetMetrics()
    metrics.add(square(10, 0, 0, 4), square(10, 0, 0, 4), flagged=True)  # perfect, defective, flagged
    metrics.add(np.zeros((10, 10)), square(10, 5, 5, 2), flagged=False)  # missed defect: 4 fn
    metrics.add(square(10, 0, 0, 1), np.zeros((10, 10)), flagged=True)  # false alarm: 1 fp
    metrics.add(np.zeros((10, 10)), np.zeros((10, 10)), flagged=False)  # clean, correct
    result = metrics.result()
    assert (metrics.tp, metrics.fp, metrics.fn) == (16, 1, 4)
    assert result["dice"] == pytest.approx(32 / 37)
    assert result["iou"] == pytest.approx(16 / 21)
    assert result["precision"] == pytest.approx(16 / 17)
    assert result["recall"] == pytest.approx(16 / 20)
    assert result["detection_rate"] == 0.5
    assert result["false_alarm_rate"] == 0.5
    assert result["mean_image_dice"] == pytest.approx((1 + 0 + 0 + 1) / 4)
    assert result["n_images"] == 4


def test_threshold_sweep_matches_direct_computation_and_picks_best() -> None:
    rng = np.random.default_rng(0)
    truths = [square(32, 8, 8, 10), np.zeros((32, 32), np.uint8)]
    probs = [np.clip(t * 0.7 + rng.uniform(0, 0.4, t.shape), 0, 1).astype(np.float32) for t in truths]
    rows = threshold_sweep(probs, truths, np.array([0.2, 0.5, 0.75]))
    for row in rows:
        metrics = SetMetrics()
        for p, t in zip(probs, truths):
            metrics.add(p >= row["threshold"], t, flagged=bool((p >= row["threshold"]).any()))
        assert row["dice"] == pytest.approx(metrics.result()["dice"], abs=2e-3)
        assert row["iou"] == pytest.approx(metrics.result()["iou"], abs=2e-3)
    # Background scores are < 0.4 and defect scores >= 0.7: 0.5 and 0.75 separate, 0.2 does not.
    assert rows[0]["dice"] < 0.5 < rows[1]["dice"]
    assert best_threshold(rows) == 0.5


def test_image_level_ap_and_auroc_on_hand_made_scores() -> None:
    from engine.metrics import auroc, average_precision

    # ranking: pos, neg, pos, neg -> precision 1 at recall 0.5, 2/3 at recall 1
    assert average_precision([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert auroc([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx(3 / 4)  # 3 of 4 pos-neg pairs in order
    assert average_precision([3, 2, 1], [1, 1, 0]) == 1.0 and auroc([3, 2, 1], [1, 1, 0]) == 1.0
    # a tie between a positive and a negative counts half for AUROC and enters AP as one step
    assert auroc([0.5, 0.5], [1, 0]) == 0.5 and average_precision([0.5, 0.5], [1, 0]) == 0.5
    # AP weighs the top of the ranking, AUROC all pairs alike
    scores, labels = [1, 0.9, 0.8, 0.7, 0.6], [0, 1, 1, 1, 1]
    assert auroc(scores, labels) == 0.0 and average_precision(scores, labels) == pytest.approx(
        (1 / 2 + 2 / 3 + 3 / 4 + 4 / 5) / 4)
    assert average_precision([0.2, 0.1], [0, 0]) is None and auroc([0.2, 0.1], [1, 1]) is None
    assert average_precision([0.2, 0.1], [1, 1]) is None  # nothing to rank against


def test_image_score_ranks_by_largest_region_then_peak() -> None:
    from engine.metrics import image_score

    speck, blob, faint = (np.zeros((40, 40), np.float32) for _ in range(3))
    speck[5, 5] = 0.99  # one bright pixel
    blob[10:16, 10:16] = 0.7  # a 36 px region
    faint[:] = 0.3  # no region at 0.5
    assert image_score(blob) > image_score(speck) > image_score(faint)
    assert image_score(blob) == pytest.approx(36.7, abs=1e-5) and image_score(faint) == pytest.approx(0.3)
