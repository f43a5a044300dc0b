"""Bench-card pool workloads (W5, W6, W8) for Python's multiprocessing.Pool,
fork context. Prints the figure on the last line, in the card's unit:
tasks/s (W5), items/s (W6), ms per cycle (W8, median of the cycles).

usage: pool_workloads.py W5|W6|W8 N [WORKERS]  (WORKERS: 2 unless given)
"""
import multiprocessing as mp
import statistics
import sys
import time


def square(x):
    return x * x


def main():
    workload, n = sys.argv[1], int(sys.argv[2])
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    ctx = mp.get_context("fork")
    if workload == "W5":
        with ctx.Pool(workers) as pool:
            pool.apply(square, (1,))  # workers up
            t = time.perf_counter()
            pending = [pool.apply_async(square, (i,)) for i in range(n)]
            total = sum(r.get() for r in pending)
            el = time.perf_counter() - t
        assert total == sum(i * i for i in range(n))
        print(n / el)
    elif workload == "W6":
        with ctx.Pool(workers) as pool:
            pool.apply(square, (1,))
            t = time.perf_counter()
            out = pool.map(square, range(n))
            el = time.perf_counter() - t
            # Checked after the clock, as proc's is.
            total = sum(out)
        assert total == sum(i * i for i in range(n))
        print(n / el)
    elif workload == "W8":
        cycles = []
        for _ in range(n):
            t = time.perf_counter()
            pool = ctx.Pool(2)
            assert pool.apply(square, (3,)) == 9
            pool.close()
            pool.join()
            cycles.append((time.perf_counter() - t) * 1e3)
        print(statistics.median(cycles))
    else:
        raise SystemExit("unknown workload " + workload)


if __name__ == "__main__":
    main()
