"""`freelunch bench --url` against a live tiny server: the JSON it writes and the table it prints."""

import json

from freelunch.benchmark_prompts import SPEC_PROMPTS
from freelunch.cli import main


def test_bench_against_running_server(server, tmp_path, capsys):
    base, model_id, _, _ = server
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--url",
        base,
        "--max-tokens",
        "6",
        "--repeats",
        "1",
        "--concurrency",
        "1,2",
        "--spec-max-tokens",
        "8",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())

    assert result["model"] == model_id
    assert result["server"]["url"] == base and result["server"]["started_by_bench"] is False
    single = result["single_stream"]
    assert single["decode_tps"] > 0 and single["ttft_s"] > 0 and single["e2e_s"] > 0 and single["tokens"] == 6
    assert set(result["concurrency"]) == {"1", "2"}
    for row in result["concurrency"].values():
        assert row["throughput_tps"] > 0 and row["ttft_median_s"] > 0 and row["failed"] == 0

    methods = result["methods"]
    guidance = methods["guidance"]
    assert guidance["status"] == "ok", guidance
    assert guidance["decode_tps"] > 0 and guidance["speedup_vs_plain"] > 0 and guidance["ttft_ratio_vs_plain"] > 0
    # Token Recycling: warm-up on other chats, then first sight and a repeat, each against plain decoding
    spec = methods["speculative"]
    assert spec["status"] == "ok" and "warmed on 10 chats" in spec["protocol"]
    for name in ("first_sight", "repeated"):
        row = spec[name]
        assert row["speedup_vs_plain"] > 0 and row["mean_accepted_tokens_per_step"] >= 1
        chats = sum(len(convs) for convs in SPEC_PROMPTS.values())
        assert row["identical_outputs"] == row["chats"] == chats  # lossless: the same text as plain decoding
    assert methods["guidance"]["method_stats"]["guidance"]["extra_rows"] >= 1
    # the tiny Llama is dense: SCMoE is a 400 there, reported as unavailable, not as a failure
    assert methods["moe_contrast"]["status"] == "unavailable" and "dense" in methods["moe_contrast"]["reason"]
    assert methods["visual_pruning"]["status"] == "skipped"

    table = capsys.readouterr().out
    assert "| guidance |" in table and "speed vs plain" in table and "throughput @ 2 concurrent" in table
    assert "| first sight |" in table and "| repeated |" in table and "warmed on 10 chats" in table


def test_bench_unknown_option_fails_cleanly(server, tmp_path, capsys):
    base = server[0]
    assert (
        main(
            [
                "bench",
                "--url",
                base,
                "--options",
                "telepathy",
                "--out",
                str(tmp_path / "x.json"),
                "--no-progress",
            ]
        )
        == 1
    )
    assert "telepathy" in capsys.readouterr().err


def test_footprint_counts_the_server_process_and_its_children(tmp_path):
    """`freelunch bench` (for a server it starts) and bench/bench_memory.py report USS and PSS of the
    API process and of each child, from /proc; the table prints them."""
    import os
    import subprocess
    import sys

    import pytest

    from freelunch.benchmark import FootprintPeak, footprint, markdown

    if not os.path.exists(f"/proc/{os.getpid()}/smaps_rollup"):
        pytest.skip("needs Linux's /proc")
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(30)"])
    try:
        with FootprintPeak(os.getpid(), 0.05) as peak:
            for _ in range(100):  # until the child holds its 64 MiB
                now = footprint(os.getpid())
                mine = [c for c in now["children"] if c["pid"] == child.pid]
                if mine and mine[0]["uss_mib"] > 64:
                    break
                __import__("time").sleep(0.1)
    finally:
        child.kill()
        child.wait()
    assert mine and mine[0]["role"] == "child" and mine[0]["pss_mib"] >= 64
    assert now["api_uss_mib"] > 0 and now["total_uss_mib"] >= now["api_uss_mib"] + mine[0]["uss_mib"] - 0.2
    assert peak.peak is not None and peak.peak["total_uss_mib"] >= now["api_uss_mib"]
    result = {
        "model": "m", "server": {"url": "u"}, "settings": {"max_tokens": 2}, "machine": {},
        "single_stream": {"decode_tps": 1.0, "ttft_s": 0.1, "e2e_s": 1.0}, "concurrency": {}, "methods": {},
        "footprint": {"peak": now, "idle_after_run": now},
    }  # fmt: skip
    table = markdown(result)
    assert f"| memory, idle after run | {now['total_uss_mib']:.0f} MiB USS (API" in table and "| memory, peak |" in table
