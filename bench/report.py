"""The benchmark report: a Markdown table and a PNG of latency CDFs and throughput."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from bench.load import LADDER
from index.files import atomic_write


def without_samples(value: Any) -> Any:
    """The results without raw latency samples (keys starting with '_'), for the JSON."""
    if isinstance(value, dict):
        return {k: without_samples(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [without_samples(v) for v in value]
    return value


def _ms(stats: dict[str, Any]) -> str:
    return f"{stats.get('p50_ms', float('nan')):.2f} / {stats.get('p99_ms', float('nan')):.2f}"


def _cpu(stats: dict[str, Any]) -> str:
    return f"{stats.get('server_cpu_ms_per_call', float('nan')):.2f} + " \
        f"{stats.get('client_cpu_ms_per_call', float('nan')):.2f}"


def markdown(results: dict[str, Any]) -> str:
    """One table per topic, figures as measured (2 cores, loopback)."""
    echo = {r["clients"]: r for r in results["floor_grpc_echo"]}
    lines = [f"Machine: {results['machine']['cpus']} cores. Latency p50 / p99 in ms; x echo: "
             "1-client p50 over the echo floor's, 16-client req/s as a share of its, each "
             "against the echo measured right after it (its figures in the last columns). "
             f"{LADDER[0]}: the same server answering every call with its first answer (the "
             "serving stack without the work). CPU: ms per call at 16 clients, the server's "
             "processes + the clients' (the 2 cores are shared by both).", "",
             "| catalog | items | index | recall@10 | exact search (floor) | RPC | "
             "1 client | x echo | 4 clients req/s | 16 clients req/s | of echo | "
             "16 clients p50 / p99 | CPU | errors | echo beside: 1 client p50, 16 clients "
             "req/s, CPU |",
             "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for name, c in results["catalogs"].items():
        for rpc in (r for r in LADDER if r in c):
            runs = {r["clients"]: r for r in c[rpc]}
            one, sixteen = (runs[n].get("echo", echo[n]) for n in (1, 16))
            errors = sum(sum(r["errors"].values()) for r in c[rpc])
            lines.append(f"| {name} | {c['items']:,} | {c['index']} | {c['recall_at_10']} | "
                         f"{_ms(c['floor_exact_search'])} | {rpc} | {_ms(runs[1])} | "
                         f"{runs[1]['p50_ms'] / one['p50_ms']:.2f} | "
                         f"{runs[4]['requests_per_s']:,} | {runs[16]['requests_per_s']:,} | "
                         f"{runs[16]['requests_per_s'] / sixteen['requests_per_s']:.0%} | "
                         f"{_ms(runs[16])} | {_cpu(runs[16])} | {errors} | "
                         f"{one['p50_ms']:.2f}, {sixteen['requests_per_s']:,}, "
                         f"{_cpu(sixteen)} |")
    lines.append(f"| grpc echo (floor), first | | | | | empty Recommend | {_ms(echo[1])} | 1.00 | "
                 f"{echo[4]['requests_per_s']:,} | {echo[16]['requests_per_s']:,} | 100% | "
                 f"{_ms(echo[16])} | {_cpu(echo[16])} | "
                 f"{sum(sum(r['errors'].values()) for r in echo.values())} | |")
    lines += ["", "Recommend (1 client) beside live items: alternating runs without and with "
              "them, medians of the runs' p50:", "", "| catalog | live items | rounds | "
              "p50 without (ms) | p50 with (ms) | with / without | put -> served on every "
              "worker (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in results["catalogs"].items():
        if "live_catalog" in c:
            lc = c["live_catalog"]
            lines.append(f"| {name} | {lc['live_items']:,} | {lc['rounds']} | "
                         f"{lc['p50_without_ms']:.3f} | {lc['p50_with_ms']:.3f} | "
                         f"{lc['p50_ratio']:.3f} | "
                         f"{', '.join(f'{s:.2f}' for s in lc['put_to_served_s'])} |")
    lines += ["", "| catalog | ingest 500-event msgs ev/s | 1-event msgs ev/s | "
              "ack p50 / p99 @5k ev/s in 50s | @5k ev/s in 10s | @2k ev/s in 1s | "
              "freshness p50 / p99 (1k ev/s background) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in results["catalogs"].items():
        batched, single = c["ingest"]["throughput"]
        acks = c["ingest"]["ack_latency"]
        lines.append(f"| {name} | {batched['events_per_s']:,} | {single['events_per_s']:,} | "
                     + " | ".join(_ms(a) for a in acks) + f" | {_ms(c['freshness'])} |")
    lines += ["", "Full histories (users at the 500-item cap, a message's events on distinct "
              "users):", "", "| catalog | users | 50-event msgs ev/s | 1-event msgs ev/s | "
              "ack p50 / p99 @5k ev/s in 50s | freshness p50 / p99 (1k ev/s background) |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, c in results["catalogs"].items():
        full = c["full_history"]
        batched, single = full["throughput"]
        lines.append(f"| {name} | {full['users']:,} | {batched['events_per_s']:,} | "
                     f"{single['events_per_s']:,} | {_ms(full['ack_latency'][0])} | "
                     f"{_ms(full['freshness'])} |")
    return "\n".join(lines) + "\n"


def _cdf(ax: Any, samples: list[float], label: str) -> None:
    ms = np.sort(np.asarray(samples) * 1000)
    if len(ms):
        ax.plot(ms, np.arange(1, len(ms) + 1) / len(ms), label=label)


def plot(results: dict[str, Any], path: Path) -> None:
    """Latency CDF per RPC (1 client) and throughput vs clients, per catalog."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cdf, tput) = plt.subplots(1, 2, figsize=(13, 5))
    echo = results["floor_grpc_echo"]
    _cdf(cdf, echo[0].get("_latencies", []), "grpc echo (floor)")
    tput.plot([r["clients"] for r in echo], [r["requests_per_s"] for r in echo], "k--",
              label="grpc echo (floor)")
    for name, c in results["catalogs"].items():
        for rpc in (r for r in LADDER if r in c):
            _cdf(cdf, c[rpc][0].get("_latencies", []), f"{name} {rpc}")
            tput.plot([r["clients"] for r in c[rpc]], [r["requests_per_s"] for r in c[rpc]],
                      marker="o", label=f"{name} {rpc}")
        _cdf(cdf, c["freshness"].get("_latencies", []), f"{name} event->visible")
    cdf.set(xscale="log", xlabel="latency (ms, 1 client)", ylabel="fraction of calls",
            title="Latency CDF")
    tput.set(xscale="log", xlabel="concurrent clients", ylabel="requests/s",
             title="Throughput vs clients")
    for ax in (cdf, tput):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def save_figure(fig: Any, path: Path, dpi: int) -> None:
    """Write a matplotlib figure as PNG (atomically, as every file written here) and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
