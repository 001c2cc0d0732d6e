"""The optional text embedder: its install hint without the extra, real MiniLM vectors with it."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from node.embed import (
    EMBEDDING_DIMS,
    EmbedderUnavailable,
    EmbedInputError,
    TextEmbedder,
    default_embedder,
    embedder_available,
)

REPO = Path(__file__).resolve().parents[1]
needs_extra = pytest.mark.skipif(
    not embedder_available(), reason="embed extra not installed: pip install 'aico-node[embed]'"
)


@pytest.mark.skipif(embedder_available(), reason="embed extra is installed")
def test_without_extra_embed_names_the_install_command() -> None:
    with pytest.raises(EmbedderUnavailable, match=r"pip install 'aico-node\[embed\]'") as caught:
        TextEmbedder().embed(["x"])
    assert "--embedding FILE.npy" in str(caught.value)
    assert caught.value.rpc_error_type == "embedder_unavailable"


def test_import_does_not_import_torch() -> None:
    probe = "import sys, node.embed; sys.exit('torch' in sys.modules or 'sentence_transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO).returncode == 0


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
