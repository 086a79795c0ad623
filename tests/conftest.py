"""Shared test set-up: the repo root on sys.path, one model cache per test session, tiny models.

`RL_REF_CACHE` decides where `common.tiny_model_path()` caches the embedded model `tiny`. When it
is not set, the tests point it at a temporary folder of this session, so that the model is built
once per session (about 30 s) and every subprocess started by a test reuses it. Set it yourself
(for example `RL_REF_CACHE=~/.cache/rl-llm-ref pytest tests`) to reuse a cache across sessions.
`HF_HUB_OFFLINE=1` (unless set) makes sure that no test reaches for the network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import common  # noqa: E402  (needs sys.path above)

_own_cache: str | None = None


def pytest_configure(config):
    """Point RL_REF_CACHE at a temporary folder of this session, unless the user has chosen one.
    Set before any test runs, so that in-process calls and subprocesses share the cache."""
    global _own_cache
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never need the network
    config.addinivalue_line("markers", "job(name): the subprocess run (see `runs` in test_grpo.py) "
                                       "that a test inspects")
    if "RL_REF_CACHE" not in os.environ:
        _own_cache = tempfile.mkdtemp(prefix="rl_ref_cache_")
        os.environ["RL_REF_CACHE"] = _own_cache


def pytest_unconfigure(config):
    if _own_cache is not None:
        shutil.rmtree(_own_cache, ignore_errors=True)
        del os.environ["RL_REF_CACHE"]


@pytest.fixture(scope="session")
def run_script():
    """`run_script("grpo.py", "--steps", "3", ...)`: run Python from the repo root with this
    session's environment (so the subprocess reuses the session's model cache)."""
    def run(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *argv], cwd=ROOT, env=dict(os.environ),
                              capture_output=True, text=True, timeout=timeout)
    return run


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    """The embedded default model `tiny`, built on first use into $RL_REF_CACHE."""
    return common.tiny_model_path(quiet=True)


@pytest.fixture(scope="session")
def tiny_random_other_arch(tmp_path_factory) -> Path:
    """A randomly initialised GPT-2 (not Llama: learned absolute positions, LayerNorm, Conv1D) with
    the character tokenizer, saved with `save_pretrained` so it can be passed as `--model PATH`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = common.build_char_tokenizer()
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(cfg)
    torch.random.set_rng_state(torch_state)
    path = tmp_path_factory.mktemp("gpt2_random")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
