#!/usr/bin/env bash
# Checks the deployment files with the tools that consume them, and against the code:
#   Kubernetes objects against the API schema (strict), the Prometheus configs and
#   alert rules (with their unit tests), every Grafana query as PromQL, the systemd
#   units; every SHOAL_* setting they use is one the binary reads, and every shoal
#   metric they query is one the node exports. Run by scripts/test.sh after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
SHOAL=${SHOAL_BIN:-$CARGO_TARGET_DIR/release/shoal}
[[ -x $SHOAL ]] || { echo "deploy: $SHOAL not built (cargo build --release -p shoal)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The checkers: promtool (Debian's prometheus), systemd-analyze, kubernetes-validate.
need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v systemd-analyze >/dev/null || need+=(systemd)
if ((${#need[@]})); then
  apt_install deploy "${need[@]}"
fi
VENV=$HOME/.cache/shoal/deploy-venv
if [[ ! -x $VENV/bin/kubernetes-validate ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
fi

echo "deploy: kubernetes" >&2
"$VENV/bin/kubernetes-validate" --strict --quiet deploy/kubernetes/coordinator.yaml deploy/kubernetes/node.yaml \
  deploy/kubernetes/network-policy.yaml

echo "deploy: security wiring" >&2
# Every file a process is pointed at (TLS, the root key) lies under a read-only mount
# of a Secret; the health probes use the plaintext health port, not a TLS one; each
# internal port (a node's 7301, a coordinator's 7101) is reachable only from pods of
# its own component, and every port a container exposes is named by a policy.
"$VENV/bin/python3" - deploy/kubernetes/coordinator.yaml deploy/kubernetes/node.yaml deploy/kubernetes/network-policy.yaml <<'PY'
import sys, yaml
coord, node, netpol = sys.argv[1:]
docs = lambda f: [d for d in yaml.safe_load_all(open(f)) if d]
policies = {p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]: p for p in docs(netpol)}
internal = {"node": 7301, "coordinator": 7101}
for f in (coord, node):
    for d in docs(f):
        if d["kind"] != "StatefulSet":
            continue
        pod = d["spec"]["template"]["spec"]
        comp = d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        secrets = {v["name"] for v in pod.get("volumes", []) if "secret" in v}
        for c in pod["containers"]:
            env = {e["name"]: e.get("value", "") for e in c["env"]}
            for var in ("SHOAL_TLS_CA", "SHOAL_TLS_CERT", "SHOAL_TLS_KEY", "SHOAL_ROOT_KEY_FILE"):
                path = env.get(var)
                assert path, f"{f}: {comp} has no {var}"
                mounts = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
                assert mounts and mounts[0]["name"] in secrets and mounts[0].get("readOnly"), \
                    f"{f}: {var}={path} is not under a read-only Secret mount"
            health = int(env["SHOAL_HEALTH_LISTEN"].rsplit(":", 1)[1])
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe in c:
                    assert c[probe]["grpc"]["port"] == health, f"{f}: {probe} is not on the health port"
            ports = {p["containerPort"] for p in c["ports"]}
            rules = policies[comp]["spec"]["ingress"]
            named = {p["port"] for r in rules for p in r["ports"]}
            assert ports <= named, f"{comp}: ports {ports - named} in no NetworkPolicy rule"
            for r in rules:
                if internal[comp] in {p["port"] for p in r["ports"]}:
                    sel = [s["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for s in r.get("from", [])]
                    assert sel == [comp], f"{comp}: internal port {internal[comp]} open to {sel or 'anyone'}"
PY
if command -v kubectl >/dev/null; then
  kubectl kustomize deploy/kubernetes >"$tmp/rendered.yaml"
  "$VENV/bin/kubernetes-validate" --strict --quiet "$tmp/rendered.yaml"
fi

echo "deploy: settings" >&2
known=$({ "$SHOAL" node --help; "$SHOAL" coordinator --help; } | grep -o 'SHOAL_[A-Z_]*' | sort -u)
used=$(grep -rhoE 'SHOAL_[A-Z_]+' deploy/kubernetes deploy/systemd deploy/docker | sort -u)
unknown=$(comm -23 <(echo "$used") <(echo "$known"))
[[ -z $unknown ]] || { echo "deploy: settings the binary does not read: $unknown" >&2; exit 1; }

echo "deploy: prometheus" >&2
promtool check config deploy/prometheus/prometheus.yml >/dev/null
promtool check config deploy/prometheus/prometheus-dev.yml >/dev/null
promtool test rules deploy/prometheus/shoal-rules.test.yml >/dev/null

echo "deploy: grafana" >&2
# Each dashboard query (Grafana's variables replaced by what they stand for) becomes a
# recording rule, so promtool parses it; the shoal metrics named in the queries and
# the alerts must be ones the node or the coordinator describes.
python3 - deploy/grafana/shoal.json deploy/prometheus/shoal-rules.yml "$tmp/dashboard-rules.yml" \
  node/src/cluster/metrics.rs coordinator/src/metrics.rs <<'PY'
import json, re, sys
dashboard, alerts, out, *sources = sys.argv[1:]
exprs = []
def walk(panels):
    for p in panels:
        walk(p.get("panels", []))
        exprs.extend(t["expr"] for t in p.get("targets", []))
walk(json.load(open(dashboard))["panels"])
assert exprs, "no queries in the dashboard"
subst = {"$__rate_interval": "5m", "$__range": "1h", "$node": ".*"}
with open(out, "w") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, e in enumerate(exprs):
        for k, v in subst.items():
            e = e.replace(k, v)
        f.write(f"      - record: dashboard:query_{i}\n        expr: {json.dumps(e)}\n")
described = set(re.findall(r'describe_\w+!\(\s*"(shoal_\w+)"', " ".join(open(f).read() for f in sources)))
used = set(re.findall(r"\b(shoal_\w+)", " ".join(exprs) + open(alerts).read()))
base = {re.sub(r"_(bucket|sum|count)$", "", m) if m not in described else m for m in used}
missing = sorted(base - described)
if missing:
    sys.exit(f"deploy: metrics queried but exported by neither the node nor the coordinator: {missing}")
print(f"deploy: {len(exprs)} dashboard queries, {len(base)} metrics, all exported", file=sys.stderr)
PY
promtool check rules "$tmp/dashboard-rules.yml" >/dev/null

echo "deploy: systemd" >&2
# Verified in a scratch root holding the binary where the units expect it.
root="$tmp/root"
mkdir -p "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/lib"
cp -r /usr/lib/systemd "$root/usr/lib/"
cp "$SHOAL" "$root/usr/local/bin/shoal"
cp deploy/systemd/*.service "$root/etc/systemd/system/"
report=$(systemd-analyze verify --root="$root" "$root"/etc/systemd/system/shoal-*.service 2>&1) || true
[[ -z $report ]] || { echo "deploy: systemd units: $report" >&2; exit 1; }
echo "deploy: ok" >&2
