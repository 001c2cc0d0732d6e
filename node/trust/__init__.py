"""Trust: this device's identity and keys, sealing, pairing (sans-I/O) and the group-key rotation rules; no sockets."""
