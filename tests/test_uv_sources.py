"""`scripts/uv_sources.py`: uv is handed the package sources pip is configured with, or
the install stays on pip."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def uv_sources() -> ModuleType:
    spec = importlib.util.spec_from_file_location("uv_sources", ROOT / "scripts" / "uv_sources.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_this_machines_pip_configuration_is_handed_over_once_each() -> None:
    listed = "\n".join(
        [
            ":env:.cert='/env/ca.crt'",
            ":env:.default-timeout='180'",
            ":env:.find-links='/opt/wheels'",
            "global.cert='/etc/ssl/certs/ca-certificates.crt'",
            "global.constraint='/etc/xdg/pip/constraints.txt'",
            "global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'",
            "global.find-links='/opt/wheels'",
            "download.index-url='https://elsewhere.example/simple'",  # not pip install's
        ]
    )
    assert uv_sources().uv_command(listed, ["uv", "pip", "install"]) == [
        "env",
        "SSL_CERT_FILE=/env/ca.crt",  # PIP_CERT wins over pip.conf, as in pip
        "uv",
        "pip",
        "install",
        "--index-strategy",
        "unsafe-best-match",
        "--find-links",
        "/opt/wheels",
        "--extra-index-url",
        "file:///opt/pypi/simple",
        "--extra-index-url",
        "file:///opt/pypi-more/simple",
        "--constraint",
        "/etc/xdg/pip/constraints.txt",
    ]


def test_values_written_over_several_lines_and_an_install_section() -> None:
    listed = "\n".join(
        [
            "global.index-url='https://global.example/simple'",
            "install.index-url='https://install.example/simple'",
            "global.extra-index-url='\\nhttps://a.example/simple\\nhttps://b.example/simple'",
            "global.trusted-host='a.example'",
            "global.no-index='true'",
        ]
    )
    assert uv_sources().uv_command(listed, ["uv"]) == [
        "env",
        "uv",
        "--index-strategy",
        "unsafe-best-match",
        "--no-index",
        "--index-url",
        "https://install.example/simple",
        "--extra-index-url",
        "https://a.example/simple",
        "--extra-index-url",
        "https://b.example/simple",
        "--allow-insecure-host",
        "a.example",
    ]


def test_a_setting_uv_is_not_given_keeps_the_install_on_pip() -> None:
    module = uv_sources()
    assert module.uv_command("global.proxy='http://proxy.example:3128'", ["uv"]) is None
    assert module.uv_command("install.client-cert='/me.pem'", ["uv"]) is None
    assert module.uv_command("", ["uv"]) == ["env", "uv", "--index-strategy", "unsafe-best-match"]
