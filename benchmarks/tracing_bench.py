"""The cost of tracing and hooks per short chat, side by side: each mode in its own process
against its own emulator on 127.0.0.1, rounds interleaved, median of the rounds' medians.

Modes: opentelemetry not imported (what most users run); opentelemetry imported but no tracer
provider set (the API's default proxy provider); an SDK provider with an in-memory exporter
(tracing on; the span's end counts usage with the tokens extra, loaded before timing); one no-op
event hook::

    python benchmarks/tracing_bench.py [--chats 300] [--rounds 5]
"""

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time
mode = sys.argv[1]
hooks = None
if mode in ("imported", "on"):
    import opentelemetry.trace
if mode == "on":
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
if mode == "hook":
    hooks = {name: [lambda event: None] for name in ("chat_start", "first_piece", "chat_end")}
import aichatonline_sync as aco
from aichatonline_sync._client.usage import count_tokens
count_tokens("warm up")  # the tokenizer's one-time load is not a chat's cost
from aichatonline_sync.testing import Emulator
n = int(sys.argv[2])
with Emulator(record=False) as emu, aco.Session(emu.url, event_hooks=hooks) as s:
    for _ in range(20):
        s.complete("Hello")
    times = []
    for _ in range(n):
        t = time.perf_counter()
        s.complete("Hello")
        times.append(time.perf_counter() - t)
if mode == "on":
    spans = exporter.get_finished_spans()
    assert len(spans) == n + 20, len(spans)
    assert spans[-1].attributes["gen_ai.usage.output_tokens"] > 0
print(json.dumps(statistics.median(times)))
"""

MODES = {
    "not imported": "none",
    "imported, no provider": "imported",
    "on (SDK, in-memory)": "on",
    "one no-op hook": "hook",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chats", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, list[float]] = {name: [] for name in MODES}
    for round_ in range(args.rounds):
        names = list(MODES)
        names = names[round_ % len(names):] + names[: round_ % len(names)]
        for name in names:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, MODES[name], str(args.chats)],
                check=True, capture_output=True, text=True,
            ).stdout
            results[name].append(json.loads(out))
    base = statistics.median(results["not imported"])
    print(f"{args.chats} short chats per process (the emulator's default reply, ~30 pieces), "
          f"{args.rounds} rounds; median of the per-round medians")
    print()
    print("| tracing | ms per chat | vs not imported | rounds (ms) |")
    print("|---|---|---|---|")
    for name, values in results.items():
        median = statistics.median(values)
        each = ", ".join(f"{v * 1e3:.3f}" for v in values)
        print(f"| {name} | {median * 1e3:.3f} | {100 * (median / base - 1):+.1f} % | {each} |")


if __name__ == "__main__":
    main()
