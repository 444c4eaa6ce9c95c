"""install-service into a --prefix, and `systemd-analyze verify` on the units."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import pytest

from fleetpipe.cli import main
from fleetpipe.config import NodeConfig, PlannerConfig, load
from fleetpipe.deploy import install


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _secrets(tmp_path: Path) -> tuple[Path, Path]:
    pw = tmp_path / "n1.password"
    pw.write_text("pw-n1\n")
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    return pw, ca


def test_node_unit_and_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    pw, ca = _secrets(tmp_path)
    argv = ["install-service", "--role", "node", "--name", "n1", "--fleet", "lab", "--broker",
            "mqtts://10.0.0.2:8883", "--password-file", str(pw), "--ca-certs", str(ca), "--prefix", str(root)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "systemctl daemon-reload && sudo systemctl enable --now fleetpipe-node.service" in out
    unit = (root / "etc/systemd/system/fleetpipe-node.service").read_text()
    assert f"ExecStart={install.fleetpipe_executable()} node --config /etc/fleetpipe/node.toml\n" in unit
    config_file = root / "etc/fleetpipe/node.toml"
    assert _mode(config_file) == 0o640 and _mode(root / "etc/fleetpipe/n1.password") == 0o640
    assert (root / "etc/fleetpipe/n1.password").read_text() == "pw-n1\n"
    cfg = load(NodeConfig, file=config_file)
    assert (cfg.name, cfg.fleet, cfg.cache_dir) == ("n1", "lab", "/var/cache/fleetpipe/slices")
    assert cfg.broker.url == "mqtts://10.0.0.2:8883" and cfg.broker.username == "n1"
    assert (cfg.broker.password_file, cfg.broker.ca_certs) == ("/etc/fleetpipe/n1.password", "/etc/fleetpipe/ca.crt")
    assert "u fleetpipe" in (root / "etc/sysusers.d/fleetpipe.conf").read_text()

    # An edited config survives a re-install; --force replaces it.
    config_file.write_text(config_file.read_text().replace('"lab"', '"edited"'))
    assert main(argv) == 0
    assert "kept" in capsys.readouterr().out and load(NodeConfig, file=config_file).fleet == "edited"
    assert main([*argv, "--force"]) == 0
    assert load(NodeConfig, file=config_file).fleet == "lab"


def test_template_and_planner(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for name in ("e1", "e2"):
        assert main(["install-service", "--template", "--name", name, "--prefix", str(root)]) == 0
        cfg = load(NodeConfig, file=root / f"etc/fleetpipe/node-{name}.toml")
        assert (cfg.name, cfg.cache_dir, cfg.broker.url) == (name, f"/var/cache/fleetpipe/{name}", None)
    unit = (root / "etc/systemd/system/fleetpipe-node@.service").read_text()
    assert "--config /etc/fleetpipe/node-%i.toml --name %i" in unit and "CacheDirectory=fleetpipe/%i" in unit
    assert main(["install-service", "--role", "planner", "--model", "/var/lib/fleetpipe/m.onnx",
                 "--broker", "mqtt://127.0.0.1:1883", "--prefix", str(root)]) == 0
    cfg_p = load(PlannerConfig, file=root / "etc/fleetpipe/planner.toml")
    assert (cfg_p.model, cfg_p.broker.url) == ("/var/lib/fleetpipe/m.onnx", "mqtt://127.0.0.1:1883")


def test_dry_run_writes_nothing_and_hides_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pw, _ = _secrets(tmp_path)
    root = tmp_path / "root"
    assert main(["install-service", "--name", "n1", "--password-file", str(pw), "--prefix", str(root),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not root.exists() and "pw-n1" not in out and "[broker]" in out


@pytest.mark.parametrize("argv", [
    ["--ca-certs", "ca.crt", "--broker", "mqtt://h:1883"],  # TLS material with a plain URL
    ["--broker", "http://h"],
    ["--name", "bad/name"],
    ["--template"],  # needs --name
    ["--role", "planner", "--name", "x"],
])
def test_bad_arguments(tmp_path: Path, argv: list[str]) -> None:
    assert main(["install-service", "--prefix", str(tmp_path), *argv]) == 2
    assert not (tmp_path / "etc").exists()


def test_venv_under_home_relaxes_protect_home() -> None:
    unit = install.render_unit("node", exec_path="/home/pi/venv/bin/fleetpipe")
    assert "ProtectHome=read-only" in unit and "ProtectHome=yes" not in unit
    assert "ProtectHome=yes" in install.render_unit("planner", exec_path="/opt/fleetpipe/bin/fleetpipe")


def _units(tmp_path: Path) -> list[Path]:
    """The shipped units as they are, and as install-service renders them (instance for the template)."""
    shipped = resources.files("fleetpipe.deploy.systemd")
    out = []
    for name in ("fleetpipe-node.service", "fleetpipe-planner.service", "fleetpipe-node@.service"):
        target = tmp_path / "shipped" / name.replace("@.", "@n1.")
        target.parent.mkdir(exist_ok=True)
        target.write_text(shipped.joinpath(name).read_text())
        out.append(target)
    root = tmp_path / "root"
    assert main(["install-service", "--name", "n1", "--prefix", str(root)]) == 0
    assert main(["install-service", "--role", "planner", "--prefix", str(root)]) == 0
    out += sorted((root / "etc/systemd/system").glob("*.service"))
    return out


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    units = _units(tmp_path)
    for unit in units:
        proc = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                              timeout=30, check=False)
        if proc.returncode != 0 and "Failed to" in proc.stderr and unit.name not in proc.stderr:
            pytest.skip(f"systemd-analyze cannot run here: {proc.stderr.strip()[:200]}")
        # verify exits 0 on "Unknown key ... ignoring": any line about our unit is a failure
        ours = [line for line in proc.stderr.splitlines() if unit.stem in line or "ignoring" in line]
        assert proc.returncode == 0 and not ours, f"{unit.name}: {proc.stderr}"
        text = unit.read_text()
        for key in ("ProtectSystem=strict", "NoNewPrivileges=yes", "Restart=on-failure", "TimeoutStopSec=30s",
                    "Type=notify", "WatchdogSec=", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
                    "CapabilityBoundingSet=\n", "SystemCallFilter=@system-service", "User=fleetpipe"):
            assert key in text, f"{unit.name} lacks {key}"


def test_broker_config_command_renders_secure_and_lab(tmp_path, capsys):
    from fleetpipe.cli import main

    assert main(["broker", "config", "--secure", "--dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "listener 8883 0.0.0.0" in text and f"password_file {tmp_path}/passwd" in text
    assert "{" not in text
    out = tmp_path / "lab.conf"
    assert main(["broker", "config", "-o", str(out)]) == 0
    assert "listener 1883 127.0.0.1" in out.read_text()
    assert main(["broker", "config", "--secure"]) == 2


def test_planner_keys_go_into_the_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """gen-creds' planner.pub into a node's config, planner.key next to the planner's (signed deployments)."""
    from fleetpipe.deploy import creds

    out = tmp_path / "creds"
    creds.generate(out, fleet="lab", nodes=["n1"], mosquitto_passwd=None)
    root = tmp_path / "root"
    assert main(["install-service", "--name", "n1", "--planner-key", str(out / "planner.pub"),
                 "--prefix", str(root)]) == 0
    assert load(NodeConfig, file=root / "etc/fleetpipe/node.toml").planner_key == \
        (out / "planner.pub").read_text().strip()
    assert main(["install-service", "--role", "planner", "--signing-key", str(out / "planner.key"),
                 "--prefix", str(root)]) == 0
    cfg = load(PlannerConfig, file=root / "etc/fleetpipe/planner.toml")
    assert cfg.signing_key == "/etc/fleetpipe/planner.key"
    key = root / "etc/fleetpipe/planner.key"
    assert _mode(key) == 0o640 and key.read_bytes() == (out / "planner.key").read_bytes()
    assert main(["install-service", "--role", "planner", "--signing-key", str(out / "planner.key"),
                 "--prefix", str(tmp_path / "dry"), "--dry-run"]) == 0
    assert "PRIVATE KEY" not in capsys.readouterr().out
    assert main(["install-service", "--role", "planner", "--planner-key", str(out / "planner.pub"),
                 "--prefix", str(root)]) == 2
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key\n")
    assert main(["install-service", "--name", "n2", "--planner-key", str(bad), "--prefix", str(root)]) == 2
def _service_ids(root: Path) -> tuple[int, int]:
    """uid, gid of the ``fleetpipe`` user in the throw-away root's /etc/passwd (created by install-service)."""
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "fleetpipe":
            return int(fields[2]), int(fields[3])
    raise AssertionError(f"no fleetpipe user in {root}/etc/passwd")


def _read_as(uid: int, gid: int, path: Path) -> subprocess.CompletedProcess[str]:
    """Read ``path`` as the service user would (its uid and primary group only, as the unit's User=/Group=)."""
    return subprocess.run(["cat", str(path)], user=uid, group=gid, extra_groups=[], capture_output=True, text=True,
                          timeout=10, check=False)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or (shutil.which("systemd-sysusers") is None
                    and shutil.which("useradd") is None), reason="needs root and systemd-sysusers or useradd")
def test_fresh_root_user_first_then_files_the_service_can_read(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               request: pytest.FixtureRequest) -> None:
    """A fresh host: the user exists before the config and password are written, so they belong to its group;
    a re-run without --force mends a config whose owner or mode went wrong and keeps its content."""
    root = Path(tempfile.mkdtemp(prefix="fleetpipe-root-"))  # pytest's base temp is 0700: not for another uid
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    os.chmod(root, 0o755)
    pw, ca = _secrets(tmp_path)
    argv = ["install-service", "--role", "node", "--name", "n1", "--fleet", "lab", "--broker",
            "mqtts://10.0.0.2:8883", "--password-file", str(pw), "--ca-certs", str(ca), "--prefix", str(root)]
    assert main(argv) == 0
    assert "created the fleetpipe system user" in capsys.readouterr().out
    uid, gid = _service_ids(root)
    assert uid != 0 and gid != 0
    config, password = root / "etc/fleetpipe/node.toml", root / "etc/fleetpipe/n1.password"
    for path in (config, password):
        st = path.stat()
        assert (st.st_uid, st.st_gid, _mode(path)) == (0, gid, 0o640), path
        assert _read_as(uid, gid, path).returncode == 0, path  # the unit's user reads it
        assert _read_as(uid + 1, gid + 1, path).returncode != 0, path  # nobody else does

    # Someone breaks the config's owner and mode (and edits it): a plain re-run fixes both, keeps the edit.
    config.write_text(config.read_text().replace('"lab"', '"edited"'))
    os.chown(config, 0, 0)
    os.chmod(config, 0o600)
    assert _read_as(uid, gid, config).returncode != 0
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fixed" in out and "created the fleetpipe system user" not in out
    st = config.stat()
    assert (st.st_uid, st.st_gid, _mode(config)) == (0, gid, 0o640)
    assert _read_as(uid, gid, config).returncode == 0
    assert load(NodeConfig, file=config).fleet == "edited"
    assert main(argv) == 0 and "kept" in capsys.readouterr().out  # nothing to mend the third time
