import pytest
import torch

torch.set_num_threads(2)


def pipeline_output(pipe, kwargs):
    """The decoded frames (video pipelines) or images (image pipelines) as one tensor."""
    out = pipe(**kwargs)
    value = out.frames if hasattr(out, "frames") else out.images
    return torch.as_tensor(value)


@pytest.fixture
def run_pipeline():
    return pipeline_output
