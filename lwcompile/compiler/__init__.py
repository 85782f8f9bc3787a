"""The compiler, by stage: ``workspace`` (the traced copy lighten rewrites), ``sites`` (where
rules may rewrite), ``decide`` (match -> guard -> check -> rewrite, one row per site),
``check`` (per-replacement and whole-model checks), ``result_cost`` (the result's cost
from runs already made) and ``driver`` (reference run, bisection, rollback, plan).

It knows no particular rule or guard: they are handed to it by ``lwcompile.api``."""
