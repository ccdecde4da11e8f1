"""Facts read from an adapter's weights (tensor names and shapes), not from its config.

A safetensors file starts with an 8-byte little-endian header length and a JSON header
{tensor name: {dtype, shape, data_offsets}}, so rank, target modules and dtype come from the
header alone: no torch, and no tensor data read. adapter_config.json is only a claim about
those tensors; `check_against_config` refuses a file whose claim is false (a config saying
r=8 over rank-512 tensors would otherwise pass every rank limit).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

# Same key grammar as the runner's PEFT reader (runner/lora.py).
_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])\.weight")
_MAX_HEADER = 64 << 20  # a header larger than this is not an adapter's


class WeightsError(ValueError):
    """The weights file is unreadable, malformed, or disagrees with its config."""


@dataclass(frozen=True)
class WeightFacts:
    ranks: dict[str, int]
    """Module path (e.g. model.layers.0.self_attn.q_proj) -> its LoRA rank."""
    dtype: str
    """safetensors dtype(s) of the tensors, e.g. "F32" (comma-joined if mixed)."""

    @property
    def rank(self) -> int:
        return max(self.ranks.values())

    @property
    def target_modules(self) -> list[str]:
        """Leaf names of the adapted modules: what must exist in the base model."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.ranks})

    def leaf_ranks(self) -> dict[str, int]:
        """Leaf name -> largest rank among its modules (per-layer ranks may differ via rank_pattern)."""
        out: dict[str, int] = {}
        for module, r in self.ranks.items():
            leaf = module.rsplit(".", 1)[-1]
            out[leaf] = max(out.get(leaf, 0), r)
        return dict(sorted(out.items()))


def _header_size(raw: bytes) -> int:
    if len(raw) != 8:
        raise WeightsError("the weights file is too short to be safetensors")
    (size,) = struct.unpack("<Q", raw)
    if size > _MAX_HEADER:
        raise WeightsError(f"the weights file declares a {size}-byte header: not a safetensors adapter")
    return size


def read_header(source: Path | bytes) -> dict:
    """The JSON header of a safetensors file, given its path or its bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source)
        body = bytes(view[8:8 + _header_size(bytes(view[:8]))])
    else:
        with open(source, "rb") as f:
            body = f.read(_header_size(f.read(8)))
    try:
        header = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise WeightsError(f"the weights file has no valid safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise WeightsError("the weights file has no valid safetensors header")
    header.pop("__metadata__", None)
    return header


def held_bytes(source: Path | bytes, itemsize: int) -> int:
    """Bytes the file's tensors take once converted to a dtype of `itemsize` bytes."""
    return sum(math.prod(t["shape"]) for t in read_header(source).values()) * itemsize


def weight_facts(source: Path | bytes) -> WeightFacts:
    """Per-module rank and dtype of a PEFT LoRA safetensors file (its path, or its bytes: a
    reader that hashed the bytes checks those very bytes); raises WeightsError."""
    shapes: dict[str, dict[str, list[int]]] = {}
    dtypes = set()
    for key, info in read_header(source).items():
        match = _KEY.fullmatch(key)
        if not match:
            raise WeightsError(f"unsupported tensor {key!r} (only LoRA A/B weights of linear layers are served)")
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) for d in shape)):
            raise WeightsError(f"tensor {key!r} is not a matrix (shape {shape})")
        shapes.setdefault(match["module"], {})[match["which"]] = shape
        dtypes.add(str(info.get("dtype")))
    if not shapes:
        raise WeightsError("the weights file holds no LoRA tensors")
    ranks = {}
    for module, ab in sorted(shapes.items()):
        if set(ab) != {"A", "B"}:
            raise WeightsError(f"{module} lacks lora_{'B' if 'A' in ab else 'A'}")
        r_a, r_b = ab["A"][0], ab["B"][1]  # A is [r, in], B is [out, r]
        if r_a != r_b:
            raise WeightsError(f"{module}: lora_A has rank {r_a} but lora_B has rank {r_b}")
        if r_a < 1:
            raise WeightsError(f"{module} has rank 0")
        ranks[module] = r_a
    return WeightFacts(ranks, ",".join(sorted(dtypes)))


def _pattern_match(key: str, module: str) -> bool:
    # PEFT's rule for rank_pattern / alpha_pattern keys: a suffix of the module path at a dot.
    return re.fullmatch(rf"(?:.*\.)?(?:{key})", module) is not None


def _targeted(targets, module: str) -> bool:
    if isinstance(targets, str):  # PEFT reads a string as one regex over the whole module path
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def check_against_config(facts: WeightFacts, config: dict) -> None:
    """Raise WeightsError unless adapter_config.json describes these tensors: its rank `r`
    (or the module's `rank_pattern` entry) for every module, and `target_modules` naming
    exactly the adapted modules."""
    try:
        _check(facts, config)
    except re.error as exc:
        raise WeightsError(f"adapter_config.json has an invalid pattern: {exc}") from exc


def _check(facts: WeightFacts, config: dict) -> None:
    problems = []
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"config r is {r!r}, not a positive integer")
    patterns = config.get("rank_pattern") or {}
    for module, actual in facts.ranks.items():
        claimed = next((v for k, v in patterns.items() if _pattern_match(k, module)), r)
        if claimed != actual:
            problems.append(f"{module} has rank {actual} in the tensors but {claimed!r} in the config")
            break  # one example is enough; the rest usually repeat it
    targets = config.get("target_modules")
    if not targets:
        problems.append("config lists no target_modules")
    else:
        stray = sorted({m for m in facts.ranks if not _targeted(targets, m)})
        if stray:
            problems.append(f"tensors adapt {stray[0]}, which config target_modules {targets!r} does not name")
        if isinstance(targets, list):
            unused = [t for t in targets if not any(_targeted([t], m) for m in facts.ranks)]
            if unused:
                problems.append(f"config target_modules {unused} have no tensors")
    if problems:
        raise WeightsError("weights disagree with adapter_config.json: " + "; ".join(problems))

