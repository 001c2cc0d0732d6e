"""The sync node: sessions, wire types, and (later) identity, peers, pairing, bus and CLI."""
