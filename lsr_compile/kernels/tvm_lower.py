"""Expression + config -> IRModule: apply a point of a ``schedules/`` space to a TVM PrimFunc (llvm by a
generic rule, cuda by dlight), ready for ``tvm.compile``. Shared by the in-process build (``tvm_kernels``)
and the ahead-of-time CUDA build (``tvm_cuda``)."""
from __future__ import annotations

import tvm
from tvm import s_tir

from .. import schedule_spaces
from ..config import FactorShapes
from ..expr import EXPRESSIONS, GENERIC


_SPATIAL, _REDUCE = 0, 2  # tirx.IterVar iter types


def _is_static(extent) -> bool:
    return isinstance(extent, tvm.tirx.IntImm)


def schedule_llvm(func, cfg: dict) -> s_tir.Schedule:
    """Every block: parallel over tokens (or the widest static axis), reductions outside one
    vectorised contiguous axis, auto-unroll. Knobs: ``vec``, ``rows``, ``unroll``."""
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    rows_of = {}
    for name, block in zip(names, blocks):
        if not name.endswith("_acc"):
            rows_of[name] = _schedule_block(sch, block, cfg)
    for name, block in zip(names, blocks):
        if name.endswith("_acc"):
            _schedule_acc(sch, block, rows_of.get(name[: -len("_acc")]), cfg)
    return sch


def _schedule_acc(sch, block, row_loop, cfg):
    """A per-row partial sum: computed inside the consumer's row loop, reduction outside the vector axis."""
    if row_loop is None:
        _schedule_block(sch, block, cfg)
        return
    sch.compute_at(block, row_loop)
    loops = sch.get_loops(block)
    row_stmt = sch.get(row_loop)
    own = loops[[i for i, lp in enumerate(loops) if sch.get(lp).same_as(row_stmt)][0] + 1:]
    ivs = list(sch.get(block).iter_vars)
    ivs = ivs[len(ivs) - len(own):]  # the row axis has extent 1 under the row loop and may be gone
    spatial = [lp for lp, iv in zip(own, ivs) if iv.iter_type == _SPATIAL]
    reduce = [lp for lp, iv in zip(own, ivs) if iv.iter_type == _REDUCE]
    if not spatial or not reduce:
        return
    inner = spatial[-1]
    vec = int(cfg.get("vec", 16))
    ext = sch.get(inner).extent
    if _is_static(ext) and ext.value % vec == 0 and ext.value >= vec:
        outer, v = sch.split(inner, [None, vec])
        sch.reorder(outer, *reduce, v)
        sch.vectorize(v)
    sch.decompose_reduction(block, reduce[0])


def _schedule_block(sch, block, cfg):
    """Returns the row loop (tokens handled by one parallel task), where per-row partials are computed."""
    vec, rows, unroll = int(cfg.get("vec", 16)), int(cfg.get("rows", 32)), int(cfg.get("unroll", 0))
    loops = sch.get_loops(block)
    ivs = sch.get(block).iter_vars
    if len(loops) != len(ivs):
        return None
    spatial = [lp for lp, iv in zip(loops, ivs) if iv.iter_type == _SPATIAL]
    reduce = [lp for lp, iv in zip(loops, ivs) if iv.iter_type == _REDUCE]
    if not spatial:
        return None
    # 1. vector lanes: the innermost spatial axis, when static, divisible and not the only axis
    vec_loop = None
    ext = sch.get(spatial[-1]).extent
    if len(spatial) > 1 and _is_static(ext) and ext.value >= vec and ext.value % vec == 0:
        spatial[-1], vec_loop = sch.split(spatial[-1], [None, vec])
    # 2. parallel tasks: ``rows`` tokens each, or the outermost spatial axis when there is no token axis
    row_loop = None
    token = next((i for i, lp in enumerate(spatial) if not _is_static(sch.get(lp).extent)), None)
    if token is not None:
        outer, row_loop = sch.split(spatial[token], [None, rows])
        spatial = [outer, row_loop] + spatial[:token] + spatial[token + 1:]
    # 3. reductions outside the lanes, so each lane accumulates in a register
    order = spatial + reduce + ([vec_loop] if vec_loop is not None else [])
    if len(order) > 1:
        sch.reorder(*order)
    sch.parallel(spatial[0])
    if vec_loop is not None:
        sch.vectorize(vec_loop)
    if unroll:
        sch.annotate(spatial[0], "pragma_auto_unroll_max_step", unroll)
        sch.annotate(spatial[0], "pragma_unroll_explicit", 1)
    if reduce:
        sch.decompose_reduction(block, reduce[0])
    return row_loop


def _initialised_before_reducing(func) -> tvm.IRModule:
    """The generic kernels, unscheduled, except that every sum is set to zero before its reduction loop: as
    written, TE initialises a sum inside the loop, at its first iteration, so a sum over zero tokens (the
    backward's ``dA = uᵀ x`` and ``dBᵀ = tᵀ dy`` for an empty batch) was never initialised and its factor
    gradients were whatever the workspace held."""
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        loops, ivs = sch.get_loops(block), sch.get(block).iter_vars
        reduce = [lp for lp, iv in zip(loops, ivs) if iv.iter_type == _REDUCE]
        if reduce and len(loops) == len(ivs):
            sch.decompose_reduction(block, reduce[0])
    return sch.mod


def schedule_cuda(func, cfg: dict) -> tvm.IRModule:
    """One thread per output element of every block: spatial loops fused and bound to
    (blockIdx.x, threadIdx.x), reductions sequential in the thread. Knobs: ``threads``, ``unroll``.

    dlight's default GPU rules were tried first and reject these functions (the
    lane-split reductions and the reductions over the symbolic token count).
    """
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    threads, unroll = int(cfg.get("threads", 128)), int(cfg.get("unroll", 0))
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(block)
        ivs = sch.get(block).iter_vars
        spatial = [lp for lp, iv in zip(loops, ivs) if iv.iter_type == _SPATIAL]
        fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        bx, tx = sch.split(fused, [None, threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        if unroll:
            sch.annotate(bx, "pragma_auto_unroll_max_step", unroll)
            sch.annotate(bx, "pragma_unroll_explicit", 1)
    return sch.mod


def lower(op: str, variant: str, config: dict, f: FactorShapes, dtype: str, target: dict):
    """Schedule the expression for ``target``; returns the IRModule to compile. An expression's ``*_io``
    input and its updated value are then bound to one buffer: the function takes that tensor once and
    updates it in place (never one tensor behind two ``__restrict__`` pointers)."""
    from tvm import te

    kind = target["kind"]
    if dtype not in schedule_spaces.dtypes(kind):
        raise ValueError(f"TVM {kind} kernels support {schedule_spaces.dtypes(kind)}, not {dtype}")
    generic = config.get("shapes") == "any"
    gkey = (op, bool(config.get("bias", True)))
    if generic and (variant != "materialise" or gkey not in GENERIC):
        raise ValueError(f"no generic TVM expression for {op}/{variant}")
    if not generic and (op, variant) not in EXPRESSIONS:
        raise ValueError(f"no TVM expression for {op}/{variant}; known: {sorted(EXPRESSIONS)}")
    expr = GENERIC[gkey] if generic else EXPRESSIONS[op, variant]
    func = te.create_prim_func(expr.build(f, dtype))
    if generic:  # serial, as written: a host-bound problem's kernel
        mod = _initialised_before_reducing(func)
    else:
        mod = schedule_llvm(func, config).mod if kind == "llvm" else schedule_cuda(func, config)
    main = mod["main"]
    params = dict(zip(expr.args, main.params))
    io = {params[name[:-3]]: params[name] for name in expr.args if name.endswith("_io")}
    return tvm.IRModule({"main": main.specialize(io)}) if io else mod
