"""deploy/kubernetes renders offline and every object is valid for a pinned
Kubernetes version (kubernetes-validate's strict schemas: an unknown or
misspelt field fails); the manifests say what the README promises, their
command lines are ones the broker and agent accept, and the Zero to
JupyterHub values match the tested JupyterHub configuration."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from traitlets.config.loader import PyFileConfigLoader

from gpuattach_broker.agent.cli import AgentApp
from gpuattach_broker.broker.app import BrokerApp
from gpuattach_broker.broker.policy import load_policy
from tests.deploy.kustomize import key, render, render_with_kubectl

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes"
VALUES = BASE / "jupyterhub-values.yaml"
# The Kubernetes version the manifests are checked against (kubernetes-validate's schemas).
KUBERNETES_VERSION = "1.31.0"
# The Secrets the README tells an admin to create; nothing else may be referenced.
SECRETS = {
    "gpuattach-db",
    "gpuattach-broker-key",
    "gpuattach-broker-tls",
    "gpuattach-agent-tls",
    "gpuattach-worker-tls",
}


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str, str], dict[str, Any]]:
    rendered = render(BASE)
    by_key = {key(obj): obj for obj in rendered}
    assert len(by_key) == len(rendered), "two objects with one kind, namespace and name"
    with_kubectl = render_with_kubectl(BASE)
    if with_kubectl is not None:  # the small renderer must agree with kustomize itself
        assert {key(obj): obj for obj in with_kubectl} == by_key
    return by_key


def one(objects: dict[tuple[str, str, str], dict[str, Any]], kind: str, name: str) -> Any:
    return objects[(kind, "gpuattach" if kind != "Namespace" else "", name)]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def test_every_object_is_valid_for_the_pinned_kubernetes(
    objects: dict[tuple[str, str, str], dict[str, Any]],
) -> None:
    assert {k[0] for k in objects} == {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "DaemonSet",
        "NetworkPolicy",
    }
    for obj in objects.values():
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_validation_catches_a_misspelt_field(
    objects: dict[tuple[str, str, str], dict[str, Any]],
) -> None:
    broken = yaml.safe_load(yaml.safe_dump(one(objects, "Deployment", "gpuattach-broker")))
    broken["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_broker_deployment(objects: dict[tuple[str, str, str], dict[str, Any]]) -> None:
    deployment = one(objects, "Deployment", "gpuattach-broker")
    assert deployment["spec"]["replicas"] == 2
    # Only the active broker listens for gRPC: readiness on it routes the
    # Service to the active one; a standby stays alive on its metrics port.
    (probed,) = pod_spec(deployment)["containers"]
    assert probed["readinessProbe"]["tcpSocket"]["port"] == "grpc"
    assert probed["livenessProbe"]["tcpSocket"]["port"] == "metrics"
    pod = pod_spec(deployment)
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/jupyter-gpuattach/jupyter-gpuattach:0.1.0"
    # The database URL comes from a Secret, in the variable the broker reads.
    (db,) = [e for e in container["env"] if e["name"] == "GPUATTACH_DB_URL"]
    assert db["valueFrom"]["secretKeyRef"] == {"name": "gpuattach-db", "key": "url"}
    # The policy: the generated ConfigMap, mounted as a folder (a subPath
    # mount would never see an update, and the broker would never reload).
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["policy"]["configMap"]["name"] == "gpuattach-policy"
    assert "subPath" not in mounts["policy"]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"])
    assert args["policy"] == f"{mounts['policy']['mountPath']}/policy.toml"
    policy = one(objects, "ConfigMap", "gpuattach-policy")
    assert set(policy["data"]) == {"policy.toml"}
    service = one(objects, "Service", "gpuattach-broker")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "grpc": 50051,
        "agents": 50052,
        "metrics": 9090,
    }


def test_the_policy_in_the_config_map_is_one_the_broker_accepts(
    objects: dict[tuple[str, str, str], dict[str, Any]], tmp_path: Path
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(one(objects, "ConfigMap", "gpuattach-policy")["data"]["policy.toml"])
    policy = load_policy(str(path))
    assert policy.defaults.max_slices == 1


def test_the_broker_accepts_its_command_line(
    objects: dict[tuple[str, str, str], dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    (container,) = pod_spec(one(objects, "Deployment", "gpuattach-broker"))["containers"]
    assert container["command"] == ["gpuattach-broker", "serve"]
    flags = [a.removeprefix("--").split("=", 1)[0] for a in container["args"]]
    assert set(flags) <= set(BrokerApp.aliases) | set(BrokerApp.flags)
    monkeypatch.setenv("GPUATTACH_DB_URL", "postgresql://broker@db:5432/gpuattach")
    monkeypatch.chdir(ROOT / "deploy")  # no config file found there
    app = BrokerApp.configured(container["args"])
    assert app.address == "0.0.0.0:50051"
    assert app.agent_address == "0.0.0.0:50052"
    assert app.db_url == "postgresql://broker@db:5432/gpuattach"


def test_the_agent_daemonset(objects: dict[tuple[str, str, str], dict[str, Any]]) -> None:
    daemonset = one(objects, "DaemonSet", "gpuattach-agent")
    pod = pod_spec(daemonset)
    # Where the NVIDIA device plugin runs: its node label and its taint.
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert pod["runtimeClassName"] == "nvidia"
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "utility" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")  # NVML
    assert "resources" not in container or "limits" not in container["resources"]


def test_the_agent_command_line_runs_and_is_accepted(
    objects: dict[tuple[str, str, str], dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shell line of the DaemonSet, run with the agent replaced by printf:
    the pod's DNS name is advertised, and every option exists."""
    (container,) = pod_spec(one(objects, "DaemonSet", "gpuattach-agent"))["containers"]
    assert container["command"] == ["/bin/sh", "-c"]
    (line,) = container["args"]
    assert line.startswith("exec gpuattach-agent ")
    shown = line.replace("exec gpuattach-agent", "printf '%s\\n'", 1)
    argv = subprocess.run(
        ["/bin/sh", "-c", shown],
        env={"PATH": os.environ["PATH"], "NODE_NAME": "gpu-node-7", "POD_IP": "10.1.2.3"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    options = dict(a.removeprefix("--").split("=", 1) for a in argv)
    assert options["advertise"] == "10-1-2-3.gpuattach.pod.cluster.local"
    assert options["host"] == "gpu-node-7"
    assert options["broker"] == "gpuattach-broker.gpuattach.svc.cluster.local:50052"
    assert set(options) <= set(AgentApp.aliases) | set(AgentApp.flags)
    monkeypatch.chdir(ROOT / "deploy")
    app = AgentApp.configured(argv)
    assert (app.bind, app.devices) == ("0.0.0.0", "nvml")
    assert shlex.split(line)[:2] == ["exec", "gpuattach-agent"]


def test_certificates_and_keys_come_from_the_documented_secrets(
    objects: dict[tuple[str, str, str], dict[str, Any]],
) -> None:
    used: set[str] = set()
    for kind, name in (("Deployment", "gpuattach-broker"), ("DaemonSet", "gpuattach-agent")):
        pod = pod_spec(one(objects, kind, name))
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            for mount in container["volumeMounts"]:
                assert mount["name"] in volumes, mount
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    used.add(ref["name"])
        for volume in volumes.values():
            if "secret" in volume:
                used.add(volume["secret"]["secretName"])
                mode = volume["secret"].get("defaultMode", 0o644)
                assert mode & 0o007 == 0, f"{volume['name']} readable by others"
    assert used == SECRETS


def test_only_user_pods_of_the_hub_reach_the_workers(
    objects: dict[tuple[str, str, str], dict[str, Any]],
) -> None:
    policy = one(objects, "NetworkPolicy", "gpuattach-workers")["spec"]
    template = one(objects, "DaemonSet", "gpuattach-agent")["spec"]["template"]
    assert policy["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (peer,) = rule["from"]
    # One peer with both selectors: user pods AND in the hub's namespace.
    assert peer == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "jhub"}},
        "podSelector": {"matchLabels": {"component": "singleuser-server"}},
    }


def test_jupyterhub_values_match_the_tested_hub_configuration(
    objects: dict[tuple[str, str, str], dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The values fragment says what examples/jupyterhub_config.py says (which
    a real JupyterHub runs in tests/integration/test_jupyterhub_deployment.py),
    and points user pods at the broker's Service."""
    monkeypatch.setenv("GPUATTACH_HUB_SERVICE_TOKEN", "x" * 32)
    monkeypatch.setenv("GPUATTACH_CULL_TIMEOUT", "0")
    loader = PyFileConfigLoader("jupyterhub_config.py", path=str(ROOT / "examples"))
    hub = loader.load_config()
    values = yaml.safe_load(VALUES.read_text())
    config = values["hub"]["config"]
    assert set(config["JupyterHub"]["custom_scopes"]) == set(hub.JupyterHub.custom_scopes)
    assert config["JupyterHub"]["load_groups"] == hub.JupyterHub.load_groups
    assert config["Spawner"]["server_token_scopes"] == hub.Spawner.server_token_scopes
    roles = {r["name"]: r for r in hub.JupyterHub.load_roles}
    for name, role in values["hub"]["loadRoles"].items():
        assert {k: v for k, v in role.items() if k != "description"} == {
            k: v for k, v in roles[name].items() if k not in ("name", "description")
        }
    assert set(values["hub"]["loadRoles"]) == set(roles)
    assert [s["name"] for s in hub.JupyterHub.services] == list(values["hub"]["services"])
    env = values["singleuser"]["extraEnv"]
    assert "GPUATTACH_BROKER_KEY" not in env  # never the key where users run
    service = one(objects, "Service", "gpuattach-broker")
    grpc_port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"]
    assert env["GPUATTACH_BROKER"] == (
        f"{service['metadata']['name']}.{service['metadata']['namespace']}"
        f".svc.cluster.local:{grpc_port}"
    )
    mounts = {
        m["name"]: m["mountPath"] for m in values["singleuser"]["storage"]["extraVolumeMounts"]
    }
    assert env["GPUATTACH_TLS_CA"].startswith(mounts["gpuattach-ca"] + "/")
