"""A small kustomize renderer for the features deploy/kubernetes uses, so the
manifests' tests run where no `kubectl` is installed: resources (files and
folders), configMapGenerator (files and literals, without a name hash) and
images. Anything else in a kustomization is refused, not ignored; where
`kubectl` exists the tests check that both render the same objects."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "configMapGenerator", "images"}


class UnsupportedKustomization(ValueError):
    """The kustomization uses a feature this renderer does not implement."""


def _documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def _config_map(directory: Path, spec: dict[str, Any]) -> dict[str, Any]:
    unknown = set(spec) - {"name", "namespace", "files", "literals", "options"}
    if unknown:
        raise UnsupportedKustomization(f"configMapGenerator fields {sorted(unknown)}")
    options = spec.get("options", {})
    if not options.get("disableNameSuffixHash"):
        raise UnsupportedKustomization("configMapGenerator with a name hash")
    data: dict[str, str] = {}
    for entry in spec.get("files", []):
        key, _, source = entry.rpartition("=")
        data[key or Path(source).name] = (directory / source).read_text()
    for literal in spec.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    metadata: dict[str, Any] = {"name": spec["name"]}
    if "namespace" in spec:
        metadata["namespace"] = spec["namespace"]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec", spec)
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _set_images(objects: list[dict[str, Any]], images: list[dict[str, Any]]) -> None:
    for obj in objects:
        for container in _containers(obj):
            name, _, tag = container["image"].partition(":")
            for image in images:
                if image["name"] == name:
                    new_tag = image.get("newTag", tag)
                    new_name = image.get("newName", name)
                    container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize directory` would print (order aside)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise UnsupportedKustomization(f"{directory}: kustomization fields {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        objects += render(path) if path.is_dir() else _documents(path)
    for spec in kustomization.get("configMapGenerator", []):
        objects.append(_config_map(directory, spec))
    _set_images(objects, kustomization.get("images", []))
    return objects


def render_with_kubectl(directory: Path) -> list[dict[str, Any]] | None:
    """`kubectl kustomize` where the binary exists (offline), else None."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def key(obj: dict[str, Any]) -> tuple[str, str, str]:
    metadata = obj["metadata"]
    return obj["kind"], metadata.get("namespace", ""), metadata["name"]
