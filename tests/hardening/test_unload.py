"""Issue 11, defect 5: UnloadAdapter keeps an adapter unloaded. The rule: an unloaded name is
refused (NOT_FOUND, saying why) until an admin loads it again; its files stay on disk."""

import pytest

from tandem.server.engine.sampling_params import SamplingParams
from tandem.server.errors import NotFound
from tests.adapters.make_adapters import make_adapter
from tests.engine.helpers import make_engine


def test_an_unloaded_adapter_stays_unloaded_until_loaded(tiny_hf_model, smollm2_tokenizer, tmp_path):
    make_adapter(tiny_hf_model, tmp_path / "style", r=4)
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, adapters_dir=str(tmp_path), max_lora_rank=8, kv_cache_bytes=8 << 20)
    registry = engine.registry
    first = registry.get("style")
    engine.add_request("running", [5, 6, 7], SamplingParams(max_new_tokens=3, ignore_eos=True), first)
    registry.unload("style")
    message = "^adapter 'style' was unloaded: an admin must load it \\(LoadAdapter\\) before it is served again$"
    for _ in range(2):  # neither the host cache nor the disk brings it back
        with pytest.raises(NotFound, match=message):
            registry.get("style")
    assert [a.name for a in registry.list()] == []
    while engine.has_work():  # the request that held it finishes on its version
        engine.step()
    with pytest.raises(NotFound, match="^adapter 'style' is not loaded$"):
        registry.unload("style")
    assert registry.load("style").content_hash == first.content_hash
    assert registry.get("style").content_hash == first.content_hash


def test_a_failed_load_leaves_an_unloaded_adapter_unloaded(tiny_hf_model, smollm2_tokenizer, tmp_path):
    """An admin unloads a bad adapter, then loads a new version from a path that turns out
    broken: the old files must not be served again."""
    from tandem.server.errors import IncompatibleAdapter

    make_adapter(tiny_hf_model, tmp_path / "style", r=4)
    (tmp_path / "style-v2").mkdir()
    (tmp_path / "style-v2" / "adapter_config.json").write_text("{not json")
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, adapters_dir=str(tmp_path), max_lora_rank=8, kv_cache_bytes=8 << 20)
    registry = engine.registry
    registry.get("style")
    registry.unload("style")
    with pytest.raises(IncompatibleAdapter):
        registry.load("style", path="style-v2")
    with pytest.raises(NotFound, match="was unloaded"):
        registry.get("style")
    assert registry.load("style").name == "style"


def test_an_unload_during_a_load_wins_with_a_clear_error(tiny_hf_model, smollm2_tokenizer, tmp_path, monkeypatch):
    """An unload landing between a load's read and its answer raised KeyError (INTERNAL, and a
    fine-tuning job publishing its adapter was marked internal_error)."""
    make_adapter(tiny_hf_model, tmp_path / "style", r=4)
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, adapters_dir=str(tmp_path), max_lora_rank=8, kv_cache_bytes=8 << 20)
    registry = engine.registry
    read = registry._read_and_cache

    def read_then_unloaded(name, directory, asked, revive=False, abandoned=None):
        adapter = read(name, directory, asked, revive, abandoned)
        registry.unload(name)
        return adapter

    monkeypatch.setattr(registry, "_read_and_cache", read_then_unloaded)
    with pytest.raises(NotFound, match="^adapter 'style' was unloaded while it was being loaded: load it again to serve it$"):
        registry.load("style")


def test_a_load_whose_caller_gave_up_loads_nothing(tiny_hf_model, smollm2_tokenizer, tmp_path):
    """LoadAdapter(sql, path=sql-v2) timed out on a slow disk; its read went on in its thread and,
    ending after the admin's next call (an unload, another load), served its version anyway."""
    import threading

    from tandem.server.adapters.router_format import router_config, write_router
    from tandem.server.errors import FailedPrecondition
    from tests.adapters.make_adapters import ALL_LINEAR
    from tests.adapters.test_routers import random_gates

    make_adapter(tiny_hf_model, tmp_path / "sql", r=4, target_modules=ALL_LINEAR, seed=1)  # a router's experts adapt
    make_adapter(tiny_hf_model, tmp_path / "sql-v2", r=4, target_modules=ALL_LINEAR, seed=2)  # all it gates
    write_router(tmp_path / "mix", router_config(["sql", "sql-v2"]), random_gates(tiny_hf_model, 2, seed=3))
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, adapters_dir=str(tmp_path), max_lora_rank=8, kv_cache_bytes=8 << 20)
    registry = engine.registry
    v1 = registry.load("sql")
    abandoned = threading.Event()
    abandoned.set()

    def refused(name):
        return pytest.raises(FailedPrecondition, match=f"^the call that would load adapter '{name}' was cancelled: nothing was loaded$")

    with refused("sql"):
        registry.load("sql", path="sql-v2", abandoned=abandoned)
    assert registry.get("sql").content_hash == v1.content_hash
    assert [(a.name, a.path, a.content_hash) for a in registry.list()] == [("sql", "sql", v1.content_hash)]
    with refused("mix"):  # a router is read, then committed, the same way
        registry.load("mix", abandoned=abandoned)
    assert "mix" not in {a.name for a in registry.list()}
    registry.unload("sql")
    with refused("sql"):
        registry.load("sql", path="sql-v2", abandoned=abandoned)
    with pytest.raises(NotFound, match="was unloaded"):
        registry.get("sql")
    assert registry.load("sql", path="sql-v2", abandoned=threading.Event()).path == "sql-v2"  # not set: loaded


def test_an_adapter_not_read_yet_is_unloaded_too_and_no_longer_offered(tiny_hf_model, smollm2_tokenizer, tmp_path):
    """A replica that had not served an adapter answered its unload NOT_FOUND, then served it
    at its first request; and the names offered (/v1/models) held unloaded adapters and the
    server's own interrupted writes."""
    import shutil

    make_adapter(tiny_hf_model, tmp_path / "style", r=4)
    make_adapter(tiny_hf_model, tmp_path / "tone", r=4)
    shutil.copytree(tmp_path / "tone", tmp_path / ".tandem-tmp-0123abcd-tone")
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, adapters_dir=str(tmp_path), max_lora_rank=8, kv_cache_bytes=8 << 20)
    registry = engine.registry
    assert registry.servable_names() == {"style", "tone"}
    registry.unload("style")
    with pytest.raises(NotFound, match="was unloaded"):
        registry.get("style")
    assert registry.servable_names() == {"tone"}
    with pytest.raises(NotFound, match="^adapter 'style' is not loaded$"):
        registry.unload("style")
    with pytest.raises(NotFound, match="'nothing' not found"):
        registry.unload("nothing")
    registry.load("style")
    assert registry.servable_names() == {"style", "tone"}


def test_a_folder_the_server_may_not_enter_is_left_out_of_the_names_offered(tiny_hf_model, smollm2_tokenizer, tmp_path, monkeypatch, caplog):
    """A shared volume's root-owned lost+found (mode 0700) raised PermissionError from the
    listing, and every /v1/models call of every replica failed (500)."""
    from pathlib import Path

    make_adapter(tiny_hf_model, tmp_path / "style", r=4)
    (tmp_path / "lost+found").mkdir()
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, adapters_dir=str(tmp_path), max_lora_rank=8, kv_cache_bytes=8 << 20)
    is_file = Path.is_file

    def not_enterable(path: Path) -> bool:  # as for a non-root user; this test may run as root
        if path.parent.name == "lost+found":
            raise PermissionError(13, "Permission denied", str(path))
        return is_file(path)

    monkeypatch.setattr(Path, "is_file", not_enterable)
    assert [engine.registry.servable_names() for _ in range(2)] == [{"style"}, {"style"}]
    assert sum("lost+found is left out of the adapters offered" in r.message for r in caplog.records) == 1


def test_a_request_s_read_overtaken_by_a_load_does_not_replace_what_the_load_made_current(tiny_hf_model, smollm2_tokenizer, tmp_path, monkeypatch):
    """A cold read of chat-v1 for a request, finishing after LoadAdapter(chat, path=chat-v2),
    cached v1 and its path over v2: every later request got v1 until the next load."""
    import threading

    make_adapter(tiny_hf_model, tmp_path / "chat", r=4, seed=1)
    make_adapter(tiny_hf_model, tmp_path / "chat-v2", r=4, seed=2)
    engine = make_engine(tiny_hf_model, smollm2_tokenizer, adapters_dir=str(tmp_path), max_lora_rank=8, kv_cache_bytes=8 << 20)
    registry = engine.registry
    read = registry._read_whole
    reading, loaded = threading.Event(), threading.Event()

    def slow_request_read(name, directory, read_files):
        result = read(name, directory, read_files)
        if directory.name == "chat":
            reading.set()
            assert loaded.wait(30)
        return result

    monkeypatch.setattr(registry, "_read_whole", slow_request_read)
    results = {}
    request = threading.Thread(target=lambda: results.setdefault("request", registry.get("chat")))
    request.start()
    assert reading.wait(30)
    v2 = registry.load("chat", path="chat-v2")
    loaded.set()
    request.join(30)
    assert results["request"].content_hash != v2.content_hash  # it asked first: it is served what it read
    assert registry.get("chat").content_hash == v2.content_hash
    assert [(a.name, a.path, a.content_hash) for a in registry.list()] == [("chat", "chat-v2", v2.content_hash)]
