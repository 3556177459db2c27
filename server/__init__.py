"""OpenAI-compatible HTTP server (FastAPI + uvicorn, msgspec bodies)."""
