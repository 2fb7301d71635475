"""Replicas sharing one adapters directory (a ReadWriteMany volume in Kubernetes): what one
replica publishes the others serve without a restart, within --adapter-refresh-seconds."""

import errno
import json
import os
import time

import pytest
from safetensors.torch import load_file

from tandem.server.adapters import peft_format
from tandem.server.adapters import registry as registry_module
from tandem.server.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, content_hash, write_adapter
from tandem.server.errors import NotFound, Unavailable
from tests.adapters.make_adapters import make_adapter
from tests.engine.helpers import make_engine

RANK = 8


@pytest.fixture
def versions(tmp_path, tiny_hf_model):
    """Two versions of one adapter, made apart from the shared directory."""
    return [make_adapter(tiny_hf_model, tmp_path / f"v{i}", r=4, seed=i) for i in (1, 2)]


@pytest.fixture
def shared(tmp_path, versions):
    root = tmp_path / "shared"
    root.mkdir()
    publish(versions[0], root / "style")
    return root


def publish(version, directory) -> None:
    """What the trainer replica's registry.publish does on disk: one atomic directory swap."""
    write_adapter(directory, json.loads((version / CONFIG_FILE).read_text()), load_file(version / WEIGHTS_FILE))


def replica(tiny_hf_model, tokenizer, root, **config):
    return make_engine(tiny_hf_model, tokenizer, adapters_dir=str(root), max_lora_rank=RANK, kv_cache_bytes=8 << 20, **config)


def test_a_replica_serves_the_version_another_replica_published(tiny_hf_model, smollm2_tokenizer, shared, versions):
    trainer = replica(tiny_hf_model, smollm2_tokenizer, shared)
    server = replica(tiny_hf_model, smollm2_tokenizer, shared, adapter_refresh_seconds=0)
    old = server.registry.get("style")
    config = json.loads((versions[1] / CONFIG_FILE).read_text())
    new = trainer.registry.publish("style", config, load_file(versions[1] / WEIGHTS_FILE))
    assert new.content_hash != old.content_hash
    assert server.registry.get("style").content_hash == new.content_hash
    assert [(i.name, i.content_hash) for i in server.registry.list()] == [("style", new.content_hash)]


def test_an_adapters_directory_created_after_start_is_served_and_named_until_then(
    tiny_hf_model, smollm2_tokenizer, tmp_path, versions, caplog
):
    """A volume still being filled at start: warned of, each request's NOT_FOUND names the
    missing directory (it said only that the adapter had no config), served once it exists."""
    root = tmp_path / "not-yet"
    server = replica(tiny_hf_model, smollm2_tokenizer, root)
    assert any(r.levelname == "WARNING" and getattr(r, "fields", None) == {"adapters_dir": str(root)} for r in caplog.records)
    with pytest.raises(NotFound, match=r"^adapter 'style' not found: the server's adapters directory \(--adapters-dir\) does not exist yet$"):
        server.registry.get("style")
    root.mkdir()
    publish(versions[0], root / "style")
    assert server.registry.get("style").name == "style"


def test_a_cached_version_is_checked_again_only_after_the_refresh_interval(
    tiny_hf_model, smollm2_tokenizer, shared, versions, monkeypatch
):
    server = replica(tiny_hf_model, smollm2_tokenizer, shared, adapter_refresh_seconds=30)
    old = server.registry.get("style")
    publish(versions[1], shared / "style")
    assert server.registry.get("style") is old
    later = registry_module.time.monotonic() + 31
    monkeypatch.setattr(registry_module.time, "monotonic", lambda: later)
    assert server.registry.get("style").content_hash != old.content_hash


def test_a_half_copied_new_version_keeps_the_cached_one_until_the_copy_is_whole(
    tiny_hf_model, smollm2_tokenizer, shared, versions
):
    # An operator copying files by hand (not atomically) must not fail requests mid-copy.
    server = replica(tiny_hf_model, smollm2_tokenizer, shared, adapter_refresh_seconds=0)
    old = server.registry.get("style")
    weights = (versions[1] / WEIGHTS_FILE).read_bytes()
    (shared / "style" / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    assert server.registry.get("style") is old
    (shared / "style" / WEIGHTS_FILE).write_bytes(weights)
    assert server.registry.get("style").content_hash != old.content_hash


def test_a_broken_new_version_is_read_once_not_at_every_refresh(tiny_hf_model, smollm2_tokenizer, shared, versions, monkeypatch):
    """Each refresh read the whole of a broken file again, on a request's thread; it is read
    again once its files change."""
    server = replica(tiny_hf_model, smollm2_tokenizer, shared, adapter_refresh_seconds=0)
    old = server.registry.get("style")
    reads, read_files = [], server.registry._read_files
    monkeypatch.setattr(server.registry, "_read_files", lambda *args: reads.append(args[0]) or read_files(*args))
    weights = (versions[1] / WEIGHTS_FILE).read_bytes()
    (shared / "style" / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    age(shared / "style")  # a broken file that stays: one just written is read again until its stamp can be trusted
    assert all(server.registry.get("style") is old for _ in range(3))
    assert reads == ["style"]
    (shared / "style" / WEIGHTS_FILE).write_bytes(weights)
    assert server.registry.get("style").content_hash != old.content_hash and reads == ["style", "style"]


def test_a_new_version_whose_read_failed_is_tried_again_at_the_next_refresh(tiny_hf_model, smollm2_tokenizer, shared, versions, monkeypatch):
    """A failure of the read itself (permissions fixed by a chmod, which leaves the file's
    stamp as it was; an I/O error; memory) is not the files' refusal: it may pass."""
    server = replica(tiny_hf_model, smollm2_tokenizer, shared, adapter_refresh_seconds=0)
    old = server.registry.get("style")
    publish(versions[1], shared / "style")
    reads, read_files = [], server.registry._read_files

    def denied_once(*args):
        reads.append(args[0])
        if len(reads) == 1:
            raise PermissionError(errno.EACCES, "Permission denied")
        return read_files(*args)

    monkeypatch.setattr(server.registry, "_read_files", denied_once)
    assert server.registry.get("style") is old
    assert server.registry.get("style").content_hash != old.content_hash and reads == ["style", "style"]


def test_a_new_version_the_host_has_no_memory_to_read_keeps_the_cached_one(tiny_hf_model, smollm2_tokenizer, shared, versions, monkeypatch):
    """A MemoryError taking the memory to read a changed adapter into failed a request INTERNAL,
    for a version it did not ask for; the new version is tried again at the next refresh."""
    server = replica(tiny_hf_model, smollm2_tokenizer, shared, adapter_refresh_seconds=0)
    old = server.registry.get("style")
    publish(versions[1], shared / "style")

    def no_memory(size: int):
        raise MemoryError

    with monkeypatch.context() as patch:
        patch.setattr(server.registry.slab, "block", no_memory)
        assert server.registry.get("style") is old
    assert server.registry.get("style").content_hash == content_hash(shared / "style") != old.content_hash


def test_a_replica_starts_on_a_read_only_shared_directory_with_leftovers(
    tiny_hf_model, smollm2_tokenizer, shared, monkeypatch
):
    # Serving replicas mount the volume read-only: removing a crashed publish's leftovers
    # fails there, and only the trainer (which mounts it writable) may clean them.
    def read_only(directory, min_age_seconds):
        raise OSError(errno.EROFS, "Read-only file system", str(directory))

    monkeypatch.setattr(registry_module, "remove_leftovers", read_only)
    server = replica(tiny_hf_model, smollm2_tokenizer, shared)
    assert server.registry.get("style").rank == 4


def test_a_link_swapped_to_another_folder_serves_that_folder(tiny_hf_model, smollm2_tokenizer, tmp_path, versions):
    """git-sync and Kubernetes volumes publish by re-pointing a link at a new folder and
    deleting the old one: the name kept serving the old folder's version for good."""
    root = tmp_path / "synced"
    root.mkdir()
    for version in versions:
        publish(version, root / f".rev-{version.name}")
    (root / "style").symlink_to(f".rev-{versions[0].name}")
    server = replica(tiny_hf_model, smollm2_tokenizer, root, adapter_refresh_seconds=0)
    old = server.registry.get("style")
    swap = root / "style.swap"
    swap.symlink_to(f".rev-{versions[1].name}")
    swap.replace(root / "style")  # the atomic swap
    new = server.registry.get("style")
    assert new.content_hash != old.content_hash and new.path == (root / f".rev-{versions[1].name}").resolve()
    assert [(i.name, i.path, i.content_hash) for i in server.registry.list()] == [("style", "style", new.content_hash)]
    # Re-pointed out of the adapters directory: refused as at a first read, the version served stays.
    swap.symlink_to(versions[0])
    swap.replace(root / "style")
    assert server.registry.get("style") is new


def age(directory, seconds: float = 3600) -> None:
    """Files last written long ago: their stamps are trusted at once."""
    then = time.time_ns() - int(seconds * 1e9)
    for path in directory.iterdir():
        os.utime(path, ns=(then, then))


def count_reads(registry, monkeypatch) -> list[str]:
    reads, read_files = [], registry._read_files
    monkeypatch.setattr(registry, "_read_files", lambda *args: reads.append(args[0]) or read_files(*args))
    return reads


def test_a_same_size_rewrite_in_place_within_the_mtime_tick_of_the_read_is_read_at_the_next_refresh(
    tiny_hf_model, smollm2_tokenizer, shared, versions
):
    """cp or rsync --inplace of a version of the same size, within the timestamp tick of the
    server's read (a few ms on Linux's coarse clock, 1-2 s on NFS, SMB, FUSE), left the
    (inode, size, mtime) stamp as it was: the old or a torn version was served until a
    restart or a LoadAdapter."""
    server = replica(tiny_hf_model, smollm2_tokenizer, shared, adapter_refresh_seconds=0)
    weights = shared / "style" / WEIGHTS_FILE
    stamp, seen = registry_module.file_stamp(shared / "style"), os.stat(weights)
    old = server.registry.get("style")
    rewritten = (versions[1] / WEIGHTS_FILE).read_bytes()
    assert len(rewritten) == seen.st_size and rewritten != weights.read_bytes()
    with open(weights, "r+b") as f:  # in place: the same inode
        f.write(rewritten)
    os.utime(weights, ns=(seen.st_atime_ns, seen.st_mtime_ns))  # the same mtime tick
    assert registry_module.file_stamp(shared / "style") == stamp
    new = server.registry.get("style")
    assert new.content_hash == content_hash(shared / "style") != old.content_hash


def test_files_untouched_for_long_are_not_read_again_at_each_refresh(tiny_hf_model, smollm2_tokenizer, shared, monkeypatch):
    age(shared / "style")
    server = replica(tiny_hf_model, smollm2_tokenizer, shared, adapter_refresh_seconds=0)
    reads = count_reads(server.registry, monkeypatch)
    first = server.registry.get("style")
    assert all(server.registry.get("style") is first for _ in range(5))
    assert reads == ["style"]


def test_recent_files_are_read_again_until_their_stamp_can_be_trusted(tiny_hf_model, smollm2_tokenizer, shared, monkeypatch):
    """A version published just now is read again at the next check (the same object kept
    when its content is unchanged), and no longer once its files are old enough."""
    server = replica(tiny_hf_model, smollm2_tokenizer, shared, adapter_refresh_seconds=0)
    reads = count_reads(server.registry, monkeypatch)
    first = server.registry.get("style")
    assert server.registry.get("style") is first and reads == ["style", "style"]
    later = time.time_ns() + registry_module.RACY_STAMP_NS + 10**9
    monkeypatch.setattr(registry_module.time, "time_ns", lambda: later)
    assert all(server.registry.get("style") is first for _ in range(3))
    assert reads == ["style"] * 3


def test_files_swapped_during_every_read_are_refused_not_paired(tiny_hf_model, smollm2_tokenizer, shared, versions, monkeypatch):
    """The last of the read's attempts went unchecked: a version swapped in between the config
    read and the weights read served one version's config with the other's weights."""
    server = replica(tiny_hf_model, smollm2_tokenizer, shared)
    read_config, swaps = peft_format.read_config, []

    def swapped_after_the_config(name, path):
        config = read_config(name, path)
        swaps.append(path)
        publish(versions[len(swaps) % 2], shared / "style")  # the other version, before the weights are read
        return config

    monkeypatch.setattr(peft_format, "read_config", swapped_after_the_config)
    with pytest.raises(Unavailable, match="adapter 'style' changed on disk during each of 3 reads of its files"):
        server.registry.get("style")
    assert len(swaps) == 3 and server.registry.list() == []
