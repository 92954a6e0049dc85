from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def build_root(tmp_path_factory) -> Path:
    """One build root per test session: the zoo cache (digits_cnn weights) is shared inside it."""
    return tmp_path_factory.mktemp("build")


@pytest.fixture(scope="session", autouse=True)
def run_dir(tmp_path_factory) -> Path:
    """A directory every pytest-xdist worker of this run shares (the parent of each worker's base temporary
    directory; pytest keeps the last three runs' and removes older ones): ``decoders.shared`` makes what the
    run's workers share there once (the seeded decoders' exports, the tiny-LLaMA bundle)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    os.environ["PLANFORGE_TEST_RUN_DIR"] = str(shared)
    return shared


@pytest.fixture()
def run_cli(capsys):
    """Run the planforge CLI in-process; return (exit code, stdout, stderr)."""
    from engines.cli import main

    def run(*args: str):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in an empty working directory, so default outputs (build/) land under tmp_path."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_report_header(config):
    from engines.runtime.cpu import detect

    cpu = detect()
    return (f"planforge tests; PYTHONHASHSEED={os.environ.get('PYTHONHASHSEED', 'random')}; "
            f"CPU {cpu.model} ({cpu.cores} cores), ISA class {cpu.isa}")
