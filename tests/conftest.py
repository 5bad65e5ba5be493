import os

# Both must be set before transformers/triton are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` runs two worker processes on CI's two cores: one thread each (and in what
    # they launch), since two threads per process on two busy cores run up to ten times slower.
    os.environ["OMP_NUM_THREADS"] = "1"

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


@pytest.fixture(autouse=True)
def _shipped_catalogue():
    """Loading a world selects its catalogue (its identity count); every test starts from, and
    leaves, the shipped world's."""
    from engine.toyworld import catalogue as cat

    shipped = cat.N_IDENTITIES
    yield
    cat.set_identity_count(shipped)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: their small tensors are overhead-bound, one torch thread is as
    fast, and two threads per process on a busy two-core machine are up to ten times slower.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    from engine.closed_form import single_threaded

    with single_threaded():
        yield


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


def quick_v2_config(**changes):
    """The v2 world's settings (more identities, frozen text tower, generic captions) at a
    small text width and a few steps per stage, with ``changes``."""
    from dataclasses import replace

    from engine.toyworld.build import BuildConfig

    settings = {"text_width": 128, "identities": 200, "unet_steps": 4, "checkpoint_every": 2, "generic_captions": 0.3}
    return replace(BuildConfig.quick(seed=5, world="v2"), **{**settings, **changes})


@pytest.fixture(scope="session")
def quick_world_v2(tmp_path_factory):
    """A quick build with the v2 world's settings (``quick_v2_config``), on one thread like the
    modules that use it: a matmul's rounding depends on the thread count, and the resume test
    compares weights bit for bit."""
    from engine.closed_form import single_threaded
    from engine.toyworld.build import build_world

    out = tmp_path_factory.mktemp("world-v2") / "w"
    with single_threaded():
        build_world(out, quick_v2_config(), progress=False)
    return out
