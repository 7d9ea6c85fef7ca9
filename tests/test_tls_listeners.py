"""Which listeners serve TLS, with which settings: ``tls_listeners.configs`` and ``load``."""

from __future__ import annotations

from pathlib import Path

import pytest

from forkserver import config, tls_listeners
from forkserver.tls_listeners import TlsListenerError
from tests.tls_support import Pki


def settings_from(tmp_path: Path, text: str, **env: str) -> config.Settings:
    path = tmp_path / "forkserver.toml"
    path.write_text(text)
    return config.load_settings(str(path), {f"FORKSERVER_{k.upper()}": v for k, v in env.items()})


def test_a_listener_takes_the_global_settings_under_its_own(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, """\
tls_certfile = "/g.pem"
tls_alpn = ["h2"]
tls_handshake_timeout = 2.5
[[listeners]]
bind = "127.0.0.1:1"
[[listeners]]
bind = "127.0.0.1:2"
tls_certfile = "/own.pem"
tls_min_version = "tlsv1.3"
[[listeners]]
bind = "127.0.0.1:3"
tls_certfile = ""
[[listeners.tls_certificates]]
server_names = ["a.example"]
certfile = "/a.pem"
""")
    found = tls_listeners.configs(settings)
    assert set(found) == {0, 1, None}  # the third is plain TCP; None: sockets without a table
    assert (found[0].tls_certfile, found[0].tls_alpn, found[0].tls_handshake_timeout) == (
        "/g.pem", ("h2",), 2.5)
    assert (found[1].tls_certfile, found[1].tls_min_version) == ("/own.pem", "TLSv1.3")
    assert found[1].tls_alpn == ("h2",)  # not set there: the global one


def test_no_tls_without_a_certificate_and_the_default_listener_takes_the_globals(
    tmp_path: Path,
) -> None:
    assert tls_listeners.configs(config.Settings()) == {}
    settings = config.load_settings(None, {"FORKSERVER_TLS_CERTFILE": "/g.pem"})
    assert list(tls_listeners.configs(settings)) == [None]


def test_an_inconsistent_listener_is_named(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, """\
[[listeners]]
bind = "127.0.0.1:1"
name = "api"
tls_certfile = "/own.pem"
tls_client_auth = "required"
""")
    with pytest.raises(TlsListenerError, match=r"listener 'api' \(listeners\[0\]\): "
                                              r"tls_client_auth: 'required' needs tls_cafile"):
        tls_listeners.configs(settings)


def test_a_bad_sni_entry_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"listeners\[0\]\.tls_certificates.*"
                                                 r"needs server_names and certfile"):
        settings_from(tmp_path, '[[listeners]]\nbind = "127.0.0.1:1"\n'
                                '[[listeners.tls_certificates]]\ncertfile = "/a.pem"\n')


def test_load_reads_the_files_and_names_the_listener(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    leaf = pki.server()
    good = config.load_settings(None, {"FORKSERVER_TLS_CERTFILE": str(leaf.certfile),
                                       "FORKSERVER_TLS_KEYFILE": str(leaf.keyfile)})
    loaded = tls_listeners.load(good)
    step = loaded[None]
    assert (step.handshake_timeout, step.context.minimum_version.name) == (5.0, "TLSv1_2")
    bad = config.load_settings(None, {"FORKSERVER_TLS_CERTFILE": str(leaf.certfile),
                                      "FORKSERVER_TLS_KEYFILE": str(pki.server("x").keyfile)})
    with pytest.raises(TlsListenerError, match=r"the default listener: tls_keyfile: .*not match"):
        tls_listeners.load(bad)
