"""Errors an engine reports to whoever serves it."""


class EngineDeadError(RuntimeError):
    """The engine's loop stopped (an error, or a shutdown); no further requests are served."""


class KVCacheExhaustedError(ValueError):
    """A request needs more KV cache than the pool can ever free for it.

    Pins hold their blocks until unpinned, so a request that needs more than the pool
    minus the pinned blocks it does not share could never run. It is refused at once
    instead of waiting (and holding up others) for room that will not come.
    """

    def __init__(self, needed_tokens: int, usable_tokens: int, pool_tokens: int) -> None:
        super().__init__(
            f"the request needs KV cache for {needed_tokens} tokens (prompt plus max_tokens), "
            f"but at most {usable_tokens} of the {pool_tokens}-token KV cache can be free for "
            f"it while the current pins are held; shorten the prompt or max_tokens, or retry "
            f"once pins are released"
        )
        self.needed_tokens = needed_tokens
        self.usable_tokens = usable_tokens
        self.pool_tokens = pool_tokens


class RequestFailedError(RuntimeError):
    """The engine failed this request (an error while stepping it, or preempted too
    often to make progress); the engine itself goes on serving others."""


class KVCacheBusyError(RequestFailedError):
    """A request was preempted for lack of KV blocks too many times to go on."""

    def __init__(self, num_preemptions: int) -> None:
        super().__init__(
            f"the request was preempted {num_preemptions} times for lack of free KV cache "
            f"blocks without finishing; the KV cache is too busy, retry later"
        )
        self.num_preemptions = num_preemptions


class ReplicaLostError(RequestFailedError):
    """The replica running this request went away (its process died or its engine
    stopped) after it had started answering; other replicas go on serving."""

    def __init__(self, replica: str, cause: str) -> None:
        super().__init__(
            f"the replica running this request ({replica}) was lost: {cause}; "
            f"retry the request, another replica will serve it"
        )
        self.replica = replica
