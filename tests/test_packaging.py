"""An installed depmatch works outside a checkout: what it reads at run time ships in the package."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_non_editable_install_runs_bench_zero_outside_the_checkout(tmp_path):
    """pip-install a copy of the project (not editable) into a fresh environment that borrows torch and
    the rest from this one, then run `depmatch bench --zero 2` from a folder with no checkout: the
    DeepSpeed JSON comes from the installed package."""
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ and *.egg-info there
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "depmatch", source / "depmatch", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    # No pip of its own: a venv's bundled setuptools may be too old to build a wheel, so this
    # environment's pip installs into it (--python) and builds with this environment's setuptools.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-build-isolation",
               str(source)]  # fmt: skip
    subprocess.run(install, check=True, env=env, cwd=tmp_path, capture_output=True)
    shutil.rmtree(source)  # nothing may read the copy once it is installed

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import depmatch; print(depmatch.__file__)"], env=env, cwd=work,
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(venv), where  # the installed copy, not this checkout nor an editable install

    command = [str(venv / "bin" / "depmatch"), "bench", "--zero", "2", "--precision", "bf16", "--encoders", "vit_tiny",
               "--depmatch", "off", "--steps", "1", "--warmup", "1", "--crop", "28", "--batch", "1", "--out", "bench",
               "--set", "model.tiny_embed_dim=24", "--set", "model.tiny_heads=1"]  # fmt: skip
    completed = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    (row,) = json.loads((work / "bench" / "bench.json").read_text())
    assert row["zero"] == "2" and row["precision"] == "bf16" and row["step_time_s"] > 0
