"""OpenAI-compatible HTTP server (FastAPI + uvicorn, msgspec bodies).

``create_app(client, model_name=...)`` builds the app over any ``EngineClient``;
``serve(engine, ...)`` runs an in-process engine on uvicorn (``prefixcache serve``);
``BackgroundServer`` runs an app in a thread (tests, notebooks).
"""

from server.app import create_app
from server.background import BackgroundServer
from server.launch import serve

__all__ = ["BackgroundServer", "create_app", "serve"]
