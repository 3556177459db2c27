"""Everything behind the device pool: the ``KVTier`` protocol, its host-memory and disk
implementations, and the tiered cache that moves chunks between them.
"""
