"""Configuration: per-user defaults, the TOML file, and errors that name the key."""

from __future__ import annotations

import os
import pwd
import re
import stat
import tomllib
from pathlib import Path

import pytest

from actors.model import SyncPolicy
from lockd.config import (
    ConfigError,
    UnsafePathError,
    default_paths,
    load,
    runtime_dir,
    secure_runtime_dir,
)
from tests.lockd.conftest import OTHER, as_root


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


def test_user_defaults_without_xdg_runtime_dir_fall_back_to_tmp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert runtime_dir(1002) == "/tmp/lockd-1002/lockd"
    assert default_paths(1002)["socket"] == "/tmp/lockd-1002/lockd/lockd.sock"
    assert default_paths(1002)["admin_socket"] == "/tmp/lockd-1002/lockd/lockd-admin.sock"
    assert runtime_dir(0) is None  # root: /run/lockd, made by the service manager


@pytest.mark.parametrize("value", ["run/user/1002", "."])
def test_a_relative_xdg_runtime_dir_is_ignored_as_the_spec_says(
    fallback_user: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """``XDG_RUNTIME_DIR=run/user/1002`` put the sockets relative to wherever lockd (or
    a client) was started: a daemon and a client started in different directories never
    met. The XDG spec says to ignore a relative value: the fallback is used, checked."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", value)
    socket_path = default_paths()["socket"]
    assert socket_path == str(fallback_user / "lockd" / "lockd.sock")
    assert secure_runtime_dir(socket_path, create=True)
    assert _mode(fallback_user) == 0o700  # the fallback's checks, both levels


def test_a_missing_xdg_runtime_dir_is_made_with_parents_no_other_user_can_write(
    fallback_user: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a umask of 0, the parents of a missing ``$XDG_RUNTIME_DIR`` came out 0777, as
    ``os.makedirs`` makes them: whoever could write there could swap the socket's
    directory. They are 0755 at most, as every directory lockd makes on its way."""
    xdg = tmp_path / "a" / "b" / "run"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    old = os.umask(0)
    try:
        assert secure_runtime_dir(default_paths()["socket"], create=True)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a") == 0o755
    assert _mode(tmp_path / "a" / "b") == 0o755
    assert _mode(xdg) == 0o700


@pytest.mark.parametrize("value", ["relhome", ".", ""])
def test_a_home_that_is_no_absolute_path_is_taken_from_the_password_database(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """``HOME=relhome`` put the lock dir, journal and config file under wherever lockd
    was started (a daemon started on demand: the package's directory), and ``HOME=``
    under /. The user's home from the password database is used instead, as systemd does."""
    monkeypatch.setenv("HOME", value)
    for name in ("XDG_STATE_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    home = pwd.getpwuid(os.getuid()).pw_dir
    paths = default_paths(1002)
    assert paths["lock_dir"] == os.path.join(home, ".libvirt", "lockd")
    assert paths["journal_dir"] == os.path.join(home, ".local", "state", "lockd", "journal")
    assert paths["config"] == os.path.join(home, ".config", "lockd", "lockd.toml")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_tmp_fallback_is_made_0700_both_levels(fallback_user: Path) -> None:
    """Before, ``os.makedirs`` made /tmp/lockd-UID with the umask's mode (0755)."""
    socket_path = default_paths()["socket"]
    assert socket_path == str(fallback_user / "lockd" / "lockd.sock")
    old = os.umask(0o022)
    try:
        assert secure_runtime_dir(socket_path, create=True)
    finally:
        os.umask(old)
    assert _mode(fallback_user) == 0o700
    assert _mode(fallback_user / "lockd") == 0o700
    assert secure_runtime_dir(socket_path, create=False)  # ours now: used again as it is


@as_root
@pytest.mark.parametrize("level", ["base", "lockd"])
def test_a_fallback_directory_another_user_made_is_refused(fallback_user: Path, level: str) -> None:
    """User A made /tmp/lockd-B (or its lockd/) before B: B's client and daemon refuse it,
    and leave it as it is."""
    fallback_user.mkdir(mode=0o700)
    (fallback_user / "lockd").mkdir(mode=0o700)
    planted = fallback_user if level == "base" else fallback_user / "lockd"
    os.chmod(planted, 0o777)  # noqa: S103 - as the other user made it
    os.chown(planted, OTHER, OTHER)
    for create in (True, False):
        with pytest.raises(UnsafePathError) as caught:
            secure_runtime_dir(default_paths()["socket"], create=create)
        message = str(caught.value)
        assert f"refusing {planted}:" in message
        assert f"owner uid {OTHER}, mode 0777" in message
        assert "another user's" in message
        assert "remove it" in message
        assert "XDG_RUNTIME_DIR" in message
        assert "--socket" in message
    assert os.lstat(planted).st_uid == OTHER  # never chowned nor chmodded
    assert _mode(planted) == 0o777


def test_a_fallback_directory_others_can_write_to_is_refused(fallback_user: Path) -> None:
    fallback_user.mkdir(mode=0o700)
    (fallback_user / "lockd").mkdir()
    os.chmod(fallback_user / "lockd", 0o777)  # noqa: S103 - the mode refused
    with pytest.raises(UnsafePathError, match="other users can write to it") as caught:
        secure_runtime_dir(default_paths()["socket"], create=True)
    assert "mode 0777" in str(caught.value)
    assert f"run chmod go-w {fallback_user / 'lockd'} or remove it" in str(caught.value)
    assert _mode(fallback_user / "lockd") == 0o777  # left as it is


def test_a_fallback_directory_that_is_a_symlink_is_refused(
    fallback_user: Path, tmp_path: Path
) -> None:
    """Even to a directory of the user's own: whoever made the link could repoint it."""
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    fallback_user.symlink_to(target)
    with pytest.raises(UnsafePathError, match="is a symbolic link"):
        secure_runtime_dir(default_paths()["socket"], create=True)
    assert not (target / "lockd").exists()


def test_a_fallback_that_is_a_file_is_refused(fallback_user: Path) -> None:
    fallback_user.write_text("")
    with pytest.raises(UnsafePathError, match="not a directory"):
        secure_runtime_dir(default_paths()["socket"], create=True)


def test_a_missing_runtime_directory_is_made_by_no_client(fallback_user: Path) -> None:
    assert secure_runtime_dir(default_paths()["socket"], create=False)
    assert not fallback_user.exists()


@as_root
def test_under_xdg_runtime_dir_only_lockds_own_subdirectory_is_checked(
    fallback_user: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$XDG_RUNTIME_DIR is the login manager's (0700, the user's); lockd checks the
    directory it puts there, which catches XDG_RUNTIME_DIR=/tmp and the like."""
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    os.chmod(xdg, 0o1777)  # noqa: S103 - as /tmp would be
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    socket_path = default_paths()["socket"]
    assert secure_runtime_dir(socket_path, create=True)
    assert _mode(xdg / "lockd") == 0o700
    assert not fallback_user.exists()
    os.chown(xdg / "lockd", OTHER, OTHER)
    with pytest.raises(UnsafePathError, match="another user's"):
        secure_runtime_dir(socket_path, create=False)


def test_a_socket_elsewhere_is_the_users_choice(fallback_user: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # noqa: S103 - a shared directory the user chose
    assert not secure_runtime_dir(str(shared / "lockd.sock"), create=True)
    assert not fallback_user.exists()


def test_root_is_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getuid", lambda: 0)
    assert not secure_runtime_dir("/run/lockd/lockd.sock", create=True)


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
        ('\nshared_holds = "twice"\n', "lockd.toml:2: shared_holds must be one of once | each"),
        ('lock_dir = "relative"\n', "lock_dir must be an absolute path"),
        ('[lockspaces]\n".." = "/x"\n', "lockspaces...:"),
        # An entry of [lockspaces]: its own line, not the header's.
        ('[lockspaces]\n"a" = "/a"\n\n"b" = "rel"\n', "lockd.toml:4: lockspaces.b must be"),
        ('lockspaces.ok = "/a"\nlockspaces."b c" = "/b"\n', "lockd.toml:2: lockspaces.b c:"),
        ('[lockspaces]\n"x.y" = "/a"\n"x.z" = "r"\n', "lockd.toml:3: lockspaces.x.z must be"),
        ("max_clients = \n", "lockd.toml"),
        # Dotted keys and tables: their line, not line 0.
        ('timeout = 1\n\nlog.level = "debug"\n', "lockd.toml:3: unknown key 'log'"),
        ('timeout = 1\n[logging.file]\npath = "/x"\n', "lockd.toml:2: unknown key 'logging'"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, text: str, names: str) -> None:
    config = tmp_path / "lockd.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load(str(config), {})
    assert names in str(exc.value)


@pytest.mark.parametrize("key", ["timeout", "idle_timeout", "fence_grace"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_seconds_that_are_no_finite_number_are_refused(
    tmp_path: Path, key: str, value: str
) -> None:
    """``fence_grace = nan`` was taken, and a fenced VM got its SIGKILL with its SIGTERM."""
    config = tmp_path / "lockd.toml"
    config.write_text(f"{key} = {value}\n")
    with pytest.raises(ConfigError, match=f"lockd.toml:1: {key} must be a finite number >= 0"):
        load(str(config), {})


@pytest.mark.parametrize(
    "value", ["[-1]", '["qemu"]', "107", "[true]", "[4294967295]", "[1070000000000]"]
)
def test_allowed_uids_that_are_no_uids_are_named(tmp_path: Path, value: str) -> None:
    """``allowed_uids = ["qemu"]`` (a user's name) was refused as "must be a list of uids",
    without saying which value was wrong or what a uid looks like there; a number past
    uid_t (a digit too many) was taken, and no peer ever matched it."""
    config = tmp_path / "lockd.toml"
    config.write_text(f"allowed_uids = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load(str(config), {})
    assert str(caught.value).endswith(
        "lockd.toml:1: allowed_uids must be a list of uids (whole numbers from 0 to "
        f"4294967294, such as [107]), got {tomllib.loads(f'v = {value}')['v']!r}"
    )


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
    # pid_file's path and socket_group's group are only examples (the group may not be
    # on this host): written as prose.
    internal = {"config_file", "pid_file", "socket_group"}
    keys = {f.name for f in attrs.fields(Config)} - internal
    assert keys <= documented | {"lockspaces"}
    assert "[lockspaces]" in settings


def test_the_configuration_beside_virtlockd_in_the_docs_is_one_lockd_serve_takes(
    tmp_path: Path,
) -> None:
    """docs/operations.md's lockd.toml for sharing virtlockd's file_lockspace_dir: the
    ``[lockspaces]`` line alone, which docs/plugin.md and the plugin gave, stopped the
    start (virtlockd's usual directory lies in lockd's default lock_dir)."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    section = page[page.index("**Beside a real virtlockd**") : page.index("## Upgrade")]
    (example,) = re.findall(r"```toml\n(.*?)```", section, re.DOTALL)
    toml = tmp_path / "lockd.toml"
    toml.write_text(example)
    loaded = load(str(toml), {"journal_dir": str(tmp_path / "journal")})
    assert loaded.lockspaces == {"org.libvirt.lockd.files": "/var/lib/libvirt/lockd/files"}
    assert loaded.lock_dir == "/var/lib/libvirt/lockd/lockspaces"


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


def test_one_path_for_both_sockets_in_the_file_names_its_line(tmp_path: Path) -> None:
    """Every other error in the file names FILE:LINE (docs/operations.md); this one
    named neither."""
    toml = tmp_path / "lockd.toml"
    toml.write_text('# sockets\nsocket = "/srv/x.sock"\nadmin_socket = "/srv/x.sock"\n')
    with pytest.raises(ConfigError, match=rf"^{toml}:3: socket and admin_socket are both"):
        load(str(toml), {})


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.toml"
    path.write_text("")
    return path


@pytest.mark.parametrize(
    ("text", "flags", "message"),
    [
        # The journal on the shared lock directory: a client's lockspace named after the
        # journal's directory held lease files among its segments, and could delete them.
        ('lock_dir = "/srv/l"\njournal_dir = "/srv/l/journal"\n', {},
         "lockd.toml:2: journal_dir /srv/l/journal and lock_dir /srv/l overlap"),
        ('lock_dir = "/srv/l"\n', {"journal_dir": "/srv/l"},
         "lockd.toml:1: journal_dir /srv/l and lock_dir /srv/l overlap"),
        ('journal_dir = "/srv"\n', {"lock_dir": "/srv/l"},
         "lockd.toml:1: journal_dir /srv and lock_dir /srv/l overlap"),
        ('lock_dir = "/srv/l"\n[lockspaces]\n"a" = "/srv/x"\n"b" = "/srv/x"\n', {},
         "lockd.toml:4: lockspaces.b /srv/x and lockspaces.a /srv/x overlap"),
        ('lock_dir = "/srv/l"\n[lockspaces]\n"a" = "/srv/x"\n"b" = "/srv/x/b"\n', {},
         "lockd.toml:4: lockspaces.b /srv/x/b and lockspaces.a /srv/x overlap"),
        ('lock_dir = "/srv/l"\n[lockspaces]\n"org.libvirt.lockd.lvm" = '
         '"/srv/l/org.libvirt.lockd.files"\n', {},
         "lockd.toml:3: lockspaces.org.libvirt.lockd.lvm /srv/l/org.libvirt.lockd.files is "
         "inside lock_dir /srv/l, where lockspace org.libvirt.lockd.files keeps its files"),
        ('lock_dir = "/srv/l"\n[lockspaces]\n"a" = "/srv/l"\n', {},
         "lockd.toml:3: lockspaces.a /srv/l and lock_dir /srv/l overlap"),
        ('lock_dir = "/srv/l"\n[lockspaces]\n"a" = "/srv"\n', {},
         "lockd.toml:3: lockspaces.a /srv and lock_dir /srv/l overlap"),
        ('journal_dir = "/var/j"\n[lockspaces]\n"a" = "/var/j/a"\n', {"lock_dir": "/srv/l"},
         "lockd.toml:3: lockspaces.a /var/j/a and journal_dir /var/j overlap"),
    ],
)  # fmt: skip
def test_directories_that_overlap_are_refused_naming_both(
    tmp_path: Path, text: str, flags: dict[str, str], message: str
) -> None:
    """They were taken: a journal on the shared lock directory, two lockspaces sharing
    one set of lease files, a lockspace mapped onto another's directory."""
    config = tmp_path / "lockd.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load(str(config), flags)
    assert str(caught.value).startswith(f"{config}{message[len('lockd.toml') :]}")


@pytest.mark.parametrize(
    "text",
    [
        '[lockspaces]\n"a" = "/srv/a"\n"b" = "/srv/b"\n',
        '[lockspaces]\n"a" = "/srv/l/a"\n"b" = "/srv/l/b/sub"\n',
        '[lockspaces]\n"a" = "/srv/l2"\n',
    ],
)
def test_directories_apart_or_at_their_own_place_are_taken(tmp_path: Path, text: str) -> None:
    config = tmp_path / "lockd.toml"
    config.write_text(f'lock_dir = "/srv/l"\njournal_dir = "/var/lockd/j"\n{text}')
    assert load(str(config), {}).lockspaces


def test_socket_mode_and_group_are_read_as_libvirtd_s_unix_sock_settings(tmp_path: Path) -> None:
    """An octal mode in quotes (3 or 4 digits), and a group by name or gid."""
    config = tmp_path / "lockd.toml"
    config.write_text('socket_mode = "660"\nsocket_group = "nogroup"\n')
    loaded = load(str(config), {})
    assert (loaded.socket_mode, loaded.socket_group) == ("0660", "nogroup")
    config.write_text('socket_mode = "0666"\nsocket_group = 107\n')
    loaded = load(str(config), {})
    assert (loaded.socket_mode, loaded.socket_group) == ("0666", 107)
    config.write_text("timeout = 1\n")
    loaded = load(str(config), {})
    assert (loaded.socket_mode, loaded.socket_group) == ("0600", None)


@pytest.mark.parametrize(
    ("line", "says"),
    [
        # 660 as TOML writes it is decimal: mode 0o1224, no group access at all.
        ("socket_mode = 660", 'socket_mode must be an octal mode in quotes, such as "0660"'),
        ("socket_mode = 0o660", 'socket_mode must be an octal mode in quotes, such as "0660"'),
        ('socket_mode = "0680"', 'socket_mode must be an octal mode in quotes, such as "0660"'),
        ('socket_mode = "1660"', 'socket_mode must be an octal mode in quotes, such as "0660"'),
        ('socket_mode = "rw-rw----"', "socket_mode must be an octal mode in quotes"),
        ('socket_mode = "0060"', "socket_mode '0060' must let lockd's own uid connect"),
        ('socket_mode = "0400"', "socket_mode '0400' must let lockd's own uid connect"),
        ('socket_group = "no-such-group-here"', "socket_group: no group named"),
        ('socket_group = ""', "socket_group must be a group name"),
        ("socket_group = -1", "socket_group must be a group name"),
        ("socket_group = true", "socket_group must be a group name"),
        ("socket_group = 4294967295", "socket_group must be a group name"),
    ],
)
def test_a_bad_socket_mode_or_group_names_its_line(tmp_path: Path, line: str, says: str) -> None:
    config = tmp_path / "lockd.toml"
    config.write_text(f"timeout = 1\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        load(str(config), {})
    assert str(caught.value).startswith(f"{config}:2: {says}")
