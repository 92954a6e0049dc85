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
