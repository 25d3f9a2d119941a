"""Our Kubernetes objects checked offline against the real CustomResourceDefinitions of the gateways
we deploy to (../shared/data/crds: Gateway API, the Inference Extension's InferencePool, Envoy
Gateway's policies, Istio's networking API), as strictly as the API server would keep them.

A CRD's ``openAPIV3Schema`` is a *structural* schema: the API server silently drops (prunes) every
field its schema does not declare, unless a node says ``x-kubernetes-preserve-unknown-fields``. A
typo'd field in a manifest therefore applies cleanly and does nothing. To make that an error here,
the schema is turned into a JSON Schema that forbids undeclared fields wherever the API server would
prune them (``additionalProperties: false`` on every structural object node without
preserve-unknown-fields), and Kubernetes' extensions are spelled in JSON Schema terms
(``x-kubernetes-int-or-string`` as integer-or-string, ``nullable`` as a null type). Value checks
(types, enums, patterns, lengths, bounds, required) are JSON Schema's own. ``metadata`` is
Kubernetes' ObjectMeta for every kind: it is checked with Kubernetes' own strict schema
(kubernetes-validate), as a ConfigMap's metadata.

Not checked here: the CRDs' CEL rules (``x-kubernetes-validations``), which need a CEL evaluator.
The ones our objects come near (unique rule names, at most 128 matches a route, a port on a
Service reference, writable metadata namespaces outside ``envoy.filters.http``, one of
workloadSelector and targetRefs) are asserted one by one in test_schemas.py.
"""

from __future__ import annotations

import copy
import pathlib
import re
from dataclasses import dataclass, field

import jsonschema
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CRD_DIR = REPO.parent / "shared" / "data" / "crds"  # ../shared/data/crds from the project root
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_STRUCTURE = ("properties", "items", "additionalProperties")


class CRDsUnavailable(RuntimeError):
    pass


def strict(schema: dict) -> dict:
    """A CRD's structural schema as a JSON Schema that refuses what the API server would prune."""
    out = copy.deepcopy(schema)
    _strict(out)
    return out


def _strict(node: dict) -> None:
    if node.get("nullable"):
        t = node.get("type")
        if isinstance(t, str):
            node["type"] = [t, "null"]
    if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    # Only structural nodes get the rule: anyOf/oneOf/allOf/not branches are value constraints
    # (often just `required` lists) and must not forbid what the structure allows.
    if node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields") \
            and "additionalProperties" not in node:
        node["additionalProperties"] = False
    for prop in (node.get("properties") or {}).values():
        _strict(prop)
    if isinstance(node.get("items"), dict):
        _strict(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        _strict(node["additionalProperties"])


@dataclass
class Version:
    group: str
    kind: str
    version: str
    schema: dict
    deprecated: bool
    validator: jsonschema.protocols.Validator = field(init=False)

    def __post_init__(self) -> None:
        top = strict(self.schema)
        # apiVersion and kind are every object's (some CRDs, Istio's, leave them out); metadata is
        # ObjectMeta for every kind (the CRD says only "object"): checked on its own
        props = top.setdefault("properties", {})
        props.update(apiVersion={"type": "string"}, kind={"type": "string"}, metadata={"type": "object"})
        jsonschema.Draft7Validator.check_schema(top)
        self.validator = jsonschema.Draft7Validator(top)


class CRDSchemas:
    """The served versions of every CRD in a directory, by ``(apiVersion, kind)``."""

    def __init__(self, directory: pathlib.Path = CRD_DIR) -> None:
        if not directory.is_dir() or not any(directory.glob("*.yaml")):
            raise CRDsUnavailable(f"no CRDs at {directory} (../shared/data/crds): the schema checks need them")
        self.directory = directory
        self.versions: dict[tuple[str, str], Version] = {}
        for path in sorted(directory.glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                spec = doc["spec"]
                for v in spec["versions"]:
                    if not v.get("served") or "schema" not in v:
                        continue
                    key = (f"{spec['group']}/{v['name']}", spec["names"]["kind"])
                    self.versions[key] = Version(spec["group"], spec["names"]["kind"], v["name"],
                                                 v["schema"]["openAPIV3Schema"], bool(v.get("deprecated")))

    def knows(self, doc: dict) -> bool:
        return (doc.get("apiVersion"), doc.get("kind")) in self.versions

    def groups(self) -> set[str]:
        return {v.group for v in self.versions.values()}

    def errors(self, doc: dict) -> list[str]:
        """Every way ``doc`` differs from its CRD (empty: it conforms)."""
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key not in self.versions:
            return [f"no served CRD version for apiVersion {key[0]!r} kind {key[1]!r}"]
        version = self.versions[key]
        out = []
        if version.deprecated:
            out.append(f"{key[0]} {key[1]} is a deprecated version")
        for err in sorted(version.validator.iter_errors(doc), key=lambda e: _path(e.absolute_path)):
            out.append(f"{_path(err.absolute_path) or '.'}: {err.message}")
        out += metadata_errors(doc)
        return out


def metadata_errors(doc: dict) -> list[str]:
    """ObjectMeta checked by Kubernetes' own strict schema, and the name a DNS subdomain."""
    import kubernetes_validate

    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        return ["metadata.name: required"]
    out = []
    try:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}, "1.33", strict=True)
    except kubernetes_validate.ValidationError as exc:
        out.append(f"metadata: {exc}")
    if len(meta["name"]) > 253 or not _DNS_SUBDOMAIN.match(meta["name"]):
        out.append(f"metadata.name: {meta['name']!r} is not a DNS subdomain")
    return out


def _path(parts) -> str:
    s = ""
    for p in parts:
        s += f"[{p}]" if isinstance(p, int) else f".{p}"
    return s.lstrip(".")


def describe(doc: dict) -> str:
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind')}/{meta.get('name')}"
