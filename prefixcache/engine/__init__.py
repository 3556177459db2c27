"""The engine: the core that steps requests, its builder, the loop thread, and what a step
runs (scheduler, sequences, model runner, sampler, detokenizer).
"""
