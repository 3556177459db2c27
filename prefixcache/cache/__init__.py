"""Device KV memory and the prefix cache over it: the paged pools, the block pool, the
radix tree, pins, and the block manager that hands blocks to sequences.
"""
