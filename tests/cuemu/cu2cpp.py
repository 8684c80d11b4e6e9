#!/usr/bin/env python3
"""cuemu: rewrite one kernels/*.cu file into C++ that tests/cuemu/include's headers can compile.

    cu2cpp.py IN.cu OUT.cpp

Three rewrites, nothing else: launches `kernel<T><<<grid, block, smem, stream>>>(args)` become
`::cuemu::launch(::cuemu::Cfg(grid, block, smem, stream), "kernel<T>", kernel<T>, args)`; the dynamic
shared memory declaration `extern __shared__ __align__(16) T name[];` becomes a pointer to the
block's dynamic shared memory; and every static `__shared__` declaration (a `static` local in the
emulator) is followed, on the same line, by a one-time registration of each variable it declares,
so that the runtime can poison it before every block (a section attribute would miss the locals
of templates, which g++ places in their own comdat sections). A `#line` directive keeps compiler
messages pointing at IN.cu.
"""
import re
import sys

LAUNCH = re.compile(r"(\b[A-Za-z_]\w*(?:\s*<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
STATIC_SMEM = re.compile(r"\b__shared__\b([^;{}]*);")  # after DYN_SMEM: no `extern` left
DYN_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s*)?([\w\s]+?)\s+(\w+)\s*\[\s*\]\s*;")


def declared_names(decl):
    """The variable names of a declaration's declarators: `__align__(16) bf16 a[N], b` -> a, b."""
    decl = re.sub(r"__align__\(\s*\d+\s*\)", "", decl)
    decl = re.sub(r"\[[^\]]*\]", "", decl)  # array bounds
    names = []
    for part in decl.split(","):
        words = re.findall(r"[A-Za-z_]\w*", part)
        if words:
            names.append(words[-1])
    return names


def register_static(m):
    regs = "".join(" [[maybe_unused]] static const bool cuemu_reg_%s = ::cuemu::register_shared(&%s, sizeof(%s));"
                   % (n, n, n) for n in declared_names(m.group(1)))
    return "__shared__%s;%s" % (m.group(1), regs)


def convert(src):
    def launch(m):
        name = re.sub(r"\s+", "", m.group(1))
        return '::cuemu::launch(::cuemu::Cfg(%s), "%s", %s, ' % (m.group(2), name, m.group(1))
    out, n = LAUNCH.subn(launch, src)
    out = DYN_SMEM.sub(lambda m: "%s* %s = reinterpret_cast<%s*>(::cuemu::dynamic_smem());"
                       % (m.group(1), m.group(2), m.group(1)), out)
    out = STATIC_SMEM.sub(register_static, out)
    if "<<<" in out:
        raise SystemExit("cu2cpp: a launch was not rewritten (empty argument list?)")
    return out, n


def main():
    src_path, dst_path = sys.argv[1], sys.argv[2]
    with open(src_path) as f:
        src = f.read()
    out, _ = convert(src)
    with open(dst_path, "w") as f:
        f.write('#line 1 "%s"\n' % src_path + out)


if __name__ == "__main__":
    main()
