"""The node's local API: the owner-only RPC socket (server and client) and the handlers behind it."""
