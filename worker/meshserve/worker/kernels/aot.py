"""Compiles every kernel ahead of time for NVIDIA GPUs, without one: a lowering error shows here, not on a GPU node.

    python -m meshserve.worker.kernels.aot [--capabilities 80,90] [--quick]

--quick compiles one variant of each kernel per dtype instead of every shape a worker uses.

Needs triton and must run without TRITON_INTERPRET (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from meshserve.worker.kernels import triton_ops

CAPABILITIES = (80, 90)
WARP_SIZE = 32
DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


@dataclass(frozen=True)
class Variant:
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]

    @property
    def name(self) -> str:
        parts = [f"{k}={v}" for k, v in self.constexprs.items()]
        dtype = next(v for k, v in self.signature.items() if k.endswith("_ptr")).lstrip("*")
        return f"{self.kernel.fn.__name__}[{dtype},{','.join(parts)}]"


def _signature(kernel, pointer_dtypes: dict[str, str], floats: tuple[str, ...] = ()) -> dict[str, str]:
    """Pointers get their element type, named floats fp32, constexprs 'constexpr', the rest i32."""
    signature = {}
    for name in kernel.arg_names:
        if name in pointer_dtypes:
            signature[name] = "*" + pointer_dtypes[name]
        elif name in floats:
            signature[name] = "fp32"
        elif kernel.params[kernel.arg_names.index(name)].is_constexpr:
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
    return signature


def variants() -> list[Variant]:
    """The specialisations a GPU worker uses: each storage dtype, head dims 64/128, GQA groups 1/4/8, block 16."""
    out: list[Variant] = []
    for dtype in DTYPES.values():
        tensors = {name: dtype for name in ("q_ptr", "key_pool_ptr", "value_pool_ptr", "out_ptr")}
        for head_dim in (64, 128):
            for group in (1, 4, 8):
                kernel = triton_ops.decode_attention_kernel
                ptrs = tensors | {"tables_ptr": "i64", "lens_ptr": "i64"}
                constexprs = {"GROUP": group, "GROUP_PAD": max(group, 2), "BLOCK_SIZE": 16}
                constexprs |= {"HEAD_DIM": head_dim, "D_PAD": head_dim}
                out.append(Variant(kernel, _signature(kernel, ptrs, ("scale",)), constexprs))
            kernel = triton_ops.prefill_attention_kernel
            ptrs = tensors | {
                name: "i64" for name in ("rows_ptr", "out_rows_ptr", "lens_ptr", "starts_ptr", "tables_ptr")
            }
            constexprs = {"GROUP": 4, "BLOCK_M": triton_ops.PREFILL_BLOCK_M, "BLOCK_SIZE": 16}
            constexprs |= {"HEAD_DIM": head_dim, "D_PAD": head_dim}
            out.append(Variant(kernel, _signature(kernel, ptrs, ("scale",)), constexprs))
            kernel = triton_ops.write_kv_kernel
            ptrs = {"key_ptr": dtype, "value_ptr": dtype, "key_pool_ptr": dtype, "value_pool_ptr": dtype}
            ptrs |= {"slots_ptr": "i64"}
            out.append(Variant(kernel, _signature(kernel, ptrs), {"HEAD_DIM": head_dim, "D_PAD": head_dim}))
            kernel = triton_ops.rotary_kernel
            ptrs = {"x_ptr": dtype, "cos_ptr": dtype, "sin_ptr": dtype}
            out.append(Variant(kernel, _signature(kernel, ptrs), {"HALF": head_dim // 2, "HALF_PAD": head_dim // 2}))
        for hidden, residual in ((4096, True), (4096, False), (3000, True)):
            kernel = triton_ops.rms_norm_kernel
            ptrs = {name: dtype for name in ("x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "hidden_out_ptr")}
            constexprs = {"HIDDEN": hidden, "H_PAD": triton.next_power_of_2(hidden), "HAS_RESIDUAL": residual}
            out.append(Variant(kernel, _signature(kernel, ptrs, ("eps",)), constexprs))
    return out


def compile_variant(variant: Variant, capability: int):
    source = ASTSource(fn=variant.kernel, signature=variant.signature, constexprs=variant.constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, WARP_SIZE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capabilities", default=",".join(map(str, CAPABILITIES)))
    parser.add_argument("--quick", action="store_true", help="one variant per kernel and dtype")
    args = parser.parse_args()
    chosen = variants()
    if args.quick:
        firsts: dict[tuple[str, str], Variant] = {}
        for variant in chosen:
            firsts.setdefault((variant.kernel.fn.__name__, next(iter(variant.signature.values()))), variant)
        chosen = list(firsts.values())
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    failures = 0
    for capability in (int(c) for c in args.capabilities.split(",")):
        for variant in chosen:
            try:
                compiled = compile_variant(variant, capability)
            except Exception as exc:  # report every failing variant, not only the first
                failures += 1
                print(f"sm_{capability} {variant.name}: FAILED {type(exc).__name__}: {exc}")
                continue
            print(f"sm_{capability} {variant.name}: {len(compiled.asm['cubin'])} bytes of cubin")
    if failures:
        raise SystemExit(f"{failures} kernel variants failed to compile")


if __name__ == "__main__":
    main()
