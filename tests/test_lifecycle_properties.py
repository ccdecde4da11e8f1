"""Stateful tests (hypothesis) for the store's lifecycle decisions (registry.plans' plan_*
functions) on snapshots built in memory: any sequence of operations, each applied as the store
applies it (with_changes), leaves a snapshot with no problems(); a refused one changes nothing."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from loraserve.registry.errors import StoreError
from loraserve.registry.evaluate import parse_case, pending
from loraserve.registry.passport import Passport, SmokeTest
from loraserve.registry.plans import (plan_abort_canary, plan_archive, plan_canary, plan_gate, plan_promote, plan_rollback,
                            plan_set_policy, plan_shadow)
from loraserve.registry.rollout import Canary, Shadow
from loraserve.registry.snapshot import Snapshot, now_iso, with_changes

NAMES = ("legal", "support")
VERSIONS = ("1", "2", "3")
names, versions = st.sampled_from(NAMES), st.sampled_from(VERSIONS)
GATE = pending([parse_case({"prompt": "Hello", "expect": {"contains": "o"}}, "case 0")])


def passport(name: str, version: str, status: str, smoke: bool) -> Passport:
    return Passport(name, version, "tiny", "0" * 64, "", "2026-01-01T00:00:00+00:00", status=status,
                    smoke_test=SmokeTest(smoke, "2026-01-01T00:00:00+00:00"),
                    failure="" if status != "failed" else "its smoke test failed")


def test_a_version_rolled_back_to_stops_shadowing():
    """Found by the machine below: an archived version that shadows the active one kept its
    shadow when a rollback re-activated it, so it shadowed itself."""
    snap = Snapshot((passport("legal", "1", "archived", True), passport("legal", "2", "staging", True)))
    for plan, args in ((plan_promote, ("1",)), (plan_promote, ("2",)), (plan_shadow, ("1", Shadow(10, now_iso())))):
        snap = Snapshot(tuple(with_changes(snap, plan(snap, "legal", *args)[1])))
    assert snap.shadow("legal").version == "1"
    snap = Snapshot(tuple(with_changes(snap, plan_rollback(snap, "legal")[1])))
    assert snap.active("legal").version == "1" and snap.shadow("legal") is None
    assert snap.problems() == []


class Lifecycle(RuleBasedStateMachine):
    @initialize(data=st.data())
    def start(self, data):
        out = []
        for name in NAMES:
            statuses = [data.draw(st.sampled_from(("staging", "archived", "failed"))) for _ in VERSIONS]
            active = data.draw(st.sampled_from((None, *range(len(VERSIONS)))))
            if active is not None:
                statuses[active] = "active"
            out += [passport(name, v, s, smoke=s != "failed" and data.draw(st.sampled_from((True, True, True, False))))
                    for v, s in zip(VERSIONS, statuses)]
        self.snap = Snapshot(tuple(out))
        assert self.snap.problems() == []

    def _apply(self, plan, *args):
        """The store's step: plan on the snapshot, then one write of every version with the changes.
        Returns what the plan returned, or None when it refused (and then nothing changed)."""
        before = [p.to_dict() for p in self.snap.passports]
        try:
            result = plan(self.snap, *args)
        except StoreError:
            assert [p.to_dict() for p in self.snap.passports] == before, "a refused operation changes nothing"
            return None
        assert [p.to_dict() for p in self.snap.passports] == before, "a plan changes only what it returns"
        changed = result[1]
        keys = [p.key for p in changed]
        assert len(keys) == len(set(keys)) and set(keys) <= {p.key for p in self.snap.passports}
        self.snap = Snapshot(tuple(with_changes(self.snap, changed)))
        return result

    @rule(name=names, version=versions, force=st.booleans())
    def promote(self, name, version, force):
        was_active = self.snap.get(name, version).status == "active"
        result = self._apply(plan_promote, name, version, force)
        if result:
            assert self.snap.active(name).version == version
            if was_active:
                assert result[1] == [], "promoting the active version changes nothing"
            else:
                assert self.snap.canary(name) is None, "promoting ends a running canary"

    @rule(name=names, version=versions, percent=st.sampled_from((1, 10, 50)), force=st.booleans())
    def canary(self, name, version, percent, force):
        if self._apply(plan_canary, name, version, Canary(percent, now_iso()), force):
            assert self.snap.canary(name).version == version and self.snap.canary(name).canary.percent == percent

    @rule(name=names, version=versions, passed=st.booleans())
    def gate(self, name, version, passed):
        gate = replace(GATE, passed=passed, pass_rate=1.0 if passed else 0.0, evaluated_at=now_iso())
        if self._apply(plan_gate, name, version, gate):
            assert self.snap.get(name, version).gate == gate

    @rule(name=names, version=versions)
    def abort_canary(self, name, version):
        was = self.snap.canary(name)
        result = self._apply(plan_abort_canary, name, version, "its error rate", {"errors": 1})
        assert result is not None, "the server's rollback is never refused"
        if was is not None and was.version == version:
            assert self.snap.canary(name) is None and self.snap.get(name, version).canary.state == "aborted"
        else:
            assert result == (None, [])

    @rule(name=names, version=versions, percent=st.sampled_from((None, 10, 100)))
    def shadow(self, name, version, percent):
        shadow = None if percent is None else Shadow(percent, now_iso())
        if self._apply(plan_shadow, name, version, shadow):
            now = self.snap.shadow(name)
            assert (now is None) if shadow is None else (now.version == version)

    @rule(name=names)
    def rollback(self, name):
        running, active = self.snap.canary(name), self.snap.active(name)
        if self._apply(plan_rollback, name) and running is not None:
            assert self.snap.canary(name) is None and self.snap.active(name) == active

    @rule(name=names)
    def archive(self, name):
        if self._apply(plan_archive, name):
            assert {p.status for p in self.snap.versions(name)} == {"archived"}
            assert self.snap.canary(name) is None

    @rule(name=names, aliases=st.lists(st.sampled_from(("contracts", "helpdesk", "legal")), max_size=2, unique=True),
          fallback=st.sampled_from((None, "fail", "base")))
    def set_policy(self, name, aliases, fallback):
        if self._apply(plan_set_policy, name, {"aliases": aliases, "fallback": fallback}, "because"):
            policy = self.snap.policy(name)
            assert list(policy.aliases) == aliases and (fallback is None or policy.fallback == fallback)

    @invariant()
    def the_snapshot_is_a_valid_index(self):
        assert self.snap.problems() == []
        for ident, claimants in self.snap.claims().items():
            assert len(claimants) == 1, f"{ident} names {sorted(claimants)}"


Lifecycle.TestCase.settings = settings(max_examples=150, stateful_step_count=25, deadline=None)
test_lifecycle = Lifecycle.TestCase
