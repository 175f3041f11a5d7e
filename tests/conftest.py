import pytest
import torch


@pytest.fixture
def float64():
    """Run a test in float64 so that comparisons against slow reference loops can be tight."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """``shapes_dir(seed, num_train, num_val, size)``: a generated shapes dataset, made once per session."""
    from clusterformer.data import make_shapes

    made = {}

    def make(seed: int, num_train: int, num_val: int, size: int):
        key = (seed, num_train, num_val, size)
        if key not in made:
            made[key] = tmp_path_factory.mktemp("shapes")
            make_shapes(made[key], seed=seed, num_train=num_train, num_val=num_val, size=size, progress=False)
        return made[key]

    return make


@pytest.fixture(scope="module")
def one_thread():
    """For modules of small models (``pytestmark = pytest.mark.usefixtures("one_thread")``): one torch
    thread is faster than several for them, much faster on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_addoption(parser):
    # tests/test_serve.py's browser test: the screenshot of the web demo in the docs (docs/predict_explain.md, "Web
    # demo", says how it was made)
    parser.addoption("--web-demo-screenshot", metavar="PNG", help="test_serve.py: also save the page's screenshot here")
    parser.addoption("--web-demo-ckpt", metavar="CKPT", help="test_serve.py: the browser test's checkpoint")
    parser.addoption("--web-demo-class-names", metavar="TXT", help="test_serve.py: its class names, one per line")
