"""conf/: the files operators copy are the ones that work.

The example configs load (with their /etc paths moved into a temporary folder), the
HAProxy example passes ``haproxy -c``, and the unit agrees with the config it runs.
The unit's installation and sandbox are checked in tests/integration/test_install.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from imapproxy.config import load

CONF = Path(__file__).resolve().parents[1] / "conf"
#: A quoted absolute path under /etc in a TOML value: a file the config names.
ETC_PATH = re.compile(r'"(/etc/[^"]+)"')


def relocated(example: Path, folder: Path) -> Path:
    """The example with every file it names created under ``folder``."""
    text = example.read_text()
    for path in sorted(set(ETC_PATH.findall(text))):
        moved = folder / path.lstrip("/")
        moved.parent.mkdir(parents=True, exist_ok=True)
        if path.endswith(".map"):
            shutil.copy(CONF / "users.map", moved)
        elif path.endswith(".key"):  # [shared] key_file: a secret only its owner reads
            moved.write_text("0123456789abcdef" * 4 + "\n")
            moved.chmod(0o600)
        else:
            moved.write_text("example-secret\n" if path.endswith(".secret") else "")
        text = text.replace(f'"{path}"', f'"{moved}"')
    out = folder / example.name
    out.write_text(text)
    return out


@pytest.mark.parametrize("name", sorted(p.name for p in CONF.glob("*.toml")))
def test_example_config_loads(name: str, tmp_path: Path) -> None:
    config = load(relocated(CONF / name, tmp_path))
    assert config.listeners
    if name.startswith("scaleout-"):
        # Every instance shares the penalty and the session counts through one Redis,
        # with the same hashing key.
        assert str(config.shared.url) == "redis://10.0.0.30:6379/0"
        assert config.shared.key is not None


def test_default_config_path_is_where_the_unit_points() -> None:
    unit = (CONF / "imapproxy.service").read_text()
    assert "--config /etc/imapproxy/imapproxy.toml" in unit
    from imapproxy.service import Options

    assert Options()["config"] == "/etc/imapproxy/imapproxy.toml"


def test_unit_waits_for_the_drain(tmp_path: Path) -> None:
    """systemd's stop timeout must outlast [timeouts] drain_notice and drain, or SIGKILL
    cuts the drain."""
    unit = (CONF / "imapproxy.service").read_text()
    stop_timeout = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1))
    timeouts = load(relocated(CONF / "imapproxy.toml", tmp_path)).timeouts
    assert stop_timeout >= timeouts.drain_notice + timeouts.drain + 10


def test_haproxy_example_is_valid() -> None:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(haproxy).exists():
        pytest.fail("haproxy is not installed: run scripts/install-deps")
    result = subprocess.run([haproxy, "-c", "-f", str(CONF / "haproxy.cfg")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
