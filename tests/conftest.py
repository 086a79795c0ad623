"""Shared test set-up: the repo root on sys.path, the shipped models, small random models.

The embedded models are files of the repository (`models/tiny`, `models/tiny-pref`,
`models/tiny-pref-rm`), so no test builds one. `HF_HUB_OFFLINE=1` (unless set) makes sure that no
test reaches for the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import common  # noqa: E402  (needs sys.path above)
from models.build import build_char_tokenizer  # noqa: E402


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never need the network
    # the script runs are subprocesses, started 2 to 4 at a time on small pools: one torch thread
    # each, since two threads per process thrash on 2 cores (this process keeps torch's default)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config.addinivalue_line("markers", "job(name): the subprocess run (see `runs` in test_grpo.py) "
                                       "that a test inspects")


@pytest.fixture(scope="session")
def run_script():
    """`run_script("grpo.py", "--steps", "3", ...)`: run Python from the repo root with this
    session's environment."""
    def run(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *argv], cwd=ROOT, env=dict(os.environ),
                              capture_output=True, text=True, timeout=timeout)
    return run


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    """The embedded default model `tiny`: the shipped folder models/tiny."""
    return common.MODELS_DIR / "tiny"


@pytest.fixture(scope="session")
def tiny_random_other_arch(tmp_path_factory) -> Path:
    """A randomly initialised GPT-2 (not Llama: learned absolute positions, LayerNorm, Conv1D) with
    the character tokenizer, saved with `save_pretrained` so it can be passed as `--model PATH`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_char_tokenizer()
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
