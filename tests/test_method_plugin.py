"""The proof that a method lives in one place: a method from outside the package (tests/plugin_method,
a distribution with a `freelunch.methods` entry point) installed beside freelunch is served like
the shipped four, with no line of freelunch changed: in `freelunch serve --help`, /openapi.json, `freelunch bench`,
requests (alone and composed with Token Recycling), `usage.method_stats`, /metrics, and refused with
a 400 naming it on an engine that does not run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from test_worker_processes import metric, start_server, stop_server

PLUGIN = Path(__file__).parent / "plugin_method"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> str:
    """The plugin installed (pip, no dependencies) into a folder the server's processes import from."""
    site = tmp_path_factory.mktemp("plugin-site")
    build = tmp_path_factory.mktemp("plugin-src")
    subprocess.run(["cp", "-r", str(PLUGIN) + "/.", str(build)], check=True)  # builds leave files beside the source
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(site), str(build)],
        check=True,
    )  # fmt: skip
    return str(site)


@pytest.fixture
def with_plugin(plugin_site, monkeypatch) -> str:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (plugin_site, os.environ.get("PYTHONPATH")) if p))
    return plugin_site


def test_the_plugin_method_is_served_like_the_shipped_ones(with_plugin, tiny_llama):
    help_text = subprocess.run(
        [sys.executable, "-m", "freelunch.cli", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--prompt-contrast {off,on}" in help_text and "--speculative" in help_text

    proc, base = start_server(tiny_llama[0], 1)
    try:
        schema = httpx.get(base + "/openapi.json").json()
        text = str(schema)
        assert "prompt_contrast" in text and "contrast against a null prompt" in text

        def complete(**methods) -> dict:
            body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "ignore_eos": True, **methods}
            r = httpx.post(base + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()

        alone = complete(prompt_contrast={"alpha": 0.5})
        stats = alone["usage"]["method_stats"]["prompt_contrast"]
        assert stats["alpha"] == 0.5 and stats["contrasted_steps"] == 8 and stats["extra_rows"] == 1
        both = complete(prompt_contrast={"alpha": 0.5}, speculative={"method": "token_recycling"})
        assert set(both["usage"]["method_stats"]) >= {"prompt_contrast", "speculative"}
        assert both["choices"][0]["text"] == alone["choices"][0]["text"], "Token Recycling over the plugin is lossless"

        bad = httpx.post(base + "/v1/completions", json={"prompt": "x", "prompt_contrast": {"alpha": 9}}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt_contrast.alpha"
        assert metric(base, "freelunch_prompt_contrast_steps_total") >= 8
        assert 'freelunch_method_requests_total{method="prompt_contrast"}' in httpx.get(base + "/metrics").text

        out = Path(with_plugin).parent / "bench.json"
        bench = [sys.executable, "-m", "freelunch.cli", "bench", "--url", base, "--options", "prompt_contrast",
                 "--repeats", "1", "--concurrency", "1", "--max-tokens", "4", "--out", str(out), "--no-progress"]  # fmt: skip
        subprocess.run(bench, check=True, capture_output=True)
        row = json.loads(out.read_text())["methods"]["prompt_contrast"]
        assert row["status"] == "ok" and row["options"] == {"prompt_contrast": {"alpha": 0.5}} and row["decode_tps"] > 0
    finally:
        stop_server(proc)


@pytest.mark.vllm
def test_an_engine_without_the_plugin_method_refuses_it_naming_it(with_plugin, tiny_llama):
    pytest.importorskip("vllm", reason="the vllm extra is not installed")
    from test_vllm_backend import TINY
    from tiny_models import build_tiny_model

    folder = Path(with_plugin).parent / "tiny-hd32"
    build_tiny_model(folder, "llama", seed=3, **TINY)  # vLLM's CPU attention takes head_dim 32 and up
    proc, base = start_server(folder, 1, "--engine", "vllm", "--enforce-eager")
    try:
        r = httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "prompt_contrast": {}}, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "prompt_contrast" and "--native-workers" in r.json()["error"]["message"]
    finally:
        stop_server(proc)


class _Point:
    """An entry point as importlib.metadata lists it."""

    def __init__(self, name: str, value: str, loaded: object) -> None:
        self.name, self.value, self._loaded = name, value, loaded

    def load(self) -> object:
        return self._loaded


@pytest.mark.parametrize("case", ["two with one option", "not a spec", "a spec under another name"])
def test_the_registry_refuses_what_would_silently_replace_a_method(monkeypatch, case):
    import freelunch.methods as methods
    from freelunch.methods.guidance import SPEC

    points = {
        "two with one option": [_Point("guidance", "a:SPEC", SPEC), _Point("guidance", "b:SPEC", SPEC)],
        "not a spec": [_Point("guidance", "a:thing", object())],
        "a spec under another name": [_Point("speculative", "a:SPEC", SPEC)],
    }[case]
    monkeypatch.setattr(methods, "entry_points", lambda group: points if group == methods.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(methods, "_loaded", False)
    monkeypatch.setattr(methods, "METHODS", {})
    with pytest.raises(RuntimeError, match="two installed methods|is not the MethodSpec"):
        methods.load_methods()
