#!/usr/bin/env python3
"""Offline checks of Shoal's Kubernetes manifests (run by tests/k8s/validate.sh).

Renders k8s/, k8s/monitoring, k8s/node-agent and k8s/tls with `kubectl kustomize`, validates every
built-in resource strictly (unknown fields rejected) against the schemas kubernetes-validate ships,
checks the ServiceMonitor's, PrometheusRule's and cert-manager resources' shape by hand (no schema
ships for CRDs; the rules must be docker/alerts.yml's), holds every pod to Shoal's policy, checks
that the node agents' pieces (DaemonSet, node-local Service, NetworkPolicy, PriorityClass, example
reader, the init container that points containerd at the agent) fit together, and checks the Grafana dashboard against the metric names the binaries
export. Prints one line per
check and ends with "k8s-check: N passed, M failed"; exits 1 if anything failed.
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

NAMESPACE = "shoal"
AGENT_NAMESPACE = "shoal-node"
USER = 65532

# Settings each binary reads (the contract in k8s/README.md); anything else SHOAL_* is a typo.
TLS_ENV = {"SHOAL_TLS_CERT", "SHOAL_TLS_KEY", "SHOAL_TLS_CA", "SHOAL_METRICS_TLS"}
TRACKER_ENV = {"SHOAL_LISTEN", "SHOAL_METRICS_ADDR", "SHOAL_ANNOUNCE_INTERVAL", "SHOAL_SECRET",
               "SHOAL_LOG", "SHOAL_LOG_FORMAT"} | TLS_ENV
PEER_ENV = {"SHOAL_TRACKER", "SHOAL_TRACKER_REPLICAS", "SHOAL_LISTEN", "SHOAL_ADVERTISE", "SHOAL_NAME", "SHOAL_DATA_DIR",
            "SHOAL_WANT", "SHOAL_CHUNK_SIZE", "SHOAL_UPLOAD_LIMIT", "SHOAL_METRICS_ADDR",
            "SHOAL_SECRET", "SHOAL_LOG", "SHOAL_LOG_FORMAT", "SHOAL_TLS_PEER_NAME",
            "SHOAL_API_ADDR", "SHOAL_API_TLS", "SHOAL_ORIGIN", "SHOAL_ORIGIN_CONCURRENCY",
            "SHOAL_ORIGIN_TIMEOUT", "SHOAL_REGISTRY_UPSTREAM"} | TLS_ENV
ENV_BY_IMAGE = {"shoal-tracker": TRACKER_ENV, "shoal-peer": PEER_ENV}

# Metrics the binaries export; histograms are queried through their series suffixes.
COUNTERS_AND_GAUGES = {
    "shoal_tracker_registrations_total", "shoal_tracker_chunk_registrations_total",
    "shoal_tracker_requests_total", "shoal_tracker_peers", "shoal_tracker_files",
    "shoal_tracker_leases_expired_total", "shoal_tracker_files_owned",
    "shoal_peer_tracker_requests_total", "shoal_peer_tracker_failovers_total",
    "shoal_peer_downloaded_chunks_total", "shoal_peer_uploaded_chunks_total",
    "shoal_peer_downloaded_bytes_total", "shoal_peer_uploaded_bytes_total",
    "shoal_peer_chunk_verify_failures_total", "shoal_peer_downloads_completed_total",
    "shoal_peer_downloads_failed_total", "shoal_peer_files_shared", "shoal_peer_files_wanted",
    "shoal_peer_active_transfers", "shoal_peer_duplicate_chunks_total",
    "shoal_peer_holders_dropped_total", "shoal_peer_holders_banned_total",
    "shoal_peer_chunk_requests_refused_total", "shoal_build_info",
    "shoal_api_requests_total", "shoal_api_bytes_sent_total", "shoal_api_streams",
    "shoal_peer_origin_bytes_total", "shoal_peer_origin_requests_total",
    "shoal_peer_origin_errors_total", "shoal_tracker_origin_files", "shoal_tracker_origin_claims",
    "shoal_peer_mirror_requests_total", "shoal_peer_mirror_bytes_total",
    "shoal_peer_mirror_verify_failures_total",
}
HISTOGRAMS = {"shoal_tracker_request_duration_seconds",
              "shoal_peer_chunk_transfer_duration_seconds", "shoal_peer_download_duration_seconds",
              "shoal_peer_mirror_upstream_seconds"}
HISTOGRAM_SERIES = {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}

# The compose Prometheus's rules; the PrometheusRule must carry the same groups.
PLAIN_RULES = "docker/alerts.yml"

# API groups that are CRDs: kubernetes-validate has no schema for them, so they get a structural
# check here instead. Any other resource without a schema fails.
CRD_GROUPS = {"monitoring.coreos.com", "cert-manager.io"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PriorityClass", "StorageClass", "PersistentVolume"}
SERVICEMONITOR_SPEC_KEYS = {"selector", "endpoints", "namespaceSelector", "podTargetLabels",
                            "targetLabels", "jobLabel", "sampleLimit", "targetLimit",
                            "labelLimit", "attachMetadata"}
PROMETHEUSRULE_GROUP_KEYS = {"name", "interval", "rules", "limit", "partial_response_strategy"}
PROMETHEUSRULE_RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels",
                            "annotations"}
ISSUER_SPEC_KEYS = {"selfSigned", "ca", "acme", "vault", "venafi"}
CERTIFICATE_SPEC_KEYS = {"secretName", "dnsNames", "ipAddresses", "uris", "emailAddresses",
                         "commonName", "duration", "renewBefore", "usages", "privateKey",
                         "issuerRef", "isCA", "subject", "secretTemplate", "keystores",
                         "revisionHistoryLimit", "additionalOutputFormats", "nameConstraints"}
PEER_NAME = "shoal-peer"  # SHOAL_TLS_PEER_NAME's default: the name every peer's certificate has
SERVICEMONITOR_ENDPOINT_KEYS = {"port", "targetPort", "path", "scheme", "interval",
                                "scrapeTimeout", "honorLabels", "honorTimestamps", "relabelings",
                                "metricRelabelings", "params", "tlsConfig", "followRedirects"}


class Report:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, problems):
        """Records one check; `problems` is a list of messages, empty when the check passed."""
        if problems:
            self.failed += 1
            print(f"FAIL {name}")
            for problem in problems:
                print(f"       {problem}")
        else:
            self.passed += 1
            print(f"ok   {name}")


def kn(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def api_group(doc):
    api_version = doc.get("apiVersion", "")
    return api_version.split("/")[0] if "/" in api_version else ""


def render(report, kdir, out_file):
    """Renders one kustomize tree to out_file; returns its documents, or None if it failed."""
    proc = subprocess.run(["kubectl", "kustomize", kdir], capture_output=True, text=True)
    if proc.returncode != 0:
        report.check(f"render {kdir}", [proc.stderr.strip() or f"kubectl exited {proc.returncode}"])
        return None
    out_file.write_text(proc.stdout)
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    report.check(f"render {kdir} -> {out_file} ({len(docs)} resources)",
                 [] if docs else ["rendered nothing"])
    return docs


def validate_schemas(report, docs, label, out_dir, kv, version):
    """Strict schema validation of every built-in resource, one file per resource so that the
    CLI's report can be tied to a resource (its WARN for a missing schema names only the kind)."""
    doc_dir = out_dir / label
    doc_dir.mkdir(parents=True, exist_ok=True)
    for old in doc_dir.glob("*.yaml"):
        old.unlink()
    files = {}
    for i, doc in enumerate(docs):
        if api_group(doc) in CRD_GROUPS:
            continue
        path = doc_dir / f"{i:02d}-{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        files[str(path)] = doc
    if not files:
        return
    proc = subprocess.run([kv, "--strict", "-k", version, *files], capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).splitlines()
    for path, doc in files.items():
        mine = [line for line in lines if f" {path} " in f"{line} "]
        bad = [line for line in mine if not line.startswith("INFO")]
        if not bad and not any(" passed " in line for line in mine):
            bad = [f"no verdict from kubernetes-validate (exit {proc.returncode})"]
        report.check(f"schema {label}: {kn(doc)} (strict, Kubernetes {version})", bad)


def pod_spec(doc):
    kind = doc["kind"]
    if kind == "Pod":
        return doc["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def pod_meta(doc):
    if doc["kind"] == "Pod":
        return doc["metadata"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"]
    return doc["spec"]["template"]["metadata"]


def image_name(image):
    return image.rsplit(":", 1)[0] if ":" in image.split("/")[-1] else image


def writes_containerd_hosts(c):
    """The node agent's init container that writes containerd's hosts.toml files, as root."""
    return image_name(c.get("image", "")) == "shoal-peer" and c.get("args", [])[:1] == ["mirror-config"]


def check_container(c, pod_sc, spec, configmaps, is_service):
    """Policy for one container; `is_service` adds what long-running Shoal daemons need."""
    problems = []
    sc = c.get("securityContext", {})

    def effective(key):
        return sc.get(key, pod_sc.get(key))

    # Only mirror-config runs as root (the host's containerd directory belongs to root), and
    # it must say so itself: a pod-level runAsNonRoot would otherwise stop it from starting.
    user, non_root = (0, False) if writes_containerd_hosts(c) else (USER, True)
    if effective("runAsNonRoot") is not non_root:
        problems.append(f"runAsNonRoot is not {str(non_root).lower()}")
    for key in ("runAsUser", "runAsGroup"):
        if effective(key) != user:
            problems.append(f"{key} is {effective(key)}, want {user}")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem is not true")
    if sc.get("privileged"):
        problems.append("privileged is set")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        problems.append("capabilities do not drop ALL")
    if sc.get("capabilities", {}).get("add"):
        problems.append("capabilities add something")
    if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append("seccompProfile is not RuntimeDefault")
    resources = c.get("resources", {})
    for section in ("requests", "limits"):
        for res in ("cpu", "memory"):
            if res not in resources.get(section, {}):
                problems.append(f"no resources.{section}.{res}")
    if c.get("imagePullPolicy") != "IfNotPresent":
        problems.append("imagePullPolicy is not IfNotPresent (there is no registry)")
    image = c.get("image", "")
    if image_name(image) == image or image.endswith(":latest"):
        problems.append(f"image {image!r} is not pinned to a version")

    env = c.get("env", [])
    defined = set()
    for var in env:
        for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", var.get("value", "")):
            if ref not in defined:
                problems.append(f"env {var['name']} uses $({ref}) before it is defined")
        defined.add(var["name"])
        cm_ref = var.get("valueFrom", {}).get("configMapKeyRef")
        if cm_ref and not cm_ref.get("optional"):
            if cm_ref["key"] not in configmaps.get(cm_ref["name"], {}):
                problems.append(f"env {var['name']} reads missing ConfigMap key "
                                f"{cm_ref['name']}/{cm_ref['key']}")
        secret_ref = var.get("valueFrom", {}).get("secretKeyRef")
        if secret_ref and not secret_ref.get("optional"):
            problems.append(f"env {var['name']} needs Secret {secret_ref['name']}, which no "
                            "manifest creates: mark it optional")
    if c.get("envFrom"):
        problems.append("envFrom hands the container every key; pick keys with env instead")

    if not is_service:
        return problems

    allowed = ENV_BY_IMAGE.get(image_name(image))
    if allowed is None:
        problems.append(f"image {image!r} is neither shoal-tracker nor shoal-peer")
        allowed = set()
    env_by_name = {var["name"]: var for var in env}
    for name in env_by_name:
        if name.startswith("SHOAL_") and name not in allowed:
            problems.append(f"env {name} is not a setting of {image_name(image)}")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    listeners = [("SHOAL_LISTEN", "shoal"), ("SHOAL_METRICS_ADDR", "metrics")]
    if "SHOAL_API_ADDR" in env_by_name:
        listeners.append(("SHOAL_API_ADDR", "api"))
    for setting, port_name in listeners:
        value = env_by_name.get(setting, {}).get("value", "")
        if port_name not in ports:
            problems.append(f"no container port named {port_name!r}")
        elif not value.endswith(f":{ports[port_name]}"):
            problems.append(f"{setting}={value!r} does not listen on port {port_name} "
                            f"({ports[port_name]})")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ("metrics", ports.get("metrics")):
            problems.append(f"{probe} is not httpGet {path} on the metrics port")

    if allowed is PEER_ENV:
        advertise = env_by_name.get("SHOAL_ADVERTISE", {}).get("value", "")
        pod_ip = env_by_name.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {})
        if "$(POD_IP)" not in advertise or pod_ip.get("fieldPath") != "status.podIP":
            problems.append("SHOAL_ADVERTISE does not come from the pod IP (downward API)")
        name_ref = env_by_name.get("SHOAL_NAME", {}).get("valueFrom", {}).get("fieldRef", {})
        if name_ref.get("fieldPath") != "metadata.name":
            problems.append("SHOAL_NAME does not come from metadata.name")
        data_dir = env_by_name.get("SHOAL_DATA_DIR", {}).get("value", "/data")
        if data_dir not in {m["mountPath"] for m in c.get("volumeMounts", [])}:
            problems.append(f"data dir {data_dir} is not a volume (the root filesystem is "
                            "read-only)")
    return problems


def check_workload(report, label, doc, configmaps, is_service=True):
    spec = pod_spec(doc)
    meta = pod_meta(doc)
    problems = []
    if spec.get("enableServiceLinks") is not False:
        problems.append("enableServiceLinks is not false (service env would collide with SHOAL_)")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken is not false")
    for pod_key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(pod_key):
            problems.append(f"{pod_key} is set")
    labels = meta.get("labels", {})
    for key in ("app.kubernetes.io/name", "app.kubernetes.io/component",
                "app.kubernetes.io/part-of"):
        if key not in labels:
            problems.append(f"pod label {key} missing")
    if is_service:
        annotations = meta.get("annotations", {})
        metrics_ports = {p["containerPort"] for c in spec["containers"]
                         for p in c.get("ports", []) if p.get("name") == "metrics"}
        if annotations.get("prometheus.io/scrape") != "true":
            problems.append("prometheus.io/scrape is not \"true\"")
        if not annotations.get("prometheus.io/port", "").isdigit() or \
                int(annotations["prometheus.io/port"]) not in metrics_ports:
            problems.append("prometheus.io/port is not the metrics port")
        if annotations.get("prometheus.io/path") != "/metrics":
            problems.append("prometheus.io/path is not /metrics")
    pod_sc = spec.get("securityContext", {})
    for c in spec.get("initContainers", []):
        for problem in check_container(c, pod_sc, spec, configmaps, is_service=False):
            problems.append(f"init container {c['name']}: {problem}")
    for c in spec["containers"]:
        for problem in check_container(c, pod_sc, spec, configmaps, is_service):
            problems.append(f"container {c['name']}: {problem}")
    report.check(f"policy {label}: {kn(doc)}", problems)


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_base(report, docs):
    """What the base must contain, and that its pieces point at one another correctly."""
    by_kn = {kn(d): d for d in docs}
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    workloads = [d for d in docs if d["kind"] in WORKLOAD_KINDS]

    problems = []
    for want in ("Namespace/shoal", "StatefulSet/shoal-tracker", "Service/shoal-tracker",
                 "PodDisruptionBudget/shoal-tracker",
                 "StatefulSet/shoal-seeder", "Service/shoal-seeder", "Deployment/shoal-peer",
                 "Service/shoal-peer", "PodDisruptionBudget/shoal-seeder",
                 "PodDisruptionBudget/shoal-peer"):
        if want not in by_kn:
            problems.append(f"missing {want}")
    crds = [kn(d) for d in docs if api_group(d) in CRD_GROUPS]
    if crds:
        problems.append(f"the base must not need a CRD, found {crds}")
    report.check("base: has every Shoal object and no CRD", problems)

    problems = []
    for doc in docs:
        ns = doc["metadata"].get("namespace")
        if doc["kind"] not in CLUSTER_SCOPED and ns != NAMESPACE:
            problems.append(f"{kn(doc)} is in namespace {ns!r}")
    namespace = by_kn.get("Namespace/shoal", {}).get("metadata", {}).get("labels", {})
    if namespace.get("pod-security.kubernetes.io/enforce") != "restricted":
        problems.append("namespace shoal does not enforce the restricted Pod Security Standard")
    report.check("base: everything in namespace shoal, which enforces 'restricted'", problems)

    problems = []
    settings = {}
    for data in configmaps.values():
        settings.update(data)
    for key, value in (("SHOAL_TRACKER", "shoal-tracker:7400"), ("SHOAL_WANT", "*"),
                       ("SHOAL_LOG_FORMAT", "json")):
        if settings.get(key) != value:
            problems.append(f"ConfigMap {key} is {settings.get(key)!r}, want {value!r}")
    if not re.fullmatch(r"\d+(ms|s|m|h)", settings.get("SHOAL_ANNOUNCE_INTERVAL", "")):
        problems.append("ConfigMap SHOAL_ANNOUNCE_INTERVAL is not a duration")
    report.check("base: ConfigMap carries the swarm settings", problems)

    if "SHOAL_TRACKER_REPLICAS" not in settings:
        report.check("base: ConfigMap sets SHOAL_TRACKER_REPLICAS", ["missing"])
    tracker = by_kn.get("StatefulSet/shoal-tracker")
    if tracker:
        report.check("base: trackers run as 3 replicas (each file on 2 of them)",
                     tracker_replica_problems(tracker, settings))
    service = by_kn.get("Service/shoal-tracker")
    if service:
        ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
        problems = [] if ports == {"shoal": 7400, "metrics": 9400} else [f"ports are {ports}"]
        if service["spec"].get("clusterIP") != "None":
            problems.append("not headless (clusterIP: None): peers must see every tracker's address")
        if service["spec"].get("publishNotReadyAddresses"):
            problems.append("publishNotReadyAddresses would hand out trackers that are not ready")
        report.check("base: tracker Service is headless and exposes 7400 and 9400", problems)
    pdb = by_kn.get("PodDisruptionBudget/shoal-tracker")
    if pdb:
        report.check("base: a drain takes at most one tracker at a time",
                     [] if pdb["spec"].get("maxUnavailable") == 1
                     else [f"maxUnavailable is {pdb['spec'].get('maxUnavailable')}"])

    # Services and PDBs must select pods, and a Service's named target ports must exist on them.
    for doc in docs:
        if doc["kind"] == "Service":
            selector = doc["spec"].get("selector", {})
        elif doc["kind"] == "PodDisruptionBudget":
            selector = doc["spec"].get("selector", {}).get("matchLabels", {})
        else:
            continue
        matched = [w for w in workloads if selects(selector, pod_meta(w).get("labels", {}))]
        problems = [] if matched else [f"selector {selector} matches no pod template"]
        for w in matched if doc["kind"] == "Service" else []:
            names = {p.get("name") for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
            for port in doc["spec"]["ports"]:
                target = port.get("targetPort")
                if isinstance(target, str) and target not in names:
                    problems.append(f"targetPort {target} is not a port of {kn(w)}")
        report.check(f"base: {kn(doc)} selects {', '.join(kn(w) for w in matched) or 'nothing'}",
                     problems)

    seeder = by_kn.get("StatefulSet/shoal-seeder")
    if seeder:
        problems = []
        governing = by_kn.get(f"Service/{seeder['spec'].get('serviceName')}")
        if not governing or governing["spec"].get("clusterIP") != "None":
            problems.append("serviceName is not a headless Service")
        if not seeder["spec"].get("volumeClaimTemplates"):
            problems.append("no volumeClaimTemplates: seeded files would not persist")
        report.check("base: seeders keep a volume each behind a headless Service", problems)

    for w in workloads:
        check_workload(report, "base", w, configmaps)
    return configmaps


def tracker_replica_problems(tracker, settings):
    """What keeps the tracker StatefulSet from surviving the loss of one tracker or node."""
    spec = tracker["spec"]
    problems = []
    replicas = spec.get("replicas")
    owners = int(settings.get("SHOAL_TRACKER_REPLICAS", "2"))
    if replicas != 3:
        problems.append(f"replicas is {replicas}, want 3")
    if not 2 <= owners <= (replicas or 0):
        problems.append(f"SHOAL_TRACKER_REPLICAS is {owners}: a file needs 2 owners, at most {replicas}")
    if spec.get("serviceName") != "shoal-tracker":
        problems.append("serviceName is not the headless Service shoal-tracker")
    anti = pod_spec(tracker).get("affinity", {}).get("podAntiAffinity", {})
    terms = [t.get("podAffinityTerm", t) for key in ("preferredDuringSchedulingIgnoredDuringExecution",
                                                      "requiredDuringSchedulingIgnoredDuringExecution")
             for t in anti.get(key, [])]
    labels = pod_meta(tracker).get("labels", {})
    if not any(t.get("topologyKey") == "kubernetes.io/hostname"
               and selects(t.get("labelSelector", {}).get("matchLabels", {}), labels) for t in terms):
        problems.append("no pod anti-affinity spreading the trackers over nodes")
    return problems


def crd_header_problems(doc):
    """What is wrong with a Prometheus Operator resource's apiVersion and name."""
    problems = []
    if doc.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append(f"apiVersion is {doc.get('apiVersion')}")
    if not doc.get("metadata", {}).get("name"):
        problems.append("no metadata.name")
    return problems


def check_service_monitor(report, doc, docs):
    """Structural check standing in for the schema a CRD does not ship."""
    problems = crd_header_problems(doc)
    spec = doc.get("spec", {})
    unknown = set(spec) - SERVICEMONITOR_SPEC_KEYS
    if unknown:
        problems.append(f"unknown spec fields {sorted(unknown)}")
    selector = spec.get("selector", {}).get("matchLabels", {})
    services = [d for d in docs if d["kind"] == "Service"
                and selects(selector, d["metadata"].get("labels", {}))]
    if not services:
        problems.append(f"spec.selector.matchLabels {selector} selects no Service")
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        problems.append("spec.endpoints is empty")
    for ep in endpoints or []:
        unknown = set(ep) - SERVICEMONITOR_ENDPOINT_KEYS
        if unknown:
            problems.append(f"unknown endpoint fields {sorted(unknown)}")
        for svc in services:
            if ep.get("port") not in {p.get("name") for p in svc["spec"]["ports"]}:
                problems.append(f"{kn(svc)} has no port named {ep.get('port')!r}")
    names = ", ".join(kn(s) for s in services)
    report.check(f"structure monitoring: {kn(doc)} scrapes {names or 'nothing'}", problems)


def check_prometheus_rule(report, doc, plain_rules):
    """Structural check standing in for the CRD's schema; promtool checks the rules themselves
    (`make alerts`) in docker/alerts.yml, which must hold the same groups."""
    problems = crd_header_problems(doc)
    spec = doc.get("spec", {})
    if set(spec) != {"groups"}:
        problems.append(f"spec fields {sorted(spec)}, want only groups")
    groups = spec.get("groups") or []
    for group in groups:
        unknown = set(group) - PROMETHEUSRULE_GROUP_KEYS
        if unknown or not group.get("name") or not group.get("rules"):
            problems.append(f"group {group.get('name')!r}: needs name and rules, "
                            f"unknown fields {sorted(unknown)}")
        for rule in group.get("rules") or []:
            unknown = set(rule) - PROMETHEUSRULE_RULE_KEYS
            if unknown or ("alert" in rule) == ("record" in rule) or not rule.get("expr"):
                problems.append(f"rule {rule.get('alert') or rule.get('record')!r}: needs alert "
                                f"or record, and expr; unknown fields {sorted(unknown)}")
    if groups != plain_rules.get("groups"):
        problems.append("spec.groups differs from docker/alerts.yml's groups")
    alerts = sum(len(g.get("rules") or []) for g in groups)
    report.check(f"structure monitoring: {kn(doc)} ({alerts} rules, as docker/alerts.yml)",
                 problems)


def check_monitoring(report, docs, base_docs, dashboard_text):
    base = {kn(d): d for d in base_docs}
    mine = {kn(d): d for d in docs}
    changed = [k for k, d in base.items() if mine.get(k) != d]
    report.check("monitoring: includes the base unchanged",
                 [f"{k} differs from the base or is missing" for k in changed])
    for doc in docs:
        if api_group(doc) in CRD_GROUPS:
            if doc["kind"] == "ServiceMonitor":
                check_service_monitor(report, doc, docs)
            elif doc["kind"] == "PrometheusRule":
                check_prometheus_rule(report, doc, yaml.safe_load(Path(PLAIN_RULES).read_text()))
            else:
                report.check(f"structure monitoring: {kn(doc)}",
                             ["no schema and no structural check for this kind"])
    dashboards = [d for d in docs if d["kind"] == "ConfigMap"
                  and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    problems = [] if len(dashboards) == 1 else [f"{len(dashboards)} ConfigMaps labelled "
                                                 "grafana_dashboard=\"1\", want 1"]
    if dashboards and dashboards[0].get("data", {}).get("shoal.json") != dashboard_text:
        problems.append("its shoal.json is not k8s/dashboard/shoal.json")
    for kind in ("ServiceMonitor", "PrometheusRule"):
        if not any(d["kind"] == kind for d in docs):
            problems.append(f"no {kind}")
    report.check("monitoring: ServiceMonitor, PrometheusRule and dashboard ConfigMap present",
                 problems)


def check_certificate(doc, issuers):
    """Structural check of a cert-manager Certificate standing in for the CRD's schema."""
    problems = []
    if doc.get("apiVersion") != "cert-manager.io/v1":
        problems.append(f"apiVersion is {doc.get('apiVersion')}")
    spec = doc.get("spec", {})
    unknown = set(spec) - CERTIFICATE_SPEC_KEYS
    if unknown:
        problems.append(f"unknown spec fields {sorted(unknown)}")
    if not spec.get("secretName"):
        problems.append("no spec.secretName")
    ref = spec.get("issuerRef", {})
    if ref.get("kind", "Issuer") != "Issuer" or ref.get("name") not in issuers:
        problems.append(f"issuerRef {ref} names no Issuer of this overlay")
    if not spec.get("isCA") and not {"server auth", "client auth"} <= set(spec.get("usages", [])):
        problems.append("usages lack server auth and client auth (every Shoal process is both)")
    return problems


def check_tls(report, docs, base_docs, out_dir, kv, version):
    """k8s/tls: the base plus cert-manager resources, each pod mounting the certificate of its
    role, whose names are the ones the other side checks."""
    base = {kn(d): d for d in base_docs}
    added = [d for d in docs if base.get(kn(d)) != d]
    validate_schemas(report, added, "tls", out_dir, kv, version)
    issuers = {}
    for doc in docs:
        if doc["kind"] == "Issuer":
            spec = doc.get("spec", {})
            problems = [] if doc.get("apiVersion") == "cert-manager.io/v1" else ["apiVersion"]
            if len(set(spec) & ISSUER_SPEC_KEYS) != 1 or set(spec) - ISSUER_SPEC_KEYS:
                problems.append(f"spec {sorted(spec)} is not one issuer type")
            issuers[doc["metadata"]["name"]] = doc
            report.check(f"structure tls: {kn(doc)}", problems)
    certs = {}
    for doc in docs:
        if doc["kind"] == "Certificate":
            certs[doc["spec"].get("secretName")] = doc
            report.check(f"structure tls: {kn(doc)}", check_certificate(doc, issuers))
        elif api_group(doc) in CRD_GROUPS and doc["kind"] != "Issuer":
            report.check(f"structure tls: {kn(doc)}", ["no structural check for this kind"])
    ca_issuers = [i for i in issuers.values() if "ca" in i.get("spec", {})]
    for issuer in ca_issuers:
        secret = issuer["spec"]["ca"].get("secretName")
        report.check(f"tls: {kn(issuer)} signs with a CA this overlay issues",
                     [] if certs.get(secret, {}).get("spec", {}).get("isCA") else
                     [f"no Certificate with isCA makes Secret {secret}"])
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    tracker_host = next(iter(configmaps.values()), {}).get("SHOAL_TRACKER", "").rsplit(":", 1)[0]
    for w in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        check_workload(report, "tls", w, configmaps)
        spec = pod_spec(w)
        secrets = {v["name"]: v["secret"]["secretName"] for v in spec.get("volumes", [])
                   if "secret" in v}
        problems = []
        for c in spec["containers"]:
            env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            for var in ("SHOAL_TLS_CERT", "SHOAL_TLS_KEY", "SHOAL_TLS_CA"):
                path = env.get(var, "")
                volume = mounts.get(path.rsplit("/", 1)[0])
                if volume not in secrets:
                    problems.append(f"{var}={path!r} is not in a mounted Secret")
                elif secrets[volume] not in certs:
                    problems.append(f"{var}: Secret {secrets[volume]} comes from no Certificate")
            names = set()
            for volume in mounts.values():
                names |= set(certs.get(secrets.get(volume), {}).get("spec", {}).get("dnsNames", []))
            want = tracker_host if image_name(c.get("image", "")) == "shoal-tracker" else PEER_NAME
            if want not in names:
                problems.append(f"its certificate does not name {want!r} (names: {sorted(names)})")
        report.check(f"tls: {kn(w)} shows a certificate its clients check", problems)


def check_dashboard(report, path):
    text = path.read_text()
    try:
        dash = json.loads(text)
    except json.JSONDecodeError as e:
        report.check(f"dashboard {path}: valid JSON", [str(e)])
        return text
    report.check(f"dashboard {path}: valid JSON", [])

    problems = []
    if not 36 <= dash.get("schemaVersion", 0) <= 41:
        problems.append(f"schemaVersion {dash.get('schemaVersion')}, want about 39")
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("DS_PROMETHEUS", {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no DS_PROMETHEUS datasource variable of type prometheus")
    ids = [p.get("id") for p in dash.get("panels", [])]
    if len(ids) != len(set(ids)):
        problems.append("panel ids are not unique")
    report.check("dashboard: schema version, DS_PROMETHEUS variable, unique panel ids", problems)

    problems = []
    used = set()
    for panel in dash.get("panels", []):
        if panel.get("type") == "row":
            continue
        title = panel.get("title")
        if panel.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
            problems.append(f"panel {title!r} does not use ${{DS_PROMETHEUS}}")
        if not panel.get("targets"):
            problems.append(f"panel {title!r} has no query")
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            for name in re.findall(r"\bshoal_[a-z0-9_]+", expr):
                if name in COUNTERS_AND_GAUGES or name in HISTOGRAM_SERIES:
                    used.add(name)
                else:
                    problems.append(f"panel {title!r}: {name} is not an exported metric")
            if "_bucket" in expr and "histogram_quantile" not in expr:
                problems.append(f"panel {title!r}: reads buckets without histogram_quantile")
    report.check("dashboard: every query uses exported metric names only", problems)

    families = {n.rsplit("_", 1)[0] if n in HISTOGRAM_SERIES else n for n in used}
    unused = sorted((COUNTERS_AND_GAUGES | HISTOGRAMS) - families)
    report.check("dashboard: every exported metric has a panel",
                 [f"{name} is on no panel" for name in unused])
    return text


# The node agent overlay: what it adds, and the base's objects the agents replace.
AGENT_OBJECTS = ("Namespace/shoal-node", "PriorityClass/shoal-node-agent", "DaemonSet/shoal-agent",
                 "Service/shoal-agent", "NetworkPolicy/shoal-agent", "Job/shoal-example-reader")
REPLACED_BY_AGENTS = ("Deployment/shoal-peer", "Service/shoal-peer",
                      "PodDisruptionBudget/shoal-peer")


def flag_value(args, flag):
    """The value after `flag` in a container's args, or None."""
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def host_exposure(doc):
    """hostPath volumes (name -> spec) and hostPorts (port name -> number) of a workload's pods."""
    spec = pod_spec(doc)
    paths = {v["name"]: v["hostPath"] for v in spec.get("volumes", []) if "hostPath" in v}
    ports = {p.get("name"): p["hostPort"] for c in spec.get("initContainers", []) + spec["containers"]
             for p in c.get("ports", []) if p.get("hostPort")}
    return paths, ports


# Where containerd looks for hosts.toml files (its registry config_path).
CONTAINERD_HOSTS = "/etc/containerd/certs.d"


def check_agent_daemonset(report, ds, by_kn, configmaps_by_ns):
    spec = pod_spec(ds)
    container = spec["containers"][0]
    env = {v["name"]: v for v in container.get("env", [])}
    problems = []
    ns = ds["metadata"].get("namespace")
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("configMapKeyRef")
        if ref and ref["name"] not in configmaps_by_ns.get(ns, {}):
            problems.append(f"env {var['name']} reads ConfigMap {ref['name']}, which is not in "
                            f"the pod's namespace {ns}")
    data_dir = env.get("SHOAL_DATA_DIR", {}).get("value")
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    paths, host_ports = host_exposure(ds)
    host_path = paths.get(mounts.get(data_dir))
    if not host_path:
        problems.append(f"the data dir {data_dir} is not a hostPath volume")
    elif host_path.get("type") != "Directory":
        problems.append("the data dir's hostPath type is not Directory (a kubelet-created "
                        "directory belongs to root, which the agent cannot write)")
    extra = sorted(name for name, p in paths.items()
                   if name != mounts.get(data_dir) and p.get("path") != CONTAINERD_HOSTS)
    if extra:
        problems.append(f"hostPath volumes other than the data dir and {CONTAINERD_HOSTS}: {extra}")
    api = next((p for p in container.get("ports", []) if p.get("name") == "api"), {})
    if host_ports and host_ports != {"api": api.get("containerPort")}:
        problems.append(f"hostPorts {host_ports}: only the API, on its own port number, is for the "
                        "node's containerd; pods use the node-local Service")
    if "SHOAL_API_ADDR" not in env:
        problems.append("SHOAL_API_ADDR is not set: the node's programs could not read from it")
    tolerations = spec.get("tolerations", [])
    if not any(t.get("operator") == "Exists" and not t.get("key") for t in tolerations):
        problems.append("no toleration of every taint (operator Exists, no key): some nodes "
                        "would have no agent")
    rolling = ds["spec"].get("updateStrategy", {}).get("rollingUpdate", {})
    if rolling.get("maxSurge", 0) not in (0, "0%"):
        problems.append("maxSurge is not 0: two agents would share one node's data dir")
    priority = by_kn.get(f"PriorityClass/{spec.get('priorityClassName')}")
    if not priority:
        problems.append(f"priorityClassName {spec.get('priorityClassName')!r} names no "
                        "PriorityClass of the overlay")
    elif not 0 < priority.get("value", 0) < 1_000_000_000 or priority.get("globalDefault"):
        problems.append("the PriorityClass must rank above workloads (value > 0), below the "
                        "system classes (< 1000000000), and not be the global default")
    report.check(f"node-agent: {kn(ds)} runs on every node with a hostPath data dir, its API on, "
                 f"a priority class and no surge", problems)


def check_agent_mirror_config(report, ds, by_kn):
    """The init container points the node's containerd at its agent, through the API's hostPort."""
    spec = pod_spec(ds)
    agent = spec["containers"][0]
    writers = [c for c in spec.get("initContainers", []) if writes_containerd_hosts(c)]
    problems = []
    if len(writers) != 1:
        problems.append(f"{len(writers)} init containers run `shoal-peer mirror-config`, want 1")
        report.check(f"node-agent: {kn(ds)} writes containerd's hosts.toml", problems)
        return
    writer = writers[0]
    args = writer.get("args", [])
    paths, host_ports = host_exposure(ds)
    hosts_volume = next((n for n, p in paths.items() if p.get("path") == CONTAINERD_HOSTS), None)
    if not hosts_volume or paths[hosts_volume].get("type") != "DirectoryOrCreate":
        problems.append(f"no hostPath volume of {CONTAINERD_HOSTS} (type DirectoryOrCreate)")
    mounts = {m["mountPath"]: m["name"] for m in writer.get("volumeMounts", [])}
    if flag_value(args, "--hosts-dir") not in mounts or mounts[flag_value(args, "--hosts-dir")] != hosts_volume:
        problems.append(f"--hosts-dir {flag_value(args, '--hosts-dir')!r} is not the {CONTAINERD_HOSTS} volume")
    if list(mounts.values()) != [hosts_volume]:
        problems.append(f"it mounts {sorted(mounts.values())}: only the hosts volume")
    if any(m["name"] == hosts_volume for c in spec["containers"] for m in c.get("volumeMounts", [])):
        problems.append("a long-running container mounts the hosts volume: only the init container may")
    env = {v["name"]: v for v in writer.get("env", [])}
    node_ip = env.get("NODE_IP", {}).get("valueFrom", {}).get("fieldRef", {})
    if node_ip.get("fieldPath") != "status.hostIP":
        problems.append("NODE_IP does not come from status.hostIP (containerd is in the node's network)")
    want = f"http://$(NODE_IP):{host_ports.get('api')}"
    if flag_value(args, "--agent") != want:
        problems.append(f"--agent is {flag_value(args, '--agent')!r}, want {want} (the API's hostPort)")
    agent_env = {v["name"]: v for v in agent.get("env", [])}
    upstream = env.get("SHOAL_REGISTRY_UPSTREAM", {}).get("valueFrom")
    if not upstream or upstream != agent_env.get("SHOAL_REGISTRY_UPSTREAM", {}).get("valueFrom"):
        problems.append("SHOAL_REGISTRY_UPSTREAM does not come from the same ConfigMap key as the "
                        "agent's: containerd would be sent to registries the agent does not mirror")
    report.check(f"node-agent: {kn(ds)} writes containerd's hosts.toml pointing at its agent's hostPort, "
                 "for the agent's own registries", problems)


def check_agent_service(report, service, ds):
    problems = []
    labels = pod_meta(ds).get("labels", {})
    if not selects(service["spec"].get("selector", {}), labels):
        problems.append(f"selector does not match {kn(ds)}'s pods")
    if service["spec"].get("internalTrafficPolicy") != "Local":
        problems.append("internalTrafficPolicy is not Local: a pod's reads could go to another "
                        "node's agent")
    ports = {p.get("name") for c in pod_spec(ds)["containers"] for p in c.get("ports", [])}
    targets = [p.get("targetPort") for p in service["spec"]["ports"]]
    if targets != ["api"] or "api" not in ports:
        problems.append(f"target ports {targets}, want only the agent's port named api")
    report.check(f"node-agent: {kn(service)} sends each pod to its own node's agent API", problems)


def check_agent_network_policy(report, policy, ds, allowed_namespaces):
    """The chunk and API ports may be reached only from Shoal's namespaces."""
    problems = []
    if not selects(policy["spec"].get("podSelector", {}).get("matchLabels", {}),
                   pod_meta(ds).get("labels", {})):
        problems.append(f"podSelector does not match {kn(ds)}'s pods")
    if "Ingress" not in policy["spec"].get("policyTypes", []):
        problems.append("policyTypes does not include Ingress")
    opened = set()
    for rule in policy["spec"].get("ingress", []):
        ports = {p.get("port") for p in rule.get("ports", [])}
        if not ports:
            problems.append("a rule without ports opens every port")
        opened |= ports
        guarded = ports & {"shoal", "api", 7401, 7480}
        if not guarded:
            continue
        peers = rule.get("from", [])
        if not peers:
            problems.append(f"ports {sorted(map(str, guarded))} are open to every pod")
        for peer in peers:
            ns = peer.get("namespaceSelector", {}).get("matchLabels", {})
            if "ipBlock" in peer or ns.get("kubernetes.io/metadata.name") not in allowed_namespaces:
                problems.append(f"ports {sorted(map(str, guarded))} are open to {peer}, not only "
                                f"to pods of {sorted(allowed_namespaces)}")
    for needed in ("shoal", "api"):
        if needed not in opened:
            problems.append(f"port {needed} is allowed from nowhere")
    report.check(f"node-agent: {kn(policy)} keeps the chunk and API ports within "
                 f"{', '.join(sorted(allowed_namespaces))}", problems)
    return {peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            for rule in policy["spec"].get("ingress", [])
            if {p.get("port") for p in rule.get("ports", [])} & {"api", 7480}
            for peer in rule.get("from", []) if "namespaceSelector" in peer}


def check_example_reader(report, job, service, api_namespaces):
    """The init container fetches through the node-local Service into a volume the program reads."""
    spec = pod_spec(job)
    problems = []
    fetchers = [c for c in spec.get("initContainers", [])
                if image_name(c.get("image", "")) == "shoal-peer" and c.get("args", [])[:1] == ["fetch"]]
    if not fetchers:
        problems.append("no init container runs `shoal-peer fetch` (with the shoal-peer image)")
    svc_port = service["spec"]["ports"][0]["port"]
    want_url = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{svc_port}"
    for c in fetchers:
        args = c["args"]
        if flag_value(args, "--agent") != want_url:
            problems.append(f"--agent is {flag_value(args, '--agent')!r}, want {want_url}")
        output = flag_value(args, "--output") or ""
        volume = next((m["name"] for m in c.get("volumeMounts", [])
                       if output.startswith(m["mountPath"].rstrip("/") + "/")), None)
        if not volume:
            problems.append(f"--output {output!r} is not on a volume")
        elif not any(m["name"] == volume for m2 in spec["containers"]
                     for m in m2.get("volumeMounts", [])):
            problems.append(f"no main container mounts {volume}, where the file lands")
    if job["metadata"].get("namespace") not in api_namespaces:
        problems.append(f"its namespace may not reach the agent API through the NetworkPolicy")
    report.check(f"node-agent: {kn(job)} fetches through {want_url} into a shared volume", problems)


def check_node_agent(report, docs, base_docs, out_dir, kv, version):
    by_kn = {kn(d): d for d in docs}
    base = {kn(d): d for d in base_docs}
    problems = [f"{k} differs from the base or is missing" for k, d in base.items()
                if k not in REPLACED_BY_AGENTS and by_kn.get(k) != d]
    problems += [f"{k} is still there: the agents replace it" for k in REPLACED_BY_AGENTS
                 if k in by_kn]
    problems += [f"missing {k}" for k in AGENT_OBJECTS if k not in by_kn]
    report.check("node-agent: the base minus its peer Deployment, plus the agents' objects",
                 problems)
    added = [d for d in docs if base.get(kn(d)) != d]
    validate_schemas(report, added, "node-agent", out_dir, kv, version)

    problems = []
    for doc in docs:
        ns = doc["metadata"].get("namespace")
        if doc["kind"] not in CLUSTER_SCOPED and ns not in (NAMESPACE, AGENT_NAMESPACE):
            problems.append(f"{kn(doc)} is in namespace {ns!r}")
        paths, host_ports = host_exposure(doc) if doc["kind"] in WORKLOAD_KINDS else ({}, {})
        if (paths or host_ports) and ns != AGENT_NAMESPACE:
            problems.append(f"{kn(doc)} uses the host's disk or ports outside {AGENT_NAMESPACE}")
        if doc["kind"] in WORKLOAD_KINDS and ns == AGENT_NAMESPACE and kn(doc) != "DaemonSet/shoal-agent":
            problems.append(f"{kn(doc)} is in {AGENT_NAMESPACE}, which is for the agents only")
    labels = by_kn.get(f"Namespace/{AGENT_NAMESPACE}", {}).get("metadata", {}).get("labels", {})
    for mode in ("warn", "audit"):
        if labels.get(f"pod-security.kubernetes.io/{mode}") != "restricted":
            problems.append(f"namespace {AGENT_NAMESPACE} does not {mode} at 'restricted'")
    shoal_labels = by_kn.get("Namespace/shoal", {}).get("metadata", {}).get("labels", {})
    if shoal_labels.get("pod-security.kubernetes.io/enforce") != "restricted":
        problems.append("namespace shoal no longer enforces 'restricted'")
    report.check(f"node-agent: host access only in {AGENT_NAMESPACE}, which warns and audits at "
                 "'restricted'; shoal still enforces it", problems)

    configmaps_by_ns = {}
    for d in docs:
        if d["kind"] == "ConfigMap":
            configmaps_by_ns.setdefault(d["metadata"].get("namespace"), {})[d["metadata"]["name"]] = d.get("data", {})
    configmaps = {name: data for cms in configmaps_by_ns.values() for name, data in cms.items()}
    ds, service = by_kn.get("DaemonSet/shoal-agent"), by_kn.get("Service/shoal-agent")
    policy, job = by_kn.get("NetworkPolicy/shoal-agent"), by_kn.get("Job/shoal-example-reader")
    if not (ds and service and policy and job):
        return
    check_workload(report, "node-agent", ds, configmaps)
    check_workload(report, "node-agent", job, configmaps, is_service=False)
    check_agent_daemonset(report, ds, by_kn, configmaps_by_ns)
    check_agent_mirror_config(report, ds, by_kn)
    settings = {}
    for data in configmaps_by_ns.get(AGENT_NAMESPACE, {}).values():
        settings.update(data)
    tracker = f"shoal-tracker.{NAMESPACE}.svc:7400"
    problems = []
    if settings.get("SHOAL_TRACKER") != tracker:
        problems.append(f"SHOAL_TRACKER is {settings.get('SHOAL_TRACKER')!r}, want {tracker}")
    if settings.get("SHOAL_WANT") != "":
        problems.append(f"SHOAL_WANT is {settings.get('SHOAL_WANT')!r}: agents fetch what they "
                        "are asked for")
    swarm = {}
    for data in configmaps_by_ns.get(NAMESPACE, {}).values():
        swarm.update(data)
    if settings.get("SHOAL_TRACKER_REPLICAS") != swarm.get("SHOAL_TRACKER_REPLICAS"):
        problems.append(f"SHOAL_TRACKER_REPLICAS is {settings.get('SHOAL_TRACKER_REPLICAS')!r}, "
                        f"the rest of the swarm uses {swarm.get('SHOAL_TRACKER_REPLICAS')!r}: "
                        "peers would disagree on which trackers own a file")
    report.check(f"node-agent: the agents' ConfigMap points at the trackers ({tracker}) with the "
                 "swarm's owner count, and wants nothing unasked", problems)
    check_agent_service(report, service, ds)
    api_namespaces = check_agent_network_policy(report, policy, ds, {NAMESPACE, AGENT_NAMESPACE})
    check_example_reader(report, job, service, api_namespaces)


def check_tools(report, tools_dir, out_dir, kv, version, seeder):
    docs = []
    for path in sorted(tools_dir.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    validate_schemas(report, docs, "tools", out_dir, kv, version)
    for doc in docs:
        if doc["kind"] in WORKLOAD_KINDS:
            check_workload(report, "tools", doc, {}, is_service=False)
        if doc["metadata"].get("namespace") != NAMESPACE:
            report.check(f"tools: {kn(doc)} in namespace shoal", ["wrong namespace"])
    loader = next((d for d in docs if kn(d) == "Pod/shoal-seed-loader"), None)
    if loader and seeder:
        template = seeder["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
        want = f"{template}-{seeder['metadata']['name']}-0"
        claims = [v["persistentVolumeClaim"]["claimName"] for v in loader["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]
        report.check(f"tools: seed loader mounts the claim of seeder 0 ({want})",
                     [] if claims == [want] else [f"it mounts {claims}"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-validate", required=True, help="the CLI to run")
    parser.add_argument("--kubernetes-version", required=True)
    parser.add_argument("--out", type=Path, required=True, help="where rendered YAML goes")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    kv, version = args.kubernetes_validate, args.kubernetes_version
    report = Report()

    dashboard_text = check_dashboard(report, Path("k8s/dashboard/shoal.json"))

    base = render(report, "k8s/", args.out / "shoal.yaml")
    seeder = None
    if base is not None:
        validate_schemas(report, base, "base", args.out, kv, version)
        check_base(report, base)
        seeder = next((d for d in base if kn(d) == "StatefulSet/shoal-seeder"), None)

    monitoring = render(report, "k8s/monitoring", args.out / "shoal-monitoring.yaml")
    if monitoring is not None:
        # What the base already passed is only compared with it, not validated twice.
        base_by_kn = {kn(d): d for d in base or []}
        added = [d for d in monitoring if base_by_kn.get(kn(d)) != d]
        validate_schemas(report, added, "monitoring", args.out, kv, version)
        check_monitoring(report, monitoring, base or [], dashboard_text)

    node_agent = render(report, "k8s/node-agent", args.out / "shoal-node-agent.yaml")
    if node_agent is not None:
        check_node_agent(report, node_agent, base or [], args.out, kv, version)

    tls = render(report, "k8s/tls", args.out / "shoal-tls.yaml")
    if tls is not None:
        check_tls(report, tls, base or [], args.out, kv, version)

    check_tools(report, Path("k8s/tools"), args.out, kv, version, seeder)

    print(f"k8s-check: {report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
