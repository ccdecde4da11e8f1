"""The two ways runner/lora.py adds each row's adapter, against references: the grouped path
(CPU: each adapter's rows packed in chunks, one pair of batched matmuls for all of them) against the
per-row gather it replaced (index_select of every row's A and B at the largest attached rank,
two bmm), and the Triton BGMV kernels (CUDA) against the grouped path. Mixed batches: several
slots of ranks 4, 8 and 16, base rows (slot 0), a cleared slot, rows of one adapter apart and
together, decode [B, 1, in] and prefill [B, T, in], float32 and bfloat16.

Without CUDA the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1):
what they compute is checked here, not their compiled code, their speed or their capture in a
CUDA graph, which only a GPU shows (tests/test_cuda.py). Skipped, saying so, where triton is
not installed (`pip install -e '.[test]'` installs it on Linux x86_64)."""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch
from torch import nn

from loraserve.runner.lora import LoRALinear, RowSlots, parse_peft, wrap_linear_layers

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# Slot -> the adapter's rank (slot 4 was attached and detached: rank 0 again; slot 5 never used).
RANKS = {1: 4, 2: 8, 3: 16}
SLOTS = [2, 0, 1, 3, 2, 0, 3, 3, 1, 4]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-6}
"""Largest difference allowed, as a share of the largest |output|."""


def layer(in_features: int, out_features: int, rows: RowSlots, dtype: torch.dtype, seed: int = 0) -> LoRALinear:
    """A wrapped linear layer holding random adapters of RANKS (the scale folded into B, as
    parse_peft does), with room for rank 16 in 6 slots."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_features, out_features).to(DEVICE, dtype).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_features, in_features, generator=g) / in_features**0.5)
        base.bias.copy_(torch.randn(out_features, generator=g) / 10)
    wrapped = LoRALinear(base, rows)
    wrapped.allocate(6, 16, DEVICE, dtype)
    for slot, r in {**RANKS, 4: 8}.items():
        a = torch.randn(in_features, r, generator=g) / in_features**0.5
        b = torch.randn(r, out_features, generator=g) * (2.0 / r)
        wrapped.write(slot, (a.to(DEVICE, dtype), b.to(DEVICE, dtype)))
    wrapped.write(4, None)
    return wrapped


def gathered(wrapped: LoRALinear, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """The path this replaced: every row's A and B copied out of the stacks at the largest
    attached rank (columns past a slot's rank are zero), then two batched matmuls."""
    y = wrapped.base(x)
    index = torch.tensor(slots, device=x.device)
    r = max(wrapped.ranks)
    a = wrapped.a[:, :, :r].index_select(0, index)
    b = wrapped.b[:, :r, :].index_select(0, index)
    return torch.baddbmm(y, torch.bmm(x, a), b)


def forward(wrapped: LoRALinear, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    with torch.inference_mode(), wrapped._rows.using(tuple(slots), x.device):
        return wrapped(x)


def share(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", [1, 5], ids=["decode", "prefill"])
def test_the_grouped_path_adds_what_the_per_row_gather_added(dtype, width):
    wrapped = layer(96, 80, RowSlots("grouped"), dtype)
    x = torch.randn(len(SLOTS), width, 96, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    got, want = forward(wrapped, x, SLOTS), gathered(wrapped, x, SLOTS)
    assert share(got, want) <= TOLERANCE[dtype]
    base = wrapped.base(x)
    for i, slot in enumerate(SLOTS):
        if slot in (0, 4):  # no adapter, or a cleared slot: the base layer's output, bit for bit
            assert torch.equal(got[i], base[i])
        else:  # the adapter moves its rows far beyond the tolerance
            assert share(got[i], base[i]) > 20 * TOLERANCE[dtype]


def test_a_batch_without_adapter_rows_and_a_layer_no_present_adapter_adapts_cost_nothing():
    wrapped = layer(32, 24, RowSlots("grouped"), torch.float32)
    x = torch.randn(4, 1, 32)
    assert torch.equal(forward(wrapped, x, [0, 0, 0, 0]), wrapped.base(x))
    assert wrapped._rows.index is None  # installed for that forward only
    for slot in (1, 2, 3):
        wrapped.write(slot, None)  # now no attached adapter adapts this layer
    assert torch.equal(forward(wrapped, x, [1, 0, 3, 2]), wrapped.base(x))


def test_rows_are_packed_by_slot_once_per_forward():
    """Each adapter's rows in chunks of one size (the last padded with its first row); every
    adapter row read back from its own packed position, base rows nowhere."""
    from loraserve.runner.lora import group_rows

    groups = group_rows([2, 2, 0, 1, 3, 1, 3, 3], torch.device("cpu"))
    assert (groups.slots, groups.sizes, groups.chunk) == ((1, 2, 3), (2, 2, 3), 2)
    assert groups.chunk_slots.tolist() == [1, 2, 3, 3]
    assert groups.gather.tolist() == [3, 5, 0, 1, 4, 6, 7, 7]
    assert groups.gather[groups.back].tolist() == groups.rows.tolist() == [3, 5, 0, 1, 4, 6, 7]
    # Every row its own adapter: the rows are the chunks, where they are (nothing copied, nothing padded).
    groups = group_rows([1, 4, 2], torch.device("cpu"))
    assert (groups.chunk, groups.chunk_slots.tolist(), groups.gather, groups.back) == (1, [1, 4, 2], None, None)
    # The same beside a base row: the adapter rows gathered, each read back from where it went.
    groups = group_rows([1, 0, 2], torch.device("cpu"))
    assert (groups.chunk, groups.chunk_slots.tolist(), groups.gather.tolist(), groups.back) == (1, [1, 2], [0, 2], None)
    # One adapter's rows, or runs of each adapter's rows in slot order: chunks of several rows, in place.
    groups = group_rows([3] * 8, torch.device("cpu"))
    assert (groups.chunk, groups.chunk_slots.tolist(), groups.gather) == (8, [3], None)
    groups = group_rows([1, 1, 2, 2], torch.device("cpu"))
    assert (groups.chunk, groups.chunk_slots.tolist(), groups.gather) == (2, [1, 2], None)
    # One adapter's 8 rows beside one of 1: chunks of 4, so that adapter's weights are read twice, not 8 times.
    groups = group_rows([5] * 8 + [6], torch.device("cpu"))
    assert (groups.chunk, groups.chunk_slots.tolist()) == (4, [5, 5, 6])


@pytest.mark.parametrize("slots", [[3, 3, 3, 3], [1, 1, 2, 3], [1, 1, 2, 2], [2, 2, 1, 1], [0, 0, 2, 0], [2, 0, 2, 0],
                                   [1] * 9 + [2, 3]])
def test_the_grouped_path_in_every_shape_of_batch(slots):
    """One adapter, rows already in slot order (added in place), the same runs out of slot order
    (gathered), base rows only but one, and one adapter's rows apart: the same as the gather."""
    wrapped = layer(40, 24, RowSlots("grouped"), torch.float32)
    x = torch.randn(len(slots), 3, 40, generator=torch.Generator().manual_seed(6))
    assert share(forward(wrapped, x, slots), gathered(wrapped, x, slots)) <= 1e-6


def test_each_layer_keeps_its_chunks_weights_while_the_slots_repeat_and_rereads_them_after_a_write():
    """Decode steps mostly carry the same rows: their chunks' A and B are gathered once, not per
    step. A write to any slot (attach, detach, or one that raised half-way and was cleared)
    drops them, so no forward reads an adapter that is no longer in its slot."""
    wrapped = layer(40, 24, RowSlots("grouped"), torch.float32)
    x = torch.randn(4, 1, 40, generator=torch.Generator().manual_seed(3))
    slots = [3, 1, 2, 1]
    first = forward(wrapped, x, slots)
    kept = wrapped._gathered.weights[0]
    assert torch.equal(forward(wrapped, x, slots), first) and wrapped._gathered.weights[0] is kept
    g = torch.Generator().manual_seed(9)
    wrapped.write(1, (torch.randn(40, 8, generator=g), torch.randn(8, 24, generator=g)))
    assert share(forward(wrapped, x, slots), gathered(wrapped, x, slots)) <= 1e-6
    assert not torch.equal(forward(wrapped, x, slots), first)
    with pytest.raises(RuntimeError):  # B of the wrong width: A is copied, then the copy of B raises
        wrapped.write(2, (torch.randn(40, 8, generator=g), torch.randn(8, 23, generator=g)))
    wrapped.write(2, None)  # what AdapterSlots.attach does when a write raises
    assert share(forward(wrapped, x, slots), gathered(wrapped, x, slots)) <= 1e-6
    assert torch.equal(forward(wrapped, x, [0, 2, 0, 2]), wrapped.base(x))


def test_a_whole_model_grouped_matches_the_per_row_gather(demo_dir, adapters):
    """The demo model with adapters of ranks 4, 8 and 16 on different modules, a batch of every
    adapter and the base: the grouped path's logits against the gather path's."""
    ids = torch.randint(5, 500, (7, 9), generator=torch.Generator().manual_seed(2))
    slots = [1, 0, 2, 3, 1, 0, 3]
    rows = RowSlots("grouped")
    grouped, _ = model_with(demo_dir, adapters, rows)
    gather, layers = model_with(demo_dir, adapters, RowSlots("grouped"))
    for wrapped in layers.values():
        wrapped.forward = (lambda w: lambda x: gathered(w, x, slots))(wrapped)
    with torch.inference_mode(), rows.using(tuple(slots), DEVICE):
        got = grouped(input_ids=ids.to(DEVICE)).logits
    with torch.inference_mode():
        want = gather(input_ids=ids.to(DEVICE)).logits
    assert share(got, want) <= 1e-5


# -- the Triton kernels ----------------------------------------------------------------------


@pytest.fixture()
def kernels():
    """loraserve.runner.lora_kernels: compiled on CUDA; elsewhere interpreted (tests/conftest.py sets
    TRITON_INTERPRET=1 for the session, before anything imports triton)."""
    pytest.importorskip("triton", reason="triton is not installed (the `test` extra installs it on Linux x86_64)")
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device, and TRITON_INTERPRET is not 1 (the kernels cannot run on CPU tensors)")
    return importlib.import_module("loraserve.runner.lora_kernels")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", [1, 3], ids=["decode", "prefill"])
def test_the_bgmv_kernels_add_what_the_grouped_path_adds(kernels, dtype, width):
    # 2100 and 3100 input features: two and three shrink splits (splits_for), the last one ragged;
    # 200 and 72 outputs: a ragged last expand block.
    assert kernels.splits_for(2100) == 2 and kernels.splits_for(3100) == 3
    for features in ((2100, 200), (3100, 72)):
        reference = layer(*features, RowSlots("grouped"), dtype)
        kernel = layer(*features, RowSlots("triton"), dtype)
        x = torch.randn(len(SLOTS), width, features[0], generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
        got, want = forward(kernel, x, SLOTS), forward(reference, x, SLOTS)
        assert share(got, want) <= TOLERANCE[dtype], features
        base = reference.base(x)
        for i, slot in enumerate(SLOTS):
            if slot in (0, 4):  # rows of slot 0 and of a cleared slot are not touched
                assert torch.equal(got[i], base[i])


def test_the_kernels_read_slots_and_ranks_from_the_device_and_leave_padding_rows_alone(kernels):
    """What a captured decode step relies on: the slot buffer and the rank table are read when
    the kernels run, so rewriting them in place (rows joining, an adapter attached) changes the
    next launch's result with nothing else rebuilt."""
    wrapped = layer(64, 48, RowSlots("grouped"), torch.float32)
    index = torch.zeros(4, dtype=torch.long, device=DEVICE)
    x = torch.randn(4, 1, 64, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    y = wrapped.base(x)

    def launch() -> torch.Tensor:
        out = y.clone()
        kernels.add_lora(out, x, wrapped.a, wrapped.b, index, wrapped.rank_table)
        return out

    assert torch.equal(launch(), y)  # all padding rows
    index.copy_(torch.tensor([3, 0, 1, 0]))
    first = launch()
    assert torch.equal(first[1], y[1]) and torch.equal(first[3], y[3]) and not torch.equal(first[0], y[0])
    wrapped.write(3, None)  # detached: its rank is 0 in the table
    assert torch.equal(launch()[0], y[0])


def test_a_whole_model_through_the_kernels_matches_the_grouped_path(demo_dir, adapters, kernels):
    ids = torch.randint(5, 500, (5, 6), generator=torch.Generator().manual_seed(5))
    slots = (2, 0, 3, 1, 3)
    logits = []
    for kernel in ("triton", "grouped"):
        rows = RowSlots(kernel)
        model, _ = model_with(demo_dir, adapters, rows)
        with torch.inference_mode(), rows.using(slots, DEVICE):
            logits.append(model(input_ids=ids.to(DEVICE)).logits)
    assert share(*logits) <= 1e-5


# -- fixtures ------------------------------------------------------------------------------------

ADAPTER_SPECS = {"r4": (4, ["q_proj", "v_proj"]), "r8": (8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
                 "r16": (16, ["o_proj", "gate_proj", "down_proj"])}


@pytest.fixture(scope="module")
def adapters(demo_dir, tmp_path_factory):
    """Random (non-zero) peft adapters for the demo base: ranks 4, 8, 16 on different modules."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("kernel-adapters")
    torch.manual_seed(0)
    weights = []
    for name, (r, targets) in ADAPTER_SPECS.items():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(demo_dir / "base"),
                               LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
        model.save_pretrained(out / name)
        weights.append(parse_peft(json.loads((out / name / "adapter_config.json").read_text()),
                                  load_file(out / name / "adapter_model.safetensors")))
    return weights


def model_with(demo_dir, adapters, rows: RowSlots):
    """The demo base with every linear wrapped, adapter i in slot i + 1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_dir / "base", dtype=torch.float32).to(DEVICE).eval()
    layers = wrap_linear_layers(model, rows)
    for wrapped in layers.values():
        wrapped.allocate(len(adapters) + 1, 16, DEVICE, torch.float32)
    for slot, weights in enumerate(adapters, start=1):
        for path, (a, b) in weights.modules.items():
            layers[path].write(slot, (a.to(DEVICE), b.to(DEVICE)))
    return model, layers

