"""Training / validation (/ testing) splits by slide, stratified, a patient's slides together.

Slides are grouped by patient (each slide its own patient without a patients CSV); a group is
a tumor group when any of its slides has tumor. Within the tumor groups and within the
tumor-free groups apart, a seeded shuffle deals ``round(share * n)`` groups to testing and to
validation (at least one each when the share is > 0 and the stratum has a group to spare),
and the rest to training, which always keeps at least one. So no slide is in two splits and
each split holds tumor and tumor-free slides whenever the cohort has enough of them; where it
does not, a warning says so.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["SPLITS", "assign_splits"]

SPLITS = ("training", "validation", "testing")


def _counts(n: int, val: float, test: float) -> tuple[int, int]:
    """(validation, testing) group counts of a stratum of ``n`` groups."""
    n_val, n_test = math.floor(val * n + 0.5), math.floor(test * n + 0.5)
    if val > 0 and n_val == 0 and n >= 2:
        n_val = 1
    if test > 0 and n_test == 0 and n - n_val >= 2:
        n_test = 1
    while n_val + n_test > max(n - 1, 0):
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def assign_splits(
    has_tumor: dict[str, bool],
    patients: dict[str, str] | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[dict[str, str], list[str]]:
    """(slide name -> split, warnings) for the slides of ``has_tumor``."""
    groups: dict[str, list[str]] = {}
    for name in sorted(has_tumor):
        groups.setdefault(patients[name] if patients else name, []).append(name)
    rng = np.random.default_rng([seed, 2])
    split_of: dict[str, str] = {}
    for tumor in (True, False):
        keys = sorted(g for g, names in groups.items() if any(has_tumor[n] for n in names) == tumor)
        keys = [keys[i] for i in rng.permutation(len(keys))]
        n_val, n_test = _counts(len(keys), val_fraction, test_fraction)
        for k, key in enumerate(keys):
            split = "testing" if k < n_test else "validation" if k < n_test + n_val else "training"
            for name in groups[key]:
                split_of[name] = split
    warnings = []
    wanted = ["training"] + (["validation"] if val_fraction > 0 else [])
    wanted += ["testing"] if test_fraction > 0 else []
    for split in wanted:
        members = [n for n, s in split_of.items() if s == split]
        for tumor, kind in ((True, "tumor"), (False, "tumor-free")):
            if not any(has_tumor[n] == tumor for n in members):
                total = sum(has_tumor[n] == tumor for n in has_tumor)
                warnings.append(
                    f"split {split} has no {kind} slide ({total} {kind} slide(s)"
                    f"{' or patients' if patients else ''} in the cohort)"
                )
    return split_of, warnings
