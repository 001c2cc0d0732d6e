"""Posting to a relay's mailbox that has no room: real relay, real node stores, a controlled clock."""

import pytest

from node.app import Node
from node.home import init_home
from node.net.host import p2p_host
from node.net.mailbox import POST_PAUSE_S, MailboxSync
from node.net.relays import RelayChoice
from node.sync.receiver import Notifier
from relay.mailbox_keys import BUCKET_S
from stores.datalayer import StoreConfig
from tests.relay.test_mailbox_service import LOOPBACK, relay

pytestmark = pytest.mark.trio
PASSPHRASE = "mailbox sync test"
DAY = 19_675


async def _apply_nothing(ops):
    return []


@pytest.mark.parametrize(
    ("limits", "reason", "paused_for_s"),
    [
        ({"mailbox_items_max": 1}, "quota_exceeded", (DAY + 1) * BUCKET_S - (DAY * BUCKET_S + 100)),
        ({"total_bytes_max": 300_000}, "store_full", POST_PAUSE_S),
    ],
)
async def test_a_post_refused_for_want_of_space_pauses_posting_then_resumes(tmp_path, limits, reason, paused_for_s):
    now_s = [DAY * BUCKET_S + 100.0]
    await init_home(tmp_path / "a", PASSPHRASE, StoreConfig(embedding_dims=8), "a")
    async with relay(tmp_path / "relay", **limits) as address, Node.opened(tmp_path / "a", PASSPHRASE, "test") as node:
        async with node.unit_of_work() as uow:
            for i in range(3999):  # with the enrolment, two full batches of 2000 ops (about 280 KB sealed each)
                uow.conversations.add_message("c", f"message {i}")
            await uow.commit()
        async with p2p_host(node.identity, [LOOPBACK]) as host:
            mailbox = MailboxSync(
                node.data, node.identity, node.keyring, host, RelayChoice([address]),
                apply_ops=_apply_nothing, verify_key_of=lambda device: None, outgoing=Notifier(),
                now_s=lambda: now_s[0],
            )  # fmt: skip
            health = mailbox.health
            await mailbox.post_round()
            assert health.posted_seq == 2000 and reason in health.last_error
            assert health.posts_paused_until == now_s[0] + paused_for_s
            health.last_error = None
            now_s[0] += paused_for_s - 1
            await mailbox.post_round()  # paused: the relay is not asked again
            assert health.last_error is None and health.posted_seq == 2000
            if reason == "store_full":
                return  # the relay frees space only as items expire
            now_s[0] += 1  # the next day's mailbox
            await mailbox.post_round()
            assert health.posted_seq == 4000 and health.posts_paused_until is None and health.last_error is None
