"""The paper's three kinds of network (plus a U-Net), lightened with the default rules:
parameters and MACs before/after next to the paper's own figures. Prints a markdown table.

    python -m examples.paper_table
"""

from __future__ import annotations

from collections import Counter

import torch

import lwcompile
from examples import dncnn, glcic, srresnet, unet

NETWORKS = [  # (name, module, the paper's figure for that task)
    ("DnCNN-17 (denoising)", dncnn, "4.3M -> 0.4M (denoising)"),
    ("SRResNet x4 (super-resolution)", srresnet, "1.5M -> 0.1M (SR x4)"),
    ("GLCIC completion (inpainting)", glcic, "6.0M -> 0.5M (inpainting)"),
    ("U-Net (restoration)", unet, "-"),
]


def rows() -> list[dict]:
    out = []
    for name, module, paper in NETWORKS:
        torch.manual_seed(0)
        light = lwcompile.lighten(module.build(), module.example_inputs())
        report = light.lwcompile_report
        s = report.summary
        fired = Counter(r.decided_by for r in report.applied)
        out.append({"network": name, "paper": paper, "params_before": s.params_before,
                    "params_after": s.params_after, "macs_before": s.macs_before,
                    "macs_after": s.macs_after,
                    "rules": ", ".join(f"{k} x{v}" for k, v in fired.items())})
    return out


def main() -> None:
    print("| network | params before -> after | MACs before -> after (example input) "
          "| rules that fired | paper |")
    print("|---|---|---|---|---|")
    for r in rows():
        print(f"| {r['network']} | {r['params_before']:,} -> {r['params_after']:,} "
              f"({r['params_before'] / r['params_after']:.1f}x) | "
              f"{r['macs_before'] / 1e6:,.0f}M -> {r['macs_after'] / 1e6:,.0f}M "
              f"({r['macs_before'] / r['macs_after']:.1f}x) | {r['rules']} | {r['paper']} |")


if __name__ == "__main__":
    main()
