"""Tracing: hierarchical torch.fx tracing with shape records, the runtime data flow, concat
skips, and small fx helpers. Knows nothing of rewrites."""
