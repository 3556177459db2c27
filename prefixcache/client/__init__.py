"""The seam between fronts and engines: ``EngineClient`` and the types it speaks.

The HTTP server imports only this package and ``prefixcache`` itself; everything it
needs of an engine (limits, input processing, generation, cache control, and the
Responses API's renderer and store, structured-output constraints and tool-call
parsers) is named here.
"""

from chunking.bounded import PromptTooLong
from prefixcache.apps.conversations import (
    ConversationRenderer,
    Turn,
    new_response_id,
    stored_response,
)
from prefixcache.apps.response_store import ResponseNotStored, ResponseStore, StoredResponse
from prefixcache.cache.events import ChunkEvent
from prefixcache.cache.pins import PinHandle
from prefixcache.cache.tenants import TENANT_SEPARATOR, salt_tenant
from prefixcache.client.in_process import InProcessEngineClient
from prefixcache.client.process import ProcessEngineClient
from prefixcache.client.protocol import EngineClient, PrewarmResult
from prefixcache.engine.errors import (
    EngineDeadError,
    KVCacheBusyError,
    KVCacheExhaustedError,
    ReplicaLostError,
    RequestFailedError,
)
from prefixcache.engine.stats import DeviceBlocks, EngineStats, PinStats
from prefixcache.inputs.limits import EngineLimits
from prefixcache.inputs.processor import InputProcessor
from prefixcache.outputs import RequestDelta, RequestOutput, RequestTimings
from prefixcache.sampling_params import SamplingParams
from prefixcache.structured import GrammarError, StructuredOutput
from prefixcache.tiers.stats import TierStats
from prefixcache.tools import CallEvent, ContentEvent, ParsedReply, ToolCall, ToolCallParser

__all__ = [
    "TENANT_SEPARATOR",
    "CallEvent",
    "ChunkEvent",
    "ContentEvent",
    "GrammarError",
    "ParsedReply",
    "StructuredOutput",
    "ToolCall",
    "ToolCallParser",
    "ConversationRenderer",
    "DeviceBlocks",
    "EngineClient",
    "EngineDeadError",
    "EngineLimits",
    "EngineStats",
    "InProcessEngineClient",
    "InputProcessor",
    "KVCacheBusyError",
    "KVCacheExhaustedError",
    "PinHandle",
    "PinStats",
    "PrewarmResult",
    "ProcessEngineClient",
    "PromptTooLong",
    "ReplicaLostError",
    "RequestDelta",
    "RequestFailedError",
    "RequestOutput",
    "RequestTimings",
    "ResponseNotStored",
    "ResponseStore",
    "SamplingParams",
    "StoredResponse",
    "TierStats",
    "Turn",
    "new_response_id",
    "salt_tenant",
    "stored_response",
]
