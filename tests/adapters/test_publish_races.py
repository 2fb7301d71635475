"""Publishes of one adapter name that overlap: two writers of a new name at once, and a
publish whose caller gave up while its files were being written (a MergeAdapters timed out
on, then sent again corrected); and a publish of files the server would refuse to load."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tandem.server import atomic_files
from tandem.server.adapters import registry as registry_module
from tandem.server.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, content_hash
from tandem.server.adapters.router_format import router_config, router_files
from tandem.server.atomic_files import TEMP_PREFIX, write_directory
from tandem.server.errors import FailedPrecondition, IncompatibleAdapter, NotFound
from tandem.server.model.lora_targets import group_linears
from tests.adapters.make_adapters import make_adapter
from tests.engine.helpers import make_engine


@pytest.fixture
def root(tmp_path, tiny_hf_model) -> Path:
    """An adapters directory with "style" (served first) and the sources "src1" and "src2"."""
    root = tmp_path / "adapters"
    for name, seed in (("style", 1), ("src1", 2), ("src2", 3)):
        make_adapter(tiny_hf_model, root / name, r=4, seed=seed)
    return root


def registry_of(tiny_hf_model, tokenizer, root: Path):
    engine = make_engine(tiny_hf_model, tokenizer, adapters_dir=str(root), max_lora_rank=8, kv_cache_bytes=1 << 22, adapter_refresh_seconds=0)
    return engine.registry


def weights_of(directory: Path) -> tuple[dict, dict]:
    return json.loads((directory / CONFIG_FILE).read_text()), load_file(directory / WEIGHTS_FILE)


def both_look_first(monkeypatch, target: Path, late: str | None = None) -> None:
    """Each writer of target waits (up to 2 s) at its look for target until the other has
    looked too, so that both find it missing; the thread named `late` then waits until the
    other's version is in place before going on."""
    both_looked = threading.Barrier(2)
    exists = Path.exists

    def looked(path: Path, *args, **kwargs) -> bool:
        found = exists(path, *args, **kwargs)
        if path == target:
            try:
                both_looked.wait(2)
            except threading.BrokenBarrierError:
                pass  # the other writer is not there: writes of the name are one at a time
            if threading.current_thread().name == late:
                assert _wait(lambda: exists(target))
        return found

    monkeypatch.setattr(Path, "exists", looked)


def _wait(predicate, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def no_leftovers(root: Path) -> bool:
    return not list(root.glob(f"{TEMP_PREFIX}*"))


def test_two_first_publishes_of_one_name_at_once_both_succeed(tiny_hf_model, smollm2_tokenizer, root, monkeypatch):
    """Both looked, found the name missing and renamed their folder onto it: the second rename
    failed with ENOTEMPTY, unmapped (INTERNAL; a fine-tuning job marked publish_failed after
    its whole run). Now they run one after the other, and the later one's files stay."""
    registry = registry_of(tiny_hf_model, smollm2_tokenizer, root)
    landed = []

    def recorded(path, files, **kwargs):
        write_directory(path, files, **kwargs)
        landed.append(files)

    monkeypatch.setattr(registry_module, "write_directory", recorded)
    both_look_first(monkeypatch, root / "fresh")
    with ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(registry.publish, "fresh", *weights_of(root / source)) for source in ("src1", "src2")]
        infos = [call.result(60) for call in calls]
    assert len(landed) == 2
    assert {n: (root / "fresh" / n).read_bytes() for n in landed[-1]} == dict(landed[-1])
    served = registry.get("fresh")
    assert served.content_hash == content_hash(root / "fresh") and served.content_hash in {i.content_hash for i in infos}
    assert [(i.name, i.content_hash) for i in registry.list()] == [("fresh", served.content_hash)]
    assert no_leftovers(root)


def test_a_name_made_by_another_writer_after_the_look_is_replaced(tmp_path, monkeypatch):
    """Two replicas' first writes of one name (no lock between them): the one whose rename
    finds the name made meanwhile swaps its version in, as over any older version."""
    target = tmp_path / "fresh"
    both_look_first(monkeypatch, target, late="late")
    versions = {"early": {"a.bin": b"early" * 100, "b.bin": b"1"}, "late": {"a.bin": b"late" * 50, "c.bin": b"2"}}
    failures = []

    def write(name: str) -> None:
        try:
            write_directory(target, versions[name])
        except BaseException as exc:
            failures.append(exc)

    writers = [threading.Thread(target=write, args=(name,), name=name) for name in versions]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(30)
    assert failures == []
    assert {p.name: p.read_bytes() for p in target.iterdir()} == versions["late"]
    assert no_leftovers(tmp_path)


def test_a_publish_abandoned_mid_write_publishes_nothing(tiny_hf_model, smollm2_tokenizer, root, monkeypatch):
    """The caller's going was checked only before the write: one that went while the files
    were written (fsynced) still replaced the name and was loaded."""
    registry = registry_of(tiny_hf_model, smollm2_tokenizer, root)
    old = registry.get("style")
    abandoned = threading.Event()
    write_synced = atomic_files._write_synced

    def caller_goes_meanwhile(path: Path, data: bytes) -> None:
        write_synced(path, data)
        abandoned.set()

    monkeypatch.setattr(atomic_files, "_write_synced", caller_goes_meanwhile)
    with pytest.raises(FailedPrecondition, match="the call that would write adapter 'style' was cancelled: nothing was written"):
        registry.compress("style", "src1", 1.0, abandoned)
    assert abandoned.is_set() and content_hash(root / "style") == old.content_hash
    assert registry.get("style") is old
    assert [i.content_hash for i in registry.list() if i.name == "style"] == [old.content_hash]
    assert no_leftovers(root)


def test_a_publish_abandoned_mid_write_does_not_overwrite_the_one_sent_again(tiny_hf_model, smollm2_tokenizer, root, monkeypatch):
    """M1's caller timed out while M1 wrote, and sent M2, corrected: M2 was written and
    loaded, then M1's swap landed and M1 was loaded, the stale result on disk and served."""
    registry = registry_of(tiny_hf_model, smollm2_tokenizer, root)
    registry.get("style")
    m1_writing, release = threading.Event(), threading.Event()
    write_synced = atomic_files._write_synced

    def m1_slow(path: Path, data: bytes) -> None:
        if threading.current_thread().name == "m1":
            m1_writing.set()
            release.wait(30)
        write_synced(path, data)

    monkeypatch.setattr(atomic_files, "_write_synced", m1_slow)
    m1_gone, ended = threading.Event(), {}

    def call(name: str, source: str, abandoned: threading.Event) -> None:
        try:
            ended[name] = registry.compress("style", source, 1.0, abandoned)
        except Exception as exc:
            ended[name] = exc

    m1 = threading.Thread(target=call, args=("m1", "src1", m1_gone), name="m1")
    m2 = threading.Thread(target=call, args=("m2", "src2", threading.Event()), name="m2")
    try:
        m1.start()
        assert m1_writing.wait(30)
        m1_gone.set()  # M1's deadline passed: its caller sends M2
        m2.start()
        m2.join(2)  # before the fix M2 ended here; now it waits for M1's write to end
    finally:
        release.set()
        m1.join(60)
        m2.join(60)
    assert isinstance(ended["m1"], FailedPrecondition) and "nothing was written" in str(ended["m1"])
    m2_info = ended["m2"]
    assert registry_of(tiny_hf_model, smollm2_tokenizer, root).get("style").content_hash == m2_info.content_hash  # on disk
    assert registry.get("style").content_hash == m2_info.content_hash
    assert [(i.name, i.content_hash) for i in registry.list() if i.name == "style"] == [("style", m2_info.content_hash)]
    assert no_leftovers(root)


@pytest.mark.parametrize("refused", ["rank", "overflow", "router"])
def test_files_the_load_would_refuse_are_not_published(tiny_hf_model, smollm2_tokenizer, root, tmp_path, refused):
    """The files were written over the name, then loaded: a version the load refused (a rank
    past --max-lora-rank, weights that overflow the slots once scaled, a router over an
    expert that cannot be served) failed the publish, "nothing published", and stayed the
    name's version on disk, served after an eviction, a restart or by another replica."""
    registry = registry_of(tiny_hf_model, smollm2_tokenizer, root)
    before = registry.get("style").content_hash
    on_disk = {p.name: p.read_bytes() for p in (root / "style").iterdir()}
    config, tensors = weights_of(root / "src1")
    if refused == "rank":
        config, tensors = weights_of(make_adapter(tiny_hf_model, tmp_path / "r16", r=16))
        files, error, message = None, IncompatibleAdapter, "adapter 'style' has rank 16 on .*, the server's maximum is 8"
    elif refused == "overflow":
        config["lora_alpha"] = 1e6  # B scaled by 1e6 / 4 as a slot holds it: past float32's 3.4e38
        tensors[next(k for k in tensors if "lora_B" in k)][0, 0] = 1e36
        files, error, message = None, IncompatibleAdapter, "adapter 'style' overflows float32 in .*: its largest scaled weight is 2.5e\\+41"
    else:
        gates = {key: torch.zeros(2, linear.in_features) for key, linear in group_linears(registry.model).items() if key[1] in ("qkv", "o")}
        files, error, message = router_files(router_config(["src1", "ghost"]), gates), NotFound, "router 'style' uses expert 'ghost'"
    with pytest.raises(error, match=message):
        if files is None:
            registry.publish("style", config, tensors)
        else:
            registry.publish_router("style", files)
    assert {p.name: p.read_bytes() for p in (root / "style").iterdir()} == on_disk
    assert registry.get("style").content_hash == before and no_leftovers(root)
