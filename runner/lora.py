"""Serving-time LoRA for mixed-adapter batches (BGMV-style).

Every linear layer of the base model is wrapped once at start-up. A batch's rows each name an
adapter (or none); when the batch's rows change, each wrapper gathers its rows' weights into

    a_t   [B, in, r]    A^T of each row's adapter, zero-padded to the batch's largest rank
    b_t   [B, r, out]   B^T likewise
    scale [B, 1, 1]     lora_alpha / r (or / sqrt(r) for rsLoRA); 0 for rows without one

and every forward adds `scale * (x @ a_t) @ b_t` with two batched matmuls, so a batch of
many adapters costs about what a batch of one does (peft instead loops over the adapters in
the batch). Weights are read from ordinary PEFT files; features this does not implement
(DoRA, embedding LoRA, modules_to_save, fan_in_fan_out, biases) are refused, never ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


class UnsupportedAdapter(ValueError):
    pass


@dataclass
class LoraWeights:
    """One adapter: module path -> (A^T [in, r], B^T [r, out], scale)."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b, _ in self.modules.values())

    def to(self, device: torch.device, dtype: torch.dtype, pin: bool = False) -> LoraWeights:
        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device=device, dtype=dtype, copy=True)
            return t.pin_memory() if pin else t
        return LoraWeights({k: (move(a), move(b), s) for k, (a, b, s) in self.modules.items()})


def parse_peft(config: dict, tensors: dict[str, torch.Tensor]) -> LoraWeights:
    """PEFT's adapter_config.json + adapter_model.safetensors -> LoraWeights (on CPU)."""
    for flag, why in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out layers")):
        if config.get(flag):
            raise UnsupportedAdapter(f"{why} is not supported")
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapter(f"peft_type {config.get('peft_type')} is not LoRA")
    if config.get("modules_to_save"):
        raise UnsupportedAdapter("modules_to_save (fully trained extra modules) is not supported")
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapter("LoRA biases are not supported")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if not match:
            raise UnsupportedAdapter(f"unsupported tensor {key!r}")
        parts.setdefault(match["module"], {})[match["which"]] = tensor
    alpha, patterns = float(config.get("lora_alpha", 8)), config.get("alpha_pattern") or {}
    modules = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise UnsupportedAdapter(f"{module} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]  # [r, in], [out, r]
        r = a.shape[0]
        if b.shape[1] != r:
            raise UnsupportedAdapter(f"{module}: lora_A and lora_B ranks differ")
        module_alpha = next((float(v) for k, v in patterns.items() if module == k or module.endswith("." + k)),
                            alpha)
        scale = module_alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        modules[module] = (a.t().contiguous(), b.t().contiguous(), scale)
    return LoraWeights(modules)


class LoRALinear(nn.Module):
    """A base linear layer (plain, or bitsandbytes-quantized) plus the current batch's LoRA rows."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.rows is None:
            return y
        a_t, b_t, scale = self.rows
        return y + (torch.bmm(torch.bmm(x.to(a_t.dtype), a_t), b_t) * scale).to(y.dtype)

    def gather(self, entries: list[tuple[torch.Tensor, torch.Tensor, float] | None], device, dtype) -> None:
        """Set this layer's rows from each row's (A^T, B^T, scale), or None for no adapter."""
        present = [e for e in entries if e is not None]
        if not present:
            self.rows = None
            return
        r = max(e[0].shape[1] for e in present)
        n = len(entries)
        a_t = torch.zeros(n, self.in_features, r, device=device, dtype=dtype)
        b_t = torch.zeros(n, r, self.out_features, device=device, dtype=dtype)
        scale = torch.zeros(n, 1, 1, device=device, dtype=dtype)
        for i, e in enumerate(entries):
            if e is not None:
                a, b, s = e
                a_t[i, :, :a.shape[1]] = a
                b_t[i, :b.shape[0], :] = b
                scale[i] = s
        self.rows = (a_t, b_t, scale)


def wrap_linear_layers(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, LoRALinear]:
    """Wrap every nn.Linear (bitsandbytes layers subclass it) except `skip`; returns them by module path."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in skip]
    wrapped = {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(module)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped
