"""The registry in an S3 bucket (moto's server on loopback): lifecycle, the CLI, conditional index
writes under concurrent writers, crash leftovers, and the disk cache in front of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from conftest import REPO
from loraserve.registry.diskcache import DiskCache, DiskCacheFull
from loraserve.registry.identity import BaseIdentity
from loraserve.registry.origin import open_store
from loraserve.registry.passport import SmokeTest
from loraserve.registry.s3 import S3, Conflict, HashMismatch, NotFound, OriginError, Retry
from loraserve.registry.errors import StoreError
from s3util import Proxy, s3_client
from tiny import fake_base, tiny_adapter

BASE = BaseIdentity("tiny-base", "rev-1")


def passed(_dir):
    return SmokeTest(True, "now", [{"prompt": "p", "output": "o"}])


@pytest.fixture()
def store(bucket, moto_endpoint, tmp_path):
    return open_store(bucket, endpoint_url=moto_endpoint, cache_dir=tmp_path / "cache")


@pytest.fixture()
def raw(tmp_path):
    return tiny_adapter(tmp_path / "raw")


def objects(store) -> list[str]:
    under = store.s3.key("") + "/"
    return sorted(k[len(under):] for k in store.s3.keys(under))


def test_lifecycle_in_the_bucket_moves_one_index(store, raw):
    first = store.register(raw, "legal", BASE, passed, aliases=["law"], client="acme")
    second = store.register(raw, "legal", BASE, passed)
    assert (first.version, second.version, first.status) == ("1", "2", "staging")
    assert objects(store) == ["legal/1/.claim", "legal/1/adapter_config.json", "legal/1/adapter_model.safetensors",
                              "legal/1/metadata.json", "legal/2/.claim", "legal/2/adapter_config.json",
                              "legal/2/adapter_model.safetensors", "legal/2/metadata.json", "registry.json"]
    store.promote("legal", "1")
    assert store.promote("legal", "2").status == "active"
    assert store.snapshot().get("legal", "1").status == "archived"
    assert store.rollback("legal").key == "legal@1"
    snap = store.snapshot()
    assert (snap.find("law").key, snap.get("legal", "2").status) == ("legal@1", "staging")
    passport = json.loads(store.s3.get(store.s3.key("legal", "1", "metadata.json"))[0])
    assert (passport["status"], passport["client"]) == ("active", "acme")  # mirrored from the index
    assert [p.status for p in store.archive("legal")] == ["archived", "archived"]
    with pytest.raises(StoreError, match="not in the store"):
        store.promote("legal", "9")


def test_namespace_and_promotion_rules_hold_as_locally(store, raw):
    store.register(raw, "legal", BASE, passed, aliases=["law"])
    with pytest.raises(StoreError, match="already the alias"):
        store.register(raw, "other", BASE, passed, aliases=["law"])
    unsmoked = store.register(raw, "medical", BASE, None)
    with pytest.raises(StoreError, match="smoke test"):
        store.promote("medical", unsmoked.version)


def test_a_stale_conditional_write_is_refused(store, raw):
    """The premise of the store's concurrency: the bucket honours If-Match and If-None-Match."""
    store.register(raw, "legal", BASE, passed)
    key = store.s3.key("registry.json")
    _, etag = store.s3.get(key)
    store.promote("legal", "1")  # someone else moves the index
    with pytest.raises(Conflict):
        store.s3.put(key, b"{}", if_match=etag)
    with pytest.raises(Conflict):
        store.s3.put(key, b"{}", if_none_match=True)
    assert store.snapshot().get("legal", "1").status == "active"


def test_concurrent_writers_lose_no_change(store, raw):
    """Eight registrations of one name and four of others at once, then concurrent promotions:
    every version gets its own number and every change is in the index."""
    errors = []

    def run(fn, *args):
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    jobs = [(store.register, raw, "legal", BASE, passed) for _ in range(8)]
    jobs += [(store.register, raw, f"team{i}", BASE, passed) for i in range(4)]
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    snap = store.snapshot()
    assert [p.version for p in snap.versions("legal")] == [str(v) for v in range(1, 9)]
    assert all(snap.versions(f"team{i}") for i in range(4))

    threads = [threading.Thread(target=run, args=(store.promote, f"team{i}", "1")) for i in range(4)]
    threads.append(threading.Thread(target=run, args=(store.promote, "legal", "3")))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    snap = store.snapshot()
    assert {p.key for p in snap.passports if p.status == "active"} == {"legal@3", *(f"team{i}@1" for i in range(4))}


def test_a_dead_registration_is_never_served_and_reindex_adopts_only_complete_ones(store, raw):
    store.register(raw, "legal", BASE, passed)
    s3 = store.s3
    # A writer that died after claiming version 2 and uploading its weights, before its passport:
    s3.put(s3.key("legal", "2", ".claim"), b"", if_none_match=True)
    s3.upload(s3.key("legal", "2", "adapter_model.safetensors"), raw / "adapter_model.safetensors")
    # ... and one that died after its passport (uploaded last: the version is complete), before the index:
    done = store.snapshot().get("legal", "1")
    s3.put(s3.key("legal", "3", ".claim"), b"", if_none_match=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        s3.upload(s3.key("legal", "3", f), raw / f)
    s3.put(s3.key("legal", "3", "metadata.json"), json.dumps({**done.to_dict(), "version": "3"}).encode())
    assert [p.version for p in store.snapshot().versions("legal")] == ["1"]
    assert store.register(raw, "legal", BASE, passed).version == "4"  # claimed numbers are skipped
    recovered = store.reindex()
    assert [p.version for p in recovered.versions("legal")] == ["1", "3", "4"]
    assert [p.version for p in store.snapshot().versions("legal")] == ["1", "3", "4"]


def test_reindex_mirrors_the_index_into_passports(store, raw):
    store.register(raw, "legal", BASE, passed)
    store.promote("legal", "1")
    key = store.s3.key("legal", "1", "metadata.json")
    stale = json.loads(store.s3.get(key)[0])
    store.s3.put(key, json.dumps({**stale, "status": "staging"}).encode())  # a writer died before mirroring
    store.reindex()
    assert json.loads(store.s3.get(key)[0])["status"] == "active"
    assert store.snapshot().get("legal", "1").status == "active"


def test_cli_against_the_bucket(bucket, moto_endpoint, raw, tmp_path):
    base = fake_base(tmp_path / "base")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "loraserve.registry.cli", "--store", bucket, "--s3-endpoint-url",
                               moto_endpoint, *args], capture_output=True, text=True, cwd=REPO,
                              env=os.environ, timeout=120)

    done = cli("--json", "register", str(raw), "--name", "legal", "--no-smoke", "--model-path", str(base),
               "--aliases", "law")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["version"] == "1"
    listed = cli("list")
    assert listed.returncode == 0 and "legal" in listed.stdout and "staging" in listed.stdout
    assert json.loads(cli("show", "legal@1").stdout)["aliases"] == ["law"]
    refused = cli("promote", "legal", "1")
    assert refused.returncode == 1 and "smoke test" in refused.stderr
    assert cli("archive", "legal").returncode == 0
    assert json.loads(cli("--json", "list").stdout)[0]["status"] == "archived"
    missing = subprocess.run([sys.executable, "-m", "loraserve.registry.cli", "--store", "s3://no-such-bucket-here/x",
                              "--s3-endpoint-url", moto_endpoint, "list"], capture_output=True, text=True,
                             cwd=REPO, env=os.environ, timeout=120)
    assert missing.returncode == 1 and "NoSuchBucket" in missing.stderr


# -- the disk cache ---------------------------------------------------------------
def test_materialize_downloads_verifies_and_then_hits(store, raw, tmp_path):
    p = store.register(raw, "legal", BASE, passed)
    cache = DiskCache(store.cache_dir, 1 << 20)
    first = store.materialize(cache, "legal", "1", p.weights_sha256, 1.0)
    assert first.downloaded and first.bytes == sum(f.stat().st_size for f in raw.iterdir())
    assert (store.version_dir("legal", "1") / "adapter_model.safetensors").read_bytes() == \
        (raw / "adapter_model.safetensors").read_bytes()
    cache.release("legal", "1")
    again = store.materialize(cache, "legal", "1", p.weights_sha256, 1.0)
    assert not again.downloaded and (cache.stats.hits, cache.stats.misses) == (1, 1)
    cache.release("legal", "1")
    cache.close()
    reopened = DiskCache(store.cache_dir, 1 << 20)  # copies survive a restart
    assert reopened.lease("legal", "1", p.weights_sha256)


def test_corrupt_or_missing_objects_are_discarded_never_placed(store, raw):
    p = store.register(raw, "legal", BASE, passed)
    cache = DiskCache(store.cache_dir, 1 << 20)
    store.s3.put(store.s3.key("legal", "1", "adapter_model.safetensors"), b"not the registered weights")
    with pytest.raises(HashMismatch):
        store.materialize(cache, "legal", "1", p.weights_sha256, 1.0)
    store.s3.delete(store.s3.key("legal", "1", "adapter_config.json"))
    with pytest.raises(NotFound):
        store.materialize(cache, "legal", "1", p.weights_sha256, 1.0)
    assert not store.version_dir("legal", "1").exists() and len(cache) == 0 and cache.used == 0
    assert not list((cache.root / ".tmp").iterdir()) and cache.stats.discarded == 1


def test_lru_eviction_spares_leased_copies(store, raw):
    passports = [store.register(raw, f"a{i}", BASE, passed) for i in range(3)]
    size = sum(f.stat().st_size for f in raw.iterdir())
    cache = DiskCache(store.cache_dir, 2 * size)
    store.materialize(cache, "a0", "1", passports[0].weights_sha256, 1.0)  # leased: a load is reading it
    store.materialize(cache, "a1", "1", passports[1].weights_sha256, 1.0)
    cache.release("a1", "1")
    store.materialize(cache, "a2", "1", passports[2].weights_sha256, 1.0)  # evicts a1, not the leased a0
    assert (store.version_dir("a0", "1").exists(), store.version_dir("a1", "1").exists()) == (True, False)
    assert cache.stats.evictions == 1 and cache.used == 2 * size
    with pytest.raises(DiskCacheFull, match="held by loads"):  # both leased: no room within the wait
        store.materialize(cache, "a1", "1", passports[1].weights_sha256, 0.2)
    cache.release("a0", "1")
    store.materialize(cache, "a1", "1", passports[1].weights_sha256, 0.2)
    assert not store.version_dir("a0", "1").exists()
    with pytest.raises(DiskCacheFull, match="whole disk cache budget"):
        store.materialize(DiskCache(store.cache_dir.parent / "small", size // 2), "a0", "1",
                          passports[0].weights_sha256, 0.2)


def test_one_disk_cache_per_directory_and_leftovers_removed(tmp_path):
    cache = DiskCache(tmp_path / "c", 1000)
    with pytest.raises(StoreError, match="in use by another server"):
        DiskCache(tmp_path / "c", 1000)
    cache.close()
    (tmp_path / "c" / ".tmp" / "half").mkdir()
    (tmp_path / "c" / "legal" / "1").mkdir(parents=True)  # no manifest: an interrupted copy
    DiskCache(tmp_path / "c", 1000)
    assert not (tmp_path / "c" / "legal" / "1").exists() and not (tmp_path / "c" / ".tmp" / "half").exists()


def test_a_missing_bucket_and_denied_credentials_are_clear_errors(moto_endpoint, tmp_path):
    from s3util import credentials_checked

    with pytest.raises(NotFound, match="NoSuchBucket"):
        open_store("s3://nothing-here/x", endpoint_url=moto_endpoint, cache_dir=tmp_path).snapshot()
    s3_client(moto_endpoint).create_bucket(Bucket="denied-bucket")
    store = open_store("s3://denied-bucket/x", endpoint_url=moto_endpoint, cache_dir=tmp_path, retries=3)
    with credentials_checked(moto_endpoint):
        with pytest.raises(StoreError) as caught:
            store.snapshot()
    assert caught.value.code == "InvalidAccessKeyId" and not caught.value.retryable


def test_a_transient_get_is_retried_by_botocore_and_a_conditional_write_never_twice(bucket, moto_endpoint):
    """A 503 then a 500 on a GET: botocore's standard mode tries again and the third answer is the
    object (each retry counted). A conditional PUT that landed but whose answer was lost is not sent
    again (it would answer 412, a lost race that never was): it fails and the object is the new one."""
    injected = {("GET", "503"), ("GET", "500")}

    def fail(method: str, path: str):
        for m, status in sorted(injected):
            if m == method and path.split("?")[0].endswith("/doc.json"):
                injected.discard((m, status))
                return int(status), method == "PUT"
        return None

    proxy = Proxy(moto_endpoint, fail=fail)
    retried: list[OriginError] = []
    try:
        s3 = S3(bucket, endpoint_url=proxy.endpoint, retry=Retry(attempts=3), on_retry=retried.append)
        key = s3.key("doc.json")
        etag = s3.put(key, b"one", if_none_match=True)
        assert s3.get(key) == (b"one", etag)
        assert proxy.count("GET", "/doc.json") == 3
        assert sorted(err.code for err in retried) == ["InternalError", "SlowDown"]

        injected.add(("PUT", "500"))
        with pytest.raises(OriginError) as caught:
            s3.put(key, b"two", if_match=etag)
        assert caught.value.code == "InternalError" and not isinstance(caught.value, Conflict)
        assert proxy.count("PUT", "/doc.json") == 2  # the first PUT, and the conditional one once
        assert s3.get(key)[0] == b"two"  # it had landed: the caller re-reads and sees it
    finally:
        proxy.stop()
