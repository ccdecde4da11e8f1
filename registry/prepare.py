"""A registration's draft: the source checked to be a safetensors PEFT adapter, copied into a
private staging directory, hashed, its facts read from the tensors and smoke-tested. Whatever store
it goes into, it goes in as these two files and the passport this fills in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from loraserve.registry.durable import fsync_file
from loraserve.registry.errors import StoreError
from loraserve.registry.identity import BaseIdentity, sha256_file
from loraserve.registry.passport import FALLBACKS, Evaluation, Passport, SmokeTest, Status
from loraserve.registry.plans import check_ids
from loraserve.registry.snapshot import now_iso
from loraserve.registry.weights import WeightsError, check_against_config, weight_facts

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"


def new_draft(source: Path, name: str, base: BaseIdentity, evaluation: Evaluation | None, fields: dict,
              requested: dict) -> Passport:
    """The passport a registration starts from, once `source` looks like a safetensors PEFT adapter
    (its policy is given by plan_registration)."""
    check_ids(name, requested.get("aliases") or ())
    if not (source / CONFIG).is_file():
        raise StoreError(f"{source} has no {CONFIG}: not a PEFT adapter directory")
    if not (source / WEIGHTS).is_file():
        if (source / PICKLE_WEIGHTS).is_file():
            raise StoreError(f"{source} has only pickle weights ({PICKLE_WEIGHTS}), which can run code when "
                             "loaded; convert them to safetensors first")
        raise StoreError(f"{source} has no {WEIGHTS}")
    if requested.get("fallback") not in (None, *FALLBACKS):
        raise StoreError(f"fallback must be one of {FALLBACKS}, not {requested['fallback']!r}")
    return Passport(name=name, version="0", base_model=base.model_id, base_model_revision=base.revision,
                    weights_sha256="", created=now_iso(), evaluation=evaluation or Evaluation(), **fields)


def _adapter_config(version_dir: Path) -> dict:
    try:
        config = json.loads((version_dir / CONFIG).read_text())
    except ValueError as exc:
        raise WeightsError(f"{CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise WeightsError(f"{CONFIG} is not a JSON object")
    return config


def prepare(source: Path, stage: Path, draft: Passport, smoke_test: Callable[[Path], SmokeTest] | None) -> None:
    """Copy the adapter into the private directory `stage`, hash it, read its facts from the
    tensors and smoke-test it; `draft` records the outcome (status staging, or failed and why)."""
    for f in (CONFIG, WEIGHTS):
        shutil.copyfile(source / f, stage / f)
        fsync_file(stage / f)
    draft.weights_sha256 = sha256_file(stage / WEIGHTS)
    try:
        facts = weight_facts(stage / WEIGHTS)
        draft.rank, draft.ranks, draft.dtype = facts.rank, facts.leaf_ranks(), facts.dtype
        draft.target_modules = facts.target_modules
        check_against_config(facts, _adapter_config(stage))
    except WeightsError as exc:
        draft.failure = str(exc)
    if not draft.failure and smoke_test is not None:
        draft.smoke_test = smoke_test(stage)
        if not draft.smoke_test.passed:
            draft.failure = f"smoke test failed: {draft.smoke_test.error}"
    draft.status = Status.FAILED if draft.failure else Status.STAGING
