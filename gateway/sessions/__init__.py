"""ChatStream sessions: the signed cookie (cookies.py), the generation params (params.py), the
history and its trimming (history.py), the Redis store and the turn lock (store.py), and one
turn's save-release-notify (turn.py)."""
