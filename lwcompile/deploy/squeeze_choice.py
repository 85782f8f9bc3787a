"""Squeeze widths per LIST site that fit a latency budget, keeping the most parameters.

A LIST's squeeze width (in_channels / squeeze ratio) trades capacity (parameters) for
latency. Given, for every site, the widths it may take with the measured latency change and
the parameter count of each, the choice is a small knapsack; a greedy walk solves it well
because each site's options are few and ordered:

1. While the predicted latency is over the budget, move the site whose next narrower width
   saves the most milliseconds per parameter lost (only moves that save time count).
   If no such move is left, the budget cannot be met: ``None``.
2. Then, while a move fits, move the site whose next wider width gains the most parameters
   per millisecond added, as long as the prediction stays within the budget.

The prediction is additive: the model's latency now plus each site's change. ``tune``
measures the changes (one variant per group of alike sites, divided among them) and times
the chosen combination again, since additivity is only an approximation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: a move that adds no time still counts as adding this much (parameters per ms stay finite)
_MIN_MS = 1e-6


@dataclass(frozen=True)
class Option:
    """One squeeze width a site may take: the whole model's latency change it makes against
    the site's current width (negative: faster), and the site's parameter count with it."""

    width: int
    ms: float
    params: int


def predicted_ms(options: Mapping[str, Sequence[Option]], widths: Mapping[str, int],
                 ms_now: float) -> float:
    """The latency predicted for the sites at ``widths``, from ``ms_now`` at their current
    widths."""
    return ms_now + sum(_at(options[s], w).ms for s, w in widths.items())


def choose(options: Mapping[str, Sequence[Option]], current: Mapping[str, int],
           ms_now: float, budget_ms: float) -> dict[str, int] | None:
    """The width of every site within ``budget_ms`` (predicted) with the most parameters
    the greedy walk finds, starting from ``current``; None where even the moves that save
    time cannot bring the prediction within the budget. ``options`` per site, any order;
    each must include the site's current width."""
    ladders = {s: sorted(opts, key=lambda o: -o.width) for s, opts in options.items()}
    widths = dict(current)
    ms = predicted_ms(ladders, widths, ms_now)
    while ms > budget_ms:
        moves = [(now.ms - nxt.ms, now.params - nxt.params, s, nxt)
                 for s, (now, nxt) in _steps(ladders, widths, narrower=True)]
        moves = [m for m in moves if m[0] > 0]
        if not moves:
            return None
        saved, _, site, nxt = max(moves, key=lambda m: m[0] / max(m[1], 1))
        widths[site], ms = nxt.width, ms - saved
    while True:
        moves = [(max(nxt.ms - now.ms, _MIN_MS), nxt.params - now.params, s, nxt, nxt.ms - now.ms)
                 for s, (now, nxt) in _steps(ladders, widths, narrower=False)]
        moves = [m for m in moves if m[1] > 0 and ms + m[4] <= budget_ms]
        if not moves:
            return widths
        _, _, site, nxt, added = max(moves, key=lambda m: m[1] / m[0])
        widths[site], ms = nxt.width, ms + added


def _at(ladder: Sequence[Option], width: int) -> Option:
    return next(o for o in ladder if o.width == width)


def _steps(ladders: Mapping[str, Sequence[Option]], widths: Mapping[str, int], *,
           narrower: bool) -> list[tuple[str, tuple[Option, Option]]]:
    """Each site's move to its neighbouring width on its ladder (widest first): the next
    narrower or the next wider, where there is one."""
    steps = []
    for site, ladder in ladders.items():
        i = [o.width for o in ladder].index(widths[site])
        j = i + 1 if narrower else i - 1
        if 0 <= j < len(ladder):
            steps.append((site, (ladder[i], ladder[j])))
    return steps
