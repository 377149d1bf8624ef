"""Fleet tools: `sidecar join`, `sidecar leave` and `sidecar submit`.

They speak the hub's HTTP API (`hubapi`), the real hub's or the dev hub's
(`sidecar hub`), which answers the same routes with the same shapes.
"""
