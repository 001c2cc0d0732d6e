"""The relay server: libp2p circuit relay v2 HOP under resource limits, and the encrypted mailbox."""
