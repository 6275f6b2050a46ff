"""The unit loop's promise, kept by tests/conftest.py: a test without the `integration` mark that starts a program
fails, naming it. (torch.multiprocessing's workers in test_partial_fc.py are the test's own computation, not a
program or a service, and are allowed.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import StartedAProcess


def test_a_unit_test_that_starts_a_program_fails_naming_it():
    with pytest.raises(StartedAProcess, match=r"'true'.*mark the test `integration`"):
        subprocess.run(["true"], check=False)
    with pytest.raises(StartedAProcess, match="mark the test `integration`"):
        subprocess.Popen([sys.executable, "-c", "pass"])
    with pytest.raises(StartedAProcess, match="os.posix_spawn"):
        os.posix_spawn("/bin/true", ["true"], dict(os.environ))


@pytest.mark.integration
def test_an_integration_test_may_start_one():
    assert subprocess.run(["true"], check=False).returncode == 0
