"""The built-in rules live in lwcompile/rules/ and must ship inside a plain wheel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # builds and installs a wheel in subprocesses
def test_rules_load_from_a_non_editable_wheel_install(tmp_path: Path) -> None:
    pytest.importorskip("hatchling")
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, ROOT],
                   check=True)
    wheel = next(wheels.glob("lwcompile-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", target, wheel], check=True)
    probe = (
        "import lwcompile, torch\n"
        "print(lwcompile.__file__)\n"
        "print(sorted(r.name for r in lwcompile.default_rules()))\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), "
        "torch.nn.Conv2d(32, 32, 3, padding=1))\n"
        "print(len(lwcompile.lighten(m).lwcompile_report.applied))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    assert out[0].startswith(str(target))
    assert "'list'" in out[1]
    assert out[2] == "1"
