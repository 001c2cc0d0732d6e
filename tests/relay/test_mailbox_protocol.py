"""The mailbox protocol alone: keys, challenge and signatures, refusals, and strict decoding of bad frames."""

import os
import random

import msgpack
import pytest

from framing import LocalProtocolError, RemoteProtocolError
from relay.errors import MailboxReason
from relay.mailbox_keys import (
    BUCKET_S,
    DRAIN_BUCKETS_MAX,
    MailboxKeys,
    current_mailbox,
    mailbox_id_of,
    mailbox_keys,
    mailboxes_to_drain,
)
from relay.mailbox_protocol import (
    BLOB_BYTES_MAX,
    REQUEST_FRAME_BYTES_MAX,
    REQUESTS_IN_FLIGHT_MAX,
    FetchRequested,
    ItemsFetched,
    MailboxClientProtocol,
    MailboxItem,
    MailboxServerProtocol,
    ProtocolState,
    Put,
    PutAccepted,
    PutRequested,
    Ready,
    RequestRefused,
    SessionEnded,
    signed_message,
    to_wire,
)

SECRET = bytes(range(32))
NOW_S = 1_700_000_000.0


def keys(secret: bytes = SECRET, bucket: int = 19_675) -> MailboxKeys:
    return mailbox_keys(secret, 0, bucket)


def connected(**server_bounds: int) -> tuple[MailboxClientProtocol, MailboxServerProtocol]:
    """A client that has read the server's CHALLENGE."""
    client, server = MailboxClientProtocol(), MailboxServerProtocol(os.urandom(32), **server_bounds)
    assert isinstance(client.receive_data(server.generate())[0], Ready)
    return client, server


def deliver(source: MailboxClientProtocol | MailboxServerProtocol) -> bytes:
    data = b""
    while (frame := source.generate()) is not None:
        data += frame
    return data


def raw(body: list) -> bytes:
    encoded = msgpack.packb(body, use_bin_type=True)
    return len(encoded).to_bytes(4, "big") + encoded


# -- keys -------------------------------------------------------------------------------------------------


def test_keys_are_deterministic_and_differ_by_secret_epoch_and_bucket():
    assert keys() == keys()
    ids = {keys().mailbox_id, keys(bytes(32)).mailbox_id, keys(bucket=19_676).mailbox_id,
           mailbox_keys(SECRET, 1, 19_675).mailbox_id}
    assert len(ids) == 4
    assert keys().mailbox_id == mailbox_id_of(keys().verify_key)
    assert len(keys().mailbox_id) == 16
    assert SECRET.hex() not in repr(keys()) and keys().seed.hex() not in repr(keys())


def test_current_mailbox_rotates_daily():
    assert current_mailbox(SECRET, 0, NOW_S) == current_mailbox(SECRET, 0, NOW_S - NOW_S % BUCKET_S)
    assert current_mailbox(SECRET, 0, NOW_S) != current_mailbox(SECRET, 0, NOW_S + BUCKET_S)


def test_drain_list_covers_since_to_now_with_skew_and_is_bounded():
    drained = mailboxes_to_drain(SECRET, 0, NOW_S - 2 * BUCKET_S, NOW_S)
    buckets = [k.bucket for k in drained]
    current = int(NOW_S // BUCKET_S)
    assert buckets == list(range(current - 3, current + 2))
    assert len(mailboxes_to_drain(SECRET, 0, 0.0, NOW_S)) == DRAIN_BUCKETS_MAX + 1


@pytest.mark.parametrize("secret, epoch, bucket", [(b"short", 0, 1), (SECRET, -1, 1), (SECRET, 0, 1 << 64)])
def test_bad_key_inputs_are_refused(secret, epoch, bucket):
    with pytest.raises(LocalProtocolError):
        mailbox_keys(secret, epoch, bucket)


# -- exchange ---------------------------------------------------------------------------------------------


def test_put_and_fetch_round_trip():
    client, server = connected()
    client.put(keys(), b"sealed-1")
    client.fetch(keys(), after_cursor=0, limit=10)
    events = server.receive_data(deliver(client))
    assert events == [PutRequested(keys().mailbox_id, b"sealed-1"), FetchRequested(keys().mailbox_id, 0, 10)]
    server.accept_put(7)
    server.send_items([MailboxItem(7, b"sealed-1")], more=False)
    assert client.receive_data(deliver(server)) == [PutAccepted(7), ItemsFetched((MailboxItem(7, b"sealed-1"),), False)]
    assert client.in_flight == 0


def test_answers_leave_in_request_order_even_when_a_later_one_is_refused_first():
    client, server = connected()
    client.put(keys(), b"ok")
    client.put(keys(), b"x" * 10)
    events = server.receive_data(deliver(client))
    assert isinstance(events[0], PutRequested)
    assert server.generate() is None  # the first request has no answer yet, so the second waits
    server.refuse(MailboxReason.QUOTA_EXCEEDED, "full")
    server.accept_put(3)
    replies = client.receive_data(deliver(server))
    assert replies[0] == RequestRefused(MailboxReason.QUOTA_EXCEEDED, "full")
    assert replies[1] == PutAccepted(3)


def _tampered_puts() -> dict[str, Put]:
    own, stranger = keys(), keys(os.urandom(32))
    unsigned = Put(own.mailbox_id, own.verify_key, b"b", b"")
    return {
        "wrong key for the id": Put(own.mailbox_id, stranger.verify_key, b"b", stranger.sign(b"anything")),
        "bad signature": Put(own.mailbox_id, own.verify_key, b"b", bytes(64)),
        "signature over another nonce": Put(
            own.mailbox_id, own.verify_key, b"b", own.sign(signed_message(bytes(32), 0, unsigned))
        ),
    }


@pytest.mark.parametrize("case", sorted(_tampered_puts()))
def test_unauthorised_request_is_refused_and_the_session_goes_on(case):
    client, server = connected()
    events = server.receive_data(to_wire(_tampered_puts()[case]))
    assert events == [RequestRefused(MailboxReason.UNAUTHORISED, "mailbox id, key or signature does not match")]
    assert server.state is ProtocolState.SERVING
    # The tampered request used request number 0; an honest client continues at number 1.
    client._requests_sent = 1
    client._outstanding.append(_tampered_puts()[case])
    client.put(keys(), b"honest")
    assert server.receive_data(deliver(client)) == [PutRequested(keys().mailbox_id, b"honest")]


def test_replayed_request_is_refused():
    client, server = connected()
    client.put(keys(), b"once")
    frame = deliver(client)
    assert isinstance(server.receive_data(frame)[0], PutRequested)
    assert isinstance(server.receive_data(frame)[0], RequestRefused)


def test_blob_over_the_bound_is_refused_but_a_frame_over_the_bound_ends_the_session():
    client, server = connected(blob_bytes_max=1000)
    k = keys()
    put = Put(k.mailbox_id, k.verify_key, b"x" * 1001, b"")
    put = Put(k.mailbox_id, k.verify_key, put.blob, k.sign(signed_message(server._nonce, 0, put)))
    assert server.receive_data(to_wire(put))[0].reason is MailboxReason.BLOB_TOO_LARGE
    assert server.state is ProtocolState.SERVING
    assert server.generate() is not None  # the REFUSED, for a request this client object did not send
    with pytest.raises(LocalProtocolError):
        client.put(k, b"x" * 1001)  # the client knows the bound from the CHALLENGE
    with pytest.raises(RemoteProtocolError) as error:
        server.receive_data((REQUEST_FRAME_BYTES_MAX + 1).to_bytes(4, "big"))
    assert error.value.reason is MailboxReason.FRAME_TOO_LARGE
    assert server.state is ProtocolState.CLOSED
    ended = client.receive_data(deliver(server))
    assert ended[-1] == SessionEnded(MailboxReason.FRAME_TOO_LARGE, error.value.detail)


@pytest.mark.parametrize(
    "body",
    [
        [1, b"short", bytes(32), b"blob", bytes(64)],  # mailbox id of the wrong length
        [2, bytes(16), bytes(32), -1, 10, bytes(64)],  # negative cursor
        [2, bytes(16), bytes(32), 0, 0, bytes(64)],  # zero limit
        [2, bytes(16), bytes(32), 0, 100_000, bytes(64)],  # limit over the bound
        [3, 5],  # a reply sent by a client
        [9, 1, 2],  # unknown type
        {"a": 1},  # not a list
    ],
)
def test_malformed_request_ends_the_session(body):
    _, server = connected()
    with pytest.raises(RemoteProtocolError):
        server.receive_data(raw(body))
    assert server.state is ProtocolState.CLOSED
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")


def test_too_many_requests_in_flight_or_in_a_session_end_it():
    client, server = connected(requests_max=REQUESTS_IN_FLIGHT_MAX + 2)
    for _ in range(REQUESTS_IN_FLIGHT_MAX):
        client.put(keys(), b"b")
    with pytest.raises(LocalProtocolError):
        client.put(keys(), b"b")
    server.receive_data(deliver(client))
    k = keys()
    extra = Put(k.mailbox_id, k.verify_key, b"b", bytes(64))
    with pytest.raises(RemoteProtocolError) as error:
        server.receive_data(to_wire(extra))
    assert error.value.reason is MailboxReason.TOO_MANY_REQUESTS
    client, server = connected(requests_max=1)
    client.put(keys(), b"b")
    assert client.requests_left == 0
    with pytest.raises(LocalProtocolError):
        client.fetch(keys(), 0)


def test_truncated_frame_waits_for_the_rest():
    client, server = connected()
    client.put(keys(), b"split")
    frame = deliver(client)
    assert server.receive_data(frame[:7]) == []
    assert server.receive_data(frame[7:]) == [PutRequested(keys().mailbox_id, b"split")]


def test_client_refuses_replies_that_answer_nothing_or_the_wrong_request():
    client, server = connected()
    with pytest.raises(RemoteProtocolError):
        client.receive_data(raw([3, 1]))
    client, _ = connected()
    client.fetch(keys(), 5)
    with pytest.raises(RemoteProtocolError):
        client.receive_data(raw([3, 1]))  # PUT_OK for a FETCH
    client, _ = connected()
    client.fetch(keys(), 5, limit=2)
    with pytest.raises(RemoteProtocolError):
        client.receive_data(raw([4, [[5, b"not after the cursor"]], False]))


def test_client_requires_the_challenge_first():
    client = MailboxClientProtocol()
    with pytest.raises(LocalProtocolError):
        client.put(keys(), b"b")
    with pytest.raises(RemoteProtocolError):
        client.receive_data(raw([3, 1]))
    with pytest.raises(RemoteProtocolError) as error:
        MailboxClientProtocol().receive_data(raw([0, 2, bytes(32), 10, 10]))
    assert error.value.reason is MailboxReason.PROTOCOL_MISMATCH


def test_fuzzed_bytes_only_ever_raise_remote_protocol_error():
    rng = random.Random(os.environ.get("FUZZ_SEED", 1))
    valid = raw([1, bytes(16), bytes(32), b"blob", bytes(64)]) + raw([2, bytes(16), bytes(32), 0, 5, bytes(64)])
    for _ in range(3000):
        if rng.random() < 0.5:
            data = rng.randbytes(rng.randrange(1, 200))
        else:
            mutated = bytearray(valid)
            for _ in range(rng.randrange(1, 6)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            data = bytes(mutated)
        for side in (MailboxServerProtocol(os.urandom(32)), connected()[0]):
            try:
                side.receive_data(data)
            except RemoteProtocolError:
                pass
    assert BLOB_BYTES_MAX == 1 << 20


def test_relay_imports_nothing_of_the_node():
    import ast
    from pathlib import Path

    import relay

    for path in Path(relay.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        modules |= {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
        assert not {m for m in modules if m.split(".")[0] in {"node", "stores", "discovery", "simulations"}}, path
