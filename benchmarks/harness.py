"""Benchmark plumbing shared by the benchmark scripts: run a training script, read its TensorBoard scalars,
summarise seeds, plot curves and write markdown tables under benchmarks/results/."""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


# Runs a script as `python script.py args` would (its folder first on sys.path) and, at exit, writes the
# process's peak resident memory in kB (VmHWM, reset by exec, so only this script's own) to $PEAK_RSS_FILE.
_PEAK_PROBE = """
import atexit, os, runpy, sys
def _report_peak():
    with open("/proc/self/status") as status:
        peak_kb = next(line.split()[1] for line in status if line.startswith("VmHWM"))
    with open(os.environ["PEAK_RSS_FILE"], "w") as out:
        out.write(peak_kb)
atexit.register(_report_peak)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def ensure_sft_checkpoint(path: str = "checkpoints/sft", seed: int = 1) -> str:
    """The sft.py checkpoint the RL benchmarks start from (default flags); trained once if it is missing."""
    checkpoint = ROOT / path
    if not (checkpoint / "config.json").is_file():
        print(f"training the SFT base model into {checkpoint} (python sft.py --seed {seed})", flush=True)
        run_script("sft.py", ["--seed", str(seed), "--output-dir", str(checkpoint)])
    return str(checkpoint)


def run_script(script: str, args: list[str], echo: bool = True) -> dict:
    """Run `python <script> <args>` in a fresh working folder and return what it measured.

    Returns {"wall_s", "peak_rss_mb", "scalars", "stdout"}, where scalars maps each TensorBoard tag to
    a list of (step, seconds since the run's first logged event, value). Peak resident memory is the
    script's own high-water mark (VmHWM of /proc/self/status, read at exit by _PEAK_PROBE): unlike the
    child's rusage it does not include the parent's memory at fork time, so a large benchmark driver
    does not inflate it. Linux only.
    """
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        peak_file = Path(workdir) / "peak_rss_kb"
        start = time.time()
        process = subprocess.Popen(
            [sys.executable, "-c", _PEAK_PROBE, str(ROOT / script), *args],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PEAK_RSS_FILE": str(peak_file)},
        )
        lines = []
        for line in process.stdout:
            lines.append(line)
            if echo:
                print("   ", line, end="", flush=True)
        if process.wait() != 0:
            raise RuntimeError(f"{script} {' '.join(args)} failed:\n{''.join(lines[-30:])}")
        wall_s = time.time() - start
        return {
            "wall_s": wall_s,
            "peak_rss_mb": int(peak_file.read_text()) / 1024,
            "scalars": read_scalars(Path(workdir) / "runs"),
            "stdout": "".join(lines),
        }


def read_scalars(log_root: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar of the single run under `log_root` as {tag: [(step, relative wall time, value), ...]}; {} if
    none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not log_root.is_dir():
        return {}
    run_dirs = [d for d in log_root.iterdir() if d.is_dir()]
    if len(run_dirs) != 1:
        raise RuntimeError(f"expected one run under {log_root}, found {len(run_dirs)}")
    accumulator = EventAccumulator(str(run_dirs[0]), size_guidance={"scalars": 0})
    accumulator.Reload()
    events = {tag: accumulator.Scalars(tag) for tag in accumulator.Tags()["scalars"]}
    first = min(e.wall_time for series in events.values() for e in series)
    # TensorBoard stores values as float32, so an accuracy of 475/500 = 0.95 reads back as 0.949999988; the shortest
    # decimal with the same float32 is the value that was logged, and a bar such as ">= 0.95" then compares as written
    return {
        tag: [(e.step, e.wall_time - first, float(str(numpy.float32(e.value)))) for e in series]
        for tag, series in events.items()
    }


def median_and_range(values: list[float]) -> str:
    """`median [min, max]` formatted for a table."""
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, list[tuple[float, float, float]]], path: Path, title: str, ylabel: str) -> None:
    """Two panels, the same curves against steps (left) and against wall time (right).

    curves maps a label (e.g. `seed 1`) to (step, seconds, value) points, the triples of `read_scalars`; a point
    whose seconds is None (not measured) is left out of the right panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, x_index, xlabel in ((axes[0], 0, "step"), (axes[1], 1, "seconds since the run's first logged event")):
        for label, points in curves.items():
            points = [point for point in points if point[x_index] is not None]
            axis.plot(
                [point[x_index] for point in points],
                [point[2] for point in points],
                marker="o",
                markersize=3,
                label=label,
            )
        axis.set(xlabel=xlabel)
        axis.grid(alpha=0.3)
    axes[0].set(ylabel=ylabel)
    axes[1].legend()
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_result(name: str, text: str) -> Path:
    """Write benchmarks/results/<name> and say where it went."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text)
    print(f"wrote {path}")
    return path
