"""Print the table of docs/CONFIG.md: every config group, its options, and the first
comment block of each option's YAML file (so the docs follow the files).

    python scripts/config_reference.py > /tmp/reference.md   # then paste it into docs/CONFIG.md
"""
from pathlib import Path

from ncsn.config import config_dir


def description(path: Path) -> str:
    """The file's leading comment block, joined into one line."""
    lines = []
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text.startswith("#"):
            break
        if "@package" not in text:
            lines.append(text.lstrip("# ").rstrip())
    return " ".join(lines).replace("|", "/")


def main() -> None:
    root = Path(config_dir())
    print("| group | option | what it is |\n|---|---|---|")
    for group in sorted(p for p in root.iterdir() if p.is_dir()):
        for option in sorted(group.glob("*.yaml")):
            print(f"| `{group.name}` | `{option.stem}` | {description(option)} |")


if __name__ == "__main__":
    main()
