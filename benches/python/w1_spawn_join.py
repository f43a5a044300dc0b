"""W1 spawn-join for Python's multiprocessing: start+join of an empty
target, N times sequentially; prints microseconds per start+join.

usage: w1_spawn_join.py N METHOD   (METHOD: fork | spawn | forkserver)
"""
import multiprocessing as mp
import sys
import time


def noop():
    pass


def main():
    n = int(sys.argv[1])
    ctx = mp.get_context(sys.argv[2] if len(sys.argv) > 2 else "fork")
    # Warm up (the forkserver starts on first use).
    p = ctx.Process(target=noop)
    p.start()
    p.join()
    t = time.perf_counter()
    for _ in range(n):
        p = ctx.Process(target=noop)
        p.start()
        p.join()
        assert p.exitcode == 0
    print((time.perf_counter() - t) / n * 1e6)


if __name__ == "__main__":
    main()
