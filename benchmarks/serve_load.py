"""Load and fault test of the Serve application (loopback only, bounded in count and time).

1. Latency p50/p95/p99 and throughput at concurrency 1, 4, 16, with Generator batching on
   (batch 8) and off (batch 1), same requests, same run.
2. With two Generator replicas under steady load, kill one: count failed requests and time until
   the application is back to two running replicas by itself.

Tiny components on CPU: absolute numbers say little about a GPU deployment; the batching ratio
and the fault behaviour are the point.

    python benchmarks/serve_load.py [--requests 32] [--no-record]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine_line, report  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
BODY = {"prompt": "a portrait photo", "steps": 4, "width": 64, "height": 64}
MAX_SECONDS = 600


def deploy(registry: str, batch: int, generators: int, port: int) -> str:
    from deployments.local import start
    from ray_faceid.config import AutoscalingConfig, ServeConfig

    fixed = AutoscalingConfig(min_replicas=generators, max_replicas=generators)
    one = AutoscalingConfig(min_replicas=1, max_replicas=1)
    config = ServeConfig(registry=registry, api_tokens={"bench": TOKEN}, generator_batch_size=batch,
                         batch_wait_timeout_s=0.05, generator_autoscaling=fixed, encoder_autoscaling=one,
                         ingress_autoscaling=one)
    url, _ = start(config, port)
    return url


def enroll(url: str) -> str:
    from ray_faceid.face.analyzer import sample_images

    photo = sample_images()[1].read_bytes()
    r = httpx.post(f"{url}/v1/identities", files=[("photos", ("p.png", photo, "image/png"))],
                   data={"consent": "benchmark"}, headers=HEADERS, timeout=120)
    r.raise_for_status()
    return r.json()["id"]


async def load(url: str, identity: str, total: int, concurrency: int) -> tuple[list[float], int, float]:
    latencies, failures = [], 0
    queue = list(range(total))

    async def worker(client):
        nonlocal failures
        while queue:
            seed = queue.pop()
            start = time.perf_counter()
            try:
                r = await client.post("/v1/generate", json={**BODY, "seed": seed, "identities": [{"id": identity}]})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                failures += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=120) as client:
        await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(concurrency))), MAX_SECONDS)
    return latencies, failures, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def running_generators() -> int:
    from ray import serve

    status = serve.status().applications["faceid"].deployments["Generator"]
    return status.replica_states.get("RUNNING", 0)


async def kill_under_load(url: str, identity: str, total: int) -> dict:
    import ray

    async def killer():
        await asyncio.sleep(3)
        named = ray.util.list_named_actors(all_namespaces=True)
        victim = next(a for a in named if "Generator" in a["name"] and "REPLICA" in a["name"].upper())
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        return time.perf_counter()

    load_task = asyncio.create_task(load(url, identity, total, 4))
    killed_at = await killer()
    latencies, failures, seconds = await load_task
    recovered = None
    while time.perf_counter() - killed_at < 120:
        if running_generators() == 2:
            recovered = time.perf_counter() - killed_at
            break
        await asyncio.sleep(0.5)
    return {"ok": len(latencies), "failed": failures, "recovery_s": recovered, "seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (bounded)")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--fault-only", action="store_true", help="skip the latency table")
    args = parser.parse_args()
    total = min(args.requests, 100)
    from ray import serve

    from ray_faceid.data.cluster import init_ray

    init_ray(num_cpus=4)
    rows = []
    with tempfile.TemporaryDirectory() as registry:
        for batch in (() if args.fault_only else (8, 1)):
            url = deploy(registry, batch, generators=1, port=8781)
            identity = enroll(url)
            for concurrency in (1, 4, 16):
                latencies, failures, seconds = asyncio.run(load(url, identity, total, concurrency))
                rows.append((batch, concurrency, latencies, failures, seconds))
                print(rows[-1][:2], len(latencies), failures, round(seconds, 1), flush=True)
            serve.delete("faceid")
        url = deploy(registry, 8, generators=2, port=8781)
        identity = enroll(url)
        fault = asyncio.run(kill_under_load(url, identity, 2 * total))
        serve.shutdown()

    lines = [
        f"### serve_load — {time.strftime('%Y-%m-%d')} — {machine_line()}",
        "",
        f"Tiny components on CPU, 64x64, 4 steps, {total} requests per row over loopback; 1 Generator replica.",
        "",
        "| Generator batch | concurrency | p50 s | p95 s | p99 s | requests/s | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch, concurrency, latencies, failures, seconds in rows:
        lines.append(f"| {batch} | {concurrency} | {pct(latencies, 50):.2f} | {pct(latencies, 95):.2f} | "
                     f"{pct(latencies, 99):.2f} | {len(latencies) / seconds:.2f} | {failures} |")
    lines += [
        "",
        f"Fault: 2 Generator replicas, concurrency 4, {2 * total} requests; one replica killed 3 s in: "
        f"{fault['ok']} ok, {fault['failed']} failed, back to 2 running replicas after "
        f"{fault['recovery_s'] if fault['recovery_s'] is None else round(fault['recovery_s'], 1)} s.",
    ]
    report(lines, not args.no_record)


if __name__ == "__main__":
    main()
