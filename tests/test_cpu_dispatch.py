"""Run-time instruction-set dispatch of the CPU kernels (longvila_engine/_extension.py, _cpu_isa.py).

- The loader takes the best built variant this CPU runs, judged here from /proc/cpuinfo, not from
  the loader's own feature query (which is checked against /proc/cpuinfo too).
- Every built variant this CPU runs, forced with LONGVILA_CPU_ISA in a subprocess, computes forward
  and backward within the tolerances of tests/test_backend_cpu.py and reports its isa/vector width.
- A LONGVILA_CPU_ISA that cannot be honoured raises a ValueError that says what is built, what this
  CPU runs and how to fix it, through backend='auto' too (no silent fallback to aten).
- The avx2 and base libraries hold no AVX-512 instruction and the avx512 one no AVX512-BF16
  instruction (objdump), so each runs on the CPUs its name promises.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from test_backend_cpu import TOL, _assert_flash_rule, _assert_lse_close, _cpu_flags, _qkv

from longvila_engine import _cpu_isa
from longvila_engine._extension import CpuIsaError, built_variants, choose_variant, require_extension, variant_features

F64, F32 = torch.float64, torch.float32
# Our feature names -> /proc/cpuinfo flag names where they differ (LZCNT is listed as abm).
_PROC_NAME = {"avx512bf16": "avx512_bf16", "lzcnt": "abm", "bmi": "bmi1"}


def _package_dir():
    require_extension()
    import longvila_engine._C as core

    return os.path.dirname(os.path.abspath(core.__file__))


def _proc_supports(feature):
    return _PROC_NAME.get(feature, feature) in _cpu_flags()


def _runnable_here(name, path):
    needs = variant_features(name, path)
    return needs is not None and all(_proc_supports(f) for f in needs)


def _run(script, env_update, *args, check=True):
    env = {k: v for k, v in os.environ.items() if k != "LONGVILA_CPU_ISA"}
    env.update(env_update)
    return subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=300, check=check)


_INFO = """
import json
from longvila_engine.ops import cpu
print(json.dumps(cpu.kernel_info()))
"""


@pytest.mark.skipif(not _cpu_flags(), reason="no /proc/cpuinfo flags to judge the CPU by")
def test_cpu_supports_agrees_with_proc_cpuinfo():
    require_extension()
    for feature in _cpu_isa.KNOWN_FEATURES:
        assert torch.ops.longvila_engine.cpu_supports(feature) == _proc_supports(feature), feature
    with pytest.raises(RuntimeError, match="unknown feature 'avx1024'"):
        torch.ops.longvila_engine.cpu_supports("avx1024")


@pytest.mark.skipif(not _cpu_flags(), reason="no /proc/cpuinfo flags to judge the CPU by")
def test_loader_takes_the_best_variant_this_cpu_runs():
    built = built_variants(_package_dir())
    expect = next(n for n, p in built.items() if _runnable_here(n, p))
    info = json.loads(_run(_INFO, {}).stdout)
    assert info["isa"] == expect, (info, list(built))
    if "avx512_bf16" in _cpu_flags() and "avx512bf16" in built and "native" not in built:
        assert info["isa"] == "avx512bf16" and info["bf16_dot"] == "1"


_VARIANT_RUN = """
import sys, torch
from longvila_engine import ops
from longvila_engine.ops import cpu
res = {"info": cpu.kernel_info()}
for key, (q, k, v, dout, causal) in torch.load(sys.argv[1]).items():
    out, lse = ops.block_attention(q, k, v, causal=causal, backend="cpu")
    grads = ops.block_attention_backward(dout, q, k, v, out, lse, causal=causal, backend="cpu")
    res[key] = (out, lse, grads)
torch.save(res, sys.argv[2])
"""


@pytest.mark.parametrize("variant", _cpu_isa.ORDER)
def test_each_variant_matches_float64(variant, tmp_path):
    built = built_variants(_package_dir())
    if variant not in built:
        pytest.skip(f"variant {variant} not built (LONGVILA_CPU_ISAS / LONGVILA_NATIVE at build time)")
    if not _runnable_here(variant, built[variant]):
        pytest.skip(f"this CPU lacks features variant {variant} needs")
    cases = {
        "f32_causal": (*_qkv(1, 150, 170, 4, 2, 64, F32, seed=1), True),
        "f32_full": (*_qkv(2, 77, 61, 3, 1, 24, F32, seed=2), False),
        "f64_causal": (*_qkv(1, 70, 90, 2, 2, 32, F64, seed=3), True),
        "bf16_causal": (*_qkv(1, 150, 170, 4, 2, 64, torch.bfloat16, seed=4), True),
    }
    torch.save(cases, tmp_path / "in.pt")
    _run(_VARIANT_RUN, {"LONGVILA_CPU_ISA": variant}, str(tmp_path / "in.pt"), str(tmp_path / "out.pt"))
    res = torch.load(tmp_path / "out.pt")
    info = res["info"]
    assert info["isa"] == variant
    wide = "avx512f" in variant_features(variant, built[variant])
    assert info["vector_bits"] == ("512" if wide else "256"), info
    has_bf16 = "avx512bf16" in variant_features(variant, built[variant])
    assert info["bf16_dot_built"] == ("1" if has_bf16 else "0"), info

    from longvila_engine import ops

    for key, (q, k, v, dout, causal) in cases.items():
        out, lse, grads = res[key]
        if q.dtype == torch.bfloat16:
            _assert_flash_rule(out, grads, (q, k, v, dout), causal, what=f"{variant} {key}")
            continue
        fwd_tol, bwd_tol = TOL[q.dtype]
        q64, k64, v64, do64 = (t.double() for t in (q, k, v, dout))
        out_r, lse_r = ops.block_attention(q64, k64, v64, causal=causal, backend="reference")
        torch.testing.assert_close(out.double(), out_r, atol=fwd_tol, rtol=0)
        _assert_lse_close(lse.double(), lse_r, fwd_tol)
        want = ops.block_attention_backward(do64, q64, k64, v64, out_r, lse_r, causal=causal, backend="reference")
        for name, a, b in zip(("dq", "dk", "dv"), grads, want):
            where = f"{variant} {key} {name}"
            torch.testing.assert_close(a.double(), b, atol=bwd_tol, rtol=0, msg=lambda m, w=where: f"{w}: {m}")


def test_choose_variant_rules():
    built = {"avx512bf16": "x", "avx512": "x", "avx2": "x", "base": "x"}
    avx2_cpu = set(_cpu_isa.FEATURES["avx2"]).__contains__
    assert choose_variant(built, avx2_cpu, None) == "avx2"
    assert choose_variant(built, lambda f: True, None) == "avx512bf16"
    assert choose_variant(built, lambda f: False, None) == "base"
    assert choose_variant(built, lambda f: True, "avx2") == "avx2"
    with pytest.raises(CpuIsaError, match=r"LONGVILA_CPU_ISA='avx512'.*lacks .*avx512f.*"
                       r"this CPU runs: \['avx2', 'base'\].*Fix: unset LONGVILA_CPU_ISA"):
        choose_variant(built, avx2_cpu, "avx512")
    with pytest.raises(CpuIsaError, match=r"'avx1024' is no CPU kernel variant.*Fix: unset"):
        choose_variant(built, avx2_cpu, "avx1024")
    with pytest.raises(CpuIsaError, match=r"'avx512': that variant was not built; built: \['avx2'\]"
                       r".*LONGVILA_CPU_ISAS=avx512,avx2 "):
        choose_variant({"avx2": "x"}, avx2_cpu, "avx512")
    with pytest.raises(RuntimeError, match="no CPU kernel library this CPU can run"):
        choose_variant({"avx512": "x"}, avx2_cpu, None)


_BAD = """
import torch
from longvila_engine import ops
from longvila_engine._extension import extension_available
for attempt in range(2):  # raised again on every call, never turned into "unavailable"
    try:
        ops.block_attention(torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8), causal=True)
    except ValueError as exc:
        print(type(exc).__name__, exc)
    else:
        print("NO ERROR")
try:
    extension_available()
except ValueError:
    print("extension_available raised")
"""


@pytest.mark.parametrize("value", ["avx1024", "native"])
def test_bad_override_raises_with_the_fix(value):
    built = built_variants(_package_dir())
    if value in built:
        pytest.skip(f"{value} is built here")
    text = _run(_BAD, {"LONGVILA_CPU_ISA": value}).stdout
    lines = text.splitlines()
    assert "NO ERROR" not in text and len(lines) == 3, text
    for line in lines[:2]:
        assert line.startswith(f"CpuIsaError LONGVILA_CPU_ISA={value!r}"), line
        assert f"built: {list(built)}" in line and "this CPU runs:" in line and "Fix: unset LONGVILA_CPU_ISA" in line
    assert lines[2] == "extension_available raised"


# AT&T syntax: any zmm register, any opmask register, xmm/ymm16-31 (EVEX-only), or an instruction
# that exists only with an EVEX encoding.
_AVX512_RE = re.compile(
    r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b|\b(vpternlog[dq]|vperm[it]2|vpro[lr]v?[dq]|vpmov[su]?[qdw][bdw]\b|"
    r"vrcp14|vrsqrt14|vscalef|vgetexp|vgetmant|vfixupimm|vrndscale|vrange|vreduce|vpcompress|vcompress|"
    r"vpexpand|vexpand|vpconflict|vplzcnt|valign[dq]|vblendm|vpblendm|vptestn?m|vpabsq|vp(max|min)[su]q|vpmullq|"
    r"vcvt\w*2u?qq|vcvtu|vpsraq|vextract[if](32x8|64x2|64x4)|vinsert[if](32x8|64x2|64x4)|vshuf[if](32x4|64x2)|"
    r"vdpbf16ps|vcvtne2?ps2bf16)")
_BF16_RE = re.compile(r"\b(vdpbf16ps|vcvtne2ps2bf16|vcvtneps2bf16)\b")


def _disassembly(path):
    if shutil.which("objdump") is None:
        pytest.skip("objdump not found (binutils): cannot check which instructions the libraries hold")
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                          check=True, timeout=120).stdout


def _hits(text, pattern):
    """Instruction lines matching `pattern`, symbol names (<...>) left out."""
    lines = (re.sub(r"<[^>]*>", "", line) for line in text.splitlines() if "\t" in line)
    return [line.strip() for line in lines if pattern.search(line)]


def test_disassembly_regex_recognises_avx512():
    # The check below is only as good as its pattern: these lines must match, and AVX2 ones must not.
    for line in ("\tvfmadd231ps %zmm1,%zmm2,%zmm3", "\tvmovups (%rax),%ymm0{%k1}", "\tkmovw %k1,%eax",
                 "\tvpternlogd $0xff,%ymm1,%ymm1,%ymm1", "\tvaddps %ymm17,%ymm1,%ymm2",
                 "\tvdpbf16ps %zmm1,%zmm2,%zmm3"):
        assert _AVX512_RE.search(line), line
    for line in ("\tvfmadd231ps %ymm1,%ymm2,%ymm3", "\tvpermps %ymm1,%ymm2,%ymm3", "\tkmovw_like_label"):
        assert not _AVX512_RE.search(line), line
    assert _BF16_RE.search("\tvcvtne2ps2bf16 %zmm1,%zmm2,%zmm3") and not _BF16_RE.search("\tvcvtps2ph $0,%ymm0,%xmm1")


@pytest.mark.parametrize("variant", ["avx2", "base"])
def test_portable_variants_hold_no_avx512(variant):
    built = built_variants(_package_dir())
    if variant not in built:
        pytest.skip(f"variant {variant} not built (LONGVILA_CPU_ISAS at build time)")
    hits = _hits(_disassembly(built[variant]), _AVX512_RE)
    assert not hits, f"{built[variant]} holds AVX-512 instructions, e.g. {hits[:5]}"


def test_avx512_variant_holds_no_bf16_dot():
    built = built_variants(_package_dir())
    if "avx512" not in built:
        pytest.skip("variant avx512 not built (LONGVILA_CPU_ISAS at build time)")
    text = _disassembly(built["avx512"])
    assert _hits(text, re.compile(r"%zmm")), "the avx512 library holds no 512-bit code at all"
    hits = _hits(text, _BF16_RE)
    assert not hits, f"the avx512 library holds AVX512-BF16 instructions, e.g. {hits[:5]}"


def test_core_library_is_baseline():
    # _C must load on any x86-64: no AVX (ymm) or AVX-512 code in it.
    import longvila_engine._C as core

    hits = _hits(_disassembly(core.__file__), re.compile(r"%[yz]mm|%k[0-7]\b"))
    assert not hits, f"_C holds AVX instructions, e.g. {hits[:5]}"
