"""Shared helpers for the autotuner tests: the probe stem (probe_stem.py, importable as `probe_stem` because pytest
puts this folder on sys.path) and an environment for worker subprocesses that can import it too."""
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture
def worker_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


@pytest.fixture
def python():
    return sys.executable
