"""The node reference (Markdown) from the nodes' own definitions, so the README never drifts from the code.

    python3 dev/host.py python -m dev.node_reference            # print it
    python3 dev/host.py python -m dev.node_reference --readme   # rewrite the README's section
"""

from __future__ import annotations

import sys

from . import harness
from .host import REPO


def describe_input(name: str, spec) -> str:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    kind_s = "choice" if isinstance(kind, list) else kind
    default = opts.get("default", kind[0] if isinstance(kind, list) and kind else None)
    d = f" (default `{default}`)" if default not in (None, "") else ""
    tip = opts.get("tooltip", "")
    return f"`{name}` {kind_s}{d}: {tip}".rstrip(": ")


START, END = "<!-- node-reference:start -->", "<!-- node-reference:end -->"


def main() -> int:
    import contextlib
    import io
    import os

    if "--readme" in sys.argv:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            reference()
        readme = REPO / "README.md"
        text = readme.read_text()
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        tmp = readme.with_suffix(".md.tmp")
        tmp.write_text(f"{head}{START}\n{buf.getvalue()}{END}{tail}")
        os.replace(tmp, readme)
        return 0
    reference()
    return 0


def reference() -> None:
    harness.boot()
    import nodes

    ours = sorted(k for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("DCI"))
    for node_id in ours:
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        display = nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_id, node_id)
        print(f"#### {display} (`{node_id}`, category `{cls.CATEGORY}`)\n")
        print(f"{getattr(cls, 'DESCRIPTION', '').strip()}\n")
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, s in spec.get(section, {}).items():
                extra = " *(optional)*" if section == "optional" else ""
                print(f"- {describe_input(name, s)}{extra}")
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        tips = getattr(cls, "OUTPUT_TOOLTIPS", ()) or ()
        outs = [f"`{n}` {t}" + (f": {tips[i]}" if i < len(tips) else "")
                for i, (n, t) in enumerate(zip(names, cls.RETURN_TYPES, strict=True))]
        print(f"- **outputs**: {'; '.join(outs)}\n")


if __name__ == "__main__":
    sys.exit(main())
