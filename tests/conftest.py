import os

import pytest
import torch

from minisora.hardware import flush_denormals

# Two CPU cores: keep each test process to one intra-op thread unless a test asks otherwise.
torch.set_num_threads(int(os.environ.get("MINISORA_TEST_THREADS", "1")))
flush_denormals()  # as the CLI does for every command; tests also call stage mains directly


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (ZeRO/Gemini/HybridAdam/bf16 flash attention); "
                                       "none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The bad-input suite's world (tests/_bad_world.py), built once per session."""
    from _bad_world import build_world

    return build_world(tmp_path_factory.mktemp("bad"))
