"""Deployment: a lightened model in the form each runtime runs fastest, and saved to disk.

- ``identities``: the tensor identities every rewrite rests on (split a conv by concat
  parts, slice per-channel values, fold BatchNorm, phase weights for thin convs) and the
  decisions of when a form pays off, written once;
- ``module_rewrites``, ``concat_sinking``: the module-level adapters, for eager PyTorch and
  ONNX; ``emit`` (``emit_fast``) runs them in order;
- ``aten_rewrites``: the ATen-level adapter, for ExecuTorch/XNNPACK;
- ``export`` (``export_onnx``, ``export_program``), ``mobile`` (``export_mobile``);
  ``keyword_calls`` keeps torch.export's tracer from taking a ``mod`` keyword for its own;
- ``persist`` (``save``, ``load``, ``info``).
"""
