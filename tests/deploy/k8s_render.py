"""A small stand-in for `kustomize build`, enough for deploy/k8s: resources, components, patches
(strategic merge by kind and name) and images. It raises on anything else, so a kustomization
that grows a feature this does not know fails the tests instead of rendering wrongly. Where
kubectl or kustomize is installed, test_k8s_manifests checks both render the same."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "components", "patches", "images"}
# Strategic-merge keys of the lists that deploy/k8s patches (Kubernetes' patchMergeKey).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "tolerations": None}


def load_documents(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:  # deepcopy: YAML anchors would otherwise share one dict between places
        return [copy.deepcopy(doc) for doc in yaml.safe_load_all(f) if doc]


def render(directory: Path) -> list[dict[str, Any]]:
    """The resources `kustomize build directory` would print (order aside)."""
    return _build(Path(directory), [])


def _build(directory: Path, inherited: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (kustomization,) = load_documents(directory / "kustomization.yaml")
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise NotImplementedError(f"{directory}: k8s_render does not support {sorted(unknown)}")
    docs = list(inherited)
    for entry in kustomization.get("resources", []):
        path = directory / entry
        docs += _build(path, []) if path.is_dir() else load_documents(path)
    for entry in kustomization.get("components", []):
        docs = _build(directory / entry, docs)
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise NotImplementedError(f"{directory}: only `- path: file` patches are supported")
        for change in load_documents(directory / patch["path"]):
            index = _find(docs, change["kind"], change["metadata"]["name"], directory)
            docs[index] = strategic_merge(docs[index], change)
    for image in kustomization.get("images", []):
        for doc in docs:
            _set_image(doc, image)
    return docs


def _find(docs: list[dict[str, Any]], kind: str, name: str, where: Path) -> int:
    for i, doc in enumerate(docs):
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return i
    raise LookupError(f"{where}: patch targets {kind}/{name}, which no resource defines")


def strategic_merge(base: Any, patch: Any, field: str | None = None) -> Any:
    """Maps merge key by key; lists with a merge key merge item by item (new items first, as
    kustomize puts them); any other value is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = strategic_merge(base[key], value, key) if key in base else copy.deepcopy(value)
        return out
    merge_key = MERGE_KEYS.get(field or "")
    if isinstance(base, list) and isinstance(patch, list) and merge_key:
        out, new = list(base), []
        for item in patch:
            match = [i for i, old in enumerate(out) if old.get(merge_key) == item.get(merge_key)]
            if match:
                out[match[0]] = strategic_merge(out[match[0]], item)
            else:
                new.append(copy.deepcopy(item))
        return new + out
    return copy.deepcopy(patch)


def _set_image(doc: dict[str, Any], image: dict[str, str]) -> None:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        name, _, tag = container["image"].rpartition(":") if ":" in container["image"] else (
            container["image"], "", "")
        if name == image["name"]:
            new_tag = image.get("newTag", tag)
            container["image"] = image.get("newName", name) + (f":{new_tag}" if new_tag else "")
