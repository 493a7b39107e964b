"""tools/debianroot.py's choice of a Debian mirror: the host's deb822 sources, or a clear failure."""

import os

import pytest

import debianroot  # tools/ is on sys.path (tests/conftest.py)


def sources(tmp_path, monkeypatch, text):
    path = tmp_path / "debian.sources"
    if text is not None:
        path.write_text(text)
    monkeypatch.setattr(debianroot, "SOURCES", str(path))
    return path


def test_the_mirror_is_the_hosts(tmp_path, monkeypatch):
    sources(tmp_path, monkeypatch, "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
                                   "Components: main\n\nTypes: deb\nURIs: http://security.example/debian-security\n"
                                   "Suites: bookworm-security\n")
    assert debianroot.mirror() == "http://mirror.example/debian"


@pytest.mark.parametrize("text, why", [
    (None, "No such file or directory"),
    ("", "no stanza for bookworm or trixie with a URIs: line"),
    ("Types: deb\nURIs: http://security.example/x\nSuites: trixie-security\n",
     "no stanza for bookworm or trixie with a URIs: line"),
])
def test_without_deb822_sources_it_fails_clearly_and_picks_no_mirror(tmp_path, monkeypatch, text, why):
    path = sources(tmp_path, monkeypatch, text)
    with pytest.raises(SystemExit) as info:
        debianroot.mirror()
    assert str(info.value) == ("no Debian mirror to build a root from: %s: %s (debootstrap takes the mirror this "
                               "host's deb822 apt sources name)" % (path, why))


def test_the_code_names_no_mirror():
    with open(os.path.join(os.path.dirname(debianroot.__file__), "debianroot.py")) as handle:
        assert "://" not in handle.read()
