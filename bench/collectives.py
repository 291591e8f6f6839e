"""Every collective of a config's compiled train step, against FSDP's minimum (no GPU needed).

    python bench/collectives.py configs/sft_3b_8xh100.yaml [--set grad_accum=1 ...] [--top 25] [--json OUT]

Compiles the config's real step (`train.plan.step_and_args(config, sharded=True)`) for the config's mesh on
as many fake CPU devices (`--xla_force_host_platform_device_count`, set here before jax starts; a
`cudnn` attention backend is traced as `xla`), walks the optimised HLO (`compiled.as_text()`) and lists
every all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute with its shape, dtype and
bytes, grouped and summed, then prints FSDP's minimum and the ratio.

How collectives are counted, per optimizer step:
- HLO holds a `while` body (a `lax.scan`/`lax.map`: the layer stack, the micro-batch loop, the loss
  chunks) once. Each computation's executions are counted down the call graph from the entry: a while
  body runs its loop's trip count (`known_trip_count` in the while's backend config, else the constant
  its condition compares the counter with; unknown trip counts are reported), nested loops multiply, a
  conditional's branches and every other called computation run once per caller execution (the
  optimizer update's `cond` is counted as taken).
- Two sizes per collective. "array" bytes: the array the collective exchanges, whole (all-gather: its
  result; reduce-scatter: its input, result x group size; all-reduce, all-to-all, collective-permute:
  their result). "wire" bytes: what one device sends under ring algorithms, the cost that matters: a
  fraction (g-1)/g of the array for all-gather, reduce-scatter and all-to-all over a group of g, twice
  that for an all-reduce (a reduce-scatter and an all-gather), the whole array for a permute.

FSDP's minimum, per micro-batch (x the micro-batches of a step), from the parameters' own layout
(`sharding.DEFAULT_RULES`): every trainable parameter split over the batch axes (data, fsdp) is
all-gathered twice in the compute dtype (it is cast at use, so the cast shard is what moves): once
for the forward and once more for the backward (under remat the backward recomputes the layer's
forward with it, and the input gradients need it with or without remat), and its gradient is
reduce-scattered once in the parameter dtype; a trainable parameter not split over them (norm scales,
biases) has its gradient all-reduced; a frozen split parameter is gathered once (forward). Activation
collectives (tensor parallelism, the embedding lookup, re-layouts) are all above the minimum.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip

_COMP_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


# ----------------------------------------------------------------------------------------- HLO text


@dataclasses.dataclass(frozen=True)
class Instr:
    name: str
    opcode: str
    shape: str  # the result type's text
    operands: tuple[str, ...]
    line: str
    root: bool


def _instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    # The operand list: from the opcode's "(" to its matching ")".
    rest, depth, end = m.group(4), 1, 0
    while end < len(rest) and depth:
        depth += {"(": 1, ")": -1}.get(rest[end], 0)
        end += 1
    operands = tuple(re.findall(r"%([\w.\-]+)", rest[:end]))
    return Instr(m.group(1), m.group(3), m.group(2), operands, line, line.lstrip().startswith("ROOT"))


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str  # one of OPS
    arrays: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) of each result (tuple results: several)
    group: int  # devices in each replica group (1 for a permute)
    count: int  # executions per step (loop trip counts multiplied in)
    computation: str
    source: str  # the jax op it came from (metadata op_name; "transpose(" in it: the backward pass)
    # Per result of an all-reduce: read only through a slice of this device's share. XLA:GPU rewrites
    # that into a reduce-scatter (its ReduceScatterCreator pass); XLA:CPU, which has no such pass, keeps
    # the all-reduce and the slice, as do the partitioner's gradient reductions compiled here.
    sliced: tuple[bool, ...] = ()

    def _bytes(self, which=None) -> int:
        return sum(
            DTYPE_BYTES[dt] * math.prod(dims)
            for i, (dt, dims) in enumerate(self.arrays)
            if which is None or (i < len(self.sliced) and self.sliced[i]) == which
        )

    @property
    def result_bytes(self) -> int:
        return self._bytes()

    @property
    def array_bytes(self) -> int:
        """The array exchanged, whole (see the module docstring)."""
        return self.result_bytes * (self.group if self.op == "reduce-scatter" else 1)

    @property
    def wire_bytes(self) -> float:
        """Bytes one device sends, ring algorithms, as compiled."""
        g = self.group
        if self.op == "collective-permute":
            return float(self.array_bytes)
        share = (g - 1) / g if g > 1 else 0.0
        return self.array_bytes * share * (2 if self.op == "all-reduce" else 1)

    @property
    def sliced_bytes(self) -> int:
        """Array bytes of the results an all-reduce only hands on as a slice (a reduce-scatter on GPU)."""
        return self._bytes(True) if self.op == "all-reduce" else 0

    @property
    def wire_bytes_gpu(self) -> float:
        """`wire_bytes` with the sliced results of an all-reduce counted as the reduce-scatter they become."""
        g = self.group
        return self.wire_bytes - (self.sliced_bytes * (g - 1) / g if g > 1 else 0.0)

    @property
    def shape(self) -> str:
        return ", ".join(f"{dt}[{','.join(map(str, dims))}]" for dt, dims in self.arrays)

    @property
    def backward(self) -> bool:
        return "transpose(" in self.source


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
    """`{name: instruction lines}` of an HLO module's text and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = _COMP_HEADER.match(line)
            if m and not line.startswith(("HloModule", " ")):
                current = m.group(1)
                comps[current] = []
                if line.startswith("ENTRY"):
                    entry = current
        elif line.strip() == "}":
            current = None
        else:
            comps[current].append(line)
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _trip_count(line: str, comps: dict[str, list[str]], condition: str | None) -> int | None:
    m = _TRIP.search(line)
    if m:
        return int(m.group(1))
    # Fallback: `counter < N` with N a constant of the condition computation.
    consts = [int(c) for cl in comps.get(condition or "", []) for c in re.findall(r"constant\((\d+)\)", cl)]
    return consts[0] if len(consts) == 1 else None


def execution_counts(comps: dict[str, list[str]], entry: str) -> tuple[dict[str, int], list[str]]:
    """How often each computation runs per execution of the entry, and the whiles of unknown trip count
    (counted once)."""
    edges: dict[str, list[tuple[str, int]]] = defaultdict(list)
    unknown = []
    for name, lines in comps.items():
        for line in lines:
            callees = dict((k, v) for k, v in _CALLEE.findall(line))
            trip = 1
            if " while(" in line:
                t = _trip_count(line, comps, callees.get("condition"))
                if t is None:
                    unknown.append(line.split("=", 1)[0].strip())
                    t = 1
                trip = t
            for key, callee in callees.items():
                edges[name].append((callee, trip if key == "body" else 1))
            for branches in _BRANCHES.findall(line):
                edges[name] += [(b.strip().lstrip("%"), 1) for b in branches.split(",") if b.strip()]
    counts: dict[str, int] = defaultdict(int)
    counts[entry] = 1
    order, seen = [], set()

    def visit(n):  # reverse post-order: callers before callees
        if n in seen:
            return
        seen.add(n)
        for c, _ in edges.get(n, ()):
            visit(c)
        order.append(n)

    visit(entry)
    for n in reversed(order):
        for callee, mult in edges.get(n, ()):
            counts[callee] += counts[n] * mult
    return dict(counts), unknown


def _group_size(line: str, num_devices: int) -> int:
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        return math.prod(sizes[a] for a in re.findall(r"'([^']+)'", m.group(2)))
    return num_devices  # `replica_groups={}`: one group of every device


def _source(line: str) -> str:
    m = re.search(r'op_name="([^"]*)"', line)
    if not m:
        return ""
    return m.group(1).replace("/while/body/closed_call", "/scan").replace("jit(fn)/", "")


# Ops that pass a value on unchanged in content (the CPU's bf16 emulation adds convert pairs).
_PASS_THROUGH = ("get-tuple-element", "convert", "bitcast", "copy", "reshape", "transpose", "bitcast-convert")


class _Module:
    """Instructions and users of an HLO module, to follow where a value goes."""

    def __init__(self, comps: dict[str, list[str]]):
        self.instrs: dict[str, dict[str, Instr]] = {}
        self.users: dict[str, dict[str, list[Instr]]] = {}
        for comp, lines in comps.items():
            instrs = {i.name: i for i in map(_instr, lines) if i is not None}
            users: dict[str, list[Instr]] = defaultdict(list)
            for i in instrs.values():
                for o in dict.fromkeys(i.operands):
                    users[o].append(i)
            self.instrs[comp], self.users[comp] = instrs, users
        # The computation that calls each fused computation, and through which instruction.
        self.fusion_of: dict[str, tuple[str, Instr]] = {}
        for comp, instrs in self.instrs.items():
            for i in instrs.values():
                m = re.search(r"\bcalls=%?([\w.\-]+)", i.line)
                if i.opcode == "fusion" and m:
                    self.fusion_of[m.group(1)] = (comp, i)

    def only_sliced(self, comp: str, name: str, depth: int = 0) -> bool:
        """True when every use of value `name` ends, through content-preserving ops and fusions, in a
        dynamic-slice of it (the partitioner taking this device's share)."""
        users = self.users[comp].get(name, [])
        instr = self.instrs[comp].get(name)
        leaves_fusion = instr is not None and instr.root and comp in self.fusion_of
        if depth > 40 or (not users and not leaves_fusion):
            return False
        if leaves_fusion:  # the fusion's result: follow the fusion's own uses
            outer, fusion = self.fusion_of[comp]
            if not self.only_sliced(outer, fusion.name, depth + 1):
                return False
        for u in users:
            if u.opcode == "dynamic-slice" and u.operands[0] == name:
                continue
            if u.opcode in _PASS_THROUGH:
                if not self.only_sliced(comp, u.name, depth + 1):
                    return False
            elif u.opcode == "fusion":
                fused = re.search(r"\bcalls=%?([\w.\-]+)", u.line).group(1)
                params = {
                    int(re.search(r"parameter\((\d+)\)", i.line).group(1)): i.name
                    for i in self.instrs[fused].values()
                    if i.opcode == "parameter"
                }
                for k, o in enumerate(u.operands):
                    if o == name and not self.only_sliced(fused, params[k], depth + 1):
                        return False
            else:
                return False
        return True

    def sliced_results(self, comp: str, instr: Instr, n: int) -> tuple[bool, ...]:
        if n == 1 and not instr.shape.startswith("("):
            return (self.only_sliced(comp, instr.name),)
        out = [False] * n
        users = self.users[comp].get(instr.name, [])
        for k in range(n):
            gtes = [u for u in users if u.opcode == "get-tuple-element" and f"index={k}," in u.line + ","]
            out[k] = bool(gtes) and all(self.only_sliced(comp, u.name) for u in gtes)
        if any(u.opcode != "get-tuple-element" for u in users):
            out = [False] * n
        return tuple(out)


def collectives(text: str, num_devices: int) -> tuple[list[Collective], list[str]]:
    """Every collective of an optimised HLO module with its executions per run of the entry, and the
    whiles whose trip count is unknown."""
    comps, entry = _computations(text)
    counts, unknown = execution_counts(comps, entry)
    module = _Module(comps)
    out = []
    for name, instrs in module.instrs.items():
        for i in instrs.values():
            op = i.opcode.removesuffix("-start")
            if op not in OPS:
                continue
            arrays = tuple(
                (dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(i.shape)
            )
            if i.opcode.endswith("-start") and op != "all-reduce":
                arrays = arrays[len(arrays) // 2 :]  # (operands, results) of an async start: the results
            group = 1 if op == "collective-permute" else _group_size(i.line, num_devices)
            sliced = module.sliced_results(name, i, len(arrays)) if op == "all-reduce" else ()
            out.append(Collective(op, arrays, group, counts.get(name, 0), name, _source(i.line), sliced))
    return out, unknown


# ------------------------------------------------------------------------------------------ minimum


def fsdp_minimum(
    setup, mesh_sizes: dict[str, int], micro_batches: int, lora: bool, gather_bytes: int
) -> list[dict]:
    """FSDP's minimum collectives per step (module docstring): `[{term, op, array, wire}]`; gathers move
    `gather_bytes` per element."""
    import jax
    import numpy as np

    from qwenvl_jax import sharding as shd
    from qwenvl_jax.train.lora import leaf_logical_axes
    from qwenvl_jax.train.optim import map_with_path

    rules = shd.as_rules(shd.DEFAULT_RULES)
    batch_axes = set(rules.mesh_axes("batch"))
    g_batch = math.prod(mesh_sizes[a] for a in batch_axes)
    mesh = jax.sharding.AbstractMesh(
        tuple(mesh_sizes.values()),
        tuple(mesh_sizes),
        axis_types=(jax.sharding.AxisType.Auto,) * len(mesh_sizes),
    )
    terms: dict[str, dict] = {}

    def add(term, op, array, group):
        share = (group - 1) / group if group > 1 else 0.0
        t = terms.setdefault(term, {"term": term, "op": op, "array": 0.0, "wire": 0.0})
        t["array"] += array
        t["wire"] += array * share * (2 if op == "all-reduce" else 1)

    def visit(trainable):
        def one(path, x):
            axes = leaf_logical_axes(path, setup.logical_axes, lora=lora and trainable)
            spec = rules.spec(axes, x.shape, mesh)
            used = [a for e in spec if e for a in ((e,) if isinstance(e, str) else e)]
            g = math.prod(mesh_sizes[a] for a in used if a in batch_axes)
            other = math.prod(mesh_sizes[a] for a in used if a not in batch_axes)
            elems = math.prod(x.shape) / other  # the array one tensor-parallel group holds
            grad_bytes = np.dtype(x.dtype).itemsize
            if g > 1 and trainable:
                add("param all-gather, fwd + bwd", "all-gather", 2 * micro_batches * elems * gather_bytes, g)
                add("grad reduce-scatter", "reduce-scatter", micro_batches * elems * grad_bytes, g)
            elif g > 1:
                add("frozen param all-gather, fwd", "all-gather", micro_batches * elems * gather_bytes, g)
            elif trainable and g_batch > 1:
                add(
                    "grad all-reduce (params FSDP leaves whole)",
                    "all-reduce",
                    micro_batches * elems * grad_bytes,
                    g_batch,
                )

        return one

    map_with_path(visit(True), setup.state.params)
    map_with_path(visit(False), setup.frozen)
    return list(terms.values())


# ------------------------------------------------------------------------------------------ report


def _gb(x: float) -> str:
    return f"{x / 1e9:9.3f} GB"


def report(colls: list[Collective], minimum: list[dict], top: int) -> dict:
    groups: dict[tuple, dict] = {}
    for c in colls:
        key = (c.op, c.shape, c.group, "bwd" if c.backward else "fwd")
        g = groups.setdefault(key, {"op": c.op, "shape": c.shape, "group": c.group, "pass": key[3],
                                    "instructions": 0, "executions": 0, "array_each": c.array_bytes,
                                    "array": 0, "sliced": 0, "wire": 0.0, "wire_gpu": 0.0,
                                    "source": c.source})  # fmt: skip
        g["instructions"] += 1
        g["executions"] += c.count
        g["array"] += c.array_bytes * c.count
        g["sliced"] += c.sliced_bytes * c.count
        g["wire"] += c.wire_bytes * c.count
        g["wire_gpu"] += c.wire_bytes_gpu * c.count
    rows = sorted(groups.values(), key=lambda g: -g["wire"])
    print(f"{len(colls)} collective instructions, {len(rows)} distinct (op, shape, group, pass); per step, the "
          f"{min(top, len(rows))} largest by wire bytes (* = all-reduce read only as this device's slice, "
          "a reduce-scatter on GPU):")  # fmt: skip
    print(f"  {'op':<19} {'pass':<4} {'g':>2} {'instr':>5} {'runs':>5} {'array each':>13} {'array total':>13} "
          f"{'wire total':>13}  shape  [source]")  # fmt: skip
    for g in rows[:top]:
        op = g["op"] + ("*" if g["sliced"] else "")
        print(f"  {op:<19} {g['pass']:<4} {g['group']:>2} {g['instructions']:>5} {g['executions']:>5} "
              f"{_gb(g['array_each'])} {_gb(g['array'])} {_gb(g['wire'])}  {g['shape'][:56]}  "
              f"[{g['source'][-56:]}]")  # fmt: skip
    by_op: dict[str, dict] = {}
    for g in rows:
        t = by_op.setdefault(
            g["op"], {"executions": 0, "array": 0, "sliced": 0, "wire": 0.0, "wire_gpu": 0.0}
        )
        for k in t:
            t[k] += g[k]
    print("per op, per step:")
    for op, t in sorted(by_op.items(), key=lambda kv: -kv[1]["wire"]):
        extra = f"  (of which sliced {_gb(t['sliced']).strip()})" if t["sliced"] else ""
        print(f"  {op:<19} runs {t['executions']:>5}  array {_gb(t['array'])}  wire {_gb(t['wire'])}{extra}")
    total = {k: sum(t[k] for t in by_op.values()) for k in ("array", "wire", "wire_gpu")}
    print(f"  {'total':<19} {'':>10}  array {_gb(total['array'])}  wire {_gb(total['wire'])}; with the sliced "
          f"all-reduces as reduce-scatters (GPU) wire {_gb(total['wire_gpu']).strip()}")  # fmt: skip
    largest = max(colls, key=lambda c: max((DTYPE_BYTES[dt] * math.prod(d) for dt, d in c.arrays), default=0),
                  default=None)  # fmt: skip
    if largest is not None:
        dt, dims = max(largest.arrays, key=lambda a: DTYPE_BYTES[a[0]] * math.prod(a[1]))
        print(f"largest array in one collective: {largest.op} {dt}[{','.join(map(str, dims))}] "
              f"({DTYPE_BYTES[dt] * math.prod(dims) / 1e9:.3f} GB, {largest.count} runs/step) [{largest.source}]")  # fmt: skip
    print("FSDP minimum per step:")
    for t in minimum:
        print(f"  {t['term']:<44} array {_gb(t['array'])}  wire {_gb(t['wire'])}")
    min_total = {k: sum(t[k] for t in minimum) for k in ("array", "wire")}
    print(f"  {'total':<44} array {_gb(min_total['array'])}  wire {_gb(min_total['wire'])}")

    def ratio(a, b):
        return a / b if b else float("inf")

    ratios = {
        "wire": ratio(total["wire"], min_total["wire"]),
        "wire_gpu": ratio(total["wire_gpu"], min_total["wire"]),
        "array": ratio(total["array"], min_total["array"]),
    }
    print(f"ratio to the minimum: wire {ratios['wire']:.2f} as compiled, {ratios['wire_gpu']:.2f} with the "
          f"sliced all-reduces as reduce-scatters; array {ratios['array']:.2f}")  # fmt: skip
    return {
        "groups": rows,
        "by_op": by_op,
        "total": total,
        "largest": None
        if largest is None
        else {"op": largest.op, "arrays": largest.arrays, "runs": largest.count, "source": largest.source},
        "minimum": minimum,
        "minimum_total": min_total,
        "ratios": ratios,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a run config (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--top", type=int, default=25, help="rows of the grouped table")
    parser.add_argument("--json", help="write the figures here as JSON")
    parser.add_argument("--hlo", help="write the optimised HLO text here")
    parser.add_argument("--flops", action="store_true", help="also per-device FLOPs against one device's / N")
    args = parser.parse_args(argv)

    from qwenvl_jax.train.config import load_config  # imports jax, but starts no backend

    config = load_config(args.config, args.overrides)
    from qwenvl_jax.train.plan import mesh_shape

    sizes = mesh_shape(config)
    devices = math.prod(sizes.values())
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    import time

    import jax

    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
    from qwenvl_jax.train.plan import _traceable, step_and_args

    if len(jax.devices()) < devices:
        raise SystemExit(f"the mesh {sizes} needs {devices} devices, jax has {len(jax.devices())}")
    t0 = time.perf_counter()
    setup, step, step_args = step_and_args(_traceable(config), sharded=True)
    compiled = step.lower(*step_args).compile()
    seconds = time.perf_counter() - t0
    text = compiled.as_text()
    if args.hlo:
        Path(args.hlo).write_text(text, encoding="utf-8")
    micro_batches = int(jax.tree.leaves(step_args[2])[0].shape[0])
    mem = compiled.memory_analysis()
    print(f"{args.config} {' '.join(args.overrides)}: mesh {sizes}, {micro_batches} micro-batch(es) per step, "
          f"compiled in {seconds:.0f} s; XLA temp {mem.temp_size_in_bytes / 2**30:.2f} GiB per device")  # fmt: skip
    colls, unknown = collectives(text, devices)
    if unknown:
        print(f"WARNING: whiles of unknown trip count, counted once: {unknown}")
    import numpy as np

    gather_bytes = np.dtype(setup.model_cfg.dtype).itemsize
    if jax.default_backend() == "cpu" and gather_bytes < 4:
        # XLA:CPU computes bf16 dots in fp32 and hoists the upcast of a weight above its all-gather, so
        # this program gathers fp32 weights (the GPU one gathers the cast bf16 shard): count them so.
        gather_bytes = 4
        print("minimum: weights gathered in float32, as XLA:CPU does for its fp32 dots (bf16 on GPU)")
    minimum = fsdp_minimum(setup, sizes, micro_batches, setup.lora_cfg is not None, gather_bytes)
    out = report(colls, minimum, args.top)
    out.update(config=args.config, overrides=args.overrides, mesh=sizes, micro_batches=micro_batches,
               compile_seconds=seconds, temp_bytes=int(mem.temp_size_in_bytes), unknown_trip_counts=unknown)  # fmt: skip
    if args.flops:
        out["flops"] = per_device_flops(_traceable(config), devices)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str), encoding="utf-8")
    return 0


def per_device_flops(config: dict, devices: int) -> dict:
    """XLA's FLOPs of the step on one device of the config's mesh against the same step on one device
    divided by the mesh size: 1.0 when nothing is computed twice. XLA counts a scan body once, so both are
    compiled with the layers unrolled at depths (1, 1), (2, 1), (1, 2) (text layers, vision blocks) and
    extrapolated to the preset's depths as `compute_at_scale.py lora` does."""
    from compute_at_scale import model_at_depth

    from qwenvl_jax.train.plan import model_config, step_and_args

    preset_cfg, _ = model_config(config)
    preset = (config.get("model") or {}).get("preset")
    remat = preset_cfg.remat

    def flops(text_layers, vision_blocks, sharded):
        _, cfg = model_at_depth(preset, text_layers, vision_blocks, remat=remat)
        _, step, args = step_and_args(config, sharded=sharded, model_cfg=cfg)
        cost = step.lower(*args).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    out = {}
    for name, sharded in (("per_device", True), ("one_device", False)):
        f11, f21, f12 = flops(1, 1, sharded), flops(2, 1, sharded), flops(1, 2, sharded)
        ft, fv = f21 - f11, f12 - f11
        c = f11 - ft - fv
        total = c + preset_cfg.text.num_hidden_layers * ft + preset_cfg.vision.depth * fv
        out[name] = {"constant": c, "per_text_layer": ft, "per_vision_block": fv, "total": total}
    one, per = out["one_device"], out["per_device"]
    out["ratio"] = per["total"] / (one["total"] / devices)
    print(f"FLOPs per device {per['total'] / 1e12:.2f} T against one device's {one['total'] / 1e12:.2f} T / "
          f"{devices} = {one['total'] / devices / 1e12:.2f} T: {out['ratio']:.3f}x (goal: at most 1.15x); per "
          f"text layer {per['per_text_layer'] / one['per_text_layer'] * devices:.3f}x, per vision block "
          f"{per['per_vision_block'] / one['per_vision_block'] * devices:.3f}x, rest "
          f"{per['constant'] / one['constant'] * devices:.3f}x")  # fmt: skip
    return out


if __name__ == "__main__":
    raise SystemExit(main())
