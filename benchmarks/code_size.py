"""The size of the house: lines of code per file against its budget, line lengths, the README's size.

    python benchmarks/code_size.py

Lines of code are the non-blank lines that are not comments (docstrings count). Exits with status 1 when a number
is over its budget, so it can run in CI.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = {
    "common.py": 300,
    "tasks.py": None,
    "sft.py": 270,
    "reward_model.py": 250,
    "reinforce.py": 250,
    "dpo.py": 300,
    "grpo.py": 380,
    "ppo.py": 450,
}
README_BYTES = 15 * 1024
LINE_LENGTH = 120


def lines_of_code(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip() and not line.strip().startswith("#"))


def longest_function(path: Path) -> tuple[str, int]:
    """(name, lines of code) of the longest top-level function, docstring included."""
    source = path.read_text().splitlines()
    functions = [node for node in ast.parse("\n".join(source)).body if isinstance(node, ast.FunctionDef)]
    sizes = {
        node.name: sum(
            1 for line in source[node.lineno - 1 : node.end_lineno] if line.strip() and not line.strip().startswith("#")
        )
        for node in functions
    }
    name = max(sizes, key=sizes.get)
    return name, sizes[name]


def main() -> int:
    over = []
    print(f"| file | lines of code | budget | longest function | lines over {LINE_LENGTH} characters |")
    print("|---|---|---|---|---|")
    for name, budget in BUDGETS.items():
        path = ROOT / name
        if not path.is_file():
            print(f"| {name} | (missing) | {budget} | | |")
            continue
        count = lines_of_code(path)
        function, size = longest_function(path)
        long_lines = sum(1 for line in path.read_text().splitlines() if len(line) > LINE_LENGTH)
        print(f"| {name} | {count} | {budget or '-'} | `{function}` ({size}) | {long_lines} |")
        if (budget and count > budget) or long_lines:
            over.append(name)
    python_files = [p for p in ROOT.rglob("*.py") if ".git" not in p.parts and "checkpoints" not in p.parts]
    long_lines = sum(len(line) > LINE_LENGTH for path in python_files for line in path.read_text().splitlines())
    readme = (ROOT / "README.md").stat().st_size
    print(
        f"\nREADME.md: {readme} bytes (budget {README_BYTES}); "
        f"lines over {LINE_LENGTH} characters in all .py files: {long_lines}"
    )
    if readme > README_BYTES or long_lines:
        over.append("README.md" if readme > README_BYTES else "line length")
    if over:
        print(f"over budget: {', '.join(over)}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
