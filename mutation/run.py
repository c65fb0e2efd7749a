"""Mutation testing of knotd's promise-carrying modules with mutmut (`./dev.sh mutate`).

For each module in mutation/modules.toml: copy the checkout to .cache/mutation/<name>/, point mutmut at that
one module and its fast test files, run it, and read back every mutant's result. The report
(.cache/mutation/report.md, also printed) gives the score per module and overall, and every surviving mutant
with its diff; survivors listed in mutation/equivalent.md (with the reason) count as equivalent, not as misses.

    python mutation/run.py                 all modules but the slow ones
    python mutation/run.py guardrails ...  only these (names from modules.toml; session-close is slow)
    python mutation/run.py --report ...    the report again from the last results (after editing equivalent.md)
    python mutation/run.py --survivors ... re-check only the last run's survivors against the tests as they are now

Exit status: 0 when every module reaches the threshold, 1 when one does not, 2 on bad usage.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "mutation"
WORK = Path(os.environ.get("KNOTD_MUTATE_WORK") or ROOT / ".cache" / "mutation")  # one directory per module
EQUIVALENT_MD = HERE / "equivalent.md"
MODEL_DIR = ROOT / ".cache" / "models" / "whisper-base"

KILLED = {1, 3}  # a test failed (3: pytest's internal error, which mutmut counts as a kill)
TIMEOUT = {36, 24, -24, 152, 255}  # the tests hung: detected
SURVIVED = {0}
NO_TESTS = {5, 33}  # no selected test calls the mutated function: a miss too


@dataclass
class ModuleResult:
    name: str
    path: str
    seconds: float = 0.0
    killed: list[str] = field(default_factory=list)
    timeout: list[str] = field(default_factory=list)
    survived: list[str] = field(default_factory=list)
    no_tests: list[str] = field(default_factory=list)
    other: list[tuple[str, int | None]] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # a run cut short: not counted either way
    equivalent: list[str] = field(default_factory=list)
    diffs: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def total(self) -> int:
        return len(self.killed) + len(self.timeout) + len(self.survived) + len(self.no_tests) + len(self.other)

    @property
    def detected(self) -> int:
        return len(self.killed) + len(self.timeout)

    @property
    def countable(self) -> int:
        return self.total - len(self.equivalent)

    @property
    def score(self) -> float:
        return self.detected / self.countable if self.countable else 1.0

    @property
    def misses(self) -> list[str]:
        eq = set(self.equivalent)
        return [m for m in self.survived + self.no_tests + [n for n, _ in self.other] if m not in eq]


def equivalents() -> dict[str, str]:
    """`mutant name` → reason, from the lines ``- `name`: reason`` in mutation/equivalent.md."""
    found = {}
    if EQUIVALENT_MD.exists():
        for line in EQUIVALENT_MD.read_text(encoding="utf-8").splitlines():
            m = re.match(r"^\s*[-*]\s+`([^`]+)`\s*[:—-]*\s*(.*)$", line)
            if m:
                found[m.group(1)] = m.group(2).strip()
    return found


def mutant_globs(path: str, functions: list[str]) -> list[str]:
    """mutmut's mutant names for ``functions`` of ``path``: module.x_func__mutmut_N, module.xǁClassǁmethod__mutmut_N."""
    module = path.removesuffix(".py").replace("/", ".")
    globs = []
    for fn in functions:
        if "." in fn:
            cls, method = fn.split(".", 1)
            globs.append(f"{module}.x\u01c1{cls}\u01c1{method}__mutmut_*")
        else:
            globs.append(f"{module}.x_{fn}__mutmut_*")
    return globs


def copy_checkout(dest: Path) -> None:
    """The checkout as it is (tracked and untracked files, not ignored ones) into ``dest``."""
    if dest.exists():
        shutil.rmtree(dest)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if rel.startswith(("debian/", "packaging/", ".ci/")) or not (src.is_file() or src.is_symlink()):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():  # knotd/templates -> ../templates
            os.symlink(os.readlink(src), target)
        else:
            shutil.copy2(src, target)


def write_config(dest: Path, module: dict) -> None:
    """Append the [tool.mutmut] table for ``module`` to the copy's pyproject.toml."""
    also_copy = sorted(p.name for p in dest.iterdir() if p.name not in {"knotd", "mutants", "tests", "pyproject.toml"})
    # mutmut copies only the package's .py files: its data (templates, rule files) goes along as is.
    # (Only directories without Python code: copying one with code would overwrite the mutated modules.)
    also_copy += sorted(str(d.relative_to(dest)) for d in (dest / "knotd").iterdir()
                        if d.is_dir() and d.name != "__pycache__" and not any(d.rglob("*.py")))
    lines = [
        "",
        "[tool.mutmut]",
        'source_paths = ["knotd/"]',
        f"only_mutate = {json.dumps([module['path']])}",
        f"pytest_add_cli_args_test_selection = {json.dumps(module['tests'])}",
        # A mutant that makes a test loop or wait forever is cut by pytest-timeout after 60 s (a test failed: killed;
        # the fast tests take seconds, the sentence encoder's load on a busy machine up to half a minute).
        "pytest_add_cli_args = "
        + json.dumps(["-p", "no:cacheprovider", "-q", "-x", "--timeout=60", *module.get("pytest_args", [])]),
        f"also_copy = {json.dumps(also_copy)}",
        # mutmut's own limit is CPU time: 15 x the tests' measured time + timeout_constant s. The measured time
        # leaves out fixture set-up (the sentence encoder's load), so with the default 1 s a mutant whose tests
        # load the encoder would be cut as a "timeout" and counted as killed.
        "timeout_constant = 60.0",
        "use_setproctitle = false",
        # "fork" (mutmut's default, fastest) forks each mutant's run from the process that ran the tests;
        # "forkserver" from a server that only collected them: forking after the session tests deadlocks (the
        # models' thread pools), so those modules ask for it in modules.toml.
        f'process_isolation = "{module.get("isolation", "fork")}"',
    ]
    with open(dest / "pyproject.toml", "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def run_module(module: dict, children: int, equivalent: dict[str, str], *, report_only: bool = False) -> ModuleResult:
    result = ModuleResult(module["name"], module["path"])
    dest = WORK / module["name"]
    env = dict(os.environ, KNOTD_TEST_MODEL_DIR=str(MODEL_DIR), HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("MUTANT_UNDER_TEST", None)
    globs = mutant_globs(module["path"], module.get("functions", []))
    mutmut = Path(sys.executable).with_name("mutmut")
    log = dest / "mutmut.log"
    returncode = 0
    if not report_only:
        copy_checkout(dest)
        write_config(dest, module)
        started = time.monotonic()
        with open(log, "w", encoding="utf-8") as out:
            returncode = subprocess.run([str(mutmut), "run", "--max-children", str(children), *globs], cwd=dest,
                                        env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        result.seconds = time.monotonic() - started
        (dest / "seconds").write_text(f"{result.seconds:.1f}\n")
    elif (dest / "seconds").exists():
        result.seconds = float((dest / "seconds").read_text())
    meta = dest / "mutants" / (module["path"] + ".meta")
    if returncode != 0 or not meta.exists():
        tail = (log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:] if log.exists()
                else ["no results: run it first"])
        result.error = f"mutmut exited {returncode}; {log}:\n" + "\n".join(tail)
        return result
    codes = json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]
    selected = set(codes)
    if globs:
        import fnmatch

        selected = {name for name in codes if any(fnmatch.fnmatch(name, g) for g in globs)}
    for name in sorted(selected, key=_natural):
        code = codes[name]
        if code in KILLED:
            result.killed.append(name)
        elif code in TIMEOUT:
            result.timeout.append(name)
        elif code in SURVIVED:
            result.survived.append(name)
        elif code in NO_TESTS:
            result.no_tests.append(name)
        elif code is None:
            result.unchecked.append(name)
            continue
        else:
            result.other.append((name, code))
        if code not in KILLED and code not in TIMEOUT and name in equivalent:
            result.equivalent.append(name)
    missed = result.survived + result.no_tests + [n for n, _ in result.other]
    if missed:  # the diffs, in one process (`mutmut show` per mutant costs a second or two each)
        script = ("import json, sys\n"
                  "from mutmut.mutation.diff_apply import find_mutant, get_diff_for_mutant\n"
                  "names = json.load(sys.stdin)\n"
                  "print(json.dumps({n: get_diff_for_mutant(n, path=find_mutant(n).path) for n in names}))\n")
        shown = subprocess.run([sys.executable, "-c", script], cwd=dest, env=env, input=json.dumps(missed),
                               capture_output=True, text=True)
        diffs = json.loads(shown.stdout.strip().splitlines()[-1]) if shown.returncode == 0 else {}
        for name in missed:
            result.diffs[name] = "\n".join(line for line in diffs.get(name, "(no diff)").splitlines()
                                           if line.startswith(("+", "-")) and not line.startswith(("+++", "---")))
    return result


def recheck_survivors(module: dict, children: int) -> int:
    """Run again, against the tests as they are now, only the mutants that survived the module's last run, and
    write their new results into that run's results (tests written since can only kill more). Returns how many
    were re-checked."""
    dest = WORK / module["name"]
    meta_path = dest / "mutants" / (module["path"] + ".meta")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    codes = meta["exit_code_by_key"]
    globs = mutant_globs(module["path"], module.get("functions", []))
    import fnmatch

    names = [n for n, c in codes.items() if c not in KILLED and c not in TIMEOUT and c is not None
             and (not globs or any(fnmatch.fnmatch(n, g) for g in globs))]
    if not names:
        return 0
    again = dict(module, name=module["name"] + "-survivors")
    scratch = WORK / again["name"]
    copy_checkout(scratch)
    write_config(scratch, again)
    env = dict(os.environ, KNOTD_TEST_MODEL_DIR=str(MODEL_DIR), HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("MUTANT_UNDER_TEST", None)
    started = time.monotonic()
    with open(scratch / "mutmut.log", "w", encoding="utf-8") as out:
        subprocess.run([str(Path(sys.executable).with_name("mutmut")), "run", "--max-children", str(children),
                        *names], cwd=scratch, env=env, stdout=out, stderr=subprocess.STDOUT)
    new = json.loads((scratch / "mutants" / (module["path"] + ".meta")).read_text(encoding="utf-8"))
    for name in names:
        if new["exit_code_by_key"].get(name) is not None:
            codes[name] = new["exit_code_by_key"][name]
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    seconds = float((dest / "seconds").read_text()) if (dest / "seconds").exists() else 0.0
    (dest / "seconds").write_text(f"{seconds + time.monotonic() - started:.1f}\n")
    return len(names)


def _natural(name: str) -> tuple[str, int]:
    base, _, n = name.rpartition("__mutmut_")
    return base, int(n) if n.isdigit() else 0


def report(results: list[ModuleResult], wall_s: float, threshold: float, equivalent: dict[str, str]) -> str:
    load = os.getloadavg()
    lines = [
        "# Mutation testing report (`./dev.sh mutate`, mutmut)",
        "",
        f"Wall time {wall_s / 60:.1f} min on {os.cpu_count()} CPUs (load average at the end "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}). Score = killed / (mutants - equivalent); "
        f"threshold {threshold:.0%}.",
        "",
        "| module | path | mutants | killed | timeout | survived | no tests | equivalent | score | time "
        "| not checked |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.name} | {r.path} | error | | | | | | | {r.seconds:.0f} s |")
            continue
        lines.append(f"| {r.name} | {r.path} | {r.total} | {len(r.killed)} | {len(r.timeout)} | {len(r.survived)} | "
                     f"{len(r.no_tests)} | {len(r.equivalent)} | {r.score:.1%} | {r.seconds:.0f} s | "
                     f"{len(r.unchecked) or ''} |")
    ok = [r for r in results if not r.error]
    total = sum(r.total for r in ok)
    detected = sum(r.detected for r in ok)
    countable = sum(r.countable for r in ok)
    lines.append(f"| **all** | | {total} | {sum(len(r.killed) for r in ok)} | {sum(len(r.timeout) for r in ok)} | "
                 f"{sum(len(r.survived) for r in ok)} | {sum(len(r.no_tests) for r in ok)} | "
                 f"{sum(len(r.equivalent) for r in ok)} | {detected / countable if countable else 1:.1%} | "
                 f"{wall_s:.0f} s | {sum(len(r.unchecked) for r in ok) or ''} |")
    for r in results:
        if r.error:
            lines += ["", f"## {r.name}: error", "", "```", r.error, "```"]
            continue
        if r.misses:
            lines += ["", f"## {r.name}: surviving mutants ({len(r.misses)})", ""]
            for name in r.misses:
                status = "no test calls it" if name in r.no_tests else "survived"
                lines += [f"- `{name}` ({status})", "", "```diff", r.diffs.get(name, ""), "```"]
        if r.equivalent:
            lines += ["", f"## {r.name}: equivalent (mutation/equivalent.md)", ""]
            lines += [f"- `{name}`: {equivalent[name]}" for name in r.equivalent]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    report_only = "--report" in argv  # the report again from the last run's results (e.g. after equivalent.md)
    survivors = "--survivors" in argv  # re-check only the last run's survivors against today's tests
    argv = [a for a in argv if a not in ("--report", "--survivors")]
    config = tomllib.loads((HERE / "modules.toml").read_text(encoding="utf-8"))
    modules = config["module"]
    names = {m["name"] for m in modules}
    unknown = [a for a in argv if a not in names]
    if unknown:
        print(f"mutate: unknown module(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}", file=sys.stderr)
        return 2
    # Without names: every module but the slow ones (``slow = true``), which run only when named.
    chosen = [m for m in modules if m["name"] in argv or (not argv and not m.get("slow"))]
    children = int(os.environ.get("KNOTD_MUTATE_JOBS") or os.cpu_count() or 2)
    equivalent = equivalents()
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = []
    if survivors:
        for module in chosen:
            print(f"==> re-checking the survivors of {module['path']} ({module['name']})", flush=True)
            print(f"    {recheck_survivors(module, children)} re-checked", flush=True)
        report_only = True
    for module in chosen:
        print(f"==> mutating {module['path']} ({module['name']}) with {', '.join(module['tests'])}", flush=True)
        r = run_module(module, children, equivalent, report_only=report_only)
        results.append(r)
        if r.error:
            print(f"    error: {r.error}", flush=True)
        else:
            print(f"    {r.total} mutants, {r.detected} killed, {len(r.misses)} surviving, "
                  f"{len(r.equivalent)} equivalent: {r.score:.1%} in {r.seconds:.0f} s", flush=True)
    wall = sum(r.seconds for r in results) if report_only else time.monotonic() - started
    text = report(results, wall, config["threshold"], equivalent)
    (WORK / "report.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"report: {WORK / 'report.md'}")
    failed = [r for r in results if r.error or r.score < config["threshold"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
