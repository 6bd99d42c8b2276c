import diffusers  # noqa: F401
import pytest
import torch
import transformers

# Configure the libraries' log handlers now, at collection: a handler first made inside a test that
# captures stderr (capsys) would keep writing to that test's closed stream ("--- Logging error ---").
transformers.utils.logging.get_logger("transformers")
diffusers.utils.logging.get_logger("diffusers")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every test runs single-threaded: the tiny models are all small ops, and on shared 2-core
    machines OpenMP workers contend (tiny pipeline runs measured 10-100x slower with 2 threads).
    Session scope, so module-scoped fixtures (reference outputs compared bit for bit against a
    test's own run) are computed with the same thread count as the tests that use them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def still_one_thread(one_thread):
    """...and again before each test, in case one (a benchmark's ``--threads``) changed it."""
    torch.set_num_threads(1)


def pipeline_output(pipe, kwargs):
    """The decoded frames (video pipelines) or images (image pipelines) as one tensor."""
    out = pipe(**kwargs)
    value = out.frames if hasattr(out, "frames") else out.images
    return torch.as_tensor(value)


@pytest.fixture
def run_pipeline():
    return pipeline_output
