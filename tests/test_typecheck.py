"""scripts/typecheck: which modules are sans-IO (held to mypy --strict and to the
Twisted ban), read from pyproject.toml's one exemption list."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _typecheck():  # type: ignore[no-untyped-def]
    loader = importlib.machinery.SourceFileLoader("typecheck", str(ROOT / "scripts/typecheck"))
    spec = importlib.util.spec_from_loader("typecheck", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _imports_twisted(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(name == "twisted" or name.startswith("twisted.") for name in names):
            return True
    return False


def test_the_policy_modules_are_sans_io_and_the_adapters_are_not() -> None:
    pure = set(_typecheck().sans_io_modules())
    for name in ("login", "relaysession", "imap", "pop3", "imapwire", "pop3wire", "tracker",
                 "pop3tracker", "penalty", "proxyprotocol", "imapbackend", "pop3backend",
                 "prelogin", "config", "ldapentry", "routecache", "ldapsearch", "pacing"):
        assert f"imapproxy/{name}.py" in pure, name
    for name in ("frontend", "backendconn", "relay", "service", "runtime", "pacinggate"):
        assert f"imapproxy/{name}.py" not in pure, name


def test_every_exemption_names_an_existing_module_that_imports_twisted() -> None:
    """An exemption for a pure module would let Twisted creep back in unnoticed, and one
    for a module that no longer exists hides that the list is stale."""
    for pattern in _typecheck().exempt_patterns():
        if not pattern.startswith("imapproxy/"):
            continue
        path = ROOT / pattern
        assert path.exists(), f"{pattern}: exempted from the Twisted ban but not there"
        assert _imports_twisted(path), f"{pattern}: exempted but imports no Twisted"


def test_no_sans_io_module_imports_twisted() -> None:
    for name in _typecheck().sans_io_modules():
        assert not _imports_twisted(ROOT / name), name
