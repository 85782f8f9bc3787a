"""`make demo`: lighten the reference DnCNN-17 and print what changed."""

import lwcompile
from examples import dncnn

model = dncnn.build()
light = lwcompile.lighten(model)
print(light.lwcompile_report)
