"""The compiler: a workspace copy of the model, its sites, decide (match -> guard -> rewrite),
per-replacement and whole-model checks, and the driver that bisects and rolls back.

It knows no particular rule or guard: they are handed to it by ``lwcompile.api``."""
