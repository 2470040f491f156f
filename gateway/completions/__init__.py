"""OpenAI's chat completions API: the request (request.py) and its SSE / JSON answers
(encode.py); the route is gateway/routes/openai.py."""
