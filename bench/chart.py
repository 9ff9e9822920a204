"""PNG chart of the speed-ups over the NVlabs-style reference recorded in bench/results/*.jsonl.

  python -m bench.chart [--results DIR] [--out bench/results/speedups.png]
"""

import argparse
import glob
import json
import os

from bench import harness


def load(results_dir):
    records = []
    for path in sorted(glob.glob(os.path.join(results_dir, '*.jsonl'))):
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--results', default=harness.RESULTS_DIR)
    p.add_argument('--out', default=None)
    args = p.parse_args(argv)
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    latest = {}
    for r in load(args.results):  # the newest record of each (bench, case, provider)
        if r.get('metric') == 'speedup_vs_reference' and r.get('value'):
            latest[(r['bench'], r['case'], r['provider'])] = r
    if not latest:
        raise SystemExit(f'no speedup_vs_reference records in {args.results}')
    rows = sorted(latest.values(), key=lambda r: (r['bench'], r['case'], r['provider']))
    labels = [f"{r['bench']}: {r['case']} [{r['provider']}]" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [r['value'] for r in rows], color=['#2b7bba' if 'fast' in r['provider'] else '#999999'
                                                                for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color='black', linewidth=0.8)
    ax.set_xlabel('speed-up over the NVlabs-style reference (same run)')
    env = rows[-1]
    ax.set_title(f"edm_fast on {env.get('gpu')} (torch {env.get('torch')}, commit {env.get('commit')}, {env.get('date', '')[:10]})",
                 fontsize=9)
    fig.tight_layout()
    out = args.out or os.path.join(args.results, 'speedups.png')
    fig.savefig(out, dpi=120)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
