"""Offline checks of the deployment files under deploy/, for scripts/deploy-check.

    python3 scripts/deploy-check.py OUT_DIR CERTS_DIR

Parses every YAML file under deploy/ and checks that the settings which must agree between the
Kubernetes manifests and the config in configmap.yaml (and between the cluster compose file and
its configs) do. Writes the ConfigMap's fulcrum.toml to OUT_DIR/configmap-fulcrum.toml with its
/etc/fulcrum/certs/ paths pointing at CERTS_DIR, for `fulcrum check`. Exits 1 naming every
problem found, 0 otherwise. Needs PyYAML and Python 3.11 (tomllib).
"""

import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
CLUSTER = DEPLOY / "cluster"

CONFIG_DIR = "/etc/fulcrum/config"
CERTS_DIR = "/etc/fulcrum/certs"
ADMIN_DIR = "/etc/fulcrum/admin"

problems = []


def check(ok, message):
    if not ok:
        problems.append(message)
    return ok


def seconds(text):
    """A fulcrum duration ("30s", "250ms", "1m", "1h") in seconds."""
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unexpected duration {text!r}")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    return int(m.group(1)) * scale


def port(bind):
    return int(bind.rsplit(":", 1)[1])


def load_all():
    """Every YAML file under deploy/: path -> list of documents."""
    docs = {}
    for path in sorted(DEPLOY.rglob("*.yaml")):
        try:
            docs[path] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as e:
            check(False, f"{path.relative_to(ROOT)}: not valid YAML: {e}")
    return docs


def k8s_objects(docs):
    objects = {}
    for path, documents in docs.items():
        if path.parent != K8S:
            continue
        for d in documents:
            where = path.relative_to(ROOT)
            if not check(isinstance(d, dict), f"{where}: a document is not a mapping"):
                continue
            for key in ("apiVersion", "kind", "metadata"):
                check(key in d, f"{where}: {d.get('kind', '?')} has no {key}")
            name = (d.get("metadata") or {}).get("name")
            check(bool(name), f"{where}: {d.get('kind')} has no metadata.name")
            objects[(d.get("kind"), name)] = d
    return objects


def check_kubernetes(objects, out_dir, certs_dir):
    cm = objects.get(("ConfigMap", "fulcrum-config"))
    dep = objects.get(("Deployment", "fulcrum"))
    svc = objects.get(("Service", "fulcrum"))
    secret = objects.get(("Secret", "fulcrum-certs"))
    if not all([check(cm is not None, "no ConfigMap fulcrum-config"),
                check(dep is not None, "no Deployment fulcrum"),
                check(svc is not None, "no Service fulcrum"),
                check(secret is not None, "no Secret fulcrum-certs"),
                check(("Service", "redis") in objects, "no Service redis (redis.yaml)")]):
        return
    text = cm["data"]["fulcrum.toml"]
    config = tomllib.loads(text)

    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    check(dep["spec"]["replicas"] >= 2, "deployment: fewer than 2 replicas")

    # The config file and the certificates are where the config and the args say.
    args = container["args"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    check(args == ["run", "--config", f"{CONFIG_DIR}/fulcrum.toml"], f"deployment: args {args}")
    for name, path, source, ref in [("config", CONFIG_DIR, "configMap", "fulcrum-config"),
                                    ("certs", CERTS_DIR, "secret", "fulcrum-certs"),
                                    ("admin", ADMIN_DIR, "secret", "fulcrum-admin")]:
        check(mounts.get(name) == path, f"deployment: volume {name} not mounted at {path}")
        vol = volumes.get(name, {}).get(source, {})
        check(ref in (vol.get("name"), vol.get("secretName")), f"deployment: volume {name} is not {ref}")
    secret_files = set(secret.get("stringData") or {}) | set(secret.get("data") or {})
    for listener in config["listener"]:
        for key, value in (listener.get("tls") or {}).items():
            if key in ("cert", "key", "client_ca"):
                check(value.startswith(CERTS_DIR + "/") and value[len(CERTS_DIR) + 1:] in secret_files,
                      f"configmap: listener.tls.{key} = {value!r} is not a file of the Secret")

    # Security settings the README promises.
    pod_sc, sc = pod["securityContext"], container["securityContext"]
    check(pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser") == 65532,
          "deployment: pod not runAsNonRoot as 65532")
    check(sc.get("readOnlyRootFilesystem") is True, "deployment: root filesystem not read-only")
    check(sc.get("allowPrivilegeEscalation") is False, "deployment: privilege escalation allowed")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"], "deployment: capabilities not dropped")
    for kind in ("requests", "limits"):
        check(kind in container.get("resources", {}), f"deployment: no resource {kind}")

    # Ports: the listener, the admin endpoint, probes, scrape annotations and the Service agree.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (listener,) = config["listener"]
    check(port(listener["bind"]) == ports.get("tls"), "deployment: port tls is not the listener's")
    admin = port(config["admin"]["bind"])
    check(admin == ports.get("admin"), "deployment: port admin is not [admin] bind's")
    check(not config["admin"]["bind"].startswith("127."), "configmap: admin on loopback: probes cannot reach it")
    admin_secret = objects.get(("Secret", "fulcrum-admin"), {})
    admin_files = set(admin_secret.get("stringData") or {}) | set(admin_secret.get("data") or {})
    token_file = config["admin"].get("token_file", "")
    check(token_file.startswith(ADMIN_DIR + "/") and token_file[len(ADMIN_DIR) + 1:] in admin_files,
          f"configmap: [admin] token_file = {token_file!r} is not a file of the fulcrum-admin Secret")
    check(config.get("reload", {}).get("watch") is True,
          "configmap: [reload] watch is off: Secret and ConfigMap updates would need a restart")
    for volume in container.get("volumeMounts", []):
        check("subPath" not in volume, f"deployment: {volume['name']} uses subPath, which never sees updates")
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        check(get == {"path": "/healthz", "port": "admin"}, f"deployment: {probe} is not GET /healthz on admin")
    notes = dep["spec"]["template"]["metadata"]["annotations"]
    check(notes.get("prometheus.io/port") == str(admin), "deployment: prometheus.io/port is not the admin port")
    check(notes.get("prometheus.io/path") == "/metrics", "deployment: prometheus.io/path is not /metrics")
    svc_ports = svc["spec"]["ports"]
    check([p["targetPort"] for p in svc_ports] == ["tls"], "service: should expose only the tls port")
    check(svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"], "service: selector != deployment's")

    # Shutdown: preStop sleep + drain_timeout fit in the grace period, with a margin.
    drain = seconds(config.get("drain_timeout", "30s"))
    sleep = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod["terminationGracePeriodSeconds"]
    check(sleep + drain + 5 <= grace,
          f"deployment: terminationGracePeriodSeconds {grace} < preStop {sleep} + drain_timeout {drain} + 5")

    # Workers follow the CPU limit.
    workers = config.get("runtime", {}).get("workers")
    cpu = container["resources"]["limits"].get("cpu")
    check(workers is None or str(workers) == str(cpu), f"configmap: workers {workers} != cpu limit {cpu}")

    # The shared limit points at the example Redis Service.
    shared = config.get("rate_limit", {}).get("shared", {})
    redis_port = objects[("Service", "redis")]["spec"]["ports"][0]["port"]
    check(shared.get("redis", "").startswith(f"redis://redis:{redis_port}/"),
          "configmap: [rate_limit.shared] redis is not the redis Service")

    (certs_dir / "admin.token").write_text("deploy-check token\n")
    # As the Secret mounts it: readable by its owner only (fulcrum refuses a readable token).
    (certs_dir / "admin.token").chmod(0o600)
    rewritten = text.replace(CERTS_DIR + "/", str(certs_dir) + "/").replace(ADMIN_DIR + "/token", str(certs_dir) + "/admin.token")
    (out_dir / "configmap-fulcrum.toml").write_text(rewritten)


def check_cluster(docs):
    (compose,) = docs[CLUSTER / "compose.yaml"]
    services = compose["services"]
    check(services["redis"]["image"] == "${REDIS_IMAGE:-redis:7-alpine}", "cluster: redis image not parameterised")
    for name in ("fulcrum-1", "fulcrum-2"):
        service = services[name]
        check(service["image"] == "${FULCRUM_IMAGE:-fulcrum:latest}", f"cluster: {name} image not parameterised")
        config = tomllib.loads((CLUSTER / f"{name}.toml").read_text())
        check(f"./{name}.toml:/etc/fulcrum/fulcrum.toml:ro" in service["volumes"], f"cluster: {name} config mount")
        drain = seconds(config.get("drain_timeout", "30s"))
        check(seconds(service["stop_grace_period"]) > drain, f"cluster: {name} stop_grace_period <= drain_timeout")
        check(config["rate_limit"]["shared"]["redis"] == "redis://127.0.0.1:26379/0",
              f"cluster: {name} does not count in the compose file's Redis")


def main():
    out_dir, certs_dir = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
    docs = load_all()
    names = ", ".join(str(p.relative_to(ROOT)) for p in docs)
    print(f"YAML parses: {names}")
    check_kubernetes(k8s_objects(docs), out_dir, certs_dir)
    check_cluster(docs)
    for p in problems:
        print(f"deploy-check: {p}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
