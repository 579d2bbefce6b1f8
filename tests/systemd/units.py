"""Writes the unit files of the user guide's "Tested under a real systemd" (docs/guide/systemd.md)
section, verbatim, into a directory: every ```ini block whose first line
is `# /etc/systemd/system/aiorun-<name>.service` (or `.socket`).

    python tests/systemd/units.py docs/guide/systemd.md ROOT/etc/systemd/system
"""
import pathlib
import re
import sys

BLOCK = re.compile(r"```ini\n(# /etc/systemd/system/(aiorun-[\w-]+\.(?:service|socket))\n.*?)```",
                   re.S)


def units(readme):
    return {name: text for text, name in BLOCK.findall(pathlib.Path(readme).read_text())}


if __name__ == "__main__":
    found = units(sys.argv[1])
    out = pathlib.Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for name, text in found.items():
        (out / name).write_text(text)
    print("units:", " ".join(sorted(found)))
