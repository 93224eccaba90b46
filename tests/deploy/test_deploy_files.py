"""deploy/ parsed and linted: the Dockerfile, the compose files, the systemd units, the KubeRay
manifest and the README's commands. Every `lorapool` command, option and LORAPOOL_* variable
they use must exist in the CLI and the settings as they are now (found by introspection)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.recipe import (
    DEPLOY,
    assignments,
    bash_blocks,
    check_invocation,
    commands,
    env_file,
    known_env_vars,
    lorapool_invocations,
    recipe_blocks,
)

SYSTEMD = DEPLOY / "systemd"
UNITS = sorted(SYSTEMD.glob("*.service"))


# -- Dockerfile ------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    joined = re.sub(r"\\\n(\s*#.*\n)*", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_pinned_nonroot_healthy() -> None:
    ins = dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    args = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args.setdefault(k, v)
    stages: set[str] = set()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 2, "expected a build stage and a runtime stage"
    for rest in froms:
        parts = rest.split()
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), parts[0])
        if image not in stages:
            name, _, tag = image.partition(":")
            assert tag and tag != "latest" and re.search(r"\d", tag), f"FROM {image} not pinned"
        if len(parts) == 3 and parts[1].upper() == "AS":
            stages.add(parts[2])
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert [w for w, _ in ins].index("USER") > [w for w, _ in ins].index("FROM")
    assert not [r for w, r in ins if w == "ADD" and re.search(r"https?://", r)], "ADD of a URL"
    assert any(w == "HEALTHCHECK" for w, _ in ins)
    text = (DEPLOY / "Dockerfile").read_text()
    # The CPU variant takes torch from PyTorch's CPU index; the CUDA one from a CUDA index.
    assert "download.pytorch.org/whl/cpu" in text and "download.pytorch.org/whl/cu" in text
    assert re.search(r"ARG VARIANT=cpu", text)
    # ENTRYPOINT + CMD is a lorapool command line that exists.
    entry = [yaml.safe_load(r) for w, r in ins if w == "ENTRYPOINT"][-1]
    cmd = [yaml.safe_load(r) for w, r in ins if w == "CMD"][-1]
    assert entry == ["lorapool"]
    assert check_invocation(cmd) == "lorapool serve"


# -- compose ---------------------------------------------------------------------------------


def _compose(name: str) -> dict:
    class Loader(yaml.SafeLoader):
        pass

    # Compose's `!reset` tag (an override that empties a list).
    Loader.add_constructor("!reset", lambda loader, node: [])
    return yaml.load((DEPLOY / name).read_text(), Loader=Loader)


def _compose_invocations(service: dict) -> list[list[str]]:
    entry = service.get("entrypoint")
    cmd = service.get("command")
    if entry in (None, ["lorapool"]):
        return [cmd] if cmd else []
    assert entry[:2] == ["/bin/sh", "-c"], entry
    return [inv for words in commands(cmd[0]) for inv in lorapool_invocations(words)]


def test_compose_head_ports_volumes_auth() -> None:
    doc = _compose("compose.yaml")
    services = doc["services"]
    head = services["head"]
    assert head["environment"]["RAY_AUTH_MODE"] == "token"
    token_path = head["environment"]["RAY_AUTH_TOKEN_PATH"]
    assert token_path == "/run/secrets/ray_token" and "ray_token" in head["secrets"]
    assert "ray_token" in doc["secrets"]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in head["volumes"]}
    assert mounts["/var/lib/lorapool"] in doc["volumes"], "the data dir is not on a volume"
    assert head["environment"]["LORAPOOL_DATA_DIR"] == "/var/lib/lorapool"
    invoked = [check_invocation(inv) for svc in services.values()
               for inv in _compose_invocations(svc)]
    assert sorted(invoked) == ["lorapool donate", "lorapool serve"], invoked
    head_cmd = head["command"][0]
    assert "ray start --head" in head_cmd and "--include-dashboard=false" in head_cmd


def test_compose_lan_overlay() -> None:
    head = _compose("compose.lan.yaml")["services"]["head"]
    assert head["network_mode"] == "host" and head["ports"] == []
    invoked = [check_invocation(inv) for inv in _compose_invocations(
        {**_compose("compose.yaml")["services"]["head"], **head})]
    assert invoked == ["lorapool serve"]
    # The API stays on loopback; only Ray binds HEAD_IP.
    assert "--host 127.0.0.1" in head["command"][0]


# -- systemd ---------------------------------------------------------------------------------


def unit_entries(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections → (key, value) in order; keys may repeat, as systemd allows."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        assert current is not None and "=" in line, f"{path.name}: bad line {line!r}"
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def test_units_are_hardened_and_run_existing_commands() -> None:
    assert {u.name for u in UNITS} == {"lorapool-head.service", "lorapool-donor.service"}
    for unit in UNITS:
        sec = unit_entries(unit)
        svc = dict(sec["Service"])
        assert svc.get("User") and svc["User"] not in ("root", "0"), unit.name
        for key, want in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                          ("PrivateTmp", "yes"), ("RestrictSUIDSGID", "yes")):
            assert svc.get(key) == want, f"{unit.name}: {key}={svc.get(key)}"
        assert svc.get("Restart") in ("on-failure", "always"), unit.name
        assert svc["LoadCredential"].startswith("ray_token:"), unit.name
        assert sec["Install"] and dict(sec["Install"])["WantedBy"]
        values = env_file(SYSTEMD / dict(sec["Service"])["EnvironmentFile"].rsplit(
            "/", 1)[1].replace(".env", ".env.example"))
        values["DONOR_OPTIONS"] = values.get("DONOR_OPTIONS", "")
        execs = [v for k, v in sec["Service"] if k == "ExecStart"]
        assert len(execs) == 1
        invs = [inv for w in commands(execs[0], values) for inv in lorapool_invocations(w)]
        assert len(invs) == 1, execs
        path = check_invocation(invs[0])
        if path == "lorapool donate":
            # The token: the systemd credential, never on the command line.
            assert "--token-file" in invs[0] and "%d/ray_token" in invs[0]
        else:
            env = [v for k, v in sec["Service"] if k == "Environment"]
            assert "RAY_AUTH_MODE=token" in env and "RAY_AUTH_TOKEN_PATH=%d/ray_token" in env
            assert path == "lorapool serve"
            # The head's `ray start` posts a notice even with usage stats off: to loopback.
            assert "RAY_USAGE_STATS_REPORT_URL=http://127.0.0.1:9/" in env, unit.name


def test_image_sends_rays_usage_notice_to_loopback() -> None:
    """Every head started from the image (compose, KubeRay) has Ray's usage stats off and its
    "disabled" notice pointed at loopback (test_head_outward_traffic.py runs such a head)."""
    env = " ".join(rest for word, rest in
                   dockerfile_instructions((DEPLOY / "Dockerfile").read_text()) if word == "ENV")
    assert "RAY_USAGE_STATS_ENABLED=0" in env.split()
    assert "RAY_USAGE_STATS_REPORT_URL=http://127.0.0.1:9/" in env.split()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point /opt/lorapool/bin at this venv's.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("lorapool", "ray"):
        script = bin_dir / name
        module = "lorapool.cli" if name == "lorapool" else "ray.scripts.scripts"
        script.write_text(f"#!/bin/sh\nexec {sys.executable} -m {module} \"$@\"\n")
        script.chmod(0o755)
    copies = []
    for unit in UNITS:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/opt/lorapool/bin", str(bin_dir)))
        copies.append(str(copy))
    done = subprocess.run(["systemd-analyze", "verify", *copies], capture_output=True,
                          text=True, timeout=60)
    # Unknown keys and bad values are warnings with exit status 0: any output fails.
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), (
        done.stdout + done.stderr)


# -- KubeRay ---------------------------------------------------------------------------------


def _k8s() -> dict[str, dict]:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "lorapool.yaml").read_text()))
    for d in docs:
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(d), d.get("kind")
        assert d["metadata"]["name"]
    return {d["kind"]: d for d in docs}


def _env(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_kuberay_cluster_deployment_service() -> None:
    docs = _k8s()
    assert set(docs) >= {"RayCluster", "Deployment", "Service"}
    rc = docs["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    head = rc["spec"]["headGroupSpec"]
    assert "rayStartParams" in head and head["rayStartParams"]["include-dashboard"] == "false"
    groups = rc["spec"]["workerGroupSpecs"]
    assert groups and all({"groupName", "replicas", "rayStartParams", "template"} <= set(g)
                          for g in groups)
    ray_containers = [head["template"]["spec"]["containers"][0],
                      *(g["template"]["spec"]["containers"][0] for g in groups)]
    dep = docs["Deployment"]
    assert dep["apiVersion"] == "apps/v1"
    api = dep["spec"]["template"]["spec"]["containers"][0]
    secret_names = set()
    for c in [*ray_containers, api]:
        env = _env(c)
        assert env.get("RAY_AUTH_MODE") == "token", c["name"]
        secret_names.add(env["RAY_AUTH_TOKEN"]["secretKeyRef"]["name"])
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert len(secret_names) == 1, "every Ray process must use the same token"
    assert dep["spec"]["selector"]["matchLabels"].items() <= (
        dep["spec"]["template"]["metadata"]["labels"].items())
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    svc = docs["Service"]
    assert svc["apiVersion"] == "v1" and svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    # The Deployment joins the head through KubeRay's head service, <cluster>-head-svc.
    head_svc = f"{rc['metadata']['name']}-head-svc"
    invoked = []
    for c in [api, *ray_containers[1:]]:
        script = c["args"][0]
        invoked += [check_invocation(inv) for w in commands(script)
                    for inv in lorapool_invocations(w)]
    assert sorted(invoked) == ["lorapool donate", "lorapool serve"]
    assert head_svc in api["args"][0]


# -- the README and every file: commands and variables that exist --------------------------


def test_readme_commands_exist() -> None:
    blocks = recipe_blocks()
    assert {"settings", "token", "head-env", "head-ray", "head-serve", "tenants",
            "donor-token", "donor", "loopback-head"} <= set(blocks)
    values = assignments(blocks["settings"])
    seen = set()
    for block in bash_blocks():
        for words in commands(block, values):
            for inv in lorapool_invocations(words):
                seen.add(check_invocation(inv))
    assert {"lorapool serve", "lorapool donate", "lorapool token create",
            "lorapool models add"} <= seen, seen
    # The head-serve and donor blocks are one command each (the loopback test execs them).
    for name in ("head-serve", "donor"):
        cmds = list(commands(blocks[name], values))
        assert len(cmds) == 1 and cmds[0][0] == "lorapool", cmds


def test_every_lorapool_variable_exists() -> None:
    known = known_env_vars()
    used: dict[str, set[str]] = {}
    for path in DEPLOY.rglob("*"):
        if path.is_file() and "secrets" not in path.parts:
            for var in re.findall(r"\bLORAPOOL_[A-Z0-9_]+", path.read_text()):
                used.setdefault(var, set()).add(path.name)
    assert used, "no LORAPOOL_ variable found at all"
    unknown = {v: sorted(f) for v, f in used.items() if v not in known}
    assert not unknown, f"unknown variables: {unknown}; known: {sorted(known)}"
