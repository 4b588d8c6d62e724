"""Configuration: per-user defaults, the TOML file, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.journal import SyncPolicy
from lockd.config import ConfigError, default_paths, load


def test_root_defaults_follow_the_product_table() -> None:
    paths = default_paths(0)
    assert paths["lock_dir"] == "/var/lib/libvirt/lockd"
    assert paths["journal_dir"] == "/var/lib/lockd/journal"
    assert paths["socket"] == "/run/lockd/lockd.sock"
    assert paths["admin_socket"] == "/run/lockd/lockd-admin.sock"
    assert paths["config"] == "/etc/lockd/lockd.toml"


def test_user_defaults_use_home_and_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    paths = default_paths(1000)
    assert paths["lock_dir"] == str(tmp_path / ".libvirt" / "lockd")
    assert paths["journal_dir"] == str(tmp_path / "state" / "lockd" / "journal")
    assert paths["socket"] == "/run/user/1000/lockd/lockd.sock"
    assert paths["config"] == str(tmp_path / ".config" / "lockd" / "lockd.toml")


def test_file_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "lockd.toml"
    config.write_text(
        'lock_dir = "/srv/locks"\nmax_clients = 8\njournal_sync = "batch"\n'
        '[lockspaces]\n"org.libvirt.lockd.lvm" = "/srv/lvm-locks"\n'
    )
    loaded = load(str(config), {"lock_dir": "/override", "socket": None})
    assert loaded.lock_dir == "/override"
    assert loaded.max_clients == 8
    assert loaded.journal_sync is SyncPolicy.BATCH
    assert loaded.lockspaces == {"org.libvirt.lockd.lvm": "/srv/lvm-locks"}
    assert loaded.config_file == str(config)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        (
            "max_client = 3\n",
            "lockd.toml:1: unknown key 'max_client' (did you mean 'max_clients'?)",
        ),
        ("# comment\n\njournal_sync = 3\n", "lockd.toml:3: journal_sync must be one of"),
        ('max_clients = "many"\n', "max_clients must be an integer"),
        ('journal_sync = "sometimes"\n', "journal_sync must be one of none | batch | always"),
        ('lock_dir = "relative"\n', "lock_dir must be an absolute path"),
        ('[lockspaces]\n".." = "/x"\n', "lockspaces...:"),
        ("max_clients = \n", "lockd.toml"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, text: str, names: str) -> None:
    config = tmp_path / "lockd.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load(str(config), {})
    assert names in str(exc.value)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load(str(tmp_path / "nope.toml"), {})


def test_a_config_path_that_is_no_readable_file_is_an_error_not_a_traceback(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match=f"^{tmp_path}: Is a directory$"):
        load(str(tmp_path), {})


def test_the_annotated_example_is_valid_and_complete() -> None:
    """contrib/lockd.toml loads with every line uncommented, and documents every key."""
    import attrs

    from lockd.config import Config

    example = Path(__file__).resolve().parents[2] / "contrib" / "lockd.toml"
    text = example.read_text()
    # Settings are commented as "#key = value"; prose comments start with "# ".
    settings = [
        line[1:]
        for line in text.splitlines()
        if line[:2] != "# " and line.startswith("#") and len(line) > 1
    ]
    config_file = example.parent / ".example-check.toml"
    try:
        config_file.write_text("\n".join(settings) + "\n")
        loaded = load(str(config_file), {})
    finally:
        config_file.unlink()
    assert loaded.journal_sync is SyncPolicy.NONE
    documented = {line.split("=")[0].strip() for line in settings if "=" in line}
    internal = {"config_file", "pid_file"}
    keys = {f.name for f in attrs.fields(Config)} - internal
    assert keys <= documented | {"lockspaces"}
    assert "[lockspaces]" in settings


def test_the_admin_socket_moves_with_the_socket_unless_it_is_given(tmp_path: Path) -> None:
    """Left at the default while the socket moved, it was another daemon's (``lockd
    serve --socket X`` failed: the default admin socket was in use)."""
    moved = load(str(_empty(tmp_path)), {"socket": "/srv/l/lockd.sock"})
    assert moved.admin_socket == "/srv/l/lockd-admin.sock"
    toml = tmp_path / "sockets.toml"
    toml.write_text('socket = "/srv/f/c.sock"\n')
    assert load(str(toml), {}).admin_socket == "/srv/f/lockd-admin.sock"
    both = load(str(toml), {"admin_socket": "/srv/a.sock"})
    assert (both.socket, both.admin_socket) == ("/srv/f/c.sock", "/srv/a.sock")
    assert load(str(_empty(tmp_path)), {}).admin_socket == default_paths()["admin_socket"]


def test_one_path_for_both_sockets_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"both /srv/x\.sock"):
        load(str(_empty(tmp_path)), {"socket": "/srv/x.sock", "admin_socket": "/srv/x.sock"})


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.toml"
    path.write_text("")
    return path
