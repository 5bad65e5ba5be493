import os

# Both must be set before transformers/triton are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep the engine's on-disk caches out of the user's home during tests."""
    old = os.environ.get("ERASURE_CACHE")
    os.environ["ERASURE_CACHE"] = str(tmp_path_factory.mktemp("erasure-cache"))
    yield
    if old is None:
        os.environ.pop("ERASURE_CACHE", None)
    else:
        os.environ["ERASURE_CACHE"] = old


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: their small tensors are overhead-bound, one torch thread is as
    fast, and two threads per process on a busy two-core machine are up to ten times slower.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A random-weight SD1-style pipeline in diffusers format, written once per session."""
    from engine.tiny import write_tiny_model

    return write_tiny_model("tiny", tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from engine.tiny import write_tiny_model

    return write_tiny_model("tiny-sdxl", tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def quick_world(tmp_path_factory):
    """A toy world from a quick build (a few steps per stage: real formats, untrained weights)."""
    from engine.toyworld.build import BuildConfig, build_world

    out = tmp_path_factory.mktemp("world") / "w"
    build_world(out, BuildConfig.quick(seed=3), progress=False)
    return out
