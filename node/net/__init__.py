"""The network: the libp2p host, dials and reconnection, the relay path, sessions over streams, the relay's mailbox,
pairing over libp2p and LAN discovery."""
