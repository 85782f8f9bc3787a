"""Training the light network: data and degradations, layer-wise fitting, distillation."""
