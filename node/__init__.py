"""The sync node of one device: node.trust (identity, keys, sealing, pairing, key rotation), node.sync (the sans-I/O
session and the persistence of what it receives), node.net (everything that holds a socket: libp2p host, dials, relay
path, mailbox, pairing and LAN discovery), node.api (the local RPC socket and its handlers), node.app (wiring them)."""
