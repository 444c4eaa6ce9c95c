"""gen-creds: password files, mosquitto hashes, ACL text, the CLI."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from fleetpipe import signing
from fleetpipe.cli import main
from fleetpipe.config import BrokerConfig
from fleetpipe.deploy import creds
from fleetpipe.errors import ConfigError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_builtin_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    binary = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(binary).exists():
        pytest.skip("mosquitto_passwd not installed")
    passwd = tmp_path / "passwd"
    passwd.write_text("n1:s3cret\n")
    subprocess.run([binary, "-U", str(passwd)], check=True, capture_output=True)
    hashed = passwd.read_text().strip().split(":", 1)[1]
    assert creds.verify_password("s3cret", hashed)
    assert not creds.verify_password("other", hashed)
    assert creds.verify_password("s3cret", creds.hash_password("s3cret"))


def test_cli_writes_private_files_and_acl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "creds"
    assert main(["broker", "gen-creds", "--fleet", "f1", "--nodes", "n1, n2", "--clients", "cam",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "acl_file" in printed and "s3cret" not in printed
    names = {"n1", "n2", "planner", "cam"}
    for name in names:
        pw = out / f"{name}.password"
        assert _mode(pw) == 0o600
        assert len(BrokerConfig(username=name, password_file=str(pw)).password() or "") >= 40
    for f in ("passwd", "acl"):
        assert _mode(out / "mosquitto" / f) == 0o600
    users = {line.split(":")[0] for line in (out / "mosquitto" / "passwd").read_text().splitlines()}
    assert users == names
    assert "s3cret" not in (out / "mosquitto" / "passwd").read_text()
    acl = (out / "mosquitto" / "acl").read_text()
    assert "user n1\ntopic write fleetpipe/v1/f1/node/n1/state\n" in acl
    assert "topic readwrite fleetpipe/v1/f1/node/+/assign" in acl.split("user planner")[1]
    assert "topic read fleetpipe-data/v1/f1/result/cam" in acl.split("user cam")[1]  # the data plane
    assert "assign" not in acl.split("user cam")[1]
    assert "topic write fleetpipe/v1/f1/node/n2" not in acl.split("user n1")[1].split("user n2")[0]
    # Clients submit frames only as themselves; nodes read the plan; part messages carry their sender.
    assert "topic write fleetpipe-data/v1/f1/epoch/+/stage/0/in/cam\n" in acl.split("user cam")[1]
    n1 = acl.split("user n1")[1].split("user n2")[0]
    assert "topic read fleetpipe/v1/f1/plan\n" in n1
    assert "topic write fleetpipe-data/v1/f1/epoch/+/stage/+/gather/+/n1\n" in n1
    # The planner's signing key (private) and public key, which every node's config gets.
    assert _mode(out / "planner.key") == 0o600
    public = (out / "planner.pub").read_text().strip()
    assert f'planner_key = "{public}"' in printed
    signing.load_private_key(out / "planner.key")
    signing.load_public_key(public)


def test_acl_follows_the_topic_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grants are rendered from fleetpipe.topics: moving a topic there moves it in the ACL (no edit in creds)."""
    import dataclasses

    from fleetpipe import topics

    moved = dataclasses.replace(topics.STAGE_IN, pattern=topics.PREFIX + "/{fleet}/data/{epoch}/{stage}/{client_id}")
    monkeypatch.setattr(topics, "STAGE_IN", moved)
    monkeypatch.setattr(topics, "SPECS", {**topics.SPECS, "stage_in": moved})
    acl = creds.acl_text("f", {"n1": "node", "cam": "client", "obs": "observer"})
    assert "topic write fleetpipe/v1/f/data/+/0/cam\n" in acl
    assert "topic readwrite fleetpipe/v1/f/data/+/+/+\n" in acl
    assert "/in/" not in acl and "data/" not in acl.split("user obs")[1]


def test_bad_identities_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="twice"):
        creds.generate(tmp_path, fleet="f", nodes=["a", "boss"], planner="boss")
    with pytest.raises(ConfigError):
        creds.generate(tmp_path, fleet="f", nodes=["a/b"])
    with pytest.raises(ConfigError):
        creds.generate(tmp_path, fleet="f+", nodes=["a"])
    with pytest.raises(ConfigError, match="reserved"):  # node/planner/state is the planner's birth and death
        creds.generate(tmp_path, fleet="f", nodes=["planner"], planner="boss")
    with pytest.raises(ConfigError, match="no identities"):
        creds.generate(tmp_path, fleet="f", nodes=[], planner=None)


def test_gen_certs_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    assert main(["broker", "gen-certs", "--out", str(tmp_path), "--host", "127.0.0.1", "--host", "broker.local"]) == 0
    assert _mode(tmp_path / "ca.key") == 0o600 and _mode(tmp_path / "mosquitto" / "server.key") == 0o600
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(tmp_path / "mosquitto" / "server.crt")],
                          check=True, capture_output=True, text=True).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:broker.local" in text
    ca_before = (tmp_path / "ca.crt").read_bytes()
    assert main(["broker", "gen-certs", "--out", str(tmp_path), "--host", "10.0.0.2"]) == 0  # reuses the CA
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    server = str(tmp_path / "mosquitto" / "server.crt")
    subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), server], check=True, capture_output=True)


def test_ha_identity_reads_the_control_plane_and_writes_discovery() -> None:
    from fleetpipe.deploy.creds import acl_text

    acl = acl_text("f1", {"hass": "ha"})
    block = acl.split("user hass")[1]
    assert "topic read fleetpipe/v1/f1/#" in block and "topic readwrite homeassistant/#" in block
    assert "fleetpipe-data" not in block  # no frames, results or model weights
