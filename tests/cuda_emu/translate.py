"""Mechanical rewrite of CUDA sources for the CPU emulation (cuemu.h): kernel launches and
__shared__ declarations only; every other character is kept. Line numbers are kept too (a
multi-line launch becomes one line followed by its newlines) and each output starts with a #line
directive naming the original file, so compiler errors, barrier sites and error messages point at
csrc/cuda.

    K<<<grid, block[, smem[, stream]]>>>(args);
 -> ::cuemu::launch(__FILE__, __LINE__, <K's address if K names one function>,
                    [&] { K(args); }, grid, block[, smem[, stream]]);
    __shared__ T x[N];                    -> auto& x = *::cuemu::shared<T[N]>(__FILE__, __LINE__);
    extern __shared__ [__align__(n)] T x[];
                        -> T* const x = static_cast<T*>(::cuemu::dynamic_shared());
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

SUFFIXES = (".cu", ".cuh", ".h")

_EXTERN = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?"
                     r"([\w:<>, ]+?)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC = re.compile(r"__shared__\s+([\w:<>, ]+?)\s+(\w+)\s*((?:\[[^\]]+\])*)\s*;")
# A launch's kernel: a possibly qualified name with template arguments, right before <<<.
_KERNEL = re.compile(r"((?:::)?\w+(?:::\w+)*(?:<[^;{}()]*?>)?)\s*$")
_KEY = ("[&](auto tag_) -> const void* {{ if constexpr (requires {{ ::cuemu::key_of<decltype(tag_)>"
        "({k}); }}) return ::cuemu::key_of<decltype(tag_)>({k}); else return nullptr; }}(0)")


class TranslateError(ValueError):
    pass


def _close(text: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes the one at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_:
            depth += 1
        elif text[j] == close:
            depth -= 1
            if depth == 0:
                return j + 1
    raise TranslateError(f"unbalanced {open_!r} at offset {i}")


def _line(text: str, i: int) -> int:
    return text.count("\n", 0, i) + 1


def _launches(text: str, name: str) -> str:
    out, pos = [], 0
    while (at := text.find("<<<", pos)) >= 0:
        m = _KERNEL.search(text, pos, at)
        if m is None:
            raise TranslateError(f"{name}:{_line(text, at)}: no kernel name before <<<")
        end_cfg = text.find(">>>", at)
        paren = end_cfg + 3
        while paren < len(text) and text[paren].isspace():
            paren += 1
        if end_cfg < 0 or paren >= len(text) or text[paren] != "(":
            raise TranslateError(f"{name}:{_line(text, at)}: expected <<<...>>>(args)")
        end = _close(text, paren, "(", ")")
        segment = text[m.start(1):end]
        if "//" in segment or "/*" in segment:
            raise TranslateError(f"{name}:{_line(text, at)}: a comment inside a launch")
        kernel, cfg, args = m.group(1), text[at + 3:end_cfg], text[paren + 1:end - 1]
        call = (f"::cuemu::launch(__FILE__, __LINE__, {_KEY.format(k=kernel)}, "
                f"[&] {{ {kernel}({args}); }}, {cfg})")
        out += [text[pos:m.start(1)], " ".join(call.split("\n")), "\n" * segment.count("\n")]
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _shared(text: str, name: str) -> str:
    text = _EXTERN.sub(lambda m: f"{m[1]}* const {m[2]} = static_cast<{m[1]}*>"
                                 f"(::cuemu::dynamic_shared());", text)
    text = _STATIC.sub(lambda m: f"auto& {m[2]} = *::cuemu::shared<{m[1]}{m[3]}>"
                                 f"(__FILE__, __LINE__);", text)
    for i, line in enumerate(text.split("\n"), 1):
        if "__shared__" in line and not line.lstrip().startswith("//"):
            raise TranslateError(f"{name}:{i}: a __shared__ declaration the translator does not "
                                 f"know: {line.strip()}")
    return text


def translate(text: str, origin: str) -> str:
    out = _shared(_launches(text, origin), origin)
    assert out.count("\n") == text.count("\n"), "line numbers must be kept"
    return f'#line 1 "{origin}"\n{out}'


def translate_dir(src: Path, dst: Path) -> list[Path]:
    """Translates every CUDA source of src into dst (same names); returns the .cu files."""
    dst.mkdir(parents=True, exist_ok=True)
    units = []
    for f in sorted(src.iterdir()):
        if f.suffix in SUFFIXES:
            (dst / f.name).write_text(translate(f.read_text(), str(f)))
            if f.suffix == ".cu":
                units.append(dst / f.name)
    return units


if __name__ == "__main__":  # translate one file to stdout, to read what the compiler sees
    sys.stdout.write(translate(Path(sys.argv[1]).read_text(), sys.argv[1]))
