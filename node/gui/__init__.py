"""The node's local web page: devices, sync state, conflicts and pairing, served on loopback from the node's loop.

The page depends on the node only through `NodeView` (node/gui/live.py): its RPC handlers and its bus.
"""
