"""Would two half-batches on two CUDA streams beat one decode step? A probe for issue 14.

At T1's decode shapes both halves of a step run at their own limits, one after the other: the GEMMs
near the card's FLOP/s, the paged attention near its bandwidth (README, calls T2 and U5). Running the
memory-bound attention of one half of the batch while the other half's GEMMs run could hide one in
the other. Before the engine is built around that, this measures it on the engine's own model, KV
cache and running sequences (bench/profile_decode.py's set-up): one decode forward (and lm_head and
greedy argmax) of all --seqs rows against the same rows as two halves, one after the other on one
stream and concurrently on two, each a CUDA graph with its own memory pool (so both halves can
replay at once). The halves' tokens must agree with the whole batch's: all of them on the CPU
(float32), 99% of the rows on a GPU, where a GEMM of half the rows may take another kernel and a
near-tie of the dummy weights' logits then falls either way.

    python bench/overlap_probe.py --seqs 1800 --ctx 190 --out overlap-t1-128.json
    python bench/overlap_probe.py --seqs 331 --ctx 1500 --out overlap-t1-1000.json

Without a GPU (tests) the three run eagerly, untimed, and only the tokens are compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.profile_decode import decode_args, decoding_engine, running_context  # noqa: E402
from gpu_engine.cuda_graphs import capture  # noqa: E402
from gpu_engine.ops import AttentionMetadata  # noqa: E402
from taxiway.benchmarks import machine_info  # noqa: E402


def decode_program(engine, rows: list[int]):
    """A closure running the decode forward, logits and greedy argmax of the given batch slots from
    static inputs (their metadata computed on the device, as the engine's decode graphs do)."""
    runner = engine.runner
    batch = runner.batch
    dev = runner.device
    seqs = [batch.seqs[s] for s in rows]
    slot = torch.tensor(rows, dtype=torch.int64, device=dev)
    pos = torch.tensor([len(s.token_ids) - 1 for s in seqs], dtype=torch.int64, device=dev)
    ids = torch.tensor([s.token_ids[-1] for s in seqs], dtype=torch.int64, device=dev)
    qsl = torch.arange(len(rows) + 1, dtype=torch.int32, device=dev)
    host_lists = dev.type != "cuda"  # the reference ops read host lists

    def program() -> torch.Tensor:
        seq_lens = (pos + 1).to(torch.int32)
        meta = AttentionMetadata(
            slot_mapping=batch.slot_mapping(slot, pos), query_start_loc=qsl, seq_lens=seq_lens,
            block_tables=batch.block_table.index_select(0, slot), num_decodes=len(rows), max_query_len=1,
            max_seq_len=runner.max_model_len,
            query_start_loc_host=qsl.tolist() if host_lists else [],
            seq_lens_host=seq_lens.tolist() if host_lists else [],
        )
        hidden = runner.model(ids, pos, runner.kv_caches, meta, runner.cos_sin, runner.ops)
        return runner.model.compute_logits(hidden).argmax(-1)

    return program


def _median_ms(run, device: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _agreement(outs: dict[str, torch.Tensor]) -> float:
    """Share of rows whose token from the halves equals the whole batch's."""
    halves = torch.cat([outs["first"], outs["second"]])
    return round(float((halves == outs["whole"]).float().mean()), 4)


def probe(engine, reps: int) -> dict:
    """Tokens of the whole batch and of its two halves (they must agree) and, on a GPU, the median
    ms of: the whole batch, the halves one after the other, the halves on two streams at once."""
    runner = engine.runner
    rows = sorted(s for s, seq in enumerate(runner.batch.seqs) if seq is not None)
    half = len(rows) // 2
    programs = {"whole": decode_program(engine, rows), "first": decode_program(engine, rows[:half]),
                "second": decode_program(engine, rows[half:])}
    dev = runner.device
    if dev.type != "cuda":
        with torch.inference_mode():
            out = {name: p() for name, p in programs.items()}
        agree = _agreement(out)
        return {"rows": len(rows), "halves": [half, len(rows) - half], "agreeing_rows": agree}
    with torch.inference_mode():
        graphs, outs = {}, {}
        for name, p in programs.items():  # a pool each: the halves replay at the same time
            graphs[name], outs[name] = capture(p, dev, None)
        torch.cuda.synchronize(dev)
        for g in graphs.values():
            g.replay()
        torch.cuda.synchronize(dev)
        agree = _agreement(outs)
        main_stream = torch.cuda.current_stream(dev)
        side = [torch.cuda.Stream(dev), torch.cuda.Stream(dev)]

        def two_streams():
            for stream, name in zip(side, ("first", "second")):
                stream.wait_stream(main_stream)
                with torch.cuda.stream(stream):
                    graphs[name].replay()
            for stream in side:
                main_stream.wait_stream(stream)

        def one_after_the_other():
            graphs["first"].replay()
            graphs["second"].replay()

        variants = {"whole_ms": graphs["whole"].replay, "halves_one_stream_ms": one_after_the_other,
                    "halves_two_streams_ms": two_streams}
        for run in variants.values():  # warm
            run()
        torch.cuda.synchronize(dev)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(3):  # interleaved rounds: the card's clock drifts under load
            for key, run in variants.items():
                times[key].append(_median_ms(run, dev, reps))
    result = {"rows": len(rows), "halves": [half, len(rows) - half], "agreeing_rows": agree,
              **{k: round(statistics.median(v), 3) for k, v in times.items()}}
    result["two_streams_vs_whole"] = round(result["whole_ms"] / result["halves_two_streams_ms"], 3)
    result["two_streams_vs_one_stream"] = round(result["halves_one_stream_ms"] / result["halves_two_streams_ms"], 3)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    decode_args(ap, "(unused: the probe replays one decode step's forward)")
    ap.add_argument("--reps", type=int, default=10, help="replays per timing (median), three rounds")
    args = ap.parse_args(argv)
    engine = decoding_engine(args)
    context = running_context(engine)
    found = probe(engine, args.reps)
    engine.abort_request(list(engine.requests))
    result = {"benchmark": "overlap_probe", "machine": machine_info(), "command": " ".join(sys.argv),
              "config": {k: v for k, v in vars(args).items() if k != "out"}, "context": context, **found}
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "config", "command")}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if found["agreeing_rows"] >= (1.0 if engine.device.type != "cuda" else 0.99) else 1


if __name__ == "__main__":
    sys.exit(main())
