"""A benchmark's markdown table: printed a row at a time as it is measured
(a long run shows its progress), and written to OUT/NAME at the end when
the script was given --out."""

import os


class MarkdownTable:
    def __init__(self, head, out, name):
        self.lines = list(head)
        self.path = os.path.join(out, name) if out else None
        print("\n".join(self.lines), flush=True)

    def add(self, row):
        self.lines.append(row)
        print(row, flush=True)

    def write(self):
        if self.path is None:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "w") as handle:
            handle.write("\n".join(self.lines) + "\n")
