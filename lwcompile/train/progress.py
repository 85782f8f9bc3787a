"""The progress display of ``distill``: a tqdm bar with the loss and the last validation PSNR,
or a printed line every twentieth of the run where tqdm is not installed."""

from __future__ import annotations

from collections.abc import Callable

Show = Callable[[int | None, float | None, float | None], None]


def progress(start: int, total: int, enabled: bool) -> Show:
    """A callback ``(step, loss, last validation PSNR or None) -> None``; called with
    ``(None, None, None)`` to close the bar."""
    if not enabled:
        return lambda step, value, psnr: None
    try:
        from tqdm import tqdm
    except ImportError:
        every = max(1, total // 20)

        def show(step: int | None, value: float | None, psnr: float | None) -> None:
            if step is not None and (step % every == 0 or step == total):
                val = "" if psnr is None else f" val PSNR {psnr:.2f} dB"
                print(f"distill step {step}/{total} loss {value:.4g}{val}", flush=True)
        return show
    bar = tqdm(total=total, initial=start, desc="distill", unit="step")

    def update(step: int | None, value: float | None, psnr: float | None) -> None:
        if step is None:
            bar.close()
            return
        bar.update(1)
        postfix = {"loss": f"{value:.4g}"}
        if psnr is not None:
            postfix["val_psnr"] = f"{psnr:.2f}"
        bar.set_postfix(postfix, refresh=False)
    return update
