"""The optional text embedder: its install hint without the extra; with it, sentence-transformers' vectors, no torch."""

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import trio

import node.embed as embed_module
from node.embed import (
    EMBEDDING_DIMS,
    EmbedderUnavailable,
    EmbedInputError,
    TextEmbedder,
    default_embedder,
    embedder_available,
)
from tests.test_sync_processes import RunningNode, cli

REPO = Path(__file__).resolve().parents[1]
# Written once by tests/fixtures/make_minilm_reference.py with sentence-transformers on torch.
REFERENCE = Path(__file__).with_name("fixtures") / "minilm_reference.npz"
needs_extra = pytest.mark.skipif(
    not embedder_available(), reason="embed extra not installed: pip install 'aico-node[embed]'"
)


@pytest.mark.skipif(embedder_available(), reason="embed extra is installed")
def test_without_extra_embed_names_the_install_command() -> None:
    with pytest.raises(EmbedderUnavailable, match=r"pip install 'aico-node\[embed\]'") as caught:
        TextEmbedder().embed(["x"])
    assert "--embedding FILE.npy" in str(caught.value)
    assert caught.value.rpc_error_type == "embedder_unavailable"


def test_import_loads_no_model_library() -> None:
    heavy = ("torch", "sentence_transformers", "tokenizers", "safetensors", "all_minilm_l6_v2")
    probe = f"import sys, node.embed; sys.exit(any(name in sys.modules for name in {heavy!r}))"
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=False).returncode == 0


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        ("one string", "list of strings"),
        (["ok", 3], "text 1 must be a string"),
        (["x"] * 3, "at most 2 texts"),
        (["x" * 11], "at most 10"),
    ],
)
def test_out_of_bounds_input_is_refused_before_loading(texts: object, message: str) -> None:
    embedder = TextEmbedder(texts_max=2, chars_max=10)
    with pytest.raises(EmbedInputError, match=message) as caught:
        embedder.embed(texts)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)
    assert embedder._model is None


@needs_extra
def test_the_extra_brings_no_torch_and_no_cuda() -> None:
    names = {dist.metadata["Name"].lower() for dist in importlib.metadata.distributions()}
    assert not {name for name in names if name == "torch" or name.startswith("nvidia-")}


@needs_extra
def test_vectors_match_sentence_transformers() -> None:
    reference = np.load(REFERENCE)
    sentences = [str(text) for text in reference["sentences"]]
    assert len(sentences) == 30
    vectors = default_embedder().embed(sentences)
    cosines = np.sum(vectors * reference["embeddings"], axis=1)
    worst = int(np.argmin(cosines))
    assert cosines[worst] >= 0.999, f"cosine {cosines[worst]:.6f} for {sentences[worst][:60]!r}"


@needs_extra
def test_a_text_is_read_up_to_256_word_pieces() -> None:
    walk = "I walked up the hill. "  # 6 word pieces
    tail = "My favourite food is spicy Thai curry with rice."
    texts = [walk * 35, walk * 35 + tail, walk * 45, walk * 45 + tail]
    assert default_embedder().word_pieces(texts) == [212, 222, 256, 256]
    within, within_tail, past, past_tail = default_embedder().embed(texts)
    assert float(within @ within_tail) < 0.99  # read (tokenizer.json's own cut at 128 would drop it)
    np.testing.assert_allclose(past, past_tail, atol=1e-6)  # ignored


@needs_extra
def test_vectors_are_unit_float32_of_384_dims() -> None:
    vectors = default_embedder().embed(["I love green tea", "", "x" * 8192])
    assert vectors.shape == (3, EMBEDDING_DIMS)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@needs_extra
def test_no_texts_give_an_empty_matrix() -> None:
    assert default_embedder().embed([]).shape == (0, EMBEDDING_DIMS)


@needs_extra
def test_similar_meaning_is_nearer() -> None:
    query, tea, market = default_embedder().embed(
        ["I love green tea", "Green tea is my favourite drink", "The stock market fell today"]
    )
    assert float(query @ tea) > float(query @ market) + 0.2


@needs_extra
def test_embedding_is_deterministic() -> None:
    texts = ["I love green tea", "The stock market fell today"]
    first = default_embedder().embed(texts)
    np.testing.assert_allclose(default_embedder().embed(texts), first, atol=1e-6)
    # Batched with other texts, a text gets the same vector as on its own.
    np.testing.assert_allclose(default_embedder().embed(texts[:1])[0], first[0], atol=1e-5)


@needs_extra
def test_load_is_once_and_threads_share_it(monkeypatch: pytest.MonkeyPatch) -> None:
    loads = []
    real_load = embed_module._MiniLM.load
    monkeypatch.setattr(embed_module._MiniLM, "load", classmethod(lambda cls: loads.append(1) or real_load()))
    embedder = TextEmbedder()
    texts = [f"thread {i} writes about the weather in spring" for i in range(8)]
    results: dict[int, np.ndarray] = {}

    def work(index: int) -> None:
        embedder.load()
        results[index] = embedder.embed(texts[index : index + 1])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    embedder.load()
    assert len(loads) == 1
    np.testing.assert_allclose(np.stack([results[i] for i in range(len(texts))]), embedder.embed(texts), atol=1e-5)


@needs_extra
def test_a_damaged_model_is_refused_clearly_and_the_background_load_only_logs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    package = tmp_path / "damaged_minilm"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shipped = Path(importlib.util.find_spec(embed_module._MODEL_PACKAGE).origin).with_name("model.zip").read_bytes()
    middle = len(shipped) // 2  # inside the weights, which are most of the zip
    (package / "model.zip").write_bytes(shipped[:middle] + bytes([shipped[middle] ^ 0xFF]) + shipped[middle + 1 :])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(embed_module, "_MODEL_PACKAGE", "damaged_minilm")
    with pytest.raises(EmbedderUnavailable, match="unreadable model .*model.safetensors"):
        TextEmbedder().embed(["x"])
    monkeypatch.setattr(embed_module, "_DEFAULT", TextEmbedder())
    trio.run(embed_module.load_in_background)
    assert "unreadable model" in caplog.text


@needs_extra
def test_a_running_node_finds_memories_by_meaning(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert cli(home, "init").returncode == 0
    node = RunningNode(home)
    try:
        for text in (
            "My sister's birthday is on the fourth of June",
            "I went hiking in the Alps",
            "I prefer tea to coffee in the morning",
            "The car needs new tyres before winter",
            "I am learning to play the violin",
        ):
            node.call("memory.add", text=text)
        done = cli(home, "memory", "search", "a trip to the mountains", "-k", "3")  # through the node's socket
        assert done.returncode == 0, done.stderr
        found = json.loads(done.stdout)
        assert found[0]["text"] == "I went hiking in the Alps", found
        assert found[0]["distance"] < found[1]["distance"] - 0.1
    finally:
        node.stop()
