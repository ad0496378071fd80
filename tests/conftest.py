import os

import pytest
import torch


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY_REPORT: list[str] = []


def parity_root() -> str:
    return os.environ.get("DIFFMOE_PARITY_DIR", os.path.join(REPO_ROOT, "..", "shared", "fixtures", "parity"))


@pytest.fixture(autouse=True)
def _deterministic_cpu():
    torch.manual_seed(0)
    yield


def pytest_terminal_summary(terminalreporter):
    if PARITY_REPORT:
        terminalreporter.section("parity (max abs error / tolerance)")
        for line in PARITY_REPORT:
            terminalreporter.write_line(line)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "browser: drives the Gradio demo in Debian's chromium through Playwright (slow; CI runs it)"
    )
