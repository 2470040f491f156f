"""ChatStream 0.3.0's HTTP API, wire-compatible: `ChatStreamAPI` (api.py) answers every endpoint
under ChatStream's method names; the routes (gateway/routes/chatstream.py) serve it for the
gateway app, and `ChatStreamCluster` (gateway/library.py) for a user's own app. Around it:
client roles (roles.py: the definitions; access.py: the check per request), the session object
of callbacks (session_view.py), custom request handlers (handlers.py) and ChatStream's
constructor arguments (constructor.py)."""
