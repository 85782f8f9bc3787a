"""Deployment: fast module-level forms (emit_fast), ONNX / onnxruntime export, ExecuTorch
(XNNPACK) export, and saving/loading light models."""
