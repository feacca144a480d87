"""deploy/k8s: every rendered manifest validates against the Kubernetes JSON schemas bundled in the
kubernetes-validate package (strict: unknown fields fail), for the oldest supported Kubernetes
(1.27: gRPC probes GA) and the newest the package knows; then the pieces fit together."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate  # the `test` extra; its package data holds the schemas
import pytest
import yaml
from tests.deploy.k8s_render import load_documents, render

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
OLDEST = "1.27"
VERSIONS = (OLDEST, kubernetes_validate.utils.latest_version())
TIERS = {"gateway": 50051, "tokenizer": 50052, "scheduler": 50053, "executor": 50054}


def validate(doc: dict, version: str) -> None:
    """Raises kubernetes_validate.ValidationError (bad manifest) or SchemaNotFoundError (unknown
    kind/apiVersion for that Kubernetes version)."""
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(K8S / "overlays" / request.param)


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict) -> dict:
    (c,) = pod_spec(deployment)["containers"]
    return c


# --- schema validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("target", ["base", "components/redis", "overlays/cpu", "overlays/gpu"])
def test_rendered_manifests_validate(target, version):
    docs = render(K8S / target)
    assert docs
    for doc in docs:
        try:
            validate(doc, version)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(f"{target}: {doc['kind']}/{doc['metadata']['name']} at {path}: {err.message}")


def test_every_manifest_file_is_checked():
    """Each YAML file under deploy/k8s is a kustomization or reachable from one we render."""
    rendered_from = {p.resolve() for t in ("base", "components/redis", "overlays/cpu", "overlays/gpu")
                     for p in _files_of(K8S / t)}
    assert {p.resolve() for p in K8S.rglob("*.yaml")} == rendered_from


def _files_of(directory: Path) -> set[Path]:
    (kustomization,) = load_documents(directory / "kustomization.yaml")
    files = {directory / "kustomization.yaml"}
    for entry in kustomization.get("resources", []) + kustomization.get("components", []):
        path = directory / entry
        files |= _files_of(path) if path.is_dir() else {path}
    files |= {directory / p["path"] for p in kustomization.get("patches", [])}
    return files


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda d: container(d).update(readinesProbe=container(d).pop("readinessProbe")), "readinesProbe"),
        (lambda d: d["spec"].update(replicas="two"), "'two' is not of type 'integer'"),
        (lambda d: container(d)["livenessProbe"]["grpc"].update(port="grpc"),
         "'grpc' is not of type 'integer'"),
        (lambda d: container(d).pop("name"), "'name' is a required property"),
        (lambda d: container(d)["resources"].update(requests=["cpu"]), "is not of type 'object'"),
    ],
    ids=["misspelt-field", "wrong-type", "grpc-probe-named-port", "missing-required", "bad-shape"],
)
def test_broken_manifest_fails_validation(breakage, expected):
    (gateway,) = [d for d in render(K8S / "base") if d["kind"] == "Deployment"
                  and d["metadata"]["name"] == "taxiway-gateway"]
    validate(gateway, OLDEST)  # sound before the breakage
    broken = copy.deepcopy(gateway)
    breakage(broken)
    with pytest.raises(kubernetes_validate.ValidationError) as err:
        validate(broken, OLDEST)
    assert expected in err.value.message


def test_unknown_kind_is_not_silently_accepted():
    doc = {"apiVersion": "autoscaling/v9", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate(doc, OLDEST)


def test_field_missing_in_oldest_version_is_caught():
    """The versioned schemas matter: the `sleep` preStop handler arrived after 1.27."""
    (gateway,) = [d for d in render(K8S / "base") if d["metadata"]["name"] == "taxiway-gateway"
                  and d["kind"] == "Deployment"]
    container(gateway)["lifecycle"]["preStop"] = {"sleep": {"seconds": 5}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(gateway, OLDEST)
    validate(gateway, VERSIONS[-1])


# --- kustomize itself, where installed -----------------------------------------------------------

def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("target", ["base", "overlays/cpu", "overlays/gpu"])
def test_real_kustomize_renders_the_same(target):
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    out = subprocess.run(command + [str(K8S / target)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout) if d}
    ours = {(d["kind"], d["metadata"]["name"]): d for d in render(K8S / target)}
    assert theirs == ours


# --- the pieces fit together --------------------------------------------------------------------

def test_each_tier_has_deployment_services_and_pdb(overlay):
    _, docs = overlay
    deployments, services, pdbs = by_kind(docs, "Deployment"), by_kind(docs, "Service"), by_kind(
        docs, "PodDisruptionBudget")
    for tier in TIERS:
        name = f"taxiway-{tier}"
        assert name in deployments and name in pdbs
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert deployments[name]["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert pdbs[name]["spec"]["selector"]["matchLabels"].items() <= labels.items()
        # headless for client-side balancing, except the gateway's public ClusterIP one
        assert services[name]["spec"].get("clusterIP") == (None if tier == "gateway" else "None")
    assert services["taxiway-gateway-headless"]["spec"]["clusterIP"] == "None"
    assert "taxiway-redis" in deployments and "taxiway-redis" in services


def test_services_select_pods_and_target_real_ports(overlay):
    _, docs = overlay
    pods = [(d["spec"]["template"]["metadata"]["labels"], container(d))
            for d in by_kind(docs, "Deployment").values()]
    for name, service in by_kind(docs, "Service").items():
        selected = [c for labels, c in pods if service["spec"]["selector"].items() <= labels.items()]
        assert selected, f"Service {name} selects no pod"
        for port in service["spec"]["ports"]:
            ports = selected[0]["ports"]
            names = {p.get("name") for p in ports} | {p["containerPort"] for p in ports}
            assert port["targetPort"] in names, f"Service {name} targets {port['targetPort']}"


def test_probes_drain_and_scrape_annotations(overlay):
    _, docs = overlay
    deployments = by_kind(docs, "Deployment")
    for tier, port in TIERS.items():
        d = deployments[f"taxiway-{tier}"]
        c = container(d)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": port}, (tier, probe)
        openai = {8000} if tier == "gateway" else set()  # the gateway's OpenAI-compatible API
        assert {p["containerPort"] for p in c["ports"]} == {port, port - 50051 + 9091, *openai}
        sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
        assert pod_spec(d)["terminationGracePeriodSeconds"] >= sleep + 20
        # SIGTERM comes after the preStop sleep; the drain must end before the SIGKILL
        drain = float({e["name"]: e.get("value") for e in c["env"]}["TAXIWAY_DRAIN_TIMEOUT_S"])
        assert sleep + drain + 5 <= pod_spec(d)["terminationGracePeriodSeconds"], tier
        annotations = d["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == port - 50051 + 9091
        assert annotations["prometheus.io/path"] == "/metrics"
        assert c["args"] == ["--role", tier]
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod_spec(d)["securityContext"]["runAsNonRoot"] is True


def test_config_maps_exist_and_are_wired(overlay):
    _, docs = overlay
    maps = by_kind(docs, "ConfigMap")
    env = maps["taxiway-env"]["data"]
    assert env["TAXIWAY_TOKENIZER_ADDRESS"] == "dns:///taxiway-tokenizer:50052"
    assert env["TAXIWAY_REDIS_URL"].startswith("redis://taxiway-redis:6379")
    assert isinstance(yaml.safe_load(maps["taxiway-config"]["data"]["taxiway.yaml"]), dict)
    for name, d in by_kind(docs, "Deployment").items():
        if name == "taxiway-redis":
            continue
        assert container(d)["envFrom"] == [{"configMapRef": {"name": "taxiway-env"}}]
        volumes = {v["name"]: v for v in pod_spec(d)["volumes"]}
        assert volumes["config"]["configMap"]["name"] == "taxiway-config"
        mounts = {m["mountPath"]: m["name"] for m in container(d)["volumeMounts"]}
        assert mounts["/etc/taxiway"] == "config" and mounts["/var/cache/taxiway"] == "cache"
        if container(d)["securityContext"].get("readOnlyRootFilesystem"):
            assert {"/tmp", "/home/taxiway"} <= set(mounts), name
        assert env["TAXIWAY_CONFIG"].startswith("/etc/taxiway/")


def test_autoscalers(overlay):
    _, docs = overlay
    hpas, deployments = by_kind(docs, "HorizontalPodAutoscaler"), by_kind(docs, "Deployment")
    assert set(hpas) == {"taxiway-gateway", "taxiway-tokenizer", "taxiway-executor"}
    for name, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
        assert "replicas" not in deployments[name]["spec"], f"{name}: the HPA owns the replica count"
    for name in ("taxiway-gateway", "taxiway-tokenizer"):
        (metric,) = hpas[name]["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
    metrics = {m["type"]: m for m in hpas["taxiway-executor"]["spec"]["metrics"]}
    assert metrics["External"]["external"]["metric"]["name"] == "taxiway_num_requests_waiting"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "taxiway_num_requests_running"


def test_devices(overlay):
    name, docs = overlay
    executor = container(by_kind(docs, "Deployment")["taxiway-executor"])
    env = {e["name"]: e.get("value") for e in executor["env"]}
    gpus = {k: v.get("nvidia.com/gpu") for k, v in executor["resources"].items()}
    if name == "gpu":
        assert env["TAXIWAY_DEVICE"] == "cuda" and executor["image"] == "taxiway:gpu"
        assert gpus == {"requests": 1, "limits": 1}
    else:
        assert env["TAXIWAY_DEVICE"] == "cpu" and executor["image"] == "taxiway:cpu"
        assert gpus == {"requests": None, "limits": None}
    for d in by_kind(docs, "Deployment").values():  # nobody else asks for a GPU
        if d["metadata"]["name"] != "taxiway-executor":
            assert "nvidia.com/gpu" not in str(d)
    assert env["TAXIWAY_ADVERTISE_ADDRESS"] == "$(POD_IP):50054"
    names = [e["name"] for e in executor["env"]]
    assert names.index("POD_IP") < names.index("TAXIWAY_ADVERTISE_ADDRESS")  # $(...) needs order


def test_schedulers_have_unique_ids_and_a_standby(overlay):
    _, docs = overlay
    scheduler = by_kind(docs, "Deployment")["taxiway-scheduler"]
    assert scheduler["spec"]["replicas"] == 2  # the leader and a standby
    env = {e["name"]: e for e in container(scheduler)["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["TAXIWAY_SCHEDULER_ID"]["value"] == "$(POD_NAME)"
    names = list(env)
    assert names.index("POD_NAME") < names.index("TAXIWAY_SCHEDULER_ID")


# --- security: secrets, reflection, exposure, network policies, Redis ------------------------------

SECRET = "taxiway-secrets"


def env_of(deployment: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container(deployment).get("env", [])}


def test_secrets_come_from_the_secret_and_internal_tiers_serve_no_reflection(overlay):
    _, docs = overlay
    deployments = by_kind(docs, "Deployment")
    for tier in TIERS:
        env = env_of(deployments[f"taxiway-{tier}"])
        wanted = {"TAXIWAY_INTERNAL_TOKEN": "internal-token"}
        if tier != "tokenizer":
            wanted["TAXIWAY_REDIS_PASSWORD"] = "redis-password"
        if tier == "gateway":
            wanted["TAXIWAY_API_KEYS"] = "api-keys"
        for name, key in wanted.items():
            assert env[name] == {"name": name, "valueFrom": {
                "secretKeyRef": {"name": SECRET, "key": key}}}, (tier, name)
        assert env.get("TAXIWAY_REFLECTION", {}).get("value") == (None if tier == "gateway"
                                                                  else "false"), tier
    config = by_kind(docs, "ConfigMap")["taxiway-env"]["data"]
    assert not {"TAXIWAY_INTERNAL_TOKEN", "TAXIWAY_REDIS_PASSWORD", "TAXIWAY_API_KEYS"} & set(config)
    assert "Secret" not in {d["kind"] for d in docs}  # created by the operator, never committed


def test_no_service_exposes_the_scheduler_or_executor_grpc_ports(overlay):
    _, docs = overlay
    for name, service in by_kind(docs, "Service").items():
        ports = {p["port"] for p in service["spec"]["ports"]}
        assert not ports & {TIERS["scheduler"], TIERS["executor"]}, name


def _selects(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def _who_may_reach(docs: list[dict], component: str, port: int) -> str | set[str]:
    """"anyone", or the components whose pods the policies let reach `component` on `port`."""
    labels = {"app.kubernetes.io/name": "taxiway", "app.kubernetes.io/component": component}
    policies = [p for p in by_kind(docs, "NetworkPolicy").values()
                if _selects(p["spec"]["podSelector"], labels)]
    assert policies, f"no NetworkPolicy selects the {component} pods: all traffic may reach them"
    allowed: set[str] = set()
    for rule in (r for p in policies for r in p["spec"].get("ingress", [])):
        if port not in {p["port"] for p in rule.get("ports", [])}:
            continue
        if "from" not in rule or any("namespaceSelector" in peer for peer in rule["from"]):
            return "anyone"
        for peer in rule["from"]:
            allowed |= {c for c in (*TIERS, "redis") if _selects(peer["podSelector"], {
                "app.kubernetes.io/name": "taxiway", "app.kubernetes.io/component": c})}
    return allowed


def test_network_policies_let_only_the_tiers_talk_to_each_other_and_to_redis(overlay):
    _, docs = overlay
    assert _who_may_reach(docs, "gateway", 50051) == "anyone"  # the public API
    assert _who_may_reach(docs, "tokenizer", 50052) == {"gateway"}
    assert _who_may_reach(docs, "scheduler", 50053) == set()
    assert _who_may_reach(docs, "executor", 50054) == {"scheduler"}
    assert _who_may_reach(docs, "redis", 6379) == {"gateway", "scheduler", "executor"}
    for tier, port in TIERS.items():  # Prometheus scrapes every tier
        assert _who_may_reach(docs, tier, port - 50051 + 9091) == "anyone"


def test_redis_persists_its_aof_and_requires_the_password(overlay):
    _, docs = overlay
    redis = by_kind(docs, "Deployment")["taxiway-redis"]
    script = " ".join(container(redis)["command"])
    assert "--appendonly yes" in script and "--appendfsync everysec" in script
    assert 'requirepass "$REDIS_PASSWORD"' in script and "noeviction" in script
    assert env_of(redis)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": SECRET, "key": "redis-password"}
    volumes = {v["name"]: v for v in pod_spec(redis)["volumes"]}
    claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
    assert claim in by_kind(docs, "PersistentVolumeClaim")
    assert "REDISCLI_AUTH" in " ".join(container(redis)["readinessProbe"]["exec"]["command"])
