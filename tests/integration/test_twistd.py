"""The twistd plugin as an operator meets it: --help, bad configs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from rig.ports import free_port
from rig.proxy import ProxyProcess, _twistd, imap_config


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_twistd(), "-n", "--pidfile=", "imapproxy", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_help_lists_options(tmp_path):
    result = run("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "--config" in result.stdout


def test_bad_config_exits_with_one_line_naming_file_and_key(tmp_path):
    (tmp_path / "users.map").write_text("* 127.0.0.1:143\n")
    config = tmp_path / "bad.toml"
    config.write_text('[[listen]]\nprotocol = "imap"\naddress = "127.0.0.1:99999"\n'
                      'tls = "none"\n[directory]\ntype = "static"\nmap = "users.map"\n')
    result = run("--config", str(config), cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(config) in lines[0] and "listen[0].address" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_unknown_key_and_missing_file(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[[listen]]\naddress = "127.0.0.1:1143"\ntls = "none"\nbogus = 1\n'
                      '[directory]\nmap = "users.map"\n')
    result = run("--config", str(config), cwd=tmp_path)
    assert result.returncode != 0 and "listen[0].bogus: unknown key" in result.stderr
    result = run("--config", str(tmp_path / "missing.toml"), cwd=tmp_path)
    assert result.returncode != 0 and "missing.toml" in result.stderr


def test_backend_passwords_in_clear_are_warned_about_at_start(tmp_path):
    """[backend] tls = "none" (the default) to a backend off this host: one warning line
    naming it; none when every backend is on this host."""
    port = free_port()
    remote = ProxyProcess(tmp_path / "remote", imap_config(port), [port],
                          {"users.map": "a* 127.0.0.1\n* 192.0.2.10:143\n"})
    with remote:
        pass
    warnings = [line for line in remote.log().splitlines() if "CLEARTEXT" in line]
    assert len(warnings) == 1 and "192.0.2.10" in warnings[0], remote.log()
    assert "127.0.0.1" not in warnings[0]
    local = ProxyProcess(tmp_path / "local", imap_config(port), [port],
                         {"users.map": "* 127.0.0.1:143\n"})
    with local:
        pass
    assert "CLEARTEXT" not in local.log()
    starttls = ProxyProcess(tmp_path / "starttls",
                            imap_config(port, extra='[backend]\ntls = "starttls"\n'), [port],
                            {"users.map": "* 192.0.2.10\n"})
    with starttls:
        pass
    assert "CLEARTEXT" not in starttls.log()
