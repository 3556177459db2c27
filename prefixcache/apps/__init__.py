"""Applications built on the engine: the RAG pipeline and server-kept conversations
(OpenAI's Responses API).
"""
