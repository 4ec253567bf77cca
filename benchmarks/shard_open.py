"""What checking prepared data at open costs: hash throughput and `TokenShards` open time.

1. Throughput in MB/s over one page-cached file of `--mib` MiB of uint16 token ids: sha256 and
   blake2b (stdlib), xxh3_128 (only when the optional `xxhash` package is installed), the largest
   token id (numpy, the out-of-vocabulary check) and the sampled sha256 the opener uses above
   `FULL_VERIFY_BYTES` (16 blocks of 4 KiB per shard).
2. `TokenShards(dir, verify=...)` on the same tokens in 32 MiB shards: "full" vs "sample", runs
   interleaved; prints the best of `--repeats` and the ratio, and what 100 GB would take at the
   measured rates.

    python benchmarks/shard_open.py                 # --mib 512 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=512, help="MiB of token ids (default 512)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    from polyglu import hardware
    from polyglu.data.shards import TokenShards, sample_sha256, write_token_shards

    print(f"environment: {hardware.describe_environment(hardware.environment('cpu'))}")

    with tempfile.TemporaryDirectory() as tmp:
        tokens = np.random.default_rng(0).integers(0, 50_000, (args.mib << 20) // 2, dtype=np.uint16)
        path = Path(tmp) / "one.bin"
        tokens.tofile(path)
        identity = {"kind": "hf", "name": "bench", "vocab_size": 50_000, "eos_id": 0}
        shard_tokens = 16 << 20  # 32 MiB, prepare's default
        data = Path(tmp) / "data"
        write_token_shards(data, [tokens[i:i + shard_tokens] for i in range(0, len(tokens), shard_tokens)], identity)
        del tokens

        def stream_hash(name):
            def run():
                digest = hashlib.new(name)
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        digest.update(block)
            return run

        def max_id():
            array = np.memmap(path, dtype=np.uint16, mode="r")
            return max(int(array[i:i + (1 << 22)].max()) for i in range(0, len(array), 1 << 22))

        def sampled():  # one sample hash per 32 MiB of file, as the opener does per shard
            for _ in range(max(1, args.mib // 32)):
                sample_sha256(path)

        methods = {"sha256": stream_hash("sha256"), "blake2b": stream_hash("blake2b"), "max_id": max_id,
                   "sampled sha256": sampled}
        try:
            import xxhash

            def xxh3():
                digest = xxhash.xxh3_128()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        digest.update(block)
            methods["xxh3_128"] = xxh3
        except ImportError:
            pass
        methods["open full"] = lambda: TokenShards(data, verify="full")
        methods["open sample"] = lambda: TokenShards(data, verify="sample")
        stream_hash("sha256")()  # warm the page cache
        times = {k: [] for k in methods}
        for _ in range(args.repeats):
            for name, run in methods.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        size = args.mib << 20
        print(f"{args.mib} MiB, page-cached, best of {args.repeats} interleaved runs")
        for name, values in times.items():
            rate = size / min(values) / 1e6
            print(f"  {name:<16} {rate:>10,.0f} MB/s   100 GB: {100e9 / (rate * 1e6):>8.1f} s")
        print(f"  open full / open sample: {min(times['open full']) / min(times['open sample']):.0f}x")


if __name__ == "__main__":
    main()
