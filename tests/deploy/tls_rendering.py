"""config/router.yaml with mTLS on (``service.tls``, the paths of the router's Secret mount in
envoy/kubernetes/router.yaml), and every deployment file rendered from it: the TLS variant of what
we ship, checked like the shipped files (test_schemas.py, test_deploy_tls.py)."""

from __future__ import annotations

import yaml
from compose_topology import REPO

from extproc.service.manifests import ROUTER_CONFIG, render_all

TLS = {"cert": "/etc/extproc-tls/tls.crt", "key": "/etc/extproc-tls/tls.key", "client_ca": "/etc/extproc-tls/ca.crt",
       # Envoy's side, as the compose Envoy would mount it
       "envoy": {"ca": "/etc/envoy/tls/ca.crt", "cert": "/etc/envoy/tls/tls.crt", "key": "/etc/envoy/tls/tls.key"}}


def tls_config_text() -> str:
    doc = yaml.safe_load((REPO / ROUTER_CONFIG).read_text())
    doc.setdefault("service", {})["tls"] = TLS
    return yaml.safe_dump(doc, sort_keys=False)


def rendered_with_tls() -> dict[str, str]:
    return render_all(REPO, config_text=tls_config_text())
