"""What lighten did, site by site: printable as a table, serialisable as JSON."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

APPLIED = "applied"
KEPT = "kept"  # a guard vetoed the rewrite
REFUSED = "refused"  # the rule recognised the site but cannot rewrite it
ROLLED_BACK = "rolled back"  # the rule failed or its result failed verification


@dataclass
class Row:
    """One decision at one matched site."""

    site: str
    original: str
    replacement: str  # what replaced it, or "kept"
    outcome: str  # APPLIED, KEPT, REFUSED or ROLLED_BACK
    decided_by: str  # the rule that fired or the guard / check that stopped it
    reason: str = ""
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    #: qualified name of the replacement in the result (differs from ``site`` when a rule
    #: replaced several nodes, e.g. conv + pixel shuffle): where to find it for fine-tuning
    result_name: str = ""


@dataclass
class Summary:
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    #: peak bytes of activations alive at once during the example forward (None: not run)
    peak_activation_before: int | None = None
    peak_activation_after: int | None = None

    @property
    def param_ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)

    @property
    def mac_ratio(self) -> float:
        return self.macs_before / max(self.macs_after, 1)


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    summary: Summary | None = None
    #: why sites matched no rule, and what tracing could not see: the debugging log
    log: list[str] = field(default_factory=list)
    #: concat skips and other structure the compiler recognised, for the reader
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def applied(self) -> list[Row]:
        return [r for r in self.rows if r.outcome == APPLIED]

    @property
    def not_applied(self) -> list[Row]:
        """Every site left as it was, whatever the outcome: KEPT, REFUSED or ROLLED_BACK."""
        return [r for r in self.rows if r.outcome != APPLIED]

    @property
    def refused(self) -> list[Row]:
        """Deprecated: every non-applied row, not only REFUSED ones; use ``not_applied``."""
        warnings.warn("Report.refused returns every site not applied (kept, refused or rolled "
                      "back); use Report.not_applied", DeprecationWarning, stacklevel=2)
        return self.not_applied

    def to_dict(self) -> dict[str, Any]:
        summary = None
        if self.summary is not None:
            summary = asdict(self.summary) | {
                "param_ratio": round(self.summary.param_ratio, 3),
                "mac_ratio": round(self.summary.mac_ratio, 3),
            }
        return {"rows": [asdict(r) for r in self.rows], "summary": summary,
                "log": list(self.log), "notes": dict(self.notes)}

    def __str__(self) -> str:
        header = ("site", "original", "result", "decided by", "params", "MACs", "why")
        lines = [
            (r.site or "<root>", r.original,
             r.replacement if r.outcome == APPLIED else r.outcome, r.decided_by,
             f"{short_number(r.params_before)} -> {short_number(r.params_after)}",
             f"{short_number(r.macs_before)} -> {short_number(r.macs_after)}", r.reason)
            for r in self.rows
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
        out = [fmt.format(*header), fmt.format(*("-" * w for w in widths[:-1]), "---")]
        out += [fmt.format(*line).rstrip() for line in lines]
        skips = self.notes.get("concat_skips") or []
        if skips:
            out.append("")
            out.append(f"{len(skips)} concat skips: " + ", ".join(_skip(k) for k in skips))
        if self.summary is not None:
            s = self.summary
            out.append("")
            out.append(
                f"{len(self.applied)} rewritten, {len(self.not_applied)} kept | "
                f"params {short_number(s.params_before)} -> {short_number(s.params_after)} "
                f"({s.param_ratio:.1f}x fewer) | MACs {short_number(s.macs_before)} -> "
                f"{short_number(s.macs_after)} ({s.mac_ratio:.1f}x fewer) | peak activations "
                f"{_mib(s.peak_activation_before)} -> {_mib(s.peak_activation_after)} MiB"
            )
        return "\n".join(out)


def _skip(skip: dict[str, Any]) -> str:
    parts = zip(skip["inputs"], skip["depths"], strict=True)
    return f"{skip['concat']} ({' + '.join(f'{name}@depth {d}' for name, d in parts)})"


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f}"


def short_number(n: float | None) -> str:
    """``n`` with a k, M or G suffix (``3.80k``), "?" for None: one format for the text
    report, the HTML page and the profile table, so that they read alike."""
    if n is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n)) if float(n).is_integer() else f"{n:.2f}"
