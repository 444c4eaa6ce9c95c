"""The installed distribution: one top-level package, ``fleetpipe``, with every sub-package and data file.

Builds the wheel from this checkout (``pip wheel --no-deps --no-build-isolation``, offline) and reads it.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_only_fleetpipe_at_the_top(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, timeout=300, cwd=tmp_path)
    (wheel,) = tmp_path.glob("fleetpipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"fleetpipe"}, tops
    for pkg in ("node", "planner", "models", "deploy", "observe", "transport"):
        assert f"fleetpipe/{pkg}/__init__.py" in names, pkg
    assert "fleetpipe/wire.py" in names and "fleetpipe/py.typed" in names
    assert any(n.startswith("fleetpipe/deploy/") and n.endswith(".conf") for n in names), "broker configs"
    assert any(n.endswith(".service") for n in names), "systemd units"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fleetpipe = " in zipfile.ZipFile(wheel).read(entry).decode()
    licence = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert licence and "Apache License" in zipfile.ZipFile(wheel).read(licence[0]).decode()[:200], names[-8:]
