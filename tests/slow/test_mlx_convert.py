"""Slow tier: ``axserving models convert`` (issue 15, first step) turns the packaged SmolLM2 GGUF
into an MLX model directory offline. The tokenizer it builds tokenizes exactly as llama.cpp does,
mlx-lm loads the directory and answers, and its first logits rank the same candidates as
llama.cpp's on the same token ids."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.server import AXSERVING, REPO

pytestmark = pytest.mark.slow
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TEXTS = [
    "Hello world!",
    " leading space and  double  spaces\nnew line\ttab",
    "naïve café 東京 🙂 ü",
    "<|im_start|>user\nhi<|im_end|>\n",
    "def f(x):\n    return x ** 2  # square",
]
PROMPTS = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
           "What is 2 + 2?"]


def axserving(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AXS_")}
    if "AXS_TEST_MODEL_CACHE" in os.environ:
        env["AXS_MODEL_CACHE"] = os.environ["AXS_TEST_MODEL_CACHE"]
    return subprocess.run([*AXSERVING, *args], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, default_model: Path) -> Path:
    out = tmp_path_factory.mktemp("mlx") / "smollm2"
    done = axserving("models", "convert", "-o", str(out))  # the packaged model by default
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(str(out)) and "tensors" in done.stdout
    return out


@pytest.fixture(scope="module")
def vocab(default_model: Path) -> Iterator[Any]:
    from llama_cpp import Llama

    llama = Llama(str(default_model), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    yield llama
    llama.close()


def test_the_directory_has_what_mlx_lm_loads(converted: Path) -> None:
    assert {p.name for p in converted.iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"]) == (576, 30, 9, 3)
    # Q4_1 layers kept as 4-bit affine groups, not dequantized; the file's Q8_0 embedding as 8-bit.
    assert config["quantization"] == {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}
    assert (converted / "model.safetensors").stat().st_size < 120 << 20
    tok_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"] and tok_config["eos_token"] == "<|im_end|>"


def test_the_tokenizer_tokenizes_as_llama_cpp(converted: Path, vocab: Any) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(converted / "tokenizer.json"))
    for text in TEXTS:
        ours = tok.encode(text, add_special_tokens=False).ids
        assert ours == vocab.tokenize(text.encode(), add_bos=False, special=True), text
        assert tok.decode(ours, skip_special_tokens=False) == text


def test_mlx_lm_answers_and_ranks_as_llama_cpp(converted: Path, vocab: Any) -> None:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model, tok = load(str(converted))
    agreement = []
    for i, question in enumerate(PROMPTS):
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
        ids = vocab.tokenize(prompt.encode(), add_bos=False, special=True)
        assert ids == tok.encode(prompt, add_special_tokens=False)
        cache = make_prompt_cache(model)
        logits = model(mx.array([ids]), cache=cache)[0, -1].astype(mx.float32)
        ours = np.array(logits)
        vocab.reset()
        vocab.eval(ids)
        theirs = np.array(vocab.scores[len(ids) - 1])
        # Nearly the same candidates, in nearly the same order (llama.cpp quantizes activations to 8 bits
        # for its Q4_1 dot products; MLX does not, so near-ties can swap).
        top_ours, top_theirs = set(np.argsort(-ours)[:5]), set(np.argsort(-theirs)[:5])
        assert int(np.argmax(ours)) in top_theirs and int(np.argmax(theirs)) in top_ours, question
        assert len(top_ours & top_theirs) >= 4, question
        assert np.corrcoef(ours, theirs)[0, 1] > 0.99, question
        greedy, mine = [], []
        for _ in range(24):
            nxt = int(np.argmax(np.array(logits)))
            mine.append(nxt)
            logits = model(mx.array([[nxt]]), cache=cache)[0, -1].astype(mx.float32)
        for token in vocab.generate(ids, temp=0, top_k=1, repeat_penalty=1.0, reset=True):
            greedy.append(token)
            if len(greedy) == len(mine):
                break
        agreement.append(next((j for j, (a, b) in enumerate(zip(mine, greedy)) if a != b), len(mine)))
        if i == 0:
            assert "Paris" in tok.decode(mine)
    print(f"greedy tokens agreeing with llama.cpp before the first difference, of 24: {agreement}")


def test_what_cannot_be_converted_is_a_clear_error(converted: Path, gemma_model: Path, tmp_path: Path) -> None:
    exists = axserving("models", "convert", "-o", str(converted))
    assert exists.returncode == 2 and "--force" in exists.stderr
    kquant = axserving("models", "convert", str(gemma_model), "-o", str(tmp_path / "g"))
    assert kquant.returncode == 2 and "K-quants do not" in kquant.stderr and "Traceback" not in kquant.stderr
    missing = axserving("models", "convert", str(tmp_path / "none.gguf"), "-o", str(tmp_path / "n"))
    assert missing.returncode == 2 and "no such file" in missing.stderr


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # llama_cpp's own, once per token scanned
def test_the_directorys_tokenizer_seam_matches_llama_cpps(converted: Path, vocab: Any) -> None:
    """The MLX backend's vocabulary (engine_proc.backends.hf_vocab, the tokenizers library
    alone) against llama.cpp's on the same model, through the shared Tokenizer seam."""
    from engine_proc.backends.hf_vocab import HFTokenizer
    from engine_proc.backends.llama_vocab import LlamaTokenizer
    from ipc.records import ChatMessage, Generation, Tool

    ours, theirs = HFTokenizer(converted), LlamaTokenizer(vocab)
    assert (ours.n_vocab, ours.bos, ours.add_bos) == (theirs.n_vocab, theirs.bos, theirs.add_bos)
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, special) == theirs.encode(text, special), (text, special)
    assert [ours.piece(t) for t in range(ours.n_vocab)] == [theirs.piece(t) for t in range(theirs.n_vocab)]
    assert {t for t in range(ours.n_vocab) if ours.is_eog(t)} == {t for t in range(theirs.n_vocab) if theirs.is_eog(t)}
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="<|im_start|>hi")]
    tools = (Tool(name="get_time", description="The time", parameters='{"type":"object","properties":{}}'),)
    for gen in (Generation(), Generation(tools=tools)):
        assert ours.chat_text(messages, gen) == theirs.chat_text(messages, gen)
        assert ours.chat_tokens(messages, gen) == theirs.chat_tokens(messages, gen)
    assert ours.tool_format == theirs.tool_format and ours.markers == theirs.markers
    text = "The quick brown fox {\"a\": [1, 2]}"
    assert ours.guidance().tokenize_str(text) == theirs.guidance().tokenize_str(text)
