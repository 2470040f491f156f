"""ChatStream 0.3.0's HTTP API, wire-compatible: `ChatStreamAPI` (api.py) answers every endpoint
under ChatStream's method names; the routes (gateway/routes/chatstream.py) serve it for the
gateway app, and `ChatStreamCluster` (gateway/library.py) for a user's own app."""
