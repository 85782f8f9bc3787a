"""The result's MACs and peak memory, derived from runs already made instead of a new one.

A forward of the whole result would show that it runs and what it costs. When the whole
model is one traced graph whose checking run (graph_check) read no value into Python, and
every rewrite swapped one module called once by that graph for a replacement that ran on
fake tensors and gives a fresh tensor of the same shape, dtype and strides, that forward
adds nothing:
- it runs: the graph is straight-line code whose shapes do not depend on values, so every
  value outside the swapped calls has the shape it had in the checking run, which matched
  eager;
- its MACs are the original's, minus each rewrite's saving (counted on the site's shapes);
- its peak is composed from the checking run's memory, recorded call by call
  (``cost.Timeline``): outside the swapped calls the result allocates and frees the same
  tensors at the same points, and inside one it needs the bytes alive at entry plus the
  replacement's own peak.
Anything else (opaque code, edits to the graph, a module called twice, code that reads
values) is run and measured.
"""

from __future__ import annotations

from ..measure.cost import Measured, Timeline
from ..report import Report
from ..tracing.flow import DataFlow
from .workspace import Workspace


def why_not_composed(ws: Workspace, report: Report, flow: DataFlow) -> str:
    """'' if the result's forward can be derived, else why it must be run."""
    timeline = _root_timeline(ws)
    if timeline is None:
        return "the model was not traced as one graph"
    if timeline.value_dependent:
        return "the traced graph reads tensor values"
    for row in report.applied:
        if row.result_name != row.site:
            return f"{row.site}: the rewrite edited the graph around the module"
        if flow.calls[row.site] != 1 or len(timeline.calls.get(row.site, ())) != 1:
            return f"{row.site}: not called exactly once by the traced graph"
        if isinstance(peak := ws.rewritten[row.site].peak_after, str):
            return f"{row.site}: {peak}"
    return ""


def composed_peak(timeline: Timeline, peaks: dict[str, int]) -> int:
    """The peak of the timeline's run with the calls named in ``peaks`` swapped for ones
    that themselves need that many bytes above what is alive when they start."""
    moments = [timeline.outside_peak]
    for name, calls in timeline.calls.items():
        moments += [c.live_at_entry + peaks.get(name, c.transient) for c in calls]
    return max(moments)


def compose_result(ws: Workspace, report: Report, flow: DataFlow,
                   macs_before: int) -> Measured | None:
    """The result's MACs and peak (no output), or None: run it. Notes which in the report."""
    why = why_not_composed(ws, report, flow)
    report.notes["result cost"] = f"measured ({why})" if why else "composed"
    if why:
        return None
    saved = sum(r.macs_before - r.macs_after for r in report.applied)
    peaks = {name: checked.peak_after for name, checked in ws.rewritten.items()}
    return Measured(None, macs_before - saved, composed_peak(_root_timeline(ws), peaks))


def _root_timeline(ws: Workspace) -> Timeline | None:
    """The root graph's timeline, if the root is the only region and calls no opaque code."""
    regions = ws.traced.regions
    if [r.name for r in regions] != [""] or "" not in ws.installed or ws.traced.opaque_leaves:
        return None
    return regions[0].timeline
