"""Benchmark: capture, analysis and the width pass on GPT-2-base (124M), against a dense-matrix
implementation of the same mapping (the approach of the paper's reference code), side by side.

Each measurement runs in its own subprocess (so peak-memory readings do not mix) and is
repeated; the table reports medians. Peak memory is the resident-set high-water mark during the
measured step minus the resident set just before it (Linux ``/proc/self/clear_refs``).

    python tools/bench_transform.py --repeats 3          # the width pass against dense matrices
    python tools/bench_transform.py --whole --repeats 3  # `vcyclefx coalesce` against the reference
    python tools/bench_transform.py --big --repeats 3    # streaming a 2.4 GB sharded bf16 Llama
    python tools/bench_transform.py --big --vocab 256000 --layers 4 --baseline TREE
                                            # the same size, most of it embedding and LM head
    python tools/bench_transform.py --level-io --baseline TREE   # level directories in memory

``--big`` also runs a compute floor (``add-floor``): every tensor of the checkpoint memory-mapped
and one bf16 ``add`` of its halves, the least arithmetic that reads every element once.

``--whole`` runs `vcyclefx coalesce` with an empty capture cache (a first run: it captures and
writes the cache entry), with the capture cached (every later run on a checkpoint of that config),
and with the cache off; also a floor process: the imports, ``from_pretrained`` and the one
symbolic export that a coalesce built on torch.export needs when it captures, and nothing else,
and an imports-only process (torch and transformers' GPT-2 class). Every other mode runs with
the capture cache off (``VCYCLEFX_CAPTURE_CACHE=off``) unless a row says otherwise.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB; 0 if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _measure_step(fn):
    import gc

    gc.collect()
    before = _status_kib("VmRSS")
    _reset_peak()
    t = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t
    return result, seconds, max(0, _status_kib("VmHWM") - before) * 1024


def dense_width(analysis, plan):
    """The same coalescing, done the reference-code way: one dense (new x old) matrix per
    resized tensor axis, applied with a matrix product."""
    import torch

    from passes.width import COALESCE
    from vcyclefx.analysis.analyze import PRODUCER
    from vcyclefx.analysis.dims import CAT, PROD, Dim, layout_size

    by_root = {analysis.space(sm.key).root.id: sm for sm in plan.spaces}

    def leaf_matrix(sm, producer):
        m = torch.zeros(sm.small, sm.large)
        m[torch.tensor(sm.index), torch.arange(sm.large)] = 1.0
        if producer:
            m = m / m.sum(dim=1, keepdim=True)
        return m

    def axis_matrix(layout, producer):
        if isinstance(layout, Dim):
            sm = by_root.get(layout.id)
            n = int(layout.size)
            return leaf_matrix(sm, producer) if sm is not None else torch.eye(n)
        kind, kids = layout
        mats = [axis_matrix(k, producer) for k in kids]
        if kind == PROD:
            out = mats[0]
            for m in mats[1:]:
                out = torch.kron(out, m)
            return out
        return torch.block_diag(*mats)

    out = {}
    for name, st in analysis.tensors.items():
        t = analysis.gm.get_parameter(name) if name in dict(analysis.gm.named_parameters(remove_duplicate=False)) else None
        if t is None:
            continue
        w = t.detach()
        changed = False
        for ax, d in enumerate(st.dims):
            layout = analysis.table.layout(d)
            leaves = [x.id for x in analysis.table.leaves(d)]
            if not any(i in by_root for i in leaves):
                continue
            producer = PRODUCER in analysis.roles.get((name, ax), set())
            m = axis_matrix(layout, producer)
            w = torch.tensordot(m, w.movedim(ax, 0), dims=1).movedim(0, ax)
            changed = True
        if changed:
            out[name] = w
    # the tied-tensor compensation the width pass applies (a power-of-two factor folded into a
    # norm), so that both implementations produce the same level
    from passes.units import Units
    from passes.width import _compensations

    units = {rid: Units(sm) for rid, sm in by_root.items()}
    for comp in _compensations(analysis, units):
        for name in comp.fold:
            base = out.get(name, analysis.gm.get_parameter(name).detach())
            out[name] = base * comp.factor
    del COALESCE, CAT, layout_size
    return out


def child(what: str) -> dict:
    import torch

    torch.set_num_threads(2)
    from vcyclefx.zoo import gpt2_base_real

    import vcyclefx as vf
    from passes.width import COALESCE, WidthPlan, width_pass
    from vcyclefx.analysis.analyze import analyze
    from vcyclefx.plan.width import plan_width

    model, example = gpt2_base_real()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    level, capture_s, _ = _measure_step(lambda: vf.capture(model, example))
    analysis, analysis_s, _ = _measure_step(lambda: analyze(level, chains=False))
    plan = WidthPlan(COALESCE, tuple(plan_width(analysis, 0.5, coalesce=True).spaces))
    res = {"param_bytes": param_bytes, "capture_s": capture_s, "analysis_s": analysis_s}
    if what == "sparse":
        result, s, peak = _measure_step(lambda: width_pass(level, analysis, plan))
        res.update(seconds=s, peak_bytes=peak,
                   params_after=sum(p.numel() for p in result.module.parameters()))
    else:
        result, s, peak = _measure_step(lambda: dense_width(analysis, plan))
        sparse = width_pass(level, analysis, plan).module
        sp = dict(sparse.named_parameters(remove_duplicate=False))
        err = max(float((result[k] - sp[k]).abs().max()) for k in result)
        res.update(seconds=s, peak_bytes=peak, max_abs_diff_vs_sparse=err)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--whole", action="store_true",
                    help="time the whole `vcyclefx coalesce` of a GPT-2 base checkpoint against "
                         "the reference procedure, process against process, and its steps")
    ap.add_argument("--checkpoint", help="with --whole: a GPT-2 base Hugging Face directory "
                    "(default: one with random weights, made in a temporary directory)")
    ap.add_argument("--baseline", metavar="TREE", help="with --whole (--big): also run `vcyclefx "
                    "coalesce` (with the capture cached) from this checkout (an earlier commit) "
                    "in the same alternation")
    ap.add_argument("--big", action="store_true",
                    help="coalesce and decoalesce a synthetic sharded bf16 Llama (2.4 GB, made "
                         "and deleted by the benchmark) against from_pretrained and cat")
    ap.add_argument("--shard", default="300MB", help="with --big: shard size of the checkpoint")
    ap.add_argument("--vocab", type=int, default=BIG["vocab_size"],
                    help="with --big / --make-big: vocabulary of the synthetic Llama (256000 and "
                         "--layers 4: a checkpoint of the same size whose embedding and LM head "
                         "are most of it)")
    ap.add_argument("--layers", type=int, default=24, help="with --big: decoder layers of the "
                    "checkpoint (24: 2.43 GB, 40: 3.87 GB)")
    ap.add_argument("--widths", choices=sorted(WIDTHS), default="1b",
                    help="with --big / --make-big: the synthetic Llama's widths: 1b (hidden 2048, "
                         "FFN 5632, TinyLlama's), 7b (hidden 4096, FFN 14336, 32 heads, 8 "
                         "key/value heads: Mistral-7B's, a checkpoint's largest tensors at a 7B "
                         "model's size; --layers 4: 2.27 GB)")
    ap.add_argument("--where", default=None, help="with --big: folder for the checkpoint")
    ap.add_argument("--cold", action="store_true", help="with --big: drop each command's input "
                    "from the page cache before it runs (a checkpoint larger than memory is "
                    "always read from the disk)")
    ap.add_argument("--streaming-ab", metavar="TREE", help="time the streaming phase of "
                    "coalesce on the synthetic Llama (--checkpoint, or one made here) and measure "
                    "the process's peak RSS, this checkout against TREE (another checkout), "
                    "cold and warm, the capture cached")
    ap.add_argument("--level-io", action="store_true",
                    help="in memory (the default for a checkpoint this small): `vcyclefx "
                         "coalesce` of a GPT-2 base checkpoint (--checkpoint), `decoalesce` of "
                         "its level and `load_level` of it, each a whole process, against "
                         "--baseline TREE in the same alternation; and the level directories' sizes")
    ap.add_argument("--grow-hf", action="store_true",
                    help="`vcyclefx decoalesce LEVEL --format hf --stream always` of the streamed "
                         "width 0.5 / depth 0.5 level of the synthetic Llama (--checkpoint, or one "
                         "made in --where) back to its Hugging Face class, against --baseline TREE "
                         "in the same alternation")
    ap.add_argument("--load-level", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--make-big", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--load-only", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--add-floor", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["sparse", "dense"], help=argparse.SUPPRESS)
    ap.add_argument("--reference", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--split", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--make-checkpoint", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--floor", metavar="SRC", help=argparse.SUPPRESS)
    ap.add_argument("--imports", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ["VCYCLEFX_CAPTURE_CACHE"] = "off"  # every child, but the rows that say otherwise
    if args.child:
        print(json.dumps(child(args.child)))
        return
    if args.reference:
        reference_coalesce(*args.reference)
        return
    if args.split:
        print(json.dumps(split_child(*args.split)))
        return
    modes = [  # (given, what it runs): the first one given runs
        (args.floor, lambda: floor_process(args.floor, args.imports)),
        (args.make_big, lambda: make_big(args.make_big, args.shard, args.layers, args.vocab,
                                         args.widths)),
        (args.load_only, lambda: load_only(args.load_only)),
        (args.add_floor, lambda: add_floor(args.add_floor)),
        (args.big, lambda: big_checkpoint(args.repeats, args.shard, args.where, args.layers,
                                          args.cold, args.vocab, args.baseline, args.widths)),
        (args.make_checkpoint, lambda: make_checkpoint(args.make_checkpoint)),
        (args.whole, lambda: whole_process(args.checkpoint, args.repeats, args.baseline)),
        (args.load_level, lambda: load_level_child(args.load_level)),
        (args.level_io, lambda: level_io(args.checkpoint, args.repeats, args.baseline)),
        (args.grow_hf, lambda: grow_hf(args.checkpoint, args.repeats, args.baseline, args.shard,
                                       args.where, args.layers, args.vocab)),
        (args.streaming_ab, lambda: streaming_ab(args.checkpoint, args.streaming_ab, args.repeats,
                                                 args.shard, args.where)),
    ]
    for given, run in modes:
        if given:
            run()
            return
    runs: dict[str, list[dict]] = {"sparse": [], "dense": []}
    for r in range(args.repeats):
        for what in ("sparse", "dense"):  # interleaved, so both see the same machine load
            out = subprocess.run([sys.executable, __file__, "--child", what], capture_output=True,
                                 text=True, check=True)
            runs[what].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"run {r + 1}/{args.repeats} {what}: {runs[what][-1]['seconds']:.3f}s", file=sys.stderr)

    def med(what, key):
        return statistics.median(x[key] for x in runs[what])

    pb = runs["sparse"][0]["param_bytes"]
    rows = [
        ("capture (torch.export, dynamic)", f"{med('sparse', 'capture_s'):.2f} s", ""),
        ("analysis (spaces, roles)", f"{med('sparse', 'analysis_s'):.3f} s", ""),
        ("width pass 0.5, sparse index (vcyclefx)", f"{med('sparse', 'seconds'):.3f} s",
         f"{med('sparse', 'peak_bytes') / pb:.2f}x param bytes"),
        ("same mapping, dense matrices", f"{med('dense', 'seconds'):.3f} s",
         f"{med('dense', 'peak_bytes') / pb:.2f}x param bytes"),
        ("speed-up sparse vs dense", f"{med('dense', 'seconds') / med('sparse', 'seconds'):.1f}x", ""),
        ("max |dense - sparse| weight difference", f"{max(x['max_abs_diff_vs_sparse'] for x in runs['dense']):.2e}", ""),
    ]
    print(f"\nGPT-2-base 124M ({pb / 2**20:.0f} MiB of float32 parameters), medians of {args.repeats} runs")
    w = max(len(r[0]) for r in rows)
    print(f"{'step':<{w}}  {'time':>10}  extra peak memory")
    for name, t, mem in rows:
        print(f"{name:<{w}}  {t:>10}  {mem}")



# --- the whole `vcyclefx coalesce` of a checkpoint against the reference procedure -------------
#
# ``reference_coalesce`` re-implements, for this benchmark, the procedure of the public reference
# code of the multi-level training paper (Zou et al., ICLR 2024, "map_tools"): load the Hugging
# Face checkpoint with ``from_pretrained``, build one dense mapping matrix per resized axis
# (neighbouring pairs of units averaged on the producing side and summed on the consuming side),
# apply them with matrix products, average neighbouring layer pairs for depth, instantiate the
# small model from a smaller config, load the mapped weights and ``save_pretrained`` it. It is a
# re-implementation written here, not the reference's own code; it supports GPT-2 only.


def _pairs(n: int, mean: bool):
    import torch

    m = torch.zeros(n // 2, n)
    idx = torch.arange(n // 2)
    m[idx, 2 * idx] = m[idx, 2 * idx + 1] = 0.5 if mean else 1.0
    return m


def reference_coalesce(src: str, out: str) -> None:
    import torch
    import transformers as T

    model = T.GPT2LMHeadModel.from_pretrained(src, local_files_only=True)
    cfg = model.config
    d, h, f = cfg.n_embd, cfg.n_head, cfg.n_inner or 4 * cfg.n_embd
    hd = d // h
    avg_d, sum_d = _pairs(d, True), _pairs(d, False)
    avg_f, sum_f = _pairs(f, True), _pairs(f, False)
    # heads: neighbouring pairs of heads averaged, unit by unit
    head = torch.kron(_pairs(h, True), torch.eye(hd))
    head_sum = torch.kron(_pairs(h, False), torch.eye(hd))
    qkv = torch.block_diag(head, head, head)
    sd = {k: v.detach() for k, v in model.state_dict().items()}

    def vec(w, m):
        return m @ w

    def conv(w, m_in, m_out):  # GPT-2 Conv1D weights are (in, out)
        return m_in @ w @ m_out.T

    small = {"transformer.wte.weight": sd["transformer.wte.weight"] @ avg_d.T,
             "transformer.wpe.weight": sd["transformer.wpe.weight"] @ avg_d.T,
             "transformer.ln_f.weight": vec(sd["transformer.ln_f.weight"], avg_d),
             "transformer.ln_f.bias": vec(sd["transformer.ln_f.bias"], avg_d)}
    for i in range(cfg.n_layer // 2):
        a, b = f"transformer.h.{2 * i}.", f"transformer.h.{2 * i + 1}."
        layer = {}
        for p in (a, b):
            one = {
                "ln_1.weight": vec(sd[p + "ln_1.weight"], avg_d),
                "ln_1.bias": vec(sd[p + "ln_1.bias"], avg_d),
                "ln_2.weight": vec(sd[p + "ln_2.weight"], avg_d),
                "ln_2.bias": vec(sd[p + "ln_2.bias"], avg_d),
                "attn.c_attn.weight": conv(sd[p + "attn.c_attn.weight"], sum_d, qkv),
                "attn.c_attn.bias": vec(sd[p + "attn.c_attn.bias"], qkv),
                "attn.c_proj.weight": conv(sd[p + "attn.c_proj.weight"], head_sum, avg_d),
                "attn.c_proj.bias": vec(sd[p + "attn.c_proj.bias"], avg_d),
                "mlp.c_fc.weight": conv(sd[p + "mlp.c_fc.weight"], sum_d, avg_f),
                "mlp.c_fc.bias": vec(sd[p + "mlp.c_fc.bias"], avg_f),
                "mlp.c_proj.weight": conv(sd[p + "mlp.c_proj.weight"], sum_f, avg_d),
                "mlp.c_proj.bias": vec(sd[p + "mlp.c_proj.bias"], avg_d),
            }
            for k, v in one.items():
                layer[k] = layer.get(k, 0) + v / 2  # depth: the pair's average
        small.update({f"transformer.h.{i}.{k}": v for k, v in layer.items()})
    small["lm_head.weight"] = small["transformer.wte.weight"]
    small_cfg = T.GPT2Config(**{**cfg.to_dict(), "n_embd": d // 2, "n_head": h // 2,
                                "n_inner": f // 2, "n_layer": cfg.n_layer // 2})
    target = T.GPT2LMHeadModel(small_cfg)
    missing, unexpected = target.load_state_dict(small, strict=False)
    assert not unexpected and all(".attn.bias" in k or "masked_bias" in k for k in missing), missing
    target.save_pretrained(out)


def floor_process(src: str, imports_only: bool = False) -> None:
    """What any coalesce of ``src`` built on a symbolic torch.export pays before it maps a single
    weight: import torch and transformers, ``from_pretrained``, one export with symbolic batch and
    sequence (vcyclefx's export settings), then leave without teardown. No mapping, no output.
    ``imports_only``: only import torch and transformers' GPT-2 class (what any procedure that
    loads the checkpoint with transformers pays)."""
    import torch
    import transformers as T

    if imports_only:
        T.GPT2LMHeadModel  # noqa: B018 - transformers imports its model classes lazily
        os._exit(0)
    from torch.export import Dim

    from vcyclefx.capture.frontend import export_program

    T.logging.set_verbosity_error()
    model = T.GPT2LMHeadModel.from_pretrained(src, local_files_only=True, use_cache=False).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    export_program(model, (ids,), ({0: Dim.AUTO, 1: Dim.AUTO},))
    sys.stdout.flush()
    os._exit(0)


def make_checkpoint(directory: str) -> None:
    """GPT-2 base (124M) with random weights as config.json + model.safetensors
    (``save_pretrained``), the form the streaming command line reads."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    # use_cache off in config.json: vcyclefx before a77cea0 failed on a config with it on (the
    # DynamicCache output), and --baseline runs such a commit
    model = T.GPT2LMHeadModel(T.GPT2Config(use_cache=False))
    model.config.architectures = ["GPT2LMHeadModel"]
    model.save_pretrained(directory)


# --- a synthetic sharded bf16 Llama larger than the rest: streaming against loading -----------
BIG = dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
           intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048)
WIDTHS = {"1b": {}, "7b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                               num_key_value_heads=8)}


def make_big(directory: str, shard: str, layers: int = 24, vocab: int = BIG["vocab_size"],
             widths: str = "1b") -> None:
    """A random bf16 Llama (BIG with ``layers`` decoder layers: 1.2B parameters and 2.4 GB at
    24, 1.9B and 3.9 GB at 40; ``widths`` "7b": Mistral-7B's widths) saved in shards of
    ``shard``."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = T.LlamaForCausalLM(T.LlamaConfig(**{**BIG, **WIDTHS[widths],
                                                    "num_hidden_layers": layers,
                                                    "vocab_size": vocab},
                                                 use_cache=False, dtype="bfloat16"))
    finally:
        torch.set_default_dtype(old)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(directory, max_shard_size=shard)


def load_only(src: str) -> None:
    """``from_pretrained`` of ``src`` in its dtype, then exit without teardown."""
    import transformers as T

    T.logging.set_verbosity_error()
    T.AutoModelForCausalLM.from_pretrained(src, local_files_only=True, dtype="auto")
    os._exit(0)


def add_floor(src: str) -> None:
    """The compute floor of streaming ``src``: every tensor memory-mapped (``safe_open``) and
    one bf16 ``add`` of its two halves, so every element is read once and half as many written
    (less than any coalesce does: no depth mean, no float32, nothing saved); prints its wall
    and CPU seconds."""
    import glob

    import torch
    from safetensors import safe_open

    t0, c0 = time.perf_counter(), time.process_time()
    for f in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                x = st.get_tensor(k).view(-1)
                h = x.numel() // 2
                torch.add(x[:h], x[h:2 * h])
    print(f"streamed (compute floor) in {time.perf_counter() - t0:.2f} s "
          f"({time.process_time() - c0:.2f} s of CPU)", file=sys.stderr)


def evict(folder: str) -> None:
    """Drop ``folder``'s safetensors files from the page cache (``posix_fadvise`` DONTNEED: their
    next read comes from the disk), as a checkpoint larger than memory always is."""
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            fd = os.open(os.path.join(folder, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def big_checkpoint(repeats: int, shard: str, where: str, layers: int = 24,
                   cold: bool = False, vocab: int = BIG["vocab_size"],
                   baseline: str | None = None, widths: str = "1b") -> None:
    """coalesce 0.5/0.5 and decoalesce (back) of the synthetic checkpoint, ``from_pretrained``
    alone, ``cat`` of its files (reading it once) and ``cp`` of them to a new folder (reading and
    writing it once: the floor of decoalesce, which writes a checkpoint of that size),
    alternating; peak RSS of each child. ``cold``: every command's input is dropped from the
    page cache before it runs (read from the disk, as a checkpoint larger than memory is).
    ``baseline``: another checkout of vcyclefx, whose capture-cached coalesce runs in the same
    alternation (row ``baseline-cached``)."""
    import shutil
    import tempfile

    work = tempfile.mkdtemp(prefix="bench_big_", dir=where)
    try:
        ckpt = os.path.join(work, "llama")
        subprocess.run([sys.executable, __file__, "--make-big", ckpt, "--shard", shard,
                        "--layers", str(layers), "--vocab", str(vocab), "--widths", widths],
                       check=True)
        files = sorted(os.path.join(ckpt, f) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
        size = sum(os.path.getsize(f) for f in files)
        vcyclefx = [sys.executable, "-c", "from vcyclefx.cli import entry; entry()"]
        small = os.path.join(work, "small")
        coalesce = [*vcyclefx, "coalesce", ckpt, "--width", "0.5", "--depth", "0.5", "-o", small,
                    "--max-shard-size", shard, "--force", "--stream", "always"]
        # coalesce between two reads of the same files: the disk's speed drifts from minute to
        # minute (cold reads come from the host's cache), so each round's streaming phase is
        # also compared with the two `cat`s beside it
        cmds = {"cat": ["cat", *files],
                "coalesce": coalesce,
                "cat-after": ["cat", *files],
                "cp": ["cp", "-r", ckpt, os.path.join(work, "copy")],
                # the floor of a durable write: the copy flushed to disk, as every vcyclefx
                # output is before it is renamed into place (vcyclefx.store)
                "cp+sync": ["sh", "-c", f"cp -r {ckpt} {os.path.join(work, 'copy2')} && "
                                        f"sync {os.path.join(work, 'copy2')}/*"],
                "add-floor": [sys.executable, __file__, "--add-floor", ckpt],
                "from_pretrained": [sys.executable, __file__, "--load-only", ckpt],
                # the same, every block traced (no capture by repetition): before/after
                "coalesce-whole": [*vcyclefx, "coalesce", ckpt, "--width", "0.5", "--depth",
                                   "0.5", "-o", small + "-whole", "--max-shard-size", shard,
                                   "--force", "--stream", "always", "--whole-capture"],
                # the capture read from the capture cache (filled once, before the timed runs)
                "coalesce-cached": [*vcyclefx, "coalesce", ckpt, "--width", "0.5", "--depth",
                                    "0.5", "-o", small + "-cached", "--max-shard-size", shard,
                                    "--force", "--stream", "always"],
                "decoalesce": [*vcyclefx, "decoalesce", small, "-o", os.path.join(work, "big"),
                               "--max-shard-size", shard, "--force", "--stream", "always"]}
        warm = _cached(os.path.join(work, "warm-cache"))
        envs = {"coalesce-cached": warm}
        if baseline:
            cached = cmds["coalesce-cached"]
            at = cached.index("-o") + 1
            cmds["baseline-cached"] = [*cached[:at], small + "-base", *cached[at + 1:]]
            envs["baseline-cached"] = {**_cached(os.path.join(work, "warm-base")),
                                       "PYTHONPATH": os.path.abspath(baseline)}
        for what, env in envs.items():
            subprocess.run(cmds[what], check=True, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        runs: dict[str, list[tuple[float, int]]] = {w: [] for w in cmds}
        streaming: dict[str, list[tuple[float, float]]] = {
            "add-floor": [], "coalesce": [], "coalesce-whole": [], "coalesce-cached": [],
            "decoalesce": [], **({"baseline-cached": []} if baseline else {})}
        for r in range(repeats):
            for what, cmd in cmds.items():
                if cold:
                    evict(small if what == "decoalesce" else ckpt)
                _measure(runs, what, cmd, work, r, repeats, envs.get(what))
                if what in streaming:
                    streaming[what].append(_streamed_seconds())
            shutil.rmtree(os.path.join(work, "big"), ignore_errors=True)
            shutil.rmtree(os.path.join(work, "copy"), ignore_errors=True)
            shutil.rmtree(os.path.join(work, "copy2"), ignore_errors=True)
        out_size = _bytes_of(small, "weights")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = functools.partial(_median, runs)
    print(f"\nsynthetic bf16 Llama, {len(files)} shards of <= {shard}, {size / 1e9:.2f} GB "
          f"(coalesced level: {out_size / 1e9:.2f} GB), medians of {repeats} alternating runs, "
          f"{'cold: inputs dropped from the page cache before each run' if cold else 'warm: inputs in the page cache'}")
    print(f"{'':<16} {'time':>8} {'peak RSS':>10} {'RSS / ckpt':>11} {'time / cat':>11}")
    for what in cmds:
        print(f"{what:<16} {med(what, 0):>6.2f} s {med(what, 1) / 2**30:>6.2f} GiB "
              f"{med(what, 1) / size:>10.2f}x {med(what, 0) / med('cat', 0):>10.2f}x")
    print(f"CPU seconds (user + system): cat {med('cat', 2):.2f}, cp {med('cp', 2):.2f}")
    print(f"decoalesce / (cp + sync): {med('decoalesce', 0) / med('cp+sync', 0):.2f}x")
    paired = [streaming["coalesce"][r][0] / ((runs["cat"][r][0] + runs["cat-after"][r][0]) / 2)
              for r in range(repeats)]
    print(f"coalesce's streaming phase / the mean of the two `cat`s beside it, per round: median "
          f"{statistics.median(paired):.2f}x [{min(paired):.2f}-{max(paired):.2f}]")
    for what, xs in streaming.items():
        if all(x is not None for x in xs):
            t = statistics.median(x[0] for x in xs)
            c = statistics.median(x[1] for x in xs)
            print(f"{what}: streaming the weights alone {t:.2f} s = {t / med('cat', 0):.2f}x cat "
                  f"= {t / med('cp', 0):.2f}x cp; its CPU {c:.2f} s = "
                  f"{c / med('cat', 2):.2f}x cat's CPU = {c / med('cp', 2):.2f}x cp's")


def streaming_ab(checkpoint: str | None, baseline: str, repeats: int, shard: str,
                 where: str | None) -> None:
    """The streaming phase of ``coalesce --width 0.5 --depth 0.5 --stream always`` of the
    synthetic Llama (``checkpoint``, or one made and deleted here), and the whole process's peak
    RSS, this checkout against ``baseline`` (another checkout), alternating, each with its input
    cold (dropped from the page cache) and warm (``cat`` first), the capture cached (one run of
    each checkout first, not counted)."""
    import shutil
    import tempfile

    work = tempfile.mkdtemp(prefix="bench_ab_", dir=where)
    try:
        if checkpoint is None:
            checkpoint = os.path.join(work, "llama")
            subprocess.run([sys.executable, __file__, "--make-big", checkpoint, "--shard", shard],
                           check=True)
        files = sorted(os.path.join(checkpoint, f) for f in os.listdir(checkpoint)
                       if f.endswith(".safetensors"))
        size = sum(os.path.getsize(f) for f in files)
        trees = {"this": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                 "baseline": os.path.abspath(baseline)}
        got = {(m, t): [] for m in ("cold", "warm") for t in trees}
        out = os.path.join(work, "out")

        def run(tree):
            shutil.rmtree(out, ignore_errors=True)
            # each tree its own capture cache (main() turns it off for every other child)
            env = {**_cached(os.path.join(work, f"cache-{tree}")), "PYTHONPATH": trees[tree]}
            return _run_measured([sys.executable, "-c", "from vcyclefx.cli import entry; entry()",
                                  "coalesce", checkpoint, "--width", "0.5", "--depth", "0.5",
                                  "-o", out, "--max-shard-size", shard, "--stream", "always"],
                                 work, env)

        for tree in trees:  # the capture cached for both
            run(tree)
            if "from the capture cache" in _LAST_ERR[0]:
                raise SystemExit(f"{tree}: the first run found a capture cached in a new folder")
        for r in range(repeats):
            for mode in ("cold", "warm"):
                for tree in trees:
                    if mode == "cold":
                        evict(checkpoint)
                    else:
                        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
                    peak = run(tree)[1]
                    if "from the capture cache" not in _LAST_ERR[0]:
                        raise SystemExit(f"{tree}: the capture was not read from the cache")
                    got[mode, tree].append((_streamed_seconds()[0], peak))
                    print(f"run {r + 1}/{repeats} {mode} {tree}: {got[mode, tree][-1][0]:.2f} s, "
                          f"peak {peak / 2**30:.3f} GiB", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ncoalesce 0.5/0.5 of the synthetic Llama, capture cached, medians of {repeats} "
          f"alternating runs [range] (baseline: {baseline})")
    print(f"{'':<6} {'':<9} {'this':>22} {'baseline':>22} {'this / baseline':>16}")
    for mode in ("cold", "warm"):
        for what, k, unit, scale in (("stream", 0, "s", 1), ("peak", 1, "GiB", 2**30)):
            a = [x[k] / scale for x in got[mode, "this"]]
            b = [x[k] / scale for x in got[mode, "baseline"]]
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"{mode:<6} {what:<9} {ma:>6.3f} {unit:<3} [{min(a):.3f}-{max(a):.3f}] "
                  f"{mb:>6.3f} {unit:<3} [{min(b):.3f}-{max(b):.3f}] {ma / mb:>15.3f}x")
    for tree in trees:
        peaks = [x[1] for m in ("cold", "warm") for x in got[m, tree]]
        print(f"peak / checkpoint ({tree}): {statistics.median(peaks) / size:.3f}x "
              f"(checkpoint {size / 1e9:.2f} GB)")


def split_child(src: str, out: str) -> dict:
    """`vcyclefx coalesce SRC --width 0.5 --depth 0.5 -o OUT` (the streaming path), step by
    step, in one process, without the cycle collector as the command runs."""
    import gc

    gc.disable()
    t0 = time.perf_counter()
    steps = {}

    def mark(name, start):
        steps[name] = time.perf_counter() - start
        return time.perf_counter()

    import torch  # noqa: F401

    from vcyclefx import api
    from vcyclefx.capture.recipe import recipe_of
    from vcyclefx.export.leveldir import level_summary
    from vcyclefx.export.leveldir import save_level
    from vcyclefx.export.record import Recorder
    from vcyclefx.export.shards import DEFAULT_MAX_SHARD
    from vcyclefx.export.stream import hf_source, materialize_extras, stream_weights

    t = mark("imports (torch, vcyclefx)", t0)
    source = hf_source(src, src, 2, 16, recipe_of)
    t = mark("model on the meta device, capture (torch.export)", t)
    with Recorder(source.leaves) as rec:
        small, mapping = api.coalesce(source.level, width=0.5, depth=0.5, check=False)
    t = mark("analysis + passes (on meta tensors, recorded)", t)
    materialize_extras(small, rec, source.reader.get)
    save_level(small, out, mapping, extra=level_summary(small, mapping),
               weights=stream_weights(small, rec, source.reader, DEFAULT_MAX_SHARD))
    mark("writing the level directory (weights streamed)", t)
    steps["total"] = time.perf_counter() - t0
    return steps


_LAST_ERR = [""]  # the last measured child's standard error


def _measure(runs: dict, what: str, cmd: list[str], cwd: str, r: int, repeats: int,
             env: dict | None = None) -> None:
    """Run ``cmd`` once, add (seconds, peak bytes) to ``runs[what]`` and report it."""
    runs[what].append(_run_measured(cmd, cwd, env))
    print(f"run {r + 1}/{repeats} {what}: {runs[what][-1][0]:.2f} s, "
          f"{runs[what][-1][1] / 2**30:.2f} GiB", file=sys.stderr)


def _median(runs: dict, what: str, i: int) -> float:
    return statistics.median(x[i] for x in runs[what])


def _streamed_seconds() -> tuple[float, float] | None:
    """The wall and CPU seconds the last child spent streaming its weights (its "streamed ... in
    X s (Y s of CPU)" line)."""
    import re

    m = re.search(r"streamed .* in ([0-9.]+) s \(([0-9.]+) s of CPU\)", _LAST_ERR[0])
    return (float(m.group(1)), float(m.group(2))) if m else None


def _run_measured(cmd: list[str], cwd: str, env: dict | None = None) -> tuple[float, int, float]:
    """Wall seconds, peak resident memory (bytes) and CPU seconds (user + system) of one child
    process."""
    start = time.perf_counter()
    # run from the temporary directory: `python -c` puts the working directory first on sys.path
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode()
    proc.stderr.close()
    _LAST_ERR[0] = err
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return seconds, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def _bytes_of(folder: str, prefix: str, suffix: str = "") -> int:
    """The bytes of the files of ``folder`` named ``prefix...suffix``."""
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.startswith(prefix) and f.endswith(suffix))


def _gpt2_checkpoint(checkpoint: str | None, work: str) -> str:
    """``checkpoint``, made there (GPT-2 base, random weights) unless it exists; by default in
    the run's temporary folder ``work``."""
    checkpoint = checkpoint or os.path.join(work, "gpt2")
    if not os.path.exists(os.path.join(checkpoint, "config.json")):  # made once, then reused
        os.makedirs(checkpoint, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--make-checkpoint", checkpoint], check=True)
    return checkpoint


def _cached(folder: str) -> dict:
    """The environment of a child that uses the capture cache in ``folder``."""
    return {**os.environ, "VCYCLEFX_CAPTURE_CACHE": folder}


def whole_process(checkpoint: str | None, repeats: int, baseline: str | None = None) -> None:
    """``baseline``: another checkout of vcyclefx (an earlier commit with ``--stream``), run in
    the same alternation for a before/after row of the streamed command."""
    import shutil
    import tempfile

    work = tempfile.mkdtemp(prefix="bench_transform_")
    try:
        checkpoint = _gpt2_checkpoint(checkpoint, work)
        vcyclefx = [sys.executable, "-c", "from vcyclefx.cli import entry; entry()"]
        here = [sys.executable, __file__]
        coalesce = [*vcyclefx, "coalesce", checkpoint, "--width", "0.5", "--depth", "0.5",
                    "--stream", "always"]
        warm = os.path.join(work, "warm-cache")  # filled once, before the timed runs
        subprocess.run([*coalesce, "-o", os.path.join(work, "fill")], check=True,
                       env=_cached(warm), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        whats = ("first run", "cached", "cache off", "whole-capture", "reference", "floor",
                 "imports") + (("baseline",) if baseline else ())
        runs: dict[str, list[tuple[float, int]]] = {w: [] for w in whats}
        splits = []
        for r in range(repeats):  # alternating, so all see the same machine load
            for what in whats:
                out = os.path.join(work, f"{what}{r}")
                cmd = {"reference": [*here, "--reference", checkpoint, out],
                       "floor": [*here, "--floor", checkpoint],
                       "imports": [*here, "--floor", checkpoint, "--imports"]}.get(
                    what, [*coalesce, "-o", out] +
                    (["--whole-capture"] if what == "whole-capture" else []))
                env = {"baseline": {**os.environ, "PYTHONPATH": os.path.abspath(baseline or "")},
                       # a fresh, empty cache each round: capture, then write the entry
                       "first run": _cached(os.path.join(work, f"cache{r}")),
                       "cached": _cached(warm)}.get(what)
                _measure(runs, what, cmd, work, r, repeats, env)
                shutil.rmtree(out, ignore_errors=True)
            out = os.path.join(work, f"split{r}")
            res = subprocess.run([sys.executable, __file__, "--split", checkpoint, out],
                                 capture_output=True, text=True, check=True)
            splits.append(json.loads(res.stdout.strip().splitlines()[-1]))
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = functools.partial(_median, runs)
    print(f"\n`vcyclefx coalesce` of GPT-2 base (124M, model.safetensors) to width 0.5 / depth 0.5, "
          f"whole process, medians of {repeats} alternating runs")
    print(f"{'':<44} {'time':>8} {'peak RSS':>10}")
    labels = [("first run", "vcyclefx coalesce, first run (empty cache)"),
              ("cached", "vcyclefx coalesce, capture cached"),
              ("cache off", "vcyclefx coalesce, capture cache off"),
              ("whole-capture", "vcyclefx coalesce --whole-capture, off"),
              ("reference", "reference procedure (re-impl.)"),
              ("floor", "floor: imports, load, one export"),
              ("imports", "imports only: torch, transformers")]
    if baseline:
        labels.append(("baseline", f"vcyclefx coalesce at {baseline}"))
    for what, label in labels:
        print(f"{label:<44} {med(what, 0):>6.2f} s {med(what, 1) / 2**30:>6.2f} GiB")
    for what in (w for w in whats if w != "reference"):
        print(f"{'ratio ' + what + ' / reference':<44} {med(what, 0) / med('reference', 0):>7.2f}x "
              f"{med(what, 1) / med('reference', 1):>9.2f}x")
    print(f"\nin one process, step by step, capture cache off (median of {repeats}):")
    for name in splits[0]:
        print(f"  {name:<48} {statistics.median(s[name] for s in splits):6.2f} s")


def load_level_child(directory: str) -> None:
    """A process that imports vcyclefx and loads a level directory (``--load-level``)."""
    from vcyclefx.export.leveldir import load_level

    level, _ = load_level(directory)
    assert not any(t.is_meta for t in level.state_dict().values())


def level_io(checkpoint: str | None, repeats: int, baseline: str | None) -> None:
    """Writing and reading level directories in memory: `vcyclefx coalesce` of GPT-2 base
    (``--stream auto``: in memory and self-checked at this size), `decoalesce` of that level and
    ``load_level`` of it, each a whole process, this checkout and ``baseline`` alternating; each
    tree reads the level it wrote."""
    import shutil
    import tempfile

    work = tempfile.mkdtemp(prefix="bench_level_io_")
    try:
        checkpoint = _gpt2_checkpoint(checkpoint, work)
        trees = {"this checkout": None, **({f"at {baseline}": baseline} if baseline else {})}
        vcyclefx = [sys.executable, "-c", "from vcyclefx.cli import entry; entry()"]
        runs: dict = {(s, t): [] for s in ("coalesce", "decoalesce", "load_level") for t in trees}
        sizes: dict = {}
        for r in range(repeats):
            for tree, path in trees.items():
                env = {**os.environ, "PYTHONPATH": os.path.abspath(path)} if path else None
                small, big = os.path.join(work, f"small{r}"), os.path.join(work, f"big{r}")
                steps = {"coalesce": [*vcyclefx, "coalesce", checkpoint, "--width", "0.5",
                                      "--depth", "0.5", "-o", small],
                         "decoalesce": [*vcyclefx, "decoalesce", small, "-o", big],
                         "load_level": [sys.executable, __file__, "--load-level", big]}
                for step, cmd in steps.items():
                    _measure(runs, (step, tree), cmd, work, r, repeats, env)
                for name, d in (("small", small), ("big", big)):
                    sizes[name, tree] = {f: os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)}
                shutil.rmtree(small), shutil.rmtree(big)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = functools.partial(_median, runs)
    print(f"\nlevel directories in memory (GPT-2 base, width 0.5 / depth 0.5 and back), whole "
          f"processes, medians of {repeats} alternating runs")
    print(f"{'':<36} {'time':>8} {'peak RSS':>10} {'level.pt2':>11} {'weights':>11}")
    for step, size_of in (("coalesce", "small"), ("decoalesce", "big"), ("load_level", None)):
        for tree in trees:
            size = sizes.get((size_of, tree), {})
            pt2 = f"{size['level.pt2'] / 1e6:9.1f} MB" if size else ""
            w = f"{size['weights.safetensors'] / 1e6:9.1f} MB" if size else ""
            print(f"{step + ' (' + tree + ')':<36} {med((step, tree), 0):>6.2f} s "
                  f"{med((step, tree), 1) / 2**30:>6.2f} GiB {pt2:>11} {w:>11}")


def grow_hf(checkpoint: str | None, repeats: int, baseline: str | None, shard: str,
            where: str | None, layers: int, vocab: int) -> None:
    """`decoalesce --format hf` of a small bf16 level back to the full-size Hugging Face model:
    the level is the streamed coalesce (width 0.5, depth 0.5) of the synthetic Llama, written
    once by this checkout; then this checkout and ``baseline`` alternate, each a whole process
    writing the full-size level and its Hugging Face files; and this checkout's decoalesce to
    the level alone, streamed and in memory."""
    import shutil
    import tempfile

    work = tempfile.mkdtemp(prefix="bench_grow_hf_", dir=where)
    try:
        if checkpoint is None:
            checkpoint = os.path.join(work, "llama")
            subprocess.run([sys.executable, __file__, "--make-big", checkpoint, "--shard", shard,
                            "--layers", str(layers), "--vocab", str(vocab)], check=True)
        vcyclefx = [sys.executable, "-c", "from vcyclefx.cli import entry; entry()"]
        small = os.path.join(work, "small")
        subprocess.run([*vcyclefx, "coalesce", checkpoint, "--width", "0.5", "--depth", "0.5",
                        "-o", small, "--stream", "always"], check=True, cwd=work,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        trees = {"this checkout": None, **({f"at {baseline}": baseline} if baseline else {})}
        # and the level alone (no --format hf), streamed and in memory: what --stream auto
        # chooses between by the size of the output
        levels = {"level only, streamed": "always", "level only, in memory": "never"}
        runs: dict = {t: [] for t in [*trees, *levels]}
        sizes: dict = {}
        out = os.path.join(work, "big")
        for r in range(repeats):
            for tree, path in trees.items():
                env = {**os.environ, "PYTHONPATH": os.path.abspath(path)} if path else None
                _measure(runs, tree, [*vcyclefx, "decoalesce", small, "-o", out, "--format", "hf",
                                      "--stream", "always"], work, r, repeats, env)
                sizes["hf"] = _bytes_of(out, "model", ".safetensors")
                shutil.rmtree(out)
            for what, mode in levels.items():
                _measure(runs, what, [*vcyclefx, "decoalesce", small, "-o", out, "--stream", mode],
                         work, r, repeats)
                shutil.rmtree(out)
        small_size = _bytes_of(small, "weights")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = functools.partial(_median, runs)
    print(f"\n`vcyclefx decoalesce --format hf --stream always` of a {small_size / 1e9:.2f} GB bf16 "
          f"level into the {sizes['hf'] / 1e9:.2f} GB Llama it came from, whole processes, "
          f"medians of {repeats} alternating runs [range]")
    print(f"{'':<28} {'time':>22} {'peak RSS':>24} {'peak / output':>14}")
    for tree in [*trees, *levels]:
        t = [x[0] for x in runs[tree]]
        m = [x[1] / 2**30 for x in runs[tree]]
        print(f"{tree:<28} {med(tree, 0):>6.1f} s [{min(t):.1f}-{max(t):.1f}] "
              f"{med(tree, 1) / 2**30:>7.2f} GiB [{min(m):.2f}-{max(m):.2f}] "
              f"{med(tree, 1) / sizes['hf']:>13.2f}x")


if __name__ == "__main__":
    main()
