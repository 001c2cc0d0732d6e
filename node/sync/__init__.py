"""Sync: the sans-I/O session and its wire types, the stream handshake, and the persistence of received ops."""
