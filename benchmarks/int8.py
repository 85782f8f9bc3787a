"""int8 against fp32 in onnxruntime, for DnCNN-17 and its lightened form, as users deploy them.

    python -m benchmarks.int8 --runs 9

The committed trained DnCNN-17 (sigma 25) and ``lighten`` of it (not distilled: its int8
cost is measured against its own fp32 output) are each exported with
``lwcompile.export_onnx`` twice: fp32 (fast form) and ``precision="int8"`` (onnxruntime QDQ,
per-channel weights, calibrated on noisy crops of the default training images). The four
sessions run interleaved round-robin on 1x1x256x256 (2 warm-up + ``--runs`` timed rounds,
medians; 2 intra-op threads, spinning off, as ``benchmarks.speed``). Quality: the PSNR the
export reports (int8 vs float on held-out crops), and for the trained original the PSNR
against the clean held-out images in fp32 and int8 (``benchmarks.common.score``).
Writes benchmarks/results/int8.json with the machine (CPU model, ISA flags, versions).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lwcompile
from benchmarks.common import DENOISE, held_out, score
from benchmarks.speed import THREADS, hardware_label, machine, table, write_json
from examples import dncnn
from lwcompile.deploy.int8_onnx import session as onnxruntime_session

SIZE = (1, 1, 256, 256)
CHECKPOINT = Path(__file__).resolve().parent / "weights" / "dncnn17_sigma25.ckpt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    info = machine()
    teacher = DENOISE.build()
    teacher.load_state_dict(torch.load(CHECKPOINT, weights_only=True)["model"])
    teacher.eval()
    models = {"original": teacher, "light": lwcompile.lighten(teacher, dncnn.example_inputs())}
    example = (torch.rand(SIZE, generator=torch.Generator().manual_seed(0)),)
    sessions, reports, export_s = {}, {}, {}
    pairs = held_out(DENOISE, SIZE[-1])
    quality = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            for precision in ("fp32", "int8"):
                start = time.perf_counter()
                path = lwcompile.export_onnx(model, example, Path(tmp) / f"{name}_{precision}.onnx",
                                             precision=precision, degrade=DENOISE.degrade)
                export_s[f"{name} {precision}"] = round(time.perf_counter() - start, 1)
                if path.int8_report is not None:
                    reports[name] = path.int8_report.to_dict()
                session = onnxruntime_session(path, THREADS)
                sessions[f"{name} {precision}"] = session
                if name == "original":
                    quality[precision] = score(
                        lambda x, s=session: torch.from_numpy(
                            s.run(None, {"input_0": x.numpy()})[0]), DENOISE, pairs)
    feed = {"input_0": example[0].numpy()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for round_ in range(2 + args.runs):
        for key, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            if round_ >= 2:
                times[key].append(time.perf_counter() - start)
    ms = {k: round(1000 * statistics.median(t), 1) for k, t in times.items()}
    rows = [[name, ms[f"{name} fp32"], ms[f"{name} int8"],
             round(ms[f"{name} fp32"] / ms[f"{name} int8"], 2),
             round(reports[name]["psnr_db"], 2), reports[name]["float_layers"] or "-"]
            for name in models]
    print(f"{hardware_label(info)}, onnxruntime {info.get('onnxruntime')}; medians of {args.runs}")
    print(table(rows, ["DnCNN-17 1x1x256x256", "fp32 ms", "int8 ms", "fp32/int8",
                       "int8 vs float dB", "float layers"]))
    best = {n: min(ms[f"{n} fp32"], ms[f"{n} int8"]) for n in models}
    print(f"light vs original, fp32: {ms['original fp32'] / ms['light fp32']:.2f}x; "
          f"best vs best (int8 allowed): {best['original'] / best['light']:.2f}x")
    print(f"trained original on held-out images (vs clean): fp32 "
          f"{quality['fp32']['psnr']:.2f} dB, int8 {quality['int8']['psnr']:.2f} dB")
    path = write_json("int8", {"machine": info, "input": list(SIZE), "runs": args.runs,
                               "median_ms": ms, "int8_reports": reports,
                               "export_seconds": export_s, "original_vs_clean": quality,
                               "ratios": {"light_vs_original_fp32":
                                          round(ms["original fp32"] / ms["light fp32"], 2),
                                          "best_vs_best": round(best["original"]
                                                                / best["light"], 2)}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
