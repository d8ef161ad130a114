"""Times hashed prompt keys: the key table against plain ids, an unbounded stream, the key functions.

Usage:
    python benchmarks/bench_keys.py --out=benchmarks/results/keys_cpu   # CPU, one thread; the committed results
    python benchmarks/bench_keys.py --stream_keys=200000                 # a quick look, into a temporary directory

Three measurements:

1. **Hashed keys against ids**, on the headline grid of bench_trackers.py:
   the same tracker (``BufferStatTracker`` and ``EmaStatTracker``, default
   input checks on) built with ``keys="ids"`` and ``keys="hashed"``, timed
   on one fixed batch drawn uniformly over the P prompts (ids, or the keys
   of those prompts' strings), as bench_trackers.py times it. After the
   first update every key is in the table: this is the table's steady
   state, its lookup cost. Each round times the two trackers together,
   their blocks of calls taking turns (``timing.time_interleaved``, this
   thread's CPU time); the medians over rounds are reported, and the
   median of the rounds' ratios hashed / ids.
2. **A stream of distinct keys** through a smaller table (default: 10
   million keys through 1 million rows of a K = 32 buffer, N = 4096): every
   key is new, so every update evicts N keys. Time per update (median and
   the mean, which includes the occasional rebuild of the eviction queue)
   and memory (the bytes of the tracker's state and of its key table, and
   the process's peak RSS).
3. **Key functions**: ``prompt_keys`` of 4096 strings and ``token_keys`` of
   a [4096, 77] token batch.
"""

import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Tuple

import torch
from absl import app, flags

from rail_interview.stat_tracking import BufferStatTracker, EmaStatTracker, prompt_keys, token_keys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import time_interleaved  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS

GRID = [(256, 64, 32), (32768, 4096, 32), (4096, 1_000, 32), (4096, 1_000_000, 32)]
TRACKERS: Dict[str, Callable] = {
    "buffer": lambda p, k, keys: BufferStatTracker(p, k, 16, keys=keys),
    "ema": lambda p, k, keys: EmaStatTracker(p, 0.9, 16, keys=keys),
}


def _median_ms(function: Callable[[], object], budget: float = 0.3) -> float:
    """Median time of ``function`` in ms, over as many runs as fit in ``budget`` seconds (at least 5)."""
    function()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < budget:
        begin = time.perf_counter()
        function()
        times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1e3


def grid_batch(num_samples: int, num_prompts: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grid's fixed batch: ids drawn uniformly over the P prompts, their rewards, and the keys of those prompts.

    Args:
        num_samples: N.
        num_prompts: P.

    Returns:
        int64 [N] ids in [0, P), float32 [N] rewards and int64 [N] keys
        (``prompt_keys`` of the strings ``"prompt {id}"``).
    """
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(num_prompts, (num_samples,), generator=generator)
    rewards = torch.randn(num_samples, generator=generator)
    keys = prompt_keys([f"prompt {i}" for i in range(num_prompts)]).index_select(0, ids)
    return ids, rewards, keys


def grid_calls(
    name: str, num_prompts: int, buffer_size: int, ids: torch.Tensor, rewards: torch.Tensor, keys: torch.Tensor
) -> Tuple[Callable[[], object], Callable[[], object]]:
    """Builds one tracker of ``TRACKERS`` with ids and with hashed keys, checks that they agree, returns both updates.

    Args:
        name: a key of ``TRACKERS``.
        num_prompts: P.
        buffer_size: K.
        ids: int64 [N], from ``grid_batch``.
        rewards: float32 [N].
        keys: int64 [N], the ids' keys.

    Returns:
        The update with ids and the update with keys, each on the batch,
        after one update of it (every key is then in the table).

    Raises:
        AssertionError: if the first update's advantages differ.
    """
    make = TRACKERS[name]
    by_id, hashed = make(num_prompts, buffer_size, "ids"), make(num_prompts, buffer_size, "hashed")
    torch.testing.assert_close(hashed.update(keys, rewards), by_id.update(ids, rewards))
    return (lambda: by_id.update(ids, rewards)), (lambda: hashed.update(keys, rewards))


def grid(rounds: int) -> List[dict]:
    """Hashed against ids on the headline grid; returns one row per (tracker, N, P, K)."""
    rows = []
    for num_samples, num_prompts, buffer_size in GRID:
        ids, rewards, keys = grid_batch(num_samples, num_prompts)
        for name in TRACKERS:
            by_id, hashed = grid_calls(name, num_prompts, buffer_size, ids, rewards, keys)
            times: Dict[str, List[float]] = {"ids": [], "hashed": []}
            for _ in range(rounds):  # the two in turns, block by block: a busy phase falls on both
                for key, seconds in zip(("ids", "hashed"), time_interleaved([by_id, hashed], 0.3)):
                    times[key].append(1e3 * seconds)
            ids_ms, hashed_ms = statistics.median(times["ids"]), statistics.median(times["hashed"])
            ratio = statistics.median(h / i for i, h in zip(times["ids"], times["hashed"]))
            rows.append(
                dict(
                    tracker=name,
                    N=num_samples,
                    P=num_prompts,
                    K=buffer_size,
                    ids_ms=ids_ms,
                    hashed_ms=hashed_ms,
                    ratio=ratio,
                    rounds=times,
                )
            )
            print(
                f"{name:7s} N={num_samples:6d} P={num_prompts:8d}: ids {ids_ms:.3f} ms, hashed {hashed_ms:.3f} ms, "
                f"ratio {ratio:.2f}",
                flush=True,
            )
    return rows


def _state_bytes(tracker) -> int:
    """Bytes the tracker keeps: its memory's state and, with hashed keys, every tensor of its key table."""
    tensors = tracker._memory.state_tensors().values()  # pylint: disable=protected-access
    table = tracker._table  # pylint: disable=protected-access
    return sum(tensor.nbytes for tensor in tensors) + (table.memory_bytes() if table is not None else 0)


def stream(num_keys: int, num_rows: int, num_samples: int) -> dict:
    """Every key new: num_keys distinct keys through a table of num_rows, num_samples per update."""
    tracker = BufferStatTracker(num_rows, 32, 16, keys="hashed")
    by_id = BufferStatTracker(num_rows, 32, 16)
    generator = torch.Generator().manual_seed(1)
    rewards = torch.randn(num_samples, generator=generator)
    times = []
    for start in range(0, num_keys - num_samples + 1, num_samples):
        keys = torch.arange(start, start + num_samples) * 7919 + 13  # distinct, never seen before
        begin = time.perf_counter()
        tracker.update(keys, rewards)
        times.append(time.perf_counter() - begin)
    assert int(tracker._table.index_overflows) == 0
    held, used = tracker.table_keys()
    assert int(used.sum()) == num_rows and int(held[used].max()) == (start + num_samples - 1) * 7919 + 13
    result = dict(
        keys=num_keys,
        rows=num_rows,
        N=num_samples,
        updates=len(times),
        median_ms=statistics.median(times) * 1e3,
        mean_ms=statistics.mean(times) * 1e3,
        max_ms=max(times) * 1e3,
        state_bytes=_state_bytes(tracker),
        id_state_bytes=_state_bytes(by_id),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    print(
        f"stream: {result['updates']} updates, median {result['median_ms']:.2f} ms, mean {result['mean_ms']:.2f} ms, "
        f"state {result['state_bytes'] / 2**20:.0f} MiB (ids: {result['id_state_bytes'] / 2**20:.0f} MiB)",
        flush=True,
    )
    return result


def key_functions() -> dict:
    """Times prompt_keys on 4096 strings and token_keys on [4096, 77] tokens."""
    prompts = [f"a photo of prompt number {i}, in the style of an old painting" for i in range(4096)]
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 49408, (4096, 77), generator=generator)
    mask = torch.arange(77) < torch.randint(5, 77, (4096, 1), generator=generator)
    result = dict(
        prompt_keys_ms=_median_ms(lambda: prompt_keys(prompts)),
        token_keys_ms=_median_ms(lambda: token_keys(tokens, mask)),
    )
    print(
        f"prompt_keys(4096 strings) {result['prompt_keys_ms']:.2f} ms, "
        f"token_keys([4096, 77]) {result['token_keys_ms']:.2f} ms",
        flush=True,
    )
    return result


def markdown(results: dict) -> str:
    """The results as the Markdown tables the README quotes."""
    lines = [
        "| tracker | N | P | K | ids (ms) | hashed (ms) | hashed / ids |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["grid"]:
        lines.append(
            f"| {row['tracker']} | {row['N']:,} | {row['P']:,} | {row['K']} | {row['ids_ms']:.3f} | "
            f"{row['hashed_ms']:.3f} | {row['ratio']:.2f} |"
        )
    s = results["stream"]
    lines += [
        "",
        "| stream | updates | median (ms) | mean (ms) | max (ms) | state (MiB) | id tracker's state (MiB) "
        "| peak RSS (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {s['keys']:,} keys through {s['rows']:,} rows, N = {s['N']} | {s['updates']:,} | "
        f"{s['median_ms']:.2f} | {s['mean_ms']:.2f} | {s['max_ms']:.1f} | {s['state_bytes'] / 2**20:.0f} | "
        f"{s['id_state_bytes'] / 2**20:.0f} | {s['peak_rss_bytes'] / 2**20:.0f} |",
    ]
    k = results["key_functions"]
    lines += [
        "",
        f"`prompt_keys` of 4096 strings: {k['prompt_keys_ms']:.2f} ms; "
        f"`token_keys` of [4096, 77] tokens: {k['token_keys_ms']:.2f} ms.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: List[str]) -> None:
    """Runs the three measurements and writes the results."""
    del argv
    torch.set_num_threads(1)
    results = dict(
        machine=platform.platform(),
        processor=platform.processor(),
        python=sys.version.split()[0],
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        grid=grid(FLAGS.rounds),
        key_functions=key_functions(),
        stream=stream(FLAGS.stream_keys, FLAGS.stream_rows, FLAGS.stream_batch),
    )
    out = FLAGS.out or os.path.join(tempfile.mkdtemp(prefix="rail_interview_keys_"), "keys_cpu")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w", encoding="utf-8") as file:
        json.dump(results, file, indent=1)
    table = markdown(results)
    with open(out + ".md", "w", encoding="utf-8") as file:
        file.write(table)
    print(table)
    print(f"Wrote {out}.json and {out}.md")


def _define_flags() -> None:
    """The script's flags, defined when it runs (so that headline.py can import this module beside others)."""
    flags.DEFINE_integer("rounds", 5, "Rounds of the grid, taking turns over the trackers.")
    flags.DEFINE_integer("stream_keys", 10_000_000, "Distinct keys in the stream.")
    flags.DEFINE_integer("stream_rows", 1_000_000, "Rows of the table the stream goes through.")
    flags.DEFINE_integer("stream_batch", 4096, "N, samples per update of the stream.")
    flags.DEFINE_string(
        "out",
        None,
        "Path prefix of the .json and .md results; by default keys_cpu in a fresh temporary "
        "directory. The committed results: --out=benchmarks/results/keys_cpu.",
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
