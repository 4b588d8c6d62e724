"""Name rules and lease names: the guard that keeps client input inside the lock dir."""

from __future__ import annotations

import hashlib
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.names import (
    INDEX_NAME,
    InvalidNameError,
    check_lockspace_name,
    check_resource_name,
    lease_name_for_path,
    normalise_disk_path,
    printable,
)


@pytest.mark.parametrize(
    "name", ["org.libvirt.lockd.files", "a", "x" * 255, "host-1:pool_", "A.b-c:9"]
)
def test_valid_lockspace_names_are_accepted(name: str) -> None:
    """Names of 1-255 characters from the allowed set pass unchanged."""
    assert check_lockspace_name(name) == name


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a/b", "../etc", "/abs", "x" * 256, "nul\0", "sp ace", "é"]
)
def test_bad_lockspace_names_are_refused(name: str) -> None:
    """Empty, dot names, separators, NUL, over-long and non-ASCII names are refused."""
    with pytest.raises(InvalidNameError):
        check_lockspace_name(name)


@pytest.mark.parametrize("name", [INDEX_NAME, INDEX_NAME.upper(), "Org.Libvirt.Lockd.Index"])
def test_index_name_is_reserved_for_resources_in_any_case(name: str) -> None:
    """A client can never lock or delete the lockspace's index lock file, also not by
    another case of its name, which is the same file on a case-insensitive filesystem."""
    with pytest.raises(InvalidNameError, match="reserved"):
        check_resource_name(name)


def test_scsi_and_lvm_keys_are_valid_resource_names() -> None:
    """Keys produced by scsi_id and lvs are usable as resource names."""
    assert check_resource_name("SATA_QEMU_HARDDISK_QM00001")
    assert check_resource_name("06UgP5-2rhb-w3Bo-3mdR-WeoL-pytO-SAa2ky")


@given(st.text(max_size=300))
def test_accepted_resource_names_never_escape_the_directory(name: str) -> None:
    """Any name that passes the check is a single path component."""
    try:
        check_resource_name(name)
    except InvalidNameError:
        return
    assert "/" not in name
    assert "\0" not in name
    assert name not in (".", "..")


def test_lease_name_is_sha256_of_the_normalised_path() -> None:
    """The lease name matches virtlockd's: hex SHA-256 of the path string."""
    expected = hashlib.sha256(b"/vm/a.img").hexdigest()
    assert lease_name_for_path("/vm/a.img") == expected
    assert lease_name_for_path("//vm/./x/../a.img") == expected


def test_relative_paths_are_refused() -> None:
    """A relative path would name different disks on different hosts."""
    with pytest.raises(InvalidNameError, match="relative"):
        normalise_disk_path("vm/a.img")


def test_printable_shows_control_characters_as_escapes() -> None:
    """Names journaled before control characters were refused still print on one line."""
    assert printable("vm1\n7 2026 lease-released\x1b[31m\x7f\x85é") == (
        "vm1\\x0a7 2026 lease-released\\x1b[31m\\x7f\\x85é"
    )
    assert printable("vm-1 (web)") == "vm-1 (web)"


def test_printable_shows_invisible_characters_as_escapes() -> None:
    """A right-to-left override or a zero-width space in a VM's name (allowed: names
    may be in any script) cannot make it look like another name in text output."""
    assert printable("vm\u202egmi.kcab") == "vm\\u202egmi.kcab"
    assert printable("vm\u200b1\ufeff") == "vm\\u200b1\\ufeff"
    assert printable("仮想マシン-1") == "仮想マシン-1"  # other scripts print as they are


def test_printable_escapes_every_character_that_shows_as_nothing() -> None:
    """Only bidirectional controls and zero-width spaces were escaped: a tag character,
    a variation selector, a soft hyphen or a Hangul filler still made ``vm1`` and
    another name print alike, and a line separator ends a line for some readers."""
    assert printable("vm1\U000e0031") == "vm1\\U000e0031"
    assert printable("vm\ufe0f1") == "vm\\ufe0f1"
    assert printable("v\u00adm1") == "v\\u00adm1"
    assert printable("vm1\u3164") == "vm1\\u3164"
    assert printable("vm\u2028x") == "vm\\u2028x"


_NAME_CHARS = st.sampled_from("Ab9._:-@+=/ \0é")
_ALNUM = set(string.ascii_letters + string.digits)


@given(
    st.text(_NAME_CHARS, max_size=260)
    | st.sampled_from([".", "..", INDEX_NAME, INDEX_NAME.upper(), ""])
)
def test_a_name_is_accepted_exactly_when_the_rules_allow_it(name: str) -> None:
    """1-255 characters of the set, not a dot name (nor, for a resource, the index):
    accepted unchanged; anything else refused, whichever path the check takes."""
    for check, allowed, reserved in (
        (check_lockspace_name, _ALNUM | set("._:-"), (".", "..")),
        (check_resource_name, _ALNUM | set("._:-@+="), (".", "..", INDEX_NAME)),
    ):
        ok = 1 <= len(name) <= 255 and set(name) <= allowed and name not in reserved
        ok = ok and not (check is check_resource_name and name.lower() == INDEX_NAME)
        if ok:
            assert check(name) == name
        else:
            with pytest.raises(InvalidNameError):
                check(name)


@pytest.mark.parametrize("value", [b"disk", 7, None, ["a"]])
def test_a_name_that_is_not_text_is_refused(value: object) -> None:
    """A client's bytes, number, null or list is no name."""
    with pytest.raises(InvalidNameError):
        check_lockspace_name(value)  # type: ignore[arg-type]
    with pytest.raises(InvalidNameError):
        check_resource_name(value)  # type: ignore[arg-type]
