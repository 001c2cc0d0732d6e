"""The home at rest, through the real CLI: nothing the user wrote is readable in any file, damage to any derived store
is mended from the primary store without a crash or a wrong answer, and rebuilds keep the home's size."""

import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from node.api.rpc import RpcClient
from tests.test_node_process import DIMS, cli, start_node

# What the user writes: each must be absent from every file under the home.
TEXTS = {
    "preference key": "zq-pref-key-allergy-7741",
    "preference value": "zq-pref-value-penicillin-7741",
    "conversation": "zq-conversation-with-dr-moreau",
    "message": "zq-message-my-sister-lives-in-lyon",
    "memory": "zq-memory-panic-attacks-on-trains",
    "metadata key": "zq_health_condition",
    "metadata value": "zq-metadata-value-type-1-diabetes",
    "note name": "zq-note-name-partner",
    "note text": "zq-note-text-sam-hates-cilantro",
    "session key": "zq-session-key-active-topic",
    "session value": "zq-session-value-divorce-papers",
}


def distinctive_vector() -> np.ndarray:
    return np.random.default_rng(4711).standard_normal(DIMS).astype("<f4")


def windows(vector: np.ndarray, width: int = 16) -> list[bytes]:
    """Every 16-byte run of a vector's float32 bytes (4 floats), at float boundaries."""
    raw = vector.astype("<f4").tobytes()
    return [raw[i : i + width] for i in range(0, len(raw) - width + 1, 4)]


def readable_in(home: Path) -> list[str]:
    """What of the user's writing can be read in the home's files."""
    vector = distinctive_vector()
    needles = {name: text.encode() for name, text in TEXTS.items()}
    needles |= {f"vector float32 bytes {i}": run for i, run in enumerate(windows(vector))}
    needles |= {f"unit vector float32 bytes {i}": run for i, run in enumerate(windows(vector / np.linalg.norm(vector)))}
    found = []
    for path in home.rglob("*"):
        if path.is_file() and not path.is_socket():
            data = path.read_bytes()
            found += [f"{name} in {path.relative_to(home)}" for name, needle in needles.items() if needle in data]
    return found


def home_bytes(home: Path) -> int:
    return sum(path.stat().st_size for path in home.rglob("*") if path.is_file())


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_nothing_the_user_wrote_is_readable_in_the_home_and_rebuilds_keep_its_size(tmp_path):
    home = tmp_path / "home"
    ok(cli(home, "init"))
    np.save(tmp_path / "vector.npy", distinctive_vector())
    node = start_node(home)
    try:
        # Through the CLI, served by the running node (which builds its vector index meanwhile).
        ok(cli(home, "pref", "set", TEXTS["preference key"], TEXTS["preference value"], passphrase=None))
        ok(cli(home, "msg", "add", TEXTS["conversation"], TEXTS["message"], passphrase=None))
        metadata = json.dumps({TEXTS["metadata key"]: TEXTS["metadata value"]})
        embedding = str(tmp_path / "vector.npy")
        adding = ("memory", "add", TEXTS["memory"], "--embedding", embedding, "--metadata", metadata)
        memory = ok(cli(home, *adding, passphrase=None))
        ok(cli(home, "note", "edit", TEXTS["note name"], TEXTS["note text"], passphrase=None))
        with RpcClient.connect(home / "node.sock") as client:  # session context has no command of its own
            client.call("session.set", key=TEXTS["session key"], value=TEXTS["session value"])
            assert client.call("status")["stores"]["vector_items"] == 1
        assert readable_in(home) == []  # while it runs: write-ahead logs included
    finally:
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=30) == 0
    where = json.dumps({TEXTS["metadata key"]: TEXTS["metadata value"]})
    found = json.loads(ok(cli(home, "memory", "search", "--embedding", embedding, "--where", where)))
    assert [m["id"] for m in found] == [json.loads(memory)["id"]] and found[0]["metadata"] == json.loads(metadata)
    size = home_bytes(home)
    sizes = []
    for _ in range(5):
        assert json.loads(ok(cli(home, "rebuild"))) == {"analytics": 1, "vectors": 1, "cache": 1}
        sizes.append(home_bytes(home))
    assert all(abs(after - size) <= 0.2 * size for after in sizes), (size, sizes)
    assert readable_in(home) == []


def flipped(home: Path, copy: Path, file: Path) -> None:
    """Copy the home, flipping one byte in the middle of `file` in the copy."""
    shutil.copytree(home, copy)
    target = copy / file.relative_to(home)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))


def legacy_vectors(home: Path) -> Path:
    """Give the home the Chroma folder an older node kept, written by the real Chroma; return its HNSW header."""
    script = (
        "import sys, numpy, chromadb; from chromadb.config import Settings;"
        "client = chromadb.PersistentClient(sys.argv[1], settings=Settings(anonymized_telemetry=False));"
        "collection = client.create_collection('memories', embedding_function=None);"
        f"collection.add(ids=[str(i) for i in range(200)], embeddings=numpy.ones((200, {DIMS}), 'float32'))"
    )
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    subprocess.run([sys.executable, "-c", script, str(home / "vectors")], check=True, timeout=120, env=env)
    (header,) = (home / "vectors").rglob("header.bin")
    return header


def test_a_byte_flipped_in_any_derived_store_file_is_mended_and_never_answers_wrong(tmp_path):
    home = tmp_path / "home"
    ok(cli(home, "init"))
    rng = np.random.default_rng(5)
    query = tmp_path / "query.npy"
    np.save(query, rng.standard_normal(DIMS).astype("<f4"))
    node = start_node(home)
    with RpcClient.connect(home / "node.sock") as client:
        for i in range(3):
            embedding = rng.standard_normal(DIMS).tolist()
            client.call("memory.add", text=f"memory {i}", embedding=embedding, metadata={"i": i})
        client.call("pref.set", key="theme", value="dark")
        client.call("session.set", key="topic", value="tea")
    node.send_signal(signal.SIGKILL)  # so the cache's write-ahead log is left holding entries
    node.wait(timeout=30)
    (home / "node.sock").unlink()  # left behind by the kill
    derived = [path for path in sorted((home / "cache").iterdir()) if path.stat().st_size > 0]
    assert {"CURRENT", "MANIFEST", "OPTIONS"} <= {path.name.split("-")[0] for path in derived}
    assert {".sst", ".log"} <= {path.suffix for path in derived}
    shutil.copytree(home, tmp_path / "intact")  # searched on a copy: opening the cache flushes its log
    expected = ok(cli(tmp_path / "intact", "memory", "search", "--embedding", str(query)))
    assert len(json.loads(expected)) == 3
    damaged = [(path, None) for path in derived]
    damaged.append((None, "legacy"))

    def check(case: tuple[Path | None, str | None]) -> str:
        path, legacy = case
        copy = tmp_path / f"copy-{path.name if path else legacy}"
        if path is None:
            shutil.copytree(home, copy)
            header = legacy_vectors(copy)
            flipped_header = bytearray(header.read_bytes())
            flipped_header[len(flipped_header) // 2] ^= 0xFF
            header.write_bytes(bytes(flipped_header))
        else:
            flipped(home, copy, path)
        search = cli(copy, "memory", "search", "--embedding", str(query))
        assert search.returncode >= 0, f"{case}: killed by signal {-search.returncode}"
        if search.returncode != 0:
            lines = search.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:"), f"{case}: {search.stderr}"
            rebuilt = cli(copy, "rebuild")
            assert rebuilt.returncode == 0, f"{case}: {rebuilt.stderr}"
            search = cli(copy, "memory", "search", "--embedding", str(query))
        assert search.returncode == 0, f"{case}: {search.stderr}"
        assert search.stdout == expected, f"{case} answered wrong"
        assert len(search.stderr.strip().splitlines()) <= 1, f"{case}: {search.stderr}"
        assert not (copy / "vectors").exists()
        return "rebuilt" if "made anew" in search.stderr else "answered"

    with ThreadPoolExecutor(max_workers=3) as pool:
        outcomes = list(pool.map(check, damaged))
    assert "rebuilt" in outcomes  # damage was found and mended, not just never read
