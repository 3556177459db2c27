"""OpenAI-compatible HTTP server (FastAPI + uvicorn, msgspec bodies).

``create_app(async_engine, model_name=...)`` builds the app; ``serve(engine, ...)``
runs it on uvicorn (``prefixcache serve``); ``BackgroundServer`` runs an app in a
thread (tests, notebooks).
"""

from server.app import create_app
from server.background import BackgroundServer
from server.launch import serve

__all__ = ["BackgroundServer", "create_app", "serve"]
