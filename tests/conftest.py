import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # the repository's tools, tested like the package


@pytest.fixture(scope="session")
def tiny():
    from lora_edu.gpt2 import load_tiny

    return load_tiny()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
