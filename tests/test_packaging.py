"""The four folders install as one import package, flywheel.* (issue 15): a plain wheel holds
flywheel/server/... and nothing named `server` at the top of site-packages; an editable install maps
the same names onto the folders. Every package folder is listed in pyproject.toml, so a new
subpackage cannot silently drop out of the wheel."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("server", "sampler", "trainer", "clients")


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        "flywheel." + ".".join(p.parent.relative_to(REPO).parts)
        for folder in FOLDERS
        for p in (REPO / folder).rglob("__init__.py")
    }
    assert listed == on_disk


def test_a_plain_wheel_installs_flywheel_and_no_top_level_server(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("flywheel-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert "flywheel" in tops and not tops & set(FOLDERS), tops
    names = zipfile.ZipFile(wheel).namelist()
    assert {
        "flywheel/server/weights/worker.py",
        "flywheel/clients/cli.py",
        "flywheel/trainer/megatron/__init__.py",
    } <= set(names)
    assert not any(n.startswith(("flywheel/__init__", "tests/", "bench/")) for n in names)  # a namespace; no tests

    # pip install of the wheel into a fresh venv (no dependencies: only the layout is under test)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    probe = (
        "import flywheel.server, flywheel.server.errors as e, importlib.util as u; "
        "print(e.__file__); print(u.find_spec('server'))"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    errors_file, bare = out.stdout.split()
    assert errors_file.startswith(str(site)) and bare == "None"
    assert not any((site / folder).exists() for folder in FOLDERS)
