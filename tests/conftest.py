import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# GENDISTILL_TEST_THREADS=1 when another job shares the cores (DESIGN.md section 9)
torch.set_num_threads(int(os.environ.get("GENDISTILL_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
