import os

# One thread: the CI machine has 2 cores and busy-waiting OpenMP threads slow everything when shared.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import tiny  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pair_dirs(tmp_path_factory):
    """{arch: (base folder, instruct folder)}: random tiny pairs of every test architecture."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: (tiny.save_model(root / arch / "base", arch, seed=0),
                   tiny.save_model(root / arch / "instruct", arch, seed=1)) for arch in tiny.ARCHS}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return tiny.make_tokenizer()


@pytest.fixture(scope="module")
def llama(tiny_pair_dirs):
    """The tiny random Llama (instruct side) as a bridge and as plain HF, for hand comparisons (a test module may
    define its own, e.g. in float64)."""
    from probes.pairs import load_model

    folder = tiny_pair_dirs["llama"][1]
    return load_model(folder, device="cpu"), tiny.hf_model(folder)


@pytest.fixture(scope="session")
def browser():
    """Skip where headless Chromium or Playwright is absent; fail instead when PROBES_REQUIRE_BROWSER=1 (CI)."""
    from probes.browser import BrowserUnavailable, find_chromium

    try:
        find_chromium()
        import playwright  # noqa: F401
    except (BrowserUnavailable, ImportError) as exc:
        if os.environ.get("PROBES_REQUIRE_BROWSER") == "1":
            raise
        pytest.skip(f"no headless browser here: {exc}")
