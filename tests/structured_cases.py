"""Randomized JSON schemas that always terminate: bounded strings, integers and arrays,
enums, nested objects; each with every property required."""

from __future__ import annotations

import random


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema of 1-3 properties whose instances are short."""
    names = rng.sample(["id", "name", "kind", "score", "tags", "ok", "meta", "city"], 3)
    properties = {name: _value(rng, depth) for name in names[: rng.randint(1, 3)]}
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _value(rng: random.Random, depth: int) -> dict:
    kind = rng.choice(
        ["enum", "int", "string", "bool", "array"] + (["object"] if depth < 1 else [])
    )
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "x", "yes", "no"], rng.randint(1, 4))}
    if kind == "int":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 8)}
    if kind == "bool":
        return {"type": "boolean"}
    if kind == "array":
        item = {"type": "integer", "minimum": 0, "maximum": 99}
        return {"type": "array", "items": item, "minItems": 1, "maxItems": rng.randint(1, 3)}
    return random_schema(rng, depth + 1)
