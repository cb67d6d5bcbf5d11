"""Mutation testing of the critical modules with mutmut, one module at a time.

    python scripts/mutation.py                      # every module in MODULES
    python scripts/mutation.py eval/stats.py        # one (paths relative to src/asa3d)
    python scripts/mutation.py --report eval/stats.py   # print the last results, run nothing
    python scripts/mutation.py --sample 60 methods/     # a seeded random sample of 60 mutants

Each module runs in its own copy of the project, mutants/<module>/, with a pyproject.toml whose
[tool.mutmut] mutates only that module and selects only the test files that guard it (MODULES),
so one module takes minutes and a rerun resumes where the last one stopped. Prints the kill rate
per module (killed + timeout over all mutants that were tested, the known equivalent mutants of
scripts/mutation_equivalent.txt left out of the rate but listed with their reason) and every
survivor; `mutmut show NAME` inside mutants/<module>/ prints a survivor's diff. See docs/testing.md.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EQUIVALENT = REPO / "scripts" / "mutation_equivalent.txt"
WORK = REPO / "mutants"
# copied into each module's project copy besides src/ and tests/ (tests read configs and docs)
ALSO_COPY = ["configs", "docs", "README.md", "Makefile", "benchmarks", "scripts"]

# module (relative to src/asa3d; a folder = every file in it) -> the test files that guard it
MODULES: dict[str, list[str]] = {
    "eval/stats.py": ["tests/test_eval_stats.py"],
    "eval/metrics.py": ["tests/test_eval_metrics.py"],
    "data/validate.py": ["tests/test_data_validate.py", "tests/test_wiring_data.py"],
    "models/ema.py": [
        "tests/test_asa_method.py",
        "tests/test_wiring_ema.py",
        "tests/test_student_teacher.py",
    ],
    "views/": [
        "tests/test_views.py",
        "tests/test_views_decompose.py",
        "tests/test_views_peers.py",
        "tests/test_views_exact.py",
        "tests/test_wiring_asa.py",
        "tests/test_asa_method.py",
        "tests/test_backbone.py",
    ],
    "methods/": [
        "tests/test_asa_losses.py",
        "tests/test_asa_method.py",
        "tests/test_asa_presets.py",
        "tests/test_engine_monitors_plan.py",
        "tests/test_wiring_export.py",
        "tests/test_wiring_asa.py",
        "tests/test_student_teacher.py",
        "tests/test_adam_losses.py",
        "tests/test_peer_losses.py",
        "tests/test_peer_heads.py",
        "tests/test_peer_methods.py",
        "tests/test_adam_method.py",
        "tests/test_adam_units.py",
        "tests/test_adam_losses_exact.py",
        "tests/test_peer_losses_exact.py",
        "tests/test_swinssl_units.py",
        "tests/test_voco_units.py",
        "tests/test_simmim_units.py",
        "tests/test_asa_units.py",
        "tests/test_method_contract.py",
    ],
    "export.py": [
        "tests/test_export.py",
        "tests/test_export_messages.py",
        "tests/test_wiring_export.py",
        "tests/test_wiring_loaders.py",
    ],
    "engine/checkpoint.py": [
        "tests/test_checkpoint.py",
        "tests/test_engine_trainer.py",
        "tests/test_wiring_loaders.py",
    ],
    "engine/distributed.py": [
        "tests/test_engine_distributed.py",
        "tests/test_engine_schedules.py",
        "tests/test_engine_trainer.py",
    ],
    "eval/transfer.py": [
        "tests/test_eval_transfer.py",
        "tests/test_eval_transfer_report.py",
        "tests/test_wiring_loaders.py",
    ],
    "eval/predict.py": [
        "tests/test_eval_predict.py",
        "tests/test_eval_predict_outputs.py",
        "tests/test_wiring_loaders.py",
    ],
    "data/cache.py": [
        "tests/test_data_cache.py",
        "tests/test_data_cache_faults.py",
        "tests/test_data_cache_entries.py",
        "tests/test_wiring_data.py",
    ],
}

KILLED = {"killed", "timeout", "caught by type check"}
NOT_COUNTED = {"skipped", "not checked", "check was interrupted by user"}


@dataclass
class ModuleResult:
    module: str
    status: dict[str, str] = field(default_factory=dict)  # mutant name -> mutmut status
    equivalent: dict[str, str] = field(default_factory=dict)  # mutant name -> reason

    @property
    def counted(self) -> dict[str, str]:
        return {k: v for k, v in self.status.items() if k not in self.equivalent and v not in NOT_COUNTED}

    @property
    def killed(self) -> int:
        return sum(v in KILLED for v in self.counted.values())

    @property
    def survivors(self) -> list[tuple[str, str]]:
        return sorted((k, v) for k, v in self.counted.items() if v not in KILLED)

    @property
    def rate(self) -> float:
        n = len(self.counted)
        return 100.0 * self.killed / n if n else float("nan")


def tests_for(module: str) -> list[str] | None:
    """The test files guarding a listed module; a single file inside a listed folder (e.g.
    methods/asa.py) inherits the folder's tests, so a large folder can be measured file by file."""
    if module in MODULES:
        return MODULES[module]
    folder = next((m for m in MODULES if m.endswith("/") and module.startswith(m)), None)
    if folder and module.endswith(".py") and (REPO / "src" / "asa3d" / module).is_file():
        return MODULES[folder]
    return None


def slug(module: str) -> str:
    return module.strip("/").replace("/", "_").removesuffix(".py")


def read_equivalent(path: Path = EQUIVALENT) -> dict[str, str]:
    """`mutant_name  # reason` per line; a line without a reason is an error (say why it cannot be
    told apart, or write the test that kills it)."""
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition("#")
        if not reason.strip():
            raise SystemExit(f"{path}:{n}: equivalent mutant {name.strip()} has no reason after '#'")
        out[name.strip()] = reason.strip()
    return out


def module_pattern(module: str) -> str:
    return f"src/asa3d/{module}*" if module.endswith("/") else f"src/asa3d/{module}"


def prepare(module: str, tests: list[str], skip_slow: bool = False) -> Path:
    """Refresh mutants/<module>/ from the working tree (mutmut keeps its results there and only
    re-tests mutants of functions that changed)."""
    work = WORK / slug(module)
    work.mkdir(parents=True, exist_ok=True)
    for name in ["src", "tests", *ALSO_COPY]:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(
                src, work / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
            )
        elif src.is_file():
            shutil.copy2(src, work / name)
    missing = [t for t in tests if not (REPO / t).exists()]
    if missing:
        print(f"  note: {module}: test files not found, left out: {missing}")
    tests = [t for t in tests if (REPO / t).exists()]
    text = (REPO / "pyproject.toml").read_text()
    section = re.search(r"(?ms)^\[tool\.mutmut\]\n(.*?)(?=^\[|\Z)", text)
    base = text.replace(section.group(0), "") if section else text
    own = {"source_paths", "only_mutate", "pytest_add_cli_args_test_selection", "also_copy"}
    shared = [
        line
        for line in (section.group(1).splitlines() if section else [])
        if line.strip() and line.split("=")[0].strip() not in own
    ]  # the repository's [tool.mutmut] keys (one per line) apply to every module
    lines = ["[tool.mutmut]", 'source_paths = ["src/"]', f'only_mutate = ["{module_pattern(module)}"]']
    lines.append("pytest_add_cli_args_test_selection = [" + ", ".join(f'"{t}"' for t in tests) + "]")
    lines.append("also_copy = [" + ", ".join(f'"{p}"' for p in ALSO_COPY) + "]")
    if skip_slow:  # leave out the end-to-end training runs: faster, and the rate a lower bound
        args = "pytest_add_cli_args "
        shared = [re.sub(r"\]\s*$", ', "-m", "not slow"]', s) if s.startswith(args) else s for s in shared]
    lines += shared
    (work / "pyproject.toml").write_text(base.rstrip() + "\n\n" + "\n".join(lines) + "\n")
    return work


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # mutmut puts mutants/src first; nothing else may shadow it
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("ASA3D_TEST_THREADS", "1")
    # the copies live two levels deeper than the repository: point the tests at the real scans
    env.setdefault("ASA3D_SHARED_DATA", str(REPO.parent / "shared" / "data"))
    return env


def mutmut(
    work: Path, *args: str, capture: bool = False, log: Path | None = None
) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("mutmut")
    cmd = [str(exe) if exe.exists() else "mutmut", *args]
    if log is None:
        return subprocess.run(cmd, cwd=work, env=_env(), text=True, capture_output=capture, check=False)
    with open(log, "w") as fh:  # mutmut's spinner writes a line per mutant: keep it out of the terminal
        return subprocess.run(
            cmd, cwd=work, env=_env(), text=True, stdout=fh, stderr=subprocess.STDOUT, check=False
        )


def collect(module: str, work: Path, equivalent: dict[str, str]) -> ModuleResult:
    res = ModuleResult(module)
    out = mutmut(work, "results", "--all", "true", capture=True)
    for line in out.stdout.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            res.status[name] = status
    res.equivalent = {k: v for k, v in equivalent.items() if k in res.status}
    return res


def sample_names(module: str, work: Path, n: int, seed: int, max_children: int, log: Path) -> list[str]:
    """A seeded random sample of n of the module's mutants (an unbiased estimate of the rate: mutmut
    itself tests the cheapest mutants first, so an interrupted full run is not one)."""
    names = sorted(collect(module, work, {}).status)
    if not names:  # generate the mutants and the test coverage only: a name that matches no mutant
        mutmut(work, "run", "--max-children", str(max_children), "__asa3d_generate_only__", log=log)
        names = sorted(collect(module, work, {}).status)
    return sorted(random.Random(seed).sample(names, min(n, len(names))))


def print_module(res: ModuleResult) -> None:
    untested = sum(v in NOT_COUNTED for k, v in res.status.items() if k not in res.equivalent)
    sample = f"; a sample: {untested} of {len(res.status)} mutants not tested" if untested else ""
    print(
        f"{res.module}: kill rate {res.rate:.1f}% ({res.killed}/{len(res.counted)} killed; "
        f"{len(res.equivalent)} equivalent excluded{sample})"
    )
    for name, status in res.survivors:
        print(f"  {status}: {name}")
    for name, reason in sorted(res.equivalent.items()):
        print(f"  equivalent ({res.status[name]}): {name}  # {reason}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    ap.add_argument("--report", action="store_true", help="only print the last results")
    ap.add_argument("--max-children", type=int, default=1, help="parallel mutants (default 1)")
    ap.add_argument(
        "--retest-survivors",
        action="store_true",
        help="after the run, re-test the surviving mutants (after tests were added)",
    )
    ap.add_argument(
        "--sample",
        type=int,
        default=0,
        metavar="N",
        help="test only a seeded random sample of N mutants per module (an estimate of the rate when "
        "the whole module would take too long; the rest stay 'not checked' and out of the rate)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    ap.add_argument(
        "--skip-slow",
        action="store_true",
        help="leave out tests marked slow (tiny end-to-end training runs): much faster for methods/, "
        "and the rate is a lower bound (a left-out test could only kill more mutants); changing it "
        "resets the module's results",
    )
    ap.add_argument("--min-rate", type=float, default=90.0, help="exit 1 when a module is below")
    args = ap.parse_args(argv)
    modules = args.modules or list(MODULES)
    unknown = [m for m in modules if tests_for(m) is None]
    if unknown:
        print(
            f"unknown module(s) {unknown}; known: {', '.join(MODULES)} (or one file inside a folder)",
            file=sys.stderr,
        )
        return 2
    equivalent = read_equivalent()
    results = []
    for module in modules:
        work = prepare(module, tests_for(module), args.skip_slow) if not args.report else WORK / slug(module)
        if not args.report:
            log = work / "mutmut-run.log"
            print(
                f"== {module}: mutmut run in {work.relative_to(REPO)} (log: {log.relative_to(REPO)})",
                flush=True,
            )
            t0 = time.monotonic()
            names = (
                sample_names(module, work, args.sample, args.seed, args.max_children, log)
                if args.sample
                else []
            )
            done = mutmut(work, "run", "--max-children", str(args.max_children), *names, log=log)
            print(f"   {time.monotonic() - t0:.0f} s, exit {done.returncode}", flush=True)
            if args.retest_survivors:  # verdicts are kept across runs: recheck survivors on today's tests
                names = [n for n, _ in collect(module, work, {}).survivors]
                if names:
                    t0 = time.monotonic()
                    mutmut(work, "run", "--max-children", str(args.max_children), *names, log=log)
                    print(f"   re-tested {len(names)} survivors: {time.monotonic() - t0:.0f} s", flush=True)
        res = collect(module, work, equivalent) if work.is_dir() else ModuleResult(module)
        if args.report and module.endswith("/"):  # fold in file-by-file runs (they are fresher)
            for part in sorted(WORK.glob(slug(module) + "_*")):
                res.status.update(collect(module, part, {}).status)
            res.equivalent = {k: v for k, v in equivalent.items() if k in res.status}
        results.append(res)
    print("\n== mutation kill rates")
    for res in results:
        print_module(res)
    low = [r.module for r in results if not r.rate >= args.min_rate]
    if low:
        print(f"\nbelow {args.min_rate:g}%: {', '.join(low)}")
    return 1 if low else 0


if __name__ == "__main__":
    raise SystemExit(main())
