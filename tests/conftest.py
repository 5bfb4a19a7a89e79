import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def cli():
    """Run the dynconvert CLI in-process: returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from dynconvert.cli import app

    def run(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        return result.exit_code, result.stdout, result.stderr

    return run
