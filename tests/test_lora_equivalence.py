"""The serving LoRA path (runner/lora.py) against peft's reference forward, on mixed-adapter batches."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from loraserve.runner.lora import RowSlots, UnsupportedAdapter, parse_peft, wrap_linear_layers

RANKS = {"r4": 4, "r8": 8, "r16": 16, "r64": 64}
TARGETS = {"r4": ["q_proj", "v_proj"], "r8": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "r16": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], "r64": ["o_proj", "gate_proj", "up_proj"]}


@pytest.fixture(scope="module")
def adapters(demo_dir, tmp_path_factory):
    """Random (non-zero) LoRA adapters of mixed ranks, targets and scalings, saved by peft."""
    out = tmp_path_factory.mktemp("ranks")
    torch.manual_seed(0)
    for name, r in RANKS.items():
        base = AutoModelForCausalLM.from_pretrained(demo_dir / "base")
        config = LoraConfig(r=r, lora_alpha=2 * r + 3, target_modules=TARGETS[name], init_lora_weights=False,
                            use_rslora=name == "r16")
        model = get_peft_model(base, config, adapter_name=name)
        model.save_pretrained(out, selected_adapters=[name])
    return out


def load_base(demo_dir, quantized: bool):
    kwargs = {}
    if quantized:
        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_compute_dtype=torch.float32),
                  "device_map": {"": "cpu"}}
    return AutoModelForCausalLM.from_pretrained(demo_dir / "base", dtype=torch.float32, **kwargs).eval()


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
def test_mixed_batch_logits_match_peft(demo_dir, adapters, quantized):
    rows = ["r4", "__base__", "r64", "r8", "r16", "r4", "r64", "__base__"]
    torch.manual_seed(1)
    ids = torch.randint(5, 500, (len(rows), 12))

    reference = PeftModel.from_pretrained(load_base(demo_dir, quantized), adapters / "r4", adapter_name="r4")
    for name in RANKS:
        if name != "r4":
            reference.load_adapter(adapters / name, adapter_name=name)
    reference.eval()
    with torch.inference_mode():
        expected = reference(input_ids=ids, adapter_names=rows).logits

    model = load_base(demo_dir, quantized)
    row_slots = RowSlots()
    layers = wrap_linear_layers(model, row_slots)
    for layer in layers.values():
        layer.allocate(len(RANKS) + 1, max(RANKS.values()), "cpu", torch.float32)
    slot_of = {"__base__": 0}
    for slot, name in enumerate(RANKS, start=1):
        weights = parse_peft(json.loads((adapters / name / "adapter_config.json").read_text()),
                             load_file(adapters / name / "adapter_model.safetensors"))
        for path, entry in weights.modules.items():
            layers[path].write(slot, entry)
        slot_of[name] = slot
    with torch.inference_mode(), row_slots.using(tuple(slot_of[r] for r in rows), torch.device("cpu")):
        got = model(input_ids=ids).logits

    # bitsandbytes' CPU 4-bit kernels take different paths for different batch shapes, so a
    # quantized batch agrees with its rows served alone only to ~1e-3 (peft's own forward too).
    tolerance = 2e-2 if quantized else 2e-4
    diffs = [float((got[i] - expected[i]).abs().max()) for i in range(len(rows))]
    assert max(diffs) < tolerance, diffs
    # The adapters really do change the output, far beyond that tolerance.
    assert (expected[0] - expected[1]).abs().max() > 50 * tolerance


def test_unsupported_peft_features_are_refused():
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 4)}
    assert parse_peft({"r": 4, "lora_alpha": 8}, tensors).modules
    for config in ({"use_dora": True}, {"modules_to_save": ["lm_head"]}, {"bias": "all"}, {"peft_type": "IA3"},
                   {"fan_in_fan_out": True}):
        with pytest.raises(UnsupportedAdapter):
            parse_peft(config, tensors)
    with pytest.raises(UnsupportedAdapter, match="unsupported tensor"):
        parse_peft({}, {**tensors, "base_model.model.lm_head.lora_magnitude_vector": torch.zeros(8)})
