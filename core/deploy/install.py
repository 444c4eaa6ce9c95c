"""``fleetpipe install-service``: the systemd unit and /etc/fleetpipe config for this host.

:func:`plan` computes every file (path, text, mode) without touching the disk; :func:`apply` writes
them. With ``prefix`` everything lands under another root (tests, image builds). Paths::

    <prefix>/etc/systemd/system/fleetpipe-node.service      (or fleetpipe-node@.service, -planner)
    <prefix>/etc/fleetpipe/node.toml                        (node-<name>.toml for the template, planner.toml)
    <prefix>/etc/fleetpipe/<identity>.password              copy of --password-file, root:fleetpipe 0640
    <prefix>/etc/fleetpipe/ca.crt                           copy of --ca-certs, 0644
    <prefix>/etc/sysusers.d/fleetpipe.conf                  the dedicated ``fleetpipe`` system user

The config has a ``[node]``/``[planner]`` table and a ``[broker]`` table, as
:func:`fleetpipe.config.load` reads it. It is root-owned, group ``fleetpipe``, mode 0640: the service
reads it, nobody else does. The user is created before any of them is written (a group that does not exist yet
cannot own them). An existing config is kept unless ``force``, but its owner and mode are mended.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fleetpipe.config import DEFAULT_FLEET, validate_name
from fleetpipe.deploy import systemd as _units_pkg
from fleetpipe.errors import ConfigError

__all__ = ["PlannedFile", "apply", "create_user", "fleetpipe_executable", "plan", "render_unit", "unit_name"]

GROUP = "fleetpipe"
SYSUSERS = 'u fleetpipe - "fleetpipe daemons" /var/lib/fleetpipe /usr/sbin/nologin\n'
_DEFAULT_EXEC = "/usr/bin/env fleetpipe"


@dataclass(frozen=True, slots=True)
class PlannedFile:
    """One file to write. ``group`` is chowned (root:group) when running as root and it exists."""

    path: Path
    text: str
    mode: int
    group: str | None = None
    replace: bool = True  # False: keep an existing file (a config the admin may have edited)


def unit_name(role: str, name: str | None = None, *, template: bool = False) -> str:
    """``fleetpipe-node.service``, ``fleetpipe-node@<name>.service`` or ``fleetpipe-planner.service``."""
    if role == "node" and template:
        return f"fleetpipe-node@{name}.service" if name else "fleetpipe-node@.service"
    return f"fleetpipe-{role}.service"


def fleetpipe_executable() -> str:
    """The ``fleetpipe`` script of the running interpreter (a venv's bin/), else the one on PATH."""
    beside = Path(sys.executable).parent / "fleetpipe"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside.absolute())
    found = shutil.which("fleetpipe")
    return str(Path(found).absolute()) if found else _DEFAULT_EXEC


def render_unit(role: str, *, exec_path: str | None = None, template: bool = False) -> str:
    """A shipped unit with ExecStart pointing at ``exec_path`` (default: :func:`fleetpipe_executable`)."""
    if role not in ("node", "planner"):
        raise ConfigError(f"role must be node or planner, not {role!r}")
    if template and role != "node":
        raise ConfigError("only the node has a template unit")
    text = _shipped(unit_name(role, template=template))
    exe = exec_path or fleetpipe_executable()
    if any(c.isspace() for c in exe) and exe != _DEFAULT_EXEC:
        raise ConfigError(f"the fleetpipe executable path {exe!r} contains white space; install it elsewhere")
    text = text.replace("ExecStart=/usr/bin/env fleetpipe ", f"ExecStart={exe} ")
    if exe.startswith(("/home/", "/root/")):
        # The venv lives under a home directory: the service could not even exec it with ProtectHome=yes.
        text = text.replace("ProtectHome=yes", "ProtectHome=read-only")
    return text


def plan(
    role: str,
    *,
    name: str | None = None,
    template: bool = False,
    fleet: str = DEFAULT_FLEET,
    broker: str | None = None,
    username: str | None = None,
    password_file: str | None = None,
    ca_certs: str | None = None,
    model: str | None = None,
    prefix: str | Path = "/",
    exec_path: str | None = None,
    planner_key: str | None = None,
    signing_key: str | None = None,
) -> list[PlannedFile]:
    """Every file ``install-service`` writes for ``role`` on this host (nothing is written here).

    ``planner_key`` (node): the planner's public key file (gen-creds' planner.pub), written into the node's
    config so it loads only signed assignments; ``signing_key`` (planner): its private key (planner.key),
    copied next to the config.
    """
    if role not in ("node", "planner"):
        raise ConfigError(f"role must be node or planner, not {role!r}")
    if (planner_key and role != "node") or (signing_key and role != "planner"):
        raise ConfigError("--planner-key is for --role node (planner.pub), --signing-key for --role planner "
                          "(planner.key)")
    if template and not name:
        raise ConfigError("--template needs --name (the instance: fleetpipe-node@NAME.service)")
    validate_name("fleet", fleet)
    if role == "node":
        name = validate_name("node name", name or socket.gethostname().split(".")[0])
    if broker is not None:
        from fleetpipe.config import BrokerConfig

        try:
            BrokerConfig(url=broker)
        except ConfigError as exc:
            raise ConfigError(f"--broker must be mqtt://host:port or mqtts://host:port: {exc}") from exc
    if ca_certs and broker is not None and not broker.startswith("mqtts://"):
        raise ConfigError("--ca-certs enables TLS: use an mqtts:// broker URL")
    root = Path(prefix)
    etc = root / "etc" / "fleetpipe"
    files = [
        PlannedFile(root / "etc/systemd/system" / unit_name(role, template=template),
                    render_unit(role, exec_path=exec_path, template=template), 0o644),
        PlannedFile(root / "etc/sysusers.d/fleetpipe.conf", SYSUSERS, 0o644),
    ]
    identity = username or (name if role == "node" else "planner")
    broker_table: dict[str, str] = {}
    if broker:
        broker_table["url"] = broker
    if password_file:
        broker_table["username"] = validate_name("username", identity)
        dest = etc / f"{identity}.password"
        files.append(PlannedFile(dest, _read(password_file), 0o640, GROUP))
        broker_table["password_file"] = str(Path("/etc/fleetpipe") / dest.name)
    elif username:
        broker_table["username"] = username
    if ca_certs:
        files.append(PlannedFile(etc / "ca.crt", _read(ca_certs), 0o644))
        broker_table["ca_certs"] = "/etc/fleetpipe/ca.crt"
    if role == "node":
        assert name is not None
        table = {"name": name, "fleet": fleet,
                 "cache_dir": f"/var/cache/fleetpipe/{name}" if template else "/var/cache/fleetpipe/slices"}
        if planner_key:
            from fleetpipe.signing import load_public_key

            table["planner_key"] = _read(planner_key).strip()
            load_public_key(table["planner_key"])  # ConfigError now rather than at the node's start
        config = etc / (f"node-{name}.toml" if template else "node.toml")
    else:
        table = {"model": model or "/var/lib/fleetpipe/model.onnx", "fleet": fleet}
        if signing_key:
            files.append(PlannedFile(etc / "planner.key", _read(signing_key), 0o640, GROUP))
            table["signing_key"] = "/etc/fleetpipe/planner.key"
        config = etc / "planner.toml"
    text = _toml(role, table, broker_table)
    files.append(PlannedFile(config, text, 0o640, GROUP, replace=False))
    return files


def apply(files: list[PlannedFile], *, force: bool = False,
          prefix: str | Path = "/") -> list[tuple[PlannedFile, str]]:
    """Write ``files``; returns (file, "written" | "kept" | "fixed") for each.

    As root a file with a ``group`` is chowned root:group (the group as ``prefix``'s /etc/group names it), so
    create the user first (:func:`create_user`). A kept file (an edited config) still gets its owner and mode
    mended ("fixed") when they are wrong: the service must be able to read it, nobody else.
    """
    done = []
    for f in files:
        gid = _gid(f.group, prefix) if f.group and os.geteuid() == 0 else None
        if f.path.exists() and not f.replace and not force:
            done.append((f, "fixed" if _mend(f.path, f.mode, gid) else "kept"))
            continue
        f.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.path.with_name(f".{f.path.name}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, f.mode)
        with os.fdopen(fd, "w") as fh:
            fh.write(f.text)
        os.chmod(tmp, f.mode)  # not subject to the umask
        if gid is not None:
            os.chown(tmp, 0, gid)
        os.replace(tmp, f.path)
        done.append((f, "written"))
    return done


def create_user(sysusers_file: Path, prefix: str | Path = "/") -> str | None:
    """Create the ``fleetpipe`` system user in ``prefix`` (systemd-sysusers --root, else useradd --prefix);
    None if it exists or cannot be created here (not root), else a description of what was run."""
    if os.geteuid() != 0 or _gid(GROUP, prefix) is not None:
        return None
    root = str(Path(prefix).resolve())
    tool = shutil.which("systemd-sysusers")
    if tool:
        cmd = [tool, *([f"--root={root}"] if root != "/" else []), str(sysusers_file)]
    else:
        cmd = ["useradd", *(["--prefix", root] if root != "/" else []), "--system", "--user-group",
               "--home-dir", "/var/lib/fleetpipe", "--no-create-home", "--shell", "/usr/sbin/nologin", GROUP]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or _gid(GROUP, prefix) is None:
        raise ConfigError(f"cannot create the fleetpipe user ({' '.join(cmd)}): {proc.stderr.strip()}")
    return " ".join(cmd)


# --- private helpers --------------------------------------------------------------------------------


def _shipped(name: str) -> str:
    from importlib import resources

    return resources.files(_units_pkg).joinpath(name).read_text()


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def _gid(group: str | None, prefix: str | Path = "/") -> int | None:
    """The gid of ``group`` in ``prefix``'s /etc/group (the host's database for /), None if absent."""
    if group is None:
        return None
    if Path(prefix).resolve() == Path("/"):
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            return None
    try:
        lines = (Path(prefix) / "etc/group").read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == group:
            return int(fields[2])
    return None


def _mend(path: Path, mode: int, gid: int | None) -> bool:
    """Give ``path`` ``mode`` and (as root) owner root:gid; True if anything had to change."""
    st = path.stat()
    changed = False
    if gid is not None and (st.st_uid, st.st_gid) != (0, gid):
        os.chown(path, 0, gid)
        changed = True
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)
        changed = True
    return changed


def _toml(role: str, table: dict[str, str], broker: dict[str, str]) -> str:
    lines = [f"# fleetpipe {role} configuration, written by `fleetpipe install-service`.",
             "# Read by fleetpipe.config.load: then FLEETPIPE_* env vars, then flags, override it.",
             "# Secrets stay in files (password_file, keyfile), never in this file or on the command line.",
             f"[{role}]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    lines += ["", "[broker]"]
    if "url" not in broker:
        lines.append("# url = \"mqtts://broker.local:8883\"   # unset: discover the broker with zeroconf")
    lines += [f"{k} = {json.dumps(v)}" for k, v in broker.items()]
    for key in ("username", "password_file", "ca_certs", "certfile", "keyfile"):
        if key not in broker:
            lines.append(f"# {key} = ...")
    return "\n".join(lines) + "\n"
