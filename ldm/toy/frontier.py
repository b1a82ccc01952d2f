"""Fidelity-editability frontiers of personalization methods, and their confidence intervals.

A run of a method is scored at several (training steps, inference strength) settings; each setting
gives a point (fidelity, editability). A method's points are the means over its runs (subjects x
seeds). Its **frontier** is the Pareto set of those points: the ones no other point matches or beats
on both figures (up and to the right in a fidelity-vs-editability plot). From it:

- ``best_editability(points, f)``: the best editability among points with fidelity >= f, i.e. what
  the method offers a user who needs at least that likeness (None where no point reaches f);
- ``frontier_area(points)``: the integral over f in [0, 1] of ``best_editability(points, f)`` (0
  where no point reaches f): the area under the frontier's staircase, which equals the area of the
  (fidelity, editability) region the points dominate, with (0, 0) as the reference corner.

Intervals are 95% percentile-bootstrap intervals over runs: runs are drawn with replacement, the
mean points and every figure derived from them are recomputed, and the 2.5th and 97.5th percentiles
of each figure are the interval. With a single run there is nothing to resample and no interval.

X's frontier is **above** Y's when, at every fidelity level f in (0, F_Y] that Y reaches (F_Y: Y's most
faithful mean point), X's best editability at f exceeds Y's (0 where a method has no point reaching f):
``frontier_margin(x, y)``, the smallest such excess, is positive. Both are staircases that step only at
their frontier points' fidelities, so the minimum is taken at those fidelities.

Two methods run on the same subjects and seeds (run i of one and run i of the other share subject,
seed and sampling noise) are compared **paired** (:func:`paired_difference`): the same runs are drawn
for both, and the interval is that of the difference of their figures. What the subject does to both
cancels, so a paired interval is narrower than the two separate ones side by side.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

Point = tuple[float, float]  # (fidelity, editability)
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def pareto_frontier(points: Sequence[Point]) -> list[int]:
    """Indices of the points no other point dominates, by increasing fidelity (ties: the first kept).

    A point dominates another when it is at least as good on both figures and better on one; of
    identical points only the first is on the frontier.
    """
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1], i))
    frontier, best = [], -np.inf
    for i in order:  # by decreasing fidelity: a point is kept when it beats every more faithful one
        if points[i][1] > best:
            frontier.append(i)
            best = points[i][1]
    return frontier[::-1]


def best_editability(points: Sequence[Point], min_fidelity: float) -> float | None:
    """The highest editability among points with fidelity >= ``min_fidelity`` (None if there is none)."""
    eligible = [e for f, e in points if f >= min_fidelity]
    return max(eligible) if eligible else None


def frontier_area(points: Sequence[Point]) -> float:
    """Area under the frontier's staircase over fidelity in [0, 1] (see the module docstring)."""
    area, previous = 0.0, 0.0
    for i in pareto_frontier(points):  # increasing fidelity, decreasing editability
        fidelity, editability = points[i]
        fidelity = min(max(fidelity, 0.0), 1.0)
        area += (fidelity - previous) * editability
        previous = fidelity
    return area


def frontier_margin(points_x: Sequence[Point], points_y: Sequence[Point]) -> float | None:
    """The smallest excess of x's best editability over y's across the fidelities y reaches (see the module
    docstring): positive when x's frontier is above y's everywhere; None when y reaches no fidelity above 0."""
    reach = max((f for f, _ in points_y), default=0.0)
    levels = {points[i][0] for points in (points_x, points_y) for i in pareto_frontier(points)}
    levels = sorted(f for f in levels if 0 < f <= reach)
    if not levels:
        return None
    return min((best_editability(points_x, f) or 0.0) - (best_editability(points_y, f) or 0.0) for f in levels)


def frontier_figures(points: Sequence[Point], thresholds: Sequence[float]) -> dict[str, float | None]:
    """The summary of one set of mean points: best editability at each fidelity threshold, and the area."""
    figures = {f"best_editability_at_{t:g}": best_editability(points, t) for t in thresholds}
    return {**figures, "area": frontier_area(points)}


def mean_points(runs: np.ndarray) -> list[Point]:
    """Mean (fidelity, editability) per setting of runs [R, S, 2] (R runs, S settings)."""
    return [tuple(float(x) for x in row) for row in runs.mean(axis=0)]


Runs = np.ndarray | tuple[np.ndarray, ...]  # [R, ...], or several such arrays whose run i belongs together


def bootstrap_intervals(runs: Runs, statistic: Callable[[Runs], dict[str, float | None]], *,
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
                        ) -> dict[str, tuple[float, float] | None]:
    """95% percentile-bootstrap interval of each figure ``statistic`` computes from runs [R, ...] (or from a
    tuple of such arrays, resampled together: the same runs are drawn from each).

    A figure is None in some resamples (e.g. no point reaches a fidelity threshold); its interval is
    then taken over the resamples where it exists when they are at least 95% of them, else None. Fewer
    than two runs give no intervals (all None).
    """
    names = list(statistic(runs))
    arrays = runs if isinstance(runs, tuple) else (runs,)
    count = arrays[0].shape[0]
    if any(a.shape[0] != count for a in arrays):
        raise ValueError(f"paired runs differ in number: {[a.shape[0] for a in arrays]}")
    if count < 2:
        return {name: None for name in names}
    rng = np.random.default_rng(seed)
    draws = {name: [] for name in names}
    for _ in range(resamples):
        drawn = rng.integers(0, count, count)
        sample = tuple(a[drawn] for a in arrays) if isinstance(runs, tuple) else runs[drawn]
        for name, value in statistic(sample).items():
            draws[name].append(value)
    tail = 100 * (1 - CONFIDENCE) / 2
    intervals = {}
    for name, values in draws.items():
        present = [v for v in values if v is not None]
        if len(present) < CONFIDENCE * resamples:
            intervals[name] = None
            continue
        low, high = np.percentile(present, [tail, 100 - tail])
        intervals[name] = (float(low), float(high))
    return intervals


def point_statistic(runs: np.ndarray) -> dict[str, float]:
    """Mean fidelity and editability of each setting of runs [R, S, 2], as ``f<i>`` and ``e<i>``."""
    means = runs.mean(axis=0)
    fidelity = {f"f{i}": float(m[0]) for i, m in enumerate(means)}
    return {**fidelity, **{f"e{i}": float(m[1]) for i, m in enumerate(means)}}


def summarize_frontier(runs: np.ndarray, thresholds: Sequence[float]) -> dict:
    """Mean points, their intervals, the frontier (indices) and its figures with intervals, of runs [R, S, 2]."""
    points = mean_points(runs)
    point_ci = bootstrap_intervals(runs, point_statistic)
    figures = frontier_figures(points, thresholds)
    figure_ci = bootstrap_intervals(runs, lambda sample: frontier_figures(mean_points(sample), thresholds))
    return {
        "points": points,
        "point_intervals": [(point_ci[f"f{i}"], point_ci[f"e{i}"]) for i in range(len(points))],
        "frontier": pareto_frontier(points),
        "figures": figures,
        "figure_intervals": figure_ci,
    }


def difference_figures(runs_x: np.ndarray, runs_y: np.ndarray, thresholds: Sequence[float]) -> dict[str, float | None]:
    """Each frontier figure of runs_x's mean points minus runs_y's (None where either figure is None), and the
    margin by which x's frontier is above y's (:func:`frontier_margin`)."""
    points_x, points_y = mean_points(runs_x), mean_points(runs_y)
    x, y = frontier_figures(points_x, thresholds), frontier_figures(points_y, thresholds)
    differences = {name: None if x[name] is None or y[name] is None else x[name] - y[name] for name in x}
    return {**differences, "margin": frontier_margin(points_x, points_y)}


def paired_difference(runs_x: np.ndarray, runs_y: np.ndarray, thresholds: Sequence[float]) -> dict:
    """X's frontier figures minus Y's, with paired bootstrap intervals; run i of each is the same subject and
    seed ([R, S_x, 2] and [R, S_y, 2]: the settings may differ, the runs must pair up)."""
    return {"difference": difference_figures(runs_x, runs_y, thresholds),
            "intervals": bootstrap_intervals((runs_x, runs_y),
                                             lambda pair: difference_figures(*pair, thresholds))}
