"""`method="camelyon16"` is bit-identical to the challenge's own FROC script.

The reference below is `compute_FP_TP_Probs` and `computeFROC` from `Python/Evaluation_FROC.py`
of github.com/computationalpathologygroup/Camelyon16 (commit 04faac5, "Evaluation code for the
CAMELYON16 challenge"), ported to Python 3 with mechanical changes only: Python 2's integer
`/` on the int coordinates is `//`, the dictionaries of detection details are dropped (they
feed nothing), layout is reformatted; and `sorted(..., key=float)`: the pool mixes Python
floats (false positives) and np.float32 (hits), which numpy 1.x (what the challenge and NCRF
ran) compares exactly, in float64, and numpy >= 2 in float32 (NEP 50), so that there the
order of near-equal values follows the set's iteration order; `key=float` restores numpy 1.x's
order on any numpy. That script computes the curve and only plots it; the
score is the one NCRF's copy of the script (github.com/baidu-research/NCRF,
`camelyon16/bin/Evaluation_FROC.py`) prints, `official_score` below. Both sides get the same
evaluation masks and detections; every curve value and the score must be equal (`==`).
"""

from __future__ import annotations

import numpy as np
import pytest

from etl.evaluate.froc import (
    DEFAULT_METHOD,
    FP_RATES,
    LesionMask,
    froc_curve,
    froc_score,
    score_slide,
)

LEVEL = 5
DS = 2**LEVEL


# --------------------------------------------------------------------------- the reference


def compute_FP_TP_Probs(
    Ycorr, Xcorr, Probs, is_tumor, evaluation_mask, Isolated_Tumor_Cells, level
):
    max_label = np.amax(evaluation_mask)
    FP_probs = []
    TP_probs = np.zeros((max_label,), dtype=np.float32)
    if is_tumor:
        for i in range(0, len(Xcorr)):
            HittedLabel = evaluation_mask[Ycorr[i] // pow(2, level), Xcorr[i] // pow(2, level)]
            if HittedLabel == 0:
                FP_probs.append(Probs[i])
            elif HittedLabel not in Isolated_Tumor_Cells:  # noqa: SIM102 (as the original)
                if Probs[i] > TP_probs[HittedLabel - 1]:
                    TP_probs[HittedLabel - 1] = Probs[i]
    else:
        for i in range(0, len(Xcorr)):
            FP_probs.append(Probs[i])
    num_of_tumors = max_label - len(Isolated_Tumor_Cells)
    return FP_probs, TP_probs, num_of_tumors


def computeFROC(FROC_data):
    unlisted_FPs = [item for sublist in FROC_data[1] for item in sublist]
    unlisted_TPs = [item for sublist in FROC_data[2] for item in sublist]

    total_FPs, total_TPs = [], []
    all_probs = sorted(set(unlisted_FPs + unlisted_TPs), key=float)  # see the docstring
    for Thresh in all_probs[1:]:
        total_FPs.append((np.asarray(unlisted_FPs) >= Thresh).sum())
        total_TPs.append((np.asarray(unlisted_TPs) >= Thresh).sum())
    total_FPs.append(0)
    total_TPs.append(0)
    total_FPs = np.asarray(total_FPs) / float(len(FROC_data[0]))
    total_sensitivity = np.asarray(total_TPs) / float(sum(FROC_data[3]))
    return total_FPs, total_sensitivity


def official_score(total_FPs, total_sensitivity):
    eval_threshold = [0.25, 0.5, 1, 2, 4, 8]
    eval_TPs = np.interp(eval_threshold, total_FPs[::-1], total_sensitivity[::-1])
    return np.mean(eval_TPs)


# --------------------------------------------------------------------------- both sides


Slide = tuple[np.ndarray | None, list[int], list[tuple[float, int, int]]]  # mask, ITCs, dets


def official(slides: list[Slide]) -> tuple[np.ndarray, np.ndarray, float]:
    data: list[list[object]] = [[], [], [], []]
    for k, (mask, itc, dets) in enumerate(slides):
        probs, xs, ys = [d[0] for d in dets], [d[1] for d in dets], [d[2] for d in dets]
        is_tumor = mask is not None
        fp, tp, n = compute_FP_TP_Probs(
            ys, xs, probs, is_tumor, mask if is_tumor else 0, itc, LEVEL
        )
        for row, value in zip(data, (f"slide_{k}.csv", fp, tp, n), strict=True):
            row.append(value)
    fps, sens = computeFROC(data)
    return fps, sens, official_score(fps, sens)


def ours(slides: list[Slide], method: str = DEFAULT_METHOD) -> tuple[np.ndarray, np.ndarray, float]:
    fp, tp, itcs = [], [], 0
    for k, (mask, itc, dets) in enumerate(slides):
        lesions = None
        if mask is not None:
            n = int(mask.max())
            flags = np.isin(np.arange(1, n + 1), itc)
            lesions = LesionMask(mask.astype(np.int32), np.zeros(n), flags, DS, 1.0)
        s = score_slide(f"slide_{k}", np.array(dets, np.float64).reshape(-1, 3), lesions)
        fp.append(s.fp_probs)
        tp.append(s.tp_probs)
        itcs += s.itc
    n_lesions = sum(map(len, tp))
    fps, sens, _ = froc_curve(
        np.concatenate(fp), np.concatenate(tp), n_lesions, len(slides), method, itc=itcs
    )
    score, _ = froc_score(fps, sens, FP_RATES, method)
    return fps, sens, score


def assert_identical(slides: list[Slide]) -> float:
    ref_fps, ref_sens, ref_score = official(slides)
    fps, sens, score = ours(slides)
    assert fps.dtype == ref_fps.dtype and sens.dtype == ref_sens.dtype
    assert fps.tolist() == ref_fps.tolist()
    assert sens.tolist() == ref_sens.tolist()
    assert score == ref_score
    return score


def lesion_mask(shape: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Labels 1..n, lesion k the level-5 box (row0, col0, row1, col1) of boxes[k - 1]."""
    mask = np.zeros(shape, np.int64)
    for k, (r0, c0, r1, c1) in enumerate(boxes, start=1):
        mask[r0:r1, c0:c1] = k
    return mask


def inside(box: tuple[int, int, int, int]) -> tuple[int, int]:
    """A level-0 (x, y) inside a level-5 box."""
    r0, c0, _, _ = box
    return c0 * DS + 5, r0 * DS + 5


# --------------------------------------------------------------------------- crafted cases


def test_three_hits_tied_with_twenty_false_positives_score_as_the_official_script():
    # 8 slides, 5 lesions on the first: 3 hit at 0.3, 2 missed; 20 FPs at 0.3 on normal slides.
    boxes = [(2, 2 + 6 * k, 5, 5 + 6 * k) for k in range(5)]
    tumor: Slide = (lesion_mask((16, 32), boxes), [], [(0.3, *inside(b)) for b in boxes[:3]])
    normals: list[Slide] = [(None, [], [(0.3, 100 * i, 100)] * 3) for i in range(1, 8)]
    normals[-1] = (None, [], [(0.3, 700, 100)] * 2)  # 6 x 3 + 2 = 20 false positives
    slides = [tumor, *normals]
    score = assert_identical(slides)
    # The hits are float32(0.3) > 0.3: at that threshold no FP is left and sensitivity is 3/5.
    assert score == pytest.approx(0.60)
    assert ours(slides, "interp")[2] == pytest.approx(0.35)  # 20 FPs / 8 slides share 0.3


def test_the_lowest_pooled_probability_is_never_a_threshold():
    # One slide, two lesions hit at 0.9 and 0.2, one FP at 0.5: the hit at 0.2 is the lowest
    # pooled value, dropped (all_probs[1:]), so that lesion never counts.
    boxes = [(1, 1, 4, 4), (8, 8, 12, 12)]
    dets = [(0.9, *inside(boxes[0])), (0.2, *inside(boxes[1])), (0.5, 900, 50)]
    slides: list[Slide] = [(lesion_mask((16, 32), boxes), [], dets)]
    fps, sens, score = ours(slides)
    assert fps.tolist() == [1.0, 0.0, 0.0] and sens.tolist() == [0.5, 0.5, 0.0]
    assert score == 0.5 == assert_identical(slides)
    assert ours(slides, "interp")[2] == pytest.approx(5 / 6)  # keeps 0.2: sensitivity 1 at 1 FP
    # The lowest is a false positive: its FP never counts.
    dets = [(0.9, *inside(boxes[0])), (0.6, *inside(boxes[1])), (0.1, 900, 50)]
    fps, _, _ = ours([(lesion_mask((16, 32), boxes), [], dets)])
    assert fps.max() == 0.0
    assert_identical([(lesion_mask((16, 32), boxes), [], dets)])


@pytest.mark.parametrize(
    "case",
    ["one value", "no detection", "rounding", "itc and repeats", "normal slides only hit"],
)
def test_crafted_edge_cases_are_identical(case):
    boxes = [(1, 1, 4, 4), (8, 8, 12, 12), (1, 20, 3, 22)]
    mask = lesion_mask((16, 32), boxes)
    h = float(np.float32(0.3))  # the float32 a 0.3 hit becomes
    if case == "one value":  # 0.5 is exact in float32: one pooled value, only (0, 0) is left
        slides: list[Slide] = [(mask, [], [(0.5, *inside(b)) for b in boxes] + [(0.5, 900, 9)])]
        assert ours(slides)[2] == 0.0
    elif case == "no detection":
        slides = [(mask, [3], []), (None, [], [(0.4, 5, 5)])]
    elif case == "rounding":  # FPs just below and just above the float32 of the hit
        below, above = np.nextafter(h, 0.0), np.nextafter(h, 1.0)
        fp = [(0.3, 900, 9), (float(below), 900, 9), (float(above), 900, 9), (h, 900, 9)]
        slides = [(mask, [], [(0.3, *inside(boxes[0])), (0.30000001, *inside(boxes[1])), *fp])]
    elif case == "itc and repeats":  # several hits per lesion, one in an ITC (ignored)
        dets = [(p, *inside(b)) for p in (0.2, 0.8, 0.5) for b in boxes]
        slides = [(mask, [2], dets), (mask, [1, 3], dets[::-1])]
    else:  # detections only on normal slides, the tumor slide's lesions all missed
        slides = [(mask, [], []), (None, [], [(0.9, 1, 1), (0.1, 2, 2)])]
    assert_identical(slides)


# --------------------------------------------------------------------------- randomised


def random_slide(rng: np.random.Generator, share: float) -> Slide:
    """A normal or tumor slide; ``share``: the chance that a lesion has a detection."""
    h, w = 24, 40
    values = np.array([0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0, 0.30000001, 0.7000000476837158])
    n = int(rng.integers(0, 10))
    probs = np.where(rng.random(n) < 0.6, rng.choice(values, n), rng.random(n).round(3))
    xs, ys = rng.integers(0, w * DS, n), rng.integers(0, h * DS, n)
    dets = [(float(p), int(x), int(y)) for p, x, y in zip(probs, xs, ys, strict=True)]
    if rng.random() < 0.35:
        return None, [], dets
    boxes = []
    for _ in range(int(rng.integers(1, 5))):
        r, c = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        boxes.append((r, c, r + int(rng.integers(1, 5)), c + int(rng.integers(1, 5))))
    mask = lesion_mask((h, w), boxes)
    present = sorted(set(np.unique(mask).tolist()) - {0})
    mask = np.searchsorted(present, mask) * (mask > 0) + (mask > 0)  # labels 1..n, no gaps
    itc = [k for k in range(1, len(present) + 1) if rng.random() < 1.0 - share]
    # most lesions get one or two detections, so that every lesion is often hit (no 0 pooled)
    # and hits often tie with false positives
    for k in range(1, len(present) + 1):
        rows, cols = np.nonzero(mask == k)
        for _ in range(int(rng.random() < share) + int(rng.random() < 0.3)):
            j = int(rng.integers(0, len(rows)))
            p = float(rng.choice(values)) if rng.random() < 0.7 else round(float(rng.random()), 3)
            dets.append((p, int(cols[j]) * DS + int(rng.integers(0, DS)), int(rows[j]) * DS + 3))
    return mask, itc, dets


def test_random_candidate_sets_are_identical_to_the_official_script():
    rng = np.random.default_rng(20160120)
    differ = 0
    for _ in range(80):
        share = 1.0 if rng.random() < 0.5 else 0.8  # half the sets: all lesions found, no ITC
        slides = [random_slide(rng, share) for _ in range(int(rng.integers(1, 7)))]
        lesions = sum(int(m.max()) - len(itc) for m, itc, _ in slides if m is not None)
        if lesions == 0:
            continue  # the official script divides by zero lesions
        score = assert_identical(slides)
        differ += score != ours(slides, "interp")[2]
    assert differ >= 10  # the sets do exercise what sets the methods apart


def test_the_official_method_is_the_default_of_the_command_and_the_functions():
    from etl.config import EvaluateOptions

    assert EvaluateOptions().froc_method == DEFAULT_METHOD == "camelyon16"
