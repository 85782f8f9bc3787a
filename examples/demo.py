"""`make demo`: lighten the reference DnCNN-17 and print what changed."""

import lwcompile
from examples import dncnn

model = dncnn.build()
light = lwcompile.lighten(model)
print(light.lwcompile_report)

print("\nThe paper's networks (python -m examples.paper_table):")
from examples import paper_table  # noqa: E402

paper_table.main()
