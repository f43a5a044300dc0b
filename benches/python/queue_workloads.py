"""Bench-card queue workloads (W2, W3, W3b, W4, W7) for Python's
multiprocessing.Queue, fork context. Prints the figure on the last line, in
the card's unit: msg/s (W2, W7), GB/s (W3, W3b), us per round trip (W4).

usage: queue_workloads.py W2|W3|W3b|W4|W7 N
"""
import multiprocessing as mp
import sys
import time


def put_ints(q, n):
    for i in range(n):
        q.put(i)


def put_bytes(q, n, size):
    payload = b"\x07" * size
    for _ in range(n):
        q.put(payload)


def echo(q1, q2, n):
    for _ in range(n):
        q2.put(q1.get())


def produce(q, n):
    for i in range(n):
        q.put(i)


def consume(q, results, producers):
    count = total = 0
    done = 0
    while done < producers:
        x = q.get()
        if x is None:
            done += 1
            continue
        count += 1
        total += x
    results.put((count, total))


def main():
    workload, n = sys.argv[1], int(sys.argv[2])
    ctx = mp.get_context("fork")
    if workload == "W2":
        q = ctx.Queue()
        t = time.perf_counter()
        p = ctx.Process(target=put_ints, args=(q, n))
        p.start()
        s = 0
        for _ in range(n):
            s += q.get()
        p.join()
        el = time.perf_counter() - t
        assert s == n * (n - 1) // 2
        print(n / el)
    elif workload in ("W3", "W3b"):
        size = 64 * 1024 if workload == "W3" else 8 << 20
        q = ctx.Queue()
        t = time.perf_counter()
        p = ctx.Process(target=put_bytes, args=(q, n, size))
        p.start()
        total = 0
        for _ in range(n):
            total += len(q.get())
        p.join()
        el = time.perf_counter() - t
        assert total == n * size
        print(total / el / 1e9)
    elif workload == "W4":
        q1, q2 = ctx.Queue(), ctx.Queue()
        p = ctx.Process(target=echo, args=(q1, q2, n))
        p.start()
        q1.put(0)
        q2.get()  # warm up one round trip
        t = time.perf_counter()
        for i in range(n - 1):
            q1.put(i)
            assert q2.get() == i
        el = time.perf_counter() - t
        p.join()
        print(el / (n - 1) * 1e6)
    elif workload == "W7":
        producers, consumers = 4, 2
        per = n // producers
        q, results = ctx.Queue(), ctx.Queue()
        t = time.perf_counter()
        ps = [ctx.Process(target=produce, args=(q, per)) for _ in range(producers)]
        cs = [ctx.Process(target=consume, args=(q, results, 1)) for _ in range(consumers)]
        # Each consumer stops after one sentinel; the parent sends them
        # once the producers are done.
        for p in ps + cs:
            p.start()
        for p in ps:
            p.join()
        for _ in range(consumers):
            q.put(None)
        count = total = 0
        for _ in range(consumers):
            c, s = results.get()
            count += c
            total += s
        for c in cs:
            c.join()
        el = time.perf_counter() - t
        assert count == per * producers
        assert total == producers * per * (per - 1) // 2
        print(count / el)
    else:
        raise SystemExit("unknown workload " + workload)


if __name__ == "__main__":
    main()
