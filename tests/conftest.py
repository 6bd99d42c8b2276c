import pytest
import torch

# One thread: tiny models gain nothing from two, and on shared 2-core CI machines two threads
# contend with each other (tiny pipeline runs measured 30-100x slower under load).
torch.set_num_threads(1)


def pipeline_output(pipe, kwargs):
    """The decoded frames (video pipelines) or images (image pipelines) as one tensor."""
    out = pipe(**kwargs)
    value = out.frames if hasattr(out, "frames") else out.images
    return torch.as_tensor(value)


@pytest.fixture
def run_pipeline():
    return pipeline_output
