"""Deployment files agree with the server: Kubernetes manifests are valid, and ports, probe paths,
FREELUNCH_* settings, grace periods and dashboard metric names match what the server does."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from unittest import mock

import httpx
import kubernetes_validate
import pytest
import yaml
from freelunch.cli import build_parser, serve_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
K8S_VERSION = "1.30.0"
RENDERS = ["base", "overlays/cpu", "overlays/gpu"]
# Manifests outside the kustomizations (documented examples).
EXAMPLES = [K8S / "hpa-queue-depth.yaml"]


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def config_files() -> list[Path]:
    files = [ROOT / "docker-compose.yml", *sorted(DEPLOY.rglob("*.y*ml")), *sorted(DEPLOY.rglob("*.json"))]
    return [f for f in files if f.suffix in (".yml", ".yaml", ".json")]


@pytest.mark.parametrize("path", config_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_file_parses(path):
    docs = [json.loads(path.read_text())] if path.suffix == ".json" else load_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)


# ---- kustomize, rendered in Python (kubectl is optional; when present it cross-checks this) ----

# Strategic-merge keys of the list fields our patches touch; other lists are replaced whole.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}


def strategic_merge(base, patch, field: str | None = None):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = strategic_merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    key = MERGE_KEYS.get(field or "")
    if key and isinstance(base, list) and isinstance(patch, list):
        out = list(base)
        for item in patch:
            i = next((i for i, b in enumerate(out) if b.get(key) == item.get(key)), None)
            if i is None:
                out.append(copy.deepcopy(item))
            else:
                out[i] = strategic_merge(out[i], item)
        return out
    return copy.deepcopy(patch)


def pod_spec(doc: dict) -> dict | None:
    return doc.get("spec", {}).get("template", {}).get("spec")


def render(folder: Path) -> list[dict]:
    """What `kustomize build folder` gives for the features we use (resources, SMP patches, images)."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(k) <= KUSTOMIZATION_FIELDS, f"{folder}: teach render() {set(k) - KUSTOMIZATION_FIELDS}"
    docs: list[dict] = []
    for res in k.get("resources", []):
        path = (folder / res).resolve()
        docs += render(path) if path.is_dir() else load_docs(path)
    for entry in k.get("patches", []):
        assert set(entry) == {"path"}, "only strategic-merge patch files are rendered here"
        for patch in load_docs(folder / entry["path"]):
            (i,) = [
                i
                for i, d in enumerate(docs)
                if (d["kind"], d["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
            ]
            docs[i] = strategic_merge(docs[i], patch)
    for image in k.get("images", []):
        for doc in docs:
            for c in (pod_spec(doc) or {}).get("containers", []):
                name, _, tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}".rstrip(":")
    return docs


def rendered(which: str) -> list[dict]:
    return render(K8S / which)


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def canonical(obj):
    """Order-insensitive form, to compare our render with kustomize's."""
    if isinstance(obj, dict):
        return {k: canonical(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return sorted((canonical(v) for v in obj), key=lambda v: json.dumps(v, sort_keys=True))
    return obj


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("which", RENDERS)
def test_python_render_matches_kustomize(which):
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / which)], capture_output=True, text=True, check=True
    ).stdout
    assert canonical([d for d in yaml.safe_load_all(out) if d]) == canonical(rendered(which))


def k8s_problems(docs: list[dict]) -> list[str]:
    problems = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as e:
            problems.append(f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {e}")
    return problems


@pytest.mark.parametrize("which", RENDERS)
def test_manifests_are_valid_kubernetes(which):
    docs = rendered(which)
    assert {d["kind"] for d in docs} == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
    }
    assert k8s_problems(docs) == []


def test_example_manifests_are_valid_kubernetes():
    assert k8s_problems([d for path in EXAMPLES for d in load_docs(path)]) == []


# ---- the server's side: routes, env vars it reads, effective settings ----


def get_routes() -> set[str]:
    from freelunch.api.routes import build_router
    from freelunch.methods import method_specs

    return {r.path for r in build_router(method_specs()).routes if "GET" in getattr(r, "methods", ())}


def env_vars_read() -> set[str]:
    """FREELUNCH_* names the server reads: each `serve` flag's (config.py derives the name from the
    flag), and the quoted literals in its source (FREELUNCH_CACHE_DIR, the kernel switches, ...)."""
    from freelunch.config import env_name

    serve = serve_parser(build_parser())
    names = {env_name(a.option_strings[0]) for a in serve._actions if a.option_strings and a.dest != "help"}
    for f in (ROOT / "service").rglob("*.py"):
        names |= set(re.findall(r"""["'](FREELUNCH_[A-Z0-9_]+)["']""", f.read_text()))
    return names


def unread_env(names) -> list[str]:
    read = env_vars_read()
    return sorted(n for n in names if n.startswith("FREELUNCH_") and n not in read)


def test_cli_flags_have_their_env_vars():
    # The settings the deployment files rely on are flags, and the server reads them.
    env = {"FREELUNCH_HOST": "0.0.0.0", "FREELUNCH_PORT": "9001", "FREELUNCH_DRAIN_TIMEOUT": "7", "FREELUNCH_ENGINE": "vllm",
           "FREELUNCH_API_KEY": "k1,k2", "FREELUNCH_PREFIX_CACHING": "0", "FREELUNCH_THREADS": "3"}
    settings = cli_settings(env)
    assert (settings.host, settings.port, settings.drain_timeout, settings.engine) == ("0.0.0.0", 9001, 7.0, "vllm")
    assert settings.api_keys__env == ("k1", "k2") and settings.enable_prefix_caching is False and settings.num_threads == 3
    assert set(env) <= env_vars_read()
    with pytest.raises(ValueError, match="FREELUNCH_PORT='eighty' is not an integer"):
        cli_settings({"FREELUNCH_PORT": "eighty"})


def cli_settings(env: dict[str, str]):
    """The `freelunch serve` settings a process with this environment gets."""
    from freelunch.cli import build_parser

    clean = {k: v for k, v in os.environ.items() if not k.startswith("FREELUNCH_")}
    with mock.patch.dict(
        os.environ, {**clean, **{k: v for k, v in env.items() if k.startswith("FREELUNCH_")}}, clear=True
    ):
        return build_parser().parse_args(["serve"])


# ---- Dockerfile ----


def dockerfile_stages() -> dict[str, dict]:
    """Per stage: env, expose, user, healthcheck (port, path). Comments dropped, continuations joined."""
    text = "\n".join(
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")
    )
    stages: dict[str, dict] = {}
    stage: dict = {}
    for line in text.replace("\\\n", " ").splitlines():
        instr, _, rest = line.strip().partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            words = rest.split()
            name = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else str(len(stages))
            stage = stages[name] = {"env": {}, "expose": [], "user": "root", "healthcheck": None}
        elif instr == "ENV":
            tokens = shlex.split(rest)
            if all("=" in t for t in tokens):
                stage["env"].update(t.split("=", 1) for t in tokens)
            else:  # legacy `ENV KEY value`
                stage["env"][tokens[0]] = " ".join(tokens[1:])
        elif instr == "EXPOSE":
            stage["expose"] += [int(p.split("/")[0]) for p in rest.split()]
        elif instr == "USER":
            stage["user"] = rest.strip()
        elif instr == "HEALTHCHECK":
            m = re.search(r"http://[^/:'\"]+:(\d+)(/[^'\"\s]*)", rest)
            stage["healthcheck"] = (int(m.group(1)), m.group(2)) if m else None
    return stages


RUNTIME_STAGES = ["cpu", "cuda"]


def test_dockerfile_targets():
    stages = dockerfile_stages()
    assert list(stages)[-1] == "cpu", "cpu must stay the last stage: `docker build .` builds it"
    assert stages["cuda"]["env"].get("FREELUNCH_ENGINE") == "vllm"
    routes = get_routes()
    for name in RUNTIME_STAGES:
        s = stages[name]
        settings = cli_settings(s["env"])
        assert s["user"] not in ("root", "0"), name
        assert settings.host == "0.0.0.0", f"{name}: the server must listen beyond the container"
        assert s["expose"] == [settings.port], name
        assert s["healthcheck"] == (settings.port, "/health") and "/health" in routes, name
        assert unread_env(s["env"]) == [], name


def test_dockerfile_extras_exist():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = re.findall(
        r"""pip install [^\n]*?["']?\.\[([a-z0-9_,-]+)\]""", (ROOT / "Dockerfile").read_text()
    )
    missing = {e for group in wanted for e in group.split(",")} - set(extras)
    assert not missing, f"the Dockerfile installs extras pyproject.toml lacks: {missing}"


# ---- Kubernetes against the server and the image ----


def image_stage(image: str) -> str:
    """Dockerfile target an image tag names; no tag = the default (last) target."""
    tag = image.partition(":")[2]
    return tag if tag in RUNTIME_STAGES else list(dockerfile_stages())[-1]


def container_env(docs: list[dict]) -> dict[str, str]:
    """The container's environment: image ENV, then envFrom ConfigMaps, then env (Secrets as keys)."""
    deployment = one(docs, "Deployment")
    (c,) = pod_spec(deployment)["containers"]
    env = dict(dockerfile_stages()[image_stage(c["image"])]["env"])
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("ConfigMap", "Secret")}
    for source in c.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        doc = maps[ref["name"]]
        env.update(doc.get("data", {}), **doc.get("stringData", {}))
    for e in c.get("env", []):
        env[e["name"]] = e.get("value", "<from secret>")
    return env


def prestop_sleep(container: dict) -> float:
    cmd = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return float(cmd[1]) if cmd[:1] == ["sleep"] else 0.0


@pytest.mark.parametrize("which", RENDERS)
def test_kubernetes_agrees_with_server(which):
    docs = rendered(which)
    deployment = one(docs, "Deployment")
    spec = pod_spec(deployment)
    (c,) = spec["containers"]
    env = container_env(docs)
    settings = cli_settings(env)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert list(ports.values()) == [settings.port] and settings.host == "0.0.0.0"

    def port(ref):
        return ports[ref] if isinstance(ref, str) else ref

    routes = get_routes()
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/ready" and probes["livenessProbe"]["path"] == "/health"
    for get in probes.values():
        assert get["path"] in routes and port(get["port"]) == settings.port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert (
        int(annotations["prometheus.io/port"]) == settings.port
        and annotations["prometheus.io/path"] in routes
    )

    service = one(docs, "Service")
    assert [port(p["targetPort"]) for p in service["spec"]["ports"]] == [settings.port]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert (
        one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"]
        == deployment["metadata"]["name"]
    )

    assert unread_env(env) == []
    secret_keys = [e["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert "FREELUNCH_API_KEY" in secret_keys
    assert spec["terminationGracePeriodSeconds"] > settings.drain_timeout + prestop_sleep(c)

    # Non-root, read-only root filesystem, with writable mounts where the server writes.
    dockerfile_user = dockerfile_stages()[image_stage(c["image"])]["user"]
    assert (
        spec["securityContext"]["runAsNonRoot"]
        and str(spec["securityContext"]["runAsUser"]) == dockerfile_user
    )
    assert c["securityContext"]["readOnlyRootFilesystem"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", env["HOME"]} <= mounts
    assert c["resources"]["limits"]["cpu"] == str(settings.num_threads), (
        "FREELUNCH_THREADS should match the CPU limit"
    )

    gpu = which == "overlays/gpu"
    assert image_stage(c["image"]) == ("cuda" if gpu else "cpu")
    assert settings.engine == ("vllm" if gpu else "native")
    assert ("nvidia.com/gpu" in c["resources"]["limits"]) == gpu
    if gpu:
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
        assert spec["nodeSelector"] and spec["tolerations"]


def test_queue_depth_hpa_matches_adapter_rule(exported):
    names, _ = exported
    (hpa,) = load_docs(K8S / "hpa-queue-depth.yaml")
    (metric,) = hpa["spec"]["metrics"]
    rules = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    exposed = {r["name"]["as"]: r for r in rules}
    rule = exposed[metric["pods"]["metric"]["name"]]
    assert promql_problems(rule["seriesQuery"], names) == []
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(rendered("base"), "Deployment")["metadata"]["name"]


# ---- docker compose and Prometheus ----


def compose_env(service: dict) -> dict[str, str]:
    # `${VAR:-default}` as compose interpolates it with VAR unset.
    return {
        k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in service.get("environment", {}).items()
    }


def seconds(duration: str) -> float:
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    return int(parts.group(1) or 0) * 60 + int(parts.group(2) or 0)


def test_compose_and_prometheus_agree_with_server():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    server = compose["freelunch"]
    env = {**dockerfile_stages()[server["build"]["target"]]["env"], **compose_env(server)}
    settings = cli_settings(env)
    assert unread_env(env) == []
    assert [int(str(p).rsplit(":", 1)[1]) for p in server["ports"]] == [settings.port]
    assert seconds(server["stop_grace_period"]) > settings.drain_timeout

    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] in get_routes()
    (target,) = [t for sc in job["static_configs"] for t in sc["targets"]]
    host, port = target.split(":")
    assert host == "freelunch" and int(port) == settings.port

    grafana = compose["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/freelunch.yml").read_text())
    (path,) = [p["options"]["path"] for p in provider["providers"]]
    assert mounts["./deploy/grafana/dashboards"] == path
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    sources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    (source,) = sources
    assert source["url"].split("//")[1].split(":")[0] in compose
    dash = json.loads((DEPLOY / "grafana/dashboards/freelunch.json").read_text())
    assert {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]} == {source["uid"]}


# ---- the Grafana dashboard's PromQL against a real /metrics scrape ----


def exported_series(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Series names a scrape exposes (counters as _total/_created, histograms as
    _bucket/_count/_sum/_created, from the TYPE lines, so label-only families count too), and
    the label names seen per series."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("_count", "_sum", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        for sample in family.samples:
            names.add(sample.name)
            labels.setdefault(sample.name, set()).update(sample.labels)
    return names, labels


# Labels Prometheus adds at scrape time, and histogram_quantile's bucket bound.
SCRAPE_LABELS = {"le", "instance", "job", "namespace", "pod"}


def promql_problems(
    expr: str, names: set[str], labels: dict[str, set[str]] | None = None, legend: str = ""
) -> list[str]:
    used = set(re.findall(r"\b(freelunch_[A-Za-z0-9_:]+)", expr))
    problems = [f"{n} is not exported" for n in sorted(used - names)]
    if not used:
        problems.append(f"no freelunch metric in {expr!r}")
    known = [labels[n] for n in used if labels and n in labels]
    if known:  # label names are known only for series the scrape had samples of
        allowed = set().union(*known) | SCRAPE_LABELS
        grouped = {g.strip() for group in re.findall(r"\bby\s*\(([^)]*)\)", expr) for g in group.split(",")}
        grouped |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        problems += [f"label {g} not on {sorted(used)}" for g in sorted(grouped - allowed - {""})]
    if "histogram_quantile" in expr and not any(n.endswith("_bucket") for n in used):
        problems.append(f"histogram_quantile over no _bucket series: {expr!r}")
    return problems


@pytest.fixture(scope="module")
def exported(server):
    """(series names, labels per series) from /metrics of a real server that finished a guided
    request and timed one out, so that the labelled families have samples."""
    base, model, _, _ = server
    r = httpx.post(
        base + "/v1/completions",
        timeout=60,
        json={
            "model": model,
            "prompt": "hello",
            "max_tokens": 3,
            "temperature": 0,
            "guidance": {"scale": 2.0},
        },
    )
    assert r.status_code == 200, r.text
    r = httpx.post(
        base + "/v1/completions",
        timeout=60,
        json={"model": model, "prompt": "hello", "max_tokens": 400, "ignore_eos": True, "timeout": 0.001},
    )
    assert r.status_code == 408, r.text
    return exported_series(httpx.get(base + "/metrics").text)


def dashboard_targets() -> list[dict]:
    dash = json.loads((DEPLOY / "grafana/dashboards/freelunch.json").read_text())
    return [t for p in dash["panels"] for t in p["targets"]]


# The dashboard covers every group of server metrics the deployment is watched by.
DASHBOARD_MUST_USE = [
    "freelunch_request_success_total",
    "freelunch_request_failure_total",
    "freelunch_time_to_first_token_seconds_bucket",
    "freelunch_time_per_output_token_seconds_bucket",
    "freelunch_e2e_request_latency_seconds_bucket",
    "freelunch_prompt_tokens_total",
    "freelunch_generation_tokens_total",
    "freelunch_requests_running",
    "freelunch_requests_waiting",
    "freelunch_kv_cache_usage_ratio",
    "freelunch_workers_alive",
    "freelunch_spec_decode_num_accepted_tokens_total",
    "freelunch_spec_decode_num_draft_tokens_total",
    "freelunch_method_requests_total",
]


def test_dashboard_metrics_are_exported(exported):
    names, labels = exported
    targets = dashboard_targets()
    problems = [
        p for t in targets for p in promql_problems(t["expr"], names, labels, t.get("legendFormat", ""))
    ]
    assert problems == []
    used = " ".join(t["expr"] for t in targets)
    assert [m for m in DASHBOARD_MUST_USE if not re.search(rf"\b{m}\b", used)] == []
    # A guided request shows under its method.
    assert "method" in labels["freelunch_method_requests_total"]
    assert "reason" in labels["freelunch_request_failure_total"]


def test_checks_catch_mistakes(exported):
    """Each check above fails on the mistakes it exists for."""
    names, labels = exported
    assert promql_problems("rate(freelunch_request_succes_total[5m])", names)  # typo
    assert promql_problems("rate(freelunch_requests_running_total[5m])", names)  # gauge has no _total
    assert promql_problems("histogram_quantile(0.5, rate(freelunch_e2e_request_latency_seconds[5m]))", names)
    assert promql_problems(
        "sum by (finish_reason) (rate(freelunch_request_success_total[5m]))", names, labels
    )
    assert promql_problems("sum(rate(freelunch_request_success_total[5m]))", names, labels, "{{model}}")
    assert not promql_problems(
        "sum by (finished_reason) (rate(freelunch_request_success_total[5m]))", names, labels
    )
    assert unread_env({"FREELUNCH_PORTS": "8000", "FREELUNCH_PORT": "8000"}) == ["FREELUNCH_PORTS"]
    bad = copy.deepcopy(one(rendered("base"), "Deployment"))
    pod_spec(bad)["containers"][0]["ports"][0]["containerPort"] = "8000"
    assert k8s_problems([bad])
    assert cli_settings({"FREELUNCH_DRAIN_TIMEOUT": "99"}).drain_timeout == 99
    merged = strategic_merge(
        {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}]}]},
        {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}]}]},
    )
    assert merged["containers"][0]["env"] == [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]
