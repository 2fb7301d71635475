"""Issue 11: the soak's smoke run in CI, bench/soak.py for 90 seconds (after 30 of warm-up) on
the tiny model: every kind of call it makes happened, each ended with a status it may end
with, and afterwards the server was idle, had leaked neither KV blocks, slot pins nor memory
(RSS within 5%), and gave the greedy output it gave before."""

from bench.soak import ALLOWED, SoakSettings, run_soak


def test_a_soak_leaves_the_server_as_it_found_it(tiny_model_dir, tmp_path):
    report = run_soak(SoakSettings(seconds=90, warmup_seconds=30), str(tiny_model_dir), tmp_path, dtype="float32")
    assert report.failures() == []
    assert set(report.requests) == set(ALLOWED)
    assert report.requests["generate"]["OK"] and report.requests["stream"]["OK"] and report.requests["finetune"]["SUCCEEDED"]
    assert report.requests["cancel"]["CANCELLED"] and report.requests["deadline"]["DEADLINE_EXCEEDED"]
