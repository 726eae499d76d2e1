"""ComfyUI's ``main.py`` as this project starts it, with one change to its log: a missing torchaudio is one
plain line instead of two tracebacks and a "pip install -r requirements.txt" request.

The host has no torchaudio (it is optional: only ComfyUI's two audio node modules need it), so every start
would log errors a user should not worry about. Every other message, including any other failed import, is
left as it is.

    python dev/comfy_main.py [main.py arguments]      (cwd: the ComfyUI folder; dev/host.py does this)
"""

from __future__ import annotations

import importlib.util
import logging
import os
import runpy
import sys

NOTICE = ("ComfyUI's audio nodes are not loaded: torchaudio is not installed (it is optional; this pack "
          "does not use it)")
_SUMMARY_START = "WARNING: some comfy_extras/ nodes did not import correctly"


class MissingTorchaudio(logging.Filter):
    """Drops the log records that only say torchaudio is missing, and says it once instead."""

    def __init__(self) -> None:
        super().__init__()
        self.audio: set[str] = set()  # module files that failed because of torchaudio
        self.other = False  # another module failed to import: ComfyUI's summary stays
        self.in_summary = False
        self.said = False

    def _say_once(self, record: logging.LogRecord) -> bool:
        if self.said:
            return False
        self.said = True
        record.msg, record.args, record.exc_info, record.exc_text = NOTICE, (), None, None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if self.in_summary:  # ComfyUI's "some nodes did not import" summary, which ends with an empty line
            self.in_summary = text != ""
            return False
        if text.startswith("Cannot import ") and "for custom nodes" in text:
            if "torchaudio" not in text:
                self.other = True
                return True
            self.audio.add(os.path.basename(text.split()[2]))
            return self._say_once(record)
        if "torchaudio" in text:
            return self._say_once(record)
        if text.startswith(_SUMMARY_START) and self.audio and not self.other:
            self.in_summary = True
            return False
        if text.startswith("IMPORT FAILED: "):
            return text.removeprefix("IMPORT FAILED: ").strip() not in self.audio
        return True


def quiet_missing_torchaudio(logger: logging.Logger) -> None:
    """Install the filter on ``logger`` (ComfyUI logs through the root logger) when torchaudio is missing."""
    if importlib.util.find_spec("torchaudio") is None and not any(isinstance(f, MissingTorchaudio)
                                                                   for f in logger.filters):
        logger.addFilter(MissingTorchaudio())


def main() -> None:
    comfy = os.getcwd()
    here = os.path.dirname(os.path.abspath(__file__))
    # run main.py as `python main.py` would: its folder first on sys.path, none of this folder's modules
    sys.path[:] = [comfy] + [p for p in sys.path if os.path.abspath(p or ".") not in (here, comfy)]
    sys.argv = [os.path.join(comfy, "main.py"), *sys.argv[1:]]
    quiet_missing_torchaudio(logging.getLogger())
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
