"""`status` for people: where each device is, or was last seen."""

from cli.show import status_lines

NOW_S = 1_800_000_000.0
STUDY = "12D3KooWT2RtQE6KtPBVPS6pw9XFFY98as3B5LN61PJaZnknHZL8"
LAPTOP = "12D3KooWRD29sFGzae1CEQYpg2FSF6T2h2jSSiypguMHKheDSVEt"


def _peer(device_id: str, name: str, *, online: bool, last_seen: float | None, addresses: list[str]) -> dict:
    return {"device_id": device_id, "name": name, "online": online, "path": "direct" if online else None,
            "last_sync": last_seen, "last_seen": last_seen, "addresses": addresses, "ops_behind_in": 0,
            "ops_behind_out": 0}  # fmt: skip


def test_status_says_where_each_device_is_or_was_last_seen():
    status = {
        "device_id": "12D3KooWDDMLc1Btj5V2xtPbDpFdhhdwHwb7ErttZEs9cYSrbe6U", "name": "kitchen", "group_epoch": 0,
        "addresses": ["/ip4/10.1.1.1/tcp/4242/p2p/12D3KooWDDMLc1Btj5V2xtPbDpFdhhdwHwb7ErttZEs9cYSrbe6U"],
        "peers": [
            _peer(STUDY, "study", online=True, last_seen=NOW_S - 1, addresses=[f"/ip4/10.1.1.2/tcp/4242/p2p/{STUDY}"]),
            _peer(LAPTOP, "laptop", online=False, last_seen=NOW_S - 7200, addresses=[f"/ip4/10.1.1.3/tcp/4243/p2p/{LAPTOP}"]),
        ],
        "ops": 3, "ops_stored": 3, "engine": "sqlcipher",
    }  # fmt: skip
    lines = "\n".join(status_lines(status, running=True, now_s=NOW_S))
    study = next(line for line in lines.splitlines() if "study" in line)
    laptop = next(line for line in lines.splitlines() if "laptop" in line)
    assert study.rstrip().endswith("at /ip4/10.1.1.2/tcp/4242") and "online" in study
    assert laptop.rstrip().endswith("seen 2 h ago at /ip4/10.1.1.3/tcp/4243") and "offline" in laptop
