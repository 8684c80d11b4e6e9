#!/usr/bin/env python3
"""What the emulated [gpu] tests never ran, from gcc coverage data (tests/cuemu/coverage.sh).

    coverage_report.py BUILD_DIR [REPO_ROOT]

Runs gcov over mf_cuemu's objects in BUILD_DIR (built with --coverage, tests already run) and
prints, for each kernel file (kernels/*.cu, through the #line of the translated sources) and each
CUDA backend source:
  - lines run / lines with code;
  - every template instantiation that never ran (a dtype, vector width or head-dim variant no
    test reaches);
  - the never-run lines outside templates, less the error paths (throw, MF_CHECK, MF_FAIL).
A path listed here first runs on a real GPU; give it a [gpu] test case, or say why not.
"""
import os
import re
import subprocess
import sys
import tempfile

ERROR_LINE = re.compile(r"throw|MF_CHECK|MF_FAIL|Error|fail\(|FAIL|error")
LINE = re.compile(r"^\s*([0-9]+\*?|#####|=====|-):\s*(\d+):(.*)$")


def summarise(text):
    """(run, total, never-run instantiations, never-run plain lines) of one .gcov file."""
    section = None
    sections = {}
    plain = []
    run = total = 0
    for raw in text.split("\n"):
        if raw.startswith("------------------"):
            section = None
            continue
        if raw and not raw[0].isspace() and raw.endswith(":") and not LINE.match(raw):
            section = raw[:-1]
            sections.setdefault(section, [0, 0])
            continue
        m = LINE.match(raw)
        if not m:
            continue
        count, line, src = m.groups()
        never = count in ("#####", "=====")
        if section is not None:
            if count != "-":
                sections[section][0 if not never else 1] += 1
            continue
        if count == "-":
            continue
        total += 1
        run += not never
        if never and not ERROR_LINE.search(src):
            plain.append((int(line), src.strip()))
    unrun = [s for s, (r, u) in sections.items() if r == 0 and u > 0]
    return run, total, unrun, plain


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    build = os.path.abspath(sys.argv[1])
    root = os.path.abspath(sys.argv[2] if len(sys.argv) > 2 else
                           os.path.join(os.path.dirname(__file__), "..", ".."))
    objdir = os.path.join(build, "tests", "CMakeFiles", "mf_cuemu.dir")
    gcdas = []
    for d, _, files in os.walk(objdir):
        gcdas += [os.path.join(d, f) for f in files if f.endswith(".gcda")]
    if not gcdas:
        sys.exit("coverage_report: no .gcda files under %s: build with --coverage and run the "
                 "emulated tests first (tests/cuemu/coverage.sh)" % objdir)
    wanted = [os.path.join(root, "kernels"), os.path.join(root, "src", "backend", "cuda"),
              os.path.join(root, "src", "dist", "nccl_comm.cpp")]
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for g in sorted(gcdas):
            # One translation unit at a time: a header's .gcov would be overwritten by the next.
            subprocess.run(["gcov", "-m", "-p", "-o", os.path.dirname(g), g], cwd=tmp,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            for f in os.listdir(tmp):
                src = f[:-len(".gcov")].replace("#", "/")
                if (any(src.startswith(w) for w in wanted) and not src.endswith((".h", ".cuh"))
                        and src not in report):
                    with open(os.path.join(tmp, f), errors="replace") as fh:
                        report[src] = summarise(fh.read())
                os.remove(os.path.join(tmp, f))
    for src in sorted(report):
        run, total, unrun, plain = report[src]
        print("%s: %d of %d lines run" % (os.path.relpath(src, root), run, total))
        for s in unrun:
            print("  never ran: %s" % s)
        for line, text in plain:
            print("  %5d  %s" % (line, text[:100]))


if __name__ == "__main__":
    main()
